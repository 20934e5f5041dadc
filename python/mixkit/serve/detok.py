"""Streaming detokenisation and stop strings.

A byte-level tokenizer can end a token in the middle of a UTF-8 character;
decoding then yields U+FFFD for the incomplete tail. The text is therefore
decoded over a short window of recent tokens (so that decoders which drop a
leading space see their context) and released only when it does not end in
U+FFFD; what is held back comes out with the token that completes the
character, or at the end. Text that could still become a stop string is held
back too, and a stop string ends the text before it.
"""
from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"


class Detokenizer:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tok = tokenizer
        self.stop = list(stop)
        self.ids: list[int] = []
        self.prefix = 0  # tokens before this are fully released
        self.read = 0  # tokens up to here have produced text
        self.text = ""  # all text so far (up to a stop string)
        self.sent = 0  # characters of text already returned
        self.stopped = False

    def _decode_new(self, final: bool) -> str:
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if len(now) > len(before) and (final or not now.endswith(REPLACEMENT)):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def _release(self, final: bool) -> str:
        hold = 0
        if not final:  # the longest tail that could still grow into a stop string
            for s in self.stop:
                for n in range(min(len(s) - 1, len(self.text) - self.sent), hold, -1):
                    if self.text.endswith(s[:n]):
                        hold = n
                        break
        out = self.text[self.sent:len(self.text) - hold]
        self.sent += len(out)
        return out

    def add(self, token: int) -> str:
        """Feed one generated token; returns the text now safe to show."""
        if self.stopped:
            return ""
        self.ids.append(token)
        new = self._decode_new(final=False)
        if not new:
            return ""
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += new
        for s in self.stop:
            i = self.text.find(s, start)
            if i >= 0:
                self.text, self.stopped = self.text[:i], True
        return self._release(final=self.stopped)

    def finish(self) -> str:
        """The rest of the text at the end of generation."""
        if not self.stopped:
            self.text += self._decode_new(final=True)
            for s in self.stop:  # the flushed tail may complete a stop string
                i = self.text.find(s)
                if i >= 0:
                    self.text, self.stopped = self.text[:i], True
        return self._release(final=True)
