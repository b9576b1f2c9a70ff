import warnings

import pytest
import torch
import torch.nn.functional as F

from dmc.ops.train_attention import MASKED, train_attention_flex, train_attention_reference, train_attention_sdpa


def _biases(z: torch.Tensor, hard: bool):
    """keep/merge logs from relaxed logits z (B, H_kv, T), shifted to the next token as the model does."""
    nxt = torch.cat([z[..., 1:], torch.full_like(z[..., :1], -1e9)], dim=-1)
    if hard:
        return torch.where(nxt > 0, MASKED, 0.0).to(z.dtype), torch.where(nxt > 0, 0.0, MASKED).to(z.dtype)
    return F.logsigmoid(-nxt), F.logsigmoid(nxt)


def _inputs(B, H, H_kv, T, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=dtype)
    k = torch.randn(B, H_kv, T, D, generator=g, dtype=dtype)
    v = torch.randn(B, H_kv, T, D, generator=g, dtype=dtype)
    z = torch.randn(B, H_kv, T, generator=g, dtype=dtype) * 3
    return [t.requires_grad_() for t in (q, k, v, z)]


SHAPES = [(1, 1, 1, 1, 8), (2, 4, 2, 7, 16), (1, 9, 3, 63, 64), (2, 6, 6, 33, 100), (3, 8, 1, 130, 24)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("hard", [False, True])
def test_sdpa_equals_reference_fp64_values_and_grads(shape, hard):
    q, k, v, z = _inputs(*shape, dtype=torch.float64)
    keep, merge = _biases(z, hard)
    ref = train_attention_reference(q, k, v, keep, merge)
    out = train_attention_sdpa(q, k, v, keep, merge)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    probe = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * probe).sum(), (q, k, v, z), retain_graph=True, allow_unused=True)
    g_out = torch.autograd.grad((out * probe).sum(), (q, k, v, z), allow_unused=True)
    for gr, go in zip(g_ref, g_out):
        if gr is None:
            assert go is None or go.abs().max() == 0
            continue
        torch.testing.assert_close(go, gr, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_sdpa_low_precision_close_to_fp64_reference(dtype, tol):
    q, k, v, z = _inputs(2, 6, 2, 45, 32, dtype=torch.float64)
    keep, merge = _biases(z, False)
    ref = train_attention_reference(q, k, v, keep, merge)
    low = train_attention_sdpa(*(t.to(dtype) for t in (q, k, v, keep, merge)))
    # the fused path may err at most ~2x as much as the reference run in the same precision
    same_prec = train_attention_reference(*(t.to(dtype) for t in (q, k, v, keep, merge)))
    budget = max(tol, 2 * (same_prec.double() - ref).abs().max().item())
    assert (low.double() - ref).abs().max().item() <= budget


def test_bias_semantics_hard_merge_hides_state():
    # T=3, state 0 is merged into by token 1 (hidden from query 1 and 2), state 1 stays.
    q = torch.zeros(1, 1, 3, 4, dtype=torch.float64)
    k = torch.zeros(1, 1, 3, 4, dtype=torch.float64)
    v = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64).view(1, 1, 3, 1).expand(1, 1, 3, 4)
    keep = torch.tensor([[[MASKED, 0.0, 0.0]]], dtype=torch.float64)
    merge = torch.tensor([[[0.0, MASKED, MASKED]]], dtype=torch.float64)
    out = train_attention_sdpa(q, k, v, keep, merge)[0, 0, :, 0]
    torch.testing.assert_close(out, torch.tensor([1.0, 10.0, 55.0], dtype=torch.float64))


@pytest.mark.parametrize("shape", [(1, 4, 2, 5, 16), (2, 6, 3, 40, 32)])
def test_flex_forward_equals_reference(shape):
    q, k, v, z = (t.detach().float() for t in _inputs(*shape, dtype=torch.float64))
    keep, merge = _biases(z, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = train_attention_flex(q, k, v, keep, merge)
    torch.testing.assert_close(out, train_attention_reference(q, k, v, keep, merge), rtol=1e-5, atol=1e-5)


def _low_precision_check(fn, device: str, dtype, shape=(2, 8, 2, 300, 64)):
    """``fn`` on ``device`` in ``dtype``, values and gradients, against the fp64 reference on the CPU: its error
    may be at most twice the same-precision reference's own (flash-attention's rule)."""
    q, k, v, z = _inputs(*shape, dtype=torch.float64)
    keep, merge = _biases(z, False)
    probe = torch.randn(q.shape, dtype=torch.float64)
    exact = train_attention_reference(q, k, v, keep, merge)
    g_exact = torch.autograd.grad((exact * probe).sum(), (q, k, v))

    def run(f, dev):
        leaves = [t.detach().to(dev, dtype).requires_grad_() for t in (q, k, v)]
        out = f(*leaves, keep.detach().to(dev, dtype), merge.detach().to(dev, dtype))
        grads = torch.autograd.grad((out * probe.to(dev, dtype)).sum(), leaves)
        return [x.double().cpu() for x in (out, *grads)]

    got, same = run(fn, device), run(train_attention_reference, device)
    for g, s, e in zip(got, same, (exact, *g_exact)):
        assert (g - e).abs().max() <= max(2 * (s - e).abs().max(), 1e-3 * e.abs().max())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sdpa_cuda_branch_values_and_grads_in_bfloat16():
    """On CUDA the sentinel form repeats K/V per query head for the fused kernels (no enable_gqa)."""
    _low_precision_check(train_attention_sdpa, "cuda", torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_cuda_values_and_grads_in_bfloat16():
    """FlexAttention has a backward on CUDA (compiled score_mod); on CPU torch 2.13 has none."""
    _low_precision_check(train_attention_flex, "cuda", torch.bfloat16, shape=(2, 8, 2, 256, 64))


def test_low_precision_check_runs_on_the_cpu_too():
    """The helper the CUDA tests use, on the CPU path (fp32), so that it is exercised without a GPU."""
    _low_precision_check(train_attention_sdpa, "cpu", torch.float32, shape=(1, 4, 2, 37, 16))
