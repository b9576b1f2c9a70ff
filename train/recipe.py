"""The training recipe: typed sections, loaded from YAML by jsonargparse (unknown keys are refused)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from dmc.config import DMCConfig
from dmc.dms_config import DMSConfig

STRATEGIES = ("auto", "ddp", "deepspeed_stage_2", "deepspeed_stage_3")


@dataclass
class ModelSection:
    """The model to retrofit and how.

    Args:
        path: A HF Llama folder or Hub id (or a dmc_llama folder, to continue a run's export).
        method: dmc (learned merging: the settings under model.dmc); dms (learned delayed eviction: the settings
            under model.dms); gqa (the baseline: KV heads mean-pooled to kv_heads, then the same continued
            pretraining without the CR loss); control (the LM-only control: the vanilla model trained on the same
            data, steps, optimiser, schedule and distillation, so that DMC's cost is told apart from fine-tuning on
            the domain).
        kv_heads: gqa only: KV heads after pooling (default: the source's KV heads / schedule.target_cr).
        dtype: Weights' dtype when loaded (the precision setting still decides the compute dtype).
        gradient_checkpointing: Recompute each layer's activations in the backward pass (memory for time).
        dmc: dmc only: the DMC settings (window, tau, logit_offset, weight_offset, weight_eps, channel,
            train_attention, and the exported model's decode_backend, block_size, kv_bits, kv_group, which training
            does not use); its target_cr comes from schedule.target_cr.
        dms: dms only: the DMS settings (window, tau, gate, gate_scale, gate_offset, train_attention,
            decode_backend, block_size); its target_cr comes from schedule.target_cr.
        trainable: dmc and dms: gates (the adapter gates alone, the base frozen, as DMS's release; the teacher is
            then the base itself, the method switched off), attention (the attention projections q, k, v, o and the
            gates) or all (every weight).
    """

    # Each method's settings are its own config class, nested (dmc/config.py and dmc/dms_config.py hold the
    # fields, defaults and checks once); dmc_config()/dms_config() add the schedule's target CR.
    path: str = "checkpoints/smollm2-135m"
    method: Literal["dmc", "dms", "gqa", "control"] = "dmc"
    kv_heads: int | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False
    dmc: DMCConfig = field(default_factory=DMCConfig)
    dms: DMSConfig = field(default_factory=DMSConfig)
    trainable: Literal["all", "attention", "gates"] = "all"

    def __post_init__(self) -> None:
        # from YAML or the command line a nested section arrives as a mapping; its config class checks it
        for name, cls in (("dmc", DMCConfig), ("dms", DMSConfig)):
            if isinstance(getattr(self, name), dict):
                try:
                    setattr(self, name, cls(**getattr(self, name)))
                except ValueError as err:  # DMCConfigError/DMSConfigError name the field as <method>_<name>
                    raise ValueError(str(err).replace(f"{name}_", f"model.{name}.")) from None
                except TypeError as err:
                    raise ValueError(f"model.{name}: {err}") from None

    def dms_config(self, target_cr: float) -> DMSConfig:
        """The model's DMSConfig at ``target_cr`` (validated by DMSConfig)."""
        return DMSConfig(**{**asdict(self.dms), "target_cr": target_cr, "enabled": True})

    def dmc_config(self, target_cr: float) -> DMCConfig:
        """The model's DMCConfig at ``target_cr`` (validated by DMCConfig)."""
        return DMCConfig(**{**asdict(self.dmc), "target_cr": target_cr, "enabled": True})


@dataclass
class DataSection:
    """The training and validation text.

    Args:
        kind: stdlib (the Python standard library), files (a glob of local text files) or hf (a Hub dataset,
            streamed).
        path: files: the glob; hf: the dataset id or a local dataset folder.
        text_field: hf: the column holding the text.
        name: hf: the dataset's configuration name (e.g. sample-100BT).
        train_split: hf: the split trained on.
        validation_split: holdout (held out of the training documents by a stable hash, never trained on) or
            the name of a real split of an hf dataset.
        block_len: Tokens per training sequence (documents are packed into blocks).
        batch_size: Sequences per micro-batch and process.
        validation_blocks: Held-out blocks scored at each validation (0: no validation).
        validation_fraction: holdout: the share of documents held out.
        piece_chars: stdlib: files are cut into pieces of this many characters, served in a shuffled order.
        shuffle_buffer: hf streams: documents shuffled and tokenised together (0: stream order).
        num_workers: hf streams: DataLoader workers that read and tokenise (default 1).
    """

    kind: Literal["stdlib", "files", "hf"] = "stdlib"
    path: str | None = None
    text_field: str = "text"
    name: str | None = None
    train_split: str = "train"
    validation_split: str = "holdout"
    block_len: int = 256
    batch_size: int = 1
    validation_blocks: int = 16
    validation_fraction: float = 0.05
    piece_chars: int = 4096
    shuffle_buffer: int = 1000
    num_workers: int | None = None


# The schedule's lengths, in steps: what a tokens curve's scale multiplies (Recipe.scaled)
SCHEDULE_LENGTHS = ("stage1_steps", "ramp_steps", "finetune_steps", "transfer_steps")


@dataclass
class ScheduleSection:
    """Stage lengths in optimiser steps: 1 decision neuron zeroed, 2 linear CR ramp 1 -> target_cr, 3 hold.

    Args:
        target_cr: The compression ratio the ramp ends at and the hold keeps (>= 1).
        stage1_steps: Stage 1: the repurposed channel is zeroed out while the model adapts to its loss.
        ramp_steps: Stage 2: the target CR rises linearly from 1 to target_cr.
        finetune_steps: Stage 3: training continues at target_cr.
        cr_loss_weight: Weight of the one-sided loss that pulls the realised CR up to the target.
        warm_start_blocks: dms only: before step 0, fit the gates on this many training blocks to the frozen
            model's own attention at the target CR (forward passes only; 0: start from gates that evict nothing).
        transfer_steps: dmc only: the first this many steps after stage 1 train each layer's attention on its own to
            reproduce the frozen model's attention output from the frozen model's input to it (a relative MSE per
            layer, with the CR loss; train/transfer.py), instead of the end-to-end loss; the CR target follows the
            same ramp. 0: end to end from the start.
    """

    target_cr: float = 2.0
    stage1_steps: int = 250
    ramp_steps: int = 6000
    finetune_steps: int = 2000
    cr_loss_weight: float = 1.0
    warm_start_blocks: int = 0
    transfer_steps: int = 0


@dataclass
class DistillSection:
    """Distillation from a frozen teacher: loss = lm_weight * LM + weight * KL + the CR loss.

    Args:
        weight: Weight of the KL term (0: no distillation).
        teacher: A HF folder or Hub id with the student's tokenizer (default: model.path, the source model);
            run in eval mode without gradients, in the training dtype.
        direction: forward KL(teacher || student) or reverse KL(student || teacher).
        temperature: Softens both distributions; the term is scaled by its square.
        lm_weight: Weight of the next-token LM loss (down to 0: distillation only).
    """

    weight: float = 0.0
    teacher: str | None = None
    direction: Literal["forward", "reverse"] = "forward"
    temperature: float = 1.0
    lm_weight: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.weight > 0


@dataclass
class OptimSection:
    """AdamW (torch's), with its schedule.

    Args:
        lr: Learning rate of every weight (the reference's single LR).
        min_lr: The cosine's floor in the hold stage.
        decision_lr: Learning rate of the decision adapters (null: no adapters, as in the reference).
        betas: Adam's (beta1, beta2).
        weight_decay: Decoupled weight decay.
        grad_clip: Gradient-norm clip (0: none); under DeepSpeed it is written into the engine's JSON.
        lr_schedule: constant, or cosine_in_finetune (constant, then a cosine to min_lr over the hold stage).
        accumulate_grad_batches: Micro-batches per optimiser step.
    """

    lr: float = 3.0e-5
    min_lr: float = 3.0e-6
    decision_lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    lr_schedule: Literal["constant", "cosine_in_finetune"] = "cosine_in_finetune"
    accumulate_grad_batches: int = 1


@dataclass
class RunSection:
    """Where and how the run goes.

    Args:
        out_dir: Run folder: checkpoints, logs, plots, telemetry; a rerun resumes from it.
        seed: Seeds the data order, the Gumbel noise and every other random draw of the run.
        strategy: auto, ddp, deepspeed_stage_2 or deepspeed_stage_3.
        accelerator: auto, cpu or gpu.
        devices: Processes per node.
        num_nodes: Nodes (each starts its own torchrun).
        precision: Lightning precision: 32-true, bf16-mixed, bf16-true, 16-mixed (CUDA only).
        threads: torch threads per process (default: torch's own).
        log_every: Log the loss, CR and telemetry every N optimiser steps.
        checkpoint_every: Write an atomic checkpoint every N optimiser steps (and at the end).
        keep_last: Checkpoints kept in out_dir/ckpt.
        loggers: Any of csv, wandb, tensorboard.
        progress_bar: Show a progress bar (rank 0).
        validate_every: Held-out perplexity and realised CR every N optimiser steps (null: at the end only).
        deepspeed_config: A DeepSpeed JSON to use instead of the packaged one for the strategy's ZeRO stage.
        wandb_project: W&B project (one run per out_dir, resumed with it).
        wandb_entity: W&B entity (default: yours).
    """

    out_dir: str = "checkpoints/run"
    seed: int = 0
    strategy: str = "auto"
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    precision: str = "32-true"
    threads: int | None = None
    log_every: int = 10
    checkpoint_every: int = 100
    keep_last: int = 2
    loggers: list[str] = field(default_factory=lambda: ["csv"])
    progress_bar: bool = True
    validate_every: int | None = None
    deepspeed_config: str | None = None
    wandb_project: str = "dmc"
    wandb_entity: str | None = None


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    distill: DistillSection = field(default_factory=DistillSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict:
        """The recipe as plain YAML/JSON data (sections of scalars and lists; tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    @property
    def base_teaches(self) -> bool:
        """DMC or DMS with the base frozen (``model.trainable: gates``): the teacher is the student's own base with
        the method switched off (exactly the vanilla Llama), so no teacher model is loaded."""
        return self.model.method in ("dmc", "dms") and self.model.trainable == "gates"

    @property
    def total_steps(self) -> int:
        s = self.schedule
        return s.stage1_steps + s.ramp_steps + s.finetune_steps

    @property
    def tokens_per_step(self) -> int:
        """Tokens one training process reads per optimiser step (sequences per step x block length)."""
        return self.data.batch_size * self.optim.accumulate_grad_batches * self.data.block_len

    @property
    def tokens(self) -> int:
        """Tokens one training process reads over the whole schedule."""
        return self.total_steps * self.tokens_per_step

    def scaled(self, scale: int) -> Recipe:
        """This recipe with every stage of its schedule (stage 1, the ramp, the hold, the attention transfer) times
        ``scale``: a point of a tokens curve (eval/curve.py), differing from this recipe in its length only."""
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
            raise ValueError(f"--scale {scale!r}: use a whole number >= 1 (every stage of the schedule times it)")
        s = self.schedule
        return replace(self, schedule=replace(s, **{name: getattr(s, name) * scale for name in SCHEDULE_LENGTHS}))

    def validate(self) -> None:
        m, s, d, o, r, k = self.model, self.schedule, self.data, self.optim, self.run, self.distill
        if m.method == "dms" and s.target_cr >= 1:
            try:
                m.dms_config(s.target_cr)
            except ValueError as err:
                raise ValueError(str(err).replace("dms_", "model.dms.")) from None
        if m.method == "dmc" and s.target_cr >= 1:
            try:
                m.dmc_config(s.target_cr)
            except ValueError as err:  # DMCConfigError names the field as dmc_<name>
                raise ValueError(str(err).replace("dmc_target_cr", "schedule.target_cr").replace("dmc_", "model.dmc.")) \
                    from None
        checks = self._control_checks() + self._transfer_checks() + self._dms_checks() + self._dmc_gate_checks() + [
            (m.dmc.target_cr == DMCConfig.target_cr and m.dms.target_cr == DMSConfig.target_cr
             and m.dmc.enabled and m.dms.enabled,
             "model.dmc/model.dms take their target CR from schedule.target_cr and are enabled by model.method: "
             "remove target_cr and enabled from them"),
            (s.target_cr >= 1, f"schedule.target_cr={s.target_cr} must be >= 1 (e.g. 2, 4, 8)"),
            (min(s.stage1_steps, s.ramp_steps, s.finetune_steps) >= 0, "schedule.*_steps must be >= 0"),
            (self.total_steps > 0, "the schedule has no steps: set schedule.ramp_steps or finetune_steps"),
            (d.block_len >= 2 and d.batch_size >= 1, "data.block_len must be >= 2 and data.batch_size >= 1"),
            (m.kv_heads is None or m.method == "gqa", "model.kv_heads is for model.method: gqa (DMC keeps every head)"),
            (m.kv_heads is None or m.kv_heads >= 1, "model.kv_heads must be >= 1"),
            (m.method == "dmc" or o.decision_lr is None,
             "optim.decision_lr trains DMC's decision adapters; set it to null for model.method: gqa"),
            (m.method == "dmc" or (m.dmc.gate, m.dmc.gate_scale) == (DMCConfig.gate, DMCConfig.gate_scale),
             f"model.dmc.gate and gate_scale choose DMC's decisions; model.method={m.method} has none"
             + (": use model.dms.gate" if m.method == "dms" else ": remove them")),
            (o.lr > 0 and (o.decision_lr is None or o.decision_lr > 0), "optim.lr and optim.decision_lr must be > 0"),
            (r.keep_last >= 1 and r.checkpoint_every >= 1, "run.keep_last and run.checkpoint_every must be >= 1"),
            (set(r.loggers) <= {"csv", "wandb", "tensorboard"}, f"run.loggers={r.loggers}: use csv, wandb, tensorboard"),
            (r.strategy in STRATEGIES, f"run.strategy={r.strategy!r} is not one of {', '.join(STRATEGIES)}"
             + (" (ZeRO offload is not supported: ZeRO-3 shards the 70B recipe over 64 GPUs without it)"
                if "offload" in r.strategy else "")
             + (" (FSDP is not supported: use deepspeed_stage_3 to shard parameters)"
                if "fsdp" in r.strategy else "")),
            (r.validate_every is None or r.validate_every >= 1,
             "run.validate_every must be >= 1 (or null: at the end)"),
            (d.validation_split != d.train_split,
             f"data.validation_split={d.validation_split!r} is the training split: validation would score documents "
             "the model trains on; use holdout (a held-out slice of the training documents) or a real split"),
            (d.kind != "files" or d.validation_split == "holdout",
             "data.kind=files has no splits: set data.validation_split=holdout"),
            (d.shuffle_buffer >= 0 and (d.num_workers is None or d.num_workers >= 0),
             "data.shuffle_buffer and data.num_workers must be >= 0"),
            (d.kind == "hf" or not d.num_workers,
             "data.num_workers is for streamed (kind: hf) data; local sources are packed in the training process"),
            (k.weight >= 0 and k.lm_weight >= 0 and k.weight + k.lm_weight > 0,
             f"distill.weight={k.weight:g} and distill.lm_weight={k.lm_weight:g} must be >= 0 and not both 0"),
            (k.temperature > 0, f"distill.temperature={k.temperature:g} must be > 0"),
            (not k.enabled or r.strategy != "deepspeed_stage_3",
             "distill.weight > 0 under run.strategy=deepspeed_stage_3: the frozen teacher is not partitioned (every "
             "GPU would hold all of it); use deepspeed_stage_2, or set distill.weight 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def _dms_checks(self) -> list[tuple[bool, str]]:
        m = self.model
        if m.method != "dms":
            return [(m.method == "dmc" or m.trainable == "all", f"model.trainable={m.trainable} chooses what a DMC or "
                     f"DMS retrofit trains; model.method={m.method} trains every weight: remove it"),
                    (self.schedule.warm_start_blocks == 0, "schedule.warm_start_blocks fits DMS gates; remove it for "
                     f"model.method: {m.method}")]
        if m.dms.gate == "channel":
            stage1 = [  # whether it needs a stage 1 depends on the source (train/run.py _check_source)
                (m.trainable == "all", "model.dms.gate=channel has no weights of its own (its rows are q_proj's) and "
                 "the model must adapt to losing the channel: set model.trainable: all"),
                (self.schedule.warm_start_blocks == 0, "schedule.warm_start_blocks fits the adapter gates; remove it "
                 "for model.dms.gate: channel"),
            ]
        else:
            stage1 = [(self.schedule.stage1_steps == 0, f"schedule.stage1_steps={self.schedule.stage1_steps}: stage 1 "
                       "fades out a repurposed channel; the adapter gates start evicting nothing, so set "
                       "schedule.stage1_steps: 0 (or model.dms.gate: channel)")]
        return stage1 + [
            (self.optim.decision_lr is None, "optim.decision_lr is DMC's; DMS trains its gates at optim.lr: remove it"),
            (self.schedule.warm_start_blocks >= 0, "schedule.warm_start_blocks must be >= 0"),
            self._frozen_base_teacher_check(),
        ]

    def _transfer_checks(self) -> list[tuple[bool, str]]:
        m, s = self.model, self.schedule
        if not s.transfer_steps:
            return [(s.transfer_steps == 0, f"schedule.transfer_steps={s.transfer_steps} must be >= 0")]
        return [
            (m.method == "dmc", f"schedule.transfer_steps trains DMC attention layer by layer; model.method={m.method} "
             "has none: remove it"),
            (s.transfer_steps <= s.ramp_steps + s.finetune_steps, f"schedule.transfer_steps={s.transfer_steps} is more "
             f"than the {s.ramp_steps + s.finetune_steps} steps after stage 1 (ramp_steps + finetune_steps)"),
            (not (m.trainable == "gates" and m.dmc.gate == "channel"), "schedule.transfer_steps with model.trainable="
             "gates and model.dmc.gate=channel leaves attention transfer nothing to train (the channel gate has no "
             "parameters of its own): use model.dmc.gate: adapter, or model.trainable: attention or all"),
        ]

    def _frozen_base_teacher_check(self) -> tuple[bool, str]:
        m, k = self.model, self.distill
        return (m.trainable != "gates" or k.teacher in (None, m.path),
                f"distill.teacher={k.teacher!r} with model.trainable: gates: the base is frozen, so the teacher is the "
                "base itself (the method switched off); remove distill.teacher, or set model.trainable: all")

    def _dmc_gate_checks(self) -> list[tuple[bool, str]]:
        """What DMC's gate allows: the adapter starts merging nothing (no stage 1, no channel adapters), the channel
        has no parameters of its own to train alone."""
        m, s = self.model, self.schedule
        if m.method != "dmc":
            return []
        if m.dmc.gate == "channel":
            return [(m.trainable != "gates", "model.trainable=gates with model.dmc.gate=channel: the channel gate has no "
                     "parameters of its own (its rows are q_proj's and k_proj's); use model.dmc.gate: adapter, or "
                     "model.trainable: attention or all")]
        return [
            (s.stage1_steps == 0, f"schedule.stage1_steps={s.stage1_steps}: stage 1 fades out a repurposed channel; "
             "the adapter gate starts merging nothing, so set schedule.stage1_steps: 0 (or model.dmc.gate: channel)"),
            (self.optim.decision_lr is None, "optim.decision_lr trains the channel gate's decision adapters; the "
             "adapter gate trains at optim.lr (its gate_scale sets its pace): remove it"),
            self._frozen_base_teacher_check(),
        ]

    def _control_checks(self) -> list[tuple[bool, str]]:
        """model.method=control trains without DMC: options that only DMC (or GQA) reads are refused."""
        if self.model.method != "control":
            return []
        m = self.model
        set_here = [f"model.dmc.{name}" for name in ("window", "tau", "logit_offset", "weight_offset", "train_attention")
                    if getattr(m.dmc, name) != getattr(DMCConfig, name)]
        set_here += ["model.kv_heads"] if m.kv_heads is not None else []
        if self.optim.decision_lr is not None:
            set_here.append("optim.decision_lr")
        if self.schedule.cr_loss_weight != ScheduleSection().cr_loss_weight:
            set_here.append("schedule.cr_loss_weight")
        return [(not set_here, f"model.method=control trains without DMC, so {', '.join(set_here)} would do "
                 "nothing: remove {} from the control recipe".format("it" if len(set_here) == 1 else "them"))]
