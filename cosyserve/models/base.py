"""What every model family provides once loaded: its three networks and the constants around them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cosyserve.config import ConfigError, Node, expect_node
from cosyserve.models.checkpoint import load_into, read_state_dict, read_vocoder_state

_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BLANK_EN = "CosyVoice-BlankEN"  # the Qwen2 folder whose config.json gives the v2/v3 LLM geometry
MAX_SILENT_RUN = 5  # silent ids in a row that the flow still sees (v3, spec §9.5)
MIN_TOKEN_TEXT_RATIO = 2  # speech tokens per text token the LLM makes at least (stop ids masked before)
MAX_TOKEN_TEXT_RATIO = 20  # and at most


class SilenceFilter:
    """Keeps a token unless it is a silent id preceded by ``max_run`` or more consecutive silent ids
    (the flow skips long runs of silence; the LM still conditions on every id)."""

    def __init__(self, silent: frozenset[int], max_run: int) -> None:
        self.silent = silent
        self.max_run = max_run
        self.run = 0

    def keep(self, token: int) -> bool:
        if token not in self.silent:
            self.run = 0
            return True
        self.run += 1
        return self.run <= self.max_run


@dataclass
class FamilyModel:
    """The LLM, flow and vocoder of one model directory, plus the numbers the engine schedules by."""

    family: str  # "cosyvoice1" | "cosyvoice2" | "cosyvoice3"
    version: str  # "v1" | "v2" | "v3" (frontend conventions)
    model_dir: Path
    config: dict[str, Any]
    llm: nn.Module
    flow: nn.Module
    hift: nn.Module
    sample_rate: int
    hop_size: int  # waveform samples per mel frame
    token_frame_rate: int  # speech tokens per second
    token_mel_ratio: int = 0  # mel frames per token (v2/v3; v1 interpolates)
    chunk_tokens: int = 0  # streaming hop in tokens (v2/v3 flow chunk size)
    pre_lookahead_len: int = 0  # look-ahead tokens of the causal flow (v2/v3)
    silent_tokens: frozenset[int] = field(default_factory=frozenset)

    def new_token_filter(self) -> SilenceFilter | None:
        """A fresh filter of the ids one text segment's flow sees (v3 drops long silences), or None."""
        return SilenceFilter(self.silent_tokens, MAX_SILENT_RUN) if self.silent_tokens else None

    def set_precision(self, llm: str = "fp32", flow: str = "fp32") -> FamilyModel:
        """Run the LLM and the flow's estimator in another precision (see :mod:`cosyserve.precision`).

        The flow keeps its ODE state in fp32 and only evaluates the estimator in ``flow``; the vocoder
        is left in fp32 (its f0 predictor in fp64)."""
        if llm == "int8":
            # Dynamic quantization: int8 weights, fp32 activations, for the LLM's linear layers (but the
            # rel-pos projection, whose weight the attention reads directly).
            qconfig = torch.ao.quantization.default_dynamic_qconfig
            spec = {
                name: qconfig
                for name, module in self.llm.named_modules()
                if isinstance(module, nn.Linear) and not name.endswith("linear_pos")
            }
            self.llm = torch.ao.quantization.quantize_dynamic(self.llm, spec, dtype=torch.qint8)
        elif llm != "fp32":
            self.llm.to(_TORCH_DTYPES[llm])
        if flow != "fp32":
            self.flow.decoder.estimator.to(_TORCH_DTYPES[flow])
        return self

    def eval(self) -> FamilyModel:
        for module in (self.llm, self.flow, self.hift):
            module.eval()
            module.requires_grad_(False)
        return self


@dataclass(frozen=True)
class FamilySpec:
    """How one family is assembled from its yaml: which classes, and whether its flow is chunk-causal."""

    family: str
    version: str
    llm: type[nn.Module]
    flow: type[nn.Module]
    hift: type[nn.Module]
    qwen_llm: bool = False  # the LLM body is Qwen2, sized by CosyVoice-BlankEN/config.json
    silent_tokens: frozenset[int] = frozenset()

    def load(
        self, model_dir: Path, config: dict[str, Any], llm_weights: str = "llm.pt", random_weights: bool = False
    ) -> FamilyModel:
        """Build the networks from the yaml and load their weights (random init when ``random_weights``)."""
        llm_node = expect_node(config, "llm", self.llm.__name__)
        llm = self.llm.from_config(llm_node, model_dir / BLANK_EN) if self.qwen_llm else self.llm.from_config(llm_node)
        flow_node = expect_node(config, "flow", self.flow.__name__)
        flow = self.flow.from_config(flow_node)
        hift = self.hift.from_config(expect_node(config, "hift", self.hift.__name__))
        if not random_weights:
            load_weights(llm, model_dir / llm_weights)
            load_weights(flow, model_dir / "flow.pt")
            load_weights(hift, model_dir / "hift.pt", read_vocoder_state(model_dir / "hift.pt"))
        causal = {}
        if self.qwen_llm:  # v2/v3: chunk-causal flow with a fixed token/mel ratio
            causal = {
                "token_mel_ratio": require_int(flow_node, "token_mel_ratio", "flow"),
                "chunk_tokens": int(config.get("chunk_size", 25)),
                "pre_lookahead_len": require_int(flow_node, "pre_lookahead_len", "flow"),
            }
        return FamilyModel(
            family=self.family,
            version=self.version,
            model_dir=model_dir,
            config=config,
            llm=llm,
            flow=flow,
            hift=hift,
            sample_rate=config_int(config, "sample_rate"),
            hop_size=config_int(feat_extractor_args(config), "hop_size", "feat_extractor"),
            token_frame_rate=require_int(flow_node, "input_frame_rate", "flow"),
            silent_tokens=self.silent_tokens,
            **causal,
        ).eval()


def load_weights(module: nn.Module, path: Path, state: dict | None = None) -> nn.Module:
    """Read ``path`` (unless ``state`` is given) and load it strictly into ``module``."""
    load_into(module, read_state_dict(path) if state is None else state, path)
    return module


def feat_extractor_args(config: dict[str, Any]) -> dict[str, Any]:
    node = config.get("feat_extractor")
    if not isinstance(node, Node):
        raise ConfigError("key 'feat_extractor' must be a !name: mel_spectrogram entry")
    return dict(node.args)


def config_int(values: dict[str, Any], key: str, path: str = "") -> int:
    """``values[key]`` as a positive integer (a top-level yaml key, or ``path`` names its parent)."""
    value = values.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"'{path + '.' if path else ''}{key}' must be a positive integer, got {value!r}")
    return value


def require_int(node: Node, key: str, path: str) -> int:
    value = node.require(key, path)
    if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"'{path}.{key}' must be a positive integer, got {value!r}")
    return value


__all__ = ["BLANK_EN", "FamilyModel", "FamilySpec", "config_int", "feat_extractor_args", "load_weights", "require_int"]
