"""``DMCCache``: a transformers ``Cache`` whose every (sequence, layer, KV head) holds its own number of slots.

Slots live in a paged pool per layer (``paged_slots.py``): blocks of ``block_size`` slots, handed out on
demand, so memory follows the slots really used. Only the last slot of a pair is ever rewritten (a merge); its running
sums (pre-RoPE key, value, weight; fp32) are kept beside the pool, and with a merge window W the last
W raw tokens of the open segment too, so that a merged slot averages at most W tokens, as in training.
"""

from __future__ import annotations

import torch

from .metrics import head_dim
from .ops.cache_step import open_slot_state, running_sums, segment_length, segment_sums, shift_ring
from .ops.cpu_decode import dmc_update_cpu
from .ops.decode_backends import SlotsView
from .ops.triton_decode import dmc_update_triton
from .slot_cache import DMCCacheError, SlotCache, SlotCacheLayer


class DMCLayer(SlotCacheLayer):
    update_hint = ("DMCCache is filled by DMC attention layers (prefill/step); it cannot take plain key/value "
                   "updates. Use it with a dmc_llama model, or a DynamicCache with a vanilla Llama.")

    def __init__(self, num_kv_heads: int, head_dim: int, block_size: int, window: int | None, kv_bits: int = 16,
                 kv_group: int | None = None):
        super().__init__(num_kv_heads, head_dim, block_size, kv_bits, kv_group)
        self.window = window
        # each sequence's open-slot state, selected, copied and emptied with its slots; a quantised store keeps
        # the open slot itself in full precision (open_k, open_v) and codes it when it closes
        self.row_state = ("started", "k_sum", "v_sum", "w_sum") + (
            ("ring_k", "ring_v", "ring_w", "seg_len") if window else ()) + (
            ("open_k", "open_v") if self.quantized else ())

    # ---- allocation ------------------------------------------------------------------------------
    def _init_state(self, batch: int, dtype, device) -> None:
        H, D = self.num_kv_heads, self.head_dim
        self.init_pool(batch, dtype, device)
        self.started = torch.zeros(batch, dtype=torch.bool, device=device)
        self.state_dtype = sd = torch.promote_types(dtype, torch.float32)  # running sums: fp32 or better
        self.k_sum = torch.zeros(batch, H, D, dtype=sd, device=device)
        self.v_sum = torch.zeros_like(self.k_sum)
        self.w_sum = torch.zeros(batch, H, dtype=sd, device=device)
        if self.window:
            W = self.window
            self.ring_k = torch.zeros(batch, H, W, D, dtype=sd, device=device)
            self.ring_v = torch.zeros_like(self.ring_k)
            self.ring_w = torch.zeros(batch, H, W, dtype=sd, device=device)
            self.seg_len = torch.zeros(batch, H, dtype=torch.long, device=device)
        if self.quantized:
            self.open_k = torch.zeros(batch, H, D, dtype=dtype, device=device)
            self.open_v = torch.zeros_like(self.open_k)
        self.is_initialized = True

    def write_open(self, b, h, slot, key, val, append) -> None:
        """Pairs (b, h) (N,) write their open (last) slot ``slot``. A quantised store keeps it in full precision
        beside the codes, and codes the slot before it when ``append`` opened this one: a slot is coded once,
        when it closes, and a merge never reads codes back."""
        if not self.quantized:
            return self.write(b, h, slot, key, val)
        closing = append & (slot > 0)
        if bool(closing.any()):
            cb, ch = b[closing], h[closing]
            self.write(cb, ch, slot[closing] - 1, self.open_k[cb, ch], self.open_v[cb, ch])
        self.open_k[b, h] = key.to(self.dtype)
        self.open_v[b, h] = val.to(self.dtype)

    def decode_view(self) -> SlotsView:
        """A quantised store is read as its closed slots' codes plus each pair's exact open slot."""
        if not self.quantized:
            return super().decode_view()
        k, v = self.coded_pools()
        closed = (self.lens - 1).clamp(min=0)
        return SlotsView(k, v, self.block_table, closed, self.owners(), self.open_k, self.open_v, self.lens > 0)

    # ---- the two ways in: one-pass prefill, and one token at a time ------------------------------------
    def prefill(self, k_bar_rot, v_bar, k_pre, v, omega, k_sum, v_sum, w_sum, alpha, valid) -> None:
        """Store a whole prompt computed in parallel (hard decisions) as slots.

        k_bar_rot, v_bar (B, H_kv, T, D): pooled states; k_sum, v_sum (B, H_kv, D) and w_sum (B, H_kv)
        the fp32 running sums of each open (last) slot; k_pre, v, omega: raw tokens (for the merge
        window); alpha (B, H_kv, T) in {0, 1} with each first real token forced to 0; valid (B, T), left
        padding only.
        """
        B, H, T, D = k_bar_rot.shape
        if not self.is_initialized:
            self._init_state(B, k_bar_rot.dtype, k_bar_rot.device)
        merge_next = torch.cat([alpha[..., 1:], torch.zeros_like(alpha[..., :1])], dim=-1) > 0
        ends = valid[:, None, :] & ~merge_next  # (B, H_kv, T): a slot closes here (or stays open at T-1)
        slot = ends.long().cumsum(-1) - 1
        self.lens = ends.sum(-1)
        self.allocate_runs(-(-self.lens // self.block_size))
        b, h, t = ends.nonzero(as_tuple=True)
        if self.quantized:  # closed slots as codes; each pair's last (open) slot in full precision
            last = slot[b, h, t] == self.lens[b, h] - 1
            c = ~last
            self.write(b[c], h[c], slot[b, h, t][c], k_bar_rot[b[c], h[c], t[c]], v_bar[b[c], h[c], t[c]])
            self.open_k[b[last], h[last]] = k_bar_rot[b[last], h[last], t[last]].to(self.dtype)
            self.open_v[b[last], h[last]] = v_bar[b[last], h[last], t[last]].to(self.dtype)
        else:
            self.write(b, h, slot[b, h, t], k_bar_rot[b, h, t], v_bar[b, h, t])

        self.started = valid.any(-1)
        sd = self.state_dtype
        # Copies, not views: a view would keep the whole (B, H_kv, T, ...) prefill tensor alive in the cache.
        self.k_sum, self.v_sum, self.w_sum = (x.to(sd).clone() for x in (k_sum, v_sum, w_sum))
        if self.window:
            W = self.window
            is_start = (alpha == 0) & valid[:, None, :]
            pos = torch.arange(T, device=alpha.device)
            seg_start = torch.where(is_start, pos, -1).cummax(-1).values[..., -1]  # (B, H_kv)
            self.seg_len = torch.where(self.started[:, None], T - seg_start, 0)
            pad = max(0, W - T)
            take = lambda x: torch.nn.functional.pad(x, (0, 0, pad, 0))[..., -W:, :].to(sd).clone()  # noqa: E731
            self.ring_k, self.ring_v = take(k_pre), take(v)
            self.ring_w = take(omega[..., None])[..., 0]
        self.seen_tokens += T

    def step(self, k_pre, v, omega, merge, valid, cos, sin, fused: str | None = None) -> None:
        """Append or merge one token per sequence (the arithmetic: ``ops/cache_step.py``).

        k_pre, v (B, H_kv, D) (decision channel already zeroed); omega (B, H_kv); merge (B, H_kv) bool; valid (B,)
        False for left-padding tokens (they leave the cache untouched); cos, sin (B, D) of the token's position.
        A sequence's first real token always appends. ``fused``: the per-pair update in one kernel where it applies,
        "triton" (CUDA) or "cpu" (the C++ loop); it writes full-precision slots, so a coded store steps in PyTorch.
        Block allocation stays here.
        """
        B, H, _ = k_pre.shape
        if not self.is_initialized:
            self._init_state(B, k_pre.dtype, k_pre.device)
        live = valid[:, None].expand(B, H)
        merge = merge & self.started[:, None] & live
        append = live & ~merge
        slot = torch.where(append, self.lens, self.lens - 1)
        self.allocate(append & (slot % self.block_size == 0), slot // self.block_size)
        if fused and not self.quantized:
            self._step_fused(fused, k_pre, v, omega, merge, live, append, slot, cos, sin)
        else:
            sd = self.state_dtype
            k_pre, v, w = k_pre.to(sd), v.to(sd), omega.to(sd)
            if self.window:
                self.ring_k, self.ring_v, self.ring_w, self.seg_len = shift_ring(
                    self.ring_k, self.ring_v, self.ring_w, self.seg_len, k_pre, v, w, live, merge, append)
                self.k_sum, self.v_sum, self.w_sum = segment_sums(self.ring_k, self.ring_v, self.ring_w, self.seg_len)
            else:
                self.k_sum, self.v_sum, self.w_sum = running_sums(
                    self.k_sum, self.v_sum, self.w_sum, k_pre, v, w, live, merge)
            self.lens = self.lens + append.long()
            key, val = open_slot_state(self.k_sum, self.v_sum, self.w_sum, cos, sin, self.dtype)
            b, h = live.nonzero(as_tuple=True)
            self.write_open(b, h, slot[b, h], key[b, h], val[b, h], append[b, h])
        self.started = self.started | valid

    def _step_fused(self, kernel: str, k_pre, v, omega, merge, live, append, slot, cos, sin) -> None:
        """The sums, the ring and the open slot in one kernel, the slot counts and the segment length here: the
        kernel reads every state it is given and writes only new tensors and the pool."""
        seg_len = segment_length(self.seg_len, merge, append) if self.window else self.lens
        ring = (self.ring_k, self.ring_v, self.ring_w) if self.window else None
        update = dmc_update_cpu if kernel == "cpu" else dmc_update_triton
        sums, ring = update(k_pre, v, omega, merge, live, slot, cos, sin, (self.k_sum, self.v_sum, self.w_sum), ring,
                            seg_len, self.block_table, self.k_pool, self.v_pool, self.block_size)
        self.k_sum, self.v_sum, self.w_sum = sums
        if self.window:
            self.ring_k, self.ring_v, self.ring_w = ring
            self.seg_len = seg_len
        self.lens = self.lens + append.long()

    # ---- transformers Cache API (beyond SlotCacheLayer) ----------------------------------------------
    def crop(self, tokens_to_remove: int) -> None:
        raise DMCCacheError("a DMC cache cannot be cropped (merged slots cannot be un-merged); regenerate instead")

    # ---- accounting ----------------------------------------------------------------------------------
    def allocated_bytes(self) -> int:
        """Slot blocks handed out; a quantised store adds its full-precision open slots (one per pair that holds a
        sequence: an empty row's is nothing)."""
        extra = 0
        if self.quantized and self.is_initialized:
            extra = int((self.lens > 0).sum()) * self.head_dim * self.open_k.element_size() * 2
        return super().allocated_bytes() + extra

    def side_state(self) -> tuple[torch.Tensor, ...]:
        """The fp32 running state of the open slots (and their full-precision copies on a quantised store)."""
        state = [self.k_sum, self.v_sum, self.w_sum] + ([self.ring_k, self.ring_v, self.ring_w] if self.window else [])
        return tuple(state + ([self.open_k, self.open_v] if self.quantized else []))


class DMCCache(SlotCache):
    """Compressed KV cache for ``dmc_llama`` models; ``generate()`` creates one automatically.

    ``num_slots(layer_idx)`` -> (B, H_kv) live slots; ``allocated_bytes()`` -> bytes of slot blocks in use.
    """

    def __init__(self, config, block_size: int | None = None):
        H_kv = config.num_key_value_heads
        D = head_dim(config)
        block_size = block_size or getattr(config, "dmc_block_size", 16)
        window = getattr(config, "dmc_window", None) or None
        bits, group = getattr(config, "dmc_kv_bits", 16), getattr(config, "dmc_kv_group", None)
        layers = [DMCLayer(H_kv, D, block_size, window, bits, group) for _ in range(config.num_hidden_layers)]
        super().__init__(layers=layers)

    def layer(self, layer_idx: int) -> DMCLayer:
        return self.layers[layer_idx]
