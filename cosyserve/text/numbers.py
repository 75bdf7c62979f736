"""Our reading of the number classes the ``wetext`` FSTs get wrong, applied before them (issue 14).

Compared with WeTextProcessing 1.2.0 (the official normaliser; see tests/unit/test_text_numbers.py
for the table of cases) the wheel's English grammar drops the leading "one" of a currency amount
from 1,000 to 1,999 ("$1,299" -> "thousand two hundred ... dollars") and fails outright on an
international phone number written with spaces ("+1 555 123 4567"). Both grammars also drop that
"one" from a bare "1,299", read a local phone number "555-1234" as a range (in Chinese as a
subtraction), read "+86 ..." in Chinese as "正八十六", and break Chinese readings of numbers with
thousands separators ("1,234,567" -> "一,两百三十四,..."). These classes are rewritten here, in the
official normaliser's words where it has them right; everything else is left to the FST.
"""

from __future__ import annotations

import re

import regex

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_TEENS = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_SCALES = ("", "thousand", "million", "billion", "trillion")
_CURRENCIES = {"$": "dollars", "€": "euros", "£": "pounds", "¥": "yen", "￥": "yen"}
_ZH_PHONE_DIGITS = dict(zip("0123456789", "零幺二三四五六七八九", strict=True))

# 1,000 to 1,999 (one thousands group), with an optional currency symbol and decimals (another currency
# symbol in front: left to the FST).
_EN_ONE_THOUSAND = regex.compile(r"(?<![0-9A-Za-z_.,\p{Sc}])([$€£¥￥]?)(1,[0-9]{3})(?:\.([0-9]+))?(?![0-9]|,[0-9])")
# A local phone number: exchange (2-9xx), hyphen, four digits; not a part of a longer run or range.
# (ASCII neighbours only: Chinese characters are word characters and may touch the number.)
_LOCAL_PHONE = re.compile(r"(?<![0-9A-Za-z_+\-.,])([2-9][0-9]{2})-([0-9]{4})(?![0-9A-Za-z_\-]|[.,][0-9])")
# An international number written with spaces: +CC then 2-5 groups of digits.
_INTERNATIONAL_PHONE = re.compile(r"(?<![0-9A-Za-z_+])\+([0-9]{1,3})((?: [0-9]{1,4}){2,5})(?![0-9A-Za-z_])")
# Chinese: digits with thousands separators; an international number (+CC, then digits, spaces, hyphens).
_GROUPED = re.compile(r"(?<![0-9,.])[0-9]{1,3}(?:,[0-9]{3})+(?![0-9]|,[0-9])")
_ZH_INTERNATIONAL_PHONE = re.compile(r"(?<![0-9A-Za-z_+])\+([0-9]{1,3})[ -]?((?:[0-9][ -]?){5,14}[0-9])(?![0-9])")


def _below_thousand(n: int) -> list[str]:
    words: list[str] = []
    if n >= 100:
        words += [_ONES[n // 100], "hundred"]
    rest = n % 100
    if rest >= 20:
        words.append(_TENS[rest // 10])
        if rest % 10:
            words.append(_ONES[rest % 10])
    elif rest >= 10:
        words.append(_TEENS[rest - 10])
    elif rest:
        words.append(_ONES[rest])
    return words


def english_cardinal(n: int) -> str:
    """``n`` (0 <= n < 10**15) in WeTextProcessing's words: "one thousand two hundred and ninety nine"."""
    if not 0 <= n < 10**15:
        raise ValueError(f"{n} is out of range")
    if n == 0:
        return "zero"
    groups = []
    while n:
        groups.append(n % 1000)
        n //= 1000
    words: list[str] = []
    for scale in range(len(groups) - 1, -1, -1):
        group = groups[scale]
        if not group:
            continue
        part = _below_thousand(group)
        # "and" before the last tens and units, when something comes before them.
        if scale == 0 and group % 100 and (group >= 100 or len(groups) > 1):
            tail = 2 if group % 100 >= 20 and group % 10 else 1
            part = [*part[:-tail], "and", *part[-tail:]]
        words += part + ([_SCALES[scale]] if scale else [])
    return " ".join(words)


def _english_digits(digits: str) -> str:
    return " ".join(_ONES[int(d)] for d in digits)


def _one_thousand(match: regex.Match[str]) -> str:
    symbol, grouped, decimals = match.groups()
    words = english_cardinal(int(grouped.replace(",", "")))
    if decimals:
        words += " point " + _english_digits(decimals)
    return f"{words} {_CURRENCIES[symbol]}" if symbol else words


def _local_phone(match: re.Match[str]) -> str:
    exchange, line = match.groups()
    return f"{_english_digits(exchange)}, {_english_digits(line)}"


def _international_phone(match: re.Match[str]) -> str:
    country, rest = match.groups()
    return ", ".join(["plus " + _english_digits(country), *(_english_digits(g) for g in rest.split())])


def english_prepass(text: str) -> str:
    """Rewrite the English number classes the FST misreads (see the module doc); the rest is untouched."""
    if not any(ch.isdigit() for ch in text):
        return text
    text = _INTERNATIONAL_PHONE.sub(_international_phone, text)
    text = _LOCAL_PHONE.sub(_local_phone, text)
    return _EN_ONE_THOUSAND.sub(_one_thousand, text)


def _zh_digits(digits: str) -> str:
    return "".join(_ZH_PHONE_DIGITS[d] for d in digits if d.isdigit())


def chinese_prepass(text: str) -> str:
    """Rewrite the Chinese-branch number classes the FST misreads (see the module doc)."""
    if not any(ch.isdigit() for ch in text):
        return text
    text = _ZH_INTERNATIONAL_PHONE.sub(lambda m: "加" + _zh_digits(m[1]) + _zh_digits(m[2]), text)
    text = _LOCAL_PHONE.sub(lambda m: _zh_digits(m[1]) + _zh_digits(m[2]), text)
    return _GROUPED.sub(lambda m: m[0].replace(",", ""), text)


# -- readings for SSML's <say-as> (cosyserve.text.ssml), in the words of the readings above ------------

_ZH_DIGITS = "零一二三四五六七八九"
_ZH_UNITS = ("", "十", "百", "千")
_ZH_GROUPS = ("", "万", "亿", "万亿")
_EN_ORDINALS = {
    "one": "first",
    "two": "second",
    "three": "third",
    "five": "fifth",
    "eight": "eighth",
    "nine": "ninth",
    "twelve": "twelfth",
}


def english_digits(digits: str) -> str:
    """Each ASCII digit of ``digits`` as its English word ("105" -> "one zero five"); others are dropped."""
    return _english_digits("".join(d for d in digits if d in "0123456789"))


def chinese_digits(digits: str, phone: bool = False) -> str:
    """Each ASCII digit as its Chinese character ("105" -> "一零五"; ``phone``: 1 is 幺, as phone numbers
    are read)."""
    if phone:
        return _zh_digits(digits)
    return "".join(_ZH_DIGITS[int(d)] for d in digits if d in "0123456789")


def english_ordinal(n: int) -> str:
    """``n`` (0 <= n < 10**15) as an English ordinal: 21 -> "twenty first", 100 -> "one hundredth"."""
    words = english_cardinal(n).split(" ")
    last = words[-1]
    if last in _EN_ORDINALS:
        last = _EN_ORDINALS[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return " ".join([*words[:-1], last])


def _chinese_below_ten_thousand(n: int) -> str:
    out, zero = "", False
    digits = str(n)
    for i, d in enumerate(digits):
        if d == "0":
            zero = True
            continue
        if zero and out:
            out += "零"
        zero = False
        out += _ZH_DIGITS[int(d)] + _ZH_UNITS[len(digits) - 1 - i]
    return out


def chinese_cardinal(n: int) -> str:
    """``n`` (0 <= n < 10**16) in Chinese: 10010 -> "一万零一十", 15 -> "十五"."""
    if not 0 <= n < 10**16:
        raise ValueError(f"{n} is out of range")
    if n == 0:
        return "零"
    groups = []
    while n:
        groups.append(n % 10000)
        n //= 10000
    out, skipped = "", False
    for i in range(len(groups) - 1, -1, -1):
        group = groups[i]
        if not group:
            skipped = True
            continue
        if out and (skipped or group < 1000):
            out += "零"
        out += _chinese_below_ten_thousand(group) + _ZH_GROUPS[i]
        skipped = False
    return out[1:] if out.startswith("一十") else out
