"""The inference API: one :class:`TTSModel` per loaded model directory, one method per mode.

Every ``inference_*`` method checks its inputs and runs the text and audio frontends at call time,
raising :mod:`cosyserve.errors` exceptions before any audio exists; it then returns a lazy iterator
of float32 chunks at ``sample_rate``. Closing the iterator stops the generation (LLM included).
How a directory is loaded: :mod:`.loading`; how a request becomes model inputs: :mod:`.inputs`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from cosyserve.audio.io import AudioInput
from cosyserve.audio.prompt import PromptLimits
from cosyserve.errors import InvalidRequest
from cosyserve.frontend.voice_prompt import VoicePrompt
from cosyserve.models.contracts import BistreamLM, Networks, SpeechLM
from cosyserve.nn.sampling import Sampler
from cosyserve.text.pronunciation import parse_pronunciations

from . import streaming
from .continuity import ContinuityStore
from .generation import GenerationLoop
from .inputs import BISTREAM_MODES, InputBuilder, InputShapes, SegmentPlan, TextPreview, unsupported_mode
from .loading import EngineOptions, LoadedParts, load_parts
from .pronunciations import PronunciationStore, lexicon_target
from .request import GenerationOptions, SynthesisRequest
from .runner import ModelRunner
from .scheduler import SchedulePolicy, Scheduler
from .sequence import Sequence
from .streaming import AudioStage, Draws, Synthesizer
from .text_feed import FeedReader, TextFeed
from .voice_library import open_voice_library
from .voice_library.base import VoiceBackend

logger = logging.getLogger("cosyserve.engine")


class TTSModel:
    """A loaded model directory: frontends, networks, speakers."""

    def __init__(self, parts: LoadedParts) -> None:
        self.core = parts.core
        self.frontend = parts.frontend
        self.voices = parts.voices
        self.options = parts.options
        self.placement = parts.placement
        self.precision = parts.precision
        self.family_info = parts.family
        self.networks = Networks.of(self.core)
        flow = self.networks.flow
        shapes = InputShapes(mel_channels=flow.output_size, embedding_dim=flow.spk_embed_affine_layer.in_features)
        self.pronunciations = PronunciationStore(
            self.voices.library, lexicon_target(parts.family, self.frontend.tokenizer)
        )
        self.inputs = InputBuilder(
            self.frontend, self.voices, parts.family, shapes, self.options.prompt_limits, self.pronunciations
        )
        self._synthesizer: type[Synthesizer] = getattr(streaming, parts.family.synthesizer)
        devices = parts.placement.devices()
        self.audio_stage = AudioStage.of(self.core, devices["flow"], devices["vocoder"], self.options.streaming())
        self.llm_device = devices["llm"]
        # Finished requests' last segments, for requests that continue them (previous_request_id).
        self.continuity = ContinuityStore()

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
    def prompt_limits(self) -> PromptLimits:
        return self.options.prompt_limits

    @property
    def lm(self) -> SpeechLM:
        return self.networks.lm

    @property
    def modes(self) -> frozenset[str]:
        modes = {"zero_shot", "cross_lingual", "vc", self.family_info.instruct_mode}
        if self.voices.ids():
            modes.add("sft")
        return frozenset(modes)

    @property
    def bistream_modes(self) -> frozenset[str]:
        """The modes that take streamed text (``prepare(..., text_feed=)``): v2/v3 only."""
        return self.modes & frozenset(BISTREAM_MODES) if self.family_info.bistream else frozenset()

    def list_speakers(self) -> list[str]:
        return self.voices.ids()

    # -- synthesis -------------------------------------------------------------------------------
    def new_loop(self, policy: SchedulePolicy | None = None) -> GenerationLoop:
        """A fresh scheduler with a runner of this model's networks (one per engine core)."""
        runner = ModelRunner(self.lm, self.llm_device, self.audio_stage, self._synthesizer)
        max_prompt = int(self.prompt_limits.max_seconds * self.token_rate)  # continuity's prompt bound
        scheduler = Scheduler(
            self.lm, runner.new_synthesizer, self.core.token_mel_ratio, policy, max_prompt, self.continuity
        )
        return GenerationLoop(scheduler, runner)

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
        return self.new_loop().run_alone(sequence)

    def preview(self, request: SynthesisRequest) -> TextPreview:
        """What ``request``'s text becomes, segment by segment (see :meth:`InputBuilder.preview`)."""
        if request.mode not in self.modes:
            raise unsupported_mode(self.family, request.mode, self.modes)
        return self.inputs.preview(request)

    def prepare(
        self,
        request: SynthesisRequest,
        *,
        draws: Draws | None = None,
        sampler: Sampler | None = None,
        request_id: str = "",
        text_feed: TextFeed | None = None,
    ) -> Sequence:
        """Validate ``request`` and run its frontend: the :class:`Sequence` a generation loop runs.

        With ``text_feed`` the text arrives over time through it (bi-streaming, v2/v3: see
        engine/text_feed.py); ``request.text``, when given, is its first fragment."""
        if request.mode not in self.modes:
            raise unsupported_mode(self.family, request.mode, self.modes)
        options = request.options
        reader = None
        plans: list[SegmentPlan] = []
        texts: list[str] = []
        if text_feed is None:
            inputs, plans, texts = self.inputs.build_segments(request)
        elif request.continuity:
            raise InvalidRequest("continuity needs the whole text: streamed text is one segment", param="continuity")
        else:
            if request.ssml is not None:
                raise InvalidRequest("SSML needs the whole text: streamed text (bistream) is plain text", param="text")
            segment = self.inputs.bistream(request)
            cast(BistreamLM, self.lm).split_bistream_prompt(segment.prompt_text)  # v3: needs <|endofprompt|>
            inputs = [segment]
            # Streamed text is not normalised; the lexicon applies to it as it comes, a fragment's last
            # characters waiting for the next one where they may begin a lexicon word.
            lexicon = self.pronunciations.lexicon(request)
            if len(lexicon):
                tokenize = lambda text: self._text_ids(lexicon.apply(text))  # noqa: E731
                reader = FeedReader(text_feed, tokenize, first=request.text, hold=lexicon.held_back)
            else:
                reader = FeedReader(text_feed, self._text_ids, first=request.text)
        draws = draws or Draws(options.seed)
        sampler = sampler or self.lm.make_sampler(draws.sampling_generator)
        sequence = Sequence(inputs, draws, sampler, options.stream, options.speed, request_id, reader, plans)
        sequence.texts = texts
        if request.continuity:
            self._continuing(sequence, request)
        return sequence

    def _continuing(self, sequence: Sequence, request: SynthesisRequest) -> None:
        """Continuity (engine/continuity.py): the system-prompt ids of each segment's text, and what the
        first segment continues: the previous request's last segment, or ``previous_text``'s last segment,
        spoken first without audio."""
        sequence.continuity = True
        sequence.owner = request.lexicon_owner
        lead = self.inputs.text_lead(request.mode)
        if request.previous_request_id is not None:
            sequence.context = self.continuity.get(request.lexicon_owner, request.previous_request_id)
        elif request.previous_text is not None:
            before = replace(request, text=request.previous_text, previous_text=None, continuity=False)
            inputs, plans, texts = self.inputs.build_segments(before)
            sequence.inputs = inputs[-1:] + sequence.inputs
            sequence.plans = plans[-1:] + sequence.plans
            sequence.texts = texts[-1:] + sequence.texts
            sequence.silent_head = 1
        sequence.leads = [lead] * len(sequence.inputs)

    def _text_ids(self, text: str) -> list[int]:
        return self.frontend.tokenize(text).reshape(-1).tolist()

    # -- the official per-mode API ------------------------------------------------------------------
    def inference_sft(self, text: str, spk_id: str, **options: Any) -> Iterator[np.ndarray]:
        return self._run("sft", options, text=text, spk_id=spk_id)

    def inference_zero_shot(
        self, text: str, prompt_text: str, prompt_audio: AudioInput | None = None, *, spk_id: str | None = None,
        **options: Any,
    ) -> Iterator[np.ndarray]:  # fmt: skip
        return self._run(
            "zero_shot", options, text=text, prompt_text=prompt_text, prompt_audio=prompt_audio, spk_id=spk_id
        )

    def inference_cross_lingual(
        self, text: str, prompt_audio: AudioInput | None = None, *, spk_id: str | None = None, **options: Any
    ) -> Iterator[np.ndarray]:
        return self._run("cross_lingual", options, text=text, prompt_audio=prompt_audio, spk_id=spk_id)

    def inference_instruct(self, text: str, spk_id: str, instruct_text: str, **options: Any) -> Iterator[np.ndarray]:
        return self._run("instruct", options, text=text, spk_id=spk_id, instruct_text=instruct_text)

    def inference_instruct2(
        self, text: str, instruct_text: str, prompt_audio: AudioInput | None = None, *, spk_id: str | None = None,
        **options: Any,
    ) -> Iterator[np.ndarray]:  # fmt: skip
        return self._run(
            "instruct2", options, text=text, instruct_text=instruct_text, prompt_audio=prompt_audio, spk_id=spk_id
        )

    def inference_vc(
        self, source_audio: AudioInput, prompt_audio: AudioInput | None = None, *, spk_id: str | None = None,
        **options: Any,
    ) -> Iterator[np.ndarray]:  # fmt: skip
        return self._run("vc", options, source_audio=source_audio, prompt_audio=prompt_audio, spk_id=spk_id)

    def _run(self, mode: str, options: dict[str, Any], **fields: Any) -> Iterator[np.ndarray]:
        """``options``: the :class:`GenerationOptions` fields (stream, speed, seed, text_frontend),
        plus ``draws`` / ``sampler`` (see :meth:`synthesize`) and ``pronunciations`` (entries, or their
        request form ``{"重庆": {"pinyin": "chong2 qing4"}, "nginx": "engine x"}``)."""
        draws, sampler = options.pop("draws", None), options.pop("sampler", None)
        entries = options.pop("pronunciations", ())
        if not isinstance(entries, tuple):
            entries = parse_pronunciations(entries)
        request = SynthesisRequest(mode, options=GenerationOptions(**options), pronunciations=entries, **fields)
        return self.synthesize(request, draws=draws, sampler=sampler)

    def add_speaker(
        self, spk_id: str, prompt_text: str | None, prompt_audio: AudioInput, text_frontend: bool = True
    ) -> VoicePrompt:
        """Compute a voice prompt once and store it under ``spk_id`` (official ``add_zero_shot_spk``).

        Without ``prompt_text`` (the recording's transcript) the voice serves every mode but zero_shot.
        Raises (before any work) InvalidRequest for a bad id, VoiceExists / VoiceLimitReached.
        """
        spk_id = self.voices.check_new(spk_id, param="spk_id")
        audio = self.inputs.checked_audio(prompt_audio, "prompt_wav")
        voice = self.frontend.process_prompt(audio)
        ref_text = prompt_text.strip() if prompt_text and prompt_text.strip() else None
        if ref_text is not None:
            as_read = self.inputs.transcript_for_llm(ref_text, text_frontend)
            voice = self.frontend.with_transcript(voice, ref_text, as_read)
        self.voices.add(spk_id, voice, duration=audio.seconds)
        return voice

    def prompt(self, audio: AudioInput, param: str = "prompt_wav", align: bool | None = None) -> VoicePrompt:
        """The voice of an audio prompt (checked first): its speech tokens, mel and x-vector."""
        return self.inputs.prompt(audio, param, align)


def load_model(
    model: str | Path,
    *,
    device: str = "cpu",
    hub: str = "auto",
    options: EngineOptions | None = None,
    library: VoiceBackend | None = None,
    **option_overrides: Any,
) -> TTSModel:
    """Load a model directory or hub id (``iic/CosyVoice-300M``, ``FunAudioLLM/CosyVoice2-0.5B``...)
    with every stage on ``device`` (unless ``options.placement`` says otherwise).

    ``library``: the voice library to use, shared by the models of one server (None: one opened on
    ``options.data_dir``)."""
    options = options or EngineOptions(**option_overrides)
    return TTSModel(load_parts(model, device=device, hub=hub, options=options, library=library))


def model_loaders(models: Mapping[str, str], options: EngineOptions, device: str) -> dict[str, Callable[[], TTSModel]]:
    """A loader per model (name -> directory or hub id); the models share one voice library, opened
    by the first loader to run (start-up stays fast, and its errors reach /health)."""
    library: list[VoiceBackend] = []

    def loader(source: str) -> Callable[[], TTSModel]:
        def load() -> TTSModel:
            logger.info("loading %s on %s", source, device)
            if not library:
                library.append(open_voice_library(options.voice_store, options.data_dir, options.max_voices))
            return load_model(source, device=device, library=library[0], options=options)

        return load

    return {name: loader(source) for name, source in models.items()}


__all__ = ["EngineOptions", "TTSModel", "load_model", "model_loaders"]
