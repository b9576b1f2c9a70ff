"""A live ``dmc serve`` API on 127.0.0.1 in this process (uvicorn in a thread, the engine in its own), over a tiny
random Llama or DMC model with SmolLM2's real tokenizer and chat template, for the OpenAI-client tests."""

from __future__ import annotations

import copy
import threading
import time
from contextlib import contextmanager

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import dmc
from tests.helpers import SHAPES, SMOLLM2, drive_mixed_decisions

CONTEXT = 256


def tokenizer():
    return AutoTokenizer.from_pretrained(SMOLLM2)


def chat_model(compressed: bool, seed: int = 0):
    """A 2-layer GQA Llama over SmolLM2's vocabulary in float64 (so that batching never flips a greedy token);
    ``compressed``: retrofitted with DMC, about half of its decisions merging."""
    tok = tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                         max_position_embeddings=CONTEXT, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, **SHAPES["gqa"])
    model = LlamaForCausalLM(config).double().eval()
    if compressed:
        model = dmc.retrofit(model, dmc.DMCConfig(window=12))
        drive_mixed_decisions(model)
    return model, tok


@contextmanager
def live_server(model, tok, budget_bytes: int = 10**8, block_size: int = 4, max_seqs: int | None = None,
                name: str = "tiny", policy=None):
    """Serve a copy of ``model`` (the engine swaps a vanilla model's attention while it runs, so the caller's
    copy stays the reference); yields (base URL, engine)."""
    import uvicorn

    from dmc.serve.app import build_app
    from dmc.serve.bridge import EngineThread
    from dmc.serve.cli import stop_ids
    from dmc.serve.engine import Engine
    from dmc.serve.launch import free_port
    from dmc.serve.protocol import ModelInfo

    engine = Engine(copy.deepcopy(model), budget_bytes, policy, block_size, max_seqs=max_seqs)
    info = ModelInfo(name, CONTEXT, model.config.vocab_size, stop_ids(model, tok))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(EngineThread(engine), tok, info), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@torch.no_grad()
def greedy_alone(model, prompt_ids: list[int], max_tokens: int, stop_ids: tuple[int, ...]) -> list[int]:
    """The greedy tokens of one prompt by itself on the model's own cache: prefill, then one token at a time,
    ending at a stop token (kept, as the server counts it) or ``max_tokens``."""
    from transformers import DynamicCache

    from dmc.methods import is_compressed, new_cache

    cache = new_cache(model.config) if is_compressed(model.config) else DynamicCache(config=model.config)
    logits = model(torch.tensor([prompt_ids]), past_key_values=cache, use_cache=True).logits[0, -1]
    out = []
    while True:
        out.append(int(logits.argmax()))
        if len(out) >= max_tokens or out[-1] in stop_ids:
            return out
        logits = model(torch.tensor([[out[-1]]]), past_key_values=cache, use_cache=True).logits[0, -1]


def metric(text: str, name: str) -> float:
    """One sample of a Prometheus text exposition (the first with that name)."""
    from dmc.serve.metrics import parse

    values = parse(text)
    if name not in values:
        raise AssertionError(f"{name} is not in /metrics")
    return values[name]
