"""`dmc bench` on a tiny model: the synthetic CR hits its target, the bytes accounting is exact, and one
run writes the table, JSON and plot. (Speed figures are the benchmark's job, never a test's.)"""

import json

import pytest

import dmc
from dmc.eval.synthetic import impose_synthetic_cr, realised_cr_on
from tests.helpers import SMOLLM2, random_ids, tiny_llama, write_tiny_checkpoint

pytest.importorskip("matplotlib")


@pytest.mark.parametrize("cr", [1.0, 2.0, 4.0])
def test_synthetic_cr_hits_its_target(cr):
    model = dmc.retrofit(tiny_llama("gqa", layers=3), dmc.DMCConfig(target_cr=cr))
    ids = random_ids(2, 200, seed=5)
    got = impose_synthetic_cr(model, cr, ids)
    assert got == pytest.approx(cr, rel=0.02)
    assert realised_cr_on(model, ids) == got  # the model keeps the calibrated rows and offset


@pytest.mark.skipif(not (SMOLLM2 / "config.json").exists(), reason="run `make model` first")
def test_bench_run_writes_consistent_rows(tmp_path, capsys):
    from dmc.eval.bench import main

    folder = write_tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "out"
    main([str(folder), "--contexts", "64", "--batches", "2", "--crs", "2", "--decode-steps", "3", "--out", str(out)])
    data = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").stat().st_size > 0
    progress = capsys.readouterr().err  # the bar, on stderr: one run per (model, context, batch)
    assert "dmc bench: 100%" in progress and "2/2" in progress
    vanilla, synthetic = data["rows"]
    assert vanilla["model"] == "vanilla" and synthetic["model"] == "dmc synthetic 2x"
    config = json.loads((folder / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    tokens = 64 + 1 + 3  # prompt, the untimed warm-up step and the timed steps: all in the cache
    expected = 2 * config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * tokens * head_dim * 4
    assert vanilla["kv_bytes"] == expected  # fp32 keys and values of every layer
    assert synthetic["realised_cr"] > 1.5 and synthetic["kv_ratio"] < 0.8
    assert synthetic["ideal_decode_speedup"] > 1.0 and synthetic["prefill_s"] > 0


@pytest.mark.skipif(not (SMOLLM2 / "config.json").exists(), reason="run `make model` first")
def test_budget_bench_runs_the_continuous_batching_loop_and_writes_its_rows(tmp_path, capsys):
    from dmc.eval.bench import main

    folder = write_tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "out"
    main([str(folder), "--budget-seqs", "2", "4", "--context", "96", "--out-tokens", "4", "8", "--crs", "4",
          "--requests", "12", "--block-size", "8", "--out", str(out)])
    data = json.loads((out / "throughput.json").read_text())
    assert (out / "throughput.png").stat().st_size > 0 and "2/2" not in capsys.readouterr().out
    rows = {(r["model"], r["budget_seqs"]): r for r in data["rows"]}
    assert set(rows) == {(m, b) for m in ("vanilla", "dmc synthetic 4x") for b in (2, 4)}
    for seqs in (2, 4):
        vanilla, dmc4 = rows["vanilla", seqs], rows["dmc synthetic 4x", seqs]
        assert vanilla["peak_kv_bytes"] <= vanilla["budget_bytes"] and vanilla["preempted"] == 0
        assert dmc4["peak_kv_bytes"] <= dmc4["budget_bytes"] == vanilla["budget_bytes"]
        assert dmc4["realised_cr"] > 2 and dmc4["in_flight_ratio"] > 1.5  # the budget holds more sequences
        assert vanilla["hf_static_batch"] >= 1 and vanilla["hf_tokens_per_s"] > 0


def test_budget_bench_bad_input_is_one_line(tmp_path):
    from dmc.eval.bench import main
    from tests.helpers import one_line_exit

    folder = write_tiny_checkpoint(tmp_path / "tiny")
    common = ["--crs", "2", "--requests", "2", "--out", str(tmp_path / "out"), "--no-hf-baseline"]
    msg = one_line_exit(main, str(folder), "--budget-seqs", "0.01", "--context", "64", "--out-tokens", "4", "8", *common)
    assert "cannot hold one sequence" in msg and "--kv-budget" in msg
    msg = one_line_exit(main, str(folder), "--budget-seqs", "2", "--context", "100000", *common)
    assert "longer than the model's" in msg and "use --context <=" in msg


@pytest.mark.skipif(not (SMOLLM2 / "config.json").exists(), reason="run `make model` first")
def test_bench_kv_bits_runs_each_dmc_model_at_each_precision(tmp_path, capsys):
    from dmc.eval.bench import main
    from tests.helpers import one_line_exit

    folder = write_tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "out"
    main([str(folder), "--contexts", "64", "--batches", "2", "--crs", "2", "--decode-steps", "3", "--kv-bits", "16",
          "4", "--out", str(out)])
    rows = {r["model"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}
    assert list(rows) == ["vanilla", "dmc synthetic 2x", "dmc synthetic 2x int4"]
    fp, int4 = rows["dmc synthetic 2x"], rows["dmc synthetic 2x int4"]
    assert int4["realised_cr"] == fp["realised_cr"]  # the same decisions: codes change bytes, not slots
    config = json.loads((folder / "config.json").read_text())
    D = config["hidden_size"] // config["num_attention_heads"]
    group = min(32, D)
    shrink = (D * 4 // 8 + 2 * (D // group) * 2) / (D * 4)  # int4 codes + fp16 scale/min vs float32
    assert int4["ideal_kv_ratio"] == pytest.approx(fp["ideal_kv_ratio"] * shrink)
    assert int4["kv_bytes"] < fp["kv_bytes"] * shrink * 1.5  # blocks + the full-precision open slots
    assert one_line_exit(main, str(folder), "--kv-bits", "3") == "dmc bench: error: --kv-bits takes 16, 8, 4 (got 3)"
