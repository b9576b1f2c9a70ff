"""The GPU check: the CUDA-marked tests and a benchmark on a randomly initialised model of Llama-2-7B shape.

    bash scripts/gpu_check.sh [--dry-run] [--out bench/results/gpu_check.json]

On one NVIDIA GPU with no network (torch, triton and transformers installed; flash-attn optional), in about
8 minutes: the kernel tests (Triton decode and update, the sentinel SDPA's CUDA branch, FlexAttention forward
and backward, flash-attn where present) against their PyTorch references, then, on Llama-2-7B's layer shape
(hidden 4096, 32 heads, MHA, MLP 11008, vocab 32000; ``--layers`` of its 32, random weights, bf16):
  - a training step (forward + backward, no optimiser state: the shape, not a recipe) DMC versus vanilla at T, and
    DMC's with the fused Triton training attention; that attention alone against the sentinel SDPA form;
  - prefill of T tokens: DMC one-pass versus vanilla HF;
  - decode at a fixed batch and context T: vanilla ``DynamicCache`` versus DMC at synthetic CR 2/4/8, on each of
    ``--decode-backends`` (default: the Triton kernels and the portable paged path);
  - throughput at a KV budget holding N vanilla sequences of T tokens (continuous batching), same models.
One JSON with every figure. ``--dry-run``: tiny shapes on the CPU (Triton in its interpreter), so that CI
keeps the script working; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_triton_decode.py", "tests/test_fused_update.py", "tests/test_decode_attention.py",
         "tests/test_train_attention.py", "tests/test_triton_train_attention.py"]
LLAMA2_7B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008,
                 vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=512,
            max_position_embeddings=512)


def run_tests(dry_run: bool, log: Path) -> dict:
    """The kernel tests in a fresh process; on a GPU the CUDA-marked ones run, on the CPU they skip.

    pytest's whole output goes to ``log`` (failures with their tracebacks, skips with reasons): a GPU is lent
    for minutes, and the summary line alone would not say what to fix."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *TESTS]
    if dry_run:  # the suite runs these tests on the CPU already; here: that they collect, as the GPU run will
        cmd.append("--collect-only")
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(done.stdout + done.stderr)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
    return {"returncode": done.returncode, "summary": summary, "seconds": round(time.perf_counter() - t0, 1),
            "log": str(log)}


def random_model(shape: dict, layers: int, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=layers, **shape)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeats: int = 2) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def train_step_s(model, ids) -> float:
    """Forward + backward of the LM loss (and the CR loss for DMC), gradients dropped after."""
    import dmc

    def step():
        out = model(ids, labels=ids, use_cache=False)
        loss = out.loss if getattr(out, "dmc_alpha", None) is None else out.loss + dmc.cr_loss(out.dmc_alpha, 2.0)
        loss.backward()
        model.zero_grad(set_to_none=True)

    model.train()
    try:
        return _timed(step, ids.device)
    finally:
        model.eval()


def train_attention_s(shape: dict, T: int, dtype, device) -> dict:
    """The training attention alone, forward + backward of one sequence at every head: the sentinel SDPA form
    (``auto``) against the fused Triton kernels, and the largest difference of their outputs."""
    from dmc.ops.train_attention import train_attention
    from dmc.ops.triton_decode import triton_available, triton_interpreting

    if not (triton_available() and (device.type == "cuda" or triton_interpreting())):
        return {"skipped": "triton needs CUDA (or TRITON_INTERPRET=1)"}
    H, H_kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    D = shape["hidden_size"] // H
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, T, D, generator=g).to(device, dtype).requires_grad_() for h in (H, H_kv, H_kv))
    keep = torch.log(torch.rand(1, H_kv, T, generator=g).clamp(min=1e-3)).to(device).requires_grad_()
    merge = torch.log1p(-keep.detach().exp().clamp(max=1 - 1e-6))
    outs = {}

    def step(backend):
        out = train_attention(backend, q, k, v, keep, merge)
        out.backward(torch.ones_like(out))
        outs[backend] = out.detach().float()

    res = {backend: _timed(lambda b=backend: step(b), device) for backend in ("sdpa", "triton")}
    res["max_abs_diff"] = float((outs["sdpa"] - outs["triton"]).abs().max())
    return res


@torch.no_grad()
def prefill_s(model, ids) -> float:
    return _timed(lambda: model(ids, use_cache=True, logits_to_keep=1), ids.device)


def synthetic_dmc(vanilla, cr: float, calibration, backend: str = "auto"):
    import dmc
    from dmc.eval.synthetic import impose_synthetic_cr

    model = dmc.retrofit(copy.deepcopy(vanilla), dmc.DMCConfig(target_cr=cr)).eval()
    model.config.dmc_decode_backend = backend
    realised = impose_synthetic_cr(model, cr, calibration)
    return model, realised


def bench(ns, device, dtype, results: dict) -> None:
    """Fills ``results`` as it goes, so that a failure part-way still leaves the figures measured before it."""
    from dmc.eval.bench import measure
    from dmc.eval.serving import Request, serve
    from dmc.eval.throughput import budget_bytes

    shape = TINY if ns.dry_run else LLAMA2_7B
    T, B = ns.context, ns.batch
    vanilla = random_model(shape, ns.layers, dtype, device)
    g = torch.Generator().manual_seed(0)
    ids = lambda b, t: torch.randint(3, shape["vocab_size"], (b, t), generator=g).to(device)  # noqa: E731
    calibration = ids(1, min(T, 1024))
    results.update(shape={**shape, "num_hidden_layers": ns.layers}, context=T, batch=B, dtype=str(dtype), rows=[])
    dmc2, results["train_prefill_cr"] = synthetic_dmc(vanilla, 2.0, calibration, ns.decode_backends[0])
    results["decode_backends"] = ns.decode_backends
    x = ids(1, T)
    results["train_step_s"] = {"vanilla": train_step_s(vanilla, x), "dmc": train_step_s(dmc2, x)}
    results["train_attention_s"] = train_attention_s(shape, T, dtype, device)
    if "skipped" not in results["train_attention_s"]:  # the whole step with the fused kernels in every layer
        dmc2.config.dmc_train_attention = "triton"
        results["train_step_s"]["dmc_triton_attention"] = train_step_s(dmc2, x)
        dmc2.config.dmc_train_attention = "auto"
    results["prefill_s"] = {"vanilla": prefill_s(vanilla, x), "dmc": prefill_s(dmc2, x)}
    del dmc2
    prompts = ids(B, T)
    requests = [Request(ids(1, T // 2 + (i * 37) % (T // 2 - ns.new_tokens))[0], ns.new_tokens)
                for i in range(ns.requests)]
    budget = budget_bytes(vanilla.config, ns.budget_seqs, T, 16, dtype)
    runs = [("vanilla", 1.0, None)] + [(f"dmc synthetic {c:g}x", c, backend) for backend in ns.decode_backends
                                        for c in ns.crs]
    for label, cr, backend in runs:
        model, realised = (vanilla, 1.0) if cr == 1 else synthetic_dmc(vanilla, cr, calibration, backend)
        row = {"model": label, "decode_backend": backend, "realised_cr": realised,
               **measure(model, prompts, ns.decode_steps)}
        st = serve(model, requests, budget).stats
        row.update(budget_bytes=budget, in_flight_mean=st.mean_in_flight, in_flight_max=st.max_in_flight,
                   served_tokens_per_s=st.tokens_per_s, served_decode_tokens_per_s=st.decode_tokens_per_s,
                   preempted=st.preempted, served_peak_bytes=st.peak_bytes)
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        if model is not vanilla:
            del model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, for CI")
    ap.add_argument("--out", default="bench/results/gpu_check.json")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 8 of Llama-2-7B's 32; 2 dry)")
    ap.add_argument("--context", type=int, default=None, help="T (default 4096; 64 dry)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--decode-steps", type=int, default=None)
    ap.add_argument("--crs", type=float, nargs="+", default=[2, 4, 8])
    ap.add_argument("--budget-seqs", type=float, default=None, help="KV budget in vanilla sequences of T tokens")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--decode-backends", nargs="+", default=None,
                    choices=["auto", "triton", "paged", "sdpa", "reference"],
                    help="the DMC models' decode paths, each measured at every CR (default: triton and paged on a GPU, "
                         "paged in a dry run)")
    ns = ap.parse_args(argv)
    dry = ns.dry_run
    defaults = dict(layers=(2, 8), context=(64, 4096), decode_steps=(3, 32), budget_seqs=(2, 8), requests=(6, 64),
                    new_tokens=(4, 64))
    for name, (small, big) in defaults.items():
        if getattr(ns, name) is None:
            setattr(ns, name, small if dry else big)
    if ns.decode_backends is None:
        ns.decode_backends = ["paged"] if dry else ["triton", "paged"]
    if not dry and not torch.cuda.is_available():
        sys.exit("gpu_check: error: no CUDA device here; run it on a GPU machine, or pass --dry-run")
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    out = Path(ns.out)
    report = {"dry_run": dry, "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    if not ns.skip_tests:
        report["tests"] = run_tests(dry, out.with_suffix(".tests.txt"))
        print(f"tests: {report['tests']['summary']}", flush=True)
    report["bench"] = {}
    try:
        bench(ns, device, dtype, report["bench"])
    except Exception as exc:  # keep what was measured; the error is part of the report
        report["bench"]["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(out)  # atomic: never a half-written report
        print(f"wrote {out}")
    if report.get("tests", {}).get("returncode", 0) != 0:
        sys.exit("gpu_check: error: kernel tests failed (see the summary in the report)")


if __name__ == "__main__":
    main()
