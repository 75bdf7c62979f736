"""Cutting text that arrives in fragments (an LLM writing) into segments worth speaking on their own.

A segment ends where the model's own sentence splitter would cut (:mod:`cosyserve.text.normalize`), in
two strengths: a sentence end cuts at once, a clause mark (comma, colon) only once the segment is long
enough (a comma every few words is too often). Cutting anywhere else breaks the prosody.
"""

from __future__ import annotations

from collections.abc import Callable

from cosyserve.text.normalize import CLOSING_QUOTES, COMMAS, EN_STOPS, ZH_STOPS, is_only_punctuation

MAX_SEGMENT_CHARS = 300  # a buffer this long without a boundary is cut at its last space
CLAUSE_CHARS = 80  # a clause mark (comma, colon) ends a segment only after this many characters

CLAUSE_MARKS = frozenset(COMMAS | {"、", ":", "："})
SENTENCE_ENDS = frozenset((ZH_STOPS | EN_STOPS) - CLAUSE_MARKS)
# Marks that stay with the sentence before them: closing quotes and brackets.
CLOSERS = frozenset(CLOSING_QUOTES | set("')]}’」』）】"))


def ends_sentence(text: str) -> bool:
    """Whether ``text`` (trailing whitespace aside) ends with a sentence end or the mark closing one."""
    tail = text.rstrip()
    return bool(tail) and (tail[-1] in SENTENCE_ENDS or tail[-1] in CLOSERS)


class TextSegmenter:
    """Collects text fragments and hands out segments that end on a sentence or clause boundary.

    An ASCII mark counts once whitespace follows it ("3.5", "e.g.x" are not boundaries), so a
    sentence is complete when the next fragment starts or its fragment ends with a space; full-width
    marks (。！？) count at once. ``clause_chars(n)``: the clause threshold of the n-th segment.
    Segments of punctuation alone are dropped.
    """

    def __init__(
        self, clause_chars: Callable[[int], int] = lambda _: CLAUSE_CHARS, max_chars: int = MAX_SEGMENT_CHARS
    ) -> None:
        self.buffer = ""
        self.clause_chars = clause_chars
        self.max_chars = max_chars
        self.cut = 0  # segments handed out

    @property
    def buffered_chars(self) -> int:
        """Characters received and not yet handed out."""
        return len(self.buffer)

    def add(self, text: str) -> list[str]:
        """Take a fragment; the segments it completes."""
        self.buffer += text
        segments = []
        while (end := self._boundary()) is not None:
            segments += self._take(end)
        return segments

    def flush(self) -> list[str]:
        """Everything buffered, as a segment (none if it is blank or punctuation only)."""
        return self._take(len(self.buffer))

    def clear(self) -> None:
        self.buffer = ""

    def _take(self, end: int) -> list[str]:
        segment, self.buffer = self.buffer[:end].strip(), self.buffer[end:].lstrip()
        if not segment or is_only_punctuation(segment):
            return []
        self.cut += 1
        return [segment]

    def _boundary(self) -> int | None:
        text, clause = self.buffer, self.clause_chars(self.cut)
        for i, ch in enumerate(text):
            if ch in SENTENCE_ENDS or (ch in CLAUSE_MARKS and len(text[:i].strip()) >= clause):
                end = i + 1
                while end < len(text) and text[end] in CLOSERS:
                    end += 1
                if not ch.isascii():
                    return end
                if end < len(text) and text[end].isspace():
                    return end
        if len(text) >= self.max_chars:
            space = text.rfind(" ", 0, self.max_chars)
            return space if space > 0 else self.max_chars
        return None
