"""scripts/gpu_check.sh --dry-run: the GPU check's whole path on tiny shapes on the CPU, so CI keeps it working
(its figures mean nothing; the kernel tests it names are collected, and they run in the suite itself)."""

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_writes_one_report_with_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["tests"]["returncode"] == 0 and "tests collected" in report["tests"]["summary"]
    bench = report["bench"]
    assert set(bench["prefill_s"]) == {"vanilla", "dmc"}
    assert set(bench["train_step_s"]) == {"vanilla", "dmc", "dmc_triton_attention"}  # the suite sets TRITON_INTERPRET
    attention = bench["train_attention_s"]
    assert attention["sdpa"] > 0 and attention["triton"] > 0 and attention["max_abs_diff"] < 1e-4
    assert bench["decode_backends"] == ["paged"] and bench["rows"][1]["decode_backend"] == "paged"
    rows = {r["model"]: r for r in bench["rows"]}
    assert list(rows) == ["vanilla", "dmc synthetic 2x", "dmc synthetic 4x", "dmc synthetic 8x"]
    for r in rows.values():
        assert r["decode_tokens_per_s"] > 0 and r["served_peak_bytes"] <= r["budget_bytes"]
    assert rows["dmc synthetic 4x"]["realised_cr"] > 2.5
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_without_a_gpu_the_real_run_is_refused_in_one_line():
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--skip-tests"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0 and "no CUDA device here" in done.stderr and "Traceback" not in done.stderr
