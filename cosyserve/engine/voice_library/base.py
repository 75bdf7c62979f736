"""What every voice library back-end shares: the voice metadata and the decoded-voice cache (the errors
are :mod:`cosyserve.errors`'). A back-end stores rows; :class:`VoiceBackend` says which operations it owes.

Guarantees every back-end keeps: each write is one transaction (a process killed mid-write leaves the
voice absent, never half there); a write that returned is durable; ids are unique regardless of case
(the key :func:`voice_key` computes), enforced by the database itself; ``max_voices`` holds under
concurrent writers. A voice is stored as :meth:`VoicePrompt.to_bytes` and read back by
:meth:`VoicePrompt.from_bytes` (``weights_only``: no code runs when a voice is read), which also reads
the field dicts earlier versions stored.

The same database holds the pronunciation lexicon (:mod:`cosyserve.text.pronunciation`): one row per
(scope, word), the word unique regardless of case within its scope (the database's primary key), written
by an upsert (a word stored again is replaced: two servers writing one word at once leave one entry),
``max_entries`` a scope under concurrent writers, durable once the write returned, as voices are.

It also records the long-form jobs (:mod:`cosyserve.api.job_runner`): one row per job (its request, the
segment texts cut once at submission, its status and counters) and one row per finished segment (its
sample count and bytes), written in the same transaction as the job's counters once the segment's audio
file was fsync'd; creating a job counts the owner's active jobs and stored bytes inside its transaction.
"""

from __future__ import annotations

import builtins  # the back-ends have a method named list: their annotations name the type through this
import json
import threading
import unicodedata
import uuid
from abc import ABC, abstractmethod
from collections import OrderedDict
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any

from cosyserve.errors import (
    InsufficientStorage,
    InvalidRequest,
    JobLimitReached,
    PronunciationLimitReached,
    UnknownPronunciation,
    UnknownSpeaker,
    VoiceExists,
    VoiceLibraryError,
    VoiceLimitReached,
)
from cosyserve.frontend.voice_prompt import VoicePrompt
from cosyserve.text.pronunciation import (
    MAX_STORED_PER_SCOPE,
    VOICE_SCOPE_PREFIX,
    Pronunciation,
    scope_kind,
    word_key,
)

DEFAULT_MAX_VOICES = 1000
# Decoded voices kept in memory (a 30 s prompt is ~0.5 MB of tensors).
CACHE_SIZE = 64


def voice_key(voice_id: str) -> str:
    """What makes two ids the same voice: Unicode NFC, case-folded."""
    return unicodedata.normalize("NFC", voice_id).casefold()


@dataclass(frozen=True)
class VoiceInfo:
    """A voice's metadata (no tensors). ``created_at`` is None for built-in speakers; ``fields`` names
    what the voice holds, in the reference's ``spk2info.pt`` names (:meth:`VoicePrompt.field_names`)."""

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

    @property
    def has_prompt(self) -> bool:
        """Made from a recording (a clone), not a speaker embedding only."""
        return "llm_prompt_speech_token" in self.fields

    @property
    def has_transcript(self) -> bool:
        """It holds its recording's transcript (text ids), so zero_shot can use it."""
        return "prompt_text" in self.fields


@dataclass(frozen=True)
class StoredPronunciation:
    """A lexicon entry as stored: its scope (``global``, ``voice:<voice key>``, ``key:<key id>``), the voice
    id as given for a voice's entry, and when it was (last) written."""

    entry: Pronunciation
    scope: str
    voice: str | None = None
    created_at: int = 0

    @property
    def kind(self) -> str:
        return scope_kind(self.scope)


JOB_STATUSES = ("queued", "running", "completed", "failed", "cancelled")
ACTIVE_JOB_STATUSES = ("queued", "running")


@dataclass(frozen=True)
class JobRecord:
    """A long-form job as stored. ``body``: the speech request's fields as JSON (without ``input``);
    ``segments``: the texts cut at submission, one engine request each; ``node``: the data directory that
    holds its audio files (a server runs and serves only its own node's jobs)."""

    id: str
    owner: str  # the API key id ('' without keys)
    model: str
    body: str
    segments: tuple[str, ...]
    seed: int
    sample_rate: int  # the model's: the segment files' rate
    node: str
    status: str = "queued"
    segments_done: int = 0
    samples_done: int = 0
    bytes_stored: int = 0
    error: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def chars_total(self) -> int:
        return sum(len(s) for s in self.segments)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_JOB_STATUSES


@dataclass(frozen=True)
class JobLimits:
    """What one owner (API key) may hold: jobs queued or running, bytes of stored job audio."""

    max_active: int
    max_bytes: int


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
        self._cache: OrderedDict[str, VoicePrompt] = OrderedDict()

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the voices live, for logs and errors (never a password)."""

    # The SQL dialect of the back-end's queries: its voices table, the order voices were stored in, the
    # placeholder of a query parameter.
    _TABLE = "voices"
    _STORED_ORDER = "created_at"
    _PARAM = "?"
    _COLUMNS = "id, family, token_rate, model, ref_text, created_at, duration, fields, uid"

    @staticmethod
    def _row(info: VoiceInfo) -> tuple:
        """The values of a new voice's row, in the columns' order: uid, key, id, family, token_rate, model,
        ref_text, created_at, duration, fields (JSON)."""
        metadata = (info.family, info.token_rate, info.model, info.ref_text, info.created_at, info.duration)
        return (info.uid, voice_key(info.id), info.id, *metadata, json.dumps(list(info.fields)))

    _ROW_COLUMNS = "uid, key, id, family, token_rate, model, ref_text, created_at, duration, fields"

    @property
    def _insert_row_sql(self) -> str:
        """The INSERT of a :meth:`_row` into the voices table."""
        values = ", ".join([self._PARAM] * len(self._ROW_COLUMNS.split(",")))
        return f"INSERT INTO {self._TABLE} ({self._ROW_COLUMNS}) VALUES ({values})"

    @abstractmethod
    def _query(self, sql: str, args: tuple = ()) -> builtins.list[tuple]:
        """The rows of one read-only query (VoiceLibraryError when the database cannot be read)."""

    @staticmethod
    def _info(row: tuple) -> VoiceInfo:
        """A row of :attr:`_COLUMNS` as metadata (``fields``: JSON text, or the list PostgreSQL decodes it to)."""
        voice_id, family, token_rate, model, ref_text, created_at, duration, fields, uid = row
        fields = json.loads(fields) if isinstance(fields, str) else fields
        return VoiceInfo(voice_id, family, token_rate, model, ref_text, created_at, duration, False, tuple(fields), uid)

    def list(self) -> builtins.list[VoiceInfo]:
        """Every stored voice, oldest first."""
        rows = self._query(f"SELECT {self._COLUMNS} FROM {self._TABLE} ORDER BY {self._STORED_ORDER}")
        return [self._info(r) for r in rows]

    def ids(self, family: str, token_rate: int) -> builtins.list[str]:
        """Ids of the voices made by models of ``family`` at ``token_rate``, oldest first."""
        p = self._PARAM
        sql = f"SELECT id FROM {self._TABLE} WHERE family = {p} AND token_rate = {p} ORDER BY {self._STORED_ORDER}"
        return [r[0] for r in self._query(sql, (family, token_rate))]

    def find(self, voice_id: str) -> VoiceInfo | None:
        """The voice stored under ``voice_id`` (any case), if any."""
        sql = f"SELECT {self._COLUMNS} FROM {self._TABLE} WHERE key = {self._PARAM}"
        rows = self._query(sql, (voice_key(voice_id),))
        return self._info(rows[0]) if rows else None

    def count(self) -> int:
        return self._query(f"SELECT count(*) FROM {self._TABLE}")[0][0]

    @abstractmethod
    def _insert(self, info: VoiceInfo, blob: bytes) -> None:
        """Store one voice in one transaction; VoiceExists / VoiceLimitReached decided inside it."""

    @abstractmethod
    def _delete(self, voice_id: str) -> VoiceInfo:
        """Delete one voice (any case) in one transaction; UnknownSpeaker if there is none."""

    @abstractmethod
    def _read_tensors(self, info: VoiceInfo) -> bytes | None:
        """The stored bytes of a voice; None if it was deleted."""

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

    # -- the pronunciation lexicon ----------------------------------------------------------------
    # Every lexicon write adds one to the revision, in its transaction: a reader that saw a revision
    # before may keep what it read then (one cheap query a request instead of every entry).
    _PRONUNCIATION_REVISION = "pronunciation_revision"
    _BUMP_REVISION = "UPDATE {table} SET revision = revision + 1"
    _PRONUNCIATIONS = "pronunciations"
    _PRONUNCIATION_COLUMNS = "word, pinyin, cmu, respelling, scope, voice, created_at"
    max_entries = MAX_STORED_PER_SCOPE

    @staticmethod
    def _stored_pronunciation(row: tuple) -> StoredPronunciation:
        word, pinyin, cmu, respelling, scope, voice, created_at = row
        try:
            entry = Pronunciation(word, pinyin, cmu, respelling)
        except InvalidRequest as exc:  # a row this version no longer accepts: the database's problem, not the client's
            raise VoiceLibraryError(f"stored pronunciation of {word!r} cannot be read: {exc}") from exc
        return StoredPronunciation(entry, scope, voice, created_at)

    def pronunciation_revision(self) -> int:
        """The lexicon's revision: it changes with every write (of any process on the database)."""
        rows = self._query(f"SELECT revision FROM {self._PRONUNCIATION_REVISION}")
        return int(rows[0][0]) if rows else 0

    @property
    def _bump_revision_sql(self) -> str:
        return self._BUMP_REVISION.format(table=self._PRONUNCIATION_REVISION)

    def pronunciations(self, scopes: builtins.list[str]) -> builtins.list[StoredPronunciation]:
        """The entries of ``scopes``, in the order of ``scopes`` (then by word)."""
        if not scopes:
            return []
        marks = ", ".join([self._PARAM] * len(scopes))
        sql = (
            f"SELECT {self._PRONUNCIATION_COLUMNS} FROM {self._PRONUNCIATIONS} WHERE scope IN ({marks}) "
            "ORDER BY scope, key"
        )
        rank = {scope: i for i, scope in enumerate(scopes)}
        rows = self._query(sql, tuple(scopes))
        return sorted((self._stored_pronunciation(r) for r in rows), key=lambda p: rank[p.scope])

    def voice_pronunciations(self) -> builtins.list[StoredPronunciation]:
        """The entries of every voice's scope, by voice then word."""
        sql = (
            f"SELECT {self._PRONUNCIATION_COLUMNS} FROM {self._PRONUNCIATIONS} "
            f"WHERE substr(scope, 1, {len(VOICE_SCOPE_PREFIX)}) = {self._PARAM} ORDER BY scope, key"
        )
        return [self._stored_pronunciation(r) for r in self._query(sql, (VOICE_SCOPE_PREFIX,))]

    def put_pronunciation(self, stored: StoredPronunciation) -> bool:
        """Store an entry in one transaction, replacing the scope's entry of that word (any case); True if
        it is new. PronunciationLimitReached when the scope is full (a replacement always fits)."""
        return self._put_pronunciation(stored, word_key(stored.entry.word))

    def remove_pronunciation(self, scope: str, word: str) -> StoredPronunciation:
        """Delete the scope's entry of ``word`` (any case); UnknownPronunciation if there is none."""
        removed = self._delete_pronunciation(scope, word_key(word))
        if removed is None:
            where = "" if scope_kind(scope) == "global" else f" in this {scope_kind(scope).replace('_', ' ')}'s scope"
            raise UnknownPronunciation(f"no stored pronunciation of {word!r}{where}", param="word")
        return removed

    def _pronunciation_row(self, stored: StoredPronunciation, key: str) -> tuple:
        e = stored.entry
        return (stored.scope, key, e.word, e.pinyin, e.cmu, e.respelling, stored.voice, stored.created_at)

    _PRONUNCIATION_ROW = "scope, key, word, pinyin, cmu, respelling, voice, created_at"

    @property
    def _upsert_pronunciation_sql(self) -> str:
        values = ", ".join([self._PARAM] * 8)
        updates = ", ".join(
            f"{c} = excluded.{c}" for c in ("word", "pinyin", "cmu", "respelling", "voice", "created_at")
        )
        return (
            f"INSERT INTO {self._PRONUNCIATIONS} ({self._PRONUNCIATION_ROW}) VALUES ({values}) "
            f"ON CONFLICT (scope, key) DO UPDATE SET {updates}"
        )

    def _full_scope(self, stored: StoredPronunciation, count: int) -> PronunciationLimitReached:
        return PronunciationLimitReached(
            f"the {stored.kind.replace('_', ' ')} scope holds {count} pronunciations, the most it may "
            f"({self.max_entries}): delete some (DELETE /v1/pronunciations/{{word}})",
            param="word",
        )

    @abstractmethod
    def _put_pronunciation(self, stored: StoredPronunciation, key: str) -> bool: ...

    @abstractmethod
    def _delete_pronunciation(self, scope: str, key: str) -> StoredPronunciation | None: ...

    def add(self, info: VoiceInfo, voice: VoicePrompt) -> VoiceInfo:
        """Store ``voice`` under ``info.id`` in one transaction; returns the stored metadata."""
        info = replace(info, fields=voice.field_names(), uid=uuid.uuid4().hex)
        self._insert(info, voice.to_bytes())
        return info

    def remove(self, voice_id: str) -> VoiceInfo:
        """Delete the voice stored under ``voice_id`` (any case); UnknownSpeaker if there is none."""
        info = self._delete(voice_id)
        with self._lock:
            self._cache.pop(info.uid, None)
        return info

    def voice(self, info: VoiceInfo) -> VoicePrompt:
        """A stored voice (cached); UnknownSpeaker if it was deleted meanwhile."""
        with self._lock:
            voice = self._cache.get(info.uid)
            if voice is not None:
                self._cache.move_to_end(info.uid)
                return voice
        data = self._read_tensors(info)
        if data is None:
            raise UnknownSpeaker(f"voice '{info.id}' was deleted", param="spk_id")
        try:
            voice = VoicePrompt.from_bytes(
                data, family=info.family, token_rate=info.token_rate, prompt_text=info.ref_text
            )
        except ValueError as exc:
            raise VoiceLibraryError(f"stored voice '{info.id}' cannot be read: {exc}") from exc
        with self._lock:
            self._cache[info.uid] = voice
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return voice

    # -- long-form jobs ---------------------------------------------------------------------------
    _JOBS = "jobs"
    _JOB_SEGMENTS = "job_segments"
    _JOB_COLUMNS = (
        "id, owner, model, body, segments, seed, sample_rate, node, status, segments_done, samples_done, "
        "bytes_stored, error, created_at, started_at, finished_at"
    )

    @abstractmethod
    def _job_transaction(self, what: str) -> AbstractContextManager[Any]:
        """One write transaction (a connection with ``execute``), jobs serialised across processes."""

    @staticmethod
    def _job(row: tuple) -> JobRecord:
        (job_id, owner, model, body, segments, seed, rate, node, status, done, samples, stored, error) = row[:13]
        segments = json.loads(segments) if isinstance(segments, str) else segments
        created, started, finished = row[13:]
        return JobRecord(
            job_id, owner, model, body, tuple(segments), int(seed), int(rate), node, status, int(done),
            int(samples), int(stored), error, float(created), started, finished,
        )  # fmt: skip

    def create_job(self, job: JobRecord, limits: JobLimits) -> None:
        """Store a new job in one transaction, after counting the owner's active jobs and stored bytes in
        it: JobLimitReached (429) / InsufficientStorage (507) when the owner is at a limit."""
        p = self._PARAM
        with self._job_transaction("the job could not be stored") as db:
            active = db.execute(
                f"SELECT count(*) FROM {self._JOBS} WHERE owner = {p} AND status IN ({p}, {p})",
                (job.owner, *ACTIVE_JOB_STATUSES),
            ).fetchone()[0]
            if active >= limits.max_active:
                raise JobLimitReached(
                    f"this API key has {active} jobs queued or running, the most it may ({limits.max_active}): "
                    "wait for one to finish or cancel one (DELETE /v1/audio/jobs/{id})"
                )
            stored = db.execute(
                f"SELECT coalesce(sum(bytes_stored), 0) FROM {self._JOBS} WHERE owner = {p}", (job.owner,)
            ).fetchone()[0]
            if stored >= limits.max_bytes:
                raise InsufficientStorage(
                    f"this API key's jobs hold {stored} bytes of audio, the most it may ({limits.max_bytes}): "
                    "delete finished jobs (DELETE /v1/audio/jobs/{id})"
                )
            marks = ", ".join([p] * 16)
            db.execute(
                f"INSERT INTO {self._JOBS} ({self._JOB_COLUMNS}) VALUES ({marks})",
                (
                    job.id, job.owner, job.model, job.body, json.dumps(list(job.segments), ensure_ascii=False),
                    job.seed, job.sample_rate, job.node, job.status, 0, 0, 0, None, job.created_at, None, None,
                ),
            )  # fmt: skip

    def job(self, job_id: str, owner: str | None = None) -> JobRecord | None:
        """The job ``job_id`` (of ``owner`` when given), if any."""
        p = self._PARAM
        sql = f"SELECT {self._JOB_COLUMNS} FROM {self._JOBS} WHERE id = {p}"
        args: tuple = (job_id,)
        if owner is not None:
            sql, args = sql + f" AND owner = {p}", (job_id, owner)
        rows = self._query(sql, args)
        return self._job(rows[0]) if rows else None

    def jobs(
        self, owner: str | None = None, statuses: tuple[str, ...] = (), node: str | None = None
    ) -> builtins.list[JobRecord]:
        """Jobs, oldest first: those of ``owner`` / with one of ``statuses`` / of ``node`` when given."""
        p = self._PARAM
        where, args = [], []
        if owner is not None:
            where.append(f"owner = {p}")
            args.append(owner)
        if statuses:
            where.append(f"status IN ({', '.join([p] * len(statuses))})")
            args += statuses
        if node is not None:
            where.append(f"node = {p}")
            args.append(node)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        sql = f"SELECT {self._JOB_COLUMNS} FROM {self._JOBS}{clause} ORDER BY created_at, id"
        return [self._job(r) for r in self._query(sql, tuple(args))]

    def job_segments(self, job_id: str) -> builtins.list[tuple[int, int]]:
        """(samples, bytes) of each recorded segment of a job, in order."""
        p = self._PARAM
        sql = f"SELECT samples, bytes FROM {self._JOB_SEGMENTS} WHERE job_id = {p} ORDER BY idx"
        return [(int(a), int(b)) for a, b in self._query(sql, (job_id,))]

    def job_stored_bytes(self, owner: str) -> int:
        p = self._PARAM
        rows = self._query(f"SELECT coalesce(sum(bytes_stored), 0) FROM {self._JOBS} WHERE owner = {p}", (owner,))
        return int(rows[0][0])

    def record_job_segment(self, job_id: str, index: int, samples: int, nbytes: int) -> bool:
        """Record segment ``index`` of a running job (its file is already durable) and advance the job's
        counters, in one transaction; False if the job is no longer running (cancelled or deleted)."""
        p = self._PARAM
        with self._job_transaction("the job's segment could not be recorded") as db:
            row = db.execute(f"SELECT status, segments_done FROM {self._JOBS} WHERE id = {p}", (job_id,)).fetchone()
            if row is None or row[0] != "running" or int(row[1]) != index:
                return False
            db.execute(
                f"INSERT INTO {self._JOB_SEGMENTS} (job_id, idx, samples, bytes) VALUES ({p}, {p}, {p}, {p})",
                (job_id, index, samples, nbytes),
            )
            db.execute(
                f"UPDATE {self._JOBS} SET segments_done = segments_done + 1, samples_done = samples_done + {p}, "
                f"bytes_stored = bytes_stored + {p} WHERE id = {p}",
                (samples, nbytes, job_id),
            )
        return True

    def set_job_status(
        self,
        job_id: str,
        status: str,
        *,
        error: str | None = None,
        at: float | None = None,
        only_from: tuple[str, ...] = ACTIVE_JOB_STATUSES,
    ) -> bool:
        """Move a job to ``status`` if it is in one of ``only_from``; True if it moved. ``at``: the start
        time (running) or the end time (a final status)."""
        if status not in JOB_STATUSES:
            raise ValueError(f"unknown job status {status!r}")
        p = self._PARAM
        column = "started_at" if status == "running" else "finished_at"
        with self._job_transaction("the job's status could not be stored") as db:
            marks = ", ".join([p] * len(only_from))
            cursor = db.execute(
                f"UPDATE {self._JOBS} SET status = {p}, error = {p}, {column} = coalesce({p}, {column}) "
                f"WHERE id = {p} AND status IN ({marks})",
                (status, error, at, job_id, *only_from),
            )
            return bool(cursor.rowcount)

    def delete_job(self, job_id: str) -> JobRecord | None:
        """Delete a job and its segment rows in one transaction; the deleted job, None if there was none."""
        p = self._PARAM
        with self._job_transaction("the job could not be deleted") as db:
            row = db.execute(f"SELECT {self._JOB_COLUMNS} FROM {self._JOBS} WHERE id = {p}", (job_id,)).fetchone()
            if row is None:
                return None
            db.execute(f"DELETE FROM {self._JOB_SEGMENTS} WHERE job_id = {p}", (job_id,))
            db.execute(f"DELETE FROM {self._JOBS} WHERE id = {p}", (job_id,))
        return self._job(row)
