"""Per-item result cache: an interrupted evaluation continues where it stopped.

One JSON-lines file per (model, task, settings), the model keyed by its fingerprint (eval/fingerprint.py);
each finished item is appended and flushed to disk before the next starts. A line cut short by a crash is ignored on reading.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


class ItemStore:
    def __init__(self, folder: str | Path, model, task: str, settings: dict):
        """``model``: the EvalModel answering; its fingerprint and the task settings make the key, its name
        the readable part of the file name."""
        keyed = {"model": model.fingerprint, "settings": settings}
        key = hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:12]
        self.path = Path(folder) / "items" / f"{model.name}.{task}.{key}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.items: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the torn last line of an interrupted run
                self.items[rec["id"]] = rec["value"]

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.items

    def get(self, item_id: str) -> dict:
        return self.items[item_id]

    def put(self, item_id: str, value: dict) -> None:
        self.items[item_id] = value
        with open(self.path, "a") as f:
            f.write(json.dumps({"id": item_id, "value": value}) + "\n")
            f.flush()
            os.fsync(f.fileno())
