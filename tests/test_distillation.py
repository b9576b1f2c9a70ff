"""Distillation from the frozen source model and the LM-only control, through `dmc train` on a tiny model.

The KL term is checked against a hand computation; in a run it is logged, replayed exactly by a resumed run,
unchanged by splitting a batch into accumulated micro-batches (under ZeRO-2 with two processes:
tests/test_stage_handover.py). The control trains the vanilla architecture (no DMC layers, no DMC cache)."""

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

import dmc  # noqa: E402
from dmc.train.run import main  # noqa: E402
from tests.helpers import SMOLLM2, logged, one_line_exit, tiny_train, write_tiny_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DISTILL = ("--distill.weight", "0.5")
CONTROL = ("--model.method", "control", "--optim.decision_lr", "null")
pytestmark = pytest.mark.skipif(not (SMOLLM2 / "config.json").exists(), reason="run `make model` first")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama"))


# ---- the KL term ------------------------------------------------------------------------------------------
def _softmax(xs, t):
    z = [math.exp(x / t) for x in xs]
    return [v / sum(z) for v in z]


def _hand_kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_equals_a_hand_computation(direction, temperature):
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    teacher = [[2.0, 0.0, 0.5], [1.0, 1.0, 1.0]]
    expected = 0.0
    for s, t in zip(student, teacher):
        ps, pt = _softmax(s, temperature), _softmax(t, temperature)
        expected += _hand_kl(pt, ps) if direction == "forward" else _hand_kl(ps, pt)
    expected = expected / 2 * temperature**2
    got = dmc.distillation_kl(torch.tensor([student]), torch.tensor([teacher]), direction, temperature)
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_kl_is_zero_for_identical_logits_and_flows_into_the_student_only():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    assert float(dmc.distillation_kl(logits, logits.clone())) == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(2, 5, 11, generator=g, requires_grad=True)
    teacher = torch.randn(2, 5, 11, generator=g, requires_grad=True)
    dmc.distillation_kl(student, teacher, "reverse", 1.5).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None


# ---- in a run -----------------------------------------------------------------------------------------------
def _kl(out_dir) -> dict[int, tuple[float, ...]]:
    return logged(out_dir, "train/kl_loss", "train/lm_loss", "train/loss")


def test_distilled_dmc_run_logs_kl_and_resumes_with_equal_curves(tiny, tmp_path):
    tiny_train(tiny, tmp_path / "a", *DISTILL)
    tiny_train(tiny, tmp_path / "b", *DISTILL, "--stop_at", "4")
    tiny_train(tiny, tmp_path / "b", *DISTILL)
    a, b = _kl(tmp_path / "a"), _kl(tmp_path / "b")
    assert sorted(a) == list(range(8)) and a == b
    # step 0: the retrofit appends every token (alpha ~ 0), so it is the teacher; then the student moves away
    assert abs(a[0][0]) < 1e-6 and all(a[step][0] > 1e-4 for step in range(1, 8))
    # the logged total is lm + 0.5 kl + cr: at stage 1 (no CR loss) it is exactly the first two
    for step in (0, 1):
        kl, lm, total = a[step]
        assert total == pytest.approx(lm + 0.5 * kl, rel=1e-5)


def test_control_student_starts_equal_to_its_teacher(tiny, tmp_path):
    tiny_train(tiny, tmp_path / "c", *CONTROL, *DISTILL, "--distill.lm_weight", "0")
    rows = _kl(tmp_path / "c")
    assert rows[0][0] == pytest.approx(0.0, abs=1e-6)  # step 0: the student is the teacher
    assert rows[7][0] > 1e-4  # then it moves away (lm_weight 0: the KL alone trains it, from a nonzero lr)
    assert all(total == pytest.approx(0.5 * kl, rel=1e-5, abs=1e-9) for kl, _, total in rows.values())


def _final_state(run_dir) -> dict[str, torch.Tensor]:
    from dmc.train.export import load_checkpoint

    return load_checkpoint(run_dir)[0]


def test_accumulated_micro_batches_equal_one_batch(tiny, tmp_path):
    # The control has no Gumbel noise: one batch of 2 and two accumulated micro-batches of 1 see the same two
    # blocks and, with the KL a mean over positions like the LM loss, give the same update.
    tiny_train(tiny, tmp_path / "whole", *CONTROL, *DISTILL, "--data.batch_size", "2")
    tiny_train(tiny, tmp_path / "split", *CONTROL, *DISTILL, "--data.batch_size", "1",
               "--optim.accumulate_grad_batches", "2")
    whole, split = _final_state(tmp_path / "whole"), _final_state(tmp_path / "split")
    assert whole.keys() == split.keys()
    start = _final_state_of_source(tiny)
    moved = max(float((whole[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-3
    for key in whole:
        torch.testing.assert_close(whole[key], split[key], atol=1e-5, rtol=1e-4)


def _final_state_of_source(tiny) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {k: v for k, v in AutoModelForCausalLM.from_pretrained(tiny).state_dict().items()}


# ---- the control ------------------------------------------------------------------------------------------
def test_control_trains_and_exports_the_vanilla_architecture(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from dmc.train.export import main as export_main
    from dmc.train.module import load_control_for_training
    from dmc.train.recipe import Recipe

    recipe = Recipe()
    recipe.model.path, recipe.model.method = tiny, "control"
    source = AutoModelForCausalLM.from_pretrained(tiny)
    control = load_control_for_training(recipe, source.config)
    ids = torch.randint(3, 1000, (2, 16))
    with torch.no_grad():
        assert type(control) is LlamaForCausalLM and torch.equal(control(ids).logits, source(ids).logits)

    tiny_train(tiny, tmp_path / "run", *CONTROL)
    assert {cr for (cr,) in logged(tmp_path / "run", "train/realised_cr").values()} == {1.0}
    export_main([str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--dtype", "float32"])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert type(exported) is LlamaForCausalLM and exported.config.model_type == "llama"
    assert "LM-only control" in (tmp_path / "hf/README.md").read_text()
    with torch.no_grad():
        trained = exported(ids, use_cache=True)
        assert not isinstance(trained.past_key_values, dmc.DMCCache)
        assert not torch.allclose(trained.logits, source(ids).logits, atol=1e-3)  # it did train


# ---- bad input ----------------------------------------------------------------------------------------------
def _error(tiny, tmp_path, *extra) -> str:
    return one_line_exit(main, "--config", str(ROOT / "configs/tiny.yaml"), "--model.path", tiny,
                         "--run.out_dir", str(tmp_path / "x"), *extra)


def test_control_with_dmc_only_options_is_refused(tiny, tmp_path):
    message = _error(tiny, tmp_path, "--model.method", "control")  # tiny.yaml sets optim.decision_lr
    assert "model.method=control" in message and "optim.decision_lr" in message
    message = _error(tiny, tmp_path, *CONTROL, "--model.dmc.window", "4")
    assert "model.dmc.window" in message


def test_teachers_that_cannot_teach_are_refused(tiny, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    small = tmp_path / "small-vocab"
    LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(small)
    message = _error(tiny, tmp_path, *DISTILL, "--distill.teacher", str(small))
    assert "vocabulary of 101 tokens" in message
    # the same vocabulary size, another tokenizer
    other = tmp_path / "other-tokenizer"
    config = LlamaForCausalLM.config_class.from_pretrained(tiny)
    LlamaForCausalLM(config).save_pretrained(other)
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0"))).save_pretrained(other)
    assert "another tokenizer" in _error(tiny, tmp_path, *DISTILL, "--distill.teacher", str(other))
    assert "deepspeed_stage_3" in _error(tiny, tmp_path, *DISTILL, "--run.strategy", "deepspeed_stage_3")
    assert "distill.temperature" in _error(tiny, tmp_path, *DISTILL, "--distill.temperature", "0")
    assert "not both 0" in _error(tiny, tmp_path, "--distill.lm_weight", "0")


def test_the_shipped_control_recipe_matches_the_2x_recipe_but_for_dmc():
    from dataclasses import asdict

    from dmc.train.run import parse

    dmc_recipe = parse(["--config", str(ROOT / "configs/smollm2-135m-cpu.yaml")])[0]
    control = parse(["--config", str(ROOT / "configs/smollm2-135m-control-cpu.yaml")])[0]
    assert control.model.method == "control" and control.model.path == dmc_recipe.model.path
    assert asdict(control.data) == asdict(dmc_recipe.data) and asdict(control.distill) == asdict(dmc_recipe.distill)
    # the same steps at the same LR (the adapter gate has no stage 1: its ramp takes the control's stage-1 steps)
    from dmc.train.module import lr_factor

    assert control.total_steps == dmc_recipe.total_steps
    assert [lr_factor(i, control) for i in range(control.total_steps)] == \
        [lr_factor(i, dmc_recipe) for i in range(dmc_recipe.total_steps)]
    assert asdict(control.optim) == asdict(dmc_recipe.optim) | {"decision_lr": None}
    assert control.run.seed == dmc_recipe.run.seed
