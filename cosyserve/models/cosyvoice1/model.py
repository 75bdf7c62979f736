"""CosyVoice 1.0 (300M, -SFT, -Instruct, -25Hz): TransformerLM + MaskedDiffWithXvec + HiFT."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cosyserve.models.base import FamilyModel, config_int, expect_node, feat_extractor_args, load_weights, require_int
from cosyserve.models.checkpoint import read_vocoder_state
from cosyserve.models.cosyvoice1.flow import MaskedDiffWithXvec
from cosyserve.models.cosyvoice1.llm import TransformerLM
from cosyserve.nn.hift import HiFTGenerator


def load(
    model_dir: Path, config: dict[str, Any], llm_weights: str = "llm.pt", random_weights: bool = False
) -> FamilyModel:
    """Build the networks from the yaml and load their weights (random init when `random_weights`)."""
    llm = TransformerLM.from_config(expect_node(config, "llm", "TransformerLM"))
    flow_node = expect_node(config, "flow", "MaskedDiffWithXvec")
    flow = MaskedDiffWithXvec.from_config(flow_node)
    hift = HiFTGenerator.from_config(expect_node(config, "hift", "HiFTGenerator"))
    if not random_weights:
        load_weights(llm, model_dir / llm_weights)
        load_weights(flow, model_dir / "flow.pt")
        load_weights(hift, model_dir / "hift.pt", read_vocoder_state(model_dir / "hift.pt"))
    return FamilyModel(
        family="cosyvoice1",
        version="v1",
        model_dir=model_dir,
        config=config,
        llm=llm,
        flow=flow,
        hift=hift,
        sample_rate=config_int(config, "sample_rate"),
        hop_size=config_int(feat_extractor_args(config), "hop_size", "feat_extractor"),
        token_frame_rate=require_int(flow_node, "input_frame_rate", "flow"),
    ).eval()
