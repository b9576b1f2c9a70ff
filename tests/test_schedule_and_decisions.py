import math

import pytest
import torch

from dmc.decisions import gumbel_sigmoid_logits, read_decision_channel, straight_through_hard
from dmc.schedule import cr_loss, cr_schedule, realised_cr, stage1_multiplier


def test_cr_schedule_is_linear_from_one():
    assert cr_schedule(0, 4.0, 100) == 1.0
    assert cr_schedule(50, 4.0, 100) == pytest.approx(2.5)
    assert cr_schedule(100, 4.0, 100) == 4.0
    assert cr_schedule(1000, 4.0, 100) == 4.0
    assert cr_schedule(10, 2.0, 100, start_step=10) == 1.0 and cr_schedule(60, 2.0, 100, start_step=10) == 1.5
    with pytest.raises(ValueError):
        cr_schedule(1, 0.5, 10)


def test_cr_loss_is_one_sided():
    target = 4.0  # wants mean alpha >= 0.75
    assert cr_loss(torch.tensor([0.8, 0.9]), target).item() == 0.0
    assert cr_loss(torch.tensor([0.5, 0.75]), target).item() == pytest.approx(0.125)
    a = torch.tensor([0.25], requires_grad=True)
    cr_loss(a, target).backward()
    assert a.grad.item() == -1.0


def test_realised_cr_and_stage1_multiplier():
    assert realised_cr(0.5) == 2.0 and realised_cr(torch.tensor([0.75, 0.75])) == 4.0
    assert math.isinf(realised_cr(1.0))
    assert stage1_multiplier(0, 250) == 1.0 and stage1_multiplier(100, 250) == pytest.approx(0.5)
    assert stage1_multiplier(200, 250) == 0.0 and stage1_multiplier(300, 250) == 0.0


def test_decision_channel_reading():
    B, H, H_kv, T, D = 2, 6, 2, 5, 8
    q, k = torch.randn(B, H, T, D), torch.randn(B, H_kv, T, D)
    logit, omega, q0, k0 = read_decision_channel(q, k, D - 1, 5.0, 5.0, 2**-7)
    torch.testing.assert_close(logit, k[..., -1] - 5)
    expected = torch.sigmoid(q[..., -1].view(B, H_kv, 3, T).mean(2) + 5) + 2**-7
    torch.testing.assert_close(omega, expected)
    assert (q0[..., -1] == 0).all() and (k0[..., -1] == 0).all()
    torch.testing.assert_close(q0[..., :-1], q[..., :-1])


def test_gumbel_sigmoid_matches_logistic_distribution():
    # l + g1 - g2 is logistic(l, 1): P(alpha~ > 0.5) = sigmoid(l)
    logit = torch.full((200_000,), 0.7)
    z = gumbel_sigmoid_logits(logit, 0.1, generator=torch.Generator().manual_seed(0))
    assert (z > 0).float().mean().item() == pytest.approx(torch.sigmoid(torch.tensor(0.7)).item(), abs=0.01)
    assert torch.isfinite(z).all()


def test_straight_through_hard():
    logit = torch.tensor([-2.0, 0.5, 3.0], requires_grad=True)
    hard = straight_through_hard(logit)
    assert hard.tolist() == [0.0, 1.0, 1.0]
    hard.sum().backward()
    s = torch.sigmoid(logit.detach())
    torch.testing.assert_close(logit.grad, s * (1 - s))


def test_cr_from_merges_counts_slots_per_head():
    import dmc

    merges = torch.tensor([[5.0, 0.0], [9.0, 7.0]])  # 2 layers x 2 KV heads, 10 tokens per head
    cr = dmc.cr_from_merges(merges, 10)
    assert cr["per_head"].tolist() == [[2.0, 1.0], [10.0, pytest.approx(10 / 3)]]
    assert cr["per_layer"].tolist() == [pytest.approx(20 / 15), pytest.approx(20 / 4)]
    assert cr["cr"] == pytest.approx(40 / 19)
