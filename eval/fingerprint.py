"""What an evaluated model is, as a short hash: the item store keys every stored answer by it, so answers of
one model are never served for another (two folders named ``hf``, a retrained checkpoint in the same
folder, another dtype, device, decode backend or cache policy)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
EDGE = 1 << 20  # bytes hashed at each end of a weight file
# config fields that say where or by which library a folder was read, not what the model is: a copy of a folder
# elsewhere (another machine's run cache) must answer to the same fingerprint, so committed answers are reused
PLACE_FIELDS = ("transformers_version", "_commit_hash", "_name_or_path", "_model_name_or_path")


def _file_digest(path: Path) -> str:
    """Size plus a hash of the first and last MiB: weights that changed change both ends (the safetensors
    header and the first and last tensors' data), at a cost independent of the model's size."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(EDGE))
        if size > EDGE:
            f.seek(max(EDGE, size - EDGE))
            h.update(f.read(EDGE))
    return h.hexdigest()


def model_fingerprint(path: str | Path, config, dtype, device, policy: str | None, kv_bits: int = 16,
                      kv_group: int | None = None) -> str:
    """A 16-hex-digit hash of the model's config, its weight files (a local folder) or Hub revision (an id),
    and how it runs: dtype, device type, cache policy, cache precision (the decode backend is part of the config)."""
    folder = Path(path)
    if folder.is_dir():
        weights = {p.name: _file_digest(p) for p in sorted(folder.iterdir()) if p.name.endswith(WEIGHT_SUFFIXES)}
    else:  # a Hub id: from_pretrained recorded the commit it resolved
        weights = {"revision": getattr(config, "_commit_hash", None) or str(path)}
    settings = {k: v for k, v in config.to_dict().items() if k not in PLACE_FIELDS}
    record = {"config": settings, "weights": weights, "dtype": str(dtype), "device": str(device).split(":")[0],
              "policy": policy, **({"kv_bits": kv_bits} if kv_bits != 16 else {}),  # 16: the hashes stored before
              **({"kv_group": kv_group} if kv_bits != 16 else {})}  # the group a coded cache ran with
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def folder_digest(path: str | Path) -> str | None:
    """A 16-hex-digit hash of a local model folder as it lies on disk (config.json and the weight files), without
    loading it; None where the folder is absent. A protocol compares it with the one its items recorded, to tell
    a folder that changed (retrained, not reproduced) from the one its committed answers came from."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        return None
    files = {p.name: _file_digest(p) for p in sorted(folder.iterdir()) if p.name.endswith(WEIGHT_SUFFIXES)}
    config = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if k not in PLACE_FIELDS}
    files["config.json"] = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
