"""Tokens to text for the server (serve/text.py): streamed pieces add up to the full decode, a SentencePiece
completion keeps its first space, stop strings are cut wherever they fall (across tokens, at the very end),
and token bytes are the token's own even when it is half a character."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dmc.serve.text import TextStream, token_bytes, token_text
from tests.helpers import SMOLLM2


@pytest.fixture(scope="module")
def smollm2():
    return AutoTokenizer.from_pretrained(SMOLLM2)


def sentencepiece_like():
    """A word-level vocabulary with SentencePiece's space marker and its decoder, which drops the first piece's
    leading space (as Llama 2's tokenizer does)."""
    words = ["<unk>", "▁The", "▁capital", "▁is", "▁Paris", ".", "▁and", "▁Rome"]
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    inner.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>")


def _stream_all(tok, prompt_ids, ids, stop=()):
    stream = TextStream(tok, list(stop), prompt_ids)
    pieces, stopped = [], False
    for t in ids:
        piece, stopped = stream.push(t)
        pieces.append(piece)
        if stopped:
            break
    if not stopped:
        piece, stopped = stream.flush()
        pieces.append(piece)
    return "".join(pieces), stream, stopped


def test_a_sentencepiece_completion_keeps_its_first_space():
    tok = sentencepiece_like()
    prompt = tok.convert_tokens_to_ids(["▁The", "▁capital", "▁is"])
    out = tok.convert_tokens_to_ids(["▁Paris", "."])
    assert tok.decode(out) == "Paris."  # the decoder alone drops it
    text, _, _ = _stream_all(tok, prompt, out)
    assert text == " Paris."
    assert token_text(tok, out[0], prompt[-1]) == " Paris"


def test_streamed_pieces_add_up_to_the_whole_decode(smollm2):
    ids = smollm2("def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2) 😀 é")["input_ids"]
    text, stream, _ = _stream_all(smollm2, [], ids)
    assert text == smollm2.decode(ids) == stream.text


@pytest.mark.parametrize("stop", ["fib", "(n - 1)", "2 else", "😀"])
def test_a_stop_string_is_cut_wherever_it_falls(smollm2, stop):
    full = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + 😀 tail"
    ids = smollm2(full)["input_ids"]
    text, _, stopped = _stream_all(smollm2, [], ids, stop=[stop])
    assert stopped and text == full[: full.find(stop)]


def test_held_back_text_is_released_or_cut_at_the_end(smollm2):
    ids = smollm2("a b c")["input_ids"]
    text, _, stopped = _stream_all(smollm2, [], ids, stop=["c d"])  # "c" could begin the stop: held, then released
    assert text == "a b c" and not stopped
    stream = TextStream(smollm2, ["b c"], [])
    pieces = [stream.push(t)[0] for t in ids[:-1]]
    assert "".join(pieces) == "a "  # "b" is held: it may become "b c"
    stream.push(ids[-1])
    assert stream.stopped and stream.text == "a "


def test_token_bytes_are_the_tokens_own(smollm2):
    ids = smollm2("😀é x")["input_ids"]
    pieces = [token_bytes(smollm2, t) for t in ids]
    assert any(smollm2.decode([t]).endswith("\ufffd") for t in ids)  # some token is half a character
    assert b"".join(bytes(p) for p in pieces) == "😀é x".encode()
    tok = sentencepiece_like()
    assert bytes(token_bytes(tok, tok.convert_tokens_to_ids("▁Paris"))) == b" Paris"


def test_tokens_without_text_do_not_widen_what_is_decoded(smollm2):
    ids = smollm2("x = 1")["input_ids"]
    eos = smollm2.eos_token_id
    stream = TextStream(smollm2, [], [])
    for t in ids[:2] + [eos] * 50 + ids[2:]:  # an ignore_eos run: special tokens decode to nothing
        stream.push(t)
    assert stream.flush() == ("", False) and stream.text == "x = 1"
    assert len(stream.ids) - stream.prefix_offset < 10  # the 50 end-of-sequence tokens were not kept

