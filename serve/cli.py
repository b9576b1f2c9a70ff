"""``dmc serve MODEL``: an OpenAI-compatible server for a vanilla, DMC or DMS folder (or Hub id), every sequence
in one shared paged cache under a KV budget (``engine.py``), over HTTP with FastAPI and uvicorn (``app.py``)."""

from __future__ import annotations

import argparse
import socket
import sys

DEFAULT_BUDGET_GIB = 1.0


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(prog="dmc serve", description="serve a vanilla, DMC or DMS model over the OpenAI "
                                 "API (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics)")
    ap.add_argument("model", help="HF folder (e.g. from `dmc export`) or Hub id")
    ap.add_argument("--kv-budget", type=float, default=None, metavar="GiB",
                    help=f"bytes of KV slot blocks the sequences in flight may hold (default {DEFAULT_BUDGET_GIB:g}, "
                    "or with --max-seqs alone: that many sequences at the full context, uncompressed)")
    ap.add_argument("--max-seqs", type=int, default=None, help="most sequences in flight at once (default: as "
                    "many as the budget holds)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--kv-bits", type=int, default=None, help="DMC/DMS cache precision: 16, 8 or 4 (default: the "
                    "folder's)")
    ap.add_argument("--policy", default=None, help="a training-free eviction policy on a vanilla model: "
                    "streaming_llm, tova or h2o")
    ap.add_argument("--budget-cr", type=float, default=None, help="the policy's compression ratio (with --policy)")
    ap.add_argument("--served-model-name", default=None, help="the name clients ask for (default: MODEL as given)")
    ap.add_argument("--max-model-len", type=int, default=None, help="longest sequence, prompt and output "
                    "(default: the model's max_position_embeddings)")
    ap.add_argument("--block-size", type=int, default=16, help="slots per block of the paged cache")
    ap.add_argument("--dtype", default=None, help="float32 (default on CPU) or bfloat16 (default on CUDA)")
    ap.add_argument("--device", default=None, help="cuda if available, else cpu")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for the model (default: torch's)")
    ap.add_argument("--log-level", default="warning", help="uvicorn's log level")
    return ap.parse_args(argv)


def _fail(message: str):
    sys.exit(f"dmc serve: error: {message}")


def check_port(host: str, port: int) -> None:
    """Refuse a port already taken before the model loads (uvicorn would fail only after it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            _fail(f"cannot listen on {host}:{port} ({err.strerror}); stop what uses it or pass --port")


def policy_from(args, model):
    from dmc.methods import is_compressed

    if args.policy is None:
        if args.budget_cr is not None:
            _fail("--budget-cr sets a policy's compression ratio: add --policy")
        return None
    from dmc.eval.policies import POLICIES, Budget

    if is_compressed(model.config):
        _fail(f"--policy {args.policy} evicts from a vanilla Llama's cache; {args.model} compresses its own: drop "
              "--policy")
    if args.policy not in POLICIES:
        _fail(f"--policy {args.policy!r} is not a policy; choose one of {', '.join(sorted(POLICIES))}")
    if args.budget_cr is None or args.budget_cr < 1:
        _fail("--policy needs --budget-cr C with C >= 1 (e.g. --budget-cr 2)")
    policy = POLICIES[args.policy](Budget(cr=args.budget_cr))
    if policy.history:
        _fail(f"--policy {args.policy} keeps a per-step attention history, which continuous batching does not "
              "carry across rows; use streaming_llm, tova or h2o")
    return policy


def budget_of(args, model, context: int) -> int:
    """The KV budget in bytes."""
    from dmc.eval.throughput import budget_bytes

    if args.max_seqs is not None and args.max_seqs < 1:
        _fail("--max-seqs must be at least 1")
    if args.kv_budget is not None:
        if args.kv_budget <= 0:
            _fail("--kv-budget must be positive (GiB)")
        budget = int(args.kv_budget * 2**30)
    elif args.max_seqs is not None:
        budget = budget_bytes(model.config, args.max_seqs, context, args.block_size, model.dtype)
    else:
        budget = int(DEFAULT_BUDGET_GIB * 2**30)
    return budget


def check_budget(engine, block_size: int) -> None:
    """Refuse a budget below the smallest sequence: one block for each (layer, KV head)."""
    from dmc.paged_slots import slot_bytes

    layers = engine.cache.layers
    one = sum(block_size * slot_bytes(x.head_dim, engine.model.dtype, x.kv_bits, x.kv_group) * x.num_kv_heads
              for x in layers)
    if engine.budget < one:
        _fail(f"--kv-budget {engine.budget / 2**30:.6g} GiB cannot hold one sequence: the smallest needs "
              f"{one / 2**20:.3f} MiB (one block of {block_size} slots for each layer and KV head); raise --kv-budget")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.block_size < 1:
        _fail("--block-size must be at least 1")
    check_port(args.host, args.port)

    import torch
    import uvicorn
    from transformers.utils import logging as hf_logging

    from dmc.generate import ModelFolderError, load

    from .app import build_app
    from .bridge import EngineThread
    from .engine import Engine
    from .protocol import ModelInfo

    hf_logging.disable_progress_bar()  # a refused start stays one line; the server's own log says when it is up
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    try:
        model, tok = load(args.model, dtype, device, args.kv_bits)
    except ModelFolderError as err:
        _fail(str(err))
    context = args.max_model_len or model.config.max_position_embeddings
    policy = policy_from(args, model)
    budget = budget_of(args, model, context)
    engine = Engine(model, budget, policy, args.block_size, max_seqs=args.max_seqs)
    check_budget(engine, args.block_size)
    info = ModelInfo(args.served_model_name or args.model, context, model.config.vocab_size, stop_ids(model, tok))
    app = build_app(EngineThread(engine), tok, info)
    print(f"dmc serve: {info.name} ({describe(model, policy)}) at http://{args.host}:{args.port}/v1, KV budget "
          f"{budget / 2**30:.3g} GiB{f', at most {args.max_seqs} sequences' if args.max_seqs else ''}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def stop_ids(model, tok) -> tuple[int, ...]:
    """The tokens that end a sequence: the generation config's EOS ids and the tokenizer's."""
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    return tuple(sorted(set(ids)))


def describe(model, policy) -> str:
    from dmc.methods import method_of

    method = method_of(model.config)
    if method is not None:
        return f"{method.label}, {getattr(model.config, method.field('kv_bits'), 16)}-bit slots"
    return f"vanilla, {policy.label}" if policy is not None else "vanilla, every token kept"
