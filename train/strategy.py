"""Strategy choice, including DeepSpeed ZeRO on CPU (gloo) so that CI runs the same engine GPU users do."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "deepspeed"


def build_strategy(name: str, accelerator: str, deepspeed_config: str | None):
    if not name.startswith("deepspeed"):
        return name
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    stage = 3 if name.endswith("3") else 2
    config = json.loads(Path(deepspeed_config or CONFIG_DIR / f"zero{stage}.json").read_text())
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if not on_cpu:
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
