"""The lm-evaluation-harness model ``dmc`` runs harness tasks (log-likelihood and generation) on the DMC cache."""

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")


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


def _fixture_tasks(tmp_path, rows=None):
    rows = rows or [{"question": f"What is {a} + {b}?", "choices": [str(a + b), str(a + b + 1)], "answer": 0}
                    for a, b in [(1, 2), (3, 4), (2, 2)]]
    data = tmp_path / "fixture.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    for i, doc in enumerate(TASKS.split("---")):
        (tmp_path / f"task{i}.yaml").write_text(doc.format(data=data))
    return rows


def test_harness_tasks_run_on_the_dmc_cache_and_report_its_cr(folders, tmp_path):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from dmc.eval.lm import EvalModel
    from dmc.eval.lm_eval_adapter import DMCLM

    rows = _fixture_tasks(tmp_path)
    ours = EvalModel(folders[1], batch_size=2)
    for task, metric in (("dmc_fixture_mc", "acc,none"), ("dmc_fixture_gen", "exact_match,none")):
        lm = DMCLM(pretrained=str(folders[1]), batch_size=2)
        assert isinstance(lm, HFLM)  # the harness's batching, windows and templates
        out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_path=str(tmp_path)),
                                      log_samples=True)
        if task == "dmc_fixture_mc":  # the harness's accuracy is our scorer's argmax over the choices
            right = []
            for r in rows:
                scores = ours.loglikelihood([(f"{r['question']}\nAnswer:", f" {c}") for c in r["choices"]])[0]
                right.append(max(range(len(scores)), key=lambda i: scores[i][0]) == r["answer"])
            assert out["results"][task][metric] == pytest.approx(sum(right) / len(rows))
        else:  # its generations are our decoding on the cache, stop sequence cut
            texts = ours.generate([f"{r['question']}\nAnswer:" for r in rows], 6, stop=["\n"])[0]
            assert [s["resps"][0][0] for s in out["samples"][task]] == [t.split("\n")[0] for t in texts]
        # log-likelihood and generation requests each count their cache; the CR lands in the results JSON
        assert out["config"]["dmc_realised_cr"] == lm.meter.summary()["realised_cr"] > 1.0
        assert len(out["config"]["dmc_realised_cr_per_layer"]) == 2


def _requests(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


@pytest.mark.parametrize("which", [1, 2], ids=["dmc", "dms"])
def test_the_harness_log_likelihoods_equal_dmc_evals_scorer(folders, which):
    from dmc.eval.lm import EvalModel
    from dmc.eval.lm_eval_adapter import DMCLM

    pairs = [("def add(a, b):\n    return", " a + b"), ("import os\nimport", " sys"), ("x = 1", " + 2\n")]
    harness = DMCLM(pretrained=str(folders[which]), batch_size=3)
    scores = harness.loglikelihood(_requests("loglikelihood", pairs))
    assert harness.meter.summary()["realised_cr"] > 1.0  # the requests ran on the compressed cache
    ours = EvalModel(folders[which], batch_size=3).loglikelihood(pairs)[0]
    for (h_score, h_greedy), (o_score, o_greedy) in zip(scores, ours):
        assert abs(h_score - o_score) < 1e-4 and h_greedy == o_greedy


@pytest.mark.parametrize("which", [1, 2], ids=["dmc", "dms"])
def test_batched_generation_equals_one_request_at_a_time(folders, which):
    from dmc.eval.lm_eval_adapter import DMCLM

    prompts = ["def add(a, b):\n    return", "import", "class Point:\n    def __init__(self, x, y):\n"]
    args = [(p, {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}) for p in prompts]
    batched = DMCLM(pretrained=str(folders[which]), batch_size=3)
    one = DMCLM(pretrained=str(folders[which]), batch_size=1)
    assert batched.generate_until(_requests("generate_until", args)) == \
        one.generate_until(_requests("generate_until", args))
    assert batched.meter.summary()["realised_cr"] > 1.0


def test_dmc_lm_eval_with_the_harness_hf_model_scores_as_our_model_and_dmc_eval(folders, tmp_path,
                                                                               monkeypatch):
    from dmc.cli import main
    from dmc.eval.lm import EvalModel

    rows = _fixture_tasks(tmp_path)
    monkeypatch.setattr("sys.argv", ["dmc"])
    scores = {}
    for model in ("hf", "dmc"):
        out = tmp_path / f"out-{model}"
        main(["lm-eval", "--model", model, "--model_args", f"pretrained={folders[0]},dtype=float32", "--device", "cpu",
              "--batch_size", "2", "--tasks", "dmc_fixture_mc", "--include_path", str(tmp_path),
              "--output_path", str(out), "--log_samples"])
        (samples,) = out.rglob("samples_dmc_fixture_mc_*.jsonl")
        scores[model] = [json.loads(line)["filtered_resps"] for line in samples.read_text().splitlines()]
    assert scores["hf"] == scores["dmc"] and len(scores["hf"]) == 3
    # and they are what `dmc eval`'s scorer gives the same (context, continuation) pairs
    ours = EvalModel(folders[0], batch_size=2)
    for row, harness in zip(rows, scores["hf"]):
        pairs = [(f"{row['question']}\nAnswer:", f" {choice}") for choice in row["choices"]]
        expected = [score for score, _ in ours.loglikelihood(pairs)[0]]
        assert [float(ll) for ll, *_ in harness] == pytest.approx(expected, abs=1e-4)


def test_dmc_lm_eval_command_runs_a_task(folders, tmp_path, monkeypatch, capsys):
    from dmc.cli import main

    rows = [{"question": "What is 1 + 1?", "choices": ["2", "3"], "answer": 0}]
    data = tmp_path / "fixture.jsonl"
    data.write_text(json.dumps(rows[0]))
    (tmp_path / "task0.yaml").write_text(TASKS.split("---")[0].format(data=data))
    monkeypatch.setattr("sys.argv", ["dmc"])
    main(["lm-eval", "--model", "dmc", "--model_args", f"pretrained={folders[1]},batch_size=2",
          "--tasks", "dmc_fixture_mc", "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out")])
    assert "dmc_fixture_mc" in capsys.readouterr().out


def test_the_harness_mmlu_template_renders_our_mmlu_prompts_character_for_character(tmp_path):
    """The harness's own MMLU task files (its template, its subject description), pointed at our fixture, ask
    for exactly the contexts and continuations eval/tasks/mmlu.py scores."""
    from pathlib import Path

    import yaml
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    from dmc.eval.tasks.mmlu import load_mmlu, prompt

    harness = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    subject = "abstract_algebra"
    rows = [{"question": f"  Q{i}: which of these is {i}?\n", "choices": [str(i), f"{i}+1", f"{i} - 1", "none"],
             "answer": i % 4, "subject": subject, "split": "dev" if i < 5 else "test"} for i in range(8)]
    for split in ("dev", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows if r["split"] == split))
    (tmp_path / "all.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ours = yaml.safe_load((harness / f"mmlu_{subject}.yaml").read_text())
    task = {"task": "parity_mmlu", "include": str(harness / "_default_template_yaml"), "dataset_path": "json",
            "dataset_kwargs": {"data_files": {s: str(tmp_path / f"{s}.jsonl") for s in ("dev", "test")}},
            "description": ours["description"]}
    (tmp_path / "parity.yaml").write_text(yaml.safe_dump(task))

    class Recorder(LM):  # answers nothing of interest; keeps what the harness asked
        def __init__(self):
            super().__init__()
            self.asked = []

        def loglikelihood(self, requests, disable_tqdm=False):
            self.asked += [r.args for r in requests]
            return [(0.0, False)] * len(requests)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    recorder = Recorder()
    lm_eval.simple_evaluate(model=recorder, tasks=["parity_mmlu"], num_fewshot=5,
                            task_manager=TaskManager(include_path=str(tmp_path)))
    data = load_mmlu(str(tmp_path / "all.jsonl"))[subject]
    expected = [(prompt(subject, data["dev"][:5], rec), f" {letter}") for rec in data["test"] for letter in "ABCD"]
    assert len(recorder.asked) == len(expected) == 12
    assert sorted(recorder.asked) == sorted(expected)
