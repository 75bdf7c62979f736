"""CosyVoice 1.0's ``cosyvoice.yaml``, read once into one config per network; errors name the key."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cosyserve.config import ConfigError, Node
from cosyserve.models.config_checks import (
    EncoderConfig,
    FamilyConfig,
    SpeechLMConfig,
    cfm_rate,
    check_known,
    encoder_config,
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
from cosyserve.models.flow import FlowConfig
from cosyserve.nn.hift import HiFTGenerator

_TRAINING_KEYS = {"length_normalized_loss", "lsm_weight"}
_LLM_SIZES = ("text_encoder_input_size", "llm_input_size", "llm_output_size", "text_token_size", "speech_token_size")


@dataclass(frozen=True, kw_only=True)
class TransformerLMConfig(SpeechLMConfig):
    """The yaml's ``llm: !new:...TransformerLM``."""

    text_encoder_input_size: int
    llm_input_size: int
    llm_output_size: int
    text_token_size: int
    text_encoder: EncoderConfig
    llm: EncoderConfig
    spk_embed_dim: int = 192


@dataclass(frozen=True, kw_only=True)
class V1FlowConfig(FlowConfig):
    """The yaml's ``flow: !new:...MaskedDiffWithXvec``."""

    vocab_size: int = 4096
    input_size: int = 512
    input_frame_rate: int = 50
    encoder: EncoderConfig
    length_regulator: Mapping[str, Any]  # InterpolateRegulator arguments
    estimator: Mapping[str, Any]  # ConditionalDecoder arguments


def llm_config(node: Node) -> TransformerLMConfig:
    if node.cls != "TransformerLM":
        raise ConfigError(f"llm: expected TransformerLM, got {node.target}")
    check_known(node, {*_LLM_SIZES, "spk_embed_dim", "text_encoder", "llm", "sampling", *_TRAINING_KEYS}, "llm")
    sizes = {key: positive_int(node.require(key, "llm"), f"llm.{key}") for key in _LLM_SIZES}
    encoders = ("ConformerEncoder", "TransformerEncoder")
    text_encoder = encoder_config(node.require("text_encoder", "llm"), "llm.text_encoder", *encoders)
    body = encoder_config(node.require("llm", "llm"), "llm.llm", *encoders)
    if body.output_size != sizes["llm_output_size"]:
        raise ConfigError(f"llm.llm.output_size {body.output_size} != llm.llm_output_size {sizes['llm_output_size']}")
    sampling = node.get("sampling")
    return TransformerLMConfig(
        **sizes,
        text_encoder=text_encoder,
        llm=body,
        spk_embed_dim=positive_int(node.get("spk_embed_dim", 192), "llm.spk_embed_dim"),
        sampling={} if sampling is None else sampling_args(sampling),
    )


def flow_config(node: Node) -> V1FlowConfig:
    node = expect_class(node, ("MaskedDiffWithXvec",), "flow")
    args = node_kwargs(node, *V1FlowConfig.SIZE_KEYS)
    regulator = expect_class(
        node.require("length_regulator", "flow"), ("InterpolateRegulator",), "flow.length_regulator"
    )
    decoder = expect_class(node.require("decoder", "flow"), ("ConditionalCFM",), "flow.decoder")
    estimator = expect_class(
        decoder.require("estimator", "flow.decoder"), ("ConditionalDecoder",), "flow.decoder.estimator"
    )
    return V1FlowConfig(
        **args,
        encoder=flow_encoder_config(node, args.get("input_size", 512), "ConformerEncoder"),
        length_regulator=node_kwargs(regulator, "channels", "sampling_ratios", "out_channels", "groups"),
        estimator=unet_args(estimator),
        inference_cfg_rate=cfm_rate(decoder),
    )


def parse(config: dict[str, Any], model_dir: Path) -> FamilyConfig:
    """The whole yaml, checked; ``model_dir`` is unused (v1 needs nothing beside the yaml)."""
    llm = llm_config(expect_node(config, "llm", "TransformerLM"))
    flow_node = expect_node(config, "flow", "MaskedDiffWithXvec")
    flow = flow_config(flow_node)
    hift = hift_config(expect_node(config, "hift", "HiFTGenerator"), HiFTGenerator)
    return FamilyConfig(llm, flow, hift, stage_numbers(config, flow_node, causal=False))
