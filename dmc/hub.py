"""Model sources: a local HF folder or a Hugging Face Hub id, resolved the way ``from_pretrained`` resolves them
(the local cache first; with ``HF_HUB_OFFLINE=1`` the cache only), with one-line errors saying what to do."""

from __future__ import annotations

import re
from pathlib import Path

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelSourceError(ValueError):
    """A model or tokenizer cannot be found locally or on the Hub; the message says what to do."""


def looks_like_hub_id(source: str) -> bool:
    return bool(REPO_ID.match(str(source))) and not Path(source).exists()


def _unreachable(what: str, source: str, err: Exception) -> ModelSourceError:
    path = Path(source)
    if path.exists():
        return ModelSourceError(f"{what}={source!r} is a local path without a HF model config.json; point it at a "
                                "folder written by save_pretrained, `dmc export` or `make model`")
    if not looks_like_hub_id(source):
        return ModelSourceError(f"{what}={source!r} does not exist; pass a local HF folder or a Hub id (ORG/NAME)")
    reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
    return ModelSourceError(
        f"{what}={source!r} is not on this machine and the Hub cannot be reached for it ({reason}); "
        f"download it first (`hf download {source}`; `hf auth login` for gated models) or pass a local folder")


def model_config(source: str | Path, what: str = "model"):
    """The ``AutoConfig`` of a local folder or Hub id, or a :class:`ModelSourceError`."""
    from transformers import AutoConfig

    from . import dms_modeling, modeling  # noqa: F401  (register dmc_llama and dms_llama with the Auto classes)

    try:
        return AutoConfig.from_pretrained(str(source))
    except (OSError, ValueError) as err:
        raise _unreachable(what, str(source), err) from None


def check_tokenizer(source: str | Path, what: str = "tokenizer") -> None:
    """Raise a :class:`ModelSourceError` unless a tokenizer loads from ``source`` (folder or Hub id)."""
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as err:
        raise _unreachable(what, str(source), err) from None
