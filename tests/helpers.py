"""Tiny random Llama models for fast CPU tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dmc

VOCAB = 101

SHAPES = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=6, num_key_value_heads=2),
}


def tiny_llama(kind: str = "gqa", dtype=torch.float32, seed: int = 0, tie: bool = False, layers: int = 2):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=layers,
        max_position_embeddings=512, tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, **SHAPES[kind],
    )
    return LlamaForCausalLM(config).to(dtype).eval()


@torch.no_grad()
def drive_mixed_decisions(model, scale: float = 4.0, seed: int = 1) -> None:
    """Random large decision rows (the adapter gate: random gate weights) and a zero offset: roughly half the
    decisions merge, far from the 0 boundary, with merge weights of every size."""
    g = torch.Generator().manual_seed(seed)
    if model.config.dmc_gate == "adapter":
        for layer in model.model.layers:
            w = layer.self_attn.dmc_gate.proj.weight
            w.copy_(torch.randn(w.shape, generator=g, dtype=w.dtype) * scale / model.config.dmc_gate_scale)
        model.config.dmc_logit_offset = 0.0
        model.config.dmc_weight_offset = 0.0
        return
    D, c = model.config.dmc_head_dim, model.config.dmc_channel_index
    for layer in model.model.layers:
        w = layer.self_attn.k_proj.weight
        w[c::D] = (torch.randn(w[c::D].shape, generator=g) * scale).to(w.dtype)
        wq = layer.self_attn.q_proj.weight
        wq[c::D] = (torch.randn(wq[c::D].shape, generator=g)).to(wq.dtype)
    model.config.dmc_logit_offset = 0.0


def mixed_dmc(kind="gqa", window=12, dtype=torch.float64, **dmc_kwargs):
    model = dmc.retrofit(tiny_llama(kind, dtype), dmc.DMCConfig(window=window, **dmc_kwargs))
    drive_mixed_decisions(model)
    return model


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def left_padded_rows(lengths: list[int]):
    """Random rows of the given lengths, left-padded into one batch: (rows, ids, mask, position_ids), with
    positions as generate() makes them (each row's first real token at 0)."""
    T = max(lengths)
    rows = [random_ids(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    return rows, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


SMOLLM2 = __import__("pathlib").Path(__file__).resolve().parent.parent / "checkpoints" / "smollm2-135m"


def write_tiny_checkpoint(path, kind: str = "gqa", seed: int = 0):
    """A tiny random Llama folder with SmolLM2's real tokenizer (for pipeline tests)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SMOLLM2)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                         max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, **SHAPES[kind])
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def logged(out_dir, *keys: str) -> dict[int, tuple[float, ...]]:
    """Per step, the values of ``keys`` a training run wrote to its CSV logs (rows with ``keys[0]``)."""
    import csv
    from pathlib import Path

    rows = {}
    for path in sorted(Path(out_dir).glob("logs/version_*/metrics.csv")):
        for row in csv.DictReader(open(path)):
            if row.get(keys[0]):
                rows[int(row["step"])] = tuple(float(row[k]) for k in keys)
    return rows


ROOT = SMOLLM2.parent.parent


def run_dmc(*args, timeout: int = 900, env: dict | None = None):
    """``python -m dmc.cli ARGS`` in a fresh process from the repo root (the user's command line)."""
    import os
    import subprocess
    import sys

    full_env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ROOT / ".cache/torch_extensions"), PYTHONPATH=str(ROOT))
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "dmc.cli", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def tiny_train(model_path, out_dir, *extra, config: str = "configs/tiny.yaml"):
    """``dmc train --config configs/tiny.yaml`` in this process, on a tiny model folder."""
    from dmc.train.run import main

    main(["--config", str(ROOT / config), "--model.path", str(model_path), "--run.out_dir", str(out_dir), *extra])


def publish_offline_dataset(tmp_path, monkeypatch, texts, repo_id: str, config_name: str | None = None,
                            shards: int = 4):
    """Publish ``texts`` as ``repo_id`` into a temporary HF cache and point this process's ``datasets`` at it,
    offline (as HF_HOME + HF_HUB_OFFLINE=1 do for a fresh process)."""
    import datasets.config
    import huggingface_hub.constants

    from dmc.train.hub_cache import publish_dataset

    home = tmp_path / "hf_home"
    publish_dataset(texts, repo_id, home, config_name, shards=shards)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return home


def one_line_exit(main, *argv) -> str:
    """Call a command's ``main(argv)``, expect it to exit with a one-line message, and return the message."""
    import pytest

    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    message = str(exc.value.code)
    assert "Traceback" not in message and "\n" not in message.strip(), message
    return message


def check_zero_export(run_dir, tiny, step: int, **dmc_settings) -> None:
    """`dmc export` of a two-process ZeRO run equals Lightning's own ZeRO consolidation loaded by hand (logits to
    atol 0, decision adapters folded); with one rank's optimizer shard gone the export is refused in one line and
    leaves no folder. ``dmc_settings``: the run's DMCConfig fields."""
    import pytest
    import transformers
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    from dmc.export import ExportError
    from dmc.train.export import export

    run_dir = Path(run_dir)
    ckpt = run_dir / f"ckpt/step-{step:07d}.ckpt"
    assert ckpt.is_dir(), sorted(p.name for p in (run_dir / "ckpt").iterdir())
    folder = export(run_dir, run_dir.parent / "hf", dtype="float32")
    convert_zero_checkpoint_to_fp32_state_dict(str(ckpt), str(run_dir.parent / "consolidated.pt"))
    state = torch.load(run_dir.parent / "consolidated.pt", map_location="cpu", weights_only=False)["state_dict"]
    expected = dmc.retrofit(transformers.AutoModelForCausalLM.from_pretrained(tiny), dmc.DMCConfig(**dmc_settings))
    expected.add_decision_adapters()
    missing, unexpected = expected.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    expected.fold_decision_adapters()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[1, 5, 9, 33, 2, 7, 11, 13]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected.eval()(ids).logits, rtol=0, atol=0)
    shards = sorted(ckpt.glob("*/*optim_states.pt"))
    assert len(shards) == 2  # one per rank
    shards[-1].unlink()
    with pytest.raises(ExportError, match="missing or inconsistent"):
        export(run_dir, run_dir.parent / "hf2")
    assert not (run_dir.parent / "hf2").exists()


FRESH = r"""
import sys, json, torch
for name in ("dmc", "train", "data", "eval"):
    sys.modules[name] = None  # `import dmc` now fails: the folder must stand on its own
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(folder)
tok.padding_side = "left"
tok.pad_token = tok.pad_token or tok.eos_token
batch = tok(json.loads(sys.argv[3]), return_tensors="pt", padding=True)
with torch.no_grad():
    logits = model(**batch, use_cache=False).logits
    res = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                         return_dict_in_generate=True)
torch.save({"logits": logits, "gen": res.sequences, "module": type(model).__module__,
            "cache": type(res.past_key_values).__name__}, out)
"""


@torch.no_grad()
def reference_outputs(model, tok, prompts: list[str]):
    """(logits, greedy generations of 12 tokens) of ``model`` on ``prompts``, left-padded, as FRESH computes them."""
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    batch = tok(prompts, return_tensors="pt", padding=True)
    logits = model(**batch, use_cache=False).logits
    gen = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    return logits, gen


def check_fresh_process_equals(folder, expected, tmp_path, prompts: list[str], cache: str) -> None:
    """``folder`` loaded in a fresh process where `import dmc` fails gives ``expected``'s logits and greedy
    generations exactly, through the folder's own code and its cache class ``cache``."""
    import json
    import os
    import subprocess
    import sys

    from transformers import AutoTokenizer

    logits, gen = reference_outputs(expected, AutoTokenizer.from_pretrained(folder), prompts)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", FRESH, str(folder), str(tmp_path / "out.pt"), json.dumps(prompts)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    fresh = torch.load(tmp_path / "out.pt")
    assert fresh["module"].startswith("transformers_modules"), fresh["module"]  # the folder's own code ran
    assert fresh["cache"] == cache
    torch.testing.assert_close(fresh["logits"], logits, rtol=0, atol=0)
    assert torch.equal(fresh["gen"], gen)


def random_paged_pool(B, H_kv, D, bs, lens, seed=0):
    """A pool with shuffled block order and garbage in dead slots, plus its block table."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens).view(B, H_kv)
    n_blocks = -(-lens // bs)
    total = int(n_blocks.sum()) + 3
    k_pool = torch.randn(total, bs, D, generator=g)
    v_pool = torch.randn(total, bs, D, generator=g)
    order = torch.randperm(total, generator=g)
    table = torch.full((B, H_kv, int(n_blocks.max())), -1, dtype=torch.long)
    used = 0
    for b in range(B):
        for h in range(H_kv):
            n = int(n_blocks[b, h])
            table[b, h, :n] = order[used:used + n]
            used += n
    return k_pool, v_pool, table, lens


CODED_SHAPES = [  # (B, H, H_kv, D, block size, group, slots per pair)
    (2, 9, 3, 64, 16, 32, [1, 17, 40, 16, 0, 33]),  # SmolLM2 heads, ragged, an empty pair, block edges
    (1, 4, 4, 40, 5, 8, [7, 1, 12, 5]),  # MHA, head dim not a power of two, odd block size
    (3, 6, 2, 24, 3, 8, [2, 9, 0, 1, 10, 4]),
]


def coded_attention_cases(bits, B, H, H_kv, D, bs, group, lens):
    """Decode attention over a coded pool, without and with DMC's exact open slots (some pairs have none): for
    each, (q, k, v, table, lens, open slot args, the reference's output at scale 0.3); garbage codes in dead
    slots, channels of very different magnitude (as keys have), large scores."""
    from dmc.ops.kv_quant import CodedPool, quantize
    from dmc.ops.quant_attention import decode_attention_quant_reference

    k_pool, v_pool, table, lens = random_paged_pool(B, H_kv, D, bs, lens)
    scale_by = torch.linspace(0.1, 4, D)
    k, v = (CodedPool(*quantize(x * scale_by, bits, group), bits) for x in (k_pool, v_pool))
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, D, generator=g)
    open_k, open_v = torch.randn(2, B, H_kv, D, generator=g)
    open_live = torch.rand(B, H_kv, generator=g) < 0.7
    cases = []
    for extra in ((), (open_k, open_v, open_live)):
        # the reference writes each open slot after its pair's coded slots: give it a table with room for it
        wide = torch.cat([table, torch.full((B, H_kv, 1), -1, dtype=table.dtype)], -1)
        if extra:
            spare = k.codes.shape[0]  # a fresh block per pair whose open slot starts a block
            for b in range(B):
                for h in range(H_kv):
                    if open_live[b, h] and lens[b, h] % bs == 0:
                        wide[b, h, lens[b, h] // bs] = spare
                        spare += 1
            grow = spare - k.codes.shape[0]
            k_ref, v_ref = (CodedPool(*(torch.cat([t, t[:grow]]) for t in pool[:3]), bits) for pool in (k, v))
        else:
            k_ref, v_ref = k, v
        want = decode_attention_quant_reference(q, k_ref, v_ref, wide, lens, *extra, scale=0.3)
        cases.append((q, k, v, table, lens, extra, want))
    return cases
