"""The learned compression methods by model type: the one table the evaluation, serving and benchmark code ask
"does this model compress its cache, and with which cache?".

Not part of the exported modeling bundle (a folder needs only its own method's classes).
"""

from __future__ import annotations

from dataclasses import dataclass

from .cache import DMCCache
from .dms_cache import DMSCache


@dataclass(frozen=True)
class Method:
    name: str  # "dmc", "dms": recipes' model.method, checkpoints' record
    label: str  # "DMC", "DMS": in messages and tables
    cache_class: type
    switch: str  # the config field that turns the method on and off

    def enabled(self, config) -> bool:
        return bool(getattr(config, self.switch, False))

    def field(self, name: str) -> str:
        """The config field holding this method's setting ``name`` (``kv_bits`` -> ``dmc_kv_bits``)."""
        return f"{self.name}_{name}"


METHODS = {
    "dmc_llama": Method("dmc", "DMC", DMCCache, "dmc_enabled"),
    "dms_llama": Method("dms", "DMS", DMSCache, "dms_enabled"),
}


def method_of(config) -> Method | None:
    """The learned method a config runs, or None: a vanilla Llama, or a method's model with the method switched off
    (then it is exactly the vanilla Llama)."""
    method = METHODS.get(getattr(config, "model_type", None))
    return method if method is not None and method.enabled(config) else None


def is_compressed(config) -> bool:
    """Whether a config runs a learned compressed cache (DMC or DMS, enabled)."""
    return method_of(config) is not None


def new_cache(config, **kwargs):
    """A fresh cache of the config's method (``kwargs``: the cache's own, e.g. ``block_size``)."""
    method = method_of(config)
    if method is None:
        raise ValueError(f"a {getattr(config, 'model_type', '?')!r} model with no learned method enabled has no "
                         "compressed cache")
    return method.cache_class(config, **kwargs)
