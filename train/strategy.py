"""Strategy choice, including DeepSpeed ZeRO on CPU (gloo) so that CI runs the same engine GPU users do."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .recipes import deepspeed_json

ZERO_STAGE = {"deepspeed_stage_2": 2, "deepspeed_stage_3": 3}


class StrategyError(ValueError):
    """The strategy or its DeepSpeed config cannot run as asked; the message says what to change."""


def deepspeed_config(name: str, path: str | None, grad_clip: float = 1.0) -> dict:
    """The DeepSpeed JSON of a ``deepspeed_stage_N`` strategy (ours, or ``path``), checked against its name, with
    the recipe's gradient clip (Lightning does not clip under DeepSpeed: the engine does, from this JSON)."""
    stage = ZERO_STAGE[name]
    file = Path(path) if path else deepspeed_json(stage)
    if not file.exists():
        raise StrategyError(f"run.deepspeed_config={str(file)!r} does not exist")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise StrategyError(f"run.deepspeed_config={str(file)!r} is not valid JSON ({err})") from None
    zero = config.get("zero_optimization", {})
    if zero.get("stage", stage) != stage:
        raise StrategyError(f"{file} sets ZeRO stage {zero.get('stage')} but run.strategy={name!r}; make them agree")
    for key in ("offload_optimizer", "offload_param"):
        if zero.get(key, {}).get("device", "none") != "none":
            raise StrategyError(f"{file}: zero_optimization.{key} is not supported (the trainer builds torch's "
                                "AdamW, not DeepSpeed's CPU Adam); remove it, or shard further with more GPUs")
    if path and config.get("gradient_clipping", grad_clip) != grad_clip:
        raise StrategyError(f"{file} sets gradient_clipping {config['gradient_clipping']} but optim.grad_clip="
                            f"{grad_clip}; make them agree (the recipe's value is the one the run reports)")
    config["gradient_clipping"] = grad_clip
    return config


def check_devices(run) -> None:
    """Refuse, in one line naming the override, a recipe the machine or the launcher cannot give its devices."""
    local, world = os.environ.get("LOCAL_WORLD_SIZE"), os.environ.get("WORLD_SIZE")
    if run.accelerator in ("gpu", "cuda"):
        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise StrategyError("run.accelerator=gpu but this machine has no CUDA GPU: rehearse the recipe here with "
                                "`dmc rehearse --config CONFIG`, or train on the CPU with --run.accelerator cpu "
                                "--run.precision 32-true")
        if run.devices > gpus:
            raise StrategyError(f"run.devices={run.devices} but this machine has {gpus} GPU(s): pass --run.devices "
                                f"{gpus} (and raise optim.accumulate_grad_batches to keep the global batch)")
    if local is not None and int(local) != run.devices:
        raise StrategyError(f"torchrun started {local} process(es) per node but run.devices={run.devices}: pass "
                            f"--run.devices {local}, or torchrun --nproc_per_node {run.devices}")
    if world is not None and local is not None and int(world) != run.devices * run.num_nodes:
        raise StrategyError(f"torchrun started {world} processes in all but run.devices x run.num_nodes = "
                            f"{run.devices} x {run.num_nodes}: pass --run.num_nodes {int(world) // int(local)}")


def runs_on_cpu(accelerator: str) -> bool:
    """Whether a run with this ``run.accelerator`` trains on the CPU (``auto``: where no CUDA GPU is present)."""
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


def check_kernels(model, run) -> None:
    """Refuse, in one line naming the fallback, a CUDA-only kernel in a recipe that will run on the CPU."""
    if model.method == "dmc" and model.dmc.train_attention == "triton" and runs_on_cpu(run.accelerator):
        raise StrategyError("model.dmc.train_attention=triton is a CUDA kernel and this run is on the CPU: use "
                            "--model.dmc.train_attention auto (the fused SDPA form)")


def build_strategy(name: str, accelerator: str, config_path: str | None, grad_clip: float = 1.0):
    if name not in ZERO_STAGE:
        return name  # auto, ddp: Lightning's own (Recipe.validate refuses anything else)
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    config = deepspeed_config(name, config_path, grad_clip)
    if not runs_on_cpu(accelerator):
        return DeepSpeedStrategy(config=config)

    class CPUDeepSpeedStrategy(DeepSpeedStrategy):
        """Lightning refuses DeepSpeed without CUDA; DeepSpeed itself runs on CPU with gloo."""

        def setup_environment(self) -> None:
            DDPStrategy.setup_environment(self)  # skip DeepSpeedStrategy's CUDA-only check

        @property
        def root_device(self) -> torch.device:  # DeepSpeed wants a device index (its "device_rank")
            return torch.device("cpu", self.local_rank)

        def setup_distributed(self) -> None:  # CPU devices have no index to validate against local ranks
            from lightning.fabric.utilities.seed import reset_seed

            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()

    return CPUDeepSpeedStrategy(config=config, process_group_backend="gloo")
