import json
from collections import Counter
from itertools import islice

import pytest
from transformers import AutoTokenizer

from dmc.data import DataError, PackedBlocks, Position, SourceSpec, documents
from dmc.data.sources import stdlib_files
from tests.helpers import SMOLLM2

pytestmark = pytest.mark.skipif(not (SMOLLM2 / "config.json").exists(), reason="run `make model` first")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(SMOLLM2)


def test_stdlib_split_is_deterministic_and_disjoint():
    train, val = stdlib_files("train", 0.05), stdlib_files("validation", 0.05)
    assert len(val) > 20 and len(train) > 10 * len(val)
    assert not set(train) & set(val)
    assert train == stdlib_files("train", 0.05)


def test_local_files_jsonl_txt_and_bad_documents(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "alpha"}) + "\n" + json.dumps({"text": "   "}) + "\n{broken\n" + json.dumps({"text": "beta"}) + "\n"
    )
    (tmp_path / "b.txt").write_text("gamma")
    (tmp_path / "c.txt").write_bytes(b"\xff\xfe not utf-8 \x80")
    stats = Counter()
    docs = list(documents(SourceSpec(kind="files", path=str(tmp_path / "*")), stats))
    assert [t for _, t in docs] == ["alpha", "beta", "gamma"]
    assert stats == Counter(documents=3, skipped_empty=1, skipped_bad_json=1, skipped_not_utf8=1)


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["one", "two"]}), tmp_path / "x.parquet")
    docs = documents(SourceSpec(kind="files", path=str(tmp_path / "*.parquet"), text_field="content"))
    assert [t for _, t in docs] == ["one", "two"]


def test_bad_specs_have_clear_errors(tmp_path):
    with pytest.raises(DataError, match="matches no file"):
        list(documents(SourceSpec(kind="files", path=str(tmp_path / "nothing*.jsonl"))))
    with pytest.raises(DataError, match="unknown; choose one of stdlib, files, hf"):
        SourceSpec(kind="s3")
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="no field 'text'; set data.text_field"):
        list(documents(SourceSpec(kind="files", path=str(tmp_path / "x.jsonl"))))


def _stream(tok, texts, **kw):
    return PackedBlocks(lambda: iter([(str(i), t) for i, t in enumerate(texts)]), tok, 8, **kw)


def test_packing_puts_eos_between_documents(tok):
    texts = ["def f(x):\n    return x\n", "class A:\n    pass\n", "import os\n" * 5]
    blocks = [b for b, _ in _stream(tok, texts)]
    flat = sum((b.tolist() for b in blocks), [])
    expected = sum((tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts), [])
    assert flat == expected[: len(flat)] and len(expected) - len(flat) < 8


def test_resume_from_any_position_continues_exactly(tok):
    texts = [f"def f{i}(x):\n    return x * {i}\n" for i in range(40)]
    full = [b.tolist() for b, _ in _stream(tok, texts)]
    for cut in (1, 5, 13):
        head = list(islice(_stream(tok, texts), cut))
        pos = Position.from_dict(json.loads(json.dumps(head[-1][1].to_dict())))  # survives a checkpoint
        rest = [b.tolist() for b, _ in _stream(tok, texts, start=pos)]
        assert [b.tolist() for b, _ in head] + rest == full


def test_ranks_share_one_order_without_overlap(tok):
    texts = [f"x = {i}\n" * 7 for i in range(30)]
    full = [b.tolist() for b, _ in _stream(tok, texts)]
    r0 = list(_stream(tok, texts, rank=0, world_size=2))
    r1 = list(_stream(tok, texts, rank=1, world_size=2))
    interleaved = [b.tolist() for pair in zip(r0, r1) for b, _ in pair]
    assert interleaved == full[: len(interleaved)]
    assert [p.to_dict() for _, p in r0] == [p.to_dict() for _, p in r1]  # same position on every rank


def test_huge_document_is_split_not_crashing(tok):
    huge = "value = 1\n" * 5000
    stats = Counter()
    blocks = list(PackedBlocks(lambda: iter([("h", huge)]), tok, 64, max_doc_chars=1000, stats=stats))
    assert stats["split_huge"] == 1 and len(blocks) > 10


def test_cycle_restarts_the_corpus_with_a_new_epoch(tok):
    blocks = list(islice(_stream(tok, ["a b c d e f g h i j k l"], cycle=True), 6))
    assert blocks[-1][1].epoch >= 1


def test_stdlib_pieces_are_shuffled_bounded_and_cover_the_files():
    stats = Counter()
    spec = SourceSpec(kind="stdlib", split="validation", piece_chars=2048)
    docs = list(documents(spec, stats))
    assert docs == list(documents(spec))  # deterministic
    assert all(len(text) <= 2048 for _, text in docs)
    files = [d.split("#")[0] for d, _ in docs]
    runs = sum(a == b for a, b in zip(files, files[1:]))
    assert runs < len(files) // 4, "pieces of one file should not come in long runs"
    assert sorted(files) != files  # not alphabetical
    root = __import__("dmc.data.sources", fromlist=["stdlib_root"]).stdlib_root()
    for rel in sorted(set(files))[:5]:  # the pieces of a file put back together give the file
        pieces = sorted((int(d.split("#")[1]), t) for d, t in docs if d.split("#")[0] == rel)
        assert "".join(t for _, t in pieces) == (root / rel).read_text()
