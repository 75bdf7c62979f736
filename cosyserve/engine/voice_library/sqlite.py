"""The embedded voice library: one SQLite database, ``voices.sqlite3`` under the data directory (or in
memory), shared by every model and process that opens that directory. SQLite in WAL mode with
``synchronous=FULL`` and one transaction per write means a process killed in the middle of a write
leaves every voice committed before it intact, and the half-written one absent.
"""

from __future__ import annotations

import builtins  # the back-ends have a method named list: their annotations name the type through this
import sqlite3
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from cosyserve.errors import ModelLoadError, UnknownSpeaker, VoiceLibraryError

from .base import DEFAULT_MAX_VOICES, StoredPronunciation, VoiceBackend, VoiceInfo, voice_key

DB_NAME = "voices.sqlite3"
# 1: voices; 2: + the pronunciation lexicon; 3: + the long-form jobs.
SCHEMA_VERSION = 3
# How long a write waits for another process's transaction before giving up.
BUSY_TIMEOUT_S = 10.0

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
    fields TEXT NOT NULL          -- JSON list of what the voice holds (its spk2info.pt field names)
    )""",
    """CREATE TABLE voice_tensors (
    uid TEXT PRIMARY KEY,
    data BLOB NOT NULL            -- VoicePrompt.to_bytes (voices stored before it: torch.save of {name: tensor})
    )""",
)
# Version 1 -> 2: the pronunciation lexicon.
_SCHEMA_V2 = (
    """CREATE TABLE pronunciations (
    scope TEXT NOT NULL,          -- global | voice:<voice key> | key:<API key id>
    key TEXT NOT NULL,            -- the word case-folded: unique regardless of case within its scope
    word TEXT NOT NULL,           -- as the user spelled it
    pinyin TEXT,
    cmu TEXT,
    respelling TEXT,
    voice TEXT,                   -- a voice's entry: the voice id as given
    created_at INTEGER NOT NULL,  -- Unix seconds of the last write
    PRIMARY KEY (scope, key)
    )""",
    """CREATE TABLE pronunciation_revision (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    revision INTEGER NOT NULL     -- one more with every lexicon write
    )""",
    "INSERT INTO pronunciation_revision (one, revision) VALUES (1, 0)",
)

# Version 2 -> 3: the long-form jobs.
_SCHEMA_V3 = (
    """CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,          -- the API key id ('' without keys)
    model TEXT NOT NULL,
    body TEXT NOT NULL,           -- the speech request's fields (JSON, without input)
    segments TEXT NOT NULL,       -- JSON list of the segment texts, cut once at submission
    seed INTEGER NOT NULL,
    sample_rate INTEGER NOT NULL, -- of the segment files (the model's)
    node TEXT NOT NULL,           -- the data directory holding the audio files
    status TEXT NOT NULL,         -- queued | running | completed | failed | cancelled
    segments_done INTEGER NOT NULL,
    samples_done INTEGER NOT NULL,
    bytes_stored INTEGER NOT NULL,
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
    )""",
    "CREATE INDEX jobs_owner ON jobs (owner, status)",
    """CREATE TABLE job_segments (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    samples INTEGER NOT NULL,     -- at the job's sample_rate
    bytes INTEGER NOT NULL,       -- of its file
    PRIMARY KEY (job_id, idx)
    )""",
)


class SQLiteVoiceLibrary(VoiceBackend):
    """The voice database under ``data_dir`` (None: in memory, gone with the process).

    Every method is one SQLite statement or transaction, so other processes on the same directory see
    each change as soon as it is committed.
    """

    _STORED_ORDER = "created_at, rowid"

    def __init__(self, data_dir: Path | None, max_voices: int = DEFAULT_MAX_VOICES) -> None:
        super().__init__(max_voices)
        self.path = None if data_dir is None else Path(data_dir).expanduser() / DB_NAME
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

    @property
    def location(self) -> str:
        return str(self.path or "memory")

    def _create_schema(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version < SCHEMA_VERSION:
                # not executescript: it would commit the open transaction
                steps = (_SCHEMA if version == 0 else ()) + (_SCHEMA_V2 if version < 2 else ())
                for statement in steps + (_SCHEMA_V3 if version < 3 else ()):
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

    def _query(self, sql: str, args: tuple = ()) -> builtins.list[tuple]:
        try:
            with self._lock:
                return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise VoiceLibraryError(f"the voice library {self.path} cannot be read: {exc}") from exc

    @contextmanager
    def _transaction(self, failure: str) -> Iterator[sqlite3.Connection]:
        """One write transaction, the write lock taken first (a check and the write after it see the same
        state); rolled back on any error; a database error as VoiceLibraryError saying ``failure``."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
            except sqlite3.Error as exc:
                raise VoiceLibraryError(f"{failure} ({self.path}): {exc}") from exc

    def _job_transaction(self, what: str) -> AbstractContextManager[sqlite3.Connection]:
        return self._transaction(what)  # BEGIN IMMEDIATE: writers are serialised across processes

    def _stored(self, db: sqlite3.Connection, voice_id: str) -> VoiceInfo | None:
        row = db.execute(f"SELECT {self._COLUMNS} FROM voices WHERE key = ?", (voice_key(voice_id),)).fetchone()
        return None if row is None else self._info(row)

    def _insert(self, info: VoiceInfo, blob: bytes) -> None:
        with self._transaction(f"voice '{info.id}' could not be stored") as db:
            existing = self._stored(db, info.id)
            if existing is not None:
                raise self._exists(existing)
            count = db.execute("SELECT COUNT(*) FROM voices").fetchone()[0]
            if count >= self.max_voices:
                raise self._full(count)
            db.execute("INSERT INTO voice_tensors (uid, data) VALUES (?, ?)", (info.uid, blob))
            db.execute(self._insert_row_sql, self._row(info))

    def _delete(self, voice_id: str) -> VoiceInfo:
        with self._transaction(f"voice '{voice_id}' could not be deleted") as db:
            info = self._stored(db, voice_id)
            if info is None:
                raise UnknownSpeaker(f"no stored voice '{voice_id}'", param="voice_id")
            db.execute("DELETE FROM voices WHERE uid = ?", (info.uid,))
            db.execute("DELETE FROM voice_tensors WHERE uid = ?", (info.uid,))
        return info

    def _put_pronunciation(self, stored: StoredPronunciation, key: str) -> bool:
        with self._transaction(f"the pronunciation of {stored.entry.word!r} could not be stored") as db:
            found = db.execute("SELECT 1 FROM pronunciations WHERE scope = ? AND key = ?", (stored.scope, key))
            created = found.fetchone() is None
            if created:
                count = db.execute("SELECT COUNT(*) FROM pronunciations WHERE scope = ?", (stored.scope,)).fetchone()[0]
                if count >= self.max_entries:
                    raise self._full_scope(stored, count)
            db.execute(self._upsert_pronunciation_sql, self._pronunciation_row(stored, key))
            db.execute(self._bump_revision_sql)
        return created

    def _delete_pronunciation(self, scope: str, key: str) -> StoredPronunciation | None:
        with self._transaction("the pronunciation could not be deleted") as db:
            row = db.execute(
                f"SELECT {self._PRONUNCIATION_COLUMNS} FROM pronunciations WHERE scope = ? AND key = ?", (scope, key)
            ).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM pronunciations WHERE scope = ? AND key = ?", (scope, key))
            db.execute(self._bump_revision_sql)
        return self._stored_pronunciation(row)

    def _read_tensors(self, info: VoiceInfo) -> bytes | None:
        rows = self._query("SELECT data FROM voice_tensors WHERE uid = ?", (info.uid,))
        return rows[0][0] if rows else None

    def close(self) -> None:
        with self._lock:
            self._db.close()
