"""CosyVoice2's ``cosyvoice2.yaml`` (and the Qwen2 geometry in ``CosyVoice-BlankEN/config.json``), read once."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cosyserve.config import ConfigError, Node
from cosyserve.models.config_checks import (
    BLANK_EN,
    EncoderConfig,
    FamilyConfig,
    SpeechLMConfig,
    cfm_rate,
    expect_class,
    expect_node,
    flow_encoder_config,
    hift_config,
    node_kwargs,
    positive_int,
    sampling_args,
    stage_numbers,
    unet_args,
)
from cosyserve.models.flow import CausalFlowConfig
from cosyserve.nn.hift import HiFTGenerator
from cosyserve.nn.qwen2 import Qwen2Config


@dataclass(frozen=True, kw_only=True)
class Qwen2LMConfig(SpeechLMConfig):
    """The yaml's ``llm: !new:...Qwen2LM`` (or v3's ``CosyVoice3LM``), with the Qwen2 body's geometry."""

    qwen: Qwen2Config
    speech_token_size: int = 6561


@dataclass(frozen=True, kw_only=True)
class V2FlowConfig(CausalFlowConfig):
    """The yaml's ``flow: !new:...CausalMaskedDiffWithXvec``."""

    input_size: int = 512
    encoder: EncoderConfig
    estimator: Mapping[str, Any]  # ConditionalDecoder arguments, causal


def qwen2_config(values: dict[str, Any]) -> Qwen2Config:
    """The Qwen2 geometry from a Hugging Face ``config.json`` mapping; options we do not implement raise."""
    if values.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"unsupported Qwen2 hidden_act {values['hidden_act']!r}")
    if values.get("use_sliding_window"):
        raise ConfigError("Qwen2 sliding-window attention is not supported")
    if values.get("rope_scaling"):
        raise ConfigError("Qwen2 rope_scaling is not supported")
    try:
        return Qwen2Config(
            hidden_size=int(values["hidden_size"]),
            num_hidden_layers=int(values["num_hidden_layers"]),
            num_attention_heads=int(values["num_attention_heads"]),
            num_key_value_heads=int(values.get("num_key_value_heads", values["num_attention_heads"])),
            intermediate_size=int(values["intermediate_size"]),
            vocab_size=int(values["vocab_size"]),
            rms_norm_eps=float(values.get("rms_norm_eps", 1e-6)),
            rope_theta=float(values.get("rope_theta", 1e6)),
            tie_word_embeddings=bool(values.get("tie_word_embeddings", True)),
            head_dim=int(values["head_dim"]) if values.get("head_dim") else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"incomplete Qwen2 config: {exc!r}") from exc


def read_qwen2_config(path: str | Path) -> Qwen2Config:
    """Read the ``config.json`` of ``CosyVoice-BlankEN`` (the geometry only, never the weights)."""
    path = Path(path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read Qwen2 config {path}: {exc}") from exc
    try:
        return qwen2_config(values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def llm_config(node: Node, blank_en_dir: str | Path, cls: str = "Qwen2LM") -> Qwen2LMConfig:
    """Read the ``llm`` node of class ``cls``; the Qwen2 geometry comes from ``<blank_en_dir>/config.json``."""
    if node.cls != cls:
        raise ConfigError(f"llm: expected {cls}, got {node.target}")
    inner = node.get("llm")
    if isinstance(inner, Node) and inner.cls != "Qwen2Encoder":
        raise ConfigError(f"llm.llm: unsupported class {inner.target} (expected Qwen2Encoder)")
    qwen = read_qwen2_config(Path(blank_en_dir) / "config.json")
    for key in ("llm_input_size", "llm_output_size"):
        size = node.get(key)
        if size is not None and size != qwen.hidden_size:
            raise ConfigError(f"llm.{key} is {size} but the Qwen2 hidden size is {qwen.hidden_size}")
    sampling = node.get("sampling")
    return Qwen2LMConfig(
        qwen=qwen,
        speech_token_size=positive_int(node.get("speech_token_size", 6561), "llm.speech_token_size"),
        sampling={} if sampling is None else sampling_args(sampling),
    )


def flow_config(node: Node) -> V2FlowConfig:
    """Read the ``flow`` node.

    The estimator may be spelled ``CausalConditionalDecoder`` (current hub yaml) or
    ``ConditionalDecoder`` with ``causal: True`` (the first release, which has no chunk size:
    it is the encoder's token chunk times ``token_mel_ratio``).
    """
    node = expect_class(node, ("CausalMaskedDiffWithXvec",), "flow")
    args = node_kwargs(node, *V2FlowConfig.SIZE_KEYS)
    encoder = flow_encoder_config(node, args.get("input_size", 512), "UpsampleConformerEncoder")
    decoder = expect_class(node.require("decoder", "flow"), ("CausalConditionalCFM",), "flow.decoder")
    estimator = expect_class(
        decoder.require("estimator", "flow.decoder"),
        ("CausalConditionalDecoder", "ConditionalDecoder"),
        "flow.decoder.estimator",
    )
    unet = unet_args(estimator)
    if estimator.cls == "ConditionalDecoder" and not unet.get("causal", False):
        raise ConfigError("flow.decoder.estimator: the v2 flow needs a causal decoder (causal: True)")
    unet["causal"] = True
    if "static_chunk_size" not in unet:
        unet["static_chunk_size"] = int(encoder.args.get("static_chunk_size", 25)) * int(args.get("token_mel_ratio", 2))
    return V2FlowConfig(**args, encoder=encoder, estimator=unet, inference_cfg_rate=cfm_rate(decoder))


def parse(config: dict[str, Any], model_dir: Path) -> FamilyConfig:
    """The whole yaml, checked; the LLM geometry is read from ``model_dir/CosyVoice-BlankEN``."""
    llm = llm_config(expect_node(config, "llm", "Qwen2LM"), model_dir / BLANK_EN)
    flow_node = expect_node(config, "flow", "CausalMaskedDiffWithXvec")
    flow = flow_config(flow_node)
    hift = hift_config(expect_node(config, "hift", "HiFTGenerator"), HiFTGenerator)
    return FamilyConfig(llm, flow, hift, stage_numbers(config, flow_node, causal=True))
