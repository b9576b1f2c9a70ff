"""The lm-evaluation-harness model ``dmc`` runs harness tasks (log-likelihood and generation) on the DMC cache."""

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

from tests.test_eval import folders  # noqa: E402,F401  (the tiny vanilla + DMC folders)

TASKS = """
task: dmc_fixture_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
---
task: dmc_fixture_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
"""


def test_importing_the_adapter_registers_the_dmc_model():
    from lm_eval.api.registry import get_model

    from dmc.eval.lm_eval_adapter import DMCLM

    assert get_model("dmc") is DMCLM


def test_the_package_declares_the_harness_entry_point():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="lm_eval.models") if e.name == "dmc"]
    assert ep.value == "dmc.eval.lm_eval_adapter:DMCLM"


def test_harness_tasks_run_on_the_dmc_cache(folders, tmp_path):  # noqa: F811
    from lm_eval.tasks import TaskManager

    from dmc.eval.lm_eval_adapter import DMCLM

    rows = [{"question": f"What is {a} + {b}?", "choices": [str(a + b), str(a + b + 1)], "answer": 0}
            for a, b in [(1, 2), (3, 4), (2, 2)]]
    data = tmp_path / "fixture.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    for i, doc in enumerate(TASKS.split("---")):
        (tmp_path / f"task{i}.yaml").write_text(doc.format(data=data))
    lm = DMCLM(pretrained=str(folders[1]), batch_size=2)
    out = lm_eval.simple_evaluate(model=lm, tasks=["dmc_fixture_mc", "dmc_fixture_gen"],
                                  task_manager=TaskManager(include_path=str(tmp_path)))
    assert 0.0 <= out["results"]["dmc_fixture_mc"]["acc,none"] <= 1.0
    assert 0.0 <= out["results"]["dmc_fixture_gen"]["exact_match,none"] <= 1.0
    assert lm.meter.summary()["realised_cr"] > 1.0  # every request went through the compressed cache


def test_dmc_lm_eval_command_runs_a_task(folders, tmp_path, monkeypatch, capsys):  # noqa: F811
    from dmc.cli import main

    rows = [{"question": "What is 1 + 1?", "choices": ["2", "3"], "answer": 0}]
    data = tmp_path / "fixture.jsonl"
    data.write_text(json.dumps(rows[0]))
    (tmp_path / "task0.yaml").write_text(TASKS.split("---")[0].format(data=data))
    monkeypatch.setattr("sys.argv", ["dmc"])
    main(["lm-eval", "--model", "dmc", "--model_args", f"pretrained={folders[1]},batch_size=2",
          "--tasks", "dmc_fixture_mc", "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out")])
    assert "dmc_fixture_mc" in capsys.readouterr().out
