"""Unit tests of the text frontend: split_paragraph edge cases, string rules, tokenizer loading."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from resources import missing

from cosyserve.config import ConfigError, Node
from cosyserve.errors import ModelLoadError
from cosyserve.hub import AssetError, asset_path
from cosyserve.text.normalize import (
    TextNormalizer,
    contains_chinese,
    is_only_punctuation,
    remove_bracket,
    replace_blank,
    spell_out_number,
    split_paragraph,
)
from cosyserve.text.tokenizers import (
    COSYVOICE_TARGET,
    QWEN_TARGET,
    WHISPER_TARGET,
    cosyvoice_special_tokens,
    load_tokenizer,
    whisper_special_tokens,
)


class WordTokenizer:
    """One id per whitespace-separated word: makes English lengths easy to reason about."""

    def encode(self, text: str) -> list[int]:
        return [len(w) for w in text.split()]


def pieces(text: str, lang: str = "zh") -> list[str]:
    """split_paragraph with merging disabled: the raw punctuation pieces."""
    return split_paragraph(text, WordTokenizer().encode, lang, token_max_n=0, token_min_n=0, merge_len=0)


# --- split_paragraph -------------------------------------------------------------------------------


def test_split_empty_text() -> None:
    assert split_paragraph("", WordTokenizer().encode, "zh") == []
    assert split_paragraph("", WordTokenizer().encode, "en") == []


def test_split_appends_final_punctuation() -> None:
    assert pieces("你好") == ["你好。"]
    assert pieces("Hello", "en") == ["Hello."]
    assert pieces("你好！") == ["你好！"]


def test_split_language_punctuation_sets() -> None:
    assert pieces("一、二：三") == ["一、", "二：", "三。"]
    # ':' splits English but a full-width comma never splits (comma_split is off).
    assert pieces("a: b, c", "en") == ["a:", " b, c."]
    assert pieces("甲，乙") == ["甲，乙。"]
    assert split_paragraph("甲，乙", WordTokenizer().encode, "zh", 0, 0, 0, comma_split=True) == ["甲，", "乙。"]


def test_split_drops_consecutive_punctuation() -> None:
    assert pieces("你好？！再见。") == ["你好？", "再见。"]


def test_split_closing_quote_stays_with_sentence() -> None:
    assert pieces("他说：“走吧。”然后走了。") == ["他说：", "“走吧。”", "然后走了。"]
    assert pieces('He said "go." Then left.', "en") == ['He said "go."', " Then left."]


def test_split_quote_after_leading_punctuation_does_not_crash() -> None:
    # The reference pops from an empty list here; the quote starts the next piece instead.
    assert pieces("。”你好") == ["”你好。"]


def test_split_merge_thresholds_zh() -> None:
    # A piece is flushed only when adding the next one passes 80 AND the buffer is over 60 chars.
    p30 = "字" * 29 + "。"
    assert split_paragraph(p30 * 3, WordTokenizer().encode, "zh") == [p30 * 3]
    p31 = "字" * 30 + "。"
    assert split_paragraph(p31 * 3, WordTokenizer().encode, "zh") == [p31 * 2, p31]


def test_split_short_tail_is_merged_into_last_sentence() -> None:
    long_piece = "字" * 69 + "。"
    tail = "尾巴。"
    assert split_paragraph(long_piece * 2 + tail, WordTokenizer().encode, "zh") == [long_piece, long_piece + tail]
    tail20 = "字" * 19 + "。"
    assert split_paragraph(long_piece * 2 + tail20, WordTokenizer().encode, "zh") == [long_piece, long_piece, tail20]


def test_split_en_counts_tokens() -> None:
    sentence = " ".join(["w"] * 30) + "."  # 30 tokens for WordTokenizer
    out = split_paragraph(sentence * 4, WordTokenizer().encode, "en")
    assert "".join(out) == sentence * 4
    assert len(out) > 1


# --- string rules -----------------------------------------------------------------------------------


def test_contains_chinese() -> None:
    assert contains_chinese("abc中")
    assert not contains_chinese("abc。！")  # CJK punctuation alone is not Chinese
    assert not contains_chinese("カタカナ")


def test_is_only_punctuation() -> None:
    assert is_only_punctuation("")
    assert is_only_punctuation("。。！？")
    assert is_only_punctuation("+$")
    assert not is_only_punctuation("a.")


def test_replace_blank() -> None:
    assert replace_blank("new line 中文 测试") == "new line中文测试"
    assert replace_blank("Hello  world") == "Helloworld"
    assert replace_blank("a b ") == "a b"  # the reference raises IndexError on a trailing space


def test_remove_bracket() -> None:
    assert remove_bracket("（甲）【乙】`丙`——丁") == "甲乙丙 丁"


def test_spell_out_number() -> None:
    assert spell_out_number("born in 2024, 3 cats") == "born in two thousand and twenty-four, three cats"
    assert spell_out_number("10:30") == "ten:thirty"
    long_run = spell_out_number("9" * 60)  # inflect refuses; read digit by digit
    assert long_run == " ".join(["nine"] * 60)


# --- TextNormalizer ---------------------------------------------------------------------------------


def test_normalizer_backend_selection() -> None:
    with pytest.raises(ValueError, match="ttsfrd"):
        TextNormalizer(WordTokenizer(), backend="ttsfrd")
    assert TextNormalizer(WordTokenizer(), backend="none").backend == "none"
    try:
        import wetext  # noqa: F401

        expected = "wetext"
    except ImportError:
        expected = "none"
    assert TextNormalizer(WordTokenizer()).backend == expected


def test_normalize_empty_and_blank_text() -> None:
    norm = TextNormalizer(WordTokenizer(), backend="none")
    assert norm.normalize("") == [""]
    assert norm.normalize("", split=False) == ""
    assert norm.normalize("   ") == []
    assert norm.normalize("   ", split=False) == ""


def test_normalize_only_punctuation() -> None:
    norm = TextNormalizer(WordTokenizer(), backend="none")
    assert norm.normalize("。。！？") == []
    assert norm.normalize("。。！？", split=False) == "。。！？"


def test_normalize_tag_bypass_never_splits() -> None:
    norm = TextNormalizer(WordTokenizer(), backend="none")
    text = "<|en|>" + "Twelve 12 words here. " * 40
    assert norm.normalize(text) == [text]
    assert norm.normalize(text, split=False) == text
    # Both markers anywhere trigger the bypass, in any order.
    assert norm.normalize("a |> b <| 1") == ["a |> b <| 1"]


def test_normalize_text_frontend_false_keeps_text() -> None:
    norm = TextNormalizer(WordTokenizer(), backend="none")
    assert norm.normalize(" 1 2 ", text_frontend=False) == [" 1 2 "]


def test_normalize_zh_rules() -> None:
    norm = TextNormalizer(WordTokenizer(), backend="none")
    assert norm.normalize("（括号）x² - 结束，，", split=False) == "括号x平方-结束。"
    assert norm.normalize("圆周率是3.14", split=False) == "圆周率是3。14"
    assert norm.normalize("第一行\n第二行") == ["第一行第二行。"]


def test_normalize_stream_input_is_passed_through() -> None:
    norm = TextNormalizer(WordTokenizer(), backend="none")
    stream = iter(["你好", "世界"])
    assert norm.normalize(stream) == [stream]


# --- tokenizers -------------------------------------------------------------------------------------


def _asset_or_skip(name: str) -> Path:
    try:
        return asset_path(name, download=False)
    except AssetError as exc:
        missing(f"tokenizer asset absent: {exc}")


def test_load_tokenizer_unknown_target() -> None:
    config = {"get_tokenizer": Node("name", "some.module.get_tokenizer", {})}
    with pytest.raises(ConfigError, match=re.escape("some.module.get_tokenizer")):
        load_tokenizer(config, Path("."))
    with pytest.raises(ConfigError, match="get_tokenizer"):
        load_tokenizer({}, Path("."))


def test_qwen_tokenizer_missing_files(tmp_path: Path) -> None:
    config = {"get_tokenizer": Node("name", QWEN_TARGET, {"token_path": "", "skip_special_tokens": True})}
    with pytest.raises(ModelLoadError, match=re.escape("vocab.json")):
        load_tokenizer(config, tmp_path)
    blank = tmp_path / "CosyVoice-BlankEN"
    blank.mkdir()
    (blank / "vocab.json").write_text(json.dumps({"a": 0}), encoding="utf-8")
    with pytest.raises(ModelLoadError, match=re.escape("merges.txt")):
        load_tokenizer(config, tmp_path)


def _tiny_blank_en(root: Path) -> None:
    blank = root / "CosyVoice-BlankEN"
    blank.mkdir()
    # Byte-level alphabet: 'Ġ' stands for the space byte.
    vocab = {c: i for i, c in enumerate("abcdeĠ")} | {"ab": 6, "Ġa": 7}
    (blank / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (blank / "merges.txt").write_text("#version: 0.2\na b\nĠ a\n", encoding="utf-8")
    added = {"8": {"content": "<|endoftext|>", "special": True}, "9": {"content": "<|im_start|>", "special": True}}
    (blank / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added}), encoding="utf-8")


def test_qwen_tokenizer_specials(tmp_path: Path) -> None:
    _tiny_blank_en(tmp_path)
    v2 = load_tokenizer({"get_tokenizer": Node("name", QWEN_TARGET, {})}, tmp_path)
    # Declared tokens keep their ids, new ones follow in list order (<|im_end|> is new here).
    assert v2.encode("<|im_start|><|endoftext|>") == [9, 8]
    assert v2.encode("<|im_end|>") == [10]
    assert v2.encode("<|endofprompt|>") == [11]
    assert v2.encode("ab a[breath]") == [6, 7, 12]
    assert v2.n_vocab == 10 + 19 - 1
    v3 = load_tokenizer({"get_tokenizer": Node("name", QWEN_TARGET, {"version": "cosyvoice3"})}, tmp_path)
    assert v3.encode("<|endofsystem|>") == [v2.n_vocab]
    assert v3.encode("[iàn][i]") == [v3.special_tokens["[iàn]"], v3.special_tokens["[i]"]]
    with pytest.raises(ConfigError, match="cosyvoice9"):
        load_tokenizer({"get_tokenizer": Node("name", QWEN_TARGET, {"version": "cosyvoice9"})}, tmp_path)


def test_whisper_tokenizer_specials() -> None:
    _asset_or_skip("multilingual.tiktoken")
    node = Node("name", WHISPER_TARGET, {"multilingual": True, "num_languages": 100})
    tok = load_tokenizer({"get_tokenizer": node}, Path("."))
    assert tok.n_vocab == 51866
    for token, idx in {
        "<|endoftext|>": 50257,
        "<|en|>": 50259,
        "<|zh|>": 50260,
        "<|it|>": 50274,
        "<|yue|>": 50358,
        "<|notimestamps|>": 50364,
        "<|0.00|>": 50365,
        "<|30.00|>": 51865,
    }.items():
        assert tok.encode(token) == [idx]
    # Not a Whisper special token: plain BPE (spec §5.5).
    assert tok.encode("<|endofprompt|>") == [27, 91, 521, 2670, 28722, 662, 91, 29]
    assert len(whisper_special_tokens(100)) == 51866 - 50257


def test_cosyvoice_25hz_tokenizer_specials() -> None:
    _asset_or_skip("multilingual_zh_ja_yue_char_del.tiktoken")
    node = Node("name", COSYVOICE_TARGET, {"multilingual": True, "num_languages": 100})
    tok = load_tokenizer({"get_tokenizer": node}, Path("."))
    assert tok.n_vocab == 60510
    for token, idx in {
        "<|endoftext|>": 58836,
        "<|en|>": 58838,
        "<|ko|>": 58843,
        "<|ja|>": 58845,
        "<|yue|>": 58937,
        "<|ASR|>": 58938,
        "<|HAPPY|>": 58949,
        "<|translate|>": 58953,
        "<|SPECIAL_TOKEN_1|>": 58959,
        "<|TTS/B|>": 58989,
        "<|0.00|>": 59009,
    }.items():
        assert tok.encode(token) == [idx]
    assert len(tok.encode("希望你以后能够做的比我还好呦。")) == 15  # one id per CJK character
    assert len(cosyvoice_special_tokens(100)) == 60510 - 58836
