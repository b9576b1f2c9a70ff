"""A warm start for DMS gates from forward passes alone: fit each gate to what the frozen model itself attends to.

For every layer and KV head, a key's *later attention* is the mean attention (over its query group) that the
queries more than ``window`` tokens after it give it, in the vanilla model (the method switched off). The keys
with the least later attention are the ones eviction should take: per (layer, KV head) the fraction that realises
the target CR on these blocks is labelled 1, the rest 0, and each gate (which reads the token *after* the key) is
fitted to those labels by logistic regression on the layer inputs the vanilla model produces. No gradient passes
through the model, so this costs a few forward passes; distillation then starts from gates that already evict
about the target's share, where zero gates start by evicting nothing. (KVzap and Locret fit their scorers to the
model's own attention in the same spirit.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def evict_fraction(cr: float, block_len: int, window: int) -> float:
    """The share of a block's keys that can leave (those more than ``window`` before its last token) that must
    leave for the block to be held at ``cr``."""
    eligible = block_len - window - 1
    if eligible <= 0:
        raise ValueError(f"a block of {block_len} tokens with a delay of {window} evicts nothing: lower the window")
    return min(1.0, block_len * (1 - 1 / cr) / eligible)


@torch.no_grad()
def later_attention(model, ids: torch.Tensor, window: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: (the layer's inputs (B, T, hidden), each key's later attention (B, H_kv, T), NaN where no query
    is more than ``window`` after the key), from the model with its method switched off (eager attention)."""
    config = model.config
    enabled, impl = config.dms_enabled, config._attn_implementation
    config.dms_enabled, config._attn_implementation = False, "eager"
    try:
        out = model(ids, use_cache=False, output_attentions=True, output_hidden_states=True)
    finally:
        config.dms_enabled, config._attn_implementation = enabled, impl
    T = ids.shape[1]
    pos = torch.arange(T, device=ids.device)
    later = (pos[:, None] - pos[None, :]) > window  # (query, key)
    scores = []
    for attn in out.attentions:  # (B, H, T, T)
        B, H = attn.shape[:2]
        p = attn.float().view(B, config.num_key_value_heads, H // config.num_key_value_heads, T, T).mean(2)
        count = later.sum(0)  # queries more than the window after each key
        s = (p * later).sum(-2) / count.clamp(min=1)
        scores.append(torch.where(count > 0, s, float("nan")))
    return list(out.hidden_states[:-1]), scores


def gate_labels(scores: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, mask) (B, H_kv, T) for the gates: the gate at token t decides about key t - 1, so label t is 1 when
    key t - 1 is among the ``fraction`` of its (layer, head)'s keys with the least later attention; mask: the tokens
    whose key has later queries at all."""
    key_known = ~torch.isnan(scores)  # (B, H_kv, T) by key
    B, H, T = scores.shape
    threshold = torch.stack([torch.nanquantile(scores[:, h][key_known[:, h]], fraction) if fraction < 1 else
                             torch.tensor(float("inf")) for h in range(H)])
    evict = (scores <= threshold[None, :, None].to(scores)) & key_known
    labels = torch.cat([torch.zeros_like(evict[..., :1]), evict[..., :-1]], -1).float()  # token t <- key t - 1
    mask = torch.cat([torch.zeros_like(key_known[..., :1]), key_known[..., :-1]], -1)
    return labels, mask


def fit_gate(gate, x: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, steps: int = 200,
             lr: float = 1e-3) -> float:
    """Logistic regression of ``gate`` (its norm and projection) on inputs x (B, T, hidden) to labels (B, H_kv, T)
    where ``mask``; returns the final loss."""
    opt = torch.optim.Adam(gate.parameters(), lr=lr)
    weight = mask.float()
    loss = torch.tensor(0.0)
    with torch.enable_grad():
        for _ in range(steps):
            logits = gate(x.float())
            loss = (F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * weight).sum() / weight.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return float(loss.detach())


def warm_start(model, blocks: torch.Tensor, cr: float, batch_size: int = 4, steps: int = 200) -> list[float]:
    """Fit every gate of a ``dms_llama`` model to the frozen model's later attention on ``blocks`` (N, T) at the
    eviction share of ``cr``; returns each layer's final loss."""
    window, T = model.config.dms_window, blocks.shape[1]
    fraction = evict_fraction(cr, T, window)
    was_training = model.training
    model.eval()
    per_layer: list[list] = [[] for _ in model.model.layers]
    device = next(model.parameters()).device
    for i in range(0, len(blocks), batch_size):
        xs, scores = later_attention(model, blocks[i : i + batch_size].to(device), window)
        for layer, (x, s) in enumerate(zip(xs, scores)):
            per_layer[layer].append((x, s))
    losses = []
    for layer, parts in zip(model.model.layers, per_layer):
        x = torch.cat([p[0] for p in parts])
        labels, mask = gate_labels(torch.cat([p[1] for p in parts]), fraction)
        losses.append(fit_gate(layer.dms_gate, x, labels, mask, steps))
    model.train(was_training)
    return losses
