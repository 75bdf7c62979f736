"""Fun-CosyVoice3's ``cosyvoice3.yaml``, read once. The LLM reads as v2's; the flow and vocoder differ."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cosyserve.config import ConfigError, Node
from cosyserve.models.config_checks import (
    BLANK_EN,
    FamilyConfig,
    cfm_rate,
    expect_class,
    expect_node,
    hift_config,
    node_kwargs,
    stage_numbers,
)
from cosyserve.models.cosyvoice2.config import llm_config
from cosyserve.models.flow import CausalFlowConfig
from cosyserve.nn.hift_causal import CausalHiFTGenerator

_DIT_KEYS = (
    "dim",
    "depth",
    "heads",
    "dim_head",
    "ff_mult",
    "mel_dim",
    "mu_dim",
    "spk_dim",
    "out_channels",
    "static_chunk_size",
    "num_decoding_left_chunks",
    "dropout",
    "long_skip_connection",
)


@dataclass(frozen=True, kw_only=True)
class V3FlowConfig(CausalFlowConfig):
    """The yaml's ``flow: !new:...CausalMaskedDiffWithDiT``."""

    input_size: int = 80
    lookahead_channels: int  # the pre-lookahead layer's hidden channels
    estimator: Mapping[str, Any]  # DiT arguments


def flow_config(node: Node) -> V3FlowConfig:
    node = expect_class(node, ("CausalMaskedDiffWithDiT",), "flow")
    args = node_kwargs(node, *V3FlowConfig.SIZE_KEYS)
    pre = expect_class(node.require("pre_lookahead_layer", "flow"), ("PreLookaheadLayer",), "flow.pre_lookahead_layer")
    decoder = expect_class(node.require("decoder", "flow"), ("CausalConditionalCFM",), "flow.decoder")
    estimator = expect_class(decoder.require("estimator", "flow.decoder"), ("DiT",), "flow.decoder.estimator")

    input_size = args.get("input_size", 80)
    output_size = args.get("output_size", 80)
    if (
        pre.get("pre_lookahead_len", 3) != args.get("pre_lookahead_len", 3)
        or pre.get("in_channels", input_size) != input_size
    ):
        raise ConfigError("flow.pre_lookahead_layer does not match the flow's input_size / pre_lookahead_len")
    if input_size != estimator.get("mu_dim", input_size) or output_size != estimator.get("out_channels", output_size):
        raise ConfigError("flow.decoder.estimator dimensions do not match the flow's input/output sizes")
    if estimator.get("long_skip_connection", False):
        raise ConfigError("flow.decoder.estimator: long_skip_connection=True is not supported")
    return V3FlowConfig(
        **args,
        lookahead_channels=pre.require("channels", "flow.pre_lookahead_layer"),
        estimator=node_kwargs(estimator, *_DIT_KEYS),
        inference_cfg_rate=cfm_rate(decoder),
    )


def parse(config: dict[str, Any], model_dir: Path) -> FamilyConfig:
    """The whole yaml, checked; the LLM geometry is read from ``model_dir/CosyVoice-BlankEN``."""
    llm = llm_config(expect_node(config, "llm", "CosyVoice3LM"), model_dir / BLANK_EN, cls="CosyVoice3LM")
    flow_node = expect_node(config, "flow", "CausalMaskedDiffWithDiT")
    flow = flow_config(flow_node)
    hift = hift_config(expect_node(config, "hift", "CausalHiFTGenerator"), CausalHiFTGenerator)
    return FamilyConfig(llm, flow, hift, stage_numbers(config, flow_node, causal=True))
