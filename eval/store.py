"""Per-item result cache: an interrupted evaluation continues where it stopped, and a finished one can be
assembled again from its items alone (``eval/assemble.py``), with no model present.

One JSON-lines file per (model, task, settings), the model keyed by its fingerprint (eval/fingerprint.py). Its
first line is a header saying what answered (fingerprint, the model's description without its local path, the
unit of a protocol it belongs to), which task and settings; each finished item is appended and flushed to disk
before the next starts. A line cut short by a crash is ignored on reading.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

LOCAL_FIELDS = ("path",)  # where this machine keeps the model: not part of what a committed item says


def digest(payload) -> str:
    """A short hash of an item's input (a block's token ids, a prompt): paired comparisons check that two
    methods' items of one id scored the same input."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


class ItemStore:
    def __init__(self, folder: str | Path, model, task: str, settings: dict):
        """``model``: the EvalModel answering; its fingerprint and the task settings make the key, its name
        the readable part of the file name."""
        keyed = {"model": model.fingerprint, "settings": settings}
        key = hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:12]
        self.path = Path(folder) / "items" / f"{model.name}.{task}.{key}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        described = {k: v for k, v in model.describe().items() if k not in LOCAL_FIELDS}
        self.header = {"name": model.name, "task": task, "settings": settings, "fingerprint": model.fingerprint,
                       "unit": getattr(model, "unit", None), "model": described}
        self.items: dict[str, dict] = {}
        if self.path.exists():
            self.items = read_items(self.path)[1]

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.items

    def get(self, item_id: str) -> dict:
        return self.items[item_id]

    def put(self, item_id: str, value: dict) -> None:
        self.items[item_id] = value
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a") as f:
            if new:
                f.write(json.dumps({"header": self.header}, sort_keys=True) + "\n")
            f.write(json.dumps({"id": item_id, "value": value}) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_items(path: Path) -> tuple[dict | None, dict[str, dict]]:
    """(header or None for a file written before headers, {item id: value}) of one store file."""
    header, items = None, {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # the torn last line of an interrupted run
        if "header" in rec:
            header = rec["header"]
        else:
            items[rec["id"]] = rec["value"]
    return header, items
