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

from cosyserve.audio.io import decode_audio
from cosyserve.config import ConfigError, load_yaml
from cosyserve.errors import AudioError, InvalidRequest, ModelLoadError, TextError, UnsupportedMode
from cosyserve.frontend.features import MelExtractor
from cosyserve.frontend.frontend import Frontend
from cosyserve.frontend.onnx_models import SpeakerEncoder, SpeechTokenizer
from cosyserve.hub import resolve_model_dir
from cosyserve.models.base import FamilyModel, feat_extractor_args
from cosyserve.models.checkpoint import CheckpointError
from cosyserve.models.cosyvoice2.llm import MAX_TOKEN_TEXT_RATIO
from cosyserve.nn.flow_matching import FIXED_NOISE_FRAMES
from cosyserve.nn.sampling import Sampler
from cosyserve.text.normalize import TextNormalizer
from cosyserve.text.tokenizers import load_tokenizer

from .streaming import Draws, PromptCondition, Synthesizer, V1Synthesizer, V2Synthesizer, V3Synthesizer
from .voice_library import open_voice_library
from .voices import DEFAULT_MAX_VOICES, Voice, VoiceStore, read_spk2info

_FAMILIES: dict[str, tuple[str, str, str, type[Synthesizer]]] = {
    # family: (yaml, model module, speech tokenizer file, synthesizer)
    "cosyvoice1": ("cosyvoice.yaml", "cosyserve.models.cosyvoice1.model", "speech_tokenizer_v1.onnx", V1Synthesizer),
    "cosyvoice2": ("cosyvoice2.yaml", "cosyserve.models.cosyvoice2.model", "speech_tokenizer_v2.onnx", V2Synthesizer),
    "cosyvoice3": ("cosyvoice3.yaml", "cosyserve.models.cosyvoice3.model", "speech_tokenizer_v3.onnx", V3Synthesizer),
}

FAMILY_NAMES = {"cosyvoice1": "CosyVoice 1.0", "cosyvoice2": "CosyVoice2", "cosyvoice3": "Fun-CosyVoice3"}
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
    name = FAMILY_NAMES.get(family, family)
    return UnsupportedMode(f"the loaded {name} model ({family}) cannot serve {mode}: {hint}", param="mode")


# v3 was trained with a system prompt ending in <|endofprompt|> in front of the text (spec §5.5).
V3_SYSTEM_PROMPT = "You are a helpful assistant."
END_OF_PROMPT = "<|endofprompt|>"


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
    voice_store: str = ""  # a postgresql:// URL: voices in that shared database instead of under data_dir


class TTSModel:
    """A loaded model directory: frontends, networks, speakers."""

    def __init__(self, core: FamilyModel, frontend: Frontend, voices: VoiceStore, options: EngineOptions) -> None:
        self.core = core
        self.frontend = frontend
        self.voices = voices
        self.options = options
        self._synthesizer = _FAMILIES[core.family][3]

    # -- description -----------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.core.family

    @property
    def sample_rate(self) -> int:
        return self.core.sample_rate

    @property
    def model_dir(self) -> Path:
        return self.core.model_dir

    @property
    def modes(self) -> frozenset[str]:
        modes = {"zero_shot", "cross_lingual", "vc"}
        modes.add("instruct" if self.core.version == "v1" else "instruct2")
        if self.voices.ids():
            modes.add("sft")
        return frozenset(modes)

    def list_speakers(self) -> list[str]:
        return self.voices.ids()

    # -- modes -----------------------------------------------------------------------------------
    def inference_sft(
        self,
        text: str,
        spk_id: str,
        *,
        stream: bool = False,
        speed: float = 1.0,
        seed: int | None = None,
        text_frontend: bool = True,
        draws: Draws | None = None,
        sampler: Sampler | None = None,
    ) -> Iterator[np.ndarray]:
        self._require("sft")
        speaker = self.voices.get(spk_id)
        segments = [self._v3_text(s) for s in self._segments(text, text_frontend)]
        inputs = [self.frontend.sft(s, speaker) for s in segments]
        return self._generate(inputs, stream, speed, seed, draws, sampler)

    def inference_zero_shot(
        self,
        text: str,
        prompt_text: str,
        prompt_audio: Any = None,
        *,
        spk_id: str | None = None,
        stream: bool = False,
        speed: float = 1.0,
        seed: int | None = None,
        text_frontend: bool = True,
        draws: Draws | None = None,
        sampler: Sampler | None = None,
    ) -> Iterator[np.ndarray]:
        self._require("zero_shot")
        segments = self._segments(text, text_frontend)
        if spk_id is not None and prompt_audio is None:
            prompt = self.voices.get(spk_id)
            if "llm_prompt_speech_token" in prompt and "prompt_text" not in prompt:
                raise InvalidRequest(
                    f"voice '{spk_id}' has no transcript (it was stored without ref_text), so zero_shot cannot use "
                    "it: use it with cross_lingual, or store its recording again with ref_text",
                    param="spk_id",
                )
            inputs = [self.frontend.zero_shot(s, None, prompt) for s in segments]
        else:
            prompt_text = self._v3_text(self._text(prompt_text, "prompt_text", split=False, frontend=text_frontend))
            prompt = self.prompt(prompt_audio)
            inputs = [self.frontend.zero_shot(s, prompt_text, prompt) for s in segments]
        return self._generate(inputs, stream, speed, seed, draws, sampler)

    def inference_cross_lingual(
        self,
        text: str,
        prompt_audio: Any = None,
        *,
        spk_id: str | None = None,
        stream: bool = False,
        speed: float = 1.0,
        seed: int | None = None,
        text_frontend: bool = True,
        draws: Draws | None = None,
        sampler: Sampler | None = None,
    ) -> Iterator[np.ndarray]:
        self._require("cross_lingual")
        prompt = self._prompt_or_voice(prompt_audio, spk_id)
        segments = [self._v3_text(s) for s in self._segments(text, text_frontend)]
        inputs = [self.frontend.cross_lingual(s, prompt) for s in segments]
        return self._generate(inputs, stream, speed, seed, draws, sampler)

    def inference_instruct(
        self,
        text: str,
        spk_id: str,
        instruct_text: str,
        *,
        stream: bool = False,
        speed: float = 1.0,
        seed: int | None = None,
        text_frontend: bool = True,
        draws: Draws | None = None,
        sampler: Sampler | None = None,
    ) -> Iterator[np.ndarray]:
        self._require("instruct")
        speaker = self.voices.get(spk_id)
        instruct = self._text(instruct_text, "instruct_text", split=False, frontend=text_frontend)
        inputs = [self.frontend.instruct(s, speaker, instruct) for s in self._segments(text, text_frontend)]
        return self._generate(inputs, stream, speed, seed, draws, sampler)

    def inference_instruct2(
        self,
        text: str,
        instruct_text: str,
        prompt_audio: Any = None,
        *,
        spk_id: str | None = None,
        stream: bool = False,
        speed: float = 1.0,
        seed: int | None = None,
        text_frontend: bool = True,
        draws: Draws | None = None,
        sampler: Sampler | None = None,
    ) -> Iterator[np.ndarray]:
        self._require("instruct2")
        if not instruct_text or not instruct_text.strip():
            raise TextError("instruct_text is empty", param="instruct_text")
        instruct = self._instruct2_text(instruct_text)
        prompt = self._prompt_or_voice(prompt_audio, spk_id)
        inputs = [self.frontend.instruct2(s, instruct, prompt) for s in self._segments(text, text_frontend)]
        return self._generate(inputs, stream, speed, seed, draws, sampler)

    def inference_vc(
        self,
        source_audio: Any,
        prompt_audio: Any = None,
        *,
        spk_id: str | None = None,
        stream: bool = False,
        speed: float = 1.0,
        seed: int | None = None,
        draws: Draws | None = None,
        sampler: Sampler | None = None,
    ) -> Iterator[np.ndarray]:
        self._require("vc")
        # The reference's vc frontend does not trim the prompt to the 2:1 token/mel ratio.
        prompt = self._prompt_or_voice(prompt_audio, spk_id, align=False)
        source = self._checked_audio(source_audio, "source_wav")
        return self._generate([self.frontend.vc(source, prompt)], stream, speed, seed, draws, sampler)

    def add_speaker(self, spk_id: str, prompt_text: str | None, prompt_audio: Any, text_frontend: bool = True) -> Voice:
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
            voice = self.frontend.zero_shot_speaker(text, voice)
        self.voices.add(spk_id, voice, ref_text=ref_text, duration=audio[0].shape[1] / audio[1])
        return voice

    def prompt(self, audio: Any, param: str = "prompt_wav", align: bool | None = None) -> dict[str, torch.Tensor]:
        """Prompt speech tokens, mel and x-vector of an audio prompt (checked first)."""
        return self.frontend.process_prompt(self._checked_audio(audio, param), align=align)

    # -- helpers ---------------------------------------------------------------------------------
    def _require(self, mode: str) -> None:
        if mode not in self.modes:
            raise unsupported_mode(self.family, mode, self.modes)

    def _segments(self, text: str, text_frontend: bool) -> list[str]:
        segments = self._text(text, "tts_text", split=True, frontend=text_frontend)
        if not segments:
            raise TextError("tts_text has nothing to speak after normalisation", param="tts_text")
        return segments

    def _text(self, text: str, param: str, split: bool, frontend: bool) -> Any:
        if not isinstance(text, str) or not text.strip():
            raise TextError(f"{param} is empty", param=param)
        return self.frontend.normalize(text, split=split, text_frontend=frontend)

    def _v3_text(self, text: str) -> str:
        """v3 target / prompt text with the system prompt the model was trained with."""
        if self.core.version == "v3" and END_OF_PROMPT not in text:
            return V3_SYSTEM_PROMPT + END_OF_PROMPT + text
        return text

    def _instruct2_text(self, instruct: str) -> str:
        if END_OF_PROMPT in instruct:
            return instruct
        if self.core.version == "v3" and not instruct.startswith(V3_SYSTEM_PROMPT):
            instruct = f"{V3_SYSTEM_PROMPT} {instruct}"
        return instruct + END_OF_PROMPT

    def _prompt_or_voice(
        self, audio: Any, spk_id: str | None, param: str = "prompt_wav", align: bool | None = None
    ) -> dict[str, torch.Tensor]:
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
            wave, sr = decode_audio(audio)
        except AudioError as exc:
            exc.param = exc.param or param
            raise
        seconds = wave.shape[1] / sr
        opts = self.options
        if seconds < opts.min_prompt_seconds:
            raise AudioError(f"{param} is {seconds:.2f} s long; at least {opts.min_prompt_seconds} s needed", param)
        if seconds > opts.max_prompt_seconds:
            raise AudioError(f"{param} is {seconds:.1f} s long; at most {opts.max_prompt_seconds} s allowed", param)
        return wave, sr

    def _tokens(self, model_input: dict[str, torch.Tensor], sampler: Sampler) -> Iterator[int]:
        if "source_speech_token" in model_input:
            return iter(model_input["source_speech_token"].reshape(-1).tolist())
        empty_ids = torch.zeros(1, 0, dtype=torch.int32)
        return self.core.llm.inference(
            model_input["text"],
            model_input.get("prompt_text", empty_ids),
            model_input.get("llm_prompt_speech_token", empty_ids),
            model_input.get("llm_embedding", torch.zeros(0, 192)),
            sampler,
            max_len=self._max_tokens(model_input),
        )

    def _max_tokens(self, model_input: dict[str, torch.Tensor]) -> int:
        """The LLM's length bound: 20 tokens per text token, and for v2/v3 no more than the flow's
        fixed noise covers (300 s, prompt included), so an unsplittable text cannot overrun it."""
        bound = MAX_TOKEN_TEXT_RATIO * model_input["text"].shape[1]
        if self.core.token_mel_ratio:
            prompt = model_input.get("flow_prompt_speech_token", torch.zeros(1, 0)).shape[1]
            bound = min(bound, FIXED_NOISE_FRAMES // self.core.token_mel_ratio - prompt)
        return max(bound, 0)

    def _generate(
        self,
        inputs: list[dict[str, torch.Tensor]],
        stream: bool,
        speed: float,
        seed: int | None,
        draws: Draws | None = None,
        sampler: Sampler | None = None,
    ) -> Iterator[np.ndarray]:
        """``draws`` / ``sampler`` replace the request's random source and LLM sampler (tests feed
        the reference's draws and a greedy sampler through them)."""
        if not 0.25 <= float(speed) <= 4.0:
            raise InvalidRequest(f"speed must be within 0.25..4.0, got {speed}", param="speed")
        draws = draws or Draws(seed)
        sampler = sampler or self.core.llm.make_sampler(draws.sampling_generator)
        return self._chunks(inputs, stream, float(speed), draws, sampler)

    def _chunks(self, inputs, stream, speed, draws, sampler) -> Iterator[np.ndarray]:
        with torch.inference_mode():
            for model_input in inputs:
                condition = PromptCondition(
                    token=model_input.get("flow_prompt_speech_token", torch.zeros(1, 0, dtype=torch.int32)),
                    feat=model_input.get("prompt_speech_feat", torch.zeros(1, 0, 80)),
                    embedding=model_input["flow_embedding"],
                )
                synthesizer = self._synthesizer(self.core, condition, draws, speed)
                yield from synthesizer.run(self._tokens(model_input, sampler), stream)


def load_model(
    model: str | Path,
    *,
    device: str = "cpu",
    hub: str = "auto",
    options: EngineOptions | None = None,
    **option_overrides: Any,
) -> TTSModel:
    """Load a model directory or hub id (``iic/CosyVoice-300M``, ``FunAudioLLM/CosyVoice2-0.5B``...)."""
    options = options or EngineOptions(**option_overrides)
    model_dir, family = resolve_model_dir(model, hub=hub)
    yaml_name, module_name, tokenizer_file, _ = _FAMILIES[family]
    try:
        config = load_yaml(model_dir / yaml_name, {"qwen_pretrain_path": str(model_dir / "CosyVoice-BlankEN")})
        core = importlib.import_module(module_name).load(model_dir, config, llm_weights=options.llm_weights)
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
    if device != "cpu":
        core.llm.to(device)
        core.flow.to(device)
        core.hift.to(device)
    frontend = Frontend(
        version=core.version,
        tokenizer=tokenizer,
        normalizer=TextNormalizer(tokenizer, backend=options.text_frontend),
        speech_tokenizer=SpeechTokenizer(model_dir / tokenizer_file),
        speaker_encoder=SpeakerEncoder(model_dir / "campplus.onnx"),
        mel_extractor=mel_extractor,
        sample_rate=core.sample_rate,
        prompt_mel_rate=options.prompt_mel_rate,
    )
    # Stored voices hold speech-token and text ids, so they are usable only by models with the
    # same tokenizers (300M / -SFT / -Instruct are; 300M-25Hz is not).
    library = open_voice_library(options.voice_store, options.data_dir, options.max_voices)
    builtin = read_spk2info(model_dir / "spk2info.pt")
    voices = VoiceStore(builtin, library, family=family, token_rate=core.token_frame_rate, model=model_dir.name)
    return TTSModel(core, frontend, voices, options)
