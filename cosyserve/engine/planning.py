"""Which mode serves a voice-centred request (the OpenAI-style speech API, WebSocket sessions).

A caller names a voice (a built-in speaker or a stored voice) or sends a recording, and maybe an
instruction; the engine decides the mode from what the voice holds and what the model serves:

- a recording + its transcript: zero_shot; a recording alone: cross_lingual; + instructions: instruct2;
- a built-in speaker (embedding only): sft; + instructions: instruct (CosyVoice 1.0);
- a stored voice: zero_shot, or cross_lingual when it has no transcript; + instructions: instruct2
  with the voice as prompt (instruct on 1.0).
"""

from __future__ import annotations

from cosyserve.audio.prompt import CheckedAudio
from cosyserve.errors import InvalidRequest

from .inputs import unsupported_mode
from .request import GenerationOptions, SynthesisRequest
from .voice_library.base import VoiceInfo


def plan_speech(
    modes: frozenset[str],
    family: str,
    voice: VoiceInfo | None,
    text: str,
    options: GenerationOptions,
    *,
    spk_id: str | None = None,
    instructions: str | None = None,
    prompt_audio: CheckedAudio | None = None,
    ref_text: str | None = None,
) -> SynthesisRequest:
    """The request for ``text`` in ``voice`` (what the voice ``spk_id`` holds) or ``prompt_audio``;
    raises before any work when the model (of ``family``, serving ``modes``) cannot serve it."""
    if prompt_audio is not None:
        if instructions:
            if "instruct2" not in modes:
                raise InvalidRequest(
                    "instructions with ref_audio need a CosyVoice2 / Fun-CosyVoice3 model (instruct2); CosyVoice 1.0 "
                    "follows instructions only with built-in speakers (CosyVoice-300M-Instruct)",
                    param="instructions",
                )
            request = SynthesisRequest(
                "instruct2", text, instruct_text=instructions, prompt_audio=prompt_audio, options=options
            )
        elif ref_text:
            request = SynthesisRequest(
                "zero_shot", text, prompt_text=ref_text, prompt_audio=prompt_audio, options=options
            )
        else:
            request = SynthesisRequest("cross_lingual", text, prompt_audio=prompt_audio, options=options)
        return _checked(request, modes, family)
    if voice is None or spk_id is None:
        raise InvalidRequest("a voice or a prompt recording is required", param="voice")
    if instructions:
        if "instruct" in modes:
            request = SynthesisRequest("instruct", text, spk_id=spk_id, instruct_text=instructions, options=options)
        elif not voice.has_prompt:
            raise InvalidRequest(
                f"instructions on this model (instruct2) need a voice with a prompt recording; '{spk_id}' is a "
                "built-in speaker with only an embedding: use a stored (cloned) voice or send ref_audio",
                param="instructions",
            )
        else:
            request = SynthesisRequest("instruct2", text, spk_id=spk_id, instruct_text=instructions, options=options)
    elif not voice.has_prompt:
        request = SynthesisRequest("sft", text, spk_id=spk_id, options=options)
    elif voice.has_transcript:
        request = SynthesisRequest("zero_shot", text, spk_id=spk_id, options=options)
    else:
        request = SynthesisRequest("cross_lingual", text, spk_id=spk_id, options=options)
    return _checked(request, modes, family)


def _checked(request: SynthesisRequest, modes: frozenset[str], family: str) -> SynthesisRequest:
    if request.mode not in modes:
        raise unsupported_mode(family, request.mode, modes)
    return request
