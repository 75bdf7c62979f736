"""Small helpers the tests share that the server itself has no use for."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import torch

from cosyserve.audio.io import AudioInput, decode_audio, to_mono
from cosyserve.config import Node
from cosyserve.frontend.voice_prompt import VoicePrompt
from cosyserve.settings import Settings, add_server_arguments, settings_from_args
from cosyserve.text.tokenizers import TIKTOKEN_ASSETS


def load_audio(data: AudioInput, target_sr: int) -> torch.Tensor:
    """Decode, downmix and resample: the reference's ``load_wav(data, target_sr)`` -> (1, N) float32."""
    wave, sr = decode_audio(data)
    return to_mono(wave, sr, target_sr)


def load_settings(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from command-line style ``argv`` (none: defaults) and the environment."""
    parser = argparse.ArgumentParser(add_help=False)
    add_server_arguments(parser, environ)
    return settings_from_args(parser.parse_args(argv or []))


def required_assets(config: dict[str, Any]) -> list[str]:
    """Names of the ``cosyserve.hub`` assets ``load_tokenizer(config, ...)`` will need."""
    node = config.get("get_tokenizer")
    target = node.target if isinstance(node, Node) else None
    return [TIKTOKEN_ASSETS[target]] if target in TIKTOKEN_ASSETS else []


def assert_same_voice(actual: VoicePrompt, expected: VoicePrompt) -> None:
    """Every field of two voices equal, tensors to the bit and in dtype."""
    assert isinstance(actual, VoicePrompt)
    for name in ("family", "token_rate", "prompt_text"):
        assert getattr(actual, name) == getattr(expected, name), name
    for name in ("embedding", "speech_token", "speech_feat", "prompt_text_ids"):
        a, e = getattr(actual, name), getattr(expected, name)
        assert (a is None) == (e is None), name
        assert a is None or (a.dtype == e.dtype and torch.equal(a, e)), name


def sample_voice(
    i: int, family: str = "cosyvoice2", token_rate: int = 25, prompt_text: str | None = None
) -> VoicePrompt:
    """A small voice whose values identify ``i`` (with transcript ids when ``prompt_text`` is given)."""
    return VoicePrompt(
        family,
        token_rate,
        embedding=torch.linspace(-1, 1, 192).reshape(1, -1) * (i + 1),
        speech_token=torch.arange(12, dtype=torch.int32).reshape(1, -1) + i,
        speech_feat=torch.full((1, 24, 80), float(i)),
        prompt_text=prompt_text,
        prompt_text_ids=None if prompt_text is None else torch.tensor([[7, 8, 9 + i]], dtype=torch.int32),
    )
