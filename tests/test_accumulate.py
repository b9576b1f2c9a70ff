import pytest
import torch

from dmc.ops.accumulate import accumulate, accumulate_reference


def _inputs(B, H, T, E, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, T, E, generator=g, dtype=dtype)
    a = torch.rand(B, H, T, generator=g, dtype=dtype)
    a = torch.where(a < 0.3, 0.0, torch.where(a > 0.75, 1.0, a))  # hard zeros/ones and soft values
    w = torch.rand(B, H, T, generator=g, dtype=dtype) + 0.05
    return [t.requires_grad_() for t in (x, a, w)]


@pytest.mark.parametrize("T", [1, 2, 7, 12, 13, 63, 130])
@pytest.mark.parametrize("window", [None, 0, 1, 3, 12])
def test_parallel_equals_recurrence_values_and_grads(T, window):
    x, a, w = _inputs(2, 3, T, 5)
    ref, ref_c = accumulate_reference(x, a, w, window)
    out, c = accumulate(x, a, w, window)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c, ref_c, rtol=1e-12, atol=1e-12)
    probe = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * probe).sum() + ref_c.sum(), (x, a, w), allow_unused=True)
    g_out = torch.autograd.grad((out * probe).sum() + c.sum(), (x, a, w), allow_unused=True)
    for gr, go, t in zip(g_ref, g_out, (x, a, w)):
        gr = torch.zeros_like(t) if gr is None else gr
        go = torch.zeros_like(t) if go is None else go
        torch.testing.assert_close(go, gr, rtol=1e-10, atol=1e-10)


def test_hard_segments_are_weighted_means():
    # alpha = [., 1, 1, 0, 1]: slots {0,1,2} and {3,4}; window large enough to hold them
    x = torch.arange(5, dtype=torch.float64).view(1, 1, 5, 1)
    a = torch.tensor([[[0.0, 1, 1, 0, 1]]], dtype=torch.float64)
    w = torch.tensor([[[1.0, 2, 1, 1, 3]]], dtype=torch.float64)
    out, c = accumulate(x, a, w, None)
    expected = [0, 2 / 3, (2 + 2) / 4, 3, (3 + 12) / 4]
    torch.testing.assert_close(out.flatten(), torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(c.flatten(), torch.tensor([1.0, 3, 4, 1, 4], dtype=torch.float64))


def test_window_truncates_long_segments():
    x = torch.arange(6, dtype=torch.float64).view(1, 1, 6, 1)
    a = torch.ones(1, 1, 6, dtype=torch.float64)
    w = torch.ones(1, 1, 6, dtype=torch.float64)
    out, _ = accumulate(x, a, w, 2)
    torch.testing.assert_close(out.flatten(), torch.tensor([0, 0.5, 1.5, 2.5, 3.5, 4.5], dtype=torch.float64))


def test_alpha_zero_at_first_token_is_forced():
    x, a, w = _inputs(1, 2, 9, 4)
    with torch.no_grad():
        a1 = a.clone()
        a1[..., 0] = 1.0
    torch.testing.assert_close(accumulate(x, a1, w, 4)[0], accumulate(x, a, w, 4)[0])


@pytest.mark.parametrize("window", [None, 12])
def test_low_precision_follows_fp32(window):
    x, a, w = _inputs(2, 2, 33, 8, dtype=torch.float32)
    ref, _ = accumulate(x, a, w, window)
    low, _ = accumulate(x.bfloat16(), a.bfloat16(), w.bfloat16(), window)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05)
