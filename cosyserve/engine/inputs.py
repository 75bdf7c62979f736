"""A request's model inputs, typed once: one frozen :class:`SegmentInput` per text segment.

:class:`InputBuilder` turns a :class:`SynthesisRequest` into them, one builder per mode (spec §7):
it checks the request's fields, normalises and splits the text, processes the prompt recording once
(one :func:`check_prompt_audio`, the engine's limits), adds the system prompt a family was trained
with, and asks the :class:`Frontend` for each segment's fields (the reference's names, which the
golden cases store), typed here. Every field exists on every input (empty where a mode has none),
on the CPU; each stage moves what it reads to its own device once.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import ClassVar

import torch
from torch import Tensor

from cosyserve.audio.io import AudioInput
from cosyserve.audio.prompt import CheckedAudio, PromptLimits, check_prompt_audio
from cosyserve.errors import AudioError, InvalidRequest, TextError, UnsupportedMode
from cosyserve.families import FAMILIES, Family
from cosyserve.frontend.frontend import Frontend, ModelInput
from cosyserve.frontend.voice_prompt import VoicePrompt
from cosyserve.text.normalize import contains_chinese, replace_blank
from cosyserve.text.ssml import Pause, Span, SsmlDocument

from .pronunciations import PronunciationStore
from .request import MAX_SPEED, MIN_SPEED, GenerationOptions, SynthesisRequest
from .voices import VoiceStore

# v3 was trained with a system prompt ending in <|endofprompt|> in front of the text (spec §5.5).
SYSTEM_PROMPT = "You are a helpful assistant."
END_OF_PROMPT = "<|endofprompt|>"

# The modes that take text arriving over time (bi-streaming, v2/v3): those whose LLM input is text.
BISTREAM_MODES = ("sft", "zero_shot", "cross_lingual", "instruct2")

_MODE_HINTS = {
    "sft": "it needs built-in speakers (iic/CosyVoice-300M-SFT ships them) or a stored voice; "
    "zero_shot and cross_lingual take a prompt recording instead",
    "instruct": "it needs a CosyVoice 1.0 model, and only iic/CosyVoice-300M-Instruct is trained for instructions; "
    "CosyVoice2 / Fun-CosyVoice3 use instruct2",
    "instruct2": "it needs a CosyVoice2 or Fun-CosyVoice3 model (e.g. iic/CosyVoice2-0.5B); "
    "CosyVoice 1.0 uses instruct with iic/CosyVoice-300M-Instruct",
}

# A prompt recording as a request gives it (or as checked before), or none.
PromptAudio = AudioInput | CheckedAudio | None


def unsupported_mode(family: str, mode: str, modes: frozenset[str]) -> UnsupportedMode:
    """The error for a mode the loaded model (of ``family``) cannot serve, saying which model would."""
    hint = _MODE_HINTS.get(mode, f"it supports {', '.join(sorted(modes))}")
    name = FAMILIES[family].display if family in FAMILIES else family
    return UnsupportedMode(f"the loaded {name} model ({family}) cannot serve {mode}: {hint}", param="mode")


@dataclass(frozen=True)
class InputShapes:
    """The sizes of the empty fields: mel channels of the prompt mel, width of the x-vector."""

    mel_channels: int
    embedding_dim: int


_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class SegmentPlan:
    """How one segment is spoken besides its model input (which :class:`SegmentInput` is): its speed,
    and the exact silence before and after its audio, in samples at the model's rate (SSML ``<prosody
    rate>``, ``<break>``). The scheduler emits the silence where it emits the segment's audio."""

    speed: float = 1.0
    pause_before: int = 0
    pause_after: int = 0


@dataclass(frozen=True)
class SegmentPreview:
    """One segment as it will be synthesised: its text after normalisation and the lexicon (what the
    tokenizer reads, the system prompt aside), the text ids the LLM reads for it, its speed, and the exact
    silence around it (seconds)."""

    text: str
    text_tokens: int
    speed: float
    pause_before_s: float
    pause_after_s: float


@dataclass(frozen=True)
class TextPreview:
    """What a request's text becomes (``POST /v1/text/preview``): its mode and segments, in order, and the
    SSML tags it ignores."""

    mode: str
    segments: tuple[SegmentPreview, ...]
    ssml_ignored: tuple[str, ...] = ()


def _ids(n: int = 0) -> Tensor:
    return torch.zeros(1, n, dtype=torch.int32)


@dataclass(frozen=True, eq=False)
class SegmentInput:
    """What the networks read for one text segment (all on the CPU). Ids are int32 (1, L)."""

    text: Tensor  # (1, L) the segment's text (empty: vc, or bi-streamed text)
    prompt_text: Tensor  # (1, Lp) transcript / instruction ids the text follows
    llm_prompt_speech: Tensor  # (1, P) speech ids the LLM continues after the prompt text
    llm_embedding: Tensor  # (1, D) x-vector the v1 LLM is conditioned on, or (0, D)
    flow_prompt_speech: Tensor  # (1, Pf) speech ids of the flow's prompt
    prompt_mel: Tensor  # (1, Tp, C) the flow's prompt mel
    flow_embedding: Tensor  # (1, D) the flow's x-vector
    source_speech: Tensor | None = None  # vc: (1, S) the ids to re-synthesise (the LLM does not run)

    # The reference's field name of each attribute (the golden cases and spk2info.pt use them).
    REFERENCE_NAMES: ClassVar[dict[str, str]] = {
        "text": "text",
        "prompt_text": "prompt_text",
        "llm_prompt_speech": "llm_prompt_speech_token",
        "llm_embedding": "llm_embedding",
        "flow_prompt_speech": "flow_prompt_speech_token",
        "prompt_mel": "prompt_speech_feat",
        "flow_embedding": "flow_embedding",
        "source_speech": "source_speech_token",
    }

    @classmethod
    def from_fields(cls, model_input: ModelInput, shapes: InputShapes) -> SegmentInput:
        """Type a dict of reference fields (what :class:`Frontend` builds); absent fields are empty."""
        unknown = set(model_input) - set(cls.REFERENCE_NAMES.values())
        if unknown:
            raise ValueError(f"unknown model input fields: {', '.join(sorted(unknown))}")
        if "flow_embedding" not in model_input:
            raise ValueError("a model input needs its flow_embedding")
        get = model_input.get
        return cls(
            text=get("text", _ids()),
            prompt_text=get("prompt_text", _ids()),
            llm_prompt_speech=get("llm_prompt_speech_token", _ids()),
            llm_embedding=get("llm_embedding", torch.zeros(0, shapes.embedding_dim)),
            flow_prompt_speech=get("flow_prompt_speech_token", _ids()),
            prompt_mel=get("prompt_speech_feat", torch.zeros(1, 0, shapes.mel_channels)),
            flow_embedding=model_input["flow_embedding"],
            source_speech=get("source_speech_token"),
        )

    def as_fields(self) -> ModelInput:
        """The reference's dict of the non-empty fields (inverse of :meth:`from_fields`)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (value.numel() or f.name in ("text", "flow_embedding")):
                out[self.REFERENCE_NAMES[f.name]] = value
        return out

    @property
    def text_length(self) -> int:
        return int(self.text.shape[1])

    @property
    def given_tokens(self) -> bool:
        """The speech ids are given (vc): the LLM does not run."""
        return self.source_speech is not None

    def with_text(self, prompt_text: Tensor, text: Tensor) -> SegmentInput:
        return SegmentInput(
            text,
            prompt_text,
            self.llm_prompt_speech,
            self.llm_embedding,
            self.flow_prompt_speech,
            self.prompt_mel,
            self.flow_embedding,
            self.source_speech,
        )


class InputBuilder:
    """A loaded model's per-mode input builders (see the module doc)."""

    def __init__(
        self,
        frontend: Frontend,
        voices: VoiceStore,
        family: Family,
        shapes: InputShapes,
        limits: PromptLimits,
        pronunciations: PronunciationStore | None = None,
    ) -> None:
        self.frontend = frontend
        self.pronunciations = pronunciations
        self.voices = voices
        self.family = family
        self.shapes = shapes
        self.limits = limits
        self._builders: dict[str, Callable[[SynthesisRequest, list[str]], list[ModelInput]]] = {
            "sft": self._sft,
            "zero_shot": self._zero_shot,
            "cross_lingual": self._cross_lingual,
            "instruct": self._instruct,
            "instruct2": self._instruct2,
        }

    def build(self, request: SynthesisRequest) -> list[SegmentInput]:
        """One input per text segment (vc: one input); raises :mod:`cosyserve.errors` on bad fields."""
        return self.build_planned(request)[0]

    def build_planned(self, request: SynthesisRequest) -> tuple[list[SegmentInput], list[SegmentPlan]]:
        """:meth:`build`'s inputs and, for each, its :class:`SegmentPlan` (speed, pauses)."""
        inputs, plans, _ = self.build_segments(request)
        return inputs, plans

    def build_segments(self, request: SynthesisRequest) -> tuple[list[SegmentInput], list[SegmentPlan], list[str]]:
        """:meth:`build_planned`'s inputs and plans, and each segment's text as normalised (vc: none)."""
        if request.mode == "vc":
            return [self._typed(self._vc(request))], [SegmentPlan(request.options.speed)], [""]
        segments, plans = self.planned_texts(request)
        inputs = [self._typed(fields) for fields in self._builders[request.mode](request, segments)]
        return inputs, plans, segments

    def text_lead(self, mode: str) -> int:
        """How many ids at the head of a segment's text in ``mode`` are the family's system prompt (which
        :meth:`target_text` puts there), not the segment's own text."""
        if mode not in ("sft", "cross_lingual") or not self.family.system_prompt:
            return 0
        return int(self.frontend.tokenize(SYSTEM_PROMPT + END_OF_PROMPT).shape[-1])

    def planned_texts(self, request: SynthesisRequest) -> tuple[list[str], list[SegmentPlan]]:
        """The text pass of :meth:`build_planned`: the segments (normalised, SSML planned, the lexicon
        applied) and their plans."""
        if request.ssml is not None:
            segments, plans = self.ssml_segments(request.ssml, request.options)
        else:
            segments = self.segments(request.text, request.options.text_frontend)
            plans = [SegmentPlan(request.options.speed)] * len(segments)
        return self.pronounce(request, segments), plans

    def preview(self, request: SynthesisRequest) -> TextPreview:
        """What :meth:`build` makes of ``request``'s text, without its prompt audio or model inputs."""
        if request.mode == "vc":
            raise InvalidRequest("vc has no text to preview", param="mode")
        segments, plans = self.planned_texts(request)
        rate = self.frontend.sample_rate
        return TextPreview(
            request.mode,
            tuple(
                SegmentPreview(
                    text,
                    int(self.frontend.tokenize(self.target_text(request.mode, text)).shape[-1]),
                    plan.speed,
                    plan.pause_before / rate,
                    plan.pause_after / rate,
                )
                for text, plan in zip(segments, plans, strict=True)
            ),
            request.ssml.ignored if request.ssml is not None else (),
        )

    def bistream(self, request: SynthesisRequest) -> SegmentInput:
        """The input of a request whose text is streamed: the mode's prompt, and what the mode puts
        before the target text (v3: the system prompt) at the head of the prompt text."""
        if not self.family.bistream:
            raise UnsupportedMode(
                f"streamed text input (bistream) needs a CosyVoice2 or Fun-CosyVoice3 model; the loaded "
                f"{self.family.display} model ({self.family.name}) speaks whole texts only",
                param="text",
            )
        if request.mode not in BISTREAM_MODES:
            modes = ", ".join(BISTREAM_MODES)
            raise UnsupportedMode(f"streamed text input serves {modes}, not {request.mode}", param="mode")
        segment = self._typed(self._builders[request.mode](request, [""])[0])
        return segment.with_text(torch.cat([segment.prompt_text, segment.text], dim=1), _ids())

    def prompt(self, audio: PromptAudio, param: str = "prompt_wav", align: bool | None = None) -> VoicePrompt:
        """The voice of a prompt recording (checked first): its speech tokens, mel and x-vector."""
        return self.frontend.process_prompt(self.checked_audio(audio, param), align=align)

    def checked_audio(self, audio: PromptAudio, param: str) -> CheckedAudio:
        return check_prompt_audio(audio, param, self.limits)

    def transcript_for_llm(self, transcript: str, text_frontend: bool) -> str:
        """A stored voice's transcript as the LLM reads it (normalised, with the system prompt)."""
        return self._with_system_prompt(self.text(transcript, "prompt_text", text_frontend))

    # -- text --------------------------------------------------------------------------------------
    def segments(self, text: str | None, text_frontend: bool) -> list[str]:
        if not isinstance(text, str) or not text.strip():
            raise TextError("tts_text is empty", param="tts_text")
        segments = self.frontend.normalize(text, split=True, text_frontend=text_frontend)
        if not segments:
            raise TextError("tts_text has nothing to speak after normalisation", param="tts_text")
        return segments

    def ssml_segments(self, document: SsmlDocument, options: GenerationOptions) -> tuple[list[str], list[SegmentPlan]]:
        """An SSML document's segments and their plans. Consecutive spans at one rate, with no pause or
        ``<p>`` / ``<s>`` between them, are one text (normalised span by span in the branch of the whole,
        emphasis tagged where the family has tags), split as plain text is; each pause becomes exact
        silence after the segment before it (before the first segment when none is)."""
        rate = self.frontend.sample_rate
        segments: list[str] = []
        plans: list[SegmentPlan] = []
        leading = 0  # silence before the first segment, in samples
        group: list[Span] = []

        def flush() -> None:
            texts = self._ssml_texts(group, options.text_frontend) if group else []
            if texts:
                speed = min(max(options.speed * group[0].rate, MIN_SPEED), MAX_SPEED)
                plans.extend(SegmentPlan(speed) for _ in texts)
                segments.extend(texts)
            group.clear()

        for part in document.parts:
            if isinstance(part, Pause):
                flush()
                samples = round(part.seconds * rate)
                if plans:
                    plans[-1] = replace(plans[-1], pause_after=plans[-1].pause_after + samples)
                else:
                    leading += samples
                continue
            if group and (part.segment_start or part.rate != group[0].rate):
                flush()
            group.append(part)
        flush()
        if not segments:
            raise TextError("the SSML document has nothing to speak", param="tts_text")
        plans[0] = replace(plans[0], pause_before=leading)
        return segments, plans

    def _ssml_texts(self, spans: list[Span], text_frontend: bool) -> list[str]:
        """The segments of consecutive spans spoken as one text (see :meth:`ssml_segments`)."""
        lang = "zh" if contains_chinese("".join(s.text for s in spans)) else "en"
        tags = self.family.emphasis
        pieces = []
        for span in spans:
            piece = self.frontend.normalize_span(span.text, lang) if text_frontend else span.text
            if span.emphasis and tags is not None and piece.strip():
                lead = " " if piece[0].isspace() else ""
                trail = " " if piece[-1].isspace() else ""
                piece = f"{lead}{tags[0]}{piece.strip()}{tags[1]}{trail}"
            pieces.append(piece)
        text = _SPACES.sub(" ", "".join(pieces)).strip()
        if lang == "zh":
            text = replace_blank(text)
        if not text:
            return []
        # The pronunciation lexicon (the request's entries and the document's <phoneme> ones) applies to
        # these normalised segment texts in build_planned, as to plain text's.
        return self.frontend.split(text) if text_frontend else [text]

    def pronounce(self, request: SynthesisRequest, segments: list[str]) -> list[str]:
        """The normalised segments with the request's lexicon applied (its own entries and the stored ones
        it reaches), as the tokenizer then reads them; raises the lexicon's 4xx."""
        if self.pronunciations is None:
            return segments
        return self.pronunciations.lexicon(request).apply_all(segments)

    def text(self, text: str | None, param: str, text_frontend: bool) -> str:
        if not isinstance(text, str) or not text.strip():
            raise TextError(f"{param} is empty", param=param)
        return self.frontend.normalize(text, split=False, text_frontend=text_frontend)

    def target_text(self, mode: str, segment: str) -> str:
        """A segment's text as the LLM reads it in ``mode``: sft and cross_lingual put the family's system
        prompt before it (zero_shot / instruct2 carry it in the prompt text)."""
        return self._with_system_prompt(segment) if mode in ("sft", "cross_lingual") else segment

    def _with_system_prompt(self, text: str) -> str:
        """Target / prompt text with the system prompt the family was trained with."""
        if self.family.system_prompt and END_OF_PROMPT not in text:
            return SYSTEM_PROMPT + END_OF_PROMPT + text
        return text

    def _instruction(self, instruct: str | None) -> str:
        if not instruct or not instruct.strip():
            raise TextError("instruct_text is empty", param="instruct_text")
        if END_OF_PROMPT in instruct:
            return instruct
        if self.family.system_prompt and not instruct.startswith(SYSTEM_PROMPT):
            instruct = f"{SYSTEM_PROMPT} {instruct}"
        return instruct + END_OF_PROMPT

    # -- voices ------------------------------------------------------------------------------------
    def _speaker(self, spk_id: str | None) -> VoicePrompt:
        if not spk_id:
            raise InvalidRequest("spk_id is required", param="spk_id")
        return self.voices.get(spk_id)

    def _prompt_or_voice(self, audio: PromptAudio, spk_id: str | None, align: bool | None = None) -> VoicePrompt:
        if audio is None:
            if spk_id is None:
                raise AudioError("prompt_wav is required (or spk_id naming a stored voice)", param="prompt_wav")
            return self.voices.get(spk_id)
        return self.prompt(audio, "prompt_wav", align)

    # -- the modes ---------------------------------------------------------------------------------
    def _typed(self, model_input: ModelInput) -> SegmentInput:
        return SegmentInput.from_fields(model_input, self.shapes)

    def _sft(self, r: SynthesisRequest, segments: list[str]) -> list[ModelInput]:
        speaker = self._speaker(r.spk_id)
        return [self.frontend.sft(self.target_text("sft", s), speaker) for s in segments]

    def _zero_shot(self, r: SynthesisRequest, segments: list[str]) -> list[ModelInput]:
        if r.spk_id is not None and r.prompt_audio is None:
            voice = self.voices.get(r.spk_id)
            if voice.has_prompt and not voice.has_transcript:
                raise InvalidRequest(
                    f"voice '{r.spk_id}' has no transcript (it was stored without ref_text), so zero_shot "
                    "cannot use it: use it with cross_lingual, or store its recording again with ref_text",
                    param="spk_id",
                )
            return [self.frontend.zero_shot(s, None, voice) for s in segments]
        prompt_text = self._with_system_prompt(self.text(r.prompt_text, "prompt_text", r.options.text_frontend))
        voice = self.prompt(r.prompt_audio)
        return [self.frontend.zero_shot(s, prompt_text, voice) for s in segments]

    def _cross_lingual(self, r: SynthesisRequest, segments: list[str]) -> list[ModelInput]:
        voice = self._prompt_or_voice(r.prompt_audio, r.spk_id)
        return [self.frontend.cross_lingual(self.target_text("cross_lingual", s), voice) for s in segments]

    def _instruct(self, r: SynthesisRequest, segments: list[str]) -> list[ModelInput]:
        speaker = self._speaker(r.spk_id)
        instruct = self.text(r.instruct_text, "instruct_text", r.options.text_frontend)
        return [self.frontend.instruct(s, speaker, instruct) for s in segments]

    def _instruct2(self, r: SynthesisRequest, segments: list[str]) -> list[ModelInput]:
        instruct = self._instruction(r.instruct_text)
        voice = self._prompt_or_voice(r.prompt_audio, r.spk_id)
        return [self.frontend.instruct2(s, instruct, voice) for s in segments]

    def _vc(self, r: SynthesisRequest) -> ModelInput:
        # The reference's vc frontend does not trim the prompt to the 2:1 token/mel ratio.
        voice = self._prompt_or_voice(r.prompt_audio, r.spk_id, align=False)
        return self.frontend.vc(self.checked_audio(r.source_audio, "source_wav"), voice)
