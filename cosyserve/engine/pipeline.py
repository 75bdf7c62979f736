"""The inference API: one :class:`TTSModel` per loaded model directory, one method per mode.

Every ``inference_*`` method checks its inputs and runs the text and audio frontends at call time,
raising :mod:`cosyserve.errors` exceptions before any audio exists; it then returns a lazy iterator
of float32 chunks at ``sample_rate``. Closing the iterator stops the generation (LLM included).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cosyserve.audio.io import decode_audio, duration_s
from cosyserve.config import ConfigError, load_yaml
from cosyserve.errors import AudioError, InvalidRequest, ModelLoadError, TextError, UnsupportedMode
from cosyserve.families import FAMILIES
from cosyserve.frontend.features import MelExtractor
from cosyserve.frontend.frontend import Frontend
from cosyserve.frontend.onnx_models import SpeakerEncoder, SpeechTokenizer
from cosyserve.frontend.voice_prompt import VoicePrompt
from cosyserve.hub import resolve_model_dir
from cosyserve.models.base import FamilyModel, feat_extractor_args
from cosyserve.models.checkpoint import CheckpointError
from cosyserve.nn.sampling import Sampler
from cosyserve.precision import DEFAULT_STREAM_CACHE_MB, STREAM_LAST_CHUNK_MODES, parse_dtypes
from cosyserve.text.normalize import TextNormalizer
from cosyserve.text.tokenizers import load_tokenizer

from . import streaming
from .request import GenerationOptions, SynthesisRequest
from .scheduler import Scheduler, Sequence, new_sequence, run_alone
from .streaming import Draws, Synthesizer
from .text_feed import FeedReader, TextFeed
from .voice_library import open_voice_library
from .voice_library.base import VoiceBackend
from .voices import DEFAULT_MAX_VOICES, VoiceStore, read_spk2info

_MODE_HINTS = {
    "sft": "it needs built-in speakers (iic/CosyVoice-300M-SFT ships them) or a stored voice; "
    "zero_shot and cross_lingual take a prompt recording instead",
    "instruct": "it needs a CosyVoice 1.0 model, and only iic/CosyVoice-300M-Instruct is trained for instructions; "
    "CosyVoice2 / Fun-CosyVoice3 use instruct2",
    "instruct2": "it needs a CosyVoice2 or Fun-CosyVoice3 model (e.g. iic/CosyVoice2-0.5B); "
    "CosyVoice 1.0 uses instruct with iic/CosyVoice-300M-Instruct",
}


def unsupported_mode(family: str, mode: str, modes: frozenset[str]) -> UnsupportedMode:
    """The error for a mode the loaded model cannot serve, saying which model would."""
    hint = _MODE_HINTS.get(mode, f"it supports {', '.join(sorted(modes))}")
    name = FAMILIES[family].display if family in FAMILIES else family
    return UnsupportedMode(f"the loaded {name} model ({family}) cannot serve {mode}: {hint}", param="mode")


# v3 was trained with a system prompt ending in <|endofprompt|> in front of the text (spec §5.5).
V3_SYSTEM_PROMPT = "You are a helpful assistant."
END_OF_PROMPT = "<|endofprompt|>"


# The modes that take text arriving over time (bi-streaming, v2/v3): those whose LLM input is text.
BISTREAM_MODES = ("sft", "zero_shot", "cross_lingual", "instruct2")

MIN_PROMPT_SECONDS = 0.5  # shorter prompts carry too little of the voice
MAX_PROMPT_SECONDS = 30.0  # the speech tokenizer's limit


@dataclass
class EngineOptions:
    """Behaviour switches; the defaults are what the models were trained for."""

    text_frontend: str = "auto"  # text normaliser back-end: auto | wetext | none
    prompt_mel_rate: str = "model"  # v1 prompt mel at the model rate, "reference" = HEAD's 24 kHz
    reference_eos_mask: bool = False  # v3: reproduce HEAD's ignore-EOS bug (spec §17.2)
    llm_weights: str = "llm.pt"  # v3: "llm.rl.pt" selects the RL-tuned LLM
    min_prompt_seconds: float = MIN_PROMPT_SECONDS
    max_prompt_seconds: float = MAX_PROMPT_SECONDS
    data_dir: Path | None = None  # where the voice library lives (None: stored voices kept in memory only)
    max_voices: int = DEFAULT_MAX_VOICES  # cap on the library's voices (all families)
    # torch intra-op and onnxruntime threads; None leaves torch's process setting alone (ONNX: 1)
    threads: int | None = None
    random_weights: bool = False  # build the networks from the yaml without reading weights (benchmarks)
    dtype: str = "fp32"  # precision per stage: "bf16" or "llm=int8,flow=bf16" (cosyserve.precision)
    flow_steps: int | None = None  # Euler steps of the flow (None: the model's, 10)
    stream_last_chunk: str = "reference"  # streamed v2/v3 last chunk: reference (full context) | causal
    stream_cache_mb: int = DEFAULT_STREAM_CACHE_MB  # per streamed request, the flow's cached keys / values
    voice_store: str = ""  # a postgresql:// URL: voices in that shared database instead of under data_dir


class TTSModel:
    """A loaded model directory: frontends, networks, speakers."""

    def __init__(self, core: FamilyModel, frontend: Frontend, voices: VoiceStore, options: EngineOptions) -> None:
        self.core = core
        self.frontend = frontend
        self.voices = voices
        self.options = options
        self.family_info = FAMILIES[core.family]
        self._synthesizer: type[Synthesizer] = getattr(streaming, self.family_info.synthesizer)

    # -- description -----------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.core.family

    @property
    def sample_rate(self) -> int:
        return self.core.sample_rate

    @property
    def token_rate(self) -> int:
        """Speech tokens per second."""
        return self.core.token_frame_rate

    @property
    def model_dir(self) -> Path:
        return self.core.model_dir

    @property
    def modes(self) -> frozenset[str]:
        modes = {"zero_shot", "cross_lingual", "vc"}
        modes.add(self.family_info.instruct_mode)
        if self.voices.ids():
            modes.add("sft")
        return frozenset(modes)

    @property
    def bistream_modes(self) -> frozenset[str]:
        """The modes that take streamed text (``prepare(..., text_feed=)``): v2/v3 only."""
        if not hasattr(self.core.llm, "new_bistream"):
            return frozenset()
        return self.modes & frozenset(BISTREAM_MODES)

    def list_speakers(self) -> list[str]:
        return self.voices.ids()

    # -- synthesis -------------------------------------------------------------------------------
    def synthesize(
        self,
        request: SynthesisRequest,
        *,
        draws: Draws | None = None,
        sampler: Sampler | None = None,
        text_feed: TextFeed | None = None,
    ) -> Iterator[np.ndarray]:
        """Check ``request`` and run its frontend now (raising :mod:`cosyserve.errors`), then return
        a lazy iterator of its float32 chunks, generated in the caller's thread. ``draws`` /
        ``sampler`` replace the request's random source and LLM sampler (tests feed the reference's
        draws and a greedy sampler through them). ``text_feed``: the text arrives through it while
        the iterator runs (another thread appends to it; see :meth:`prepare`)."""
        sequence = self.prepare(request, draws=draws, sampler=sampler, text_feed=text_feed)
        return run_alone(self.new_scheduler(), sequence)

    def new_scheduler(self, audio_jobs_per_step: int = 1) -> Scheduler:
        return Scheduler(self.core, self._synthesizer, audio_jobs_per_step)

    def prepare(
        self,
        request: SynthesisRequest,
        *,
        draws: Draws | None = None,
        sampler: Sampler | None = None,
        request_id: str = "",
        text_feed: TextFeed | None = None,
    ) -> Sequence:
        """Validate ``request`` and run its frontend: the :class:`Sequence` a scheduler generates.

        With ``text_feed`` the text arrives over time through it (bi-streaming, v2/v3: see
        engine/text_feed.py); ``request.text``, when given, is its first fragment."""
        self._require(request.mode)
        options = request.options
        reader = None
        if text_feed is None:
            inputs = self._model_inputs(request)
        else:
            inputs = [self._bistream_input(request)]
            reader = FeedReader(text_feed, self._text_ids, first=request.text)
        draws = draws or Draws(options.seed)
        sampler = sampler or self.core.llm.make_sampler(draws.sampling_generator)
        return new_sequence(inputs, draws, sampler, options.stream, options.speed, request_id, reader)

    def _text_ids(self, text: str) -> list[int]:
        return self.frontend.tokenize(text).reshape(-1).tolist()

    def _bistream_input(self, r: SynthesisRequest) -> dict[str, torch.Tensor]:
        """The model input of a request whose text is streamed: the mode's prompt, no target text."""
        if not hasattr(self.core.llm, "new_bistream"):
            raise UnsupportedMode(
                f"streamed text input (bistream) needs a CosyVoice2 or Fun-CosyVoice3 model; the loaded "
                f"{self.family_info.display} model ({self.family}) speaks whole texts only",
                param="text",
            )
        if r.mode not in BISTREAM_MODES:
            raise UnsupportedMode(f"streamed text input serves {', '.join(BISTREAM_MODES)}, not {r.mode}", param="mode")
        model_input = self._model_inputs(r, segments=[""])[0]
        # What the mode puts before the target text (v3: the system prompt) heads the prompt text.
        empty = torch.zeros(1, 0, dtype=torch.int32)
        model_input["prompt_text"] = torch.cat([model_input.get("prompt_text", empty), model_input["text"]], dim=1)
        model_input["text"] = empty
        self.core.llm.split_bistream_prompt(model_input["prompt_text"])  # v3: needs <|endofprompt|>
        return model_input

    def _model_inputs(self, r: SynthesisRequest, segments: list[str] | None = None) -> list[dict[str, torch.Tensor]]:
        """The per-segment model inputs of a request (spec §7), by mode (``segments``: the texts, else
        the request's text normalised and split)."""
        frontend, text_frontend = self.frontend, r.options.text_frontend
        if r.mode == "vc":
            # The reference's vc frontend does not trim the prompt to the 2:1 token/mel ratio.
            prompt = self._prompt_or_voice(r.prompt_audio, r.spk_id, align=False)
            return [frontend.vc(self._checked_audio(r.source_audio, "source_wav"), prompt)]
        segments = self._segments(r.text, text_frontend) if segments is None else segments
        if r.mode == "sft":
            speaker = self._speaker(r.spk_id)
            return [frontend.sft(self._v3_text(s), speaker) for s in segments]
        if r.mode == "zero_shot":
            if r.spk_id is not None and r.prompt_audio is None:
                prompt = self.voices.get(r.spk_id)
                if prompt.has_prompt and not prompt.has_transcript:
                    raise InvalidRequest(
                        f"voice '{r.spk_id}' has no transcript (it was stored without ref_text), so zero_shot "
                        "cannot use it: use it with cross_lingual, or store its recording again with ref_text",
                        param="spk_id",
                    )
                return [frontend.zero_shot(s, None, prompt) for s in segments]
            prompt_text = self._text(r.prompt_text, "prompt_text", split=False, frontend=text_frontend)
            prompt = self.prompt(r.prompt_audio)
            return [frontend.zero_shot(s, self._v3_text(prompt_text), prompt) for s in segments]
        if r.mode == "cross_lingual":
            prompt = self._prompt_or_voice(r.prompt_audio, r.spk_id)
            return [frontend.cross_lingual(self._v3_text(s), prompt) for s in segments]
        if r.mode == "instruct":
            speaker = self._speaker(r.spk_id)
            instruct = self._text(r.instruct_text, "instruct_text", split=False, frontend=text_frontend)
            return [frontend.instruct(s, speaker, instruct) for s in segments]
        # instruct2
        if not r.instruct_text or not r.instruct_text.strip():
            raise TextError("instruct_text is empty", param="instruct_text")
        instruct = self._instruct2_text(r.instruct_text)
        prompt = self._prompt_or_voice(r.prompt_audio, r.spk_id)
        return [frontend.instruct2(s, instruct, prompt) for s in segments]

    # -- the official per-mode API ------------------------------------------------------------------
    def inference_sft(self, text: str, spk_id: str, **options: Any) -> Iterator[np.ndarray]:
        return self._run("sft", options, text=text, spk_id=spk_id)

    def inference_zero_shot(
        self, text: str, prompt_text: str, prompt_audio: Any = None, *, spk_id: str | None = None, **options: Any
    ) -> Iterator[np.ndarray]:
        return self._run(
            "zero_shot", options, text=text, prompt_text=prompt_text, prompt_audio=prompt_audio, spk_id=spk_id
        )

    def inference_cross_lingual(
        self, text: str, prompt_audio: Any = None, *, spk_id: str | None = None, **options: Any
    ) -> Iterator[np.ndarray]:
        return self._run("cross_lingual", options, text=text, prompt_audio=prompt_audio, spk_id=spk_id)

    def inference_instruct(self, text: str, spk_id: str, instruct_text: str, **options: Any) -> Iterator[np.ndarray]:
        return self._run("instruct", options, text=text, spk_id=spk_id, instruct_text=instruct_text)

    def inference_instruct2(
        self, text: str, instruct_text: str, prompt_audio: Any = None, *, spk_id: str | None = None, **options: Any
    ) -> Iterator[np.ndarray]:
        return self._run(
            "instruct2", options, text=text, instruct_text=instruct_text, prompt_audio=prompt_audio, spk_id=spk_id
        )

    def inference_vc(
        self, source_audio: Any, prompt_audio: Any = None, *, spk_id: str | None = None, **options: Any
    ) -> Iterator[np.ndarray]:
        return self._run("vc", options, source_audio=source_audio, prompt_audio=prompt_audio, spk_id=spk_id)

    def _run(self, mode: str, options: dict[str, Any], **fields: Any) -> Iterator[np.ndarray]:
        """``options``: the :class:`GenerationOptions` fields (stream, speed, seed, text_frontend),
        plus ``draws`` / ``sampler`` (see :meth:`synthesize`)."""
        draws, sampler = options.pop("draws", None), options.pop("sampler", None)
        request = SynthesisRequest(mode, options=GenerationOptions(**options), **fields)
        return self.synthesize(request, draws=draws, sampler=sampler)

    def add_speaker(
        self, spk_id: str, prompt_text: str | None, prompt_audio: Any, text_frontend: bool = True
    ) -> VoicePrompt:
        """Compute a voice prompt once and store it under ``spk_id`` (official ``add_zero_shot_spk``).

        Without ``prompt_text`` (the recording's transcript) the voice serves every mode but zero_shot.
        Raises (before any work) InvalidRequest for a bad id, VoiceExists / VoiceLimitReached.
        """
        spk_id = self.voices.check_new(spk_id, param="spk_id")
        audio = self._checked_audio(prompt_audio, "prompt_wav")
        voice = self.frontend.process_prompt(audio)
        ref_text = prompt_text.strip() if prompt_text and prompt_text.strip() else None
        if ref_text is not None:
            text = self._v3_text(self._text(ref_text, "prompt_text", split=False, frontend=text_frontend))
            voice = self.frontend.with_transcript(voice, ref_text, text)
        self.voices.add(spk_id, voice, duration=duration_s(*audio))
        return voice

    def prompt(self, audio: Any, param: str = "prompt_wav", align: bool | None = None) -> VoicePrompt:
        """The voice of an audio prompt (checked first): its speech tokens, mel and x-vector."""
        return self.frontend.process_prompt(self._checked_audio(audio, param), align=align)

    # -- helpers ---------------------------------------------------------------------------------
    def _require(self, mode: str) -> None:
        if mode not in self.modes:
            raise unsupported_mode(self.family, mode, self.modes)

    def _segments(self, text: str | None, text_frontend: bool) -> list[str]:
        segments = self._text(text, "tts_text", split=True, frontend=text_frontend)
        if not segments:
            raise TextError("tts_text has nothing to speak after normalisation", param="tts_text")
        return segments

    def _text(self, text: str | None, param: str, split: bool, frontend: bool) -> Any:
        if not isinstance(text, str) or not text.strip():
            raise TextError(f"{param} is empty", param=param)
        return self.frontend.normalize(text, split=split, text_frontend=frontend)

    def _v3_text(self, text: str) -> str:
        """v3 target / prompt text with the system prompt the model was trained with."""
        if self.family_info.system_prompt and END_OF_PROMPT not in text:
            return V3_SYSTEM_PROMPT + END_OF_PROMPT + text
        return text

    def _instruct2_text(self, instruct: str) -> str:
        if END_OF_PROMPT in instruct:
            return instruct
        if self.family_info.system_prompt and not instruct.startswith(V3_SYSTEM_PROMPT):
            instruct = f"{V3_SYSTEM_PROMPT} {instruct}"
        return instruct + END_OF_PROMPT

    def _prompt_or_voice(
        self, audio: Any, spk_id: str | None, param: str = "prompt_wav", align: bool | None = None
    ) -> VoicePrompt:
        if audio is None:
            if spk_id is None:
                raise AudioError(f"{param} is required", param=param)
            return self.voices.get(spk_id)
        return self.prompt(audio, param, align)

    def _checked_audio(self, audio: Any, param: str) -> tuple[np.ndarray, int]:
        """Decode once and enforce the prompt duration limits; returns ``(wave, sample_rate)``."""
        if audio is None:
            raise AudioError(f"{param} is required", param=param)
        try:
            wave, sr = decode_audio(audio, max_seconds=self.options.max_prompt_seconds)
        except AudioError as exc:
            exc.param = exc.param or param
            raise
        seconds = duration_s(wave, sr)
        opts = self.options
        if seconds < opts.min_prompt_seconds:
            raise AudioError(f"{param} is {seconds:.2f} s long; at least {opts.min_prompt_seconds} s needed", param)
        if seconds > opts.max_prompt_seconds:
            raise AudioError(f"{param} is {seconds:.1f} s long; at most {opts.max_prompt_seconds} s allowed", param)
        return wave, sr

    def _speaker(self, spk_id: str | None) -> VoicePrompt:
        if not spk_id:
            raise InvalidRequest("spk_id is required", param="spk_id")
        return self.voices.get(spk_id)


def load_model(
    model: str | Path,
    *,
    device: str = "cpu",
    hub: str = "auto",
    options: EngineOptions | None = None,
    library: VoiceBackend | None = None,
    **option_overrides: Any,
) -> TTSModel:
    """Load a model directory or hub id (``iic/CosyVoice-300M``, ``FunAudioLLM/CosyVoice2-0.5B``...).

    ``library``: the voice library to use, shared by the models of one server (None: one opened on
    ``options.data_dir``)."""
    options = options or EngineOptions(**option_overrides)
    if options.threads:
        # One setting for every kernel: the engine is the only thing computing in this process.
        torch.set_num_threads(options.threads)
    onnx_threads = options.threads or 1
    model_dir, family = resolve_model_dir(model, hub=hub)
    info = FAMILIES[family]
    yaml_name, module_name, tokenizer_file = info.yaml, info.model_module, info.speech_tokenizer
    try:
        config = load_yaml(model_dir / yaml_name, {"qwen_pretrain_path": str(model_dir / "CosyVoice-BlankEN")})
        core = importlib.import_module(module_name).load(
            model_dir, config, llm_weights=options.llm_weights, random_weights=options.random_weights
        )
        if family == "cosyvoice3":
            core.llm.reference_eos_mask = options.reference_eos_mask
        tokenizer = load_tokenizer(config, model_dir)
        mel_extractor = MelExtractor(**feat_extractor_args(config))
    except (ConfigError, CheckpointError) as exc:
        raise ModelLoadError(f"{model_dir}: {exc}") from exc
    except (ValueError, TypeError, KeyError) as exc:
        # A yaml value of the wrong type or an undecodable file: still a load error naming the yaml.
        reason = f"{type(exc).__name__}: {exc}"
        raise ModelLoadError(f"{model_dir}: {yaml_name} does not describe a usable {family} model ({reason})") from exc
    try:
        dtypes = parse_dtypes(options.dtype)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    core.set_precision(**dtypes)
    if options.flow_steps is not None:
        if options.flow_steps < 1:
            raise ModelLoadError(f"flow_steps must be at least 1, not {options.flow_steps}")
        core.flow.decoder.n_timesteps = options.flow_steps
    if options.stream_last_chunk not in STREAM_LAST_CHUNK_MODES:
        modes = ", ".join(STREAM_LAST_CHUNK_MODES)
        raise ModelLoadError(f"stream_last_chunk {options.stream_last_chunk!r} is not one of {modes}")
    if options.stream_cache_mb < 0:
        raise ModelLoadError(f"stream_cache_mb must be 0 or more, not {options.stream_cache_mb}")
    core.stream_last_chunk = options.stream_last_chunk
    core.stream_cache_bytes = options.stream_cache_mb << 20
    if device != "cpu":
        core.llm.to(device)
        core.flow.to(device)
        core.hift.to(device)
    frontend = Frontend(
        version=core.version,
        tokenizer=tokenizer,
        normalizer=TextNormalizer(tokenizer, backend=options.text_frontend),
        speech_tokenizer=SpeechTokenizer(model_dir / tokenizer_file, threads=onnx_threads),
        speaker_encoder=SpeakerEncoder(model_dir / "campplus.onnx", threads=onnx_threads),
        mel_extractor=mel_extractor,
        sample_rate=core.sample_rate,
        prompt_mel_rate=options.prompt_mel_rate,
        family=family,
        token_rate=core.token_frame_rate,
    )
    # Stored voices hold speech-token and text ids, so they are usable only by models with the
    # same tokenizers (300M / -SFT / -Instruct are; 300M-25Hz is not).
    library = library or open_voice_library(options.voice_store, options.data_dir, options.max_voices)
    builtin = read_spk2info(model_dir / "spk2info.pt", family, core.token_frame_rate)
    voices = VoiceStore(builtin, library, family=family, token_rate=core.token_frame_rate, model=model_dir.name)
    return TTSModel(core, frontend, voices, options)
