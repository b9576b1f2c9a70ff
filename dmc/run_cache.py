"""The run cache: where trained checkpoints and their exports live between sessions, outside any checkout.

A checkout may be laid anew (a fresh clone, a CI machine) while the home folder survives, so long trainings
(``dmc compare --protocol``'s units, ``make demo``) keep their runs here and the next run on the same machine
continues a training or reuses its export. One location: ``$DMC_RUN_CACHE`` if set, else
``$XDG_CACHE_HOME/dmc/runs`` (``~/.cache/dmc/runs``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

ENV = "DMC_RUN_CACHE"


class RunCacheError(OSError):
    """The run cache cannot be used; the message says how to fix it."""


def run_cache() -> Path:
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "dmc" / "runs"


def writable_run_cache() -> Path:
    """The run cache, created if missing and checked writable before any long job starts writing into it."""
    root = run_cache()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise RunCacheError(f"the run cache {root} is not writable ({reason}): set {ENV} to a writable folder, "
                            f"e.g. {ENV}=/tmp/dmc-runs") from None
    return root
