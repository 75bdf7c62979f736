"""Fun-CosyVoice3-0.5B: CosyVoice3LM + CausalMaskedDiffWithDiT + CausalHiFT at 24 kHz."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cosyserve.models.base import FamilyModel, config_int, expect_node, feat_extractor_args, load_weights, require_int
from cosyserve.models.checkpoint import read_vocoder_state
from cosyserve.models.cosyvoice3.flow import CausalMaskedDiffWithDiT
from cosyserve.models.cosyvoice3.llm import SILENT_TOKENS, CosyVoice3LM
from cosyserve.nn.hift_causal import CausalHiFTGenerator

BLANK_EN = "CosyVoice-BlankEN"


def load(
    model_dir: Path, config: dict[str, Any], llm_weights: str = "llm.pt", random_weights: bool = False
) -> FamilyModel:
    """Build the networks from the yaml and load their weights (random init when `random_weights`)."""
    llm = CosyVoice3LM.from_config(expect_node(config, "llm", "CosyVoice3LM"), model_dir / BLANK_EN)
    flow_node = expect_node(config, "flow", "CausalMaskedDiffWithDiT")
    flow = CausalMaskedDiffWithDiT.from_config(flow_node)
    hift = CausalHiFTGenerator.from_config(expect_node(config, "hift", "CausalHiFTGenerator"))
    if not random_weights:
        load_weights(llm, model_dir / llm_weights)
        load_weights(flow, model_dir / "flow.pt")
        load_weights(hift, model_dir / "hift.pt", read_vocoder_state(model_dir / "hift.pt"))
    return FamilyModel(
        family="cosyvoice3",
        version="v3",
        model_dir=model_dir,
        config=config,
        llm=llm,
        flow=flow,
        hift=hift,
        sample_rate=config_int(config, "sample_rate"),
        hop_size=config_int(feat_extractor_args(config), "hop_size", "feat_extractor"),
        token_frame_rate=require_int(flow_node, "input_frame_rate", "flow"),
        token_mel_ratio=require_int(flow_node, "token_mel_ratio", "flow"),
        chunk_tokens=int(config.get("chunk_size", 25)),
        pre_lookahead_len=require_int(flow_node, "pre_lookahead_len", "flow"),
        silent_tokens=frozenset(SILENT_TOKENS),
    ).eval()
