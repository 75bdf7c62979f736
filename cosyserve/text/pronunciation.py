"""The pronunciation lexicon: ``word -> pinyin with tones | CMU phonemes | respelling``.

A :class:`Pronunciation` is one checked entry (``重庆`` -> pinyin ``chong2 qing4``; ``nginx`` -> respelling
``engine x``; ``hello`` -> CMU ``HH AH0 L OW1``). A :class:`Lexicon` applies entries to the normalised text of
a segment, before it is tokenised:

- on a family with inline pronunciation tokens (Fun-CosyVoice3, ``Family.inline_pronunciation``) pinyin
  and CMU entries become the model's tokens: ``chong2 qing4`` -> ``[ch][óng][q][ìng]`` (tones 1-4 as the
  tone mark on the right vowel, 5 or none toneless), ``HH AH0 L OW1`` -> ``[HH][AH0][L][OW1]``; a syllable
  or phone without such a token in the tokenizer's vocabulary is refused, naming it (a stored entry, which
  POST /v1/pronunciations checks against the model that stores it, falls back to its respelling or is
  skipped, logged);
- elsewhere the respelling is spoken; a request's own entry with only pinyin / CMU is refused there,
  naming the family, and a stored one is skipped (so it cannot fail every request of such a model);
- the longest word matches first; a word whose edge is a Latin (non-CJK) letter or digit matches whole
  words only there (``cat`` does not match in ``concatenate``); words match regardless of case (a word
  of several words with single spaces between them, as the text has them after normalisation);
  inline tokens already in the text (``[j][ǐ]``, ``<|endofprompt|>``) are never matched inside.

The limits (entries per request, word length, entries stored per scope) are defined here, once.
Stored entries belong to a scope (:data:`GLOBAL_SCOPE`, a voice, an API key): see :func:`voice_scope`.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cosyserve.errors import InvalidRequest

log = logging.getLogger(__name__)

MAX_REQUEST_ENTRIES = 100  # entries a request may carry
MAX_WORD_LENGTH = 64  # characters of a word
MAX_PRONUNCIATION_LENGTH = 256  # characters of its pinyin / CMU / respelling
MAX_STORED_PER_SCOPE = 10_000  # entries stored in one scope (global, one voice, one API key)

FIELDS = ("pinyin", "cmu", "respelling")

# Scopes of stored entries: every request, the requests of one voice, those carrying one API key.
GLOBAL_SCOPE = "global"
VOICE_SCOPE_PREFIX = "voice:"
_KEY_PREFIX = "key:"

# CJK scripts write words without spaces: a word edge in them needs no word boundary.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_LATIN_EDGE = re.compile(rf"[^\W{_CJK}]")  # a word character that is not CJK (letters, digits, _)
_NOT_IN_WORDS = re.compile(r"[\[\]<>|{}\x00-\x1f\x7f]")
# What the lexicon never matches inside: inline pronunciation / tag tokens, special tokens, markup tags.
_PROTECTED_RE = re.compile(r"\[[^\[\]\s]{1,24}\]|<\|[^|<>]{1,32}\|>|</?[A-Za-z_]{1,16}>")

_INITIALS = ("zh", "ch", "sh", "b", "p", "m", "f", "d", "t", "n", "l", "g", "k", "h", "j", "q", "x", "r", "z")
_INITIALS += ("c", "s", "y", "w")
_TONE_MARKS = {"a": "āáǎà", "e": "ēéěè", "i": "īíǐì", "o": "ōóǒò", "u": "ūúǔù", "ü": "ǖǘǚǜ"}
_MARKED = {m for marks in _TONE_MARKS.values() for m in marks}
_PINYIN_SYLLABLE = re.compile(r"^[a-zü" + "".join(sorted(_MARKED)) + r"]{1,7}[1-5]?$")
_CMU_PHONE = re.compile(r"^[A-Z]{1,3}[0-2]?$")


def word_key(word: str) -> str:
    """What makes two words the same entry: Unicode NFC, case-folded."""
    return unicodedata.normalize("NFC", word).casefold()


def voice_scope(voice_id: str) -> str:
    """The scope of the entries of one voice (any case of its id)."""
    return VOICE_SCOPE_PREFIX + word_key(voice_id)


def key_scope(key_id: str) -> str:
    """The scope of the entries of one API key, by the key's id (a digest: never the key itself)."""
    return _KEY_PREFIX + key_id


def scope_kind(scope: str) -> str:
    """What a scope is, as the API shows it: global, voice or api_key."""
    if scope.startswith(VOICE_SCOPE_PREFIX):
        return "voice"
    return "api_key" if scope.startswith(_KEY_PREFIX) else "global"


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _text_field(value: object, name: str, param: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string, not {_shown(value)}", param=param)
    value = " ".join(unicodedata.normalize("NFC", value).split())
    if not value:
        return None
    if len(value) > MAX_PRONUNCIATION_LENGTH:
        raise InvalidRequest(f"{name} has {len(value)} characters; at most {MAX_PRONUNCIATION_LENGTH}", param=param)
    if _NOT_IN_WORDS.search(value):
        raise InvalidRequest(f"{name} may not hold brackets, '<', '>', '|' or control characters", param=param)
    return value


def check_word(word: object, param: str = "word") -> str:
    """``word`` in NFC with its whitespace collapsed, if it is a valid lexicon word; else InvalidRequest."""
    if not isinstance(word, str):
        raise InvalidRequest(f"a word must be a string, not {_shown(word)}", param=param)
    word = " ".join(unicodedata.normalize("NFC", word).split())
    if not word:
        raise InvalidRequest("a word must not be empty", param=param)
    if len(word) > MAX_WORD_LENGTH:
        raise InvalidRequest(f"word {_shown(word)} has {len(word)} characters; at most {MAX_WORD_LENGTH}", param=param)
    if _NOT_IN_WORDS.search(word):
        raise InvalidRequest(f"word {_shown(word)} may not hold brackets, '<', '>', '|' or control characters", param)
    if not any(ch.isalnum() for ch in word):
        raise InvalidRequest(f"word {_shown(word)} has no letter or digit", param=param)
    return word


# -- pinyin and CMU as inline tokens --------------------------------------------------------------


def _syllable_units(syllable: str, param: str) -> tuple[str, str]:
    """(initial, final with its tone mark) of one pinyin syllable (``qing4`` -> ``q``, ``ìng``)."""
    original = syllable
    syllable = syllable.lower().replace("u:", "ü")
    if not _PINYIN_SYLLABLE.match(syllable):
        raise InvalidRequest(
            f"pinyin syllable {_shown(original)} is not letters with a tone number 1-5 (chong2 qing4) or a tone "
            "mark (chóng qìng)",
            param=param,
        )
    tone = int(syllable[-1]) if syllable[-1].isdigit() else 5
    body = syllable.rstrip("12345")
    initial = next((i for i in _INITIALS if body.startswith(i) and len(body) > len(i)), "")
    final = body[len(initial) :]
    if any(ch in _MARKED for ch in final):
        if tone != 5:
            raise InvalidRequest(f"pinyin syllable {_shown(original)} has both a tone mark and a number", param=param)
        return initial, final.replace("ü", "v") if len(final) > 1 else final
    final = final.replace("v", "ü")
    if tone == 5:
        return initial, final.replace("ü", "v") if len(final) > 1 else final
    if "a" in final:
        vowel = final.index("a")
    elif "e" in final:
        vowel = final.index("e")
    elif "ou" in final:
        vowel = final.index("o")
    else:
        vowel = max((i for i, ch in enumerate(final) if ch in "iouü"), default=-1)
    if vowel < 0:
        raise InvalidRequest(f"pinyin syllable {_shown(original)} has no vowel to carry its tone", param=param)
    marked = final[:vowel] + _TONE_MARKS[final[vowel]][tone - 1] + final[vowel + 1 :]
    # The vocabulary writes ü as v inside longer finals (lüe4 -> [l][vè]) and as ü alone (lü3 -> [l][ǚ]).
    return initial, marked.replace("ü", "v") if len(marked) > 1 else marked


def pinyin_tokens(pinyin: str, param: str = "pinyin") -> list[str]:
    """The inline tokens of a pinyin reading: ``chong2 qing4`` -> ``[ch] [óng] [q] [ìng]``."""
    tokens = []
    for syllable in pinyin.replace("'", " ").split():
        initial, final = _syllable_units(syllable, param)
        tokens += ([f"[{initial}]"] if initial else []) + [f"[{final}]"]
    if not tokens:
        raise InvalidRequest("pinyin is empty", param=param)
    return tokens


def cmu_tokens(cmu: str, param: str = "cmu") -> list[str]:
    """The inline tokens of CMU phonemes: ``HH AH0 L OW1`` -> ``[HH] [AH0] [L] [OW1]``."""
    tokens = []
    for phone in cmu.split():
        if not _CMU_PHONE.match(phone.upper()):
            raise InvalidRequest(
                f"CMU phone {_shown(phone)} is not an ARPAbet phone with an optional stress 0-2 (HH AH0 L OW1)",
                param=param,
            )
        tokens.append(f"[{phone.upper()}]")
    if not tokens:
        raise InvalidRequest("cmu is empty", param=param)
    return tokens


# -- entries --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pronunciation:
    """One lexicon entry: its word, and pinyin (with tones), CMU phonemes and / or a respelling.

    Pinyin and CMU together are refused (a word is read one way); a respelling may go with either (it
    is what families without inline pronunciation tokens speak). Plain strings only: it crosses to
    engine replicas inside a request.
    """

    word: str
    pinyin: str | None = None
    cmu: str | None = None
    respelling: str | None = None

    def __post_init__(self) -> None:
        param = "word"
        word = check_word(self.word, param)
        object.__setattr__(self, "word", word)
        for name in FIELDS:
            object.__setattr__(self, name, _text_field(getattr(self, name), name, name))
        if self.pinyin is None and self.cmu is None and self.respelling is None:
            raise InvalidRequest(f"the entry for {_shown(word)} needs pinyin, cmu or respelling", param="pinyin")
        if self.pinyin is not None and self.cmu is not None:
            raise InvalidRequest(f"the entry for {_shown(word)} has both pinyin and cmu: give one", param="cmu")
        if self.pinyin is not None:
            pinyin_tokens(self.pinyin)  # its form is checked now; its tokens against a vocabulary when used
        if self.cmu is not None:
            cmu_tokens(self.cmu)

    @property
    def key(self) -> str:
        return word_key(self.word)

    @property
    def tokens(self) -> list[str] | None:
        """Its inline pronunciation tokens (pinyin or CMU), or None for a respelling only."""
        if self.pinyin is not None:
            return pinyin_tokens(self.pinyin)
        return cmu_tokens(self.cmu) if self.cmu is not None else None

    def as_dict(self) -> dict[str, str | None]:
        return {"word": self.word, "pinyin": self.pinyin, "cmu": self.cmu, "respelling": self.respelling}

    @classmethod
    def of(cls, word: object, value: object, param: str = "pronunciations") -> Pronunciation:
        """An entry from the request form: ``value`` a respelling string, or an object with pinyin / cmu /
        respelling."""
        if isinstance(value, str):
            return cls(check_word(word, param), respelling=value)
        if not isinstance(value, Mapping):
            raise InvalidRequest(
                f"{param}: the entry for {_shown(word)} must be a respelling string or an object with pinyin, cmu "
                f"or respelling, not {_shown(value)}",
                param=param,
            )
        unknown = set(value) - set(FIELDS) - {"word"}
        if unknown:
            raise InvalidRequest(
                f"{param}: unknown field(s) {', '.join(sorted(map(str, unknown)))} in the entry for {_shown(word)}: "
                f"an entry has {', '.join(FIELDS)}",
                param=param,
            )
        try:
            return cls(check_word(word, param), **{k: value.get(k) for k in FIELDS})
        except InvalidRequest as exc:
            raise InvalidRequest(f"{param}: {exc.message}", param=param) from exc


def parse_pronunciations(value: Any, param: str = "pronunciations") -> tuple[Pronunciation, ...]:
    """A request's ``pronunciations``: ``{word: respelling | {pinyin | cmu | respelling}}`` or a list of
    ``{"word": ..., ...}`` objects; None is none. At most :data:`MAX_REQUEST_ENTRIES`; one entry a word."""
    if value is None:
        return ()
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, list):
        items = []
        for item in value:
            if not isinstance(item, Mapping) or "word" not in item:
                raise InvalidRequest(f"{param}: each item of the list is an object with a word", param=param)
            items.append((item["word"], item))
    else:
        raise InvalidRequest(
            f'{param} must be an object {{"word": "respelling" or {{"pinyin": ...}}}} or a list of entries', param=param
        )
    if len(items) > MAX_REQUEST_ENTRIES:
        raise InvalidRequest(
            f"{param} has {len(items)} entries; at most {MAX_REQUEST_ENTRIES} a request (store more with "
            "POST /v1/pronunciations)",
            param=param,
        )
    entries = [Pronunciation.of(word, entry, param) for word, entry in items]
    seen: dict[str, str] = {}
    for entry in entries:
        if entry.key in seen:
            raise InvalidRequest(
                f"{param}: {_shown(seen[entry.key])} and {_shown(entry.word)} are the same word", param
            )
        seen[entry.key] = entry.word
    return tuple(entries)


# -- applying entries -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LexiconTarget:
    """What the lexicon's text is for: the family (its display name, whether it has inline pronunciation
    tokens) and the test of a token being in the tokenizer's vocabulary."""

    family: str
    inline_tokens: bool
    is_token: Callable[[str], bool]


class Lexicon:
    """Entries ready to apply to one model's text (see the module doc). ``stored``: the entries of the
    scopes the request reaches, most general first (a later one wins for the same word; one this model
    skips leaves the earlier one); ``requested``: the request's own, which win over all and are refused
    where they cannot apply (:meth:`with_requested` adds them to a lexicon of stored entries).

    Matching is a scan of the text with a dictionary lookup per candidate length (no regular expression:
    one of thousands of alternatives takes a minute to compile)."""

    def __init__(
        self,
        target: LexiconTarget,
        stored: Iterable[Pronunciation] = (),
        requested: Iterable[Pronunciation] = (),
    ) -> None:
        self.target = target
        self._spoken: dict[str, str] = {}  # word key -> what the model reads
        self._words: dict[str, str] = {}  # word key -> the word as written
        for entry in stored:
            self._add(entry, requested=False)
        for entry in requested:
            self._add(entry, requested=True)
        self._index()

    def with_requested(self, requested: Iterable[Pronunciation]) -> Lexicon:
        """This lexicon with a request's own entries over it (refused where they cannot apply)."""
        requested = list(requested)
        if not requested:
            return self
        lexicon = Lexicon.__new__(Lexicon)
        lexicon.target = self.target
        lexicon._spoken, lexicon._words = dict(self._spoken), dict(self._words)
        for entry in requested:
            lexicon._add(entry, requested=True)
        lexicon._index()
        return lexicon

    def __len__(self) -> int:
        return len(self._spoken)

    def _add(self, entry: Pronunciation, requested: bool) -> None:
        spoken = self._spoken_as(entry, requested)
        if spoken is not None:
            self._spoken[entry.key], self._words[entry.key] = spoken, entry.word

    def _index(self) -> None:
        keys = self._spoken
        self._first = frozenset(k[0] for k in keys)
        self._lengths = sorted({len(k) for k in keys}, reverse=True)  # longest first
        # Which ends of a word need a word boundary in the text (a Latin letter or digit there).
        self._edges = {
            k: (_LATIN_EDGE.match(w[0]) is not None, _LATIN_EDGE.match(w[-1]) is not None)
            for k, w in self._words.items()
        }
        self._prefixes: set[str] | None = None
        self._longest = self._lengths[0] if self._lengths else 0

    def _spoken_as(self, entry: Pronunciation, requested: bool) -> str | None:
        """What the model reads for ``entry``; None: skipped (a stored entry this family cannot use)."""
        source = "the request's" if requested else "the stored"
        tokens = entry.tokens
        if tokens is not None and self.target.inline_tokens:
            missing = [t for t in tokens if not self.target.is_token(t)]
            if missing and not requested:  # stored through a model of another family: not this request's fault
                log.warning(
                    "stored pronunciation of %r: %s has no token in the %s tokenizer; %s",
                    entry.word,
                    ", ".join(missing),
                    self.target.family,
                    "its respelling is used" if entry.respelling is not None else "skipped",
                )
                return entry.respelling
            if missing:
                field = "pinyin" if entry.pinyin is not None else "cmu"
                raise InvalidRequest(
                    f"{source} entry for {_shown(entry.word)}: {field} {_shown(getattr(entry, field))} makes "
                    f"{', '.join(missing)}, which the {self.target.family} tokenizer has no token for",
                    param="pronunciations" if requested else field,
                )
            return "".join(tokens)
        if entry.respelling is not None:
            return entry.respelling
        if not requested:
            return None
        field = "pinyin" if entry.pinyin is not None else "cmu"
        raise InvalidRequest(
            f"the entry for {_shown(entry.word)} has only {field}: the loaded {self.target.family} model has no "
            f"inline pronunciation tokens (Fun-CosyVoice3 has them); give a respelling for it",
            param="pronunciations",
        )

    @staticmethod
    def _folded(text: str) -> str:
        """``text`` case-folded character by character, the same length (a character whose folding is
        longer, ß, is kept as it is)."""
        folded = text.casefold()
        if len(folded) == len(text):
            return folded
        return "".join(f if len(f := ch.casefold()) == 1 else ch for ch in text)

    def apply(self, text: str) -> str:
        """``text`` with every entry's word replaced by what the model reads for it."""
        if not self._spoken or not text:
            return text
        folded = self._folded(text)
        protected = [(m.start(), m.end()) for m in _PROTECTED_RE.finditer(text)]
        out: list[str] = []
        size, done, i, p = len(text), 0, 0, 0
        while i < size:
            while p < len(protected) and protected[p][1] <= i:
                p += 1
            if p < len(protected) and protected[p][0] <= i:
                i = protected[p][1]
                continue
            found = self._match(text, folded, i, protected[p][0] if p < len(protected) else size)
            if found is None:
                i += 1
                continue
            length, spoken = found
            out += (text[done:i], spoken)
            i = done = i + length
        out.append(text[done:])
        return "".join(out)

    def _match(self, text: str, folded: str, i: int, limit: int) -> tuple[str, str] | None:
        """(the length, what is read) of the longest entry matching at ``i`` and ending by ``limit``."""
        if folded[i] not in self._first:
            return None
        after_word = i > 0 and _LATIN_EDGE.match(text[i - 1]) is not None
        for length in self._lengths:
            end = i + length
            if end > limit:
                continue
            key = folded[i:end]
            spoken = self._spoken.get(key)
            if spoken is None:
                continue
            left, right = self._edges[key]
            if (left and after_word) or (right and end < len(text) and _LATIN_EDGE.match(text[end])):
                continue
            return length, spoken
        return None

    def held_back(self, text: str) -> int:
        """How many characters at the end of ``text`` (text streamed so far) must wait for more text before
        the lexicon can apply to them: a trailing run of Latin letters / digits (the word may go on), or
        the longest end that begins an entry's word."""
        if self._prefixes is None:
            self._prefixes = {k[:n] for k in self._spoken for n in range(1, len(k))}
        run = 0
        while run < len(text) and _LATIN_EDGE.match(text[-1 - run]):
            run += 1
        tail = self._folded(text[-self._longest :]) if self._longest else ""
        begun = next((n for n in range(len(tail), 0, -1) if tail[-n:] in self._prefixes), 0)
        return min(len(text), max(run, begun))

    def apply_all(self, texts: list[str]) -> list[str]:
        return [self.apply(t) for t in texts] if self._spoken else texts
