"""DMS configuration: the ``dms_llama`` model type, a Llama config with validated ``dms_*`` fields.

Bundled alone into an exported folder's configuration file (dmc/export.py): it imports nothing of the package.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from transformers import LlamaConfig

DMS_TRAIN_ATTENTION = ("auto", "sdpa", "flex", "reference")
DMS_DECODE_BACKENDS = ("auto", "paged", "cpu", "sdpa", "reference", "flash", "triton")
DMS_GATES = ("adapter", "channel")
DMS_KV_BITS = (16, 8, 4)  # the widths dmc/ops/kv_quant.py codes (its KV_BITS; a test holds them equal)


class DMSConfigError(ValueError):
    """A DMS setting is invalid; the message names the field and a valid value."""


@dataclass
class DMSConfig:
    """The DMS (delayed eviction) settings of a model, stored in its config as ``dms_<name>``.

    Args:
        enabled: Kill switch; false computes exactly a plain Llama with these weights (the gates are not read; with
            the channel gate, attention reads its channel again).
        target_cr: The compression ratio the model is (being) trained for (>= 1).
        window: The delay: a token marked for eviction stays visible to the next window tokens, then leaves the
            cache (512 in the released recipe; short windows let short blocks reach a CR).
        tau: Temperature of the relaxed (logistic-noise) decisions in training.
        gate: Where a decision comes from: adapter, a zero-initialised RMSNorm + linear map per layer on the
            layer's input (the released recipe: nothing is evicted at initialisation); or channel, the paper's
            repurposed query channel: the last channel of each KV group's first query head (pre-RoPE), which
            attention then no longer reads, so a recipe fades it out first (stage 1) and trains every weight.
        gate_scale: The eviction logit is gate_scale * gate(x) - gate_offset (100 released).
        gate_offset: See gate_scale (5 released: a zero gate gives -5 everywhere, no eviction).
        train_attention: The training/evaluation attention kernel: auto, sdpa, flex or reference.
        decode_backend: Cached-decoding attention over the held slots: auto, paged, cpu (a C++ loop, float32 on
            the CPU), sdpa, reference, flash or triton.
        block_size: Slots per block of the paged cache (blocks are allocated on demand).
        kv_bits: Bits per cached key/value element: 16 keeps the model's dtype; 8 or 4 store every slot as
            group-wise integer codes, and every query (prompt, chunk or decoding step) sees each key and value, its
            own included, as its codes give it back.
        kv_group: Channels per quantisation group (one scale and minimum each), a divisor of head_dim; null: the
            width's default (32 at int8, 16 at int4).
    """

    enabled: bool = True
    target_cr: float = 4.0
    window: int = 512
    tau: float = 0.1
    gate: str = "adapter"
    gate_scale: float = 100.0
    gate_offset: float = 5.0
    train_attention: str = "auto"
    decode_backend: str = "auto"
    block_size: int = 16
    kv_bits: int = 16
    kv_group: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> DMSConfigError:
            return DMSConfigError(f"dms_{name}={getattr(self, name)!r} is invalid: {why}")

        if not isinstance(self.enabled, bool):
            raise bad("enabled", "use true or false")
        if not isinstance(self.target_cr, (int, float)) or isinstance(self.target_cr, bool) or not self.target_cr >= 1:
            raise bad("target_cr", "a compression ratio must be >= 1 (e.g. 2, 4 or 8)")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise bad("window", "the eviction delay must be >= 1 token (a decision is made by the next token, so "
                      "the token before it is always visible); e.g. 16, 64 or 512")
        if not isinstance(self.tau, (int, float)) or not self.tau > 0:
            raise bad("tau", "the temperature must be > 0 (0.1 released)")
        if self.gate not in DMS_GATES:
            raise bad("gate", f"choose one of {', '.join(DMS_GATES)}")
        if not isinstance(self.gate_scale, (int, float)) or not self.gate_scale > 0:
            raise bad("gate_scale", "must be > 0 (100 released)")
        if not isinstance(self.gate_offset, (int, float)):
            raise bad("gate_offset", "use a number (5 released: a zero gate evicts nothing)")
        if self.train_attention not in DMS_TRAIN_ATTENTION:
            raise bad("train_attention", f"choose one of {', '.join(DMS_TRAIN_ATTENTION)}")
        if self.decode_backend not in DMS_DECODE_BACKENDS:
            raise bad("decode_backend", f"choose one of {', '.join(DMS_DECODE_BACKENDS)}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise bad("block_size", "use a positive number of slots per block (e.g. 16)")
        if self.kv_bits not in DMS_KV_BITS:
            raise bad("kv_bits", f"choose one of {', '.join(map(str, DMS_KV_BITS))} (16: not quantised)")
        if self.kv_group is not None and (not isinstance(self.kv_group, int) or self.kv_group < 1):
            raise bad("kv_group", "use a positive number of channels per quantisation group (e.g. 16 or 32), or null "
                      "for the width's default")

    def to_prefixed(self) -> dict:
        return {f"dms_{k}": v for k, v in asdict(self).items()}

    @classmethod
    def from_prefixed(cls, source) -> DMSConfig:
        get = source.get if isinstance(source, dict) else lambda k, d: getattr(source, k, d)
        return cls(**{f.name: get(f"dms_{f.name}", f.default) for f in fields(cls)})


class DMSLlamaConfig(LlamaConfig):
    """A Llama config plus the ``dms_*`` fields of :class:`DMSConfig` (model type ``dms_llama``)."""

    model_type = "dms_llama"

    def __init__(self, **kwargs):
        dms_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("dms_")}
        unknown = sorted(set(dms_kwargs) - {f"dms_{f.name}" for f in fields(DMSConfig)})
        if unknown:
            valid = ", ".join(f"dms_{f.name}" for f in fields(DMSConfig))
            raise DMSConfigError(f"unknown DMS config field(s) {unknown}; valid fields: {valid}")
        super().__init__(**kwargs)
        for key, value in DMSConfig.from_prefixed(dms_kwargs).to_prefixed().items():
            setattr(self, key, value)
        if self.num_attention_heads % self.num_key_value_heads:
            raise DMSConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; DMS needs whole query groups per KV head")

    @property
    def dms(self) -> DMSConfig:
        return DMSConfig.from_prefixed(self)
