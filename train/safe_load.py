"""Reading training checkpoints without running code from them.

A checkpoint is a pickle: ``torch.load(weights_only=False)`` of a file someone sent you runs whatever it
names. Ours are read with ``weights_only=True`` (tensors, plain containers, numbers, strings) plus the few
DeepSpeed types its optimizer shards hold; anything else is refused with one line, unless the user passes
``--trust-checkpoint``. DeepSpeed loads its own shards on resume and export, so a DeepSpeed folder is
checked file by file first, with the same rule.
"""

from __future__ import annotations

import importlib
import re
from contextlib import contextmanager
from pathlib import Path

import torch

# Non-tensor types our own checkpoints hold (found by loading ZeRO-2 and ZeRO-3 runs with weights_only=True).
ALLOWED = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
TRUST_HINT = "pass --trust-checkpoint if you trust where it came from"


class UntrustedCheckpoint(ValueError):
    """The checkpoint names a Python object outside the allow-list; loading it could run code."""


def allowed_globals() -> list:
    """The allow-list's objects that can be imported here (without DeepSpeed, its types cannot occur)."""
    found = []
    for name in ALLOWED:
        module, attr = name.rsplit(".", 1)
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            continue
    return found


@contextmanager
def allowed():
    """Inside: ``torch.load(weights_only=True)`` (Lightning's too) accepts the allow-list."""
    with torch.serialization.safe_globals(allowed_globals()):
        yield


def load(path: str | Path, trust: bool = False, mmap: bool = False):
    """``torch.load`` on CPU; refused with ``UntrustedCheckpoint`` when it needs more than the allow-list.
    ``mmap``: tensors stay on disk until touched (a check reads only the pickle, not the weights)."""
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with allowed():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises UnpicklingError (or RuntimeError) naming the global
        names = re.findall(r"GLOBAL ([\w.]+)", str(err))
        if not names and "Weights only load failed" not in str(err):
            raise
        what = names[0] if names else "an object outside the allow-list"
        raise UntrustedCheckpoint(f"{path} holds a pickled {what}, which loading would run as code; "
                                  f"{TRUST_HINT}") from None


def check(path: str | Path, trust: bool = False) -> None:
    """Refuse a checkpoint file or DeepSpeed folder any of whose files needs more than the allow-list."""
    if trust:
        return
    p = Path(path)
    for file in sorted(p.rglob("*.pt")) if p.is_dir() else [p]:
        load(file, mmap=True)
