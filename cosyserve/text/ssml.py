"""SSML in front of the text frontend: a ``<speak>`` document -> a frozen :class:`SsmlDocument`.

A request's text is SSML when it starts (after white space) with ``<speak`` (:func:`is_ssml`, the one
test; an XML declaration ``<?xml`` or a ``<!DOCTYPE`` in front counts too, so that such a document is
parsed, and refused, rather than read aloud). The document is a tuple of parts, each a spoken
:class:`Span` (text, rate, language, emphasis, whether it starts a segment) or a :class:`Pause`,
plus the ``<phoneme>`` entries and the names of what was ignored. The engine normalises and splits
the spans as it does plain text (engine/inputs.py) and emits the pauses as exact zeros.

Parsed with the standard library's expat, which refuses here any DOCTYPE, entity declaration or
external entity (handlers that raise before anything is expanded or read): no XXE, no entity bomb.
Every error is an :class:`SsmlError` naming line and column (1-based).

Supported (README "SSML"):

- ``<break time="500ms|1.5s" strength="none|x-weak|weak|medium|strong|x-strong">``: silence of
  :data:`BREAK_STRENGTHS` seconds (``time`` wins; bare ``<break/>``: medium), at most
  :data:`MAX_BREAK_S` each and :data:`MAX_TOTAL_PAUSE_S` in all.
- ``<prosody rate>``: :data:`RATES` keywords, ``80%`` (of the normal rate), ``+10%`` / ``-20%`` (of the
  enclosing rate), or a multiplier ``1.2``; the engine multiplies it with the request's speed and
  clamps to its speed range. Other prosody attributes are ignored (named as ``prosody@pitch``...).
- ``<say-as interpret-as>``: characters / spell-out, digits, cardinal (number), ordinal, date (``format``
  ymd, mdy, dmy, ym, my, md, dm, y), time, telephone: the text rewritten in words of the span's
  language (Chinese when ``xml:lang`` starts with zh / cmn / yue, or, without one, when the document
  has Chinese characters; else English).
- ``<sub alias>``: the alias is spoken. ``<phoneme alphabet="pinyin|cmu" ph>``: its text is spoken and an
  entry (word, alphabet, ph) recorded for the pronunciation lexicon.
- ``<p>`` / ``<s>`` (``paragraph`` / ``sentence``): each starts a new segment (and so does what follows).
- ``<lang xml:lang>`` (and ``xml:lang`` on ``<speak>``, ``<p>``, ``<s>``): the language of the span's
  say-as readings; normalisation picks its branch by the text, as for plain text.
- ``<emphasis>``: the family's emphasis tags (CosyVoice2/3: ``<strong>...</strong>``), else plain.
- Anything else: its text is spoken, its name listed once in :attr:`SsmlDocument.ignored`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any
from xml.parsers import expat

from cosyserve.errors import InvalidRequest, SsmlError
from cosyserve.text.normalize import contains_chinese
from cosyserve.text.numbers import (
    chinese_cardinal,
    chinese_digits,
    english_cardinal,
    english_digits,
    english_ordinal,
)
from cosyserve.text.pronunciation import Pronunciation

# <break strength>: seconds of silence.
BREAK_STRENGTHS = {"none": 0.0, "x-weak": 0.1, "weak": 0.25, "medium": 0.5, "strong": 0.75, "x-strong": 1.0}
MAX_BREAK_S = 10.0  # one <break>
MAX_TOTAL_PAUSE_S = 60.0  # all the breaks of a document
# <prosody rate> keywords: speaking-rate multipliers.
RATES = {"x-slow": 0.5, "slow": 0.75, "medium": 1.0, "default": 1.0, "fast": 1.25, "x-fast": 1.5}
MAX_RATE = 100.0  # a multiplier past this is refused as nonsense (the engine clamps to its speed range)
PHONEME_ALPHABETS = ("pinyin", "cmu")
SAY_AS = ("characters", "spell-out", "digits", "cardinal", "number", "ordinal", "date", "time", "telephone")

_PREFIX = re.compile(r"^\s*(?:<\?xml[^>]*\?>\s*)?(?:<speak[\s/>]|<!DOCTYPE)", re.IGNORECASE)
_SPACE = re.compile(r"\s+")
_BEFORE_PUNCTUATION = re.compile(r"(?<=\S) +([,.!?;:])")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s)\s*$")
_PERCENT = re.compile(r"^\s*([+-]?)(\d+(?:\.\d*)?|\.\d+)\s*%\s*$")
_MULTIPLIER = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*$")
_NUMBER = re.compile(r"([+-]?)([0-9][0-9,]*)(?:\.([0-9]+))?")
_ORDINAL = re.compile(r"([0-9][0-9,]*)(?:st|nd|rd|th)?", re.IGNORECASE)
_TIME = re.compile(r"([0-9]{1,2})[:：]([0-9]{2})(?:[:：]([0-9]{2}))?(?:\s*([ap])\.?\s*m\b\.?)?", re.IGNORECASE)
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_DATE_FORMATS = frozenset({"ymd", "mdy", "dmy", "ym", "my", "md", "dm", "y", "m", "d"})
_STRUCTURE = {"p": "p", "paragraph": "p", "s": "s", "sentence": "s"}
_CHINESE_LANGS = ("zh", "cmn", "yue")


def is_ssml(text: object) -> bool:
    """The one test of whether a request's text is SSML (see the module doc)."""
    return isinstance(text, str) and _PREFIX.match(text) is not None


@dataclass(frozen=True)
class Span:
    """Text to speak and how: ``rate`` multiplies the request's speed; ``language`` is the span's
    ``xml:lang`` (None: not given); ``segment_start``: a new segment starts here (``<p>`` / ``<s>``)."""

    text: str
    rate: float = 1.0
    language: str | None = None
    emphasis: bool = False
    segment_start: bool = False


@dataclass(frozen=True)
class Pause:
    """Exact silence, in seconds."""

    seconds: float


Part = Span | Pause


@dataclass(frozen=True)
class SsmlDocument:
    """A parsed ``<speak>`` document (plain, picklable data: it travels inside a SynthesisRequest)."""

    parts: tuple[Part, ...]
    phonemes: tuple[Pronunciation, ...] = ()  # <phoneme> elements as lexicon entries
    ignored: tuple[str, ...] = ()  # unknown tags / unsupported attributes, each once, in order

    @property
    def text(self) -> str:
        """What is spoken, as one string (for counting and logs)."""
        return "".join(p.text for p in self.parts if isinstance(p, Span))


# -- parsing -----------------------------------------------------------------------------------------


@dataclass
class _Event:
    kind: str  # start | end | data
    line: int
    column: int
    name: str = ""
    attrs: dict[str, str] | None = None
    text: str = ""


def _refuse(parser: Any, what: str) -> Any:
    def handler(*_: object) -> None:
        raise SsmlError(f"{what} is not allowed", parser.CurrentLineNumber, parser.CurrentColumnNumber + 1)

    return handler


def _events(text: str) -> list[_Event]:
    parser = expat.ParserCreate()  # no namespace processing: names as written ("xml:lang")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = _refuse(parser, "a DOCTYPE (DTD)")
    parser.EntityDeclHandler = _refuse(parser, "an entity declaration")
    parser.UnparsedEntityDeclHandler = _refuse(parser, "an entity declaration")
    parser.NotationDeclHandler = _refuse(parser, "a notation declaration")
    parser.ExternalEntityRefHandler = _refuse(parser, "an external entity")
    parser.SkippedEntityHandler = _refuse(parser, "an undeclared entity")
    events: list[_Event] = []

    def where() -> tuple[int, int]:
        return parser.CurrentLineNumber, parser.CurrentColumnNumber + 1

    def start(name: str, attrs: dict[str, str]) -> None:
        events.append(_Event("start", *where(), name=name, attrs=attrs))

    def end(name: str) -> None:
        events.append(_Event("end", *where(), name=name))

    def data(chunk: str) -> None:
        if events and events[-1].kind == "data":
            events[-1].text += chunk
        else:
            events.append(_Event("data", *where(), text=chunk))

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = data
    try:
        parser.Parse(text, True)
    except expat.ExpatError as exc:
        raise SsmlError(expat.ErrorString(exc.code) or "malformed XML", exc.lineno, exc.offset + 1) from None
    return events


def parse_ssml(text: str) -> SsmlDocument:
    """Parse a ``<speak>`` document (see the module doc); raises :class:`SsmlError`."""
    events = _events(text)
    if not events or events[0].kind != "start" or _local(events[0].name) != "speak":
        first = events[0] if events else _Event("start", 1, 1)
        raise SsmlError("the root element must be <speak>", first.line, first.column)
    return _Builder(events).build()


def _tidy(text: str) -> str:
    """One space at most, none before ASCII punctuation (the padding of say-as readings)."""
    return _BEFORE_PUNCTUATION.sub(r"\1", _SPACE.sub(" ", text))


def _local(name: str) -> str:
    """An element name without its namespace prefix, lower-cased (``ssml:Break`` -> ``break``)."""
    return name.rpartition(":")[2].lower()


@dataclass
class _Context:
    name: str
    rate: float
    language: str | None
    emphasis: bool


class _Builder:
    def __init__(self, events: list[_Event]) -> None:
        self.events = events
        self.parts: list[Part] = []
        self.phonemes: list[Pronunciation] = []
        self.ignored: list[str] = []
        self.pending_start = False
        self.total_pause = 0.0
        spoken = "".join(e.text for e in events if e.kind == "data")
        self.default_chinese = contains_chinese(spoken)

    # -- output --------------------------------------------------------------------------------------
    def build(self) -> SsmlDocument:
        stack: list[_Context] = []
        i = 0
        events = self.events
        while i < len(events):
            event = events[i]
            top = stack[-1] if stack else _Context("", 1.0, None, False)
            if event.kind == "data":
                self.speak(event.text, top)
            elif event.kind == "end":
                context = stack.pop()
                if context.name in ("p", "s"):
                    self.pending_start = True
            else:
                name = _local(event.name)
                attrs = event.attrs or {}
                if name in ("say-as", "sub", "phoneme"):
                    i = self.leaf(i, name, attrs, top)
                    continue
                stack.append(self.open(event, name, attrs, top, first=i == 0))
            i += 1
        parts = tuple(
            Span(_tidy(p.text), p.rate, p.language, p.emphasis, p.segment_start) if isinstance(p, Span) else p
            for p in self.parts
        )
        return SsmlDocument(parts, tuple(self.phonemes), tuple(self.ignored))

    def speak(self, text: str, context: _Context) -> None:
        text = _SPACE.sub(" ", text)
        if not text:
            return
        last = self.parts[-1] if self.parts else None
        if (
            isinstance(last, Span)
            and not self.pending_start
            and (last.rate, last.language, last.emphasis) == (context.rate, context.language, context.emphasis)
        ):
            self.parts[-1] = Span(last.text + text, last.rate, last.language, last.emphasis, last.segment_start)
            return
        if not text.strip() and not isinstance(last, Span):
            return  # white space between structure or breaks says nothing
        start, self.pending_start = self.pending_start, False
        self.parts.append(Span(text, context.rate, context.language, context.emphasis, start))

    def pause(self, seconds: float, event: _Event) -> None:
        self.total_pause += seconds
        if self.total_pause > MAX_TOTAL_PAUSE_S:
            raise SsmlError(f"the breaks add up to more than {MAX_TOTAL_PAUSE_S:g} s", event.line, event.column)
        if seconds <= 0:
            return
        if self.parts and isinstance(self.parts[-1], Pause):
            self.parts[-1] = Pause(self.parts[-1].seconds + seconds)
        else:
            self.parts.append(Pause(seconds))

    def ignore(self, name: str) -> None:
        if name not in self.ignored:
            self.ignored.append(name)

    # -- elements ------------------------------------------------------------------------------------
    def open(self, event: _Event, name: str, attrs: dict[str, str], top: _Context, first: bool) -> _Context:
        language = attrs.get("xml:lang", top.language) or top.language
        context = _Context(name, top.rate, language, top.emphasis)
        if name == "speak":
            if not first:
                self.ignore("speak (nested)")
        elif name in _STRUCTURE:
            context.name = _STRUCTURE[name]
            self.pending_start = True
        elif name == "break":
            self.pause(self.break_seconds(event, attrs), event)
        elif name == "prosody":
            if "rate" in attrs:
                context.rate = self.rate(event, attrs["rate"], top.rate)
            for attribute in sorted(set(attrs) - {"rate"}):
                self.ignore(f"prosody@{attribute}")
        elif name == "emphasis":
            context.emphasis = attrs.get("level", "moderate").strip().lower() != "none"
        elif name != "lang":
            self.ignore(event.name)
        return context

    def leaf(self, i: int, name: str, attrs: dict[str, str], top: _Context) -> int:
        """A say-as / sub / phoneme element at ``events[i]``: its whole text, rewritten; returns the
        index after its end."""
        event = self.events[i]
        depth, j, text = 0, i, ""
        while True:
            e = self.events[j]
            if e.kind == "start":
                depth += 1
                if j > i:
                    self.ignore(f"{e.name} (inside {name})")
            elif e.kind == "end":
                depth -= 1
                if depth == 0:
                    break
            else:
                text += e.text
            j += 1
        language = attrs.get("xml:lang", top.language) or top.language
        context = _Context(name, top.rate, language, top.emphasis)
        if name == "sub":
            alias = attrs.get("alias")
            if alias is None or not alias.strip():
                raise SsmlError("<sub> needs a non-empty alias", event.line, event.column)
            self.speak(alias, context)
        elif name == "phoneme":
            alphabet = attrs.get("alphabet", "").strip().lower()
            ph = attrs.get("ph")
            if ph is None or not ph.strip():
                raise SsmlError("<phoneme> needs a non-empty ph", event.line, event.column)
            word = _SPACE.sub(" ", text).strip()
            if alphabet in PHONEME_ALPHABETS and word:
                # The lexicon step (engine/inputs.py, on the normalised segments) replaces ``word`` by ``ph``.
                try:
                    self.phonemes.append(Pronunciation(word, **{alphabet: ph.strip()}))
                except InvalidRequest as exc:
                    raise SsmlError(f"<phoneme>: {exc.message}", event.line, event.column) from exc
            else:
                self.ignore(f"phoneme@alphabet={alphabet or '?'}")
            self.speak(text, context)
        else:
            kind = attrs.get("interpret-as", "").strip().lower()
            if kind not in SAY_AS:
                self.ignore(f"say-as@interpret-as={kind or '?'}")
                self.speak(text, context)
            else:
                chinese = self.chinese(language)
                reading = say_as(kind, _SPACE.sub(" ", text).strip(), chinese, attrs.get("format", ""))
                self.speak(f" {reading} " if not chinese else reading, context)
        return j + 1

    def chinese(self, language: str | None) -> bool:
        if language is None:
            return self.default_chinese
        return language.strip().lower().split("-")[0] in _CHINESE_LANGS

    @staticmethod
    def break_seconds(event: _Event, attrs: dict[str, str]) -> float:
        if "time" in attrs:
            match = _DURATION.match(attrs["time"])
            if match is None:
                raise SsmlError(
                    f"<break time={attrs['time']!r}>: give a duration such as 500ms or 1.5s", event.line, event.column
                )
            seconds = float(match[1]) / (1000.0 if match[2] == "ms" else 1.0)
        else:
            strength = attrs.get("strength", "medium").strip().lower()
            if strength not in BREAK_STRENGTHS:
                raise SsmlError(
                    f"<break strength={strength!r}>: one of {', '.join(BREAK_STRENGTHS)}", event.line, event.column
                )
            seconds = BREAK_STRENGTHS[strength]
        if seconds > MAX_BREAK_S:
            raise SsmlError(f"a <break> lasts at most {MAX_BREAK_S:g} s, not {seconds:g} s", event.line, event.column)
        return seconds

    @staticmethod
    def rate(event: _Event, value: str, enclosing: float) -> float:
        keyword = value.strip().lower()
        rate: float | None = None
        if keyword in RATES:
            rate = RATES[keyword]
        elif (match := _PERCENT.match(value)) is not None:
            percent = float(match[2]) / 100.0
            if match[1] == "+":
                rate = enclosing * (1.0 + percent)
            elif match[1] == "-":
                rate = enclosing * (1.0 - percent)
            else:
                rate = percent
        elif (match := _MULTIPLIER.match(value)) is not None:
            rate = float(match[1])
        if rate is None or not math.isfinite(rate) or not 0 < rate <= MAX_RATE:
            words = ", ".join(RATES)
            raise SsmlError(
                f"<prosody rate={value!r}>: one of {words}, a percentage (80%, +10%) or a positive multiplier",
                event.line,
                event.column,
            )
        return rate


# -- say-as readings -----------------------------------------------------------------------------------


def say_as(kind: str, text: str, chinese: bool, date_format: str = "") -> str:
    """``text`` as words for ``<say-as interpret-as=kind>`` (Chinese words when ``chinese``)."""
    if kind in ("characters", "spell-out"):
        return " ".join(_character(ch, chinese) for ch in text if not ch.isspace())
    if kind == "digits":
        return _digit_runs(text, lambda d: chinese_digits(d) if chinese else english_digits(d))
    if kind in ("cardinal", "number"):
        return _NUMBER.sub(lambda m: _cardinal(m, chinese), text)
    if kind == "ordinal":
        return _ORDINAL.sub(lambda m: _ordinal(m, chinese), text)
    if kind == "date":
        return _date(text, chinese, date_format.strip().lower())
    if kind == "time":
        return _TIME.sub(lambda m: _time(m, chinese), text)
    return _telephone(text, chinese)


def _character(ch: str, chinese: bool) -> str:
    if ch in "0123456789":
        return chinese_digits(ch) if chinese else english_digits(ch)
    return ch.upper() if ch.isascii() and ch.isalpha() else ch


def _digit_runs(text: str, read: Any) -> str:
    return re.sub(r"[0-9]+", lambda m: f" {read(m[0])} ", text).strip()


def _integer(digits: str, chinese: bool) -> str:
    plain = digits.replace(",", "")
    if len(plain) > 15:  # past the cardinal readings (and int()'s digit limit): digit by digit
        return chinese_digits(plain) if chinese else english_digits(plain)
    n = int(plain)
    return chinese_cardinal(n) if chinese else english_cardinal(n)


def _cardinal(match: re.Match[str], chinese: bool) -> str:
    sign, whole, decimals = match.groups()
    words = _integer(whole, chinese)
    if decimals:
        words += ("点" + chinese_digits(decimals)) if chinese else (" point " + english_digits(decimals))
    if sign == "-":
        words = ("负" if chinese else "minus ") + words
    return words if chinese else f" {words} "


def _ordinal(match: re.Match[str], chinese: bool) -> str:
    plain = match[1].replace(",", "")
    if chinese:
        return "第" + _integer(plain, True)
    return f" {english_ordinal(int(plain))} " if len(plain) <= 15 else f" {english_digits(plain)} "


def _english_year(year: int) -> str:
    if year < 1000 or 2000 <= year < 2010:
        return english_cardinal(year)
    high, low = divmod(year, 100)
    if low == 0:
        return f"{english_cardinal(high)} hundred"
    return f"{english_cardinal(high)} {'oh ' + english_cardinal(low) if low < 10 else english_cardinal(low)}"


def _date(text: str, chinese: bool, date_format: str) -> str:
    groups = re.findall(r"[0-9]+", text)
    if not groups or any(len(g) > 4 for g in groups):
        return say_as("digits", text, chinese) if groups else text
    if date_format not in _DATE_FORMATS:
        date_format = ""
    order = date_format or ("ymd" if len(groups[0]) == 4 else "mdy" if not chinese else "dmy")
    order = order[: len(groups)]
    fields = dict(zip(order, (int(g) for g in groups), strict=False))
    year, month, day = fields.get("y"), fields.get("m"), fields.get("d")
    if (month is not None and not 1 <= month <= 12) or (day is not None and not 1 <= day <= 31):
        return say_as("digits", text, chinese)
    if chinese:
        out = ""
        if year is not None:
            out += chinese_digits(str(year)) + "年"
        if month is not None:
            out += chinese_cardinal(month) + "月"
        if day is not None:
            out += chinese_cardinal(day) + "日"
        return out
    words = []
    if month is not None:
        words.append(_MONTHS[month - 1])
    if day is not None:
        words.append(english_ordinal(day) if month is not None else f"the {english_ordinal(day)}")
    spoken = " ".join(words)
    if year is not None:
        spoken = f"{spoken}, {_english_year(year)}" if spoken else _english_year(year)
    return f" {spoken} "


def _time(match: re.Match[str], chinese: bool) -> str:
    hour, minute, second = int(match[1]), int(match[2]), match[3]
    meridiem = (match[4] or "").lower()
    if chinese:
        out = {"a": "上午", "p": "下午"}.get(meridiem, "") + chinese_cardinal(hour) + "点"
        out += chinese_cardinal(minute) + "分" if minute else ("整" if not second else "")
        if second and int(second):
            out += chinese_cardinal(int(second)) + "秒"
        return out
    words = [english_cardinal(hour)]
    if minute:
        words.append(f"oh {english_cardinal(minute)}" if minute < 10 else english_cardinal(minute))
    elif not meridiem:
        words.append("o'clock")
    if second and int(second):
        words.append(f"and {english_cardinal(int(second))} seconds")
    if meridiem:
        words.append(f"{meridiem} m")
    return f" {' '.join(words)} "


def _telephone(text: str, chinese: bool) -> str:
    groups = re.findall(r"[0-9]+", text)
    if not groups:
        return text
    plus = text.lstrip().startswith("+")
    if chinese:
        return ("加" if plus else "") + "".join(chinese_digits(g, phone=True) for g in groups)
    spoken = ", ".join(english_digits(g) for g in groups)
    return f" {'plus ' if plus else ''}{spoken} "
