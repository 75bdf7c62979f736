"""The pronunciation lexicon on a real PostgreSQL server (started by conftest.py): round trip, replace, the
per-scope cap, a restart (a new library on the database), the schema 2 -> 3 upgrade; OS processes writing
the same words at once (one entry a word), an entry surviving a SIGKILL after its write returned; and two
cosyserve servers on one store: concurrent POSTs of the same words through both leave one entry each, and
an entry survives a SIGKILL of the server that answered its 201."""

from __future__ import annotations

import json
import os
import signal
import textwrap
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
import requests
from golden import manifest
from test_postgres_processes import Worker, _models, _serve

from cosyserve.engine.voice_library.base import StoredPronunciation
from cosyserve.engine.voice_library.postgres import SCHEMA_VERSION, PostgresVoiceLibrary, migrate, schema_version
from cosyserve.errors import PronunciationLimitReached, UnknownPronunciation
from cosyserve.text.pronunciation import GLOBAL_SCOPE, Pronunciation, voice_scope

# Slow: end-to-end on the golden models, servers, browsers or databases (the fast tier: -m "not slow").
pytestmark = pytest.mark.slow

TIMEOUT_S = 60
WORDS = 40


def _stored(word: str, scope: str = GLOBAL_SCOPE, respelling: str | None = None) -> StoredPronunciation:
    return StoredPronunciation(Pronunciation(word, respelling=respelling or word + "!"), scope, None, 1)


def test_round_trip_replace_cap_and_restart(pg_url):
    library = PostgresVoiceLibrary(pg_url)
    assert library.put_pronunciation(_stored("Straße")) is True
    assert library.put_pronunciation(_stored("STRASSE", respelling="street")) is False  # one word under case folding
    assert library.put_pronunciation(StoredPronunciation(Pronunciation("重庆", pinyin="chong2 qing4"), GLOBAL_SCOPE))
    assert library.put_pronunciation(_stored("hello", voice_scope("Ann")))
    library.max_entries = 2
    with pytest.raises(PronunciationLimitReached):
        library.put_pronunciation(_stored("third"))
    assert library.put_pronunciation(_stored("strasse", respelling="road")) is False  # a replacement fits
    library.close()

    restarted = PostgresVoiceLibrary(pg_url)
    found = restarted.pronunciations([GLOBAL_SCOPE, voice_scope("ann")])
    assert [(s.entry.word, s.entry.respelling, s.entry.pinyin) for s in found] == [
        ("strasse", "road", None),
        ("重庆", None, "chong2 qing4"),
        ("hello", "hello!", None),
    ]
    assert [s.entry.word for s in restarted.voice_pronunciations()] == ["hello"]
    assert restarted.remove_pronunciation(GLOBAL_SCOPE, "STRAßE").entry.word == "strasse"
    with pytest.raises(UnknownPronunciation):
        restarted.remove_pronunciation(GLOBAL_SCOPE, "strasse")


def test_schema_2_is_upgraded(pg_url):
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert migrate(conn, target=2) == 0
        assert conn.execute("SELECT to_regclass('cosyserve_pronunciations')").fetchone()[0] is None
    library = PostgresVoiceLibrary(pg_url)
    with psycopg.connect(pg_url) as conn:
        assert schema_version(conn) == SCHEMA_VERSION == 4
    assert library.put_pronunciation(_stored("x"))


WORKER = textwrap.dedent(
    """
    import json, sys, time
    from cosyserve.engine.voice_library.base import StoredPronunciation
    from cosyserve.engine.voice_library.postgres import PostgresVoiceLibrary
    from cosyserve.text.pronunciation import GLOBAL_SCOPE, Pronunciation

    library = PostgresVoiceLibrary(sys.argv[1])
    role = sys.argv[2]
    print("ready", flush=True)
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "race":  # the same words as the other process, each written at once by both
            created = 0
            for word in json.loads(arg):
                entry = Pronunciation(word, respelling=f"{word} by {role}")
                created += library.put_pronunciation(StoredPronunciation(entry, GLOBAL_SCOPE, None, 1))
            print(json.dumps(created), flush=True)
        elif command == "put":
            entry = Pronunciation(arg, pinyin="chong2 qing4", respelling=role)
            library.put_pronunciation(StoredPronunciation(entry, GLOBAL_SCOPE, None, 1))
            print("stored", flush=True)
    """
)


@pytest.fixture
def workers(tmp_path, pg_url):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    started: list[Worker] = []

    def start(role: str) -> Worker:
        started.append(Worker(script, pg_url, role))
        return started[-1]

    yield start
    for worker in started:
        worker.stop()


def test_two_processes_writing_the_same_words_leave_one_entry_each(workers, pg_url):
    a, b = workers("a"), workers("b")
    assert (a.expect(), b.expect()) == ("ready", "ready")
    words = [f"word {i}" for i in range(WORDS)]
    a.send("race " + json.dumps(words))
    b.send("race " + json.dumps([w.upper() for w in words]))
    created = json.loads(a.expect()) + json.loads(b.expect())
    assert created == WORDS  # each word created once, replaced by the other process's write
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT key, respelling FROM cosyserve_pronunciations").fetchall()
    assert len(rows) == len({k for k, _ in rows}) == WORDS
    assert all(r.endswith((" by a", " by b")) for _, r in rows)


def test_an_entry_survives_a_sigkill_after_its_write_returned(workers, pg_url):
    a = workers("a")
    assert a.expect() == "ready"
    a.send("put 重庆")
    assert a.expect() == "stored"
    os.kill(a.proc.pid, signal.SIGKILL)
    a.proc.wait(TIMEOUT_S)
    (found,) = PostgresVoiceLibrary(pg_url).pronunciations([GLOBAL_SCOPE])
    assert found.entry == Pronunciation("重庆", pinyin="chong2 qing4", respelling="a")


def test_two_servers_on_one_store(tmp_path, pg_url):
    model = "v2-tiny" if "v2-tiny" in _models() else _models()[0]
    assert manifest()["models"]
    servers = []
    try:
        for role in ("a", "b"):
            servers.append(_serve(model, pg_url, tmp_path / f"{role}.log", 10))
        (proc_a, url_a), (_, url_b) = servers

        def post(job: tuple[str, str]) -> int:
            base, word = job
            body = {"word": word, "respelling": f"{word} via {base[-5:]}"}
            return requests.post(f"{base}/v1/pronunciations", json=body, timeout=60).status_code

        words = [f"term{i}" for i in range(12)]
        jobs = [(url_a, w) for w in words] + [(url_b, w.upper()) for w in words] + [(url_b, w) for w in words]
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(post, jobs))
        assert set(statuses) <= {200, 201} and statuses.count(201) == len(words), statuses
        with psycopg.connect(pg_url) as conn:
            counted = conn.execute("SELECT count(*), count(DISTINCT key) FROM cosyserve_pronunciations").fetchone()
        assert counted == (len(words), len(words))
        listed = [
            sorted(e["word"].lower() for e in requests.get(f"{base}/v1/pronunciations", timeout=30).json()["data"])
            for base in (url_a, url_b)
        ]
        assert listed[0] == listed[1] == sorted(words)

        # An entry whose 201 came from a survives a SIGKILL of a, and b speaks it.
        created = requests.post(f"{url_a}/v1/pronunciations", json={"word": "kept", "respelling": "k"}, timeout=60)
        assert created.status_code == 201
        os.kill(proc_a.pid, signal.SIGKILL)
        proc_a.wait(30)
        kept = [e for e in requests.get(f"{url_b}/v1/pronunciations", timeout=30).json()["data"] if e["word"] == "kept"]
        assert kept and kept[0]["respelling"] == "k"
    finally:
        for proc, _ in servers:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(30)
