"""Speakers a model can use by id: the model directory's ``spk2info.pt`` and the user's voice library.

Built-in speakers are read once, safely, and never written back (the reference writes into the model
directory). Cloned voices live in the voice library: one SQLite database, ``voices.sqlite3`` under the
data directory (or in memory), shared by every model and process that opens that directory. SQLite in
WAL mode with ``synchronous=FULL`` and one transaction per write means a process killed in the middle
of a write leaves every voice committed before it intact, and the half-written one absent.

A voice's id is the name it was stored under (validated: letters, digits, ``_ - . space``; unique
regardless of case). Its tensors belong to the model family and speech-token rate that made them, so a
model of another family or rate refuses it with a message naming both. Tensors are stored as
``torch.save`` bytes and read back with ``weights_only=True`` (no code runs when a voice is read).
"""

from __future__ import annotations

import io
import json
import logging
import re
import sqlite3
import threading
import time
import unicodedata
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from cosyserve.errors import CosyServeError, InvalidRequest, ModelLoadError, UnknownSpeaker

logger = logging.getLogger("cosyserve.voices")

Voice = dict[str, torch.Tensor]

DB_NAME = "voices.sqlite3"
DEFAULT_MAX_VOICES = 1000
MAX_ID_LENGTH = 64
SCHEMA_VERSION = 1
# Decoded voices kept in memory (a 30 s prompt is ~0.5 MB of tensors).
CACHE_SIZE = 64
# How long a write waits for another process's transaction before giving up.
BUSY_TIMEOUT_S = 10.0
_VOICE_ID = re.compile(rf"^[\w\- .]{{1,{MAX_ID_LENGTH}}}$")
_LISTED_IN_ERRORS = 20

_SCHEMA = (
    """CREATE TABLE voices (
    key TEXT PRIMARY KEY,         -- the id case-folded: ids are unique regardless of case
    id TEXT NOT NULL,             -- as the user spelled it
    uid TEXT NOT NULL UNIQUE,     -- new for every stored voice, so a reused name never hits a stale cache
    family TEXT NOT NULL,
    token_rate INTEGER NOT NULL,
    model TEXT NOT NULL,
    ref_text TEXT,                -- NULL: stored without a transcript
    created_at INTEGER NOT NULL,  -- Unix seconds
    duration REAL,                -- seconds of the recording
    fields TEXT NOT NULL          -- JSON list of the tensor names
    )""",
    """CREATE TABLE voice_tensors (
    uid TEXT PRIMARY KEY,
    data BLOB NOT NULL            -- torch.save of {name: tensor}
    )""",
)


class VoiceExists(InvalidRequest):
    """A voice (or built-in speaker) already has this id: HTTP 409."""

    code = "voice_exists"


class VoiceLimitReached(InvalidRequest):
    """The library holds the configured maximum number of voices: HTTP 409."""

    code = "voice_limit_reached"


class IncompatibleVoice(InvalidRequest):
    """A stored voice made by a model of another family or speech-token rate: HTTP 400."""

    code = "incompatible_voice"


class ReadOnlyVoice(InvalidRequest):
    """A built-in speaker cannot be deleted."""

    code = "read_only_voice"


class VoiceLibraryError(CosyServeError):
    """The library database cannot be read or written (disk full, permissions, damaged entry): HTTP 500."""

    code = "voice_library_error"


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


def _serialize(voice: Mapping[str, torch.Tensor]) -> bytes:
    out = io.BytesIO()
    torch.save({k: torch.as_tensor(v).detach().cpu().contiguous() for k, v in voice.items()}, out)
    return out.getvalue()


def _deserialize(data: bytes, voice_id: str) -> Voice:
    try:
        voice = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise VoiceLibraryError(f"stored voice '{voice_id}' cannot be read: {exc}") from exc
    if not isinstance(voice, dict) or not all(isinstance(v, torch.Tensor) for v in voice.values()):
        raise VoiceLibraryError(f"stored voice '{voice_id}' is not a dictionary of tensors")
    return voice


class VoiceLibrary:
    """The voice database under ``data_dir`` (None: in memory, gone with the process).

    Every method is one SQLite statement or transaction, so other processes on the same directory see
    each change as soon as it is committed. Decoded tensors are cached by the voice's ``uid``.
    """

    def __init__(self, data_dir: Path | None, max_voices: int = DEFAULT_MAX_VOICES) -> None:
        if max_voices < 1:
            raise ValueError(f"max_voices must be at least 1, got {max_voices}")
        self.path = None if data_dir is None else Path(data_dir).expanduser() / DB_NAME
        self.max_voices = max_voices
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Voice] = OrderedDict()
        try:
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                ":memory:" if self.path is None else str(self.path),
                timeout=BUSY_TIMEOUT_S,
                isolation_level=None,  # explicit BEGIN / COMMIT
                check_same_thread=False,  # shared by the server's threads, serialised by _lock
            )
        except (OSError, sqlite3.Error) as exc:
            raise ModelLoadError(f"cannot open the voice library {self.path}: {exc}") from exc
        try:
            if self.path is not None:
                mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise sqlite3.OperationalError(f"the file system does not support WAL (journal mode {mode})")
            self._db.execute("PRAGMA synchronous=FULL")  # a committed voice survives a power cut too
            self._create_schema()
        except sqlite3.Error as exc:
            self._db.close()
            raise ModelLoadError(f"cannot open the voice library {self.path}: {exc}") from exc

    def _create_schema(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                for statement in _SCHEMA:  # not executescript: it would commit the open transaction
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"it was written by a newer cosyserve (schema {version}, this one reads {SCHEMA_VERSION})"
                )
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            with self._lock:
                return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise VoiceLibraryError(f"the voice library {self.path} cannot be read: {exc}") from exc

    _COLUMNS = "id, family, token_rate, model, ref_text, created_at, duration, fields, uid"

    @staticmethod
    def _info(row: tuple) -> VoiceInfo:
        voice_id, family, token_rate, model, ref_text, created_at, duration, fields, uid = row
        return VoiceInfo(
            voice_id, family, token_rate, model, ref_text, created_at, duration, False, tuple(json.loads(fields)), uid
        )

    def list(self) -> list[VoiceInfo]:
        """Every stored voice, oldest first."""
        rows = self._query(f"SELECT {self._COLUMNS} FROM voices ORDER BY created_at, rowid")
        return [self._info(r) for r in rows]

    def ids(self, family: str, token_rate: int) -> list[str]:
        """Ids of the voices made by models of ``family`` at ``token_rate``, oldest first."""
        rows = self._query(
            "SELECT id FROM voices WHERE family = ? AND token_rate = ? ORDER BY created_at, rowid", (family, token_rate)
        )
        return [r[0] for r in rows]

    def find(self, voice_id: str) -> VoiceInfo | None:
        """The voice stored under ``voice_id`` (any case), if any."""
        rows = self._query(f"SELECT {self._COLUMNS} FROM voices WHERE key = ?", (voice_key(voice_id),))
        return self._info(rows[0]) if rows else None

    def count(self) -> int:
        return self._query("SELECT COUNT(*) FROM voices")[0][0]

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
        blob = _serialize(voice)
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")  # the write lock first: check and insert see the same state
                try:
                    row = self._db.execute(f"SELECT {self._COLUMNS} FROM voices WHERE key = ?", (voice_key(info.id),))
                    existing = row.fetchone()
                    if existing is not None:
                        raise self._exists(self._info(existing))
                    count = self._db.execute("SELECT COUNT(*) FROM voices").fetchone()[0]
                    if count >= self.max_voices:
                        raise self._full(count)
                    self._db.execute("INSERT INTO voice_tensors (uid, data) VALUES (?, ?)", (info.uid, blob))
                    self._db.execute(
                        "INSERT INTO voices (key, id, uid, family, token_rate, model, ref_text, created_at, duration, "
                        "fields) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            voice_key(info.id),
                            info.id,
                            info.uid,
                            info.family,
                            info.token_rate,
                            info.model,
                            info.ref_text,
                            info.created_at,
                            info.duration,
                            json.dumps(list(info.fields)),
                        ),
                    )
                    self._db.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
            except sqlite3.Error as exc:
                raise VoiceLibraryError(f"voice '{info.id}' could not be stored in {self.path}: {exc}") from exc
        return info

    def remove(self, voice_id: str) -> VoiceInfo:
        """Delete the voice stored under ``voice_id`` (any case); UnknownSpeaker if there is none."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    row = self._db.execute(f"SELECT {self._COLUMNS} FROM voices WHERE key = ?", (voice_key(voice_id),))
                    found = row.fetchone()
                    if found is None:
                        raise UnknownSpeaker(f"no stored voice '{voice_id}'", param="voice_id")
                    info = self._info(found)
                    self._db.execute("DELETE FROM voices WHERE uid = ?", (info.uid,))
                    self._db.execute("DELETE FROM voice_tensors WHERE uid = ?", (info.uid,))
                    self._db.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
            except sqlite3.Error as exc:
                raise VoiceLibraryError(f"voice '{voice_id}' could not be deleted from {self.path}: {exc}") from exc
            self._cache.pop(info.uid, None)
        return info

    def tensors(self, info: VoiceInfo) -> Voice:
        """The tensors of a stored voice (cached); UnknownSpeaker if it was deleted meanwhile."""
        with self._lock:
            voice = self._cache.get(info.uid)
            if voice is not None:
                self._cache.move_to_end(info.uid)
                return voice
        rows = self._query("SELECT data FROM voice_tensors WHERE uid = ?", (info.uid,))
        if not rows:
            raise UnknownSpeaker(f"voice '{info.id}' was deleted", param="spk_id")
        voice = _deserialize(rows[0][0], info.id)
        with self._lock:
            self._cache[info.uid] = voice
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return voice

    def close(self) -> None:
        with self._lock:
            self._db.close()


class StoredVoice(Mapping[str, torch.Tensor]):
    """A library voice whose tensors are read on first use: listing voices and choosing a mode only
    need its field names."""

    def __init__(self, info: VoiceInfo, library: VoiceLibrary) -> None:
        self.info = info
        self._library = library
        self._tensors: Voice | None = None

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.info.fields:
            raise KeyError(key)
        if self._tensors is None:
            self._tensors = self._library.tensors(self.info)
        return self._tensors[key]

    def __contains__(self, key: object) -> bool:
        return key in self.info.fields

    def __iter__(self) -> Iterator[str]:
        return iter(self.info.fields)

    def __len__(self) -> int:
        return len(self.info.fields)


class VoiceStore:
    """The speakers one model can use: its built-ins (read-only, listed first), then the library's
    voices made by a model of the same family and speech-token rate.

    ``voice_id in store`` is true for any voice of the library (so that using one of another family
    gets :class:`IncompatibleVoice`, not "unknown"); :meth:`ids` lists the usable ones.
    """

    def __init__(
        self,
        builtin: dict[str, Voice],
        library: VoiceLibrary | None = None,
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
        where = self.library.path or "memory"
        logger.info("voice library %s: %d voices, %d usable by this model", where, len(stored), usable)

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
            fields = tuple(self._builtin[voice_id])
            return VoiceInfo(voice_id, self.family, self.token_rate, self.model, builtin=True, fields=fields)
        info = self.library.find(voice_id)
        if info is None:
            raise self._unknown(voice_id, param)
        return info

    def get(self, voice_id: str, param: str = "spk_id") -> Mapping[str, torch.Tensor]:
        """The tensors of a usable speaker; UnknownSpeaker or IncompatibleVoice otherwise."""
        if voice_id in self._builtin:
            return self._builtin[voice_id]
        info = self.info(voice_id, param)
        if not self.usable(info):
            raise IncompatibleVoice(
                f"voice '{info.id}' was made with a {info.family} model ({info.model}, {info.token_rate} Hz speech "
                f"tokens); the loaded {self.family} model ({self.model}, {self.token_rate} Hz speech tokens) cannot "
                "use it, as its speech tokens and features belong to the other model: store the recording again "
                "on this server under another name",
                param=param,
            )
        return StoredVoice(info, self.library)

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

    def add(
        self,
        voice_id: str,
        voice: Mapping[str, torch.Tensor],
        *,
        ref_text: str | None = None,
        duration: float | None = None,
    ) -> VoiceInfo:
        """Store a voice computed by this model (its family and token rate go with it)."""
        voice_id = self.check_new(voice_id)
        info = VoiceInfo(
            voice_id,
            self.family,
            self.token_rate,
            self.model,
            ref_text=ref_text,
            created_at=int(time.time()),
            duration=duration,
        )
        return self.library.add(info, voice)

    def remove(self, voice_id: str, param: str = "voice_id") -> VoiceInfo:
        """Delete a stored voice (of any family); built-in speakers are read-only."""
        if voice_id in self._builtin:
            raise ReadOnlyVoice(f"'{voice_id}' is a built-in speaker of the model and cannot be deleted", param=param)
        return self.library.remove(voice_id)
