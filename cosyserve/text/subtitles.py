"""Subtitles: SubRip (SRT) documents read strictly into cues, and captions written as SRT or WebVTT.

:func:`parse_srt` takes the usual SRT layout (a cue number, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, one or more
text lines, a blank line between cues; ``.`` taken for ``,``; a UTF-8 BOM and CRLF line ends allowed) and
raises :class:`SubtitleError` naming the cue and the line for anything else: a missing number or timing,
an end not after its start, a cue starting before the one above it, an empty text, too many cues.
Formatting tags (``<i>``, ``{\\an8}``) are dropped from the text: they are not to be spoken.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from cosyserve.errors import SubtitleError

MAX_CUES = 500  # the cues one document may have
MAX_SRT_BYTES = 1 << 20  # an SRT document's size at most

_TIME = r"(\d{1,3}):([0-5]\d):([0-5]\d)[,.](\d{1,3})"
_TIMING = re.compile(rf"^\s*{_TIME}\s*-->\s*{_TIME}(?:\s+.*)?$")
_TAGS = re.compile(r"<[^>]{0,64}>|\{\\[^}]{0,64}\}")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Cue:
    """One subtitle: its number as written, its times (seconds), its text (one line, tags dropped), and
    the line of the document it starts at (1-based)."""

    number: int
    start: float
    end: float
    text: str
    line: int


@dataclass(frozen=True)
class Caption:
    """A span of audio and what is said in it (seconds)."""

    text: str
    start: float
    end: float


def _seconds(h: str, m: str, s: str, ms: str) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms.ljust(3, "0")) / 1000


def parse_srt(data: bytes | str, max_cues: int = MAX_CUES) -> list[Cue]:
    """The cues of an SRT document, in order (see the module doc for what is refused)."""
    if isinstance(data, bytes):
        if len(data) > MAX_SRT_BYTES:
            raise SubtitleError(f"the document is over {MAX_SRT_BYTES} bytes", 1)
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise SubtitleError("the document is not UTF-8 text", line) from exc
    lines = data.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n").split("\n")
    cues: list[Cue] = []
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        start_line = i + 1
        raw_number = lines[i].strip()
        expected = len(cues) + 1
        if not raw_number.isascii() or not raw_number.isdigit() or len(raw_number) > 9:
            raise SubtitleError(f"expected the cue number, found {raw_number[:40]!r}", start_line, expected)
        number = int(raw_number)
        if i + 1 >= len(lines) or not lines[i + 1].strip():
            raise SubtitleError("the cue has no timing line (HH:MM:SS,mmm --> HH:MM:SS,mmm)", start_line + 1, number)
        timing = _TIMING.match(lines[i + 1])
        if timing is None:
            found = lines[i + 1].strip()[:60]
            raise SubtitleError(f"expected HH:MM:SS,mmm --> HH:MM:SS,mmm, found {found!r}", start_line + 1, number)
        groups = timing.groups()
        start, end = _seconds(*groups[:4]), _seconds(*groups[4:])
        if end <= start:
            raise SubtitleError("the cue ends before it starts (or at its start)", start_line + 1, number)
        if cues and start < cues[-1].start:
            raise SubtitleError(
                f"the cue starts before cue {cues[-1].number} (cues must be in time order)", start_line + 1, number
            )
        j = i + 2
        text_lines = []
        while j < len(lines) and lines[j].strip():
            text_lines.append(lines[j])
            j += 1
        text = _SPACES.sub(" ", _TAGS.sub(" ", " ".join(text_lines))).strip()
        if not text:
            raise SubtitleError("the cue has no text", start_line + 2, number)
        if len(cues) >= max_cues:
            raise SubtitleError(f"the document has more than {max_cues} cues", start_line, number)
        cues.append(Cue(number, start, end, text, start_line))
        i = j
    if not cues:
        raise SubtitleError("the document has no cue", 1)
    return cues


def _stamp(seconds: float, separator: str) -> str:
    ms = max(round(seconds * 1000), 0)
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{separator}{ms:03d}"


def _cue_text(text: str) -> str:
    """A caption's text as one cue line: no line breaks (a blank line ends a cue), no timing arrow."""
    return _SPACES.sub(" ", text).replace("-->", "->").strip() or "..."


def format_srt(captions: Iterable[Caption]) -> str:
    """Captions as a SubRip document (numbered from 1, times to the millisecond)."""
    blocks = [
        f"{n}\n{_stamp(c.start, ',')} --> {_stamp(c.end, ',')}\n{_cue_text(c.text)}\n"
        for n, c in enumerate(captions, start=1)
    ]
    return "\n".join(blocks)


def format_vtt(captions: Iterable[Caption]) -> str:
    """Captions as a WebVTT document."""
    blocks = [f"{_stamp(c.start, '.')} --> {_stamp(c.end, '.')}\n{_cue_text(c.text)}\n" for c in captions]
    return "WEBVTT\n\n" + "\n".join(blocks)
