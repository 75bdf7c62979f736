"""Long-form jobs against real servers (``python -m cosyserve.cli serve`` subprocesses on 127.0.0.1, the
tiny CosyVoice2 model): the life cycle (progress, the audio as the concatenation of the segments' files, one
caption cue per segment at the exact boundaries, a segment equal to the same text through
``/v1/audio/speech``), per-key scope, server-sent events, every refusal and limit, a kill -9 half way and
the job completed by a restarted server on the same data directory, an interactive stream's first chunk
beside a running job.

``COSYSERVE_LONG_JOB_CHARS=30000`` runs the kill -9 test on a text of that many characters instead (slow:
the random-weight tiny model speaks ~0.1 s of CPU per character on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from golden import REPO, golden_root, manifest, model_dir
from resources import needs

from cosyserve.api.job_runner import SEGMENT_SUFFIX, cut_segments, segment_seed
from cosyserve.audio.encode import to_int16

MODEL = "v2-tiny"
VOICE = "中文女"
KEYS = ("job-key-a", "job-key-b")
SENTENCES = (
    "今天天气真好。",
    "我们一起去公园散步吧。",
    "明天我们去爬山。",
    "后天我们去海边看日出。",
    "春天来了，花都开了。",
    "小鸟在树上唱歌。",
    "孩子们在草地上跑来跑去。",
    "晚上我们一起吃饭。",
)
TEXT = "".join(SENTENCES[:6])  # 55 characters: two segments

pytestmark = [pytest.mark.slow, needs(MODEL in manifest()["models"], f"no golden {MODEL} in {golden_root()}")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """One ``cosyserve serve`` subprocess on the tiny model."""

    def __init__(self, data_dir: Path, log: Path, args: list[str] = ()) -> None:  # type: ignore[assignment]
        self.data_dir, self.log, self.args = data_dir, log, list(args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        command = [sys.executable, "-m", "cosyserve.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--model_dir", str(model_dir(MODEL)), "--text_frontend", "none", "--data_dir", str(self.data_dir)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [*command, *self.args], stdout=self.log.open("a"), stderr=subprocess.STDOUT, env=env
        )
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if requests.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def submit(url: str, text: str, key: str | None = None, **fields: Any) -> requests.Response:
    body = {"input": text, "voice": VOICE, "response_format": "pcm", "seed": 11, **fields}
    return requests.post(f"{url}/v1/audio/jobs", json=body, headers=auth(key), timeout=60)


def wait_job(url: str, job_id: str, key: str | None, until: Any, timeout: float = 600) -> list[dict[str, Any]]:
    """Poll the job until ``until(job)``; every state seen."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        job = requests.get(f"{url}/v1/audio/jobs/{job_id}", headers=auth(key), timeout=30).json()
        seen.append(job)
        if until(job):
            return seen
        assert job["status"] in ("queued", "running"), job
        assert time.monotonic() < deadline, job
        time.sleep(0.2)


def segment_files(data_dir: Path, job_id: str) -> list[np.ndarray]:
    files = sorted((data_dir / "jobs" / job_id).glob(f"*{SEGMENT_SUFFIX}"))
    return [np.fromfile(f, dtype="<f4") for f in files]


def srt_cues(text: str) -> list[tuple[int, int, str]]:
    """(start ms, end ms, text) of each SRT cue."""

    def ms(stamp: str) -> int:
        hms, millis = stamp.split(",")
        h, m, s = (int(x) for x in hms.split(":"))
        return ((h * 60 + m) * 60 + s) * 1000 + int(millis)

    cues = []
    for block in text.strip().split("\n\n"):
        _, times, caption = block.split("\n", 2)
        start, end = times.split(" --> ")
        cues.append((ms(start), ms(end), caption))
    return cues


def check_finished_job(url: str, data_dir: Path, job: dict[str, Any], text: str, key: str | None) -> None:
    """The audio is the segments' files concatenated; one caption cue per segment at its boundaries."""
    job_id = job["id"]
    expected = cut_segments(text, 5000)
    assert job["status"] == "completed" and job["progress"]["segments_total"] == len(expected)
    segments = requests.get(f"{url}/v1/audio/jobs/{job_id}/segments", headers=auth(key), timeout=30).json()
    rate = segments["sample_rate"]
    assert [s["text"] for s in segments["segments"]] == expected
    files = segment_files(data_dir, job_id)
    assert len(files) == len(expected)
    bounds, start = [], 0
    for cue, audio in zip(segments["segments"], files, strict=True):
        assert cue["start_sample"] == start and cue["end_sample"] == start + audio.shape[0] > start
        bounds.append((start, cue["end_sample"]))
        start = cue["end_sample"]
    assert job["progress"]["audio_seconds"] == pytest.approx(start / rate, abs=1e-3)

    audio = requests.get(f"{url}/v1/audio/jobs/{job_id}/audio", headers=auth(key), timeout=120)
    assert audio.status_code == 200 and audio.headers["content-type"] == "audio/pcm"
    assert audio.content == to_int16(np.concatenate(files)).tobytes()

    srt = requests.get(f"{url}/v1/audio/jobs/{job_id}/captions.srt", headers=auth(key), timeout=30)
    assert srt.status_code == 200 and srt.headers["content-type"].startswith("application/x-subrip")
    cues = srt_cues(srt.text)
    assert [c[2] for c in cues] == expected
    assert [(c[0], c[1]) for c in cues] == [(round(a * 1000 / rate), round(b * 1000 / rate)) for a, b in bounds]
    vtt = requests.get(f"{url}/v1/audio/jobs/{job_id}/captions.vtt", headers=auth(key), timeout=30)
    assert vtt.text.startswith("WEBVTT\n") and vtt.text.count(" --> ") == len(expected)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("jobs")
    args = [arg for key in KEYS for arg in ("--api_key", key)]
    live = Server(root / "data", root / "server.log", args).start()
    try:
        yield live
    finally:
        live.stop()


def test_job_life_cycle(server):
    url, key, other = server.url, KEYS[0], KEYS[1]
    created = submit(url, TEXT, key)
    assert created.status_code == 202, created.text
    job = created.json()
    assert job["status"] == "queued" and job["id"] and created.headers["Location"] == f"/v1/audio/jobs/{job['id']}"
    assert job["progress"]["segments_total"] == len(cut_segments(TEXT, 5000)) >= 2
    # Another key neither sees nor touches it.
    assert requests.get(f"{url}/v1/audio/jobs/{job['id']}", headers=auth(other), timeout=30).status_code == 404
    assert requests.delete(f"{url}/v1/audio/jobs/{job['id']}", headers=auth(other), timeout=30).status_code == 404
    assert requests.get(f"{url}/v1/audio/jobs", headers=auth(other), timeout=30).json()["data"] == []

    seen = wait_job(url, job["id"], key, lambda j: j["status"] == "completed")
    done = [j["progress"]["segments_done"] for j in seen]
    assert done == sorted(done) and done[-1] == job["progress"]["segments_total"]
    assert seen[-1]["progress"]["percent"] == 100.0 and seen[-1]["finished_at"] >= seen[-1]["started_at"]
    check_finished_job(url, server.data_dir, seen[-1], TEXT, key)
    listed = requests.get(f"{url}/v1/audio/jobs", headers=auth(key), timeout=30).json()["data"]
    assert job["id"] in [j["id"] for j in listed]

    # A segment is the same engine request as its text through /v1/audio/speech with the segment's seed.
    segments = requests.get(f"{url}/v1/audio/jobs/{job['id']}/segments", headers=auth(key), timeout=30).json()
    first = segments["segments"][0]
    speech = requests.post(
        f"{url}/v1/audio/speech",
        json={"input": first["text"], "voice": VOICE, "response_format": "pcm", "seed": segment_seed(11, 0)},
        headers=auth(key),
        timeout=120,
    )
    assert speech.status_code == 200
    assert speech.content == to_int16(segment_files(server.data_dir, job["id"])[0]).tobytes()

    removed = requests.delete(f"{url}/v1/audio/jobs/{job['id']}", headers=auth(key), timeout=30)
    assert removed.status_code == 200 and removed.json()["deleted"] is True
    assert requests.get(f"{url}/v1/audio/jobs/{job['id']}", headers=auth(key), timeout=30).status_code == 404
    assert not (server.data_dir / "jobs" / job["id"]).exists()


def test_job_events_and_cancel(server):
    url, key = server.url, KEYS[0]
    job = submit(url, "".join(SENTENCES[:2]), key).json()
    events = []
    with requests.get(f"{url}/v1/audio/jobs/{job['id']}/events", headers=auth(key), stream=True, timeout=600) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                kind = line[len("event: ") :]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[len("data: ") :])))
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) <= {"progress"} and len(events) >= 2
    percents = [e["progress"]["percent"] for _, e in events]
    assert percents == sorted(percents) and percents[-1] == 100.0 and events[-1][1]["status"] == "completed"

    # Cancel: the job stays, cancelled, with what was done; its events end at once.
    job = submit(url, "".join(SENTENCES), key).json()
    wait_job(url, job["id"], key, lambda j: j["status"] == "running")
    cancelled = requests.post(f"{url}/v1/audio/jobs/{job['id']}/cancel", headers=auth(key), timeout=60).json()
    assert cancelled["status"] == "cancelled"
    time.sleep(1)
    again = requests.get(f"{url}/v1/audio/jobs/{job['id']}", headers=auth(key), timeout=30).json()
    assert again["status"] == "cancelled" and again["progress"] == cancelled["progress"]
    with requests.get(f"{url}/v1/audio/jobs/{job['id']}/events", headers=auth(key), stream=True, timeout=30) as r:
        assert "event: done" in r.text
    requests.delete(f"{url}/v1/audio/jobs/{job['id']}", headers=auth(key), timeout=30).raise_for_status()


def _error(response: requests.Response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]


def test_job_refusals_and_limits(tmp_path):
    data_dir = tmp_path / "data"
    live = Server(data_dir, tmp_path / "server.log", ["--max_jobs_per_key", "1", "--max_job_text_length", "300"])
    try:
        url = live.start().url
        assert _error(submit(url, "  ")) == (400, "invalid_text")
        assert _error(submit(url, "字" * 301)) == (400, "invalid_text")
        assert _error(submit(url, "<speak>你好。</speak>")) == (400, "invalid_text")
        assert _error(submit(url, TEXT, voice="nobody")) == (404, "unknown_speaker")
        assert _error(submit(url, TEXT, response_format="xyz"))[0] == 400
        assert _error(submit(url, TEXT, stream=True)) == (400, "invalid_request")
        assert _error(submit(url, TEXT, model="no-such-model")) == (404, "model_not_found")
        assert _error(submit(url, TEXT, seed=-1)) == (400, "invalid_request")
        assert _error(submit(url, 123))[0] == 400
        assert _error(submit(url, TEXT, speed=10))[0] == 400
        assert _error(submit(url, TEXT, sample_rate=12345))[0] == 400
        assert _error(submit(url, TEXT, pronunciations={"": ""}))[0] == 400
        assert _error(submit(url, TEXT, voice=None, ref_audio="not base64!"))[0] == 400
        bad = requests.post(f"{url}/v1/audio/jobs", data=b"{", timeout=30)
        assert _error(bad) == (400, "malformed_body")
        assert _error(requests.get(f"{url}/v1/audio/jobs/job_nope", timeout=30)) == (404, "job_not_found")
        assert _error(requests.delete(f"{url}/v1/audio/jobs/job_nope", timeout=30)) == (404, "job_not_found")

        # One job queued or running per key: the second is refused until the first ends.
        first = submit(url, TEXT).json()
        assert _error(submit(url, TEXT)) == (429, "job_limit_reached")
        early = requests.get(f"{url}/v1/audio/jobs/{first['id']}/audio", timeout=30)
        if early.status_code != 200:  # before its first segment
            assert _error(early) == (409, "job_not_ready")
        assert _error(requests.get(f"{url}/v1/audio/jobs/{first['id']}/captions.txt", timeout=30))[0] == 404
        wait_job(url, first["id"], None, lambda j: j["status"] == "completed")
    finally:
        live.stop()

    # The same data directory under a storage limit its stored audio already passes: 507 until it is deleted;
    # then a job whose next segment would pass the limit fails with insufficient_storage.
    live = Server(data_dir, tmp_path / "server.log", ["--max_job_storage_mb", "0.05"])
    try:
        url = live.start().url
        assert _error(submit(url, TEXT)) == (507, "insufficient_storage")
        requests.delete(f"{url}/v1/audio/jobs/{first['id']}", timeout=30).raise_for_status()
        second = submit(url, TEXT)
        assert second.status_code == 202
        ended = wait_job(url, second.json()["id"], None, lambda j: j["status"] not in ("queued", "running"))[-1]
        assert ended["status"] == "failed" and ended["error"]["code"] == "insufficient_storage", ended
        assert ended["progress"]["segments_done"] == 0
    finally:
        live.stop()


def _long_text() -> str:
    chars = int(os.environ.get("COSYSERVE_LONG_JOB_CHARS", "0") or 0)
    if not chars:
        return "".join(SENTENCES * 2)  # 152 characters: four segments
    out, i = "", 0
    while len(out) < chars:
        out += SENTENCES[i % len(SENTENCES)]
        i += 1
    return out[:chars]


def test_kill9_half_way_then_a_restarted_server_completes_the_job(tmp_path):
    text = _long_text()
    data_dir = tmp_path / "data"
    first = Server(data_dir, tmp_path / "server.log").start()
    started = time.monotonic()
    try:
        job = submit(first.url, text).json()
        total = job["progress"]["segments_total"]
        assert total >= 4
        half = lambda j: j["progress"]["segments_done"] >= total // 2  # noqa: E731
        seen = wait_job(first.url, job["id"], None, half, timeout=36_000)
        first.kill9()
    finally:
        first.stop()
    killed_at = seen[-1]["progress"]["segments_done"]
    assert 0 < killed_at < total, seen[-1]
    before = segment_files(data_dir, job["id"])[:killed_at]

    second = Server(data_dir, tmp_path / "server.log").start()
    try:
        after = wait_job(second.url, job["id"], None, lambda j: j["status"] == "completed", timeout=36_000)
        done = [j["progress"]["segments_done"] for j in seen + after]
        assert done == sorted(done) and done[-1] == total  # progress only rises, across the restart too
        check_finished_job(second.url, data_dir, after[-1], text, None)
        # The segments recorded before the kill were kept, not synthesised again.
        for kept, now in zip(before, segment_files(data_dir, job["id"]), strict=False):
            assert np.array_equal(kept, now)
        seconds = after[-1]["progress"]["audio_seconds"]
        print(
            f"\njob of {len(text)} characters, {total} segments: killed at {killed_at}, completed after a restart; "
            f"{seconds:.1f} s of audio in {time.monotonic() - started:.1f} s"
        )
    finally:
        second.stop()


def _first_chunk_seconds(url: str, text: str) -> float:
    body = {"input": text, "voice": VOICE, "response_format": "pcm", "stream": True, "seed": 5}
    start = time.perf_counter()
    with requests.post(f"{url}/v1/audio/speech", json=body, stream=True, timeout=120) as r:
        assert r.status_code == 200
        next(r.iter_content(chunk_size=None))
        return time.perf_counter() - start


def _varied_text(sentences: int) -> str:
    """Sentences of 8 to 35 characters drawn from the test sentences' characters (seeded): segments of many
    lengths, as a book has (the engine meets new shapes all along)."""
    rng = np.random.default_rng(3)
    chars = sorted(set("".join(SENTENCES)) - set("。，"))
    return "".join("".join(rng.choice(chars, rng.integers(8, 36))) + "。" for _ in range(sentences))


def test_a_streamed_first_chunk_does_not_wait_behind_a_job(tmp_path):
    """The first chunk of a streamed request beside a running job (once its first segment is done: a cold
    start-up is not measured), against the same on the idle server before and after (medians). The target
    is 1.2x; the test asserts 2x + 50 ms, as this shared 2-core machine is noisy (the figures print)."""
    live = Server(tmp_path / "data", tmp_path / "server.log").start()
    try:
        url, text = live.url, "今天天气真好，我们一起去公园散步吧。"
        _first_chunk_seconds(url, text)  # warm-up
        idle = [_first_chunk_seconds(url, text) for _ in range(5)]
        job = submit(url, _varied_text(150)).json()
        wait_job(url, job["id"], None, lambda j: j["progress"]["segments_done"] >= 1)
        busy = []
        for _ in range(12):
            busy.append(_first_chunk_seconds(url, text))
            time.sleep(0.3)
        state = requests.get(f"{url}/v1/audio/jobs/{job['id']}", timeout=30).json()
        assert state["status"] == "running", "the job must still run while the streams are measured"
        requests.delete(f"{url}/v1/audio/jobs/{job['id']}", timeout=30).raise_for_status()
        idle += [_first_chunk_seconds(url, text) for _ in range(5)]
        idle_s, busy_s = float(np.median(idle)), float(np.median(busy))
        print(
            f"\nfirst chunk: idle median {idle_s * 1000:.0f} ms {[round(x * 1000) for x in idle]}, beside a job "
            f"median {busy_s * 1000:.0f} ms {[round(x * 1000) for x in busy]} ({busy_s / idle_s:.2f}x)"
        )
        assert busy_s <= 2.0 * idle_s + 0.05
    finally:
        live.stop()


def _synth_file(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "cosyserve.cli", "synth-file", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)


def test_synth_file_cli_against_a_server_and_in_process(server, tmp_path):
    book = tmp_path / "book.txt"
    book.write_text(TEXT, encoding="utf-8")
    remote, local = tmp_path / "remote.pcm", tmp_path / "local.pcm"
    voice = ["--voice", VOICE, "--seed", "21"]
    done = _synth_file(str(book), "-o", str(remote), "--url", server.url, "--api_key", KEYS[0], *voice, "--captions")
    assert done.returncode == 0, done.stderr
    assert "100.0%" in done.stderr and "completed" in done.stderr and f"wrote {remote}" in done.stderr
    assert remote.stat().st_size > 0 and not remote.with_name(remote.name + ".part").exists()
    cues = srt_cues(remote.with_suffix(".srt").read_text(encoding="utf-8"))
    assert [c[2] for c in cues] == cut_segments(TEXT, 5000)
    assert cues[-1][1] == round(remote.stat().st_size / 2 * 1000 / 24000)  # the last cue ends with the audio

    # In this process, on its own data directory: the same job gives the same audio.
    args = ["--model_dir", str(model_dir(MODEL)), "--data_dir", str(tmp_path / "own"), "--text_frontend", "none"]
    done = _synth_file(str(book), "-o", str(local), *args, *voice)
    assert done.returncode == 0, done.stderr
    assert local.read_bytes() == remote.read_bytes()

    refused = _synth_file(str(book), "-o", str(tmp_path / "x.pcm"), "--url", server.url)  # no API key
    assert refused.returncode == 1 and "invalid_api_key" in refused.stderr
    assert _synth_file(str(tmp_path / "none.txt"), "-o", str(local), "--url", server.url).returncode == 1
    assert "pass either" in _synth_file(str(book), "-o", str(local)).stderr
    assert "format" in _synth_file(str(book), "-o", str(tmp_path / "x.xyz"), "--url", server.url).stderr
