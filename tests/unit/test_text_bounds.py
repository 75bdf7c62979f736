"""Text without split points is still cut into bounded segments (issue 14, item 1)."""

from __future__ import annotations

import random
import string
from functools import cache

import pytest
from golden import manifest, model_dir
from helpers import required_assets
from resources import missing, missing_mark

from cosyserve.config import load_yaml
from cosyserve.hub import AssetError, asset_path
from cosyserve.text.normalize import SEGMENT_MAX_N, TextNormalizer, cut_to_bound, split_paragraph
from cosyserve.text.tokenizers import TextTokenizer, load_tokenizer

_YAMLS = ("cosyvoice.yaml", "cosyvoice2.yaml", "cosyvoice3.yaml")
LENGTH = 4000


@cache
def tokenizer(model: str) -> TextTokenizer:
    root = model_dir(model)
    config = load_yaml(
        next(root / n for n in _YAMLS if (root / n).is_file()), {"qwen_pretrain_path": str(root / "CosyVoice-BlankEN")}
    )
    try:
        for name in required_assets(config):
            asset_path(name, download=False)
    except AssetError as exc:
        missing(f"tokenizer asset absent: {exc}")
    return load_tokenizer(config, root)


def _models() -> list[str]:
    return sorted(manifest()["models"]) or [pytest.param(None, marks=missing_mark("no golden set"))]


def unpunctuated(kind: str) -> str:
    rng = random.Random(kind)
    if kind == "letters":
        return "".join(rng.choice(string.ascii_letters) for _ in range(LENGTH))
    if kind == "words":
        words = []
        while sum(len(w) + 1 for w in words) < LENGTH:
            words.append("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 9))))
        return " ".join(words)[:LENGTH]
    if kind == "digits":
        return "".join(rng.choice(string.digits) for _ in range(LENGTH))
    if kind == "cjk":
        return "".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(LENGTH))
    if kind == "tagged":
        return "<|en|>" + unpunctuated("letters")[: LENGTH - 6]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["letters", "words", "digits", "cjk", "tagged"])
@pytest.mark.parametrize("model", _models())
def test_4000_unpunctuated_characters_give_bounded_segments(model, kind):
    tok = tokenizer(model)
    norm = TextNormalizer(tok, backend="none")
    text = unpunctuated(kind)
    assert len(text) == LENGTH
    segments = norm.normalize(text)
    lengths = [len(tok.encode(s)) for s in segments]  # text tokens, whatever the language
    assert len(segments) > 1 and max(lengths) <= SEGMENT_MAX_N, lengths
    if kind == "tagged":
        assert all(s.startswith("<|en|>") for s in segments)
        assert "".join(s.removeprefix("<|en|>") for s in segments) == text.removeprefix("<|en|>")
    else:  # nothing is lost: the segments put together are the normalised text (up to the final stop)
        assert "".join(segments).rstrip("。.") == norm.normalize(text, split=False)


@pytest.mark.parametrize("model", _models())
def test_wetext_backend_bounds_too(model):
    tok = tokenizer(model)
    norm = TextNormalizer(tok, backend="auto")
    for kind in ("words", "cjk"):
        segments = norm.normalize(unpunctuated(kind)[:1500])
        assert max(len(tok.encode(s)) for s in segments) <= SEGMENT_MAX_N


def test_ordinary_text_is_split_as_the_reference_does():
    """Within the bound, split_paragraph is the reference's (its own tests and the parity set pin the details)."""
    text = "这是一个句子，" * 30 + "结束。"  # one 213-character "sentence": over the bound, so it is cut
    parts = split_paragraph(text, list, "zh")
    assert SEGMENT_MAX_N == 200 and parts == [text[:196], text[196:]]  # cut after the last comma within the bound
    short = "短句。" * 10
    assert split_paragraph(short, list, "zh") == [short]


def test_cut_prefers_spaces_and_commas_and_never_splits_a_special_token():
    words = "word " * 100
    parts = cut_to_bound(words, lambda s: len(s.split()), 30)
    assert all(p.endswith(" ") for p in parts[:-1]) and "".join(parts) == words
    assert all(len(p.split()) <= 30 for p in parts)
    zh = "甲" * 100 + "，" + "乙" * 100
    assert cut_to_bound(zh, len, 160) == ["甲" * 100 + "，", "乙" * 100]
    tagged = "a" * 8 + "<|endofprompt|>" + "b" * 20
    parts = cut_to_bound(tagged, len, 20)
    assert "".join(parts) == tagged and any(p.startswith("<|endofprompt|>") for p in parts), parts


def test_cut_leaves_text_within_the_bound_alone():
    assert cut_to_bound("abc", len, 3) == ["abc"]
    assert cut_to_bound("", len, 3) == []
