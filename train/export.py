"""``dmc export``: a training checkpoint (Lightning file or DeepSpeed ZeRO-2/3 folder) -> a HF folder
(a self-contained DMC folder, or a plain Llama folder for a GQA baseline run)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dmc.export import ExportError, save_folder
from dmc.hub import ModelSourceError, check_tokenizer

MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO-2, ZeRO-3


def resolve(path: str | Path) -> Path:
    """A run folder means its ``ckpt/latest``; a checkpoint file or DeepSpeed folder is taken as is."""
    p = Path(path)
    if not p.exists():
        raise ExportError(f"{p} does not exist; pass a run folder, RUN/ckpt/step-N.ckpt, or a DeepSpeed checkpoint folder")
    if (p / "ckpt" / "latest").exists():
        from .callbacks import AtomicCheckpoint

        latest = AtomicCheckpoint.latest(str(p))
        if latest is None:
            raise ExportError(f"{p}/ckpt/latest names a checkpoint that is gone; pass RUN/ckpt/step-N.ckpt")
        return Path(latest)
    return p


def _deepspeed_tag_dir(p: Path) -> Path:
    tag = (p / "latest").read_text().strip() if (p / "latest").exists() else "checkpoint"
    return p / tag


def _consolidate_zero(p: Path) -> dict[str, torch.Tensor]:
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as err:
        raise ExportError("a DeepSpeed checkpoint needs deepspeed to consolidate: pip install 'dmc[train]'") from err
    tag = _deepspeed_tag_dir(p).name
    try:
        return get_fp32_state_dict_from_zero_checkpoint(str(p), tag=tag)
    except (FileNotFoundError, ValueError, KeyError, AssertionError, RuntimeError) as err:
        raise ExportError(f"{p}: the DeepSpeed shards are missing or inconsistent ({err}); "
                          "export a complete checkpoint (every rank's files of one step)") from err


def load_checkpoint(path: str | Path, trust: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(HF-named fp32 state dict, the ``dmc`` info the training module saved) of a training checkpoint.
    ``trust``: load pickled objects beyond the allow-list of ``safe_load`` (they can run code)."""
    from . import safe_load

    p = resolve(path)
    if p.is_dir():
        found = [_deepspeed_tag_dir(p) / name for name in MODEL_STATES if (_deepspeed_tag_dir(p) / name).exists()]
        if not found:
            raise ExportError(f"{p} is a folder but not a DeepSpeed checkpoint (no */{MODEL_STATES[0]}); "
                              "pass RUN/ckpt/step-N.ckpt or a run folder")
        try:
            safe_load.check(p, trust)  # DeepSpeed's consolidation unpickles every shard itself
            client = safe_load.load(found[0], trust)
        except safe_load.UntrustedCheckpoint as err:
            raise ExportError(str(err)) from None
        state = _consolidate_zero(p)
    else:
        try:
            client = safe_load.load(p, trust)
        except safe_load.UntrustedCheckpoint as err:
            raise ExportError(str(err)) from None
        except Exception as err:  # truncated file, not a torch file: all land here
            raise ExportError(f"{p} is not a readable checkpoint ({type(err).__name__}: {err})") from err
        if not isinstance(client, dict) or "state_dict" not in client:
            raise ExportError(f"{p} is not a Lightning training checkpoint (no state_dict); pass one written by dmc train")
        state = client["state_dict"]
    info = client.get("dmc")
    if not info or "config" not in info:
        raise ExportError(f"{p} is not a DMC training checkpoint (no 'dmc' record); it must come from `dmc train`")
    return {_hf_name(k): v for k, v in state.items()}, info


def _hf_name(key: str) -> str:
    # Lightning: "model." (the module's attribute); DeepSpeed adds "_forward_module." in front of it.
    for prefix in ("_forward_module.", "module."):
        key = key.removeprefix(prefix)
    return key.removeprefix("model.") if key.startswith("model.model.") or key.startswith("model.lm_head") else key


def recorded_config(info: dict, cls):
    """The model config a training checkpoint recorded (``info["config"]``), as a ``cls`` config."""
    return cls(**{k: v for k, v in info["config"].items() if k not in ("model_type", "transformers_version")})


def _assemble(config, state: dict[str, torch.Tensor], **kwargs):
    """``dmc.retrofitting.assemble`` of a checkpoint's state into its recorded config, refused in one line when the
    two do not fit."""
    from dmc.retrofitting import assemble

    model, missing, unexpected = assemble(config, state, **kwargs)
    if missing or unexpected:
        raise ExportError(f"the checkpoint does not match its recorded model config (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); it may be corrupt or from another model")
    return model


def build_vanilla_model(state: dict[str, torch.Tensor], info: dict):
    """A plain ``LlamaForCausalLM`` with the recorded config: the up-trained GQA baseline (pooled heads) or the
    LM-only control."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _assemble(recorded_config(info, LlamaConfig), state, model_cls=LlamaForCausalLM).float().eval()


def build_model(state: dict[str, torch.Tensor], info: dict):
    """A ``DMCLlamaForCausalLM`` from a consolidated state dict, decision adapters folded in."""
    from dmc import DMCLlamaConfig

    config = recorded_config(info, DMCLlamaConfig)
    _refuse_stage1(info)
    model = _assemble(config, state, adapters=any("decision_adapter" in k for k in state))
    model.fold_decision_adapters()
    return model.float().eval()


def _refuse_stage1(info: dict) -> None:
    """A repurposed channel (DMC's, DMS's channel gate) serves attention until its rows are zeroed at the start of
    step ``stage1_steps``: an earlier checkpoint has no decisions to export."""
    stage1 = info.get("recipe", {}).get("schedule", {}).get("stage1_steps", 0)
    if stage1 and info.get("step", 0) <= stage1:
        raise ExportError(f"the checkpoint is from stage 1 (step {info.get('step')} <= {stage1}): the decision "
                          "channel still serves attention; export a checkpoint from stage 2 or 3")


def build_dms_model(state: dict[str, torch.Tensor], info: dict):
    """A ``DMSLlamaForCausalLM`` from a consolidated state dict (base weights and gates)."""
    from dmc import DMSLlamaConfig, DMSLlamaForCausalLM

    _refuse_stage1(info)
    return _assemble(recorded_config(info, DMSLlamaConfig), state, model_cls=DMSLlamaForCausalLM).float().eval()


BUILDERS = {"dmc": build_model, "dms": build_dms_model, "gqa": build_vanilla_model, "control": build_vanilla_model}


def _card(info: dict, checkpoint: Path) -> dict:
    card = {k: info.get(k) for k in ("base_model", "step", "tokens_seen", "cr_per_layer", "recipe")}
    summary = checkpoint.parent.parent / "summary.json"  # RUN/ckpt/step-N.ckpt -> RUN/summary.json
    if summary.exists():
        validation = json.loads(summary.read_text()).get("validation")
        if validation:
            card["eval"] = {f"validation {k}": v for k, v in validation.items() if isinstance(v, (int, float))}
    method = info.get("method", "dmc")
    target = info["config"].get(f"{method}_target_cr", "?")
    card["name"] = f"{method.upper()} {Path(str(info.get('base_model', 'Llama'))).name} ({target}x)"
    return card


def control_card(info: dict) -> str:
    from dmc.export import eval_table, hub_card

    base = info.get("base_model", "unknown")
    lines = [f"# LM-only control of {Path(str(base)).name}", "",
             "The source model after the continued pretraining of a DMC run with DMC disabled (the same data, "
             "steps, optimiser, schedule and distillation): the baseline that tells DMC's cost apart from "
             "fine-tuning on the domain. A plain Llama folder; its KV cache is the source model's.", "",
             "| field | value |", "|---|---|", f"| source model | {base} |", f"| training step | {info.get('step', 0)} |",
             f"| tokens seen | {info.get('tokens_seen') or 0:,} |"]
    return hub_card(lines + eval_table(info), ["llama", "dmc-control"], base)


def _stages(total: int):
    """``stage(what)`` prints ``dmc export [k/total] what`` with the seconds so far, to stderr: at 7B each stage
    takes minutes, and the user sees which one is running."""
    start, done = time.monotonic(), [0]

    def stage(what: str) -> None:
        done[0] += 1
        print(f"dmc export [{done[0]}/{total}] {what} ({time.monotonic() - start:.0f} s so far)", file=sys.stderr,
              flush=True)

    return stage


def export(checkpoint: str | Path, out: str | Path, dtype: str = "bfloat16", overwrite: bool = False,
           tokenizer: str | None = None, trust_checkpoint: bool = False) -> Path:
    path = resolve(checkpoint)
    stage = _stages(3)
    stage(f"reading {path}" + (" (consolidating ZeRO shards)" if path.is_dir() else ""))
    state, info = load_checkpoint(path, trust_checkpoint)
    method = info.get("method", "dmc")
    stage(f"building the {method} model ({sum(t.numel() for t in state.values()) / 1e6:,.0f}M parameters)")
    if method not in BUILDERS:
        raise ExportError(f"the checkpoint's method {method!r} is not one dmc exports ({', '.join(BUILDERS)})")
    model = BUILDERS[method](state, info)
    tok = tokenizer or info.get("base_model")
    if tok is None:
        raise ExportError("the checkpoint does not name its base model; pass --tokenizer PATH_OR_HUB_ID")
    try:
        check_tokenizer(tok, "--tokenizer" if tokenizer else "the base model's tokenizer")
    except ModelSourceError as err:
        raise ExportError(f"{err}{'' if tokenizer else ' (or pass --tokenizer PATH_OR_HUB_ID)'}") from None
    stage(f"writing {out} ({dtype} safetensors, tokenizer, card) under a temporary name")
    if method == "control":
        from dmc.export import write_folder

        card = control_card(_card(info, path))
        return write_folder(model, out, tok, dtype=dtype, overwrite=overwrite,
                            finish=lambda tmp: (tmp / "README.md").write_text(card))
    if method == "gqa":
        from dmc.gqa import save_gqa_folder

        return save_gqa_folder(model, out, tok, dtype=dtype, overwrite=overwrite, card=_card(info, path))
    return save_folder(model, out, tok, dtype=dtype, overwrite=overwrite, card=_card(info, path))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="dmc export", description=__doc__)
    ap.add_argument("checkpoint", help="a run folder (uses ckpt/latest), RUN/ckpt/step-N.ckpt, or a DeepSpeed folder")
    ap.add_argument("--out", required=True, help="the HF folder to write")
    ap.add_argument("--dtype", default="bfloat16", help="weight dtype: bfloat16 (default), float16, float32")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: the base model of the run)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    ap.add_argument("--trust-checkpoint", action="store_true", help="load pickled objects a checkpoint holds beyond "
                    "tensors, plain containers and DeepSpeed's few types (they can run code: only for a trusted source)")
    ap.add_argument("--push-to-hub", metavar="REPO", default=None, help="then upload the folder to this Hub repo "
                    "(ORG/NAME; created if missing; needs `hf auth login` or HF_TOKEN)")
    ap.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    ns = ap.parse_args(argv)
    try:
        out = export(ns.checkpoint, ns.out, ns.dtype, ns.overwrite, ns.tokenizer, ns.trust_checkpoint)
    except ExportError as err:
        sys.exit(f"dmc export: error: {err}")
    print(f"exported {out}")
    if ns.push_to_hub:
        url = push_to_hub(out, ns.push_to_hub, ns.private)
        print(f"pushed {out} to {url}")


def push_to_hub(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload an exported folder as one commit to the Hub model repo ``repo_id`` (created when missing). A
    failure is one line; the exported folder stays, so the push can be retried without exporting again."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                          commit_message=f"dmc export of {folder.name}")
    except Exception as err:  # HTTP, auth, offline, bad repo id: all end the same way for the user
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        sys.exit(f"dmc export: error: pushing to {repo_id!r} failed ({first}); the folder {folder} is complete: "
                 f"retry with `hf upload {repo_id} {folder}` after `hf auth login`")
    return str(url)


if __name__ == "__main__":
    main()
