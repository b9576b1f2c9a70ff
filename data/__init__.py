"""Corpus sources, tokenising and packing into fixed-length blocks with a resumable position."""

from .packing import PackedBlocks, Position
from .sources import DataError, SourceSpec, documents, prose_documents

__all__ = ["DataError", "PackedBlocks", "Position", "SourceSpec", "documents", "prose_documents"]
