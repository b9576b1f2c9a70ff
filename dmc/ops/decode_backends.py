"""The one registry of decode-attention backends, keyed by method and precision.

A cache layer says what decoding reads as a ``SlotsView`` (``SlotCacheLayer.decode_view``): its key/value pools
or, on a quantised store, their codes; the block table and live slots per pair; the table's inverse; and, for a
DMC store whose open slot stays exact, that slot. ``resolve(method, backend, ...)`` turns a configured name into
one that this method runs at this precision on this device (or refuses in one line), and
``attend(backend, q, view, scale)`` runs ``BACKENDS[precision][backend]``.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from .cpu_decode import cpu_decode_available, decode_attention_cpu, decode_attention_quant_cpu
from .decode_attention import (
    decode_attention_flash,
    decode_attention_paged,
    decode_attention_reference,
    decode_attention_sdpa,
    flash_available,
)
from .kv_quant import CodedPool
from .quant_attention import decode_attention_quant_paged, decode_attention_quant_reference
from .triton_decode import decode_attention_quant_triton, decode_attention_triton, triton_available, triton_interpreting


class SlotsView(NamedTuple):
    """What one decoding step reads of a cache layer. ``k``/``v``: pools (blocks, block_size, D) or their
    ``CodedPool``s; ``lens`` (B, H_kv) the slots to read from them; ``owned`` the table's inverse
    (``PagedSlots.owners()``); ``open_k``/``open_v`` (B, H_kv, D) and ``open_live`` (B, H_kv): one more exact slot
    per pair after its coded ones (None: none)."""

    k: torch.Tensor | CodedPool
    v: torch.Tensor | CodedPool
    block_table: torch.Tensor
    lens: torch.Tensor
    owned: tuple[torch.Tensor, torch.Tensor] | None = None
    open_k: torch.Tensor | None = None
    open_v: torch.Tensor | None = None
    open_live: torch.Tensor | None = None

    @property
    def precision(self) -> str:
        return "coded" if isinstance(self.k, CodedPool) else "full"


def _open(view: SlotsView) -> tuple:
    return view.open_k, view.open_v, view.open_live


BACKENDS = {
    "full": {
        "reference": lambda q, s, scale: decode_attention_reference(q, s.k, s.v, s.block_table, s.lens, scale),
        "sdpa": lambda q, s, scale: decode_attention_sdpa(q, s.k, s.v, s.block_table, s.lens, scale),
        "paged": lambda q, s, scale: decode_attention_paged(q, s.k, s.v, s.block_table, s.lens, scale, owned=s.owned),
        "flash": lambda q, s, scale: decode_attention_flash(q, s.k, s.v, s.block_table, s.lens, scale),
        "triton": lambda q, s, scale: decode_attention_triton(q, s.k, s.v, s.block_table, s.lens, scale),
        "cpu": lambda q, s, scale: decode_attention_cpu(q, s.k, s.v, s.block_table, s.lens, scale),
    },
    "coded": {
        "paged": lambda q, s, scale: decode_attention_quant_paged(q, s.k, s.v, s.block_table, s.lens, *_open(s),
                                                                  scale, owned=s.owned),
        "reference": lambda q, s, scale: decode_attention_quant_reference(q, s.k, s.v, s.block_table, s.lens,
                                                                          *_open(s), scale),
        "triton": lambda q, s, scale: decode_attention_quant_triton(q, s.k, s.v, s.block_table, s.lens, *_open(s),
                                                                    scale),
        "cpu": lambda q, s, scale: decode_attention_quant_cpu(q, s.k, s.v, s.block_table, s.lens, *_open(s), scale),
    },
}
# The precisions each method's cache can hold (a method without a coded store is refused in one line).
METHOD_PRECISIONS = {"dmc": ("full", "coded"), "dms": ("full", "coded")}


def _check_triton_runs_on(device: torch.device, method: str) -> None:
    """Triton kernels take CUDA tensors (or any, in its CPU interpreter): refuse other tensors in one line
    before a launch would fail deep inside Triton."""
    if not triton_available():
        raise RuntimeError(f"{method}_decode_backend='triton' needs the triton package and CUDA (or TRITON_INTERPRET=1)")
    if device.type != "cuda" and not triton_interpreting():
        raise RuntimeError(f"{method}_decode_backend='triton' runs on CUDA tensors, but the cache is on {device.type}: "
                           f"move the model to the GPU (model.to('cuda')) or use {method}_decode_backend='auto'")


def _auto(precision: str, device: torch.device, block_size: int, dtype: torch.dtype | None) -> str:
    """On CUDA: flash-attn when installed and the block size allows, else our Triton kernel (else SDPA); on CPU
    the C++ loop over the table for float32 slots or their codes where it builds (``DMC_CPU_KERNEL=0``: never), else
    the in-place paged path (the fastest measured there: ``bench/decode_compile.py``)."""
    if device.type != "cuda":
        native = dtype == torch.float32 and os.environ.get("DMC_CPU_KERNEL") != "0"
        return "cpu" if native and cpu_decode_available() else "paged"
    if precision == "coded":
        return "triton" if triton_available() else "paged"
    if flash_available() and block_size % 256 == 0:
        return "flash"
    return "triton" if triton_available() else "sdpa"


def resolve(method: str, backend: str, device: torch.device, block_size: int, kv_bits: int = 16,
            dtype: torch.dtype | None = None) -> str:
    """The backend that ``method``'s cache (slots of ``kv_bits``, ``dtype``) decodes with: ``backend`` itself,
    checked, or ``auto``'s choice."""
    precision = "coded" if kv_bits < 16 else "full"
    if precision not in METHOD_PRECISIONS[method]:
        raise ValueError(f"a {method.upper()} cache holds 16-bit slots only; use {method}_kv_bits=16")
    names = BACKENDS[precision]
    if backend != "auto" and backend not in names:
        raise ValueError(f"{method}_decode_backend={backend!r} has no path over a {kv_bits}-bit cache; use one of "
                         f"auto, {', '.join(names)}" + (f" (or {method}_kv_bits=16)" if precision == "coded" else ""))
    if backend == "triton":
        _check_triton_runs_on(device, method)
    if backend == "flash" and not flash_available():
        raise RuntimeError(f"{method}_decode_backend='flash' needs CUDA and the flash-attn package; use 'sdpa'")
    if backend == "cpu" and (device.type != "cpu" or dtype not in (None, torch.float32) or not cpu_decode_available()):
        raise RuntimeError(f"{method}_decode_backend='cpu' is a C++ loop over float32 slots (or their codes) on the CPU "
                           "(built with the "
                           f"machine's compiler); this cache is {dtype} on {device.type}: use {method}_decode_backend="
                           "'paged' (or 'auto')")
    return _auto(precision, device, block_size, dtype) if backend == "auto" else backend


def attend(backend: str, q: torch.Tensor, view: SlotsView, scale: float | None = None) -> torch.Tensor:
    """q (B, H, D) rotated, one query per sequence, over ``view``'s slots with a resolved ``backend`` -> (B, H, D)."""
    return BACKENDS[view.precision][backend](q, view, scale)
