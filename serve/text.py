"""Generated tokens to text as they come: each new token's text (held back while it is an incomplete UTF-8
character, or while it could be the start of a stop string), and where a stop string ends the output.

Decoding is incremental (vLLM's prefix and read offsets): only the last few tokens are decoded again for each
new one, with a few prompt tokens in front, so that tokenizers that drop the first piece's leading space
(SentencePiece's ``▁``) still give the completion's first word its space."""

from __future__ import annotations

import re
from functools import lru_cache

PROMPT_CONTEXT = 5  # prompt tokens decoded in front of the output


class TextStream:
    """Decodes one choice's tokens. ``push(token)`` -> (new text, whether a stop string ended it); ``flush()``
    -> the same for the text held back, at the end of the output. ``text``: the output so far (cut at a stop
    string)."""

    def __init__(self, tokenizer, stop: list[str], prompt_ids: list[int] = ()):
        self.tok, self.stop = tokenizer, stop
        self.ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT:])
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.text = ""
        self.sent = 0  # characters of ``text`` already returned
        self.stopped = False

    def push(self, token: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.ids.append(token)
        self.text += self._new_text(final=False)
        return self._release(final=False)

    def flush(self) -> tuple[str, bool]:
        """(the text held back, whether a stop string ended the output)."""
        if not self.stopped:
            self.text += self._new_text(final=True)
        return self._release(final=True)

    def previous_id(self) -> int | None:
        """The token before the last pushed one (the prompt's last at first), for ``token_text``."""
        return self.ids[-2] if len(self.ids) >= 2 else None

    def _new_text(self, final: bool) -> str:
        decode = self._decode
        before = decode(self.ids[self.prefix_offset : self.read_offset])
        after = decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):  # else: half a character
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before) :]
        if not final and after == before and len(self.ids) > self.read_offset:  # a token with no text (a skipped
            self.ids.pop()  # special token): forgotten, or each would widen the window decoded for every later one
        return ""

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def _release(self, final: bool) -> tuple[str, bool]:
        """The text that can go out now: up to a stop string (which ends the output), else all but a tail that
        could still become one (everything, at the end)."""
        longest = max((len(s) for s in self.stop), default=0)
        start = max(0, self.sent - longest + 1)
        cuts = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if cuts:
            self.stopped, self.text = True, self.text[: min(cuts)]
            return self._take(len(self.text)), True
        return self._take(len(self.text) if final else len(self.text) - self._partial_stop()), False

    def _take(self, upto: int) -> str:
        upto = max(upto, self.sent)
        new, self.sent = self.text[self.sent : upto], upto
        return new

    def _partial_stop(self) -> int:
        """Length of the longest tail of the text that a stop string begins with (held back until it resolves)."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best


def token_text(tokenizer, token: int, previous: int | None) -> str:
    """One token's text as it reads in place (a SentencePiece word keeps its leading space): the text it adds after
    the token before it."""
    if previous is None:
        return tokenizer.decode([token])
    return tokenizer.decode([previous, token])[len(tokenizer.decode([previous])) :]


def token_bytes(tokenizer, token: int) -> list[int]:
    """The token's own bytes, also when it is part of a UTF-8 character (its text alone would read U+FFFD):
    from the vocabulary's byte-level form (GPT-2's byte alphabet, or SentencePiece's ``<0xNN>`` and ``▁``)."""
    piece = tokenizer.convert_ids_to_tokens(token)
    if piece is None:
        return []
    byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
    if byte:
        return [int(byte.group(1), 16)]
    if _byte_level(tokenizer):
        decoder = _byte_decoder()
        return [decoder[c] for c in piece if c in decoder]
    return list(piece.replace("\u2581", " ").encode())


_BYTE_LEVEL: dict[int, bool] = {}


def _byte_level(tokenizer) -> bool:
    """Whether the vocabulary is written in GPT-2's byte alphabet (a space is ``Ġ``), asked once per tokenizer."""
    key = id(tokenizer)
    if key not in _BYTE_LEVEL:
        vocab = tokenizer.get_vocab()
        _BYTE_LEVEL[key] = any(piece.startswith("\u0120") for piece in vocab)
    return _BYTE_LEVEL[key]


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (printable bytes as themselves, the rest shifted past 255)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars
