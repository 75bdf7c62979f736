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
from dataclasses import replace

import pytest
import torch
from golden import REPO
from helpers import assert_same_voice, sample_voice

from cosyserve.engine.voices import (
    DB_NAME,
    IncompatibleVoice,
    ReadOnlyVoice,
    VoiceExists,
    VoiceInfo,
    VoiceLibrary,
    VoiceLibraryError,
    VoiceLimitReached,
    VoicePrompt,
    VoiceStore,
    read_spk2info,
    validate_voice_id,
)
from cosyserve.errors import InvalidRequest, ModelLoadError, UnknownSpeaker

BUILTIN = {"中文女": VoicePrompt("cosyvoice2", 25, torch.ones(192))}
V2 = {"family": "cosyvoice2", "token_rate": 25, "model": "CosyVoice2-0.5B"}


def voice(i: int, family: str = "cosyvoice2", token_rate: int = 25) -> VoicePrompt:
    """A small voice whose values identify ``i``, with its transcript."""
    return sample_voice(i, family, token_rate, f"text {i}")


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
        info = store.add(name, voice(i), duration=1.5)
        expected = (name, "cosyvoice2", 25, "CosyVoice2-0.5B", f"text {i}", 1.5)
        assert (info.id, info.family, info.token_rate, info.model, info.ref_text, info.duration) == expected
    assert store.ids() == ["中文女", "b voice", "a voice"]  # built-ins first, then oldest first
    assert_same_voice(store.get("a voice"), voice(2))
    assert store.get("中文女") is BUILTIN["中文女"]
    store.library.close()

    reopened = VoiceStore(BUILTIN, VoiceLibrary(tmp_path), **V2)
    assert reopened.ids() == ["中文女", "b voice", "a voice"]
    assert_same_voice(reopened.get("b voice"), voice(1))
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
    assert_same_voice(store.get("aLiCe"), voice(1))  # lookups ignore case too
    assert store.remove("ALICE").id == "Alice"
    with pytest.raises(UnknownSpeaker):
        store.remove("Alice")
    with pytest.raises(UnknownSpeaker, match="known speakers: 中文女"):
        store.get("Alice")
    store.add("alice", voice(3))  # the name is free again, and no stale cache answers for it
    assert_same_voice(store.get("alice"), voice(3))


def test_cap_counts_every_family(tmp_path):
    library = VoiceLibrary(tmp_path, max_voices=2)
    VoiceStore({}, library, family="cosyvoice1", token_rate=50).add("v1 voice", voice(1, "cosyvoice1", 50))
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
        other.add("V2 Voice", voice(2, family, rate))  # one name, one voice, across families
    other.remove("v2 voice")  # any server may delete it
    assert library.list() == []


def test_stored_builtin_name_is_hidden_by_the_builtin(tmp_path):
    library = VoiceLibrary(tmp_path)
    VoiceStore({}, library, **V2).add("中文女", voice(1))  # stored with a model that has no such speaker
    store = VoiceStore(BUILTIN, library, **V2)
    assert store.ids() == ["中文女"] and store.get("中文女") is BUILTIN["中文女"]


def test_voices_are_read_on_use_and_cached(tmp_path, monkeypatch):
    store = VoiceStore({}, VoiceLibrary(tmp_path), **V2)
    store.add("x", voice(4))
    reads = []
    original = VoiceLibrary._read_tensors
    monkeypatch.setattr(VoiceLibrary, "_read_tensors", lambda self, info: reads.append(info.id) or original(self, info))
    info = store.usable_info("x")  # what choosing a mode needs: no tensors read
    assert info.has_prompt and info.has_transcript and store.ids() == ["x"] and reads == []
    assert_same_voice(store.get("x"), voice(4))
    assert_same_voice(store.get("X"), voice(4))
    assert reads == ["x"]


def test_voices_stored_by_earlier_versions_still_load(tmp_path):
    """Earlier cosyserve stored a voice as torch.save of the reference's field dict, its transcript in
    the row: such a library opens and its voices come back whole, next to new ones."""
    library = VoiceLibrary(tmp_path)
    old = VoiceInfo("old voice", "cosyvoice2", 25, "m", ref_text="text 1", created_at=1, uid="olduid")
    old = replace(old, fields=tuple(voice(1).as_fields()))
    blob = io.BytesIO()
    torch.save(dict(voice(1).as_fields()), blob)  # the earlier format: tensors only
    library._insert(old, blob.getvalue())
    # Stored without ref_text: the five fields of a processed prompt.
    fields = {k: v for k, v in voice(2).as_fields().items() if not k.startswith("prompt_text") and "_len" not in k}
    untranscribed = replace(old, id="no transcript", uid="olduid2", ref_text=None, fields=tuple(fields))
    blob = io.BytesIO()
    torch.save(fields, blob)
    library._insert(untranscribed, blob.getvalue())
    library.close()

    store = VoiceStore({}, VoiceLibrary(tmp_path), **V2)
    store.add("new voice", voice(3))
    assert store.ids() == ["old voice", "no transcript", "new voice"]
    assert_same_voice(store.get("old voice"), voice(1))
    plain = store.get("no transcript")
    assert plain.has_prompt and not plain.has_transcript and plain.prompt_text is None
    assert torch.equal(plain.speech_token, voice(2).speech_token) and torch.equal(plain.embedding, voice(2).embedding)
    assert_same_voice(store.get("new voice"), voice(3))


def test_voice_bytes_round_trip_and_are_checked():
    for original in (voice(5), VoicePrompt("cosyvoice1", 50, torch.ones(1, 192))):
        assert_same_voice(VoicePrompt.from_bytes(original.to_bytes()), original)
    newer = io.BytesIO()
    torch.save({"format": "cosyserve.voice", "version": 99, "family": "x"}, newer)
    with pytest.raises(ValueError, match="newer cosyserve"):
        VoicePrompt.from_bytes(newer.getvalue())
    with pytest.raises(ValueError, match="unreadable"):
        VoicePrompt.from_bytes(b"not a torch file")
    differing = dict(voice(1).as_fields()) | {"flow_embedding": torch.zeros(1, 192)}
    with pytest.raises(ValueError, match="differ"):
        VoicePrompt.from_fields(differing, "cosyvoice2", 25)


def test_spk2info_in_the_reference_layout(tmp_path):
    """Built-in speakers (an embedding) and add_zero_shot_spk voices (every field, ``*_len`` too)."""
    zero_shot = voice(6).as_fields()
    torch.save({"speaker": {"embedding": torch.ones(192)}, "cloned": zero_shot}, tmp_path / "spk2info.pt")
    speakers = read_spk2info(tmp_path / "spk2info.pt", "cosyvoice2", 25)
    assert not speakers["speaker"].has_prompt and speakers["speaker"].embedding.shape == (1, 192)
    assert_same_voice(speakers["cloned"], replace(voice(6), prompt_text=None))
    store = VoiceStore(speakers, None, **V2)
    assert store.info("cloned").has_transcript and not store.info("speaker").has_prompt
    torch.save({"bad": {"speech": torch.ones(3)}}, tmp_path / "bad.pt")
    with pytest.raises(ModelLoadError, match="speaker 'bad'"):
        read_spk2info(tmp_path / "bad.pt", "cosyvoice2", 25)


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
        fresh.get("x")
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

    from cosyserve.engine.voices import VoiceLibrary, VoicePrompt, VoiceStore

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
        big = VoicePrompt("cosyvoice2", 25, torch.ones(1, 192), torch.zeros(1, 1), torch.ones(1, 100_000, 80))
        store.add("half written", big)  # 32 MB
        print("finished", flush=True)
    """
)
VOICE_BODY = (
    'VoicePrompt("cosyvoice2", 25, torch.linspace(-1, 1, 192).reshape(1, -1) * (i + 1), '
    "torch.arange(12, dtype=torch.int32).reshape(1, -1) + i, torch.full((1, 24, 80), float(i)), "
    'f"text {i}", torch.tensor([[7, 8, 9 + i]], dtype=torch.int32))'
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
        assert_same_voice(store.get(f"voice {i}"), voice(i))
    store.add("half written", voice(9))  # the name was never taken, and the store takes writes again
    assert_same_voice(VoiceStore({}, VoiceLibrary(data_dir), **V2).get("half written"), voice(9))
