"""Publish a model folder or a text dataset into a local Hugging Face cache under a Hub id.

With ``HF_HOME`` pointing at that cache and ``HF_HUB_OFFLINE=1``, ``from_pretrained("ORG/NAME")`` and
``load_dataset("ORG/NAME", CONFIG, streaming=True)`` resolve the id from the cache exactly as they do for a user
who downloaded it once: the model as a hub snapshot (``hub/models--ORG--NAME/snapshots/<rev>`` with
``refs/main``), the dataset as the prepared Arrow cache ``datasets`` falls back to offline
(``datasets/ORG___NAME/<config>/0.0.0/<hash>``). The rehearsal and the tests use it to run recipes that name
``meta-llama/...`` and ``HuggingFaceFW/...`` on a machine with neither.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path


def _revision(repo_id: str) -> str:
    return hashlib.sha1(f"dmc-published:{repo_id}".encode()).hexdigest()  # 40 hex digits, like a commit


def publish_model(folder: str | Path, repo_id: str, hf_home: str | Path) -> Path:
    """Copy a HF model folder into ``hf_home``'s hub cache as ``repo_id``; returns the snapshot folder."""
    repo = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / _revision(repo_id)
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(_revision(repo_id))
    return snapshot


def publish_dataset(texts: Iterable[str] | dict[str, Iterable[str]], repo_id: str, hf_home: str | Path,
                    config_name: str | None = None, split: str = "train", shards: int = 4,
                    text_field: str = "text") -> Path:
    """Write ``texts`` (or ``{split: texts}``) as dataset ``repo_id`` (config ``config_name``) in ``hf_home``'s
    datasets cache, each split in ``shards`` Arrow files so that ranks and DataLoader workers stream their own."""
    import datasets
    from datasets.packaged_modules.parquet.parquet import Parquet

    splits = {k: list(v) for k, v in texts.items()} if isinstance(texts, dict) else {split: list(texts)}
    config = config_name or "default"
    cache = Path(hf_home) / "datasets"
    final = cache / "___".join(repo_id.split("/")) / config
    cache.mkdir(parents=True, exist_ok=True)
    with _quiet(datasets), tempfile.TemporaryDirectory(dir=cache) as tmp:
        data_files = {}
        for name, rows in splits.items():
            ids = [f"{repo_id}:{name}#{i}" for i in range(len(rows))]
            table = datasets.Dataset.from_dict({text_field: rows, "id": ids})
            data_files[name] = [str(Path(tmp) / f"{name}-{s:05d}.parquet") for s in range(shards)]
            for s, file in enumerate(data_files[name]):
                table.shard(shards, s, contiguous=True).to_parquet(file)
        builder = Parquet(data_files=data_files, cache_dir=str(Path(tmp) / "prepared"),
                          dataset_name=repo_id.split("/")[-1], config_name=config, hash=_revision(repo_id)[:16])
        builder.download_and_prepare(num_proc=shards if shards > 1 else None)  # one Arrow file per input file
        prepared = Path(builder.cache_dir)
        info = json.loads((prepared / "dataset_info.json").read_text())
        info["config_name"] = config  # the builder's id carries a hash of the data files; the cache keys by name
        (prepared / "dataset_info.json").write_text(json.dumps(info))
        shutil.rmtree(final, ignore_errors=True)
        (final / "0.0.0").mkdir(parents=True)
        shutil.move(str(prepared), str(final / "0.0.0" / prepared.name))
    return final


@contextmanager
def _quiet(datasets):
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if bars:
            datasets.enable_progress_bars()
