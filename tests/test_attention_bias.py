"""The pure functions behind the training/evaluation attention: which tokens may merge and the biases of each
state, on hand-made sequences (left padding, a first token, merges)."""

import torch

from dmc.ops.attention_bias import (
    decode_merge_candidates,
    hard_decisions,
    merge_candidates,
    no_merge_biases,
    relaxed_decisions,
    state_biases,
)
from dmc.ops.train_attention import MASKED

VALID = torch.tensor([[True, True, True, True], [False, False, True, True]])  # row 1: two pad tokens


def test_a_sequence_first_real_token_and_padding_never_merge():
    assert merge_candidates(VALID).tolist() == [[False, True, True, True], [False, False, False, True]]


def test_decode_candidates_continue_a_started_sequence():
    valid = torch.tensor([[True, True], [False, True], [True, True]])
    assert decode_merge_candidates(valid, None).tolist() == [[False, True], [False, False], [False, True]]
    started = torch.tensor([True, True, False])
    assert decode_merge_candidates(valid, started).tolist() == [[True, True], [False, True], [False, True]]


def test_state_biases_come_from_the_successor_and_hide_padding():
    keep_now = torch.tensor([[[-1.0, -2.0, -3.0, -4.0]], [[-5.0, -6.0, -7.0, -8.0]]])
    merge_now = keep_now - 10
    keep_log, merge_log = state_biases(keep_now, merge_now, merge_candidates(VALID), VALID)
    assert keep_log.tolist() == [[[-2.0, -3.0, -4.0, 0.0]], [[MASKED, MASKED, -8.0, 0.0]]]
    # row 1: token 2 (the first real one) cannot merge, so state 1 (padding) closes; state 3 is the last
    assert merge_log.tolist() == [[[-12.0, -13.0, -14.0, MASKED]], [[MASKED, MASKED, -18.0, MASKED]]]


def test_hard_decisions_hide_merged_over_states():
    logit = torch.tensor([[[3.0, 2.0, -1.0, 5.0]], [[4.0, 4.0, 4.0, -2.0]]])
    dec = hard_decisions(logit, VALID)
    assert dec.merged.tolist() == [[[False, True, False, True]], [[False, False, False, False]]]
    assert dec.alpha.tolist() == [[[0.0, 1.0, 0.0, 1.0]], [[0.0, 0.0, 0.0, 0.0]]]
    assert dec.keep_log.tolist() == [[[MASKED, 0.0, MASKED, 0.0]], [[MASKED, MASKED, 0.0, 0.0]]]
    assert torch.equal(dec.alpha_st.detach(), dec.alpha)
    real = (dec.merge_log > MASKED) | (dec.keep_log > MASKED)
    total = dec.keep_log.exp() + dec.merge_log.exp()
    assert torch.allclose(total[real], torch.ones(()))  # a real state either stays or is superseded


def test_relaxed_decisions_without_noise_are_the_tempered_sigmoid():
    logit = torch.tensor([[[0.3, -0.2, 0.7, 0.1]], [[1.0, 2.0, -3.0, 0.5]]], requires_grad=True)
    dec = relaxed_decisions(logit, VALID, tau=0.5, noise=False)
    can = merge_candidates(VALID)[:, None, :]
    alpha = torch.sigmoid(logit / 0.5)
    assert torch.allclose(dec.alpha, alpha * can)
    assert torch.allclose(dec.keep_log[0, 0, :3], torch.log1p(-alpha[0, 0, 1:]))
    assert torch.allclose(dec.merge_log[0, 0, :3], torch.log(alpha[0, 0, 1:]))
    assert dec.merged.tolist() == [[[False, False, True, True]], [[False, False, False, True]]]
    dec.alpha_st.sum().backward()  # straight-through: gradient of sigmoid(l / tau) where a token can merge
    expect = (alpha * (1 - alpha) / 0.5 * can).detach()
    assert torch.allclose(logit.grad, expect)


def test_no_merge_biases_are_plain_causal_attention_over_real_tokens():
    keep_log, merge_log = no_merge_biases(VALID, num_kv_heads=3)
    assert keep_log.shape == (2, 3, 4) and (merge_log == MASKED).all()
    assert keep_log[1, 2].tolist() == [MASKED, MASKED, 0.0, 0.0] and (keep_log[0] == 0).all()
