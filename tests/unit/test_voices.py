"""The voice library on its own (no model): ids, persistence, uniqueness, the cap, model-family
checks, safe tensor reading, and a process killed in the middle of a write."""

from __future__ import annotations

import io
import os
import pickle
import queue
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from golden import REPO

from cosyserve.engine.voices import (
    DB_NAME,
    IncompatibleVoice,
    ReadOnlyVoice,
    StoredVoice,
    VoiceExists,
    VoiceLibrary,
    VoiceLibraryError,
    VoiceLimitReached,
    VoiceStore,
    validate_voice_id,
)
from cosyserve.errors import InvalidRequest, ModelLoadError, UnknownSpeaker

BUILTIN = {"中文女": {"embedding": torch.ones(192)}}
V2 = {"family": "cosyvoice2", "token_rate": 25, "model": "CosyVoice2-0.5B"}


def voice(i: int) -> dict[str, torch.Tensor]:
    """A small stored-voice-like entry whose values identify ``i``."""
    return {
        "llm_prompt_speech_token": torch.arange(12, dtype=torch.int32).reshape(1, -1) + i,
        "prompt_speech_feat": torch.full((1, 24, 80), float(i)),
        "flow_embedding": torch.linspace(-1, 1, 192).reshape(1, -1) * i,
        "prompt_text": torch.tensor([[7, 8, 9 + i]], dtype=torch.int32),
    }


def assert_same(actual, expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype and torch.equal(actual[key], tensor), key


@pytest.mark.parametrize("good", ["alice", "Alice Smith", "中文女 2", "my-voice_1.0", "Ünïcode", "a" * 64, "7"])
def test_valid_ids(good):
    assert validate_voice_id(good) == good


@pytest.mark.parametrize(
    "bad", ["", " a", "a ", ".a", "a.", "..", "../x", "a/b", "a\\b", "a\x00b", "a\nb", "a:b", "a" * 65, None, 3]
)
def test_invalid_ids(bad):
    with pytest.raises(InvalidRequest, match="voice id") as err:
        validate_voice_id(bad, param="name")
    assert err.value.param == "name"


def test_round_trip_order_and_reopen(tmp_path):
    store = VoiceStore(BUILTIN, VoiceLibrary(tmp_path), **V2)
    for i, name in enumerate(["b voice", "a voice"], start=1):
        info = store.add(name, voice(i), ref_text=f"text {i}", duration=1.5)
        expected = (name, "cosyvoice2", 25, "CosyVoice2-0.5B", f"text {i}", 1.5)
        assert (info.id, info.family, info.token_rate, info.model, info.ref_text, info.duration) == expected
    assert store.ids() == ["中文女", "b voice", "a voice"]  # built-ins first, then oldest first
    stored = store.get("a voice")
    assert isinstance(stored, StoredVoice)
    assert_same(stored, voice(2))
    assert store.get("中文女") is BUILTIN["中文女"]
    store.library.close()

    reopened = VoiceStore(BUILTIN, VoiceLibrary(tmp_path), **V2)
    assert reopened.ids() == ["中文女", "b voice", "a voice"]
    assert_same(reopened.get("b voice"), voice(1))
    info = reopened.info("a voice")
    assert (info.ref_text, info.duration, info.family, info.token_rate, info.builtin) == (
        "text 2",
        1.5,
        "cosyvoice2",
        25,
        False,
    )
    assert info.created_at is not None and reopened.info("中文女").builtin
    assert (tmp_path / DB_NAME).is_file()


def test_memory_library_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = VoiceStore({}, None, **V2)
    store.add("x", voice(1))
    assert store.ids() == ["x"] and list(tmp_path.iterdir()) == []
    assert VoiceStore({}, None, **V2).ids() == []  # each in-memory library is its own


def test_names_are_unique_regardless_of_case_and_builtins_are_read_only(tmp_path):
    store = VoiceStore(BUILTIN, VoiceLibrary(tmp_path), **V2)
    store.add("Alice", voice(1))
    for taken in ("Alice", "ALICE", "alice"):
        with pytest.raises(VoiceExists, match="'Alice' already exists"):
            store.add(taken, voice(2))
    with pytest.raises(VoiceExists, match="built-in"):
        store.add("中文女", voice(2))
    with pytest.raises(ReadOnlyVoice):
        store.remove("中文女")
    assert_same(store.get("aLiCe"), voice(1))  # lookups ignore case too
    assert store.remove("ALICE").id == "Alice"
    with pytest.raises(UnknownSpeaker):
        store.remove("Alice")
    with pytest.raises(UnknownSpeaker, match="known speakers: 中文女"):
        store.get("Alice")
    store.add("alice", voice(3))  # the name is free again, and no stale cache answers for it
    assert_same(store.get("alice"), voice(3))


def test_cap_counts_every_family(tmp_path):
    library = VoiceLibrary(tmp_path, max_voices=2)
    VoiceStore({}, library, family="cosyvoice1", token_rate=50).add("v1 voice", voice(1))
    store = VoiceStore({}, library, **V2)
    store.add("v2 voice", voice(2))
    with pytest.raises(VoiceLimitReached, match="2 of 2"):
        store.add("third", voice(3))
    with pytest.raises(VoiceLimitReached):
        store.check_new("third")  # the early check (before a voice is computed) agrees
    store.remove("v1 voice")
    store.add("third", voice(3))
    assert store.ids() == ["v2 voice", "third"]


@pytest.mark.parametrize(("family", "rate"), [("cosyvoice1", 25), ("cosyvoice3", 25), ("cosyvoice1", 50)])
def test_voice_of_another_family_or_rate_is_refused(tmp_path, family, rate):
    library = VoiceLibrary(tmp_path)
    VoiceStore({}, library, **V2).add("v2 voice", voice(1))
    other = VoiceStore({}, library, family=family, token_rate=rate, model="OtherModel")
    assert other.ids() == [] and "v2 voice" in other  # known, listed nowhere, refused with a reason
    with pytest.raises(IncompatibleVoice) as err:
        other.get("v2 voice")
    message = str(err.value)
    for part in ("cosyvoice2", "CosyVoice2-0.5B", "25 Hz", family, "OtherModel", f"{rate} Hz"):
        assert part in message
    assert not other.usable(other.info("v2 voice"))
    with pytest.raises(VoiceExists):
        other.add("V2 Voice", voice(2))  # one name, one voice, across families
    other.remove("v2 voice")  # any server may delete it
    assert library.list() == []


def test_stored_builtin_name_is_hidden_by_the_builtin(tmp_path):
    library = VoiceLibrary(tmp_path)
    VoiceStore({}, library, **V2).add("中文女", voice(1))  # stored with a model that has no such speaker
    store = VoiceStore(BUILTIN, library, **V2)
    assert store.ids() == ["中文女"] and store.get("中文女") is BUILTIN["中文女"]


def test_tensors_are_read_lazily_and_cached(tmp_path, monkeypatch):
    store = VoiceStore({}, VoiceLibrary(tmp_path), **V2)
    store.add("x", voice(4))
    reads = []
    original = VoiceLibrary.tensors
    monkeypatch.setattr(VoiceLibrary, "tensors", lambda self, info: reads.append(info.id) or original(self, info))
    stored = store.get("x")
    assert "prompt_text" in stored and "llm_embedding" not in stored and stored.get("llm_embedding") is None
    assert len(stored) == 4 and reads == []
    assert torch.equal(stored["prompt_text"], voice(4)["prompt_text"]) and reads == ["x"]
    stored["flow_embedding"]
    assert reads == ["x"]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_stored_bytes_never_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = VoiceStore({}, VoiceLibrary(tmp_path), **V2)
    store.add("x", voice(1))
    evil = io.BytesIO()
    torch.save({"prompt_text": _Exploit()}, evil, pickle_module=pickle)
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        db.execute("UPDATE voice_tensors SET data = ?", (evil.getvalue(),))
    fresh = VoiceStore({}, VoiceLibrary(tmp_path), **V2)
    with pytest.raises(VoiceLibraryError, match="cannot be read"):
        fresh.get("x")["prompt_text"]
    assert not (tmp_path / "pwned").exists()


def test_unreadable_or_newer_library_fails_to_open(tmp_path):
    VoiceLibrary(tmp_path).close()
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(ModelLoadError, match="newer cosyserve"):
        VoiceLibrary(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ModelLoadError, match="cannot open the voice library"):
        VoiceLibrary(blocker)


# The writer: stores COMMITTED voices, then a large one and, once that voice's uncommitted pages are in
# the write-ahead log (the transaction is half written), stops inside the transaction to be killed.
WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path

    import torch

    from cosyserve.engine.voices import VoiceLibrary, VoiceStore

    def voice(i):
        return {voice_body}

    if __name__ == "__main__":
        data_dir, committed = Path(sys.argv[1]), int(sys.argv[2])
        store = VoiceStore({{}}, VoiceLibrary(data_dir), family="cosyvoice2", token_rate=25, model="m")
        for i in range(committed):
            store.add(f"voice {{i}}", voice(i))
            print("committed", i, flush=True)
        wal = data_dir / "voices.sqlite3-wal"
        before = wal.stat().st_size

        def stall():
            if wal.stat().st_size > before + (4 << 20):
                print("stalled", flush=True)
                time.sleep(300)
            return 0

        store.library._db.set_progress_handler(stall, 1)
        store.add("half written", {{"prompt_speech_feat": torch.ones(1, 100_000, 80)}})  # 32 MB
        print("finished", flush=True)
    """
)
VOICE_BODY = (
    '{"llm_prompt_speech_token": torch.arange(12, dtype=torch.int32).reshape(1, -1) + i, '
    '"prompt_speech_feat": torch.full((1, 24, 80), float(i)), '
    '"flow_embedding": torch.linspace(-1, 1, 192).reshape(1, -1) * i, '
    '"prompt_text": torch.tensor([[7, 8, 9 + i]], dtype=torch.int32)}'
)


def test_process_killed_mid_write_loses_nothing_committed(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(voice_body=VOICE_BODY))
    data_dir = tmp_path / "data"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, str(script), str(data_dir), "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.strip()) for line in proc.stdout], daemon=True).start()
    seen = []
    try:
        while "stalled" not in seen:
            try:
                seen.append(lines.get(timeout=60))
            except queue.Empty:
                pytest.fail(f"the writer never stalled mid-write; output {seen}, stderr {proc.stderr.read()}")
            assert seen[-1] != "finished", "the write was not caught in the middle"
        wal = data_dir / f"{DB_NAME}-wal"
        assert wal.stat().st_size > 4 << 20  # the half-written voice's pages are on disk
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
        proc.stdout.close()
        proc.stderr.close()
    assert seen == ["committed 0", "committed 1", "committed 2", "stalled"]

    library = VoiceLibrary(data_dir)
    assert library._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store = VoiceStore({}, library, **V2 | {"model": "m"})
    assert store.ids() == ["voice 0", "voice 1", "voice 2"]
    for i in range(3):
        assert_same(store.get(f"voice {i}"), voice(i))
    store.add("half written", voice(9))  # the name was never taken, and the store takes writes again
    assert_same(VoiceStore({}, VoiceLibrary(data_dir), **V2).get("half written"), voice(9))
