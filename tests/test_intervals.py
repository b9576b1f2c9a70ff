"""Bootstrap 95% intervals (over ppl blocks, over needle cells) and the English-prose ppl source."""

import json
import math

import numpy as np
import pytest

from dmc.eval.intervals import mean_interval, perplexity_interval, resample_indices
from dmc.eval.run import main as eval_main
from dmc.eval.tasks import TaskError
from tests.helpers import SMOLLM2, one_line_exit, write_tiny_checkpoint


def _quantile_by_hand(sorted_values, q):
    """Linear interpolation between order statistics at position q * (n - 1)."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


def test_perplexity_interval_equals_a_hand_computation():
    nll, tokens = [1.0, 2.0, 3.0], [1, 1, 2]
    indices = [[0, 0, 0], [0, 1, 2], [2, 2, 1], [1, 1, 1], [2, 2, 2]]
    # by hand: exp(sum nll / sum tokens) of each resample
    by_hand = sorted([math.exp(3 / 3), math.exp(6 / 4), math.exp(8 / 5), math.exp(6 / 3), math.exp(9 / 6)])
    expected = (_quantile_by_hand(by_hand, 0.025), _quantile_by_hand(by_hand, 0.975))
    assert perplexity_interval(nll, tokens, indices=indices) == pytest.approx(expected, rel=1e-12)


def test_mean_interval_equals_a_hand_computation():
    cells = [1.0, 0.0, 1.0, 1.0]
    indices = [[0, 1, 2, 3], [1, 1, 1, 1], [0, 2, 3, 0], [1, 3, 1, 2]]
    by_hand = sorted([3 / 4, 0.0, 1.0, 2 / 4])
    expected = (_quantile_by_hand(by_hand, 0.025), _quantile_by_hand(by_hand, 0.975))
    assert mean_interval(cells, "cells", indices=indices) == pytest.approx(expected, rel=1e-12)


def test_default_resamples_are_seeded_and_cover_the_estimate():
    a, b = resample_indices(5, 100, seed=3), resample_indices(5, 100, seed=3)
    assert a.shape == (100, 5) and np.array_equal(a, b) and not np.array_equal(a, resample_indices(5, 100, seed=4))
    nll = [2.0, 2.5, 1.5, 3.0, 2.2]
    lo, hi = perplexity_interval(nll, [1] * 5)
    assert lo < math.exp(sum(nll) / 5) < hi


def test_fewer_than_two_samples_are_refused():
    with pytest.raises(TaskError, match="at least 2 blocks"):
        perplexity_interval([1.0], [3])
    with pytest.raises(TaskError, match="at least 2 cells"):
        mean_interval([1.0], "cells")


def test_prose_source_is_never_a_training_document():
    from dmc.data import SourceSpec, documents, prose_documents
    from dmc.data.sources import PROSE_FILE, stdlib_files

    prose = list(prose_documents())
    assert len(prose) > 50 and sum(len(t) for _, t in prose) > 300_000  # enough for 32 blocks of 512 tokens
    files = stdlib_files("train", 0.05) + stdlib_files("validation", 0.05)
    assert files and not any(p.as_posix().endswith(PROSE_FILE) for p in files)
    sample = prose[0][1][:200]
    assert not any(sample in text for _, text in documents(SourceSpec(kind="stdlib", split="train")))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    if not (SMOLLM2 / "config.json").exists():
        pytest.skip("run `make model` first")
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("ci") / "tiny"))


def test_eval_reports_intervals_in_json_and_report(tiny, tmp_path):
    out = tmp_path / "run"
    eval_main([tiny, "--tasks", "ppl", "ppl_prose", "needle", "--ppl-blocks", "3", "--ppl-block", "32",
               "--needle-contexts", "64", "--needle-depths", "0.2", "0.8", "--ci-resamples", "200", "--out", str(out)])
    tasks = json.loads((out / "results.json").read_text())["models"]["tiny"]["tasks"]
    for task in ("ppl", "ppl_prose"):
        lo, hi = tasks[task]["perplexity_ci95"]
        assert lo <= tasks[task]["perplexity"] <= hi and tasks[task]["blocks"] == 3
    assert tasks["ppl"]["source"] == "stdlib" and tasks["ppl_prose"]["source"] == "prose"
    assert tasks["ppl"]["perplexity"] != tasks["ppl_prose"]["perplexity"]
    lo, hi = tasks["needle"]["accuracy_ci95"]
    assert 0 <= lo <= tasks["needle"]["accuracy"] <= hi <= 1 and tasks["needle"]["cells"] == 2
    report = (out / "report.md").read_text()
    assert "## ppl_prose" in report and "perplexity 95% CI" in report and "accuracy 95% CI" in report


def test_eval_refuses_an_interval_on_one_sample(tiny, tmp_path):
    message = one_line_exit(eval_main, tiny, "--tasks", "needle", "--needle-contexts", "64", "--needle-depths", "0.5",
                            "--out", str(tmp_path / "n"))
    assert "at least 2 cells" in message and "--ci-resamples 0" in message
    message = one_line_exit(eval_main, tiny, "--ppl-blocks", "1", "--ppl-block", "32", "--out", str(tmp_path / "p"))
    assert "at least 2 blocks" in message and "--ppl-blocks 2" in message


def test_paired_perplexity_ratio_equals_a_hand_computation():
    """Both methods resampled on the same blocks: exp(mean log-ppl of A - that of B) per resample, percentiles."""
    from dmc.eval.intervals import paired_ppl_ratio

    a = {"block0": {"nll": 2.0, "tokens": 2}, "block1": {"nll": 6.0, "tokens": 3}, "block2": {"nll": 1.0, "tokens": 1}}
    b = {"block0": {"nll": 3.0, "tokens": 2}, "block1": {"nll": 6.0, "tokens": 3}, "block2": {"nll": 2.0, "tokens": 1},
         "block9": {"nll": 99.0, "tokens": 1}}  # only in B: not part of the comparison
    indices = [[0, 0, 0], [0, 1, 2], [2, 2, 1], [1, 1, 1]]
    by_hand = sorted([2 / 2 - 3 / 2, 9 / 6 - 11 / 6, 8 / 5 - 10 / 5, 18 / 9 - 18 / 9])
    got = paired_ppl_ratio(a, b, indices=indices)
    assert got["ratio"] == pytest.approx(math.exp(9 / 6 - 11 / 6), rel=1e-12) and got["items"] == 3
    lo, hi = (_quantile_by_hand(by_hand, q) for q in (0.025, 0.975))
    assert got["ci95"] == pytest.approx([math.exp(lo), math.exp(hi)], rel=1e-12)


def test_paired_accuracy_difference_equals_a_hand_computation():
    from dmc.eval.intervals import paired_accuracy_difference

    a = {"256/0.1": {"correct": True}, "256/0.5": {"correct": False}, "512/0.1": {"correct": True}}
    b = {"256/0.1": {"correct": False}, "256/0.5": {"correct": False}, "512/0.1": {"correct": True}}
    # shared ids in natural order: 256/0.1, 256/0.5, 512/0.1 -> differences 1, 0, 0
    indices = [[0, 0, 0], [1, 2, 1], [0, 1, 2], [2, 0, 0]]
    by_hand = sorted([1.0, 0.0, 1 / 3, 2 / 3])
    got = paired_accuracy_difference(a, b, indices=indices)
    assert got["difference"] == pytest.approx(1 / 3)
    assert got["ci95"] == pytest.approx([_quantile_by_hand(by_hand, 0.025), _quantile_by_hand(by_hand, 0.975)])


def test_a_paired_interval_can_exclude_zero_where_separate_ones_overlap():
    """The reason for pairing: blocks differ far more than the methods do, so the methods' own intervals
    overlap, yet B is better on every block and the paired interval says so."""
    from dmc.eval.intervals import paired_ppl_ratio, verdict

    rng = np.random.default_rng(0)
    base = rng.uniform(1.0, 3.0, 32)  # nats per token, block by block
    a = {f"block{i}": {"nll": 100 * x, "tokens": 100} for i, x in enumerate(base)}
    b = {f"block{i}": {"nll": 100 * (x - 0.02), "tokens": 100} for i, x in enumerate(base)}
    ci_a = perplexity_interval([v["nll"] for v in a.values()], [100] * 32)
    ci_b = perplexity_interval([v["nll"] for v in b.values()], [100] * 32)
    assert ci_a[0] < ci_b[1]  # separate intervals overlap
    paired = paired_ppl_ratio(a, b)
    assert paired["ci95"][0] > 1 and verdict(paired["ci95"], 1.0, lower_is_better=True) == "worse"
    assert verdict(paired_ppl_ratio(b, a)["ci95"], 1.0, lower_is_better=True) == "better"
    assert verdict([0.9, 1.1], 1.0, lower_is_better=True) == "no difference shown"


def test_a_paired_comparison_of_methods_scored_on_different_blocks_is_one_line():
    from dmc.eval.intervals import paired_ppl_ratio

    a = {f"block{i}": {"nll": 1.0, "tokens": 1, "data": f"d{i}"} for i in range(3)}
    b = {f"block{i}": {"nll": 1.0, "tokens": 1, "data": "other" if i == 1 else f"d{i}"} for i in range(3)}
    with pytest.raises(TaskError, match="vanilla and dmc were scored on different blocks .block1 differs.: evaluate"):
        paired_ppl_ratio(a, b, names=("vanilla", "dmc"))
    with pytest.raises(TaskError, match="at least 2 shared blocks"):
        paired_ppl_ratio({"block0": a["block0"]}, {"block0": a["block0"], "block2": b["block2"]})
