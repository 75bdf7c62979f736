"""The shared voice library: PostgreSQL through psycopg 3 (``pip install 'cosyserve[postgres]'``), for
several servers or replicas, on one machine or many, that must see the same voices.

How the back-end keeps the library's guarantees when many processes write at once:

- one write, one transaction; a create returns only after PostgreSQL's COMMIT, which returns once the
  commit is flushed to the write-ahead log (``synchronous_commit`` is forced on for the session), so the
  voice survives a crash of any replica and of the database server itself;
- ids are unique regardless of case through a UNIQUE constraint on ``key`` (the id in Unicode NFC,
  case-folded by :func:`voice_key`: the rule the SQLite library uses), and a create inserts with
  ``ON CONFLICT (key) DO NOTHING``: the database decides, there is no check-then-insert window;
- the cap: every create takes one transaction-level advisory lock before it counts the voices, so
  creates are serialised and the count a create sees includes every voice committed before it;
- the schema has a version (table ``cosyserve_voice_schema``) and :func:`migrate` upgrades it step by
  step, under another advisory lock, so replicas starting together migrate once.

The tables are prefixed ``cosyserve_`` and live in the connection's current schema (``search_path``):
the user needs CREATE rights there the first time (the database owner has them).
"""

from __future__ import annotations

import builtins  # the back-ends have a method named list: their annotations name the type through this
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from cosyserve.errors import ModelLoadError, UnknownSpeaker, VoiceLibraryError

from .base import DEFAULT_MAX_VOICES, StoredPronunciation, VoiceBackend, VoiceInfo, voice_key

if TYPE_CHECKING:
    import psycopg

logger = logging.getLogger("cosyserve.voices")

# Advisory lock ids (any bigint; these spell "cosyvoic" + a number) shared by every cosyserve process
# on the database: one for schema migrations, one serialising voice creation (the cap).
MIGRATION_LOCK = 0x636F_7379_766F_6901
CREATE_LOCK = 0x636F_7379_766F_6902
PRONUNCIATION_LOCK = 0x636F_7379_766F_6903  # serialises lexicon writes (the per-scope cap)
JOB_LOCK = 0x636F_7379_766F_6904  # serialises job writes (the per-key limits)
CONNECT_TIMEOUT_S = 10
# A create waits this long for another replica's create before failing (a stuck peer never hangs us).
LOCK_TIMEOUT_MS = 10_000
INSTALL_HINT = "pip install 'cosyserve[postgres]'"

_COLUMNS = VoiceBackend._COLUMNS


def import_psycopg() -> Any:
    """The psycopg module, or ModelLoadError saying which extra installs it."""
    try:
        import psycopg
    except ImportError as exc:
        raise ModelLoadError(
            f"a postgresql:// voice store needs psycopg 3, which is not installed: {INSTALL_HINT}"
        ) from exc
    return psycopg


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (in the user part and in the query)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    query = [(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query, safe="*")))


# -- schema ---------------------------------------------------------------------------------------


def _create_v1(cur: psycopg.Cursor) -> None:
    """The first layout: names unique through an index on ``lower(id)``."""
    cur.execute(
        """CREATE TABLE cosyserve_voices (
        uid text PRIMARY KEY,          -- new for every stored voice, so a reused name never hits a stale cache
        id text NOT NULL,              -- as the user spelled it
        family text NOT NULL,
        token_rate integer NOT NULL,
        model text NOT NULL,
        ref_text text,                 -- NULL: stored without a transcript
        created_at bigint NOT NULL,    -- Unix seconds
        duration double precision,     -- seconds of the recording
        fields jsonb NOT NULL,         -- what the voice holds (its spk2info.pt field names)
        seq bigint GENERATED ALWAYS AS IDENTITY  -- creation order within a second
        )"""
    )
    cur.execute("CREATE UNIQUE INDEX cosyserve_voices_lower_id ON cosyserve_voices (lower(id))")
    cur.execute(
        """CREATE TABLE cosyserve_voice_tensors (
        uid text PRIMARY KEY REFERENCES cosyserve_voices (uid) ON DELETE CASCADE,
        data bytea NOT NULL            -- VoicePrompt.to_bytes (voices stored before it: torch.save of {name: tensor})
        )"""
    )


def _case_folded_keys(cur: psycopg.Cursor) -> None:
    """v1 -> v2: uniqueness by the id case-folded in Python instead of ``lower(id)``.

    ``lower()`` folds by the database's locale (only ASCII under the C locale) and differs from
    Unicode case folding (``Straße`` / ``STRASSE``), so replicas and the SQLite library could disagree
    on which names are the same voice. Two v1 names that now collide stop the migration (nothing is
    changed) with a message naming them: the operator deletes one with the older cosyserve.
    """
    cur.execute("ALTER TABLE cosyserve_voices ADD COLUMN key text")
    cur.execute("SELECT uid, id FROM cosyserve_voices ORDER BY created_at, seq")
    seen: dict[str, str] = {}
    clashes = []
    rows = cur.fetchall()
    for uid, voice_id in rows:
        key = voice_key(voice_id)
        if key in seen:
            clashes.append(f"'{seen[key]}' and '{voice_id}'")
        seen.setdefault(key, voice_id)
        cur.execute("UPDATE cosyserve_voices SET key = %s WHERE uid = %s", (key, uid))
    if clashes:
        raise VoiceLibraryError(
            "cannot upgrade the voice library: these voices become the same name under Unicode case folding: "
            f"{', '.join(clashes)}; delete one of each pair with the cosyserve that stored them"
        )
    cur.execute("ALTER TABLE cosyserve_voices ALTER COLUMN key SET NOT NULL")
    cur.execute("ALTER TABLE cosyserve_voices ADD CONSTRAINT cosyserve_voices_key UNIQUE (key)")
    cur.execute("DROP INDEX cosyserve_voices_lower_id")


def _pronunciations(cur: psycopg.Cursor) -> None:
    """v2 -> v3: the pronunciation lexicon, one row per (scope, case-folded word)."""
    cur.execute(
        """CREATE TABLE cosyserve_pronunciations (
        scope text NOT NULL,           -- global | voice:<voice key> | key:<API key id>
        key text NOT NULL,             -- the word case-folded (voice_key's rule): unique within its scope
        word text NOT NULL,            -- as the user spelled it
        pinyin text,
        cmu text,
        respelling text,
        voice text,                    -- a voice's entry: the voice id as given
        created_at bigint NOT NULL,    -- Unix seconds of the last write
        PRIMARY KEY (scope, key)
        )"""
    )
    cur.execute(
        "CREATE TABLE cosyserve_pronunciation_revision "
        "(one boolean PRIMARY KEY DEFAULT true CHECK (one), revision bigint NOT NULL)"  # + 1 every lexicon write
    )
    cur.execute("INSERT INTO cosyserve_pronunciation_revision (revision) VALUES (0)")


def _jobs(cur: psycopg.Cursor) -> None:
    """v3 -> v4: the long-form jobs (see the SQLite library's schema for what each column holds)."""
    cur.execute(
        """CREATE TABLE cosyserve_jobs (
        id text PRIMARY KEY,
        owner text NOT NULL,
        model text NOT NULL,
        body text NOT NULL,
        segments jsonb NOT NULL,
        seed bigint NOT NULL,
        sample_rate integer NOT NULL,
        node text NOT NULL,
        status text NOT NULL,
        segments_done integer NOT NULL,
        samples_done bigint NOT NULL,
        bytes_stored bigint NOT NULL,
        error text,
        created_at double precision NOT NULL,
        started_at double precision,
        finished_at double precision
        )"""
    )
    cur.execute("CREATE INDEX cosyserve_jobs_owner ON cosyserve_jobs (owner, status)")
    cur.execute(
        """CREATE TABLE cosyserve_job_segments (
        job_id text NOT NULL REFERENCES cosyserve_jobs (id) ON DELETE CASCADE,
        idx integer NOT NULL,
        samples bigint NOT NULL,
        bytes bigint NOT NULL,
        PRIMARY KEY (job_id, idx)
        )"""
    )


# MIGRATIONS[n] upgrades a library at version n to n + 1; version 0 is an empty database.
MIGRATIONS: tuple[Callable[[psycopg.Cursor], None], ...] = (_create_v1, _case_folded_keys, _pronunciations, _jobs)
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn: psycopg.Connection) -> int:
    """The library's schema version in this database (0: none yet)."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('cosyserve_voice_schema') IS NOT NULL")
        exists = cur.fetchone()
        if exists is None or not exists[0]:
            return 0
        cur.execute("SELECT version FROM cosyserve_voice_schema")
        row = cur.fetchone()
    return row[0] if row else 0


def migrate(conn: psycopg.Connection, target: int = SCHEMA_VERSION) -> int:
    """Upgrade the library's tables from whatever version they are at to ``target``, in one
    transaction (all steps or none); returns the version found. Raises VoiceLibraryError for a
    library written by a newer cosyserve."""
    if not 0 < target <= SCHEMA_VERSION:
        raise ValueError(f"target schema {target} is not in 1..{SCHEMA_VERSION}")
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))  # replicas starting together
        cur.execute(
            "CREATE TABLE IF NOT EXISTS cosyserve_voice_schema "
            "(one boolean PRIMARY KEY DEFAULT true CHECK (one), version integer NOT NULL)"
        )
        found = schema_version(conn)
        if found > SCHEMA_VERSION:
            raise VoiceLibraryError(
                f"it was written by a newer cosyserve (schema {found}, this one reads {SCHEMA_VERSION})"
            )
        for version in range(found, target):
            MIGRATIONS[version](cur)
            logger.info("voice library schema upgraded from %d to %d", version, version + 1)
        if target > found:
            cur.execute(
                "INSERT INTO cosyserve_voice_schema (version) VALUES (%s) "
                "ON CONFLICT (one) DO UPDATE SET version = EXCLUDED.version",
                (target,),
            )
    return found


# -- the library ----------------------------------------------------------------------------------


class PostgresVoiceLibrary(VoiceBackend):
    """The voice library in the PostgreSQL database at ``url`` (``postgresql://user:pw@host:port/db``).

    One connection per process, shared by its threads under a lock and reopened when it breaks (a
    database restart costs the requests in flight, not the server).
    """

    _TABLE = "cosyserve_voices"
    _PRONUNCIATIONS = "cosyserve_pronunciations"
    _PRONUNCIATION_REVISION = "cosyserve_pronunciation_revision"
    _STORED_ORDER = "created_at, seq"
    _PARAM = "%s"
    _JOBS = "cosyserve_jobs"
    _JOB_SEGMENTS = "cosyserve_job_segments"

    def __init__(self, url: str, max_voices: int = DEFAULT_MAX_VOICES) -> None:
        super().__init__(max_voices)
        self._psycopg = import_psycopg()
        self._url = url
        self._conn: psycopg.Connection | None = None
        try:
            with self._lock:
                migrate(self._connection())
        except (self._psycopg.Error, VoiceLibraryError) as exc:
            self.close()
            raise ModelLoadError(f"cannot open the voice library {self.location}: {exc}") from exc

    @property
    def location(self) -> str:
        return redact(self._url)

    def _connection(self) -> psycopg.Connection:
        """The open connection (called under ``_lock``), opening a new one if there is none or it broke."""
        if self._conn is not None and not self._conn.closed:
            return self._conn
        psycopg = self._psycopg
        settings = psycopg.conninfo.conninfo_to_dict(self._url)
        extra: dict[str, Any] = {"application_name": settings.get("application_name", "cosyserve")}
        if "connect_timeout" not in settings:
            extra["connect_timeout"] = CONNECT_TIMEOUT_S
        conn = psycopg.connect(self._url, autocommit=True, **extra)
        conn.execute("SET synchronous_commit = on")
        conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
        self._conn = conn
        return conn

    def _live_connection(self) -> psycopg.Connection:
        """The connection, checked with a round trip first and reopened if it was lost: a write is then
        never sent on a connection already known dead (writes are rare, the round trip is cheap)."""
        conn = self._connection()
        try:
            conn.execute("SELECT 1")
            return conn
        except self._psycopg.OperationalError as exc:
            if not conn.closed:
                raise
            logger.warning("voice library connection lost (%s); reconnecting", exc)
            return self._connection()

    def _error(self, what: str, exc: Exception) -> VoiceLibraryError:
        if isinstance(exc, self._psycopg.errors.LockNotAvailable):
            wait = f"{LOCK_TIMEOUT_MS / 1000:g} s"
            return VoiceLibraryError(f"{what}: another server held the voice library's lock for over {wait}")
        return VoiceLibraryError(f"{what} in {self.location}: {exc}")

    @contextmanager
    def _writing(self, what: str) -> Iterator[psycopg.Connection]:
        """One write transaction on the connection. Not retried: after a lost connection the outcome
        of a COMMIT is unknown, so the caller gets the error (a create can be repeated: 409 if it won)."""
        with self._lock:
            try:
                conn = self._live_connection()
                with conn.transaction():
                    yield conn
            except self._psycopg.Error as exc:
                raise self._error(what, exc) from exc

    def _query(self, sql: str, args: tuple = ()) -> builtins.list[tuple]:
        """One read statement; retried once on a new connection if the old one was lost."""
        psycopg = self._psycopg
        for attempt in range(2):
            with self._lock:
                try:
                    return self._connection().execute(sql, args).fetchall()
                except psycopg.Error as exc:
                    lost = isinstance(exc, psycopg.OperationalError) and self._conn is not None and self._conn.closed
                    if attempt or not lost:
                        raise self._error("the voice library cannot be read", exc) from exc
                    logger.warning("voice library connection lost (%s); reconnecting", exc)
        raise AssertionError("unreachable")

    @contextmanager
    def _job_transaction(self, what: str) -> Iterator[psycopg.Connection]:
        with self._writing(what) as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (JOB_LOCK,))  # the per-key counts stay exact
            yield conn

    def _insert(self, info: VoiceInfo, blob: bytes) -> None:
        key = voice_key(info.id)
        with self._writing(f"voice '{info.id}' could not be stored") as conn:
            # Creates queue here, one at a time across every server: the count below then includes
            # every voice committed before this one.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (CREATE_LOCK,))
            inserted = conn.execute(
                self._insert_row_sql + " ON CONFLICT (key) DO NOTHING RETURNING uid",
                self._row(info),
            ).fetchone()
            if inserted is None:
                row = conn.execute(f"SELECT {_COLUMNS} FROM cosyserve_voices WHERE key = %s", (key,)).fetchone()
                if row is None:  # the other voice was deleted since: this insert lost to a delete, not a duplicate
                    raise VoiceLibraryError(f"voice '{info.id}' could not be stored: retry")
                raise self._exists(self._info(row))
            counted = conn.execute("SELECT count(*) FROM cosyserve_voices").fetchone()
            count = counted[0] if counted is not None else 0
            if count > self.max_voices:
                raise self._full(count - 1)  # rolls the insert back
            conn.execute("INSERT INTO cosyserve_voice_tensors (uid, data) VALUES (%s, %s)", (info.uid, blob))

    def _delete(self, voice_id: str) -> VoiceInfo:
        with self._writing(f"voice '{voice_id}' could not be deleted") as conn:
            # The tensors go with the row (ON DELETE CASCADE).
            row = conn.execute(
                f"DELETE FROM cosyserve_voices WHERE key = %s RETURNING {_COLUMNS}", (voice_key(voice_id),)
            ).fetchone()
        if row is None:
            raise UnknownSpeaker(f"no stored voice '{voice_id}'", param="voice_id")
        return self._info(row)

    def _put_pronunciation(self, stored: StoredPronunciation, key: str) -> bool:
        with self._writing(f"the pronunciation of {stored.entry.word!r} could not be stored") as conn:
            # Writes queue here, one at a time across every server: the count below is then exact.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (PRONUNCIATION_LOCK,))
            found = conn.execute(
                "SELECT 1 FROM cosyserve_pronunciations WHERE scope = %s AND key = %s", (stored.scope, key)
            ).fetchone()
            created = found is None
            if created:
                counted = conn.execute(
                    "SELECT count(*) FROM cosyserve_pronunciations WHERE scope = %s", (stored.scope,)
                ).fetchone()
                count = counted[0] if counted is not None else 0
                if count >= self.max_entries:
                    raise self._full_scope(stored, count)
            conn.execute(self._upsert_pronunciation_sql, self._pronunciation_row(stored, key))
            conn.execute(self._bump_revision_sql)
        return created

    def _delete_pronunciation(self, scope: str, key: str) -> StoredPronunciation | None:
        with self._writing("the pronunciation could not be deleted") as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (PRONUNCIATION_LOCK,))
            row = conn.execute(
                f"DELETE FROM cosyserve_pronunciations WHERE scope = %s AND key = %s "
                f"RETURNING {self._PRONUNCIATION_COLUMNS}",
                (scope, key),
            ).fetchone()
            if row is not None:
                conn.execute(self._bump_revision_sql)
        return None if row is None else self._stored_pronunciation(row)

    def _read_tensors(self, info: VoiceInfo) -> bytes | None:
        rows = self._query("SELECT data FROM cosyserve_voice_tensors WHERE uid = %s", (info.uid,))
        return bytes(rows[0][0]) if rows else None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
