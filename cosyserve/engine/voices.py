"""Speakers a model can use by id: the model directory's ``spk2info.pt`` and the user's voice library.

Built-in speakers are read once, safely, and never written back (the reference writes into the model
directory). Cloned voices live in the voice library (:mod:`cosyserve.engine.voice_library`): the embedded
SQLite database under the data directory, or a PostgreSQL database shared by several servers.

A voice's id is the name it was stored under (validated: letters, digits, ``_ - . space``; unique
regardless of case). Every voice is a :class:`VoicePrompt`; its tensors belong to the model family and
speech-token rate that made them, so a model of another family or rate refuses it with a message
naming both.
"""

from __future__ import annotations

import logging
import re
import time
import unicodedata
from pathlib import Path
from typing import Protocol

import torch

from cosyserve.errors import (
    IncompatibleVoice,
    InvalidRequest,
    ModelLoadError,
    ReadOnlyVoice,
    UnknownSpeaker,
    VoiceExists,
    VoiceLibraryError,
    VoiceLimitReached,
)
from cosyserve.frontend.voice_prompt import VoicePrompt

from .voice_library.base import DEFAULT_MAX_VOICES, VoiceBackend, VoiceInfo, voice_key
from .voice_library.sqlite import DB_NAME, SQLiteVoiceLibrary

__all__ = [
    "DB_NAME",
    "DEFAULT_MAX_VOICES",
    "MAX_ID_LENGTH",
    "IncompatibleVoice",
    "ReadOnlyVoice",
    "VoiceBackend",
    "VoiceCatalog",
    "VoiceExists",
    "VoiceInfo",
    "VoiceLibrary",
    "VoiceLibraryError",
    "VoiceLimitReached",
    "VoicePrompt",
    "VoiceStore",
    "read_spk2info",
    "validate_voice_id",
    "voice_key",
]

logger = logging.getLogger("cosyserve.voices")

# The embedded library under its historical name (a data directory, or None for memory).
VoiceLibrary = SQLiteVoiceLibrary

MAX_ID_LENGTH = 64
_VOICE_ID = re.compile(rf"^[\w\- .]{{1,{MAX_ID_LENGTH}}}$")
_LISTED_IN_ERRORS = 20


def read_spk2info(path: Path, family: str, token_rate: int) -> dict[str, VoicePrompt]:
    """The speakers of ``spk2info.pt`` (a dict of the reference's field dicts), read without unpickling
    arbitrary objects; ``family`` / ``token_rate``: the model's, whose speakers they are."""
    if not path.is_file():
        return {}
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ModelLoadError(f"{path} is not a speaker dictionary")
    speakers = {}
    for name, entry in data.items():
        try:
            speakers[str(name)] = VoicePrompt.from_fields(entry, family, token_rate)
        except (ValueError, TypeError) as exc:
            raise ModelLoadError(f"{path}: speaker '{name}' is not usable: {exc}") from exc
    return speakers


def validate_voice_id(voice_id: object, param: str = "spk_id") -> str:
    """``voice_id`` in Unicode NFC form, if it is a valid id; else InvalidRequest naming ``param``."""
    if isinstance(voice_id, str):
        voice_id = unicodedata.normalize("NFC", voice_id)
        if _VOICE_ID.match(voice_id) and voice_id.strip(" .") == voice_id:
            return voice_id
    shown = repr(voice_id if not isinstance(voice_id, str) or len(voice_id) <= 80 else voice_id[:80] + "...")
    raise InvalidRequest(
        f"a voice id is 1-{MAX_ID_LENGTH} letters, digits, spaces, '.', '_' or '-', not starting or ending "
        f"with '.' or a space; got {shown}",
        param=param,
    )


class VoiceCatalog(Protocol):
    """The voices one model can use, as a client of the engine sees them (what :class:`VoiceStore` offers
    the HTTP layer): look up, list, check a new name, delete. Voices are made through the engine
    (``EngineClient.add_voice``), which computes them."""

    def ids(self) -> list[str]:
        """The usable voices' ids: built-in speakers first, then the stored voices of this model's family."""
        ...

    def __contains__(self, voice_id: object) -> bool:
        """Whether any voice (of any family) has this id."""
        ...

    def builtin(self, voice_id: str) -> bool: ...

    def usable(self, info: VoiceInfo) -> bool: ...

    def info(self, voice_id: str, param: str = "spk_id") -> VoiceInfo: ...

    def usable_info(self, voice_id: str, param: str = "spk_id") -> VoiceInfo: ...

    def check_new(self, voice_id: str, param: str = "name") -> str: ...

    def remove(self, voice_id: str, param: str = "voice_id") -> VoiceInfo: ...


class VoiceStore:
    """The speakers one model can use: its built-ins (read-only, listed first), then the library's
    voices made by a model of the same family and speech-token rate.

    ``voice_id in store`` is true for any voice of the library (so that using one of another family
    gets :class:`IncompatibleVoice`, not "unknown"); :meth:`ids` lists the usable ones.
    """

    def __init__(
        self,
        builtin: dict[str, VoicePrompt],
        library: VoiceBackend | None = None,
        *,
        family: str = "",
        token_rate: int = 0,
        model: str = "",
    ) -> None:
        self._builtin = builtin
        self._builtin_keys = {voice_key(k): k for k in builtin}
        self.library = library or VoiceLibrary(None)
        self.family = family
        self.token_rate = token_rate
        self.model = model
        stored = self.library.list()
        for info in stored:
            if voice_key(info.id) in self._builtin_keys:
                logger.warning("stored voice '%s' is hidden by the model's built-in speaker of that name", info.id)
        usable = sum(self.usable(v) for v in stored)
        logger.info("voice library %s: %d voices, %d usable by this model", self.library.location, len(stored), usable)

    def builtin(self, voice_id: str) -> bool:
        """Whether ``voice_id`` is one of the model's own (read-only) speakers."""
        return voice_id in self._builtin

    def usable(self, info: VoiceInfo) -> bool:
        return info.builtin or (info.family, info.token_rate) == (self.family, self.token_rate)

    def ids(self) -> list[str]:
        stored = self.library.ids(self.family, self.token_rate)
        return list(self._builtin) + [i for i in stored if voice_key(i) not in self._builtin_keys]

    def __contains__(self, voice_id: object) -> bool:
        if not isinstance(voice_id, str):
            return False
        return voice_id in self._builtin or self.library.find(voice_id) is not None

    def info(self, voice_id: str, param: str = "spk_id") -> VoiceInfo:
        """Metadata of a built-in speaker or stored voice (of any family)."""
        if voice_id in self._builtin:
            fields = self._builtin[voice_id].field_names()
            return VoiceInfo(voice_id, self.family, self.token_rate, self.model, builtin=True, fields=fields)
        info = self.library.find(voice_id)
        if info is None:
            raise self._unknown(voice_id, param)
        return info

    def get(self, voice_id: str, param: str = "spk_id") -> VoicePrompt:
        """A usable speaker or voice (a stored one is read now, then cached); UnknownSpeaker or
        IncompatibleVoice otherwise."""
        if voice_id in self._builtin:
            return self._builtin[voice_id]
        return self.library.voice(self.usable_info(voice_id, param))

    def usable_info(self, voice_id: str, param: str = "spk_id") -> VoiceInfo:
        """The metadata of a speaker or voice this model can use (what choosing a mode needs, without
        reading its tensors); UnknownSpeaker or IncompatibleVoice otherwise."""
        info = self.info(voice_id, param)
        if not self.usable(info):
            raise IncompatibleVoice(
                f"voice '{info.id}' was made with a {info.family} model ({info.model}, {info.token_rate} Hz speech "
                f"tokens); the loaded {self.family} model ({self.model}, {self.token_rate} Hz speech tokens) cannot "
                "use it, as its speech tokens and features belong to the other model: store the recording again "
                "on this server under another name",
                param=param,
            )
        return info

    def _unknown(self, voice_id: str, param: str) -> UnknownSpeaker:
        ids = self.ids()
        known = ", ".join(ids[:_LISTED_IN_ERRORS]) or "none (this model has no built-in speakers; store a voice first)"
        if len(ids) > _LISTED_IN_ERRORS:
            known += f" and {len(ids) - _LISTED_IN_ERRORS} more"
        return UnknownSpeaker(f"unknown speaker '{voice_id}'; known speakers: {known}", param=param)

    def check_new(self, voice_id: str, param: str = "name") -> str:
        """The validated id for a new voice; raises now what :meth:`add` would (invalid, taken, full)."""
        voice_id = validate_voice_id(voice_id, param)
        builtin = self._builtin_keys.get(voice_key(voice_id))
        if builtin is not None:
            raise VoiceExists(f"'{builtin}' is a built-in speaker of this model; choose another name", param=param)
        self.library.check_room(voice_id)
        return voice_id

    def add(self, voice_id: str, voice: VoicePrompt, *, duration: float | None = None) -> VoiceInfo:
        """Store a voice computed by this model; its transcript is the voice's ``prompt_text``."""
        voice_id = self.check_new(voice_id)
        if (voice.family, voice.token_rate) != (self.family, self.token_rate):
            raise ValueError(
                f"a {voice.family} voice at {voice.token_rate} Hz cannot be stored as one of this "
                f"{self.family} model at {self.token_rate} Hz"
            )
        info = VoiceInfo(
            voice_id,
            self.family,
            self.token_rate,
            self.model,
            ref_text=voice.prompt_text,
            created_at=int(time.time()),
            duration=duration,
        )
        return self.library.add(info, voice)

    def remove(self, voice_id: str, param: str = "voice_id") -> VoiceInfo:
        """Delete a stored voice (of any family); built-in speakers are read-only."""
        if voice_id in self._builtin:
            raise ReadOnlyVoice(f"'{voice_id}' is a built-in speaker of the model and cannot be deleted", param=param)
        return self.library.remove(voice_id)
