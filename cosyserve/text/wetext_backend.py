"""The FST normaliser (the ``wetext`` wheel), made to write what WeTextProcessing 1.2.0 writes.

The official frontend ran WeTextProcessing 1.2.0's FSTs (through the wetext runtime); we run the FSTs
shipped in the wetext wheel, whose grammars agree on the words but not on everything around them:

- Chinese. The runtime sends only text with a digit through the FSTs. WeTextProcessing 1.2.0 built its
  Chinese FSTs with its defaults, so such text also went through its pre- and post-processing:
  traditional to simplified characters, full-width to half-width forms (``，`` -> ``,``, ``。`` -> ``.``,
  ``“”`` -> ``"``, ``Ａ１`` -> ``A1``...), interjections removed (``呃``, ``啊``) and erhua removed
  (``哪儿`` -> ``哪``). The wheel leaves those to options, off by default: we turn them on for the same
  texts, and only for them.
- English. A date's year keeps the commas around it in 1.2.0 (``March 3rd, 2025, we`` ->
  ``the third of march , twenty twenty five, we``); the wheel writes ``march, twenty twenty five we``
  (one comma moved, the other lost). The date tokens are rewritten between tagging and verbalising so
  that the commas stand where 1.2.0 puts them.
- Both. The wheel's verbaliser leaves the FST's escapes in its output (``\\"``, ``\\\\``); 1.2.0 removes them.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

log = logging.getLogger(__name__)

# What the Chinese FSTs of WeTextProcessing 1.2.0 did beyond the wheel's (the runtime's option names).
_ZH_FST_OPTIONS = {
    "traditional_to_simple": True,
    "full_to_half": True,
    "remove_interjections": True,
    "remove_erhua": True,
}
# The runtime's test for Chinese text that goes through the FSTs (erhua removal off, as the frontend asks).
_HAS_DIGIT = re.compile(r"\d")
_ESCAPED = re.compile(r"\\([\\\"])")
# A tagged date token and its fields: date { day: "3rd" month: "March" year: ", 2025," }
_DATE_TOKEN = re.compile(r'date \{((?:\s*\w+: "(?:[^"\\]|\\.)*")*)\s*\}')
_TOKEN_FIELD = re.compile(r'(\w+): "((?:[^"\\]|\\.)*)"')


def _date_token(fields: list[tuple[str, str]]) -> str:
    return "date { " + " ".join(f'{key}: "{value}"' for key, value in fields) + " }"


def _year_commas_as_1_2_0(match: re.Match[str]) -> str:
    """A date token whose year carries a comma, as tokens that verbalise with 1.2.0's commas."""
    fields = _TOKEN_FIELD.findall(match.group(1))
    year = next((value for key, value in fields if key == "year"), None)
    if year is None:
        return match.group(0)
    leading, trailing = year.lstrip().startswith(","), year.rstrip().endswith(",")
    if not (leading or trailing):
        return match.group(0)
    rest = [(key, value) for key, value in fields if key != "year"]
    bare_year = ("year", year.strip().strip(",").strip())
    if leading and rest:  # "march , twenty twenty five": the day and month, a spaced comma, the year
        tokens = f'{_date_token(rest)} p {{ v: " , " }} {_date_token([bare_year])}'
    else:
        tokens = _date_token([*rest, bare_year])
    return tokens + (' p { v: ", " }' if trailing else "")


class WeTextBackend:
    """One wetext normaliser per process, built on first use (its FSTs ship in the wheel)."""

    _lock = threading.Lock()
    _normalizer: Any = None

    @staticmethod
    def available() -> bool:
        try:
            import wetext  # noqa: F401
        except ImportError:
            return False
        return True

    @classmethod
    def _get(cls) -> Any:
        if cls._normalizer is None:
            with cls._lock:
                if cls._normalizer is None:
                    from wetext import Normalizer

                    cls._normalizer = Normalizer(remove_erhua=False)
        return cls._normalizer

    @classmethod
    def normalize(cls, text: str, lang: str) -> str:
        """``text`` normalised as WeTextProcessing 1.2.0 would (``lang``: zh or en); on an FST failure the
        text as it came.

        The reference leaves lang at wetext's "auto"; naming the branch's language gives the same result
        except for an all-digit text in the en branch, which "auto" reads as Chinese.
        """
        try:
            if lang == "zh":
                options = _ZH_FST_OPTIONS if _HAS_DIGIT.search(text) else {}
                out = cls._get().normalize(text, lang="zh", **options)
            else:
                out = cls._english(text)
        except Exception as exc:
            # An FST without a path for some input must not fail the request: keep the text as is. Ordinary
            # user text can do this, so one line (the traceback only at debug level).
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            log.warning("wetext failed on a %d-character text (%s); using it unnormalised", len(text), reason)
            log.debug("wetext traceback", exc_info=True)
            return text
        return _ESCAPED.sub(r"\1", out)

    @classmethod
    def _english(cls, text: str) -> str:
        from wetext import postprocess, preprocess, reorder, tag, verbalize

        cls._get()  # the runtime's FSTs are loaded with the module: built once, under the lock
        prepared = preprocess(text.strip())
        if not prepared:
            return prepared
        tagged = _DATE_TOKEN.sub(_year_commas_as_1_2_0, tag(prepared, "en", "tn"))
        return postprocess(verbalize(reorder(tagged, "en", "tn"), "en", "tn"))
