"""How a model directory becomes the parts of a served model: options, devices, networks, frontend, voices.

:func:`load_parts` resolves the directory (local or hub), reads its family from the family table,
builds the networks with the options that shape them (Euler steps, the early-stop rule) at
construction, sets each stage's precision, puts the LLM, flow and vocoder each on the device its
:class:`StagePlacement` names, and opens the frontend (its ONNX sessions with the frontend's own
thread budget) and the voices. :class:`~cosyserve.engine.pipeline.TTSModel` wraps the result.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cosyserve.audio.prompt import PromptLimits
from cosyserve.config import ConfigError, load_yaml
from cosyserve.errors import ModelLoadError
from cosyserve.families import FAMILIES, Family
from cosyserve.frontend.features import MelExtractor
from cosyserve.frontend.frontend import Frontend
from cosyserve.frontend.onnx_models import SpeakerEncoder, SpeechTokenizer
from cosyserve.hub import resolve_model_dir
from cosyserve.models.base import FamilyModel, feat_extractor_args
from cosyserve.models.checkpoint import CheckpointError
from cosyserve.nn.chunk_state import StreamCachePool
from cosyserve.precision import (
    DEFAULT_STREAM_CACHE_MB,
    DEFAULT_STREAM_LAST_CHUNK,
    check_engine_precision,
    parse_dtypes,
)
from cosyserve.text.normalize import TextNormalizer
from cosyserve.text.tokenizers import load_tokenizer

from .memory import available_memory_bytes
from .streaming import StreamingOptions
from .voice_library import open_voice_library
from .voice_library.base import VoiceBackend
from .voices import DEFAULT_MAX_VOICES, VoiceStore, read_spk2info

logger = logging.getLogger("cosyserve.engine")

STAGES = ("llm", "flow", "vocoder")
# Key / value buffers of finished streams kept for the next ones (their pages stay resident), at most.
KEEP_MAX = 4 << 30


@dataclass(frozen=True)
class StagePlacement:
    """The device of each stage: the LLM, the flow, the vocoder (the frontend stays on the CPU)."""

    llm: str = "cpu"
    flow: str = "cpu"
    vocoder: str = "cpu"

    @classmethod
    def on(cls, device: str) -> StagePlacement:
        """Every stage on ``device``."""
        return cls(device, device, device)

    @classmethod
    def parse(cls, spec: str, default: str = "cpu") -> StagePlacement:
        """``"cuda:0"`` (every stage) or ``"llm=cuda:0,flow=cuda:1"`` (the others on ``default``)."""
        spec = spec.strip()
        if not spec:
            return cls.on(default)
        if "=" not in spec:
            return cls.on(spec)
        devices = dict.fromkeys(STAGES, default)
        for part in spec.split(","):
            stage, _, device = part.strip().partition("=")
            if stage not in STAGES or not device:
                raise ValueError(f"placement {part!r} is not stage=device with a stage of {', '.join(STAGES)}")
            devices[stage] = device.strip()
        return cls(**devices)

    def devices(self) -> dict[str, torch.device]:
        return {stage: torch.device(getattr(self, stage)) for stage in STAGES}


def resolve_device(gpu: int | None) -> str:
    """``cuda:<gpu>`` when CUDA is there; the CPU (with a warning if a GPU was asked for) otherwise.
    Raises ValueError for a GPU index that is not there."""
    if gpu == -1:
        return "cpu"
    if not torch.cuda.is_available():
        if gpu is not None:
            logger.warning("CUDA is not available: running on the CPU instead of GPU %d", gpu)
        return "cpu"
    count = torch.cuda.device_count()
    index = 0 if gpu is None else gpu
    if index >= count:
        raise ValueError(f"--gpu {index} is out of range: {count} CUDA device(s) visible (0..{count - 1})")
    return f"cuda:{index}"


@dataclass
class EngineOptions:
    """Behaviour switches; the defaults are what the models were trained for."""

    text_frontend: str = "auto"  # text normaliser back-end: auto | wetext | none
    prompt_mel_rate: str = "model"  # v1 prompt mel at the model rate, "reference" = HEAD's 24 kHz
    reference_eos_mask: bool = False  # reproduce HEAD's early stop where it differs (v3, spec §17.2)
    llm_weights: str = "llm.pt"  # v3: "llm.rl.pt" selects the RL-tuned LLM
    prompt_limits: PromptLimits = field(default_factory=PromptLimits)
    data_dir: Path | None = None  # where the voice library lives (None: stored voices kept in memory only)
    max_voices: int = DEFAULT_MAX_VOICES  # cap on the library's voices (all families)
    voice_store: str = ""  # a postgresql:// URL: voices in that shared database instead of under data_dir
    # torch intra-op threads of the engine; None leaves torch's process setting alone
    threads: int | None = None
    frontend_threads: int = 1  # onnxruntime threads of the frontend (it runs beside the engine's loop)
    random_weights: bool = False  # build the networks from the yaml without reading weights (benchmarks)
    dtype: str = "fp32"  # precision per stage: "bf16" or "llm=int8,flow=bf16" (cosyserve.precision)
    flow_steps: int | None = None  # Euler steps of the flow (None: the model's, 10)
    stream_last_chunk: str = DEFAULT_STREAM_LAST_CHUNK  # streamed v2/v3 last chunk: causal | reference
    stream_cache_mb: int = DEFAULT_STREAM_CACHE_MB  # the streamed requests' flow caches together; 0: automatic
    placement: StagePlacement | None = None  # None: every stage on load_model's ``device``

    def check(self) -> None:
        """Raise ModelLoadError for a value no model can use."""
        try:
            check_engine_precision(self.dtype, self.stream_last_chunk, self.stream_cache_mb)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from exc
        if self.flow_steps is not None and self.flow_steps < 1:
            raise ModelLoadError(f"flow_steps must be at least 1, not {self.flow_steps}")
        if self.frontend_threads < 1:
            raise ModelLoadError(f"frontend_threads must be at least 1, not {self.frontend_threads}")

    def streaming(self) -> StreamingOptions:
        """The streaming options, the cache limit resolved (0: half the memory available now)."""
        limit = self.stream_cache_mb << 20 or available_memory_bytes() // 2
        return StreamingOptions(self.stream_last_chunk, StreamCachePool(limit, keep_bytes=min(limit // 2, KEEP_MAX)))


@dataclass(frozen=True, eq=False)
class LoadedParts:
    """What a model directory loads into (see the module doc)."""

    core: FamilyModel
    family: Family
    frontend: Frontend
    voices: VoiceStore
    options: EngineOptions
    placement: StagePlacement
    precision: dict[str, str]  # per stage, as --dtype resolved (``fast``: for this CPU)


def load_parts(
    model: str | Path, *, device: str, hub: str, options: EngineOptions, library: VoiceBackend | None
) -> LoadedParts:
    """Load a model directory or hub id with ``options`` (see the module doc)."""
    options.check()
    if options.threads:
        # One setting for every kernel: the engine is the only thing computing in this process.
        torch.set_num_threads(options.threads)
    placement = options.placement or StagePlacement.on(device)
    model_dir, family_name = resolve_model_dir(model, hub=hub)
    family = FAMILIES[family_name]
    try:
        config = load_yaml(model_dir / family.yaml, {"qwen_pretrain_path": str(model_dir / "CosyVoice-BlankEN")})
        core = importlib.import_module(family.model_module).load(
            model_dir,
            config,
            llm_weights=options.llm_weights,
            random_weights=options.random_weights,
            flow_steps=options.flow_steps,
            reference_eos_mask=options.reference_eos_mask and family.reference_eos_quirk,
        )
        tokenizer = load_tokenizer(config, model_dir)
        mel_extractor = MelExtractor(**feat_extractor_args(config))
    except (ConfigError, CheckpointError) as exc:
        raise ModelLoadError(f"{model_dir}: {exc}") from exc
    except (ValueError, TypeError, KeyError) as exc:
        # A yaml value of the wrong type or an undecodable file: still a load error naming the yaml.
        reason = f"{type(exc).__name__}: {exc}"
        raise ModelLoadError(
            f"{model_dir}: {family.yaml} does not describe a usable {family_name} model ({reason})"
        ) from exc
    devices = placement.devices()
    core.llm.to(devices["llm"])
    core.flow.to(devices["flow"])
    core.hift.to(devices["vocoder"])
    precision = parse_dtypes(options.dtype)
    core.set_precision(**precision, llm_device=placement.llm, flow_device=placement.flow)
    precision = {**precision, "vocoder": "fp32"}
    logger.info(
        "%s precision: %s (--dtype %s)",
        model_dir.name,
        ", ".join(f"{k}={v}" for k, v in precision.items()),
        options.dtype,
    )
    threads = options.frontend_threads
    frontend = Frontend(
        version=core.version,
        tokenizer=tokenizer,
        normalizer=TextNormalizer(tokenizer, backend=options.text_frontend),
        speech_tokenizer=SpeechTokenizer(model_dir / family.speech_tokenizer, threads=threads),
        speaker_encoder=SpeakerEncoder(model_dir / "campplus.onnx", threads=threads),
        mel_extractor=mel_extractor,
        sample_rate=core.sample_rate,
        prompt_mel_rate=options.prompt_mel_rate,
        family=family_name,
        token_rate=core.token_frame_rate,
    )
    # Stored voices hold speech-token and text ids, so they are usable only by models with the
    # same tokenizers (300M / -SFT / -Instruct are; 300M-25Hz is not).
    library = library or open_voice_library(options.voice_store, options.data_dir, options.max_voices)
    builtin = read_spk2info(model_dir / "spk2info.pt", family_name, core.token_frame_rate)
    voices = VoiceStore(builtin, library, family=family_name, token_rate=core.token_frame_rate, model=model_dir.name)
    return LoadedParts(core, family, frontend, voices, options, placement, precision)
