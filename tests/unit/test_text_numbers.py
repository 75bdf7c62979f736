"""Numbers, currency, dates, times, phone numbers and percentages through the wetext back-end (issue 14).

Each case is ``(text, expected words, how the expectation was set)``:
- "official": WeTextProcessing 1.2.0 (the official normaliser) reads it so, and the wetext wheel did
  not (the class our pre-pass fixes);
- "both": both FSTs agree and are right (kept here so a pre-pass cannot break them);
- "ours": both FSTs misread it (a dropped word, a phone number read as a range or a subtraction, a
  crash); the expected words are ours.
Outputs are compared after the English-branch spelling (``normalize(split=False)``).
"""

from __future__ import annotations

import logging

import pytest
from resources import import_or_missing

from cosyserve.text.normalize import TextNormalizer
from cosyserve.text.numbers import english_cardinal
from cosyserve.text.wetext_backend import WeTextBackend

import_or_missing("wetext")

ENGLISH = [
    ("$1,299", "one thousand two hundred and ninety nine dollars", "official"),
    ("$1,299.99", "one thousand two hundred and ninety nine point nine nine dollars", "official"),
    ("$1,000", "one thousand dollars", "official"),
    ("€1,500", "one thousand five hundred euros", "official"),
    ("It costs $1,299.", "It costs one thousand two hundred and ninety nine dollars.", "official"),
    ("1,299", "one thousand two hundred and ninety nine", "ours"),
    ("1,000 people", "one thousand people", "ours"),
    ("555-1234", "five five five, one two three four", "ours"),
    ("Call 555-1234 today.", "Call five five five, one two three four today.", "ours"),
    ("+1 555 123 4567", "plus one, five five five, one two three, four five six seven", "ours"),
    ("call 555-123-4567", "call five five five, one two three, four five six seven", "both"),
    ("(555) 123-4567", "five five five, one two three, four five six seven", "both"),
    ("+1 (555) 123-4567", "plus one, five five five, one two three, four five six seven", "both"),
    ("$12,345", "twelve thousand three hundred and forty five dollars", "both"),
    ("I paid $3,500 for 2,000 shares.", "I paid three thousand five hundred dollars for two thousand shares.", "both"),
    ("1,234,567", "one million two hundred thirty four thousand five hundred and sixty seven", "both"),
    ("$45.99", "forty five point nine nine dollars", "both"),
    ("£15", "fifteen pounds", "both"),
    ("pages 10-20", "pages ten to twenty", "both"),
    ("2020-2021", "two thousand and twenty to two thousand and twenty one", "both"),
    ("50%", "fifty percent", "both"),
    ("12.5%", "twelve point five percent", "both"),
    ("10:30 am", "ten thirty AM", "both"),
    ("7:05", "seven o five", "both"),
    ("on 2024-05-01", "on the first of may twenty twenty four", "both"),
    ("05/01/2024", "the first of may twenty twenty four", "both"),
    ("in 1999", "in nineteen ninety nine", "both"),
]

CHINESE = [
    ("售价1,299美元", "售价一千二百九十九美元", "ours"),
    ("售价$1,299", "售价一千二百九十九美元", "ours"),
    ("一共1,234,567人", "一共一百二十三万四千五百六十七人", "ours"),
    ("电话555-1234", "电话五五五幺二三四", "ours"),
    ("电话+86 138 1234 5678", "电话加八六幺三八幺二三四五六七八", "ours"),
    ("价格是1,299元", "价格是一千二百九十九元", "both"),
    ("一共12,345元", "一共一万二千三百四十五元", "both"),
    ("电话13812345678", "电话幺三八幺二三四五六七八", "both"),
    ("拨打010-12345678", "拨打零一零一二三四五六七八", "both"),
    ("今天是2024年5月1日", "今天是二零二四年五月一日", "both"),
    ("日期2024-05-01", "日期二零二四年五月一日", "both"),
    ("下午3:30开会", "下午三点三十分开会", "both"),
    ("增长了12.5%", "增长了百分之十二点五", "both"),
    ("气温-3.5度", "气温负三点五度", "both"),
    ("第1名", "第一名", "both"),
    ("第10-20页", "第十到二十页", "both"),
]


class WordTokenizer:
    def encode(self, text: str) -> list[str]:
        return text.split()


@pytest.fixture(scope="module")
def normalizer() -> TextNormalizer:
    return TextNormalizer(WordTokenizer(), backend="wetext")


@pytest.mark.parametrize(("text", "expected", "source"), ENGLISH + CHINESE, ids=[c[0] for c in ENGLISH + CHINESE])
def test_number_classes_read_in_full(normalizer, text, expected, source):
    assert normalizer.normalize(text, split=False) == expected, source


@pytest.mark.parametrize(
    ("n", "words"),
    [
        (0, "zero"),
        (101, "one hundred and one"),
        (1001, "one thousand and one"),
        (1500, "one thousand five hundred"),
        (1999, "one thousand nine hundred and ninety nine"),
        (123456, "one hundred twenty three thousand four hundred and fifty six"),
        (2_000_000_000, "two billion"),
    ],
)
def test_english_cardinal_words(n, words):
    assert english_cardinal(n) == words


def test_wetext_failure_is_one_warning_line(monkeypatch, caplog, normalizer):
    class Broken:
        def normalize(self, text, lang, **options):
            assert len(text) == 0  # what wetext's token parser does on some inputs

    monkeypatch.setattr(WeTextBackend, "_normalizer", Broken())
    with caplog.at_level(logging.DEBUG, logger="cosyserve.text.wetext_backend"):
        out = normalizer.normalize("房间12号准备好了", split=False)
    assert out == "房间12号准备好了"  # unnormalised by the FST, then the string rules of the zh branch
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "wetext failed" in warnings[0].getMessage()
    assert warnings[0].exc_info is None and "Traceback" not in caplog.text.split("wetext traceback")[0]
