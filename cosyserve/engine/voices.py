"""Speakers a model can use by id: the model directory's ``spk2info.pt`` and voices cloned at run time.

Built-in speakers are read once, safely, and never written back (the reference writes into the model
directory). Cloned voices live in memory and, when a directory is given, one file per voice written
atomically, so a crash mid-write never loses a stored voice.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from pathlib import Path

import torch

from cosyserve.errors import InvalidRequest, ModelLoadError, UnknownSpeaker

Voice = dict[str, torch.Tensor]

_VOICE_ID = re.compile(r"^[\w\- .]{1,64}$", re.UNICODE)


def read_spk2info(path: Path) -> dict[str, Voice]:
    """Load ``spk2info.pt`` (a dict of dicts of tensors) without unpickling arbitrary objects."""
    if not path.is_file():
        return {}
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ModelLoadError(f"{path} is not a speaker dictionary")
    return {str(k): dict(v) for k, v in data.items()}


def validate_voice_id(voice_id: str) -> str:
    if not isinstance(voice_id, str) or not _VOICE_ID.match(voice_id) or voice_id.strip(" .") != voice_id:
        raise InvalidRequest(
            "a voice id is 1-64 letters, digits, spaces, '.', '_' or '-', not starting or ending with '.' or ' '",
            param="spk_id",
        )
    return voice_id


class VoiceStore:
    """Speakers by id: built-ins (read-only) plus cloned voices (optionally persisted)."""

    def __init__(self, builtin: dict[str, Voice], directory: Path | None = None) -> None:
        self._builtin = builtin
        self._cloned: dict[str, Voice] = {}
        self._directory = directory
        self._lock = threading.Lock()
        if directory is not None:
            for path in sorted(directory.glob("*.pt")):
                if path.name.startswith("."):
                    continue  # a temporary file left by a write that never finished
                self._cloned[path.stem] = read_spk2info(path).get(path.stem, {})

    def ids(self) -> list[str]:
        return list(self._builtin) + [k for k in self._cloned if k not in self._builtin]

    def __contains__(self, voice_id: str) -> bool:
        return voice_id in self._builtin or voice_id in self._cloned

    def get(self, voice_id: str, param: str = "spk_id") -> Voice:
        voice = self._cloned.get(voice_id) or self._builtin.get(voice_id)
        if voice is None:
            known = ", ".join(self.ids()) or "none (this model has no stored speakers)"
            raise UnknownSpeaker(f"unknown speaker '{voice_id}'; known speakers: {known}", param=param)
        return voice

    def add(self, voice_id: str, voice: Voice) -> None:
        validate_voice_id(voice_id)
        with self._lock:
            if voice_id in self._builtin:
                raise InvalidRequest(f"'{voice_id}' is a built-in speaker of this model", param="spk_id")
            if self._directory is not None:
                self._directory.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self._directory, prefix=".tmp-", suffix=".pt")
                try:
                    with os.fdopen(fd, "wb") as fh:
                        torch.save({voice_id: voice}, fh)
                        fh.flush()
                        os.fsync(fh.fileno())
                    os.replace(tmp, self._directory / f"{voice_id}.pt")
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            self._cloned[voice_id] = voice

    def remove(self, voice_id: str) -> None:
        with self._lock:
            if voice_id not in self._cloned:
                raise UnknownSpeaker(f"no cloned voice '{voice_id}'", param="spk_id")
            if self._directory is not None:
                (self._directory / f"{voice_id}.pt").unlink(missing_ok=True)
            del self._cloned[voice_id]
