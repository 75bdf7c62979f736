"""Per-mode model inputs (spec §7): text ids, prompt speech tokens, prompt mel and x-vectors.

A voice (prompt audio, processed once into a :class:`VoicePrompt`, or a stored one) and the texts
become one model input per text segment. Every builder returns ``dict[str, torch.Tensor]`` keyed by
the reference's field names
(``text``, ``prompt_text``, ``llm_prompt_speech_token``, ``flow_prompt_speech_token``,
``prompt_speech_feat``, ``llm_embedding``, ``flow_embedding``, ``source_speech_token``). Ids are
int32 (1, L), the prompt mel float32 (1, T, 80), embeddings float32 (1, 192), all on the CPU;
``*_len`` fields are left out (the models take lengths from the shapes).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from cosyserve.audio.io import AudioInput, decode_audio, to_mono
from cosyserve.errors import AudioError, InvalidRequest, UnsupportedMode
from cosyserve.frontend.features import MelExtractor
from cosyserve.frontend.onnx_models import SpeakerEncoder, SpeechTokenizer
from cosyserve.frontend.voice_prompt import VoicePrompt

TOKENIZER_SR = 16000
# HEAD resamples every prompt to 24 kHz for the mel, whatever the model rate (spec §3, §17.1).
REFERENCE_PROMPT_MEL_SR = 24000
PROMPT_MEL_RATES = ("model", "reference")
VERSIONS = ("v1", "v2", "v3")

ModelInput = dict[str, torch.Tensor]


class _Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


class _Normalizer(Protocol):
    def normalize(self, text: Any, split: bool = True, text_frontend: bool = True) -> Any: ...

    def normalize_span(self, text: str, lang: str) -> str: ...

    def split(self, text: str) -> list[str]: ...


class Frontend:
    """Builds model inputs for one loaded model (``version`` "v1" | "v2" | "v3") and the voices of
    ``family`` at ``token_rate`` speech tokens per second.

    ``prompt_mel_rate``: "model" computes the prompt mel from audio resampled to ``sample_rate``
    (what the models were trained with); "reference" resamples to 24 kHz as the reference does
    for every family (only differs for the 22.05 kHz v1 models).
    """

    def __init__(
        self,
        version: str,
        tokenizer: _Tokenizer,
        normalizer: _Normalizer,
        speech_tokenizer: SpeechTokenizer,
        speaker_encoder: SpeakerEncoder,
        mel_extractor: MelExtractor,
        sample_rate: int,
        prompt_mel_rate: str = "model",
        *,
        family: str,
        token_rate: int,
    ) -> None:
        if version not in VERSIONS:
            raise ValueError(f"unknown model version '{version}' (expected one of {', '.join(VERSIONS)})")
        if prompt_mel_rate not in PROMPT_MEL_RATES:
            raise ValueError(f"prompt_mel_rate must be one of {', '.join(PROMPT_MEL_RATES)}, got '{prompt_mel_rate}'")
        self.version = version
        self.tokenizer = tokenizer
        self.normalizer = normalizer
        self.speech_tokenizer = speech_tokenizer
        self.speaker_encoder = speaker_encoder
        self.mel_extractor = mel_extractor
        self.sample_rate = int(sample_rate)
        self.prompt_mel_rate = prompt_mel_rate
        self.family = family
        self.token_rate = int(token_rate)

    @property
    def prompt_mel_sr(self) -> int:
        """Rate the prompt audio is resampled to before the mel extractor."""
        return self.sample_rate if self.prompt_mel_rate == "model" else REFERENCE_PROMPT_MEL_SR

    # --- text -------------------------------------------------------------------------------

    def normalize(self, text: Any, split: bool = True, text_frontend: bool = True) -> Any:
        """The reference's ``text_normalize``: a list of segments with ``split``, else one string."""
        return self.normalizer.normalize(text, split=split, text_frontend=text_frontend)

    def normalize_span(self, text: str, lang: str) -> str:
        """One piece of a longer text (an SSML span), normalised in the branch of the whole (zh | en)."""
        return str(self.normalizer.normalize_span(text, lang))

    def split(self, text: str) -> list[str]:
        """Normalised text cut into segments as :meth:`normalize` cuts them."""
        return list(self.normalizer.split(text))

    def tokenize(self, text: str) -> torch.Tensor:
        """Text ids (1, L) int32 (special tokens such as ``<|en|>`` / ``<|endofprompt|>`` allowed)."""
        return torch.tensor([list(self.tokenizer.encode(text))], dtype=torch.int32).reshape(1, -1)

    # --- audio ------------------------------------------------------------------------------

    def process_prompt(self, audio: AudioInput, align: bool | None = None) -> VoicePrompt:
        """The voice of one prompt recording: its speech tokens, mel (1, T, 80) and x-vector.

        ``align`` (default: v2/v3) trims tokens and mel to mel_len == 2 * token_len (spec §4.5).
        """
        wave, sr = decode_audio(audio)
        speech16k = to_mono(wave, sr, TOKENIZER_SR)
        tokens = self.speech_tokenizer(speech16k)  # (1, P) int32
        embedding = self.speaker_encoder(speech16k)  # (1, 192)
        feat = self._prompt_mel(to_mono(wave, sr, self.prompt_mel_sr))  # (1, T, 80)
        if align is None:
            align = self.version in ("v2", "v3")
        if align:
            token_len = min(feat.shape[1] // 2, tokens.shape[1])
            feat, tokens = feat[:, : 2 * token_len], tokens[:, :token_len]
        return VoicePrompt(self.family, self.token_rate, embedding, tokens, feat)

    def _prompt_mel(self, wave: torch.Tensor) -> torch.Tensor:
        mel = self.mel_extractor
        if wave.shape[1] < max(mel.hop_size, mel.n_fft // 2 + 1):
            raise AudioError(f"prompt audio too short ({wave.shape[1] / self.prompt_mel_sr:.3f} s) for its mel")
        return mel(wave).transpose(1, 2).contiguous()

    def _prompt(self, prompt: VoicePrompt | AudioInput) -> VoicePrompt:
        """The voice of prompt audio, or a voice made from a recording (on the CPU)."""
        if not isinstance(prompt, VoicePrompt):
            return self.process_prompt(prompt)
        if not prompt.has_prompt:
            raise InvalidRequest("the voice has only a speaker embedding, no prompt recording (a built-in speaker?)")
        return prompt.to("cpu")

    def _voice_input(self, voice: VoicePrompt, text: str, prompt_text_ids: torch.Tensor) -> ModelInput:
        """The zero-shot model input: the LLM and the flow both see the voice's prompt."""
        assert voice.speech_token is not None and voice.speech_feat is not None
        return {
            "prompt_text": prompt_text_ids,
            "llm_prompt_speech_token": voice.speech_token,
            "flow_prompt_speech_token": voice.speech_token,
            "prompt_speech_feat": voice.speech_feat,
            "llm_embedding": voice.embedding,
            "flow_embedding": voice.embedding,
            "text": self.tokenize(text),
        }

    # --- modes ------------------------------------------------------------------------------

    def sft(self, text: str, speaker: VoicePrompt) -> ModelInput:
        """Built-in speaker: text + the speaker's x-vector for LLM (v1 only uses it) and flow."""
        embedding = speaker.embedding.cpu()
        return {"text": self.tokenize(text), "llm_embedding": embedding, "flow_embedding": embedding}

    def zero_shot(self, text: str, prompt_text: str | None, prompt: VoicePrompt | AudioInput) -> ModelInput:
        """Voice cloning: LLM continues after prompt_text + text and the prompt speech tokens.

        A voice with a transcript (a stored zero-shot speaker) keeps its own, which belongs to its
        speech tokens; ``prompt_text`` (None = empty) is used otherwise.
        """
        voice = self._prompt(prompt)
        ids = voice.prompt_text_ids if voice.has_transcript else None
        return self._voice_input(voice, text, self.tokenize(prompt_text or "") if ids is None else ids)

    def with_transcript(self, voice: VoicePrompt, transcript: str, prompt_text: str) -> VoicePrompt:
        """``voice`` with its recording's ``transcript`` and the ids of ``prompt_text`` (the transcript
        as the LLM reads it: normalised, v3 with the system prompt), as the reference's
        ``add_zero_shot_spk`` stores it."""
        return voice.with_transcript(transcript, self.tokenize(prompt_text))

    def cross_lingual(self, text: str, prompt: VoicePrompt | AudioInput) -> ModelInput:
        """Zero-shot without transcript: the LLM sees only the text, the flow the whole prompt."""
        out = self.zero_shot(text, "", prompt)
        del out["prompt_text"], out["llm_prompt_speech_token"]
        return out

    def instruct(self, text: str, speaker: VoicePrompt, instruct_text: str) -> ModelInput:
        """v1 Instruct model: built-in speaker for the flow, instruct text as the LLM prompt text."""
        if self.version != "v1":
            raise UnsupportedMode(
                f"instruct mode needs a CosyVoice 1 Instruct model; use instruct2 with {self.version}"
            )
        out = self.sft(text, speaker)
        del out["llm_embedding"]
        out["prompt_text"] = self.tokenize(instruct_text)
        return out

    def instruct2(self, text: str, instruct_text: str, prompt: VoicePrompt | AudioInput) -> ModelInput:
        """v2/v3 instruction following: instruct text as prompt text, prompt voice for the flow.

        Unlike the reference, a stored zero-shot speaker does not replace the instruct text by
        its transcript (spec §17.4).
        """
        if self.version == "v1":
            raise UnsupportedMode("instruct2 mode needs a CosyVoice 2/3 model; use instruct with v1 Instruct models")
        out = self._voice_input(self._prompt(prompt), text, self.tokenize(instruct_text))
        del out["llm_prompt_speech_token"]
        return out

    def vc(self, source_audio: AudioInput, prompt: VoicePrompt | AudioInput) -> ModelInput:
        """Voice conversion: the source's speech tokens re-synthesised in the prompt's voice.

        Prompt audio is processed as the reference's ``frontend_vc`` does, without the 2:1
        token/mel trimming; a voice is used as given.
        """
        if not isinstance(prompt, VoicePrompt):
            prompt = self.process_prompt(prompt, align=False)
        voice = self._prompt(prompt)
        wave, sr = decode_audio(source_audio)
        source = self.speech_tokenizer(to_mono(wave, sr, TOKENIZER_SR))
        return {
            "source_speech_token": source,
            "flow_prompt_speech_token": voice.speech_token,
            "prompt_speech_feat": voice.speech_feat,
            "flow_embedding": voice.embedding,
        }
