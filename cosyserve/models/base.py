"""What every model family provides once loaded: its three networks and the constants around them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cosyserve.models.checkpoint import load_into, read_state_dict, read_vocoder_state
from cosyserve.models.config_checks import BLANK_EN, FamilyConfig, StageNumbers, build_hift, feat_extractor_args
from cosyserve.nn.linear import FusedProjections, pack_linears, unpack_linears

_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
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


@dataclass(kw_only=True)
class FamilyModel(StageNumbers):
    """The LLM, flow and vocoder of one model directory, plus the numbers the engine schedules by (the base)."""

    family: str  # "cosyvoice1" | "cosyvoice2" | "cosyvoice3"
    version: str  # "v1" | "v2" | "v3" (frontend conventions)
    model_dir: Path
    config: dict[str, Any]
    llm: nn.Module
    flow: nn.Module
    hift: nn.Module
    silent_tokens: frozenset[int] = field(default_factory=frozenset)  # v3: ids whose long runs the flow skips

    def set_precision(
        self, llm: str = "fp32", flow: str = "fp32", llm_device: str = "cpu", flow_device: str = "cpu"
    ) -> FamilyModel:
        """Run the LLM and the flow's estimator in another precision (see :mod:`cosyserve.precision`),
        with the LLM's projections of one input fused and, on the CPU, its weights (and an fp32 flow
        estimator's) packed for oneDNN (:mod:`cosyserve.nn.linear`). Call after the networks are on
        their devices; calling it again starts from the plain layers (but for an int8 LLM, whose fp32
        weights are gone).

        The flow keeps its ODE state in fp32 and only evaluates the estimator in ``flow``; the vocoder
        is left in fp32 (v3's f0 predictor in fp64)."""
        unpack_linears(self.llm)
        for module in self.llm.modules():
            if isinstance(module, FusedProjections) and not module.fused:
                module.fuse()
        # The rel-pos projection's weight is read directly by the attention: it stays a plain nn.Linear.
        plain = ("linear_pos",)
        if llm == "int8":
            # Dynamic quantization: int8 weights (one scale per output row), activations quantized per call.
            qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
            spec = {
                name: qconfig
                for name, module in self.llm.named_modules()
                if type(module) is nn.Linear and not name.endswith(plain)
            }
            torch.ao.quantization.quantize_dynamic(self.llm, spec, dtype=torch.qint8, inplace=True)
        elif llm != "fp32":
            self.llm.to(_TORCH_DTYPES[llm])
        if llm in ("fp32", "bf16") and torch.device(llm_device).type == "cpu":
            pack_linears(self.llm, skip=plain)
        estimator = self.flow.decoder.estimator
        unpack_linears(estimator)
        if flow != "fp32":
            estimator.to(_TORCH_DTYPES[flow])
        elif torch.device(flow_device).type == "cpu":
            pack_linears(estimator)  # 7 % (v2) to 14 % (v3) off an fp32 flow on the CPU; no gain in bf16
        return self

    def eval(self) -> FamilyModel:
        for module in (self.llm, self.flow, self.hift):
            module.eval()
            module.requires_grad_(False)
        return self


@dataclass(frozen=True)
class FamilySpec:
    """How one family is assembled: its yaml reader and the class of each network."""

    family: str
    version: str
    parse: Callable[[dict[str, Any], Path], FamilyConfig]  # the family's config.parse
    llm: Callable[[Any], nn.Module]  # built from FamilyConfig.llm
    flow: Callable[[Any], nn.Module]  # built from FamilyConfig.flow
    hift: type[nn.Module]  # built from FamilyConfig.hift
    silent_tokens: frozenset[int] = frozenset()

    def load(
        self,
        model_dir: Path,
        config: dict[str, Any],
        llm_weights: str = "llm.pt",
        random_weights: bool = False,
        *,
        flow_steps: int | None = None,
        reference_eos_mask: bool = False,
    ) -> FamilyModel:
        """Build the networks from the yaml and load their weights (random init when ``random_weights``).

        ``flow_steps``: the CFM's Euler steps (None: the model's 10); ``reference_eos_mask``: the LLM's
        early stop as the official code does it (see ``Family.reference_eos_quirk``)."""
        cfg = self.parse(config, model_dir)
        llm_config = replace(cfg.llm, reference_eos_mask=reference_eos_mask)
        flow_config = cfg.flow if flow_steps is None else replace(cfg.flow, n_timesteps=flow_steps)
        llm, flow, hift = self.llm(llm_config), self.flow(flow_config), build_hift(self.hift, cfg.hift)
        if not random_weights:
            load_weights(llm, model_dir / llm_weights)
            load_weights(flow, model_dir / "flow.pt")
            load_weights(hift, model_dir / "hift.pt", read_vocoder_state(model_dir / "hift.pt"))
        return FamilyModel(
            family=self.family,
            version=self.version,
            model_dir=model_dir,
            config=config,
            llm=llm,
            flow=flow,
            hift=hift,
            silent_tokens=self.silent_tokens,
            **asdict(cfg.numbers),
        ).eval()


def load_weights(module: nn.Module, path: Path, state: dict | None = None) -> nn.Module:
    """Read ``path`` (unless ``state`` is given) and load it strictly into ``module``."""
    load_into(module, read_state_dict(path) if state is None else state, path)
    return module


__all__ = ["BLANK_EN", "FamilyModel", "FamilySpec", "feat_extractor_args", "load_weights"]
