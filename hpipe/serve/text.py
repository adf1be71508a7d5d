"""Sampled token ids -> text deltas for a stream, with stop strings.

Decoding the whole output each time (not token by token) keeps multi-byte characters and
merged pieces right; a delta that ends inside a UTF-8 sequence (the replacement character) is
held back until the next token completes it. A stop string may span tokens, so the tail that
could still become one is held back too; once one appears, the text ends before it.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stops: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already returned
        self.stopped = False
        self.text = ""

    def push(self, token_id: int) -> str:
        """The new text this token makes safe to send ("" while held back)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # inside a multi-byte character
        self.text = text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            self.stopped = True
            self.text = text[:end]
            return self._take(end)
        return self._take(len(text) - self._partial_stop(text))

    def finish(self) -> str:
        """What was held back, at the end of the output."""
        return "" if self.stopped else self._take(len(self.text))

    def _take(self, end: int) -> str:
        delta = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta

    def _partial_stop(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
