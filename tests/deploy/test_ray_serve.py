"""cosyserve on a real local Ray cluster: two CPU replicas of the tiny CosyVoice2 model behind one port.

Opt-in (it starts a Ray cluster, ~1-2 minutes): ``COSYSERVE_RAY_TESTS=1`` with ``ray[serve]`` installed
(``pip install 'cosyserve[ray]'``). It checks that requests spread over both replicas, that a voice made
through one replica is used through the other (the replicas share the data_dir's SQLite file:
``--single_node_sqlite``, one machine), that a WebSocket session goes through the gateway, and that a
replica killed under load is replaced while clients see only the requests whose audio had started on it
fail, each as a cut stream (never a 500, never a hang); the others are retried on the other replica or
answered 503 with Retry-After. The counts are printed (``-s`` shows them).
"""

from __future__ import annotations

import collections
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest
import requests
import soundfile as sf
from golden import REPO, golden_root, manifest, model_dir

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(os.environ.get("COSYSERVE_RAY_TESTS") != "1", reason="set COSYSERVE_RAY_TESTS=1 to run"),
]

MODEL = "v2-tiny"
SPEECH = {"input": "Hello from a replica.", "voice": "英文女", "response_format": "pcm", "stream": True}
REQUEST_TIMEOUT = (5, 60)  # a request still open after this counts as a hang


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _speech(url: str, **fields: object) -> tuple[int, str, int]:
    """(status, X-Served-By, audio bytes) of one streamed /v1/audio/speech request; a 503 must say when to
    retry (its X-Served-By is then Retry-After's value)."""
    resp = requests.post(f"{url}/v1/audio/speech", json={**SPEECH, **fields}, timeout=REQUEST_TIMEOUT, stream=True)
    body = b"".join(resp.iter_content(4096))
    if resp.status_code == 503:
        return 503, resp.headers.get("retry-after", ""), len(body)
    retried = " (retried)" if resp.headers.get("x-attempts") else ""
    return resp.status_code, resp.headers.get("x-served-by", "") + retried, len(body)


def _wav(seconds: float = 3.0, rate: int = 16000) -> bytes:
    t = np.arange(round(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 180 * t) + 0.05 * np.random.default_rng(0).standard_normal(t.size)
    out = io.BytesIO()
    sf.write(out, tone.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def _our_ray_pids(temp_dir: str) -> list[int]:
    """Processes of the cluster this test started (their command line names its temp dir)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=False).stdout
    return [int(line.split(None, 1)[0]) for line in out.splitlines() if temp_dir in line]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("ray.serve")
    if MODEL not in manifest()["models"]:
        pytest.skip(f"no {MODEL} in {golden_root()}")
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="cray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    data_dir = tmp_path_factory.mktemp("ray-voices")
    log = (tmp_path_factory.mktemp("ray-log") / "server.log").open("w+")
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "RAY_AUTH_MODE": "disabled",
    }
    command = [
        sys.executable, "-m", "cosyserve.cli", "ray", "--model_dir", str(model_dir(MODEL)),
        "--num_replicas", "2", "--ray_num_cpus", "1", "--single_node_sqlite", "--data_dir", str(data_dir),
        "--host", "127.0.0.1", "--port", str(port), "--threads", "1", "--text_frontend", "none",
        "--ray_temp_dir", temp_dir, "--log_level", "warning",
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        replicas: set[str] = set()
        deadline = time.monotonic() + 240
        while len(replicas) < 2:  # both replicas answer /health 200 (their model is loaded)
            assert proc.poll() is None, f"cosyserve ray exited: {log.seek(0) or log.read()[-3000:]}"
            assert time.monotonic() < deadline, f"replicas not ready: {log.seek(0) or log.read()[-3000:]}"
            try:
                resp = requests.get(f"{url}/health", timeout=5)
                if resp.status_code == 200:
                    replicas.add(resp.headers["x-served-by"])
            except requests.RequestException:
                pass
            time.sleep(0.2)
        print(f"\n[ray] cluster + 2 replicas ready in {time.monotonic() - started:.1f} s")
        yield url
    finally:
        stopping = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait(10)
        time.sleep(2)
        left = _our_ray_pids(temp_dir)
        for pid in left:  # never left behind, even when the test failed
            os.kill(pid, signal.SIGKILL)
        print(f"[ray] stopped in {time.monotonic() - stopping:.1f} s (exit {code}, {len(left)} processes left)")
        log.close()
        assert code == 0 and not left, f"unclean stop: exit {code}, leftover pids {left}"


def test_requests_spread_over_both_replicas(cluster):
    served = collections.Counter()
    for _ in range(20):
        status, by, size = _speech(cluster)
        assert status == 200 and size > 0
        served[by] += 1
    print(f"[ray] requests per replica: {dict(served)}")
    assert len(served) == 2 and min(served.values()) >= 2


def test_voice_made_through_one_replica_is_used_through_the_other(cluster):
    resp = requests.post(
        f"{cluster}/v1/audio/voices",
        data={"name": "ray-shared", "ref_text": "hello there, this is a test"},
        files={"audio_sample": ("v.wav", _wav(), "audio/wav")},
        timeout=REQUEST_TIMEOUT,
    )
    assert resp.status_code == 201, resp.text
    maker = resp.headers["x-served-by"]
    others = collections.Counter()
    for _ in range(30):
        status, by, size = _speech(cluster, voice="ray-shared")
        assert status == 200 and size > 0
        others[by != maker] += 1
        if others[True] >= 2:
            break
    print(f"[ray] voice made by {maker}; used through the other replica {others[True]}x, the same {others[False]}x")
    assert others[True] >= 2


def test_websocket_session_goes_through_the_gateway(cluster):
    from websockets.sync.client import connect

    with connect(cluster.replace("http://", "ws://") + "/v1/audio/speech/stream", open_timeout=30) as ws:
        ws.send(json.dumps({"type": "session.config", "voice": SPEECH["voice"], "response_format": "pcm"}))
        assert json.loads(ws.recv(30))["type"] == "session.ready"
        ws.send(json.dumps({"type": "text", "text": "Hello through the gateway."}))
        ws.send(json.dumps({"type": "close"}))
        audio, last = 0, None
        while last != "session.closed":
            frame = ws.recv(60)
            if isinstance(frame, bytes):
                audio += len(frame)
            else:
                last = json.loads(frame)["type"]
    print(f"[ray] WebSocket session through the gateway: {audio} bytes of audio")
    assert audio > 0


def test_killed_replica_is_replaced_and_only_its_requests_fail(cluster):
    results: list[tuple[float, float, str, str]] = []  # (start, end, outcome, served by)
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            start = time.monotonic()
            try:
                status, by, size = _speech(cluster, input="A longer sentence keeps the replica busy a little while.")
                outcome = "ok" if status == 200 and size > 0 else f"http {status}"
                if status == 503 and by.isdigit():
                    outcome = "busy, retry later"
            except requests.Timeout:
                outcome, by = "hang", ""
            except requests.exceptions.ChunkedEncodingError:  # the body ended without its final chunk
                outcome, by = "cut", ""
            except requests.RequestException as exc:
                outcome, by = f"error {type(exc).__name__}", ""
            results.append((start, time.monotonic(), outcome, by))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(4)
    before = {by.removesuffix(" (retried)") for *_, outcome, by in results if outcome == "ok"}
    victim = sorted(before)[0]
    killed_at = time.monotonic()
    os.kill(int(victim.rsplit("/", 1)[1]), signal.SIGKILL)
    deadline = killed_at + 120
    while time.monotonic() < deadline:  # until a new replica serves requests
        if {
            by.removesuffix(" (retried)") for start, _, outcome, by in results if start > killed_at and outcome == "ok"
        } - before:
            break
        time.sleep(0.5)
    replaced_at = time.monotonic()
    time.sleep(3)
    stop.set()
    for thread in threads:
        thread.join(REQUEST_TIMEOUT[1] + 10)
    failed = [r for r in results if r[2] != "ok"]
    in_flight_at_kill = [r for r in results if r[0] <= killed_at <= r[1]]
    after = collections.Counter(r[3].removesuffix(" (retried)") for r in results if r[0] > killed_at and r[2] == "ok")
    retried = [r for r in results if r[3].endswith(" (retried)")]
    print(
        f"[ray] kill at t={killed_at:.3f}: {len(results)} requests, {len(in_flight_at_kill)} in flight at the kill, "
        f"{len(failed)} failed {collections.Counter(r[2] for r in failed)}; replacement serving "
        f"{replaced_at - killed_at:.1f} s after the kill; ok after the kill per replica: {dict(after)}; "
        f"answered by another replica after the first was lost: {len(retried)}"
    )
    for start, end, outcome, by in sorted(failed):
        print(f"[ray]   failed: started {start - killed_at:+.3f} s, ended {end - killed_at:+.3f} s: {outcome} {by}")
    assert not [r for r in results if r[2] == "hang"], "a request hung"
    # A replica lost before a response started is retried elsewhere or a 503 with Retry-After; one lost
    # midway is a cut stream: never a 500, never anything a client could take for a finished stream.
    assert {r[2] for r in failed} <= {"cut", "busy, retry later"}, failed
    assert set(after) - before, "no new replica took over"
    # Only requests already running when the replica died may fail (at most all of those in flight).
    assert all(r[0] <= killed_at for r in failed), f"requests started after the kill failed: {failed}"
    assert len(failed) <= len(in_flight_at_kill)
