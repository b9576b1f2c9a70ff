"""The comparison as a resumable chain of units (issue 34): answers keyed by what a model is, never by where
it lies; paired statistics over shared items; a report assembled from committed items alone."""

import shutil

from dmc.eval.lm import EvalModel


def test_a_models_fingerprint_does_not_depend_on_its_folders_place(folders, tmp_path):
    """Committed answers are reused on any machine, whose run cache lies elsewhere: a copy of a folder at another
    path (absolute or relative) answers to the same fingerprint; other weights do not."""
    copy = shutil.copytree(folders[1], tmp_path / "elsewhere" / folders[1].name)
    here = EvalModel(folders[1]).fingerprint
    assert EvalModel(copy).fingerprint == here
    assert EvalModel(folders[0]).fingerprint != here


# ---- a whole protocol on tiny models ---------------------------------------------------------------------------

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from dmc.eval.compare import main as compare  # noqa: E402
from tests.helpers import ROOT, one_line_exit, write_tiny_checkpoint  # noqa: E402

EVAL = ["--tasks", "ppl", "ppl_prose", "needle", "--ppl-blocks", "3", "--ppl-block", "32", "--needle-contexts", "64",
        "--needle-depths", "0.2", "0.8", "--batch-size", "4", "--device", "cpu", "--dtype", "float32", "--ci-resamples",
        "200"]


@pytest.fixture(scope="module")
def protocol_file(tmp_path_factory):
    """A protocol in miniature: a tiny base, its LM-only control and a DMC retrofit (the tiny recipe), two
    policies at 2x on the base and on the control."""
    root = tmp_path_factory.mktemp("protocol")
    base = write_tiny_checkpoint(root / "tiny-llama")
    recipe = (ROOT / "configs" / "tiny.yaml").read_text()
    (root / "tiny-dmc.yaml").write_text(recipe)
    control = recipe.replace("  dmc:\n    window: 12\n", "  method: control\n")
    assert "  method: control\n" in control  # the tiny recipe's DMC block was found and replaced
    (root / "tiny-control.yaml").write_text(control.replace("  decision_lr: 5.0e-2\n", "").replace("  target_cr: 2.0\n", ""))
    spec = {"name": "tiny-protocol", "base": str(base), "policies": ["h2o", "streaming_llm"], "crs": [2],
            "policy_bases": ["vanilla", "control"], "eval_args": EVAL,
            "trainings": [{"key": "control", "recipe": str(root / "tiny-control.yaml"), "export": "tiny-control-hf",
                           "role": "control"},
                          {"key": "dmc", "recipe": str(root / "tiny-dmc.yaml"), "export": "tiny-dmc-hf", "role": "dmc",
                           "cr": 2}]}
    path = root / "protocol.json"
    path.write_text(json.dumps(spec))
    return path


def _run(protocol_file, out, *extra, capsys=None):
    compare(["--protocol", str(protocol_file), "--out", str(out), *extra])
    return (out / "report.md").read_bytes(), json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_a_protocol_trains_evaluates_and_reassembles_from_its_items_alone(protocol_file, tmp_path, monkeypatch,
                                                                          capsys):
    """The run trains its units into the run cache, evaluates every variant and writes a report with paired rows.
    Then, with every trained model gone (a fresh machine with the committed items), the same command has nothing
    to run and rebuilds the same report and results byte for byte; so does --assemble."""
    import os
    import shutil

    cache = tmp_path / "runs"
    monkeypatch.setenv("DMC_RUN_CACHE", str(cache))
    out = tmp_path / "out"
    report, results = _run(protocol_file, out)
    names = ["tiny-llama", "tiny-control-hf", "tiny-dmc-hf", "tiny-llama+h2o@2x", "tiny-llama+streaming_llm@2x",
             "tiny-control-hf+h2o@2x", "tiny-control-hf+streaming_llm@2x"]
    assert list(results["models"]) == names and not results["missing"]
    assert "cr_per_layer" in results["models"]["tiny-dmc-hf"]["tasks"]["ppl"]  # measured on its cache
    pairs = {(p["a"], p["b"], p["task"]) for p in results["paired"]}
    assert ("tiny-dmc-hf", "tiny-control-hf", "ppl_prose") in pairs and ("tiny-dmc-hf", "tiny-llama", "ppl") in pairs
    assert ("tiny-dmc-hf", "tiny-control-hf+h2o@2x", "needle-question-aware") in pairs
    assert ("tiny-llama+h2o@2x", "tiny-control-hf", "ppl") in pairs
    assert "## At a glance" in report.decode() and "tiny-dmc-hf" in report.decode()
    capsys.readouterr()

    shutil.rmtree(cache)
    os.utime(out / "report.md", (0, 0))
    again, results_again = _run(protocol_file, out)
    assert "nothing to run" in capsys.readouterr().out
    assert again == report and results_again == results and not cache.exists()
    assert (out / "results.json").read_bytes() == json.dumps(results, indent=2).encode()
    assert _run(protocol_file, out, "--assemble")[0] == report


@pytest.mark.slow
def test_a_unit_whose_model_changed_is_evaluated_again_not_reused(protocol_file, tmp_path, monkeypatch, capsys):
    """A retrain that did not reproduce (here: other weights in the run cache's export) has another fingerprint: its
    variants are evaluated afresh and their old items removed; every other unit's items stay."""
    import torch
    from transformers import AutoModelForCausalLM

    from dmc.eval.protocol import Training, load_protocol, training_folders

    monkeypatch.setenv("DMC_RUN_CACHE", str(tmp_path / "runs"))
    out = tmp_path / "out"
    _, before = _run(protocol_file, out)
    files_before = {p.name: p.read_bytes() for p in (out / "items").iterdir()}
    spec = load_protocol(str(protocol_file))
    export = training_folders(spec, next(t for t in spec.trainings if t.key == "dmc"))[1]
    assert isinstance(spec.trainings[0], Training)
    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    model.save_pretrained(export)
    capsys.readouterr()
    _, after = _run(protocol_file, out)
    log = capsys.readouterr()
    assert "tiny-dmc-hf: its model changed" in log.out
    dmc_before, dmc_after = before["models"]["tiny-dmc-hf"], after["models"]["tiny-dmc-hf"]
    assert dmc_after["fingerprint"] != dmc_before["fingerprint"]
    assert dmc_after["tasks"]["ppl"]["perplexity"] != dmc_before["tasks"]["ppl"]["perplexity"]
    files_after = {p.name: p.read_bytes() for p in (out / "items").iterdir()}
    kept = {n for n in files_before if not n.startswith("tiny-dmc-hf.")}
    assert all(files_after[n] == files_before[n] for n in kept)
    assert not any(n in files_after for n in files_before if n.startswith("tiny-dmc-hf."))
    for name in before["models"]:
        if name != "tiny-dmc-hf":
            assert after["models"][name] == before["models"][name]


@pytest.mark.slow
def test_evaluations_in_parallel_processes_store_what_one_process_stores(protocol_file, tmp_path, monkeypatch):
    """--jobs 2: the sweeps run two at a time in worker processes, one thread each; every item file equals the one
    a single process writes (headers exactly, losses within float summation order), and the report lists the same
    units, none missing."""
    from dmc.eval.store import read_items

    monkeypatch.setenv("DMC_RUN_CACHE", str(tmp_path / "runs"))
    _, one = _run(protocol_file, tmp_path / "one", "--threads", "2")
    _, two = _run(protocol_file, tmp_path / "two", "--threads", "2", "--jobs", "2")  # the trainings are reused
    assert list(two["models"]) == list(one["models"]) and not two["missing"]
    files = sorted(p.name for p in (tmp_path / "one" / "items").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two" / "items").iterdir()) and len(files) == 7 * 3 + 4
    for name in files:
        (h1, a), (h2, b) = (read_items(tmp_path / run / "items" / name) for run in ("one", "two"))
        assert h1 == h2 and a.keys() == b.keys(), name
        for item in a:
            assert a[item]["counts"] == b[item]["counts"] and a[item].get("answer") == b[item].get("answer")
            if "nll" in a[item]:
                assert b[item]["nll"] == pytest.approx(a[item]["nll"], rel=1e-6), (name, item)


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_workers_error_is_one_line_and_stops_the_pool(tmp_path, monkeypatch, jobs):
    """A base whose weights cannot be read: one line naming the folder, in one process or (--jobs 2) from a worker,
    and the run ends (no worker left running)."""
    import multiprocessing

    base = write_tiny_checkpoint(tmp_path / "tiny-llama")
    (base / "model.safetensors").write_bytes(b"not weights")
    spec = {"name": "broken", "base": str(base), "policies": ["h2o", "streaming_llm", "tova"], "crs": [2],
            "eval_args": EVAL}
    (tmp_path / "p.json").write_text(json.dumps(spec))
    monkeypatch.setenv("DMC_RUN_CACHE", str(tmp_path / "runs"))
    message = one_line_exit(compare, "--protocol", str(tmp_path / "p.json"), "--out", str(tmp_path / "out"),
                            "--jobs", jobs, "--threads", "2")
    assert "tiny-llama: its weights cannot be read" in message and not multiprocessing.active_children()


def test_jobs_is_refused_without_a_protocol_and_below_one(protocol_file, tmp_path, capsys):
    assert "use it with --protocol" in one_line_exit(compare, "somewhere", "--jobs", "2", "--out", str(tmp_path))
    assert "give 1 or more" in one_line_exit(compare, "--protocol", str(protocol_file), "--jobs", "0", "--out",
                                             str(tmp_path))


def test_assembly_refuses_items_of_two_fingerprints_for_one_unit(protocol_file, tmp_path):
    """Answers of a retrained model beside those of the old one: which are the unit's is not for assembly to
    guess. One line, and nothing written."""
    from dmc.eval.protocol import load_protocol

    spec = load_protocol(str(protocol_file))
    items = tmp_path / "out" / "items"
    items.mkdir(parents=True)
    header = {"name": "tiny-llama", "task": "ppl", "fingerprint": "aaaa", "unit": "vanilla", "model": {},
              "settings": {"ppl_block": 32, "ppl_blocks": 3, "ppl_source": "stdlib"}}
    (items / "tiny-llama.ppl.111.jsonl").write_text(json.dumps({"header": header}) + "\n")
    (items / "tiny-llama.ppl.222.jsonl").write_text(json.dumps({"header": {**header, "fingerprint": "bbbb"}}) + "\n")
    message = one_line_exit(compare, "--protocol", str(protocol_file), "--out", str(tmp_path / "out"), "--assemble")
    assert "tiny-llama ppl items of 2 fingerprints (aaaa, bbbb): delete the stale file" in message
    assert not (tmp_path / "out" / "report.md").exists() and spec.name == "tiny-protocol"


def test_assembly_without_items_names_every_missing_unit(protocol_file, tmp_path, capsys):
    """Also: dmc eval's options after --protocol reach the run, as `make compare` passes --threads 2."""
    report, results = _run(protocol_file, tmp_path / "out", "--assemble", "--threads", "1")
    assert [m["name"] for m in results["missing"]][:3] == ["tiny-llama", "tiny-control-hf", "tiny-dmc-hf"]
    assert "**Not complete (7 units):**" in report.decode()


def test_a_run_cache_that_cannot_be_written_is_one_line(protocol_file, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("DMC_RUN_CACHE", str(blocker / "runs"))
    message = one_line_exit(compare, "--protocol", str(protocol_file), "--out", str(tmp_path / "out"))
    assert f"the run cache {blocker / 'runs'} is not writable" in message and "set DMC_RUN_CACHE" in message
    assert not (tmp_path / "out" / "report.md").exists()


def test_the_run_cache_is_one_documented_place(monkeypatch, tmp_path):
    from dmc.run_cache import run_cache

    monkeypatch.setenv("DMC_RUN_CACHE", str(tmp_path / "x"))
    assert run_cache() == tmp_path / "x"
    monkeypatch.delenv("DMC_RUN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert run_cache() == tmp_path / "xdg" / "dmc" / "runs"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert run_cache() == Path.home() / ".cache" / "dmc" / "runs"


# ---- the policy sweep: every CR of a policy in one batch ---------------------------------------------------

@pytest.mark.parametrize("policy", ["h2o", "scissorhands", "snapkv", "streaming_llm", "tova"])
def test_a_sweep_of_crs_in_one_batch_equals_each_cr_alone(folders, tmp_path, policy):
    """The sweep's rows carry their own budgets (RowBudgets): every variant's stored answers, perplexity blocks and
    needle cells in both settings, equal those of the variant evaluated alone (the path before the sweep), and its
    cache held the same slots."""
    from dmc.eval.policies import POLICIES, Budget
    from dmc.eval.run import Variant, evaluate_variant, evaluate_variants, parser
    from dmc.eval.store import read_items

    opts = parser().parse_args([str(folders[0]), "--out", str(tmp_path), *EVAL[:-2], "--needle-contexts", "64", "96",
                                "--ci-resamples", "0"])
    crs = [2, 3, 8]
    variants = [Variant(str(folders[0]), POLICIES[policy](Budget(cr=c))) for c in crs]
    alone = [evaluate_variant(opts, v, tmp_path / f"alone{k}", "float32") for k, v in enumerate(variants)]
    swept = evaluate_variants(opts, variants, tmp_path / "sweep", "float32")
    assert [e["name"] for e in swept] == [e["name"] for e in alone]
    for one, many in zip(alone, swept):
        assert many["fingerprint"] == one["fingerprint"] and many["tasks"].keys() == one["tasks"].keys()
    stored = {}
    for folder in [tmp_path / f"alone{k}" for k in range(3)] + [tmp_path / "sweep"]:
        for path in (folder / "items").glob("*.jsonl"):
            stored.setdefault(path.name, []).append(read_items(path)[1])
    assert len(stored) == 3 * 4 and all(len(v) == 2 for v in stored.values())  # ppl, prose, needle x 2 settings
    for name, (one, many) in stored.items():
        assert one.keys() == many.keys(), name
        for item in one:
            a, b = one[item], many[item]
            assert a["counts"] == b["counts"] and a["data"] == b["data"], (name, item)
            if "nll" in a:
                assert b["nll"] == pytest.approx(a["nll"], rel=1e-6, abs=1e-5), (name, item)
            else:
                assert a["answer"] == b["answer"], (name, item)


def _needle_prompts(lm):
    from dmc.eval.tasks.needle import build

    return [build(lm.tok, c, d, 0)[0] for c, d in ((64, 0.2), (64, 0.8), (96, 0.5))]


@pytest.mark.parametrize("which", ["vanilla", "dmc", "h2o", "snapkv-question-aware"])
def test_fixed_length_greedy_decoding_equals_generate(folders, which):
    """EvalModel.greedy (the needle's decoder) gives generate()'s answers and cache counts where no row stops early."""
    from dmc.eval.lm import EvalModel
    from dmc.eval.policies import POLICIES, Budget

    name = which.split("-")[0]
    policy = POLICIES[name](Budget(cr=3)) if name in POLICIES else None
    lm = EvalModel(folders[1] if name == "dmc" else folders[0], batch_size=3, policy=policy)
    lm.model.generation_config.eos_token_id = None  # no row ends: generate() runs all 6 steps too
    prompts, qa = _needle_prompts(lm), which.endswith("question-aware")
    assert lm.greedy(prompts, 6, question_aware=qa) == lm.generate(prompts, 6, question_aware=qa)


@pytest.mark.parametrize("name", ["h2o", "scissorhands", "snapkv", "streaming_llm", "tova"])
def test_question_aware_crs_share_one_prefill_and_equal_each_alone(folders, name):
    """One prefill per prompt, branched into one compressed row per CR (PolicyCache.branch), equals each CR's own
    prefill and compression: answers and cache counts."""
    from dmc.eval.lm import EvalModel
    from dmc.eval.policies import POLICIES, Budget

    lm = EvalModel(folders[0], batch_size=9, policy=POLICIES[name](Budget(cr=2)))
    prompts = _needle_prompts(lm)
    rows = [p for p in prompts for _ in range(3)]
    crs = [2, 4, 8] * len(prompts)
    shared = lm.greedy(rows, 5, question_aware=True, crs=crs)
    for cr in (2, 4, 8):
        alone = EvalModel(folders[0], batch_size=3, policy=POLICIES[name](Budget(cr=cr)))
        texts, counts = alone.greedy(prompts, 5, question_aware=True)
        k = [2, 4, 8].index(cr)
        assert shared[0][k::3] == texts and shared[1][k::3] == counts


def test_a_folders_digest_ignores_the_library_that_wrote_it(folders, tmp_path):
    """A model folder exported by another transformers release (its config names the version) is the same model:
    the protocol keeps its committed answers; other weights are another model."""
    from dmc.eval.fingerprint import folder_digest

    copy = shutil.copytree(folders[0], tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "transformers_version": "9.9.9"}, indent=4))
    assert folder_digest(copy) == folder_digest(folders[0]) != folder_digest(folders[1])
    assert folder_digest(tmp_path / "absent") is None


def test_a_recipes_key_is_the_same_with_its_dmc_fields_nested_or_flat(tmp_path):
    """Recipes held the DMC fields flat under model before model.dmc existed; the committed items are keyed by
    that form, so nesting the same settings keeps the key, and changing one changes it."""
    from dmc.eval.protocol import COMPARE_135M, Training, training_key

    def key(text: str) -> str:
        path = tmp_path / f"r{abs(hash(text))}.yaml"
        path.write_text(text)
        return training_key(COMPARE_135M, Training(key="x", recipe=str(path), export="x-hf", role="dmc"))

    flat = "model:\n  path: p\n  window: 12\n  tau: 0.2\ndata:\n  kind: stdlib\n"
    nested = "# a comment\nmodel:\n  path: p\n  dmc:\n    window: 12\n    tau: 0.2\ndata:\n  kind: stdlib\n"
    assert key(flat).split("@")[1] == key(nested).split("@")[1]
    assert key(nested.replace("tau: 0.2", "tau: 0.3")).split("@")[1] != key(flat).split("@")[1]
    # a model line after the block stays where it is
    assert key(nested.replace("    tau: 0.2\n", "    tau: 0.2\n  dtype: bfloat16\n")).split("@")[1] == \
        key(flat.replace("  tau: 0.2\n", "  tau: 0.2\n  dtype: bfloat16\n")).split("@")[1]


# ---- a tokens curve (kind: curve) -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def curve_file(protocol_file):
    """A curve in miniature: the tiny DMC recipe and its control at 1x and 2x their schedule's length."""
    root = protocol_file.parent
    spec = {"name": "tiny-curve", "base": str(root / "tiny-llama"), "kind": "curve", "policy_bases": [],
            "eval_args": ["--tasks", "ppl", "ppl_prose", *EVAL[4:8], *EVAL[13:]],
            "trainings": [{"key": k if s == 1 else f"{k}-x{s}", "recipe": str(root / f"tiny-{k}.yaml"),
                           "export": f"tiny-{k}-hf" + ("" if s == 1 else f"-x{s}"), "role": k, "scale": s,
                           **({"control": "control" if s == 1 else f"control-x{s}"} if k == "dmc" else {})}
                          for k in ("control", "dmc") for s in (1, 2)]}
    assert "--needle-depths" not in spec["eval_args"] and "--batch-size" in spec["eval_args"]
    path = root / "curve.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.slow
def test_a_curve_trains_each_point_at_its_length_and_pairs_it_with_its_own_control(curve_file, tmp_path,
                                                                                   monkeypatch):
    import yaml

    from dmc.eval.protocol import load_protocol, training_folders

    monkeypatch.setenv("DMC_RUN_CACHE", str(tmp_path / "runs"))
    out = tmp_path / "curve"
    report, results = _run(curve_file, out)
    rows = {(r["scale"], r["task"]): r for r in results["curve"]}
    assert sorted(rows) == [(1, "ppl"), (1, "ppl_prose"), (2, "ppl"), (2, "ppl_prose")]
    assert rows[(2, "ppl")]["tokens"] == 2 * rows[(1, "ppl")]["tokens"] == 2 * 8 * 2 * 32
    assert rows[(2, "ppl")]["control"] == "tiny-control-hf-x2" and rows[(1, "ppl")]["control"] == "tiny-control-hf"
    paired = {(p["a"], p["b"], p["task"]): p for p in results["paired"]}
    assert rows[(2, "ppl")]["ratio"] == paired[("tiny-dmc-hf-x2", "tiny-control-hf-x2", "ppl")]["ratio"]
    assert (out / "curve_ppl_ratio.png").is_file() and b"against training tokens" in report
    protocol = load_protocol(str(curve_file))
    run_dir, export = training_folders(protocol, protocol.training("dmc-x2"))
    schedule = yaml.safe_load((run_dir / "config.yaml").read_text())["schedule"]
    assert (schedule["stage1_steps"], schedule["ramp_steps"], schedule["finetune_steps"]) == (4, 8, 4)
    # a point's run folder whose recipe differs in more than its length is refused in one line
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    recorded["optim"]["lr"] = 0.5
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recorded))
    shutil.rmtree(export)
    for items in (out / "items").glob("tiny-dmc-hf-x2.*"):  # the point is to be computed again
        items.unlink()
    message = one_line_exit(compare, "--protocol", str(curve_file), "--out", str(out))
    assert "holds a run of another recipe (optim.lr: 0.5 -> 0.001)" in message and "differ in length only" in message


def test_the_curves_1x_points_are_the_comparisons_runs_and_its_points_come_shortest_first():
    """curve-135m shares the run cache with compare-135m: its 1x trainings have the comparison's keys (no retraining);
    longer points have keys of their own; each scale's control comes before the methods paired with it."""
    from dmc.eval.protocol import COMPARE_135M, CURVE_135M, training_folders, training_key

    for key in ("control", "dmc2x"):
        ours, theirs = CURVE_135M.training(key), COMPARE_135M.training(key)
        assert training_key(CURVE_135M, ours) == training_key(COMPARE_135M, theirs)
        assert training_folders(CURVE_135M, ours) == training_folders(COMPARE_135M, theirs)
    scales = [t.scale for t in CURVE_135M.trainings]
    assert scales == sorted(scales) and set(scales) == {1, 2, 4, 8}
    for t in CURVE_135M.trainings:
        if t.role != "control":
            assert CURVE_135M.training(t.control).scale == t.scale
    keys = {training_key(CURVE_135M, t) for t in CURVE_135M.trainings}
    assert len(keys) == len(CURVE_135M.trainings)
