"""The training-mode branch of DMCLlamaAttention: with the noise off and tau -> 0 it is the eval forward; with
soft decisions it is a hand-built, materialised attention over partially accumulated keys and values."""

import pytest
import torch

from tests.helpers import mixed_dmc, random_ids


@pytest.mark.parametrize("kind", ["mha", "gqa"])
@pytest.mark.parametrize("window", [None, 3, 12])
def test_noise_off_small_tau_training_forward_equals_eval_forward(kind, window):
    model = mixed_dmc(kind, window)
    ids = random_ids(2, 25, seed=5)
    with torch.no_grad():
        evaluated = model.eval()(ids, use_cache=False)
        model.train().set_gumbel_noise(False)
        model.config.dmc_tau = 1e-6  # sigmoid(l / tau) is 0 or 1: the relaxation becomes the hard decision
        trained = model(ids, use_cache=False)
    frac = evaluated.dmc_merges.sum() / (evaluated.dmc_merges.numel() * ids.shape[1])
    assert 0.2 < frac < 0.8, "decisions should be mixed"
    torch.testing.assert_close(trained.logits, evaluated.logits, rtol=1e-9, atol=1e-9)
    assert torch.equal(trained.dmc_merges, evaluated.dmc_merges)
    torch.testing.assert_close(trained.dmc_alpha, evaluated.dmc_alpha, rtol=1e-12, atol=1e-12)


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _hand_built_soft_attention(attn, x, cos, sin, tau, window):
    """Every sum and product written out: alpha_t = sigmoid(l_t / tau) (token 0 appends), state i averages
    the tokens t <= i of its window weighted by omega_t * prod_{s=t+1..i} alpha_s, and query i sees state j < i
    with the bias log(1 - alpha_{j+1}) and its own state with bias 0."""
    cfg = attn.config
    B, T, _ = x.shape
    D, c = attn.head_dim, cfg.dmc_channel_index
    H, H_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    g = H // H_kv
    q = attn.q_proj(x).view(B, T, H, D)
    k = attn.k_proj(x).view(B, T, H_kv, D)
    v = attn.v_proj(x).view(B, T, H_kv, D)
    out = torch.zeros(B, T, H, D, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            kv = h // g
            logit = k[b, :, kv, c] - cfg.dmc_logit_offset
            omega = torch.sigmoid(q[b, :, kv * g:(kv + 1) * g, c].mean(-1) + cfg.dmc_weight_offset) + cfg.dmc_weight_eps
            alpha = torch.sigmoid(logit / tau)
            alpha[0] = 0.0
            q0, k0 = q[b, :, h].clone(), k[b, :, kv].clone()
            q0[:, c], k0[:, c] = 0.0, 0.0
            k_bar, v_bar = [], []
            for i in range(T):
                lo = 0 if not window else max(0, i - window + 1)
                weights = [omega[t] * torch.prod(alpha[t + 1:i + 1]) for t in range(lo, i + 1)]
                total = sum(weights)
                k_bar.append(sum(w * k0[t] for w, t in zip(weights, range(lo, i + 1))) / total)
                v_bar.append(sum(w * v[b, t, kv] for w, t in zip(weights, range(lo, i + 1))) / total)
            for i in range(T):
                qi = _rope(q0[i], cos[0, i], sin[0, i])
                scores = torch.stack([
                    qi @ _rope(k_bar[j], cos[0, j], sin[0, j]) * attn.scaling
                    + (torch.log(1 - alpha[j + 1]) if j < i else 0.0) for j in range(i + 1)])
                p = scores.softmax(-1)
                out[b, i, h] = sum(p[j] * v_bar[j] for j in range(i + 1))
    return attn.o_proj(out.reshape(B, T, H * D))


@pytest.mark.parametrize("kind", ["mha", "gqa"])
@pytest.mark.parametrize("window", [None, 3])
def test_soft_training_attention_equals_hand_built_reference(kind, window):
    model = mixed_dmc(kind, window)
    model.config.dmc_tau = 1.5  # soft decisions: every state is partly visible
    model.train().set_gumbel_noise(False)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 7, model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    cos, sin = model.model.rotary_emb(x, position_ids=torch.arange(7)[None])
    with torch.no_grad():
        out, _ = attn(x, position_embeddings=(cos, sin))
        expected = _hand_built_soft_attention(attn, x, cos, sin, 1.5, window)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
