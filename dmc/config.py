"""DMC configuration: the ``dmc_llama`` model type, a Llama config with validated ``dmc_*`` fields."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from transformers import LlamaConfig

TRAIN_ATTENTION_BACKENDS = ("auto", "flex", "sdpa", "triton", "reference")
DECODE_BACKENDS = ("auto", "paged", "cpu", "sdpa", "reference", "flash", "triton")
# the widths dmc/ops/kv_quant.py codes (its KV_BITS; a test holds them equal): this module is bundled alone
# into an export's configuration file, so it imports nothing of the package
KV_BITS = (16, 8, 4)
DMC_GATES = ("channel", "adapter")


class DMCConfigError(ValueError):
    """A DMC setting is invalid; the message names the field and a valid value."""


@dataclass
class DMCConfig:
    """The DMC settings of a model (stored in its config as ``dmc_<name>``).

    enabled: kill switch; False computes exactly the vanilla Llama.
    target_cr: compression ratio the model is (being) trained for (>= 1).
    window: merge accumulation window in tokens (12 in the reference); 0 or None = unbounded.
    tau: Gumbel-sigmoid temperature during training.
    logit_offset: merge logit is ``k[c] - logit_offset`` (5 in the reference).
    weight_offset: importance is ``sigmoid(mean_group(q[c]) + weight_offset) + weight_eps``.
    weight_eps: keeps importance weights away from 0.
    channel: head channel repurposed for decisions; -1 = last (head_dim - 1), as in the reference.
    gate: where alpha and omega come from: "channel" (the paper's: channel ``channel`` of the pre-RoPE k and
        q, which attention then no longer reads, so a recipe fades it out first) or "adapter" (a zero-initialised
        linear map per layer on the attention input, one logit and one weight per KV head; q and k keep every
        channel, so at initialisation nothing merges and the model is the vanilla Llama).
    gate_scale: adapter only: logit = gate_scale * a(x) - logit_offset, omega = sigmoid(gate_scale * b(x) +
        weight_offset) + weight_eps (100, as DMS's released gate: it lets Adam at a base learning rate move the
        decisions within tens of steps).
    train_attention: training-time attention kernel ("auto", "flex", "sdpa", "triton": CUDA only, "reference").
    decode_backend: cached-decoding attention ("auto", "paged", "cpu": a C++ loop, float32 on the CPU, "sdpa",
        "reference", "flash", "triton").
    block_size: slots per cache block (the paged cache allocates blocks on demand).
    kv_bits: bits per cached key/value element: 16 keeps the model's dtype; 8 or 4 store closed slots as
        group-wise integer codes (the open slot, which merges still write, stays in full precision).
    kv_group: channels per quantisation group (one scale and minimum each); a divisor of head_dim. None: the
        width's default (32 at int8, 16 at int4: ``dmc/ops/kv_quant.py``'s DEFAULT_GROUP).
    """

    enabled: bool = True
    target_cr: float = 4.0
    window: int | None = 12
    tau: float = 0.1
    logit_offset: float = 5.0
    weight_offset: float = 5.0
    weight_eps: float = 2.0**-7
    channel: int = -1
    gate: str = "channel"
    gate_scale: float = 100.0
    train_attention: str = "auto"
    decode_backend: str = "auto"
    block_size: int = 16
    kv_bits: int = 16
    kv_group: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, head_dim: int | None = None) -> None:
        def bad(name: str, why: str) -> DMCConfigError:
            return DMCConfigError(f"dmc_{name}={getattr(self, name)!r} is invalid: {why}")

        if not isinstance(self.enabled, bool):
            raise bad("enabled", "use true or false")
        if not isinstance(self.target_cr, (int, float)) or not self.target_cr >= 1.0:
            raise bad("target_cr", "a compression ratio must be >= 1 (e.g. 2, 4 or 8)")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 0):
            raise bad("window", "use a positive number of tokens (12 in the paper), or 0/None for unbounded")
        if not isinstance(self.tau, (int, float)) or not self.tau > 0:
            raise bad("tau", "the Gumbel-sigmoid temperature must be > 0 (0.1 in the paper)")
        if not isinstance(self.weight_eps, (int, float)) or not self.weight_eps > 0:
            raise bad("weight_eps", "must be > 0 so that merge weights never vanish (2**-7 by default)")
        if self.train_attention not in TRAIN_ATTENTION_BACKENDS:
            raise bad("train_attention", f"choose one of {', '.join(TRAIN_ATTENTION_BACKENDS)}")
        if self.decode_backend not in DECODE_BACKENDS:
            raise bad("decode_backend", f"choose one of {', '.join(DECODE_BACKENDS)}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise bad("block_size", "use a positive number of slots per block (e.g. 16)")
        if self.kv_bits not in KV_BITS:
            raise bad("kv_bits", f"choose one of {', '.join(map(str, KV_BITS))} (16: not quantised)")
        if self.kv_group is not None and (not isinstance(self.kv_group, int) or self.kv_group < 1):
            raise bad("kv_group", "use a positive number of channels per quantisation group (e.g. 16 or 32), or null for "
                      "the width's default")
        if self.gate not in DMC_GATES:
            raise bad("gate", f"choose one of {', '.join(DMC_GATES)}")
        if not isinstance(self.gate_scale, (int, float)) or isinstance(self.gate_scale, bool) or not self.gate_scale > 0:
            raise bad("gate_scale", "must be > 0 (100 by default)")
        if not isinstance(self.channel, int):
            raise bad("channel", "use a channel index such as -1 (the last channel)")
        if head_dim is not None:
            if head_dim < 4 or head_dim % 2:
                raise DMCConfigError(
                    f"head_dim={head_dim} cannot host a DMC decision channel: it needs an even head_dim >= 4 "
                    "(one channel is repurposed, the rest keep RoPE pairs); use a model with larger heads"
                )
            if not -head_dim <= self.channel < head_dim:
                raise bad("channel", f"must index a head channel in [-{head_dim}, {head_dim - 1}]")
            if self.kv_group is not None and head_dim % min(self.kv_group, head_dim):
                raise bad("kv_group", f"must divide head_dim={head_dim} (e.g. 32 or {head_dim})")

    @property
    def unbounded(self) -> bool:
        return not self.window

    def to_prefixed(self) -> dict:
        return {f"dmc_{k}": v for k, v in asdict(self).items()}

    @classmethod
    def from_prefixed(cls, source) -> DMCConfig:
        get = source.get if isinstance(source, dict) else lambda k, d: getattr(source, k, d)
        return cls(**{f.name: get(f"dmc_{f.name}", f.default) for f in fields(cls)})


class DMCLlamaConfig(LlamaConfig):
    """A Llama config plus the ``dmc_*`` fields of :class:`DMCConfig` (model type ``dmc_llama``)."""

    model_type = "dmc_llama"

    def __init__(self, **kwargs):
        dmc_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("dmc_")}
        unknown = sorted(set(dmc_kwargs) - {f"dmc_{f.name}" for f in fields(DMCConfig)})
        if unknown:
            valid = ", ".join(f"dmc_{f.name}" for f in fields(DMCConfig))
            raise DMCConfigError(f"unknown DMC config field(s) {unknown}; valid fields: {valid}")
        super().__init__(**kwargs)
        dmc = DMCConfig.from_prefixed(dmc_kwargs)
        for key, value in dmc.to_prefixed().items():
            setattr(self, key, value)
        self.validate_dmc()

    @property
    def dmc(self) -> DMCConfig:
        return DMCConfig.from_prefixed(self)

    def to_dict(self) -> dict:
        out = super().to_dict()
        if out.get("dmc_gate") == "channel":
            # the channel gate's config reads as it did before the adapter existed (the gate fields are defaults
            # it does not use): the fingerprints of its committed evaluations and its folders' digests hold
            out.pop("dmc_gate", None)
            out.pop("dmc_gate_scale", None)
        return out

    @property
    def dmc_head_dim(self) -> int:
        return getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads

    @property
    def dmc_channel_index(self) -> int:
        return self.dmc_channel % self.dmc_head_dim

    def validate_dmc(self) -> None:
        self.dmc.validate(head_dim=self.dmc_head_dim)
        if self.num_attention_heads % self.num_key_value_heads:
            raise DMCConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; DMC needs whole query groups per KV head"
            )
