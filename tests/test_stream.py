"""Streamed HF data at scale: a dataset published under a Hub id into a temporary cache and read offline the way
`datasets` reads it for a user; per-rank shards, chunked shuffle, hold-out, exact resume from the saved state."""

import json
import random
from itertools import islice

import pytest

pytest.importorskip("datasets")

from dmc.data import DataError  # noqa: E402
from dmc.data.sources import SourceSpec, documents, held_out  # noqa: E402
from dmc.data.stream import StreamedBlocks, StreamPosition  # noqa: E402
from tests.helpers import SMOLLM2, publish_offline_dataset  # noqa: E402

pytestmark = pytest.mark.skipif(not (SMOLLM2 / "config.json").exists(), reason="run `make model` first")
REPO, CONFIG = "HuggingFaceFW/fineweb", "sample-100BT"


def corpus(n: int, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    return [" ".join(f"w{r.randint(0, 999)}" for _ in range(r.randint(3, 30))) + f" doc{i}" for i in range(n)]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    return publish_offline_dataset(tmp_path, monkeypatch, corpus(240), REPO, CONFIG)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMOLLM2)


def _spec(**kw):
    return SourceSpec(kind="hf", path=REPO, name=CONFIG, split="train", validation_fraction=0.1, **kw)


def _blocks(tok, **kw):
    return StreamedBlocks(_spec(holdout="exclude"), tok, 16, chunk=kw.pop("chunk", 7), seed=1, **kw)


def test_resume_from_a_saved_state_is_exact_across_chunks_and_epochs(hub, tok):
    full = [b.tolist() for b, _ in islice(_blocks(tok), 1200)]  # about two epochs of the 240 documents
    epochs = [p.epoch for _, p in islice(_blocks(tok), 1200)]
    assert epochs[-1] >= 1, "the test should cross an epoch"
    for cut in (1, 8, 301, len(full) - 300):
        head = list(islice(_blocks(tok), cut))
        position = StreamPosition.from_dict(json.loads(json.dumps(head[-1][1].to_dict())))  # through a checkpoint
        rest = [b.tolist() for b, _ in islice(_blocks(tok, start=position), len(full) - cut)]
        assert [b.tolist() for b, _ in head] + rest == full, f"resumed after block {cut}"


def test_resume_rereads_at_most_one_chunk(hub, tok):
    late = list(islice(_blocks(tok, chunk=10), 400))[-1][1]
    resumed = _blocks(tok, chunk=10, start=late)
    next(iter(resumed))
    assert resumed.stats["documents"] + resumed.stats["held_out"] <= 10


def test_streams_read_disjoint_shards_and_skip_the_holdout(hub, tok):
    seen = []
    for stream in range(2):
        blocks = _blocks(tok, stream=stream, streams=2, shuffle=False, chunk=500)
        seen.append({tuple(b.tolist()) for b, p in islice(blocks, 10_000) if p.epoch == 0})
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    training = [t for _, t in documents(_spec(holdout="exclude"))]
    validation = [t for _, t in documents(_spec(holdout="only"))]
    assert validation and not set(training) & set(validation)
    assert sorted(training + validation) == sorted(corpus(240))
    assert all(held_out(t, 0.1) for t in validation)


def test_shuffle_changes_the_order_and_is_seeded(hub, tok):
    plain = [b.tolist() for b, _ in islice(_blocks(tok, shuffle=False), 50)]
    shuffled = [b.tolist() for b, _ in islice(_blocks(tok), 50)]
    assert shuffled != plain and shuffled == [b.tolist() for b, _ in islice(_blocks(tok), 50)]


def test_a_missing_dataset_or_column_is_one_line(hub, tok):
    with pytest.raises(DataError, match="cannot open HF dataset 'nobody/nothing'"):
        next(iter(StreamedBlocks(SourceSpec(kind="hf", path="nobody/nothing"), tok, 16)))
    with pytest.raises(DataError, match="no column 'body'.*set data.text_field"):
        next(iter(StreamedBlocks(_spec(text_field="body"), tok, 16)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.helpers import write_tiny_checkpoint

    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama"))


@pytest.mark.parametrize("workers", [0, 2])
def test_training_on_a_stream_stops_and_resumes_exactly(hub, tiny, tmp_path, workers):
    pytest.importorskip("lightning")
    from tests.helpers import logged, tiny_train

    stream = ["--data.kind", "hf", "--data.path", REPO, "--data.name", CONFIG, "--data.shuffle_buffer", "20",
              "--data.num_workers", str(workers), "--data.validation_fraction", "0.1"]
    tiny_train(tiny, tmp_path / "a", *stream)
    tiny_train(tiny, tmp_path / "b", *stream, "--stop_at", "3")
    tiny_train(tiny, tmp_path / "b", *stream)
    a, b = (logged(tmp_path / run, "train/lm_loss") for run in ("a", "b"))
    assert sorted(a) == list(range(8)) and a == b
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["validation"]["step"] == 8 and summary["validation"]["tokens"] > 0
