"""Several OS processes on one PostgreSQL voice library: library workers racing to create the same
names (case-differing too) under a cap, each reading what the other made, and processes killed with
SIGKILL after a create returned and in the middle of one. Then the same through two cosyserve servers
on a tiny model. Each test prints what it measured (run with ``-s`` to see it)."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
import requests
import torch
from golden import REPO, golden_root, manifest, model_dir
from resources import missing

from cosyserve.engine.voice_library.postgres import PostgresVoiceLibrary

# Slow: end-to-end on the golden models, servers, browsers or databases (the fast tier: -m "not slow").
pytestmark = pytest.mark.slow

WORKER = textwrap.dedent(
    """
    import json, sys, time
    from contextlib import contextmanager

    import torch

    from cosyserve.engine.voice_library.postgres import PostgresVoiceLibrary
    from cosyserve.engine.voices import VoiceExists, VoiceInfo, VoiceLimitReached, VoicePrompt

    url, role, max_voices, marker = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    library = PostgresVoiceLibrary(url, max_voices)

    def say(*words):
        print(*words, flush=True)

    def add(name):
        info = VoiceInfo(name, "cosyvoice2", 25, role, created_at=int(time.time()))
        library.add(info, VoicePrompt("cosyvoice2", 25, torch.full((4,), marker)))

    say("ready")
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "race":  # create each name straight in the library: no early check, the database decides
            results = {}
            for name in json.loads(arg):
                try:
                    add(name)
                    results[name] = "created"
                except VoiceExists:
                    results[name] = "exists"
                except VoiceLimitReached:
                    results[name] = "full"
            say(json.dumps(results))
        elif command == "churn":  # create, and at the cap delete own voices: the count crosses the cap often
            created = full = most = 0
            mine = []
            for i in range(int(arg)):
                try:
                    add(f"{role} churn {i}")
                    mine.append(f"{role} churn {i}")
                    created += 1
                    most = max(most, library.count())
                except VoiceLimitReached:
                    full += 1
                    if mine:
                        library.remove(mine.pop(0))
            say(json.dumps({"created": created, "full": full, "most": most}))
        elif command == "read":  # every voice: who made it, and the marker its tensors hold
            say(json.dumps({v.id: [v.model, library.voice(v).embedding[0, 0].item()] for v in library.list()}))
        elif command == "create":
            add(arg)
            say("created", arg)
        elif command == "stall":  # a create that stops inside its transaction, its rows written, uncommitted
            writing = library._writing

            @contextmanager
            def stalled(what):
                with writing(what) as conn:
                    yield conn
                    say("stalled")
                    time.sleep(300)

            library._writing = stalled
            add(arg)
            say("finished")
    """
)
TIMEOUT_S = 60
CHURN = 400  # creates per worker in the churn test
CAP, RACE_NAMES = 42, 30  # 60 creates per worker, 90 distinct names, 40 places


class Worker:
    """A ``python`` process holding its own PostgresVoiceLibrary, driven line by line over stdin."""

    def __init__(self, script: Path, url: str, role: str, *args: object) -> None:
        """``args``: the script's further arguments (here the voice cap and the marker)."""
        self.role = role
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(script), url, role, *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x.strip()) for x in self.proc.stdout], daemon=True).start()

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self) -> str:
        try:
            return self.lines.get(timeout=TIMEOUT_S)
        except queue.Empty:
            self.proc.kill()
            pytest.fail(f"worker {self.role} said nothing for {TIMEOUT_S} s; stderr: {self.proc.stderr.read()}")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(TIMEOUT_S)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT_S)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            pipe.close()


@pytest.fixture
def workers(tmp_path, pg_url):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    started: list[Worker] = []

    def start(role: str, max_voices: int, marker: float) -> Worker:
        worker = Worker(script, pg_url, role, max_voices, marker)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def test_two_processes_race_for_the_same_names_under_a_cap(workers, pg_url):
    a, b = workers("a", CAP, 1.0), workers("b", CAP, 2.0)
    assert (a.expect(), b.expect()) == ("ready", "ready")
    # Each reads what the other made.
    a.send("create from a")
    assert a.expect() == "created from a"
    b.send("create FROM B")
    assert b.expect() == "created FROM B"
    a.send("read")
    b.send("read")
    expected = {"from a": ["a", 1.0], "FROM B": ["b", 2.0]}
    assert json.loads(a.expect()) == json.loads(b.expect()) == expected

    # Both create the same names at once (b in upper case), each with names of its own in between (creates
    # that block no one, so the cap is tested by writers that really overlap), past the cap.
    shared = [f"voice {i}" for i in range(RACE_NAMES)]
    names_a = [n for i, name in enumerate(shared) for n in (name, f"a only {i}")]
    names_b = [n for i, name in enumerate(shared) for n in (name.upper(), f"b only {i}")]
    a.send("race " + json.dumps(names_a))
    b.send("race " + json.dumps(names_b))
    won_a, won_b = json.loads(a.expect()), json.loads(b.expect())
    for name in shared:
        outcomes = (won_a[name], won_b[name.upper()])
        assert outcomes in {("created", "exists"), ("exists", "created"), ("full", "full")}, (name, outcomes)
    created = {n: "a" for n, r in won_a.items() if r == "created"} | {
        n: "b" for n, r in won_b.items() if r == "created"
    }
    assert len(created) == CAP - 2  # the cap holds exactly: no more, and no place lost
    assert {r for r in [*won_a.values(), *won_b.values()]} <= {"created", "exists", "full"}

    expected |= {name: [maker, {"a": 1.0, "b": 2.0}[maker]] for name, maker in created.items()}
    a.send("read")
    b.send("read")
    assert json.loads(a.expect()) == json.loads(b.expect()) == expected
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT key) FROM cosyserve_voices").fetchone() == (CAP, CAP)
    outcomes = [*won_a.values(), *won_b.values()]
    by_a = sum(1 for m in created.values() if m == "a")
    print(
        f"\nrace of 2 processes x {len(names_a)} creates ({RACE_NAMES} names shared in two cases), cap {CAP} "
        f"(2 taken): a created {by_a}, b created {len(created) - by_a}; {outcomes.count('exists')} refused as "
        f"existing (by the unique key), {outcomes.count('full')} refused by the cap"
    )


def test_the_cap_holds_while_two_processes_create_and_delete_at_it(workers, pg_url):
    cap = 4
    a, b = workers("a", cap, 1.0), workers("b", cap, 2.0)
    assert (a.expect(), b.expect()) == ("ready", "ready")
    a.send(f"churn {CHURN}")
    b.send(f"churn {CHURN}")
    churn_a, churn_b = json.loads(a.expect()), json.loads(b.expect())
    # Counted after each create committed: over the cap only if two creates passed the check together.
    assert churn_a["most"] <= cap and churn_b["most"] <= cap, (churn_a, churn_b)
    assert churn_a["full"] > 0 and churn_b["full"] > 0  # both really ran into the cap
    assert PostgresVoiceLibrary(pg_url).count() <= cap
    print(f"\nchurn of 2 processes x {CHURN} creates at cap {cap}: a {churn_a}, b {churn_b}")


def test_a_voice_survives_a_sigkill_after_its_create_returned(workers, pg_url):
    a, b = workers("a", 100, 1.0), workers("b", 100, 2.0)
    assert (a.expect(), b.expect()) == ("ready", "ready")
    a.send("create survivor")
    assert a.expect() == "created survivor"
    a.kill9()
    b.send("read")
    assert json.loads(b.expect()) == {"survivor": ["a", 1.0]}
    library = PostgresVoiceLibrary(pg_url)
    assert torch.equal(library.voice(library.find("SURVIVOR")).embedding, torch.full((1, 4), 1.0))


def test_a_process_killed_inside_a_create_leaves_nothing_and_blocks_no_one(workers, pg_url):
    a, b = workers("a", 100, 1.0), workers("b", 100, 2.0)
    assert (a.expect(), b.expect()) == ("ready", "ready")
    a.send("create committed")
    assert a.expect() == "created committed"
    a.send("stall half written")
    assert a.expect() == "stalled"
    with psycopg.connect(pg_url) as conn:  # a's rows are written, not committed: no one else sees them
        assert conn.execute("SELECT id FROM cosyserve_voices").fetchall() == [("committed",)]
    a.kill9()
    # The database rolled a's transaction back and freed its lock: b takes the name at once.
    b.send("create HALF WRITTEN")
    assert b.expect() == "created HALF WRITTEN"
    b.send("read")
    assert json.loads(b.expect()) == {"committed": ["a", 1.0], "HALF WRITTEN": ["b", 2.0]}


# -- two cosyserve servers ------------------------------------------------------------------------


def _serve(model: str, url: str, log: Path, max_voices: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "cosyserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--model_dir", str(model_dir(model)), "--text_frontend", "none", "--max_voices", str(max_voices)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "COSYSERVE_VOICE_STORE": url}
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"

    deadline = time.monotonic() + 120
    while True:
        assert server.poll() is None, log.read_text()
        try:
            if requests.get(f"{base}/health", timeout=5).status_code == 200:
                return server, base
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, f"the server did not load its model in 120 s: {log.read_text()}"
        time.sleep(0.1)


def _models() -> list[str]:
    names = list(manifest()["models"])
    if not names:
        missing(f"no golden models in {golden_root()}")
    return names


def test_two_servers_share_one_library(tmp_path, pg_url):
    model = "v2-tiny" if "v2-tiny" in _models() else _models()[0]
    prompt = manifest().get("inputs", {}).get("e2e", {}).get("prompt_wav", "zero_shot_prompt")
    prompt_wav = (golden_root() / "audio" / f"{prompt}.wav").read_bytes()
    cap, names = 5, ["Ann", "Ben", "Cat", "Dan", "Eve", "Fay", "Gus"]
    servers = []
    try:
        for role in ("a", "b"):
            servers.append(_serve(model, pg_url, tmp_path / f"{role}.log", cap))
        (proc_a, url_a), (_, url_b) = servers

        def create(base: str, name: str) -> tuple[str, int, str]:
            files = {"audio_sample": ("v.wav", prompt_wav, "audio/wav")}
            response = requests.post(f"{base}/v1/audio/voices", data={"name": name}, files=files, timeout=120)
            code = response.json()["error"]["code"] if response.status_code != 201 else "created"
            return name, response.status_code, code

        jobs = [(url_a, n) for n in names] + [(url_b, n.upper()) for n in names] + [(url_b, n.lower()) for n in names]
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(lambda job: create(*job), jobs))
        created = [name for name, status, _ in results if status == 201]
        refused = {code for _, status, code in results if status != 201}
        assert all(status in (201, 409) for _, status, _ in results), results
        assert refused <= {"voice_exists", "voice_limit_reached"}, results
        assert len(created) == cap and len({n.casefold() for n in created}) == cap, results
        for base in (url_a, url_b):
            listed = {v["id"] for v in requests.get(f"{base}/v1/audio/voices", timeout=30).json()["voices"]}
            stored = {
                i for i in listed if not requests.get(f"{base}/v1/audio/voices/{i}", timeout=30).json()["builtin"]
            }
            assert stored == set(created)

        # A voice created through one server speaks through the other, then survives a SIGKILL of the first.
        requests.delete(f"{url_b}/v1/audio/voices/{created[0]}", timeout=30).raise_for_status()  # a free place
        assert create(url_a, "Shared")[1] == 201
        request = {"tts_text": "今天天气真好。", "spk_id": "shared", "format": "pcm", "seed": "7"}
        through_a = requests.post(f"{url_a}/inference_sft", data=request, timeout=120)
        through_b = requests.post(f"{url_b}/inference_sft", data=request, timeout=120)
        assert through_a.status_code == through_b.status_code == 200 and through_b.content
        assert through_a.content == through_b.content
        requests.delete(f"{url_b}/v1/audio/voices/SHARED", timeout=30).raise_for_status()
        assert create(url_a, "Kept")[1] == 201
        os.kill(proc_a.pid, signal.SIGKILL)
        proc_a.wait(30)
        kept = requests.get(f"{url_b}/v1/audio/voices/kept", timeout=30)
        assert kept.status_code == 200 and kept.json()["id"] == "Kept"
        through_a_count = sum(status == 201 for _, status, _ in results[: len(names)])
        print(
            f"\n2 servers, {len(jobs)} concurrent creates of {len(names)} names (3 spellings), cap {cap}: "
            f"{len(created)} x 201 ({through_a_count} through a), "
            f"{sum(c == 'voice_exists' for _, _, c in results)} x 409 voice_exists, "
            f"{sum(c == 'voice_limit_reached' for _, _, c in results)} x 409 voice_limit_reached"
        )
    finally:
        for proc, _ in servers:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(30)
