"""DMC's adapter gate (``dmc_gate="adapter"``): the defining invariants on tiny random Llamas, what each trainable set
trains, attention transfer's per-layer loss, and the user's commands (`dmc train` with the gate, the base frozen and
a transfer stage; `dmc export` to a folder that loads without the package)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dmc
from tests.helpers import (
    SMOLLM2,
    check_fresh_process_equals,
    logged,
    mixed_dmc,
    one_line_exit,
    random_ids,
    tiny_llama,
    write_tiny_checkpoint,
)

KINDS = ["mha", "gqa"]


# ---- the model ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_gate_at_initialisation_equals_vanilla(kind):
    """Zero gates: logit -5 everywhere, nothing merges, and q and k keep every channel: the vanilla model in the eval
    forward, the training forward (noise off: a Gumbel draw above 5 would merge) and token by token on the cache."""
    vanilla = tiny_llama(kind, dtype=torch.float64)
    model = dmc.retrofit(tiny_llama(kind, dtype=torch.float64), dmc.DMCConfig(gate="adapter"))
    ids = random_ids(2, 23)
    want = vanilla(ids).logits
    out = model(ids, use_cache=False)
    assert int(out.dmc_merges.sum()) == 0
    torch.testing.assert_close(out.logits, want, rtol=1e-12, atol=1e-12)
    model.train().set_gumbel_noise(False)
    torch.testing.assert_close(model(ids, use_cache=False).logits, want, rtol=1e-12, atol=1e-12)
    model.eval()
    cache = dmc.DMCCache(model.config)
    with torch.no_grad():
        steps = [model(ids[:, :7], past_key_values=cache).logits]
        steps += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(7, 23)]
    torch.testing.assert_close(torch.cat(steps, 1), want, rtol=1e-10, atol=1e-10)
    assert all(bool((cache.num_slots(i) == 23).all()) for i in range(len(cache.layers)))
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False),
                       vanilla.generate(ids, max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("window", [None, 3])
def test_training_eval_and_cached_decoding_agree_and_the_cache_holds_the_decided_slots(kind, window):
    """Mixed random gates: the training forward (noise off, tau -> 0), the eval forward and prefill + token-by-token
    decoding give the same logits, and every (layer, sequence, head) holds tokens - merges slots."""
    model = mixed_dmc(kind, window, gate="adapter")
    ids = random_ids(2, 27, seed=3)
    with torch.no_grad():
        full = model.eval()(ids, use_cache=False)
        cache = dmc.DMCCache(model.config, block_size=4)
        outs = [model(ids[:, :9], past_key_values=cache)]
        outs += [model(ids[:, t : t + 1], past_key_values=cache) for t in range(9, ids.shape[1])]
        model.train().set_gumbel_noise(False)
        model.config.dmc_tau = 1e-6
        trained = model(ids, use_cache=False)
    frac = full.dmc_merges.sum() / (full.dmc_merges.numel() * ids.shape[1])
    assert 0.2 < frac < 0.8, "decisions should be mixed"
    torch.testing.assert_close(torch.cat([o.logits for o in outs], 1), full.logits, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(trained.logits, full.logits, rtol=1e-9, atol=1e-9)
    assert torch.equal(trained.dmc_merges, full.dmc_merges)
    for layer in range(model.config.num_hidden_layers):
        assert torch.equal(cache.num_slots(layer), full.dmc_tokens[:, None] - full.dmc_merges[layer])


def test_gate_reads_its_own_rows_and_leaves_q_and_k_whole():
    """The decision is the gate's first H_kv rows times the attention input (scale, offset), the weight its last
    H_kv rows; q and k are not touched (a merge-free model with random gate weights but a large offset is vanilla)."""
    model = mixed_dmc("gqa", 12, gate="adapter").eval()
    attn, cfg = model.model.layers[0].self_attn, model.config
    x = torch.randn(2, 5, cfg.hidden_size, dtype=torch.float64)
    logit, omega = attn.dmc_gate(x, cfg)
    w = attn.dmc_gate.proj.weight
    H_kv = cfg.num_key_value_heads
    torch.testing.assert_close(logit, (x @ w[:H_kv].T * cfg.dmc_gate_scale).transpose(1, 2) - cfg.dmc_logit_offset)
    want = torch.sigmoid((x @ w[H_kv:].T * cfg.dmc_gate_scale).transpose(1, 2) + cfg.dmc_weight_offset)
    torch.testing.assert_close(omega, want + cfg.dmc_weight_eps)
    model.config.dmc_logit_offset = 1e9  # nothing merges, whatever the gate says
    ids = random_ids(2, 13)
    torch.testing.assert_close(model(ids, use_cache=False).logits, tiny_llama("gqa", torch.float64)(ids).logits,
                               rtol=1e-10, atol=1e-10)


def test_channel_only_operations_refuse_the_adapter_gate():
    model = dmc.retrofit(tiny_llama("gqa"), dmc.DMCConfig(gate="adapter"))
    assert model.decision_rows() == []
    with pytest.raises(ValueError, match="dmc_gate='channel'"):
        model.set_stage1_multiplier(0.5)
    with pytest.raises(ValueError, match="gate_parameters"):
        model.add_decision_adapters()
    with pytest.raises(ValueError, match="no parameters of its own"):
        dmc.retrofit(tiny_llama("gqa"), dmc.DMCConfig()).gate_parameters()
    with pytest.raises(dmc.DMCConfigError, match="dmc_gate='door' is invalid"):
        dmc.DMCConfig(gate="door")


def test_channel_gate_config_serialises_as_before():
    """A channel-gate model's config has no gate fields (the fingerprints of committed evaluations hold); an adapter
    model's has both, and a folder without them loads as the channel gate."""
    channel = dmc.DMCLlamaConfig(num_attention_heads=4, num_key_value_heads=4, hidden_size=64)
    assert "dmc_gate" not in channel.to_dict() and "dmc_gate_scale" not in channel.to_dict()
    adapter = dmc.DMCLlamaConfig(num_attention_heads=4, num_key_value_heads=4, hidden_size=64, dmc_gate="adapter")
    assert adapter.to_dict()["dmc_gate"] == "adapter" and adapter.to_dict()["dmc_gate_scale"] == 100.0
    assert dmc.DMCLlamaConfig(**channel.to_dict()).dmc_gate == "channel"


# ---- attention transfer's loss -------------------------------------------------------------------------------------
def test_transfer_loss_is_zero_without_merges_and_a_relative_mse_otherwise():
    from dmc.train.transfer import frozen_records, layer_losses, relative_mse

    vanilla = tiny_llama("gqa", torch.float64)
    model = dmc.retrofit(tiny_llama("gqa", torch.float64), dmc.DMCConfig(gate="adapter")).train()
    model.set_gumbel_noise(False)
    ids = random_ids(2, 17)
    records = frozen_records(vanilla, ids)
    assert sorted(records) == [0, 1]
    stats: dict = {}
    losses = layer_losses(model, records, stats)
    assert losses.shape == (2,) and float(losses.detach().abs().max()) < 1e-25  # no merge: each layer is the frozen one
    assert sorted(stats) == [0, 1] and int(model.summarise(stats)["dmc_merges"].sum()) == 0
    # the hand computation on a fixed input
    out = torch.tensor([[[1.0, 2.0], [0.0, -1.0]]])
    target = torch.tensor([[[1.0, 0.0], [2.0, -1.0]]])
    assert float(relative_mse(out, target)) == pytest.approx(((0 + 4 + 4 + 0) / 4) / ((1 + 0 + 4 + 1) / 4))
    # with merges, each layer's loss is that of its own output on the recorded input
    mixed = mixed_dmc("gqa", 12, gate="adapter").train()
    mixed.set_gumbel_noise(False)
    losses = layer_losses(mixed, records, {})
    for i, layer in enumerate(mixed.model.layers):
        io = records[i]
        alone, _ = layer.self_attn(hidden_states=io.hidden, position_embeddings=io.rope)
        torch.testing.assert_close(losses[i], ((alone - io.output) ** 2).mean() / (io.output ** 2).mean())
    assert float(losses.min()) > 1e-6


def test_transfer_records_are_the_frozen_models_own_attention():
    """The recorded input of layer l is what that attention saw in the frozen model's forward (its output added to
    the residual gives the next layer's input), so no layer's error reaches another."""
    from dmc.train.transfer import frozen_records

    vanilla = tiny_llama("gqa", torch.float64)
    ids = random_ids(1, 9)
    records = frozen_records(vanilla, ids)
    hidden = vanilla(ids, output_hidden_states=True).hidden_states
    layer0 = vanilla.model.layers[0]
    torch.testing.assert_close(records[0].hidden, layer0.input_layernorm(hidden[0]))
    after_attn = hidden[0] + records[0].output
    torch.testing.assert_close(hidden[1], after_attn + layer0.mlp(layer0.post_attention_layernorm(after_attn)))


# ---- training: what each trainable set trains, transfer, export -----------------------------------------------------
pytestmark_pipeline = pytest.mark.skipif(not (SMOLLM2 / "config.json").exists(), reason="run `make model` first")
ROOT = Path(__file__).resolve().parent.parent
GATED = ["--config", str(ROOT / "configs/tiny.yaml"), "--model.dmc.gate", "adapter", "--model.dmc.logit_offset", "0.5",
         "--schedule.stage1_steps", "0", "--optim.decision_lr", "null", "--distill.weight", "1",
         "--distill.lm_weight", "0", "--optim.weight_decay", "0"]


def _train(root: Path, name: str, *extra: str) -> Path:
    pytest.importorskip("lightning")
    from dmc.train.run import main

    tiny = root / "llama"
    if not tiny.exists():
        write_tiny_checkpoint(tiny)
    main([*GATED, "--model.path", str(tiny), "--run.out_dir", str(root / name), *extra])
    return root / name


def _last_checkpoint(run: Path) -> dict:
    return torch.load(sorted((run / "ckpt").glob("step-*.ckpt"))[-1], map_location="cpu", weights_only=False)


def _changed(run: Path, root: Path) -> set[str]:
    """Names of the checkpoint's parameters that differ from the source Llama (new ones count as changed)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(root / "llama").state_dict()
    state = {k.removeprefix("model."): v for k, v in _last_checkpoint(run)["state_dict"].items()}
    return {k for k, v in state.items() if k not in base or not torch.equal(v, base[k])}


@pytest.fixture(scope="module")
def gated_root(tmp_path_factory):
    if not (SMOLLM2 / "config.json").exists():
        pytest.skip("run `make model` first")
    root = tmp_path_factory.mktemp("dmc-gate")
    _train(root, "gates", "--model.trainable", "gates", "--schedule.transfer_steps", "3")
    return root


def test_gates_only_training_changes_the_gates_alone(gated_root):
    """Frozen base: after training only the gates differ from the source, the optimiser holds the gates and
    nothing else, the transfer stage logged its loss and the end-to-end stage its KL."""
    changed = _changed(gated_root / "gates", gated_root)
    assert changed == {f"model.layers.{i}.self_attn.dmc_gate.proj.weight" for i in range(2)}
    ckpt = _last_checkpoint(gated_root / "gates")
    (opt,) = ckpt["optimizer_states"]
    held = [i for g in opt["param_groups"] for i in g["params"]]
    assert len(held) == 2 and sorted(opt["state"]) == sorted(held)
    assert all(tuple(opt["state"][i]["exp_avg"].shape) == (4, 96) for i in held)  # 2 x H_kv rows of the gate
    # Lightning's CSV repeats a key's last value in later rows: the end-to-end steps are those with a KL
    steps = logged(gated_root / "gates", "train/target_cr", "train/transfer_mse")
    end_to_end = logged(gated_root / "gates", "train/kl_loss")
    assert sorted(steps) == list(range(6)) and sorted(end_to_end) == [3, 4, 5]
    assert all(0 < steps[s][1] < 1 for s in range(3))  # the transfer steps logged a relative error
    assert [steps[s][0] for s in range(6)] == pytest.approx([dmc.cr_schedule(s, 2.0, 4) for s in range(6)])


def test_attention_trainable_set_trains_attention_and_gates_only(gated_root):
    _train(gated_root, "attention", "--model.trainable", "attention", "--schedule.finetune_steps", "0")
    changed = _changed(gated_root / "attention", gated_root)
    assert changed and all(".self_attn." in k for k in changed)
    assert {n.split(".self_attn.")[1] for n in changed} == {"q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                            "o_proj.weight", "dmc_gate.proj.weight"}


def test_gated_export_loads_in_a_fresh_process_without_dmc(gated_root, tmp_path):
    from transformers import AutoModelForCausalLM

    from dmc.train.export import export

    folder = export(gated_root / "gates", tmp_path / "hf", dtype="float32")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "dmc_llama" and config["dmc_gate"] == "adapter"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        merges = model(torch.tensor([[5, 9, 33, 2, 7, 11, 13, 17, 19, 23] * 3]), use_cache=False).dmc_merges
    assert int(merges.sum()) > 0  # the exported gates merge
    check_fresh_process_equals(folder, model, tmp_path, ["def f(x):\n    return x * 2\n", "import os\n"], "DMCCache")


# ---- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--model.method", "control", "--model.trainable", "all", "--model.dmc.logit_offset", "5"],
     "model.method=control has none: remove them"),
    (["--model.method", "gqa", "--model.trainable", "all"], "model.method=gqa has none: remove them"),
    (["--model.method", "dms", "--model.trainable", "all"], "model.method=dms has none: use model.dms.gate"),
    (["--model.method", "gqa"], "model.method=gqa trains every weight: remove it"),
    (["--model.dmc.gate", "channel"], "the channel gate has no parameters of its own"),
    (["--model.dmc.gate", "channel", "--schedule.transfer_steps", "2"], "leaves attention transfer nothing to train"),
    (["--schedule.stage1_steps", "2"], "the adapter gate starts merging nothing"),
    (["--optim.decision_lr", "0.05"], "remove it"),
    (["--schedule.transfer_steps", "99"], "more than the 6 steps after stage 1"),
    (["--model.method", "control", "--model.dmc.gate", "channel", "--model.dmc.logit_offset", "5",
      "--schedule.transfer_steps", "2", "--model.trainable", "all"], "model.method=control has none: remove it"),
])
def test_bad_gate_and_transfer_settings_are_one_line(tmp_path, extra, message):
    pytest.importorskip("lightning")
    from dmc.train.run import main

    got = one_line_exit(main, *GATED, "--model.trainable", "gates", "--model.path", str(tmp_path / "none"),
                        "--run.out_dir", str(tmp_path / "run"), *extra)
    assert message in got
    assert not (tmp_path / "run").exists()


def test_a_dmc_folder_continues_with_its_own_gate(gated_root, tmp_path):
    pytest.importorskip("lightning")
    from dmc.train.export import export
    from dmc.train.run import main

    folder = export(gated_root / "gates", tmp_path / "hf", dtype="float32")
    got = one_line_exit(main, "--config", str(ROOT / "configs/tiny.yaml"), "--model.path", str(folder),
                        "--run.out_dir", str(tmp_path / "run"))
    assert "with the adapter gate; continue it with model.dmc.gate: adapter" in got
    assert not (tmp_path / "run").exists()
