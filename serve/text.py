"""Generated tokens to text as they come: each new token's text (held back while it is an incomplete UTF-8
character, or while it could be the start of a stop string), and where a stop string ends the output."""

from __future__ import annotations


class TextStream:
    """Decodes one choice's tokens incrementally. ``push(token)`` -> (new text, whether a stop string ended it);
    ``flush()`` -> the text held back, at the end of the output."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tok, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already returned
        self.text = ""  # the output so far, up to any stop string
        self.stopped = False

    def push(self, token: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.ids.append(token)
        # The whole output is decoded each time: a token's text can depend on its neighbours (byte-level pieces,
        # a leading space), and outputs here are short beside the cost of a decode step.
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # part of a multi-byte character: wait for the rest
            return "", False
        cuts = [i for i in (text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop) if i >= 0]
        if cuts:
            self.stopped, text = True, text[: min(cuts)]
            return self._take(text, len(text)), True
        return self._take(text, len(text) - self._partial_stop(text)), False

    def flush(self) -> str:
        text = self.tok.decode(self.ids, skip_special_tokens=True) if not self.stopped else self.text
        return self._take(text, len(text))

    def _take(self, text: str, upto: int) -> str:
        self.text = text
        upto = max(upto, self.sent)
        new, self.sent = text[self.sent : upto], upto
        return new

    def _partial_stop(self, text: str) -> int:
        """Length of the longest tail of ``text`` that a stop string begins with (held back until it resolves)."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
