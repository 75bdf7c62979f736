"""Text normalisation and sentence splitting in front of the LLM (spec §5).

``TextNormalizer.normalize`` follows the reference ``text_normalize``: an optional WeText (FST)
pass, the string rules of the zh / en branch, ``split_paragraph`` and the removal of
punctuation-only pieces. The proprietary ``ttsfrd`` back-end is not available.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import regex

from cosyserve.errors import ModelLoadError
from cosyserve.text.numbers import chinese_prepass, english_prepass
from cosyserve.text.tokenizers import TextTokenizer
from cosyserve.text.wetext_backend import WeTextBackend

log = logging.getLogger(__name__)

BACKENDS = ("auto", "wetext", "none")

_CHINESE = re.compile(r"[\u4e00-\u9fff]")
_ONLY_PUNCTUATION = regex.compile(r"^[\p{P}\p{S}]*$")
_TRAILING_COMMAS = re.compile(r"[，,、]+$")
_LEADING_TAGS = re.compile(r"^(?:<\|[^|<>]{1,32}\|>)+")
# Inline pronunciation tokens already in a text (Fun-CosyVoice3: pinyin units [j][ǐ], CMU phones [AH0]):
# normalisation must leave them whole (the number spelling would read [AH0] as [AHzero]). Each run of
# them is replaced by one private-use character while the text is normalised, then put back.
_INLINE_TOKENS = re.compile(r"(?:\[(?:[A-Z]{1,3}[0-2]?|[a-zA-Zāáǎàēéěèīíǐìōóǒòūúǔùǖǘǚǜü]{1,6})\])+")
_PRIVATE_USE = re.compile("[\ue000-\uf8ff]")
_PLACEHOLDER_BASE, _PLACEHOLDERS = 0xE000, 0x1900

# The marks split_paragraph cuts after (the reference's), by language; the commas it cuts at on request; the
# closing quotes that stay with the sentence they close. The streaming segmenter cuts at the same marks.
ZH_STOPS = frozenset("。？！；：、.?!;")
EN_STOPS = frozenset(".?!;:")
COMMAS = frozenset("，,")
CLOSING_QUOTES = frozenset('"”')

TOKEN_MAX_N = 80
TOKEN_MIN_N = 60
MERGE_LEN = 20
# No segment is ever longer than this many text tokens, punctuation or not, in either language (a rare
# CJK character can be three tokens). The LLM may generate up to 20 speech tokens per text token and the
# flow attends over all of them, so one unpunctuated 4,000-character "sentence" would otherwise cost tens
# of gigabytes. It is well above what the reference's splitting gives ordinary text (its merge target is
# 80; a 96-character Chinese sentence of the golden set is 178 Qwen tokens), so such text is split
# exactly as the reference splits it.
SEGMENT_MAX_N = 200
# Where an over-long run is cut when it has one of these (else anywhere within the bound).
_SOFT_BREAKS = frozenset(" ，,、\n\t")


def contains_chinese(text: str) -> bool:
    """True when ``text`` has a CJK unified ideograph (the only language test the reference makes)."""
    return _CHINESE.search(text) is not None


def is_only_punctuation(text: str) -> bool:
    """True for the empty string and strings of Unicode punctuation / symbols only."""
    return _ONLY_PUNCTUATION.match(text) is not None


def protect_inline_tokens(text: str) -> tuple[str, list[str]]:
    """``text`` with each run of inline pronunciation tokens replaced by a private-use character, and the
    runs (none, and the text as it is, when it has private-use characters of its own or too many runs)."""
    runs = [m.group() for m in _INLINE_TOKENS.finditer(text)]
    if not runs or len(runs) > _PLACEHOLDERS or _PRIVATE_USE.search(text):
        return text, []
    counter = iter(range(len(runs)))
    return _INLINE_TOKENS.sub(lambda _: chr(_PLACEHOLDER_BASE + next(counter)), text), runs


def restore_inline_tokens(text: str, runs: list[str]) -> str:
    """The inverse of :func:`protect_inline_tokens` on (a piece of) the normalised text."""
    if not runs:  # nothing was replaced (the text's own private-use characters stay)
        return text
    return _PRIVATE_USE.sub(lambda m: runs[ord(m.group()) - _PLACEHOLDER_BASE], text)


def replace_blank(text: str) -> str:
    """Drop every ASCII space unless both neighbours are ASCII and not a space (keeps 'new line')."""

    def keeps_space(ch: str) -> bool:
        return ch.isascii() and ch != " "

    return "".join(
        ch
        for i, ch in enumerate(text)
        if ch != " " or (0 < i < len(text) - 1 and keeps_space(text[i - 1]) and keeps_space(text[i + 1]))
    )


def replace_corner_mark(text: str) -> str:
    return text.replace("²", "平方").replace("³", "立方")


def remove_bracket(text: str) -> str:
    for mark in ("（", "）", "【", "】", "`"):
        text = text.replace(mark, "")
    return text.replace("——", " ")


@cache
def _inflect_engine() -> Any:
    import inflect  # on first use: importing inflect takes over a second

    return inflect.engine()


def _number_to_words(digits: str) -> str:
    from inflect import NumOutOfRangeError

    engine = _inflect_engine()
    try:
        return engine.number_to_words(digits)
    except NumOutOfRangeError:
        # The reference raises here (runs of 36+ digits); read such runs digit by digit instead.
        return " ".join(engine.number_to_words(d) for d in digits)


def spell_out_number(text: str) -> str:
    """Replace every maximal run of ``str.isdigit()`` characters by its English words."""
    out: list[str] = []
    start: int | None = None
    for i, ch in enumerate(text):
        if ch.isdigit():
            if start is None:
                start = i
            continue
        if start is not None:
            out.append(_number_to_words(text[start:i]))
            start = None
        out.append(ch)
    if start is not None:
        out.append(_number_to_words(text[start:]))
    return "".join(out)


def split_paragraph(
    text: str,
    tokenize: Callable[[str], list[int]],
    lang: str = "zh",
    token_max_n: int = TOKEN_MAX_N,
    token_min_n: int = TOKEN_MIN_N,
    merge_len: int = MERGE_LEN,
    comma_split: bool = False,
    segment_max_n: int = SEGMENT_MAX_N,
) -> list[str]:
    """Cut ``text`` after sentence punctuation, then greedily merge the pieces (spec §5.3).

    Lengths are characters for ``lang='zh'`` and ``len(tokenize(piece))`` otherwise. Unlike the
    reference, a run without sentence punctuation longer than ``segment_max_n`` text tokens is cut
    too, and no merge makes a sentence longer than that.
    """
    if not text:
        return []

    def tokens(piece: str) -> int:
        return len(tokenize(piece))

    def length(piece: str) -> int:
        return len(piece) if lang == "zh" else tokens(piece)

    stops = ZH_STOPS if lang == "zh" else EN_STOPS
    if comma_split:
        stops = stops | COMMAS
    if text[-1] not in stops:
        text += "。" if lang == "zh" else "."

    pieces: list[str] = []
    start = 0
    for i, ch in enumerate(text):
        if ch not in stops:
            continue
        # A stop right after another one yields an empty piece: the second mark is dropped.
        if i > start:
            pieces.append(text[start:i] + ch)
        if i + 1 < len(text) and text[i + 1] in CLOSING_QUOTES and pieces:
            pieces[-1] += text[i + 1]
            start = i + 2
        else:
            start = i + 1

    pieces = [bounded for piece in pieces for bounded in cut_to_bound(piece, tokens, segment_max_n)]
    sentences: list[str] = []
    current = ""
    for piece in pieces:
        merged = current + piece
        reference_flush = length(merged) > token_max_n and length(current) > token_min_n
        if current and (reference_flush or tokens(merged) > segment_max_n):
            sentences.append(current)
            current = ""
        current += piece
    if current:
        if sentences and length(current) < merge_len and tokens(sentences[-1] + current) <= segment_max_n:
            sentences[-1] += current
        else:
            sentences.append(current)
    return sentences


def cut_to_bound(text: str, length: Callable[[str], int], max_n: int = SEGMENT_MAX_N) -> list[str]:
    """``text`` as consecutive pieces of at most ``max_n`` by ``length``; text within the bound is kept whole.

    A piece ends at the last space or comma that keeps it within the bound and in its second half,
    else at the longest prefix within the bound, never inside a ``<|...|>`` special token.
    """
    pieces: list[str] = []
    while length(text) > max_n:
        # The longest prefix within the bound, by bisection: a prefix never has more tokens than a longer one
        # has (up to BPE merges at the cut, which the check below catches).
        low, high = 1, len(text) - 1
        while low < high:
            mid = (low + high + 1) // 2
            if length(text[:mid]) <= max_n:
                low = mid
            else:
                high = mid - 1
        end = low
        tag_start = text.rfind("<|", 0, end)
        if tag_start > 0 and text.find("|>", tag_start, end + 1) < 0:
            end = tag_start  # do not cut a special token in two
        soft = next((i for i in range(end - 1, end // 2, -1) if text[i] in _SOFT_BREAKS), -1)
        if soft > 0 and length(text[: soft + 1]) <= max_n:
            end = soft + 1
        pieces.append(text[:end])
        text = text[end:]
    if text:
        pieces.append(text)
    return pieces


class TextNormalizer:
    """The reference ``text_normalize`` with a choice of back-end.

    ``backend``: "wetext" (FST normalisation, the ``wetext`` package), "none" (string rules only)
    or "auto" (wetext when importable). The tokenizer measures English sentence lengths.
    """

    def __init__(self, tokenizer: TextTokenizer, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown text normaliser back-end '{backend}' (expected one of {', '.join(BACKENDS)})")
        if backend == "auto":
            backend = "wetext" if WeTextBackend.available() else "none"
        elif backend == "wetext" and not WeTextBackend.available():
            raise ModelLoadError("text normaliser back-end 'wetext' requested but the wetext package is not installed")
        self.tokenizer = tokenizer
        self.backend = backend

    def normalize(
        self, text: str | Iterator[str], split: bool = True, text_frontend: bool = True
    ) -> list[str] | str | list[Iterator[str]]:
        """Normalise ``text``; with ``split`` return the list of sentences to synthesise one by one.

        A streamed input (an iterator of text pieces) is returned untouched as ``[text]``. Text
        holding both ``<|`` and ``|>`` (language / system tags) is neither normalised nor split, unless it is
        over :data:`SEGMENT_MAX_N` tokens.
        """
        if not isinstance(text, str):
            return [text]
        if not text_frontend or text == "":
            return [text] if split else text  # the caller's choice: exactly the reference's segments
        if "<|" in text and "|>" in text:
            return self._bounded(text) if split else text
        text, inline = protect_inline_tokens(text.strip())
        if inline:
            normalized = self._normalize_text(text, split)
            if isinstance(normalized, str):
                return restore_inline_tokens(normalized, inline)
            return [restore_inline_tokens(piece, inline) for piece in normalized]
        return self._normalize_text(text, split)

    def _normalize_text(self, text: str, split: bool) -> list[str] | str:
        if contains_chinese(text):
            text = self._normalize_zh(text)
            lang = "zh"
        else:
            text = self._normalize_en(text)
            lang = "en"
        if not split:
            return text
        pieces = split_paragraph(text, self.tokenizer.encode, lang)
        return [p for p in pieces if not is_only_punctuation(p)]

    def normalize_span(self, text: str, lang: str) -> str:
        """One piece of a longer text (an SSML span), in the branch of the whole (``lang``: "zh" | "en"):
        as ``normalize(split=False)``, but the piece keeps its outer white space and a trailing comma
        (the text goes on after it). Tagged text (``<|...|>``) is left alone."""
        body = text.strip()
        if not body or ("<|" in text and "|>" in text):
            return text
        lead = " " if text[0].isspace() else ""
        trail = " " if text[-1].isspace() else ""
        body, inline = protect_inline_tokens(body)
        body = self._normalize_zh(body, whole=False) if lang == "zh" else self._normalize_en(body)
        return lead + restore_inline_tokens(body, inline) + trail

    def split(self, text: str) -> list[str]:
        """Normalised text cut into segments as :meth:`normalize` cuts them (no normalisation here)."""
        if "<|" in text and "|>" in text:
            return self._bounded(text)
        text = text.strip()
        pieces = split_paragraph(text, self.tokenizer.encode, "zh" if contains_chinese(text) else "en")
        return [p for p in pieces if not is_only_punctuation(p)]

    def _bounded(self, text: str) -> list[str]:
        """Tagged text, which the frontend leaves alone: one segment as in the reference unless it is over
        :data:`SEGMENT_MAX_N` tokens; then cut, each piece keeping the leading tags (``<|en|>``...)."""

        def length(piece: str) -> int:
            return len(self.tokenizer.encode(piece))

        if not text or length(text) <= SEGMENT_MAX_N:
            return [text]
        tags = _LEADING_TAGS.match(text)
        prefix = tags.group() if tags else ""
        body = text[len(prefix) :]
        pieces = cut_to_bound(body, length, SEGMENT_MAX_N - length(prefix))
        return [prefix + piece for piece in pieces]

    def _normalize_zh(self, text: str, whole: bool = True) -> str:
        if self.backend == "wetext":
            text = WeTextBackend.normalize(chinese_prepass(text), "zh")
        text = text.replace("\n", "")
        text = replace_blank(text)
        text = replace_corner_mark(text)
        text = text.replace(".", "。")
        text = text.replace(" - ", "，")
        text = remove_bracket(text)
        return _TRAILING_COMMAS.sub("。", text) if whole else text

    def _normalize_en(self, text: str) -> str:
        if self.backend == "wetext":
            text = WeTextBackend.normalize(english_prepass(text), "en")
        return spell_out_number(text)
