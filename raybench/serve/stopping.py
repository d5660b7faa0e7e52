"""Answer text as tokens arrive: stop strings, and streamed deltas that add up to the answer.

The LLM stage ends a row when its text holds a stop string; the ingress renders the same
text, cut before the first stop string (OpenAI leaves the stop string out). Streamed
deltas hold back what could still become a stop string or is half a multi-byte character,
so the chunks concatenate to exactly the non-streamed answer.
"""

from __future__ import annotations

from typing import Callable, Sequence


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """The text before the earliest stop string, and whether one was found."""
    at = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text, False) if at < 0 else (text[:at], True)


def _held_back(text: str, stop: Sequence[str]) -> int:
    """How many trailing characters could be the start of a stop string."""
    longest = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


class AnswerStream:
    """Text deltas from a growing token list (`decode` renders the whole answer so far)."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode, self.stop = decode, [s for s in stop if s]
        self.tokens: list[int] = []
        self.sent = ""

    def push(self, tokens: Sequence[int]) -> str:
        self.tokens.extend(tokens)
        text, stopped = cut_at_stop(self.decode(self.tokens), self.stop)
        if not stopped:
            text = text[: len(text) - _held_back(text, self.stop)]
        return self._grow(text.rstrip("\ufffd"))

    def finish(self) -> str:
        """What is left of the final answer once the row ended."""
        return self._grow(self.text())

    def text(self) -> str:
        return cut_at_stop(self.decode(self.tokens), self.stop)[0]

    def _grow(self, text: str) -> str:
        # Decoding strips the answer's ends, so a prefix can change (a trailing space); send
        # only growth of what was sent, never a correction.
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta
