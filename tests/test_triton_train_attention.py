"""The fused Triton training attention against the materialised reference, values and every gradient (q, k, v and
keep_log, through which the decisions learn), on odd shapes: on CUDA natively, on CPU under TRITON_INTERPRET=1."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported
pytest.importorskip("triton")

from dmc.ops.train_attention import MASKED, train_attention, train_attention_reference  # noqa: E402
from dmc.ops.triton_decode import triton_available  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(B, H, H_kv, T, D, seed, dtype=torch.float64):
    """Random q, k, v and keep_log with merged-over (MASKED) states, a left-padded sequence, strong and weak biases."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=g, dtype=dtype) for h in (H, H_kv, H_kv))
    keep = torch.log(torch.rand(B, H_kv, T, generator=g, dtype=dtype).clamp(min=1e-3))
    keep[torch.rand(B, H_kv, T, generator=g) < 0.3] = MASKED  # merged into the next state
    keep[..., -1] = 0.0  # the last state is always a slot
    if B > 1:
        keep[1, :, : T // 3] = MASKED  # sequence 1: left padding is never attended
    return q, k, v, keep


SHAPES = [  # (B, H, H_kv, T, D)
    (2, 6, 2, 37, 40),  # GQA, T past two blocks and not a multiple, head dim not a power of two
    (1, 9, 3, 50, 64),  # SmolLM2's heads
    (1, 4, 4, 1, 16),  # one token
    (2, 2, 1, 17, 24),  # MQA, one key past a block
    (1, 4, 2, 150, 32),  # past two of a GPU's 64-blocks: the running rescale and later query blocks there too
]


@pytest.mark.parametrize("B,H,H_kv,T,D", SHAPES)
def test_forward_and_every_gradient_equal_the_reference(B, H, H_kv, T, D):
    q, k, v, keep = _inputs(B, H, H_kv, T, D, seed=T)
    grad = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(1), dtype=q.dtype)

    def run(fn, device):
        leaves = [x.float().to(device).requires_grad_() for x in (q, k, v, keep)]
        out = fn(*leaves[:3], leaves[3], None, scale=0.2)
        out.backward(grad.float().to(device))
        return [out.detach().cpu()] + [x.grad.cpu() for x in leaves]

    want = run(train_attention_reference, "cpu")
    got = run(lambda *a, **kw: train_attention("triton", *a, **kw), DEVICE)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dkeep"), got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)
    assert T == 1 or want[4].abs().max() > 1e-3  # keep_log's gradient is not trivially zero (one token: it is)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton 3.9's CPU interpreter computes tl.dot on bf16 "
                    "operands wrongly (a 16x16 bf16 dot is off by ~3e10 there): this runs on CUDA")
def test_bfloat16_inputs_stay_close_to_the_float32_reference():
    """The training dtype on a GPU: 16-bit operands, fp32 accumulation; within bf16's rounding of the reference."""
    q, k, v, keep = _inputs(1, 4, 2, 70, 32, seed=9, dtype=torch.float32)
    want = train_attention_reference(q, k, v, keep, None, scale=0.2)
    got = train_attention("triton", *(x.to(DEVICE, torch.bfloat16) for x in (q, k, v)), keep.to(DEVICE), None,
                          scale=0.2)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float().cpu(), want, atol=3e-2, rtol=3e-2)


def test_a_bias_of_zero_everywhere_is_causal_attention():
    """keep_log 0 everywhere (no merge): plain causal attention, as SDPA computes it."""
    q, k, v, _ = _inputs(1, 4, 2, 21, 32, seed=3, dtype=torch.float32)
    keep = torch.zeros(1, 2, 21)
    got = train_attention("triton", *(x.to(DEVICE) for x in (q, k, v, keep)), None, scale=None).cpu()
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            is_causal=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_without_cuda_or_the_interpreter_it_refuses_in_one_line_naming_the_fallback(monkeypatch):
    import dmc.ops.triton_train_attention as fused

    monkeypatch.setattr(fused, "triton_interpreting", lambda: False)
    q, k, v, keep = _inputs(1, 2, 1, 4, 16, seed=0, dtype=torch.float32)
    if torch.cuda.is_available():
        pytest.skip("checks a machine without CUDA")
    with pytest.raises(RuntimeError, match=r"needs CUDA.*use 'auto'") as err:
        fused.fused_train_attention(q, k, v, keep)
    assert "\n" not in str(err.value)


def test_a_training_step_of_a_dmc_model_on_the_fused_attention_equals_the_sdpa_form():
    """The model path: a training forward (relaxed decisions, Gumbel noise from the same seed) and its backward give
    the same loss and the same gradient on every weight with dmc_train_attention 'triton' as with 'sdpa'."""
    from tests.helpers import mixed_dmc, random_ids

    model = mixed_dmc("gqa", window=12, dtype=torch.float32).to(DEVICE).train()
    ids = random_ids(2, 23, seed=5).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding
    # not scored from a padding position (the first real token's label is predicted there): the SDPA form's padding
    # rows differ from the reference's (their diagonal is not free), real rows do not
    labels = ids.clone()
    labels[1, :7] = -100

    def step(backend):
        model.config.dmc_train_attention = backend
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want_loss, want = step("sdpa")
    got_loss, got = step("triton")
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=1e-3, msg=name)
