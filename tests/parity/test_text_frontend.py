"""Text frontend parity: tokenizers, normalisation and sentence splitting against ``text_frontend.json``.

Both modes must match exactly: ``none`` (no FST normaliser), and ``wetext``, where the golden set ran
WeTextProcessing 1.2.0's FSTs while we run the FSTs shipped in the ``wetext`` wheel, made to write what
1.2.0 writes (``cosyserve.text.wetext_backend``).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
from golden import entries, load_json, model_dir
from helpers import required_assets
from resources import import_or_missing, missing

from cosyserve.config import load_yaml
from cosyserve.hub import AssetError, asset_path
from cosyserve.text.normalize import TextNormalizer
from cosyserve.text.tokenizers import TextTokenizer, load_tokenizer

_YAMLS = ("cosyvoice.yaml", "cosyvoice2.yaml", "cosyvoice3.yaml")


@cache
def _tokenizer(model: str) -> TextTokenizer:
    root = model_dir(model)
    found = [root / name for name in _YAMLS if (root / name).is_file()]
    assert found, f"no cosyvoice*.yaml in {root}"
    config = load_yaml(found[0], {"qwen_pretrain_path": str(root / "CosyVoice-BlankEN")})
    try:
        for name in required_assets(config):
            asset_path(name, download=False)
    except AssetError as exc:
        missing(f"tokenizer asset absent: {exc}")
    return load_tokenizer(config, root)


def _check_mode(tok: TextTokenizer, norm: TextNormalizer, text: str, golden: dict[str, Any], what: str) -> None:
    split_true = norm.normalize(text, split=True)
    assert split_true == golden["split_true"], f"{what}: split=True segments"
    assert [tok.encode(s) for s in split_true] == golden["split_true_tokens"], f"{what}: split=True tokens"
    split_false = norm.normalize(text, split=False)
    assert split_false == golden["split_false"], f"{what}: split=False text"
    assert tok.encode(split_false) == golden["split_false_tokens"], f"{what}: split=False tokens"


@pytest.mark.parametrize("entry", entries("text"))
def test_text_frontend_none(entry: dict[str, Any]) -> None:
    data = load_json(entry)
    tok = _tokenizer(entry["model"])
    norm = TextNormalizer(tok, backend="none")
    assert norm.backend == "none"
    for case in data["cases"]:
        what = f"{entry['model']}/{case['key']}"
        assert tok.encode(case["text"]) == case["raw_tokens"], f"{what}: raw tokens"
        _check_mode(tok, norm, case["text"], case["modes"]["none"], f"{what} [none]")
        off = case["text_frontend_false"]
        assert norm.normalize(case["text"], split=True, text_frontend=False) == off["split_true"], what
        assert norm.normalize(case["text"], split=False, text_frontend=False) == off["split_false"], what
    for item in data.get("instruct", []):
        text = item["instruct_text"]
        if "tokens_unnormalized" in item:  # v2/v3 instruct2: tokenised as is
            assert tok.encode(text) == item["tokens_unnormalized"], f"instruct {text!r}"
        else:  # v1 instruct: normalised without splitting
            golden = item["modes"]["none"]
            assert norm.normalize(text, split=False) == golden["normalized"], f"instruct {text!r}"
            assert tok.encode(golden["normalized"]) == golden["tokens"], f"instruct {text!r}"
    if "prompt_text" in data:
        golden = data["prompt_text"]["modes"]["none"]
        assert norm.normalize(data["prompt_text"]["prompt_text"], split=False) == golden["normalized"]
        assert tok.encode(golden["normalized"]) == golden["tokens"]
    if "special_token_ids" in data:
        for token, idx in data["special_token_ids"].items():
            assert tok.encode(token) == [idx], f"special token {token}"
            assert tok.encode(f"a{token}b")[1:-1] == [idx], f"special token {token} inside text"
    if "tokenizer_len" in data:
        assert tok.n_vocab == data["tokenizer_len"]


def _wetext_cases() -> list[Any]:
    params = []
    for param in entries("text"):
        entry = param.values[0]
        if entry is None:
            params.append(pytest.param(None, None, None, marks=param.marks))
            continue
        data = load_json(entry)
        for case in data["cases"]:
            params.append(pytest.param(entry, case["text"], case["modes"]["wetext"], id=f"{entry['id']}/{case['key']}"))
        for i, item in enumerate(data.get("instruct", [])):
            if "modes" in item:
                params.append(
                    pytest.param(entry, item["instruct_text"], item["modes"]["wetext"], id=f"{entry['id']}/instruct{i}")
                )
        if "prompt_text" in data:
            item = data["prompt_text"]
            params.append(
                pytest.param(entry, item["prompt_text"], item["modes"]["wetext"], id=f"{entry['id']}/prompt_text")
            )
    return params


@pytest.mark.parametrize(("entry", "text", "golden"), _wetext_cases())
def test_text_frontend_wetext(entry: dict[str, Any], text: str, golden: dict[str, Any]) -> None:
    import_or_missing("wetext")
    tok = _tokenizer(entry["model"])
    norm = TextNormalizer(tok, backend="wetext")
    assert norm.backend == "wetext"
    split_false = norm.normalize(text, split=False)
    split_true = norm.normalize(text, split=True)
    if "split_true" not in golden:  # instruct / prompt text: normalised with split=False only
        golden = {"split_false": golden["normalized"], "split_false_tokens": golden["tokens"]}
        split_true = None
    assert split_false == golden["split_false"], "wetext split=False text"
    assert tok.encode(split_false) == golden["split_false_tokens"], "wetext split=False tokens"
    if split_true is not None:
        assert split_true == golden["split_true"], "wetext split=True segments"
        assert [tok.encode(s) for s in split_true] == golden["split_true_tokens"], "wetext split=True tokens"
