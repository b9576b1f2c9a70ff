"""Core speed benchmark: DMC training step vs vanilla (and with distillation from the frozen source model), and
one-pass prefill vs token-by-token prefill.

    .venv/bin/python bench/core_speed.py --model checkpoints/smollm2-135m [--lengths 512 1024 2048]

Every ratio is against a baseline measured in the same run, on the same machine and weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import dmc


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def train_step_fn(model, ids, teacher=None):
    """One optimiser step as the trainer takes it (``teacher``: plus its no-grad forward and the KL term)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95), weight_decay=0.1)

    def step():
        out = model(ids, labels=ids, use_cache=False)
        alpha = getattr(out, "dmc_alpha", None)
        loss = out.loss if alpha is None else out.loss + dmc.cr_loss(alpha, 2.0)
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(ids, use_cache=False).logits
            loss = loss + dmc.distillation_kl(out.logits, teacher_logits)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def load(path, **dmc_kwargs):
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if not dmc_kwargs:
        return base
    model = dmc.retrofit(base, dmc.DMCConfig(**dmc_kwargs))
    with torch.no_grad():  # a plausible trained state: ~half the decisions merge (synthetic, for timing)
        g = torch.Generator().manual_seed(0)
        D, c = model.config.dmc_head_dim, model.config.dmc_channel_index
        for layer in model.model.layers:
            w = layer.self_attn.k_proj.weight
            w[c::D] = torch.randn(w[c::D].shape, generator=g) * 0.5
        model.config.dmc_logit_offset = 0.0
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="checkpoints/smollm2-135m")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--prefill-length", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="bench/results/core_speed.json")
    args = ap.parse_args()
    if not (Path(args.model) / "config.json").exists():
        raise SystemExit(f"error: no model at {args.model}; run `make model` first")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab = AutoModelForCausalLM.from_pretrained(args.model).config.vocab_size
    results = {"model": args.model, "threads": args.threads, "torch": torch.__version__, "train": [], "prefill": {}}

    print(f"training step (fwd + bwd + AdamW, batch 1, fp32, {args.threads} threads), median of {args.repeats}")
    print(f"{'T':>6} {'vanilla s':>10} {'DMC s':>8} {'ratio':>6} {'DMC+KD s':>9} {'KD cost':>8}")
    vanilla, dmc_model = load(args.model).train(), load(args.model, window=12).train()
    teacher = load(args.model).eval().requires_grad_(False)  # distillation's teacher: the source model, frozen
    for T in args.lengths:
        ids = torch.randint(0, vocab, (1, T))
        t_van = _time(train_step_fn(vanilla, ids), args.repeats)
        t_dmc = _time(train_step_fn(dmc_model, ids), args.repeats)
        t_kd = _time(train_step_fn(dmc_model, ids, teacher), args.repeats)
        results["train"].append({"T": T, "vanilla_s": t_van, "dmc_s": t_dmc, "ratio": t_dmc / t_van,
                                 "dmc_distill_s": t_kd, "distill_cost": t_kd / t_dmc})
        print(f"{T:>6} {t_van:>10.2f} {t_dmc:>8.2f} {t_dmc / t_van:>6.2f} {t_kd:>9.2f} {t_kd / t_dmc:>8.2f}")
    del vanilla, teacher

    T = args.prefill_length
    ids = torch.randint(0, vocab, (1, T))
    model = dmc_model.eval()

    @torch.no_grad()
    def one_pass():
        model(ids, past_key_values=dmc.DMCCache(model.config))

    @torch.no_grad()
    def token_by_token():  # how the reference code prefills: one token at a time through the cache
        cache = dmc.DMCCache(model.config)
        model(ids[:, :1], past_key_values=cache)
        for t in range(1, T):
            model(ids[:, t : t + 1], past_key_values=cache)

    van = load(args.model).eval()

    @torch.no_grad()
    def vanilla_prefill():
        van(ids, use_cache=True)

    t_one, t_van = _time(one_pass, args.repeats), _time(vanilla_prefill, args.repeats)
    t_tok = _time(token_by_token, 1)
    results["prefill"] = {"T": T, "one_pass_s": t_one, "token_by_token_s": t_tok, "vanilla_s": t_van,
                          "speedup_vs_token_by_token": t_tok / t_one, "ratio_vs_vanilla": t_one / t_van}
    print(f"\nprefill of {T} tokens (batch 1): one-pass {t_one:.2f} s, token-by-token {t_tok:.2f} s "
          f"-> {t_tok / t_one:.1f}x faster; vanilla HF prefill {t_van:.2f} s (one-pass / vanilla = {t_one / t_van:.2f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
