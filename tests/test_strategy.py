"""The DeepSpeed JSON a run gets: optim.grad_clip reaches it (Lightning's own clipping is off under DeepSpeed)."""

import json

import pytest

pytest.importorskip("lightning")

from dmc.train.strategy import StrategyError, deepspeed_config  # noqa: E402


@pytest.mark.parametrize("name", ["deepspeed_stage_2", "deepspeed_stage_3"])
def test_the_recipe_grad_clip_reaches_deepspeed(name):
    assert deepspeed_config(name, None, grad_clip=0.25)["gradient_clipping"] == 0.25
    assert deepspeed_config(name, None, grad_clip=0.0)["gradient_clipping"] == 0.0  # 0: no clipping, as in Lightning


def test_a_deepspeed_json_clipping_otherwise_than_the_recipe_is_one_line(tmp_path):
    own = tmp_path / "zero2.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 2.0}))
    assert deepspeed_config("deepspeed_stage_2", str(own), grad_clip=2.0)["gradient_clipping"] == 2.0
    with pytest.raises(StrategyError, match="gradient_clipping 2.0 but optim.grad_clip=1.0"):
        deepspeed_config("deepspeed_stage_2", str(own), grad_clip=1.0)
