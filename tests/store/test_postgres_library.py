"""The PostgreSQL voice library against a real server (started by conftest.py): the same behaviour as the
SQLite library, uniqueness and the cap decided by the database, schema versions and the v1 -> v2
migration, lost connections, a missing psycopg, and the back-end picked by one setting."""

from __future__ import annotations

import io
import json
import os
import pickle
import sys

import psycopg
import pytest
import torch
from helpers import assert_same_voice, load_settings, sample_voice

from cosyserve.engine.voice_library import open_voice_library
from cosyserve.engine.voice_library.postgres import (
    SCHEMA_VERSION,
    PostgresVoiceLibrary,
    migrate,
    redact,
    schema_version,
)
from cosyserve.engine.voices import (
    IncompatibleVoice,
    VoiceExists,
    VoiceInfo,
    VoiceLibrary,
    VoiceLibraryError,
    VoiceLimitReached,
    VoicePrompt,
    VoiceStore,
)
from cosyserve.errors import ModelLoadError, UnknownSpeaker
from cosyserve.settings import Settings, SettingsError

# Slow: end-to-end on the golden models, servers, browsers or databases (the fast tier: -m "not slow").
pytestmark = pytest.mark.slow

BUILTIN = {"中文女": VoicePrompt("cosyvoice2", 25, torch.ones(192))}
V2 = {"family": "cosyvoice2", "token_rate": 25, "model": "CosyVoice2-0.5B"}

voice = sample_voice  # a small voice whose values identify i


def info(voice_id: str, created_at: int = 1) -> VoiceInfo:
    return VoiceInfo(voice_id, "cosyvoice2", 25, "m", created_at=created_at)


def test_round_trip_order_and_reopen(pg_url):
    library = open_voice_library(pg_url, None, 1000)
    assert isinstance(library, PostgresVoiceLibrary)
    store = VoiceStore(BUILTIN, library, **V2)
    for i, name in enumerate(["b voice", "a voice"], start=1):
        stored = store.add(name, voice(i, prompt_text=f"text {i}"), duration=1.5)
        assert (stored.id, stored.ref_text, stored.duration, stored.family) == (name, f"text {i}", 1.5, "cosyvoice2")
    assert store.ids() == ["中文女", "b voice", "a voice"]
    assert_same_voice(store.get("A VOICE"), voice(2, prompt_text="text 2"))
    library.close()

    reopened = VoiceStore(BUILTIN, PostgresVoiceLibrary(pg_url), **V2)
    assert reopened.ids() == ["中文女", "b voice", "a voice"]
    assert_same_voice(reopened.get("b voice"), voice(1, prompt_text="text 1"))
    meta = reopened.info("a voice")
    assert (meta.ref_text, meta.duration, meta.token_rate, meta.builtin) == ("text 2", 1.5, 25, False)
    assert meta.fields == voice(2, prompt_text="x").field_names() and meta.created_at is not None


def test_names_unique_regardless_of_case_and_a_deleted_name_is_free(pg_url):
    store = VoiceStore(BUILTIN, PostgresVoiceLibrary(pg_url), **V2)
    store.add("Alice", voice(1))
    for taken in ("Alice", "ALICE", "alice"):
        with pytest.raises(VoiceExists, match="'Alice' already exists"):
            store.add(taken, voice(2))
    store.add("Straße", voice(5))
    with pytest.raises(VoiceExists, match="'Straße'"):
        store.add("STRASSE", voice(6))  # Unicode case folding, as in the SQLite library
    assert store.remove("ALICE").id == "Alice"
    with pytest.raises(UnknownSpeaker):
        store.remove("Alice")
    store.add("alice", voice(3))  # the name is free again, and no stale cache answers for it
    assert_same_voice(store.get("alice"), voice(3))


def test_uniqueness_is_the_databases_not_a_check_before_insert(pg_url, monkeypatch):
    library = PostgresVoiceLibrary(pg_url)
    library.add(info("Bob"), voice(1))
    # A create that saw no "Bob" (what a peer racing it would see) is still refused, by the constraint.
    monkeypatch.setattr(library, "find", lambda voice_id: None)
    monkeypatch.setattr(library, "count", lambda: 0)
    library.check_room("BOB")
    with pytest.raises(VoiceExists, match="'Bob'"):
        library.add(info("BOB"), voice(2))
    with psycopg.connect(pg_url) as conn, pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(
            "INSERT INTO cosyserve_voices (uid, key, id, family, token_rate, model, created_at, fields) "
            "VALUES ('x', 'bob', 'bOb', 'f', 25, 'm', 1, '[]')"
        )


def test_cap_counts_every_family_and_holds_inside_the_transaction(pg_url, monkeypatch):
    library = PostgresVoiceLibrary(pg_url, max_voices=2)
    VoiceStore({}, library, family="cosyvoice1", token_rate=50).add("v1 voice", voice(1, "cosyvoice1", 50))
    store = VoiceStore({}, library, **V2)
    store.add("v2 voice", voice(2))
    with pytest.raises(VoiceLimitReached, match="2 of 2"):
        store.add("third", voice(3))
    monkeypatch.setattr(library, "count", lambda: 0)  # the early check passes; the transaction's count refuses
    with pytest.raises(VoiceLimitReached, match="2 of 2"):
        library.add(info("third"), voice(3))
    monkeypatch.undo()
    assert [v.id for v in library.list()] == ["v1 voice", "v2 voice"]
    store.remove("v1 voice")
    store.add("third", voice(3))
    assert store.ids() == ["v2 voice", "third"]


def test_voice_of_another_family_is_refused(pg_url):
    library = PostgresVoiceLibrary(pg_url)
    VoiceStore({}, library, **V2).add("v2 voice", voice(1))
    other = VoiceStore({}, library, family="cosyvoice1", token_rate=50, model="Other")
    assert other.ids() == [] and "v2 voice" in other
    with pytest.raises(IncompatibleVoice, match="cosyvoice2"):
        other.get("v2 voice")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_stored_bytes_never_run_code(pg_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = VoiceStore({}, PostgresVoiceLibrary(pg_url), **V2)
    store.add("x", voice(1))
    evil = io.BytesIO()
    torch.save({"prompt_speech_feat": _Exploit()}, evil, pickle_module=pickle)
    with psycopg.connect(pg_url) as conn:
        conn.execute("UPDATE cosyserve_voice_tensors SET data = %s", (evil.getvalue(),))
    fresh = VoiceStore({}, PostgresVoiceLibrary(pg_url), **V2)
    with pytest.raises(VoiceLibraryError, match="cannot be read"):
        fresh.get("x")
    assert not (tmp_path / "pwned").exists()


def _v1_library(url: str, names: list[str]) -> None:
    """A database as cosyserve's schema 1 left it, holding ``names``."""
    with psycopg.connect(url, autocommit=True) as conn:
        assert migrate(conn, target=1) == 0
        assert schema_version(conn) == 1
        for i, name in enumerate(names):
            # Voices as cosyserve stored them then: torch.save of the reference's field dict, the
            # transcript in the row.
            fields = voice(i, prompt_text=f"text {i}").as_fields()
            data = io.BytesIO()
            torch.save(fields, data)
            conn.execute(
                "INSERT INTO cosyserve_voices (uid, id, family, token_rate, model, ref_text, created_at, fields) "
                "VALUES (%s, %s, 'cosyvoice2', 25, 'm', %s, %s, %s)",
                (f"uid{i}", name, f"text {i}", 100 + i, json.dumps(list(fields))),
            )
            tensors = (f"uid{i}", data.getvalue())
            conn.execute("INSERT INTO cosyserve_voice_tensors (uid, data) VALUES (%s, %s)", tensors)


def test_migration_from_v1(pg_url):
    _v1_library(pg_url, ["Straße", "Alice"])
    store = VoiceStore({}, PostgresVoiceLibrary(pg_url), **V2)  # opening upgrades
    with psycopg.connect(pg_url) as conn:
        assert schema_version(conn) == SCHEMA_VERSION == 4
        assert conn.execute("SELECT to_regclass('cosyserve_voices_lower_id')").fetchone()[0] is None
    assert store.ids() == ["Straße", "Alice"]
    # Found by its case-folded key, which v1 did not have; the stored tensors and transcript come back whole.
    assert_same_voice(store.get("STRASSE"), voice(0, prompt_text="text 0"))
    assert_same_voice(store.get("alice"), voice(1, prompt_text="text 1"))
    assert store.usable_info("alice").has_transcript
    with pytest.raises(VoiceExists):
        store.add("strasse", voice(2))
    store.add("new", voice(3))
    assert PostgresVoiceLibrary(pg_url).count() == 3  # a second open finds the current schema: nothing to do


def test_migration_that_would_merge_two_voices_changes_nothing(pg_url):
    _v1_library(pg_url, ["Straße", "STRASSE"])  # distinct under lower(), one name under case folding
    with pytest.raises(ModelLoadError, match="'Straße' and 'STRASSE'"):
        PostgresVoiceLibrary(pg_url)
    with psycopg.connect(pg_url) as conn:
        assert schema_version(conn) == 1
        columns = conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'cosyserve_voices'"
        ).fetchall()
        assert ("key",) not in columns  # the failed step was rolled back whole


def test_newer_schema_is_refused(pg_url):
    PostgresVoiceLibrary(pg_url).close()
    with psycopg.connect(pg_url) as conn:
        conn.execute("UPDATE cosyserve_voice_schema SET version = 99")
    with pytest.raises(ModelLoadError, match="newer cosyserve"):
        PostgresVoiceLibrary(pg_url)


def test_unreachable_database_fails_to_open_without_showing_the_password(postgres_server):
    url = postgres_server.url("postgres").replace(str(postgres_server.port), "1")
    with pytest.raises(ModelLoadError, match="cannot open the voice library") as err:
        PostgresVoiceLibrary(url)
    assert postgres_server.password not in str(err.value) and "***" in str(err.value)
    wrong = postgres_server.url().replace(postgres_server.password, "wrong")
    with pytest.raises(ModelLoadError, match="password authentication failed"):
        PostgresVoiceLibrary(wrong)
    assert redact("postgresql://u:secret@h/db?password=x&sslmode=require") == (
        "postgresql://u:***@h/db?password=***&sslmode=require"
    )


def _terminate_cosyserve_sessions(url: str) -> list[tuple]:
    """What a database restart does to a server's connection."""
    with psycopg.connect(url, autocommit=True) as admin:
        return admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'cosyserve'"
        ).fetchall()


def test_a_lost_connection_is_reopened(pg_url):
    library = PostgresVoiceLibrary(pg_url)
    library.add(info("kept"), voice(1))
    assert _terminate_cosyserve_sessions(pg_url) == [(True,)]
    assert [v.id for v in library.list()] == ["kept"]  # the read reconnects
    library.add(info("after"), voice(2))
    assert library.count() == 2
    _terminate_cosyserve_sessions(pg_url)
    library.add(info("first after"), voice(3))  # a write reconnects too: nothing was sent on the dead one
    assert [v.id for v in library.list()] == ["kept", "after", "first after"]


def test_missing_psycopg_names_the_extra(pg_url, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # what an install without the extra sees
    with pytest.raises(ModelLoadError, match=r"pip install 'cosyserve\[postgres\]'"):
        open_voice_library(pg_url, None, 10)


def test_one_setting_picks_the_back_end(tmp_path, pg_url):
    assert Settings().voice_store == ""
    assert isinstance(open_voice_library("", tmp_path, 5), VoiceLibrary)
    settings = load_settings([], {"COSYSERVE_VOICE_STORE": pg_url})
    assert settings.voice_store == pg_url
    assert isinstance(open_voice_library(settings.voice_store, tmp_path, 5), PostgresVoiceLibrary)
    assert load_settings(["--voice_store", "postgres://h/db"]).voice_store == "postgres://h/db"
    with pytest.raises(SettingsError, match=r"must be a postgresql:// URL, not mysql://\.\.\.") as err:
        load_settings(["--voice-store", "mysql://u:hunter2@h/db"])
    assert "hunter2" not in str(err.value)
