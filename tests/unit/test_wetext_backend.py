"""The wetext back-end writes what WeTextProcessing 1.2.0 writes around the words (expected values: the
1.2.0 FSTs run through the wetext runtime on the same inputs)."""

from __future__ import annotations

import pytest
from resources import import_or_missing

from cosyserve.text.wetext_backend import WeTextBackend

import_or_missing("wetext")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # No digit: the runtime leaves Chinese text to the string rules, full-width marks and all.
        ("收到好友的礼物，笑容如花儿般绽放。", "收到好友的礼物，笑容如花儿般绽放。"),
        # A digit: 1.2.0's post-processing (full-width forms, interjections, erhua, traditional characters).
        ("他说：“明天8点，不见不散！”（真的？）", '他说:"明天八点,不见不散!"(真的?)'),
        ("呃，我有3个哥哥啊。", ",我有三个哥哥."),
        ("这儿有3个玩意儿，那儿也有。", "这有三个玩意,那也有."),
        ("這是3個繁體字，臺灣。", "这是三个繁体字,台湾."),
        ("全角ＡＢＣ１２３，半角abc。", "全角ABC一百二十三,半角abc."),
    ],
)
def test_chinese_text_with_digits_gets_the_1_2_0_post_processing(text: str, expected: str) -> None:
    assert WeTextBackend.normalize(text, "zh") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("On March 3, 2025, we met.", "On the third of march , twenty twenty five, we met."),
        ("Dec 25, 2024.", "the twenty fifth of december , twenty twenty four."),
        ("It was January 2020, a cold month.", "It was january twenty twenty, a cold month."),
        ("On 3 March, 2025, ok.", "On the third of march twenty twenty five, ok."),
        ("March 3rd 2025 is here.", "the third of march twenty twenty five is here."),
        ("In 1999, 2000 and 2001, we left.", "In nineteen ninety nine, two thousand and two thousand one, we left."),
    ],
)
def test_english_dates_keep_the_commas_where_1_2_0_puts_them(text: str, expected: str) -> None:
    assert WeTextBackend.normalize(text, "en") == expected


def test_the_fst_escapes_do_not_reach_the_text() -> None:
    assert WeTextBackend.normalize('He said, "I have 3 cats."', "en") == 'He said, "I have three cats."'
    assert WeTextBackend.normalize('他说"3个"好', "zh") == '他说"三个"好'
