"""Document sources: the Python standard library (offline), local files (jsonl/txt/parquet, globs), HF datasets.

Every source yields ``(doc_id, text)`` in a fixed, deterministic order. Empty documents and files that
are not UTF-8 are skipped and counted in ``stats``; nothing here raises on one bad document.
"""

from __future__ import annotations

import glob
import hashlib
import json
import sysconfig
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

KINDS = ("stdlib", "files", "hf")


class DataError(ValueError):
    """The data specification cannot be served; the message says what to change."""


@dataclass
class SourceSpec:
    """Where documents come from.

    kind: "stdlib" (Python's own .py files), "files" (``path`` glob of .jsonl/.json/.txt/.parquet),
      or "hf" (``path`` is a datasets name, streamed).
    split: "train" or "validation" (stdlib: a deterministic split by file; hf: the dataset split name).
    text_field: the text column of jsonl/parquet/hf records.
    validation_fraction: share held out for validation, by a stable hash: of the path for stdlib files, of the
      text for other documents (so a document is held out wherever it sits in any stream or shard).
    holdout: None (every document of ``split``), "exclude" (the training side: held-out documents are skipped)
      or "only" (the validation side). For stdlib, "exclude"/"only" are the train/validation file split.
    piece_chars: stdlib files are cut at line ends into pieces of at most this many characters, and the
      pieces are served in a hash-shuffled order. Alphabetical files would put long runs of near-identical
      generated code (``encodings/cp*.py`` charmap tables, ``test/``) next to each other, and a short run
      would learn to compress those instead of code in general.
    """

    kind: str = "stdlib"
    path: str | None = None
    split: str = "train"
    text_field: str = "text"
    name: str | None = None  # hf dataset config name
    validation_fraction: float = 0.05
    piece_chars: int = 4096
    holdout: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"data source kind={self.kind!r} is unknown; choose one of {', '.join(KINDS)}")
        if self.kind in ("files", "hf") and not self.path:
            raise DataError(f"data source kind={self.kind!r} needs a path (a glob of files or a dataset name)")
        if not 0 < self.validation_fraction < 1:
            raise DataError(f"validation_fraction={self.validation_fraction} must be in (0, 1)")
        if self.holdout not in (None, "exclude", "only"):
            raise DataError(f"holdout={self.holdout!r} must be None, 'exclude' or 'only'")
        if self.piece_chars < 256:
            raise DataError(f"piece_chars={self.piece_chars} is too small; use at least 256 characters")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _hash01(key: str) -> float:
    return int(hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:8], 16) / 0xFFFFFFFF


def held_out(key: str, fraction: float) -> bool:
    """Whether a stdlib file (key: its path) or a document (key: its text) is in the validation hold-out: a
    stable hash of the key below ``fraction``."""
    return _hash01(key) < fraction


def split_lines(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` at line ends into pieces of at most ``max_chars`` (a longer single line is cut inside)."""
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + max_chars)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        pieces.append(text[start:end])
        start = end
    return pieces


def _stdlib_pieces(spec: SourceSpec, stats: Counter) -> Iterator[tuple[str, str]]:
    root = stdlib_root()
    pieces = []
    split = {"exclude": "train", "only": "validation"}.get(spec.holdout, spec.split)
    for path in stdlib_files(split, spec.validation_fraction):
        rel = path.relative_to(root).as_posix()
        text = _read_text(path, stats)
        if text is not None and not text.strip():
            stats["skipped_empty"] += 1
            continue
        for n, piece in enumerate(split_lines(text or "", spec.piece_chars)):
            pieces.append((_hash01(f"order:{rel}#{n}"), f"{rel}#{n}", piece))
    pieces.sort()
    for _, doc_id, piece in pieces:
        yield from _nonempty(doc_id, piece, stats)


# Not code: Python's reference manual as a dict of English text, kept out of every stdlib split so that it can
# serve as an evaluation source no recipe trains on (``prose_documents``).
PROSE_FILE = "pydoc_data/topics.py"


def stdlib_files(split: str, fraction: float) -> list[Path]:
    root = stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/")) or rel == PROSE_FILE:
            continue
        if held_out(rel, fraction) == (split != "train"):
            files.append(path)
    return files


def prose_documents() -> Iterator[tuple[str, str]]:
    """English technical prose, offline and never trained on: the topics of Python's reference manual (the text
    behind ``help("if")``), one document per topic in name order."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise DataError("this Python has no pydoc_data (built without it); use --ppl-source files:GLOB") from None
    for name, text in sorted(topics.items()):
        if text.strip():
            yield f"pydoc:{name}", text


def _read_text(path: Path, stats: Counter) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        stats["skipped_not_utf8"] += 1
    except OSError:
        stats["skipped_unreadable"] += 1
    return None


def _file_records(path: Path, field: str, stats: Counter) -> Iterator[str | None]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        text = _read_text(path, stats)
        for n, line in enumerate((text or "").splitlines()):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                stats["skipped_bad_json"] += 1
                continue
            if not isinstance(record, dict) or field not in record:
                raise DataError(f"{path}:{n + 1}: record has no field {field!r}; set data.text_field")
            yield record[field] if isinstance(record[field], str) else None
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if field not in table.column_names:
            raise DataError(f"{path}: no column {field!r} (columns: {table.column_names}); set data.text_field")
        yield from table.column(field).to_pylist()
    else:
        yield _read_text(path, stats)


def open_stream(spec: SourceSpec, rank: int, world: int):
    """The rank's part of a streamed HF dataset (its own shards when their count divides ``world``)."""
    try:
        import datasets
        from datasets.distributed import split_dataset_by_node
    except ImportError as err:
        raise DataError("data kind 'hf' needs the datasets package: pip install 'dmc[train]'") from err

    try:
        ds = datasets.load_dataset(spec.path, spec.name, split=spec.split, streaming=True)
    except Exception as err:  # offline, unknown name, bad split: all surface here
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"cannot open HF dataset {spec.path!r} (config {spec.name!r}, split {spec.split!r}): {first}") \
            from None
    return split_dataset_by_node(ds, rank=rank, world_size=world) if world > 1 else ds


def documents(spec: SourceSpec, stats: Counter | None = None) -> Iterator[tuple[str, str]]:
    """Yield ``(doc_id, text)`` in a deterministic order; bad documents are skipped into ``stats``."""
    stats = Counter() if stats is None else stats
    if spec.kind == "stdlib":
        yield from _stdlib_pieces(spec, stats)
    elif spec.kind == "files":
        paths = sorted(glob.glob(spec.path, recursive=True))
        if not paths:
            raise DataError(f"data path {spec.path!r} matches no file; check the glob (e.g. 'corpus/**/*.jsonl')")
        for p in paths:
            for n, text in enumerate(_file_records(Path(p), spec.text_field, stats)):
                yield from _nonempty(f"{p}#{n}", text, stats, spec)
    else:
        for n, record in enumerate(open_stream(spec, 0, 1)):
            text = record.get(spec.text_field)
            yield from _nonempty(f"{spec.path}#{n}", text if isinstance(text, str) else None, stats, spec)


def keep_document(text: str | None, stats: Counter, spec: SourceSpec | None = None) -> bool:
    """Whether a document is served: not empty, and on ``spec.holdout``'s side of the hold-out; the reason for a
    skip is counted in ``stats``."""
    if text is None:
        return False
    if not text.strip():
        stats["skipped_empty"] += 1
        return False
    if spec is not None and spec.holdout and held_out(text, spec.validation_fraction) != (spec.holdout == "only"):
        stats["held_out" if spec.holdout == "exclude" else "not_held_out"] += 1
        return False
    stats["documents"] += 1
    return True


def _nonempty(doc_id: str, text: str | None, stats: Counter,
              spec: SourceSpec | None = None) -> Iterator[tuple[str, str]]:
    if keep_document(text, stats, spec):
        yield doc_id, text
