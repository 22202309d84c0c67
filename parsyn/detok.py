"""Text from a stream of tokens: an incremental detokenizer and stop strings.

Each new token is decoded together with the few tokens before it, and only the text that is new is
kept, so the cost per token does not grow with the answer. A token that ends inside a multi-byte
character decodes to U+FFFD: its text waits until the character is whole. With stop strings, text that
could be the start of one is held back until it is known not to be.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

_PARTIAL = "\ufffd"


class Detokenizer:
    """Text of a growing list of token ids; `add(id)` returns the text that id completed ("" if none)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._start = 0  # first id of the window decoded for context
        self._done = 0   # ids whose text is already in `text`

    def add(self, token: int) -> str:
        self.ids.append(token)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)
        before = decode(self.ids[self._start : self._done])
        after = decode(self.ids[self._start :])
        if after.endswith(_PARTIAL) or len(after) <= len(before):
            return ""  # an unfinished character, or a token without text of its own
        new = after[len(before) :]
        self._start, self._done = self._done, len(self.ids)
        self.text += new
        return new


class StopText:
    """Text released for streaming, cut before the first stop string and holding back any tail that may
    still become one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.longest = max(map(len, self.stops), default=0)
        self.sent = 0        # characters of the text released so far
        self.cut: int | None = None  # where a stop string starts, once one appeared

    def release(self, text: str, *, final: bool = False) -> str:
        """The newly releasable part of `text` (the whole text so far); after a stop string, nothing more."""
        if self.cut is not None:
            return ""
        if self.stops:
            start = max(0, self.sent - self.longest)
            found = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
            if found:
                self.cut = min(found)
                return self._send(text, self.cut)
        return self._send(text, len(text) if final else len(text) - self._held(text))

    def _held(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        for n in range(min(self.longest - 1, len(text) - self.sent), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stops):
                return n
        return 0

    def _send(self, text: str, end: int) -> str:
        out = text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out
