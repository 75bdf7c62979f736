"""What every voice library back-end shares: the voice metadata, the errors, the tensor format and
the decoded-tensor cache. A back-end stores rows; :class:`VoiceBackend` says which operations it owes.

Guarantees every back-end keeps: each write is one transaction (a process killed mid-write leaves the
voice absent, never half there); a write that returned is durable; ids are unique regardless of case
(the key :func:`voice_key` computes), enforced by the database itself; ``max_voices`` holds under
concurrent writers. Tensors are stored as ``torch.save`` bytes and read back with ``weights_only=True``
(no code runs when a voice is read).
"""

from __future__ import annotations

import io
import threading
import unicodedata
import uuid
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from cosyserve.errors import CosyServeError, InvalidRequest, UnknownSpeaker

Voice = dict[str, torch.Tensor]

DEFAULT_MAX_VOICES = 1000
# Decoded voices kept in memory (a 30 s prompt is ~0.5 MB of tensors).
CACHE_SIZE = 64


class VoiceExists(InvalidRequest):
    """A voice (or built-in speaker) already has this id: HTTP 409."""

    code = "voice_exists"


class VoiceLimitReached(InvalidRequest):
    """The library holds the configured maximum number of voices: HTTP 409."""

    code = "voice_limit_reached"


class VoiceLibraryError(CosyServeError):
    """The library database cannot be read or written (disk full, permissions, damaged entry): HTTP 500."""

    code = "voice_library_error"


def voice_key(voice_id: str) -> str:
    """What makes two ids the same voice: Unicode NFC, case-folded."""
    return unicodedata.normalize("NFC", voice_id).casefold()


@dataclass(frozen=True)
class VoiceInfo:
    """A voice's metadata (no tensors). ``created_at`` is None for built-in speakers."""

    id: str
    family: str
    token_rate: int
    model: str
    ref_text: str | None = None
    created_at: int | None = None
    duration: float | None = None
    builtin: bool = False
    fields: tuple[str, ...] = ()
    uid: str = ""


def serialize(voice: Mapping[str, torch.Tensor]) -> bytes:
    out = io.BytesIO()
    torch.save({k: torch.as_tensor(v).detach().cpu().contiguous() for k, v in voice.items()}, out)
    return out.getvalue()


def deserialize(data: bytes, voice_id: str) -> Voice:
    try:
        voice = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise VoiceLibraryError(f"stored voice '{voice_id}' cannot be read: {exc}") from exc
    if not isinstance(voice, dict) or not all(isinstance(v, torch.Tensor) for v in voice.values()):
        raise VoiceLibraryError(f"stored voice '{voice_id}' is not a dictionary of tensors")
    return voice


class VoiceBackend(ABC):
    """The storage interface of the voice library: one database shared by every model and process
    (or replica) that opens it. Each operation sees every change committed before it began.

    Decoded tensors are cached by the voice's ``uid`` (new for every stored voice, so a name deleted
    and reused never hits a stale entry).
    """

    def __init__(self, max_voices: int) -> None:
        if max_voices < 1:
            raise ValueError(f"max_voices must be at least 1, got {max_voices}")
        self.max_voices = max_voices
        self._lock = threading.Lock()  # the connection and the cache are shared by the server's threads
        self._cache: OrderedDict[str, Voice] = OrderedDict()

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the voices live, for logs and errors (never a password)."""

    @abstractmethod
    def list(self) -> list[VoiceInfo]:
        """Every stored voice, oldest first."""

    @abstractmethod
    def ids(self, family: str, token_rate: int) -> list[str]:
        """Ids of the voices made by models of ``family`` at ``token_rate``, oldest first."""

    @abstractmethod
    def find(self, voice_id: str) -> VoiceInfo | None:
        """The voice stored under ``voice_id`` (any case), if any."""

    @abstractmethod
    def count(self) -> int: ...

    @abstractmethod
    def _insert(self, info: VoiceInfo, blob: bytes) -> None:
        """Store one voice in one transaction; VoiceExists / VoiceLimitReached decided inside it."""

    @abstractmethod
    def _delete(self, voice_id: str) -> VoiceInfo:
        """Delete one voice (any case) in one transaction; UnknownSpeaker if there is none."""

    @abstractmethod
    def _read_tensors(self, info: VoiceInfo) -> bytes | None:
        """The stored bytes of a voice's tensors; None if it was deleted."""

    @abstractmethod
    def close(self) -> None: ...

    def check_room(self, voice_id: str) -> None:
        """Raise VoiceExists / VoiceLimitReached now, before a voice is computed (``add`` checks again)."""
        existing = self.find(voice_id)
        if existing is not None:
            raise self._exists(existing)
        count = self.count()
        if count >= self.max_voices:
            raise self._full(count)

    def _exists(self, existing: VoiceInfo) -> VoiceExists:
        return VoiceExists(
            f"a voice named '{existing.id}' already exists (names are unique regardless of case); "
            "delete it first or choose another name",
            param="name",
        )

    def _full(self, count: int) -> VoiceLimitReached:
        return VoiceLimitReached(
            f"the voice library is full ({count} of {self.max_voices} voices): delete a voice "
            "(DELETE /v1/audio/voices/{id}) or raise --max_voices",
            param="name",
        )

    def add(self, info: VoiceInfo, voice: Mapping[str, torch.Tensor]) -> VoiceInfo:
        """Store ``voice`` under ``info.id`` in one transaction; returns the stored metadata."""
        info = replace(info, fields=tuple(voice), uid=uuid.uuid4().hex)
        self._insert(info, serialize(voice))
        return info

    def remove(self, voice_id: str) -> VoiceInfo:
        """Delete the voice stored under ``voice_id`` (any case); UnknownSpeaker if there is none."""
        info = self._delete(voice_id)
        with self._lock:
            self._cache.pop(info.uid, None)
        return info

    def tensors(self, info: VoiceInfo) -> Voice:
        """The tensors of a stored voice (cached); UnknownSpeaker if it was deleted meanwhile."""
        with self._lock:
            voice = self._cache.get(info.uid)
            if voice is not None:
                self._cache.move_to_end(info.uid)
                return voice
        data = self._read_tensors(info)
        if data is None:
            raise UnknownSpeaker(f"voice '{info.id}' was deleted", param="spk_id")
        voice = deserialize(data, info.id)
        with self._lock:
            self._cache[info.uid] = voice
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return voice
