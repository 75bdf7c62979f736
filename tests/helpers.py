"""Small helpers the tests share that the server itself has no use for."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import torch

from cosyserve.audio.io import AudioInput, decode_audio, to_mono
from cosyserve.config import Node
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
