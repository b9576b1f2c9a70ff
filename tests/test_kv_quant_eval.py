"""``dmc eval`` / ``dmc compare --kv-bits``: every model (and policy) at each cache precision, the quality it costs
and the bytes it saves in one table, through the commands a user runs."""

import json

import pytest

from tests.helpers import one_line_exit


def test_compare_runs_models_and_policies_on_codes_with_their_bytes(folders, tmp_path, capsys):
    from dmc.eval.compare import main

    vanilla, dmc_dir, _ = folders
    out = tmp_path / "cmp"
    argv = [str(vanilla), "--dmc", str(dmc_dir), "--policies", "h2o", "--crs", "2", "--kv-bits", "16", "4",
            "--policy-kv-bits", "4", "--tasks", "ppl", "needle", "--ppl-blocks", "2", "--ppl-block", "40",
            "--needle-contexts", "64", "--needle-depths", "0", "1", "--out", str(out)]
    main(argv)
    results = json.loads((out / "results.json").read_text())["models"]
    assert list(results) == ["tiny-vanilla", "tiny-vanilla+int4", "tiny-dmc", "tiny-dmc+int4",
                             "tiny-vanilla+h2o@2x+int4"]
    ppl = {name: m["tasks"]["ppl"] for name, m in results.items()}
    # the codes cost something, and only the codes: the vanilla model on codes keeps every token
    for name in ("tiny-vanilla", "tiny-dmc"):
        assert ppl[f"{name}+int4"]["perplexity"] != pytest.approx(ppl[name]["perplexity"], rel=1e-6)
    assert ppl["tiny-vanilla+int4"]["realised_cr"] == 1.0 and results["tiny-vanilla+int4"]["kv_bits"] == 4
    assert ppl["tiny-vanilla+h2o@2x+int4"]["realised_cr"] == pytest.approx(2, rel=0.1)
    # bytes of an int4 slot by hand: codes D/2 + fp16 scale and minimum per group, over 2 * D fp16 bytes
    D = 16  # the tiny Llama's head dim: one group of min(32, D) channels
    shrink = (D // 2 + 2 * 2) / (2 * D)
    assert results["tiny-dmc+int4"]["kv_slot_shrink"] == pytest.approx(shrink)
    assert results["tiny-dmc"]["kv_slot_shrink"] == 1.0
    report = (out / "report.md").read_text()
    want = shrink / ppl["tiny-dmc+int4"]["realised_cr"]
    assert "KV vs 16-bit" in report and f"| tiny-dmc+int4 | {ppl['tiny-dmc+int4']['realised_cr']:.2f} | {want:.3f} |" in report
    assert "question_aware_accuracy" in results["tiny-vanilla+h2o@2x+int4"]["tasks"]["needle"]
    assert "question_aware_accuracy" not in results["tiny-vanilla+int4"]["tasks"]["needle"]  # nothing to compress
    fingerprints = {m["fingerprint"] for m in results.values()}
    assert len(fingerprints) == len(results)  # an int4 run never reuses the 16-bit run's stored answers
    capsys.readouterr()


def test_kv_bits_other_than_16_8_4_is_one_line(folders, tmp_path):
    from dmc.eval.compare import main as compare
    from dmc.eval.run import main as evaluate

    vanilla, _, _ = folders
    out = str(tmp_path / "o")
    assert "--kv-bits takes 16, 8, 4 (got 3)" in one_line_exit(evaluate, str(vanilla), "--kv-bits", "3", "--out", out)
    assert "--policy-kv-bits takes 16, 8, 4 (got 2)" in one_line_exit(compare, str(vanilla), "--policy-kv-bits", "2",
                                                                       "--out", out)


def test_eval_takes_a_quantisation_group_and_counts_its_scales(folders, tmp_path, capsys):
    from dmc.eval.run import main

    vanilla, dmc_dir, _ = folders
    out = tmp_path / "grp"
    common = ["--tasks", "ppl", "--ppl-blocks", "2", "--ppl-block", "40", "--out", str(out)]
    main([str(vanilla), str(dmc_dir), "--kv-bits", "4", "--kv-group", "8", *common])
    results = json.loads((out / "results.json").read_text())["models"]
    assert list(results) == ["tiny-vanilla+int4g8", "tiny-dmc+int4g8"]
    D = 16
    shrink = (D // 2 + 2 * 2 * (D // 8)) / (2 * D)  # two groups: twice the scales of the default group
    assert all(m["kv_slot_shrink"] == pytest.approx(shrink) and m["kv_group"] == 8 for m in results.values())
    assert results["tiny-dmc+int4g8"]["dmc_config"]["dmc_kv_group"] == 8
    main([str(dmc_dir), "--kv-bits", "4", *common])  # the default group: its own answers, not group 8's
    default = json.loads((out / "results.json").read_text())["models"]["tiny-dmc+int4"]
    assert default["fingerprint"] != results["tiny-dmc+int4g8"]["fingerprint"]
    assert default["tasks"]["ppl"]["perplexity"] != results["tiny-dmc+int4g8"]["tasks"]["ppl"]["perplexity"]
    capsys.readouterr()
    assert "--kv-group 5 must divide the head dim 16" in one_line_exit(main, str(vanilla), "--kv-bits", "4",
                                                                        "--kv-group", "5", *common)
