"""The LightningModule: LM loss + one-sided CR loss (+ distillation), the three stages by step, AdamW, LR schedule.

With ``model.method: dms`` the same loss trains delayed eviction: no stage 1 with the adapter gates (they start
evicting nothing), DMC's stage 1 and handover with the paper's channel gate (``model.dms.gate: channel``), the CR
loss on the fraction of each block evicted by its last token. With ``model.trainable: gates`` (DMC's or DMS's adapter
gates) the base is frozen and the teacher is the base itself (the method switched off).

With ``model.method: gqa`` the same module up-trains the GQA baseline: KV heads mean-pooled at load, no CR loss,
the same optimiser, LR schedule and number of steps (so the same token budget) as a DMC run. With
``model.method: control`` it trains the vanilla model the same way: the LM-only control."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict
from types import SimpleNamespace

import lightning as L
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import dmc
from dmc.metrics import LLAMA_TYPES

from .handover import hand_over
from .recipe import Recipe


def stage_of(step: int, recipe: Recipe) -> int:
    s = recipe.schedule
    return 1 if step < s.stage1_steps else (2 if step < s.stage1_steps + s.ramp_steps else 3)


def in_transfer(step: int, recipe: Recipe) -> bool:
    """Whether ``step`` trains layer by layer (attention transfer, train/transfer.py) rather than end to end."""
    s = recipe.schedule
    return s.stage1_steps <= step < s.stage1_steps + s.transfer_steps


def target_cr_at(step: int, recipe: Recipe) -> float:
    s = recipe.schedule
    return dmc.cr_schedule(step, s.target_cr, s.ramp_steps, start_step=s.stage1_steps)


def noise_seed(recipe: Recipe, step: int, rank: int, world: int, micro: int) -> int:
    """A distinct seed for every (step, rank, micro-batch) of a run."""
    accumulate = recipe.optim.accumulate_grad_batches
    return recipe.run.seed * 1_000_003 + (step * world + rank) * accumulate + micro


def lr_factor(step: int, recipe: Recipe) -> float:
    """Constant in stages 1-2; cosine from lr to min_lr over stage 3 (the reference's schedule)."""
    o, s = recipe.optim, recipe.schedule
    start = s.stage1_steps + s.ramp_steps
    if o.lr_schedule == "constant" or step < start or s.finetune_steps == 0:
        return 1.0
    progress = min(1.0, (step - start) / s.finetune_steps)
    floor = o.min_lr / o.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def load_for_training(recipe: Recipe, zero3: bool = False):
    m = recipe.model
    config = AutoConfig.from_pretrained(m.path)
    if m.method == "gqa":
        return load_gqa_for_training(recipe, config, zero3)
    if m.method == "control":
        return load_control_for_training(recipe, config)
    if m.method == "dms":
        return load_dms_for_training(recipe, config)
    if config.model_type not in LLAMA_TYPES:
        raise ValueError(f"model.path={m.path!r} is a {config.model_type!r} model; DMC retrofits Llama-architecture "
                         "checkpoints (model_type 'llama'), e.g. checkpoints/smollm2-135m")
    if config.model_type == "llama":
        # Load the Llama weights straight into the DMC classes (same parameter names): transformers'
        # loader then also handles DeepSpeed ZeRO-3, where parameters are partitioned as they are created.
        from dmc.retrofitting import dmc_config_from

        config = dmc_config_from(config, m.dmc_config(recipe.schedule.target_cr))
        model = dmc.DMCLlamaForCausalLM.from_pretrained(m.path, config=config, dtype=getattr(torch, m.dtype))
    else:
        model = AutoModelForCausalLM.from_pretrained(m.path, dtype=getattr(torch, m.dtype))
    restrict_trainable(model, m.trainable)
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def restrict_trainable(model, trainable: str) -> None:
    """Freeze what ``model.trainable`` leaves out: gates (the adapter gates alone), attention (every attention
    projection and the gates) or all (nothing frozen). Frozen parameters never reach the optimiser."""
    if trainable == "all":
        return
    keep = list(model.gate_parameters()) if trainable == "gates" or _has_adapter_gate(model) else []
    if trainable == "attention":
        keep += [p for layer in model.model.layers for p in layer.self_attn.parameters()]
    model.requires_grad_(False)
    for p in keep:
        p.requires_grad_(True)


def _has_adapter_gate(model) -> bool:
    config = model.config
    return getattr(config, "dmc_gate", None) == "adapter" or getattr(config, "dms_gate", None) == "adapter"


def load_dms_for_training(recipe: Recipe, config):
    """A Llama with fresh DMS gates (they evict nothing), or a dms_llama folder to continue; with
    ``model.trainable: gates`` every other weight is frozen."""
    m = recipe.model
    if config.model_type == "llama":  # the Llama weights load straight into the DMS classes; the gates are new
        from dmc.retrofitting import dmc_config_from

        config = dmc_config_from(config, m.dms_config(recipe.schedule.target_cr))
        model = dmc.DMSLlamaForCausalLM.from_pretrained(m.path, config=config, dtype=getattr(torch, m.dtype))
    elif config.model_type == "dms_llama":
        model = AutoModelForCausalLM.from_pretrained(m.path, dtype=getattr(torch, m.dtype))
    else:
        raise ValueError(f"model.method=dms retrofits a vanilla Llama (or continues a dms_llama folder); "
                         f"model.path={m.path!r} is a {config.model_type!r} model")
    restrict_trainable(model, m.trainable)
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def load_control_for_training(recipe: Recipe, config):
    """The LM-only control: the vanilla Llama as it is, no DMC layers and no decision channel."""
    m = recipe.model
    if config.model_type != "llama":
        raise ValueError(f"model.method=control trains a vanilla Llama; model.path={m.path!r} is a "
                         f"{config.model_type!r} model")
    model = AutoModelForCausalLM.from_pretrained(m.path, dtype=getattr(torch, m.dtype))
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def gqa_kv_heads(recipe: Recipe, config) -> int:
    """The KV heads a GQA run pools to: model.kv_heads, or the source's heads / schedule.target_cr."""
    from dmc.gqa import GQAError, kv_heads_for

    m = recipe.model
    if config.model_type != "llama":
        raise ValueError(f"model.method=gqa pools a vanilla Llama's KV heads; model.path={m.path!r} is a "
                         f"{config.model_type!r} model")
    try:
        return kv_heads_for(config, kv_heads=m.kv_heads, cr=None if m.kv_heads else recipe.schedule.target_cr)
    except GQAError as err:
        raise ValueError(f"model.method=gqa: {err} (model.kv_heads, or schedule.target_cr)") from None


def load_gqa_for_training(recipe: Recipe, config, zero3: bool):
    from dmc.gqa import pool_kv_heads

    m = recipe.model
    target = gqa_kv_heads(recipe, config)
    if zero3 and target != config.num_key_value_heads:
        # ZeRO-3 partitions the weights as they load: pool once, offline, and train from that folder.
        raise ValueError(f"under ZeRO-3 convert the model first: dmc gqa-convert {m.path} --kv-heads {target} "
                         f"--out {m.path}-gqa{target}; then set model.path to that folder")
    model = AutoModelForCausalLM.from_pretrained(m.path, dtype=getattr(torch, m.dtype))
    pool_kv_heads(model, target)
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


class DMCTrainingModule(L.LightningModule):
    def __init__(self, recipe: Recipe):
        super().__init__()
        self.recipe = recipe
        self.save_hyperparameters(recipe.to_dict())  # the loggers record the recipe
        self.model: dmc.DMCLlamaForCausalLM | None = None
        self.last_stats: dict = {}  # DMC: the last batch's merges and tokens (telemetry, checkpoint record)
        self.method = recipe.model.method
        self.teacher = None  # set in on_fit_start, kept out of the module tree (no checkpoint, no optimiser)
        self._micro_step, self._micro = -1, 0

    def configure_model(self) -> None:
        if self.model is None:
            strategy = self.trainer.strategy if self._trainer is not None else None
            if getattr(strategy, "zero_stage_3", False):
                from transformers.integrations import HfDeepSpeedConfig

                self._hf_deepspeed = HfDeepSpeedConfig(strategy.config)  # must stay alive while loading
            self.model = load_for_training(self.recipe, getattr(strategy, "zero_stage_3", False)).train()
            if self.method == "dmc" and self.recipe.optim.decision_lr is not None:
                self.model.add_decision_adapters()

    def __setattr__(self, name, value):
        if name == "teacher":  # a plain attribute: not a submodule, so not saved, not trained, not wrapped
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def on_fit_start(self) -> None:
        blocks = self.recipe.schedule.warm_start_blocks
        if self.method == "dms" and blocks and self.global_step == 0:  # a fresh run (a resumed one has its gates)
            from .warm_start import warm_start

            ids = self.trainer.datamodule.first_training_blocks(blocks)
            losses = warm_start(self.model, ids, self.recipe.schedule.target_cr)
            print(f"dms warm start: gates fitted on {len(ids)} blocks to the frozen model's attention at "
                  f"{self.recipe.schedule.target_cr:g}x (loss {sum(losses) / len(losses):.3f} per layer)", flush=True)
        wanted = self.recipe.distill.enabled or self.recipe.schedule.transfer_steps > 0
        if wanted and self.teacher is None and not self.recipe.base_teaches:
            from .teacher import load_teacher

            self.teacher = load_teacher(self.recipe, self.device)

    def _fades_a_channel(self) -> bool:
        """DMS with the paper's channel gate has DMC's stage 1: the channel fades out before it decides."""
        return self.method == "dms" and self.recipe.model.dms.gate == "channel"

    @contextmanager
    def _frozen(self):
        """The frozen model: the teacher, or the student's own base with the method switched off."""
        if not self.recipe.base_teaches:
            yield self.teacher
            return
        switch = self.model.model.switch  # dmc_enabled or dms_enabled
        setattr(self.model.config, switch, False)
        try:
            yield self.model
        finally:
            setattr(self.model.config, switch, True)

    @torch.no_grad()
    def _teacher_logits(self, ids: torch.Tensor) -> torch.Tensor:
        with self._frozen() as frozen:
            return frozen(input_ids=ids, use_cache=False).logits

    # ---- one step ----------------------------------------------------------------------------------
    def _enter_stage(self, step: int, micro: int) -> None:
        s = self.recipe.schedule
        if step < s.stage1_steps:
            self.model.set_stage1_multiplier(dmc.stage1_multiplier(step, s.stage1_steps))
            return
        self.model.set_stage1_multiplier(None)
        if step == s.stage1_steps and s.stage1_steps > 0 and micro == 0:
            # Once, before stage 2's first forward; a run resumed from the step-`stage1_steps` checkpoint
            # (saved before this point) hands over again.
            strategy = self.trainer.strategy
            hand_over(self.model, self.trainer.optimizers[0], zero3=getattr(strategy, "zero_stage_3", False))

    def _micro_index(self, step: int) -> int:
        """Index of this micro-batch within its optimiser step (0 after a resume: checkpoints end steps)."""
        if self._micro_step != step:
            self._micro_step, self._micro = step, 0
        else:
            self._micro += 1
        return self._micro

    def training_step(self, batch, batch_idx):
        step = self.global_step
        micro = self._micro_index(step)
        # Gumbel noise from a seed of (step, rank, micro-batch): independent across the micro-batches of an
        # accumulated step and across ranks, and drawn again identically by a resumed run. The global RNG
        # (not a generator of our own) so that gradient checkpointing's recompute replays the same noise.
        torch.manual_seed(noise_seed(self.recipe, step, self.global_rank, max(1, self.trainer.world_size), micro))
        if self.trainer.datamodule is not None:
            self.trainer.datamodule.consumed(batch["position"])
        ids = batch["input_ids"]
        if self.method == "dmc" or self._fades_a_channel():
            self._enter_stage(step, micro)
        if self.method == "dmc" and in_transfer(step, self.recipe):
            return self._transfer_step(ids, step)
        out = self.model(input_ids=ids, labels=ids, use_cache=False)
        d = self.recipe.distill
        loss, logs = d.lm_weight * out.loss, {"train/lm_loss": out.loss.detach()}
        if d.enabled:
            kl = dmc.distillation_kl(out.logits, self._teacher_logits(ids), d.direction, d.temperature)
            loss = loss + d.weight * kl
            logs["train/kl_loss"] = kl.detach()
        if self.method == "dmc":
            loss = loss + self._dmc_terms(out, step, logs)
        elif self.method == "dms":
            loss = loss + self._dms_terms(out, step, logs)
        else:
            from dmc.gqa import kv_compression

            logs["train/realised_cr"] = kv_compression(self.model.config)
        logs["train/loss"] = loss.detach()
        self.log_dict(logs, prog_bar=False, on_step=True, sync_dist=False)
        if self.method in ("dmc", "dms"):
            self.log("cr", logs["train/realised_cr"], prog_bar=True, on_step=True)
        self.log("loss", out.loss.detach(), prog_bar=True, on_step=True)
        return loss

    def _transfer_step(self, ids: torch.Tensor, step: int) -> torch.Tensor:
        """Attention transfer: every layer's relative MSE to the frozen model's attention on its own input (mean over
        layers), plus the weighted CR loss on the decisions of all layers."""
        from .transfer import frozen_records, layer_losses

        with self._frozen() as frozen:
            records = frozen_records(frozen, ids)
        stats: dict = {}
        mse = layer_losses(self.model, records, stats)
        out = SimpleNamespace(**self.model.summarise(stats))
        logs = {"train/transfer_mse": mse.mean().detach(), "train/transfer_mse_max": mse.max().detach()}
        loss = mse.mean() + self._dmc_terms(out, step, logs)
        logs["train/loss"] = loss.detach()
        self.log_dict(logs, prog_bar=False, on_step=True, sync_dist=False)
        self.log("cr", logs["train/realised_cr"], prog_bar=True, on_step=True)
        self.log("mse", logs["train/transfer_mse"], prog_bar=True, on_step=True)
        return loss

    def _dmc_terms(self, out, step: int, logs: dict) -> torch.Tensor:
        """The weighted CR loss (zero in stage 1), with DMC's telemetry added to ``logs``."""
        cr_t = target_cr_at(step, self.recipe)
        cr_term = dmc.cr_loss(out.dmc_alpha, cr_t) if stage_of(step, self.recipe) > 1 else out.dmc_alpha.sum() * 0
        self.last_stats = {"merges": out.dmc_merges.float().sum(1).cpu(), "tokens": float(out.dmc_tokens.sum())}
        logs.update({"train/cr_loss": cr_term.detach(), "train/target_cr": cr_t,
                     "train/realised_cr": dmc.cr_from_merges(**self.last_stats)["cr"],
                     "train/stage": float(stage_of(step, self.recipe)), "train/omega": out.dmc_omega.mean()})
        return self.recipe.schedule.cr_loss_weight * cr_term

    def _dms_terms(self, out, step: int, logs: dict) -> torch.Tensor:
        """The weighted CR loss on the fraction evicted by each block's end, with DMS's telemetry added to ``logs``."""
        cr_t = target_cr_at(step, self.recipe)
        cr_term = dmc.cr_loss(out.dms_alpha, cr_t) if stage_of(step, self.recipe) > 1 else out.dms_alpha.sum() * 0
        self.last_stats = {"merges": out.dms_evicted.float().sum(1).cpu(), "tokens": float(out.dms_tokens.sum())}
        logs.update({"train/cr_loss": cr_term.detach(), "train/target_cr": cr_t,
                     "train/realised_cr": dmc.cr_from_merges(**self.last_stats)["cr"],
                     "train/stage": float(stage_of(step, self.recipe))})  # stage 1: the channel gate's fade
        return self.recipe.schedule.cr_loss_weight * cr_term

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # What `dmc export` needs besides the weights: the model config, where the tokenizer lives, the
        # recipe, how far the run got, and the latest realised CR per layer.
        r, step = self.recipe, self.global_step
        world = self.trainer.world_size if self._trainer is not None else 1
        cr_per_layer = dmc.cr_from_merges(**self.last_stats)["per_layer"].tolist() if self.last_stats else None
        checkpoint["dmc"] = {
            "method": r.model.method,
            "config": self.model.config.to_dict(),
            "base_model": r.model.path,
            "recipe": asdict(r),
            "step": step,
            "stage": stage_of(step, r),
            "tokens_seen": step * r.tokens_per_step * world,
            "cr_per_layer": cr_per_layer,
        }

    # ---- optimiser ---------------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.recipe.optim
        adapters = [p for n, p in self.model.named_parameters() if "decision_adapter" in n]
        ids = {id(p) for p in adapters}
        # ZeRO-3 partitions parameters into flat stubs: their real shape is ds_shape.
        ndim = lambda p: len(getattr(p, "ds_shape", p.shape))  # noqa: E731
        trained = [p for p in self.model.parameters() if p.requires_grad and id(p) not in ids]  # DMS gates: a few
        decay = [p for p in trained if ndim(p) >= 2]
        no_decay = [p for p in trained if ndim(p) < 2]
        groups = [{"params": decay, "weight_decay": o.weight_decay, "lr": o.lr},
                  {"params": no_decay, "weight_decay": 0.0, "lr": o.lr}]
        groups = [g for g in groups if g["params"]]  # DeepSpeed drops empty groups, the scheduler must agree
        factors = [lambda step: lr_factor(step, self.recipe)] * len(groups)
        if adapters:
            groups.append({"params": adapters, "weight_decay": 0.0, "lr": o.decision_lr})
            # The adapters learn decisions: they stay at zero through stage 1 and start with stage 2.
            factors.append(lambda step: lr_factor(step, self.recipe) * (step >= self.recipe.schedule.stage1_steps))
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factors)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

