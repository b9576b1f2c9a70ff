"""The transformers ``Cache`` over paged slots that the DMC cache and the baseline policy caches both are.

``SlotCacheLayer`` is a cache layer filled by its own attention code (``update`` is refused with a hint);
``SlotCache`` holds one per layer and answers what every slot cache answers: live slots per pair and bytes.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .ops.decode_backends import SlotsView
from .paged_slots import PagedSlots


class DMCCacheError(RuntimeError):
    """The cache was used in a way DMC does not support; the message says what to do instead."""


class SlotCacheLayer(PagedSlots, CacheLayerMixin):
    """A transformers cache layer over paged slots. Subclasses define ``_init_state(batch, dtype, device)``,
    ``side_state()`` (the tensors kept beside the key/value pools, counted by ``reserved_bytes``) and
    ``update_hint`` (what to do instead of a plain ``update``)."""

    is_compileable = False
    is_sliding = False
    supports_early_init = False
    update_hint = ""

    def __init__(self, num_kv_heads: int, head_dim: int, block_size: int, kv_bits: int = 16, kv_group: int | None = None):
        PagedSlots.__init__(self, num_kv_heads, head_dim, block_size, kv_bits, kv_group)
        CacheLayerMixin.__init__(self)
        self.seen_tokens = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self._init_state(key_states.shape[0], key_states.dtype, key_states.device)

    def update(self, key_states, value_states, *args, **kwargs):
        raise DMCCacheError(self.update_hint)

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def reset(self) -> None:
        self.is_initialized = False
        self.seen_tokens = 0

    def side_state(self) -> tuple[torch.Tensor, ...]:
        """The tensors this layer keeps beside its key/value pools (positions, scores, running sums...)."""
        return ()

    def decode_view(self) -> SlotsView:
        """What a decoding step reads: every live slot, from the pools or (a quantised store) their codes."""
        k, v = self.coded_pools() if self.quantized else (self.k_pool, self.v_pool)
        return SlotsView(k, v, self.block_table, self.lens, self.owners())

    def reserved_bytes(self) -> int:
        """Bytes of the pools as reserved (blocks handed out or not) plus the side state."""
        if not self.is_initialized:
            return 0
        return self.pool_bytes() + sum(t.numel() * t.element_size() for t in self.side_state())

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep/reorder/repeat sequences (beam search, num_return_sequences); blocks are copied, never shared."""
        if self.is_initialized:
            self.select_sequences(index.to(self.device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.select_rows(torch.arange(self.lens.shape[0], device=self.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_rows(indices)


class SlotCache(Cache):
    """A ``Cache`` of ``SlotCacheLayer``s: ``num_slots(layer_idx)`` -> (B, H_kv) live slots;
    ``allocated_bytes()`` the slot blocks in use; ``reserved_bytes()`` the pools plus per-slot state."""

    def layer(self, layer_idx: int) -> SlotCacheLayer:
        return self.layers[layer_idx]

    def batch_repeat_interleave(self, repeats: int):
        for layer in self.layers:
            layer.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor):
        for layer in self.layers:
            layer.batch_select_indices(indices)

    def num_slots(self, layer_idx: int) -> torch.Tensor:
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            raise DMCCacheError(f"layer {layer_idx} of the cache is empty: run a forward pass first")
        return layer.lens.clone()

    def allocated_bytes(self) -> int:
        return sum(layer.allocated_bytes() for layer in self.layers)

    def reserved_bytes(self) -> int:
        return sum(layer.reserved_bytes() for layer in self.layers)
