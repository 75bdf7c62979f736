"""The jobs table of the voice library on both back-ends (SQLite under a directory, a real PostgreSQL
server started by conftest.py): create with the per-owner limits counted in the transaction, segments
recorded in order only while running, status moves, delete; concurrent creates at the cap (threads for
SQLite, two libraries / connections for PostgreSQL); the rows survive reopening the library."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from cosyserve.engine.voice_library.base import JobLimits, JobRecord, VoiceBackend
from cosyserve.engine.voice_library.postgres import PostgresVoiceLibrary
from cosyserve.engine.voice_library.sqlite import SQLiteVoiceLibrary
from cosyserve.errors import InsufficientStorage, JobLimitReached

pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", "postgres"])
def opener(request, tmp_path):
    if request.param == "sqlite":
        return lambda: SQLiteVoiceLibrary(tmp_path)
    url = request.getfixturevalue("pg_url")
    return lambda: PostgresVoiceLibrary(url)


def _job(job_id: str, owner: str = "k1", segments: tuple[str, ...] = ("一。", "二。", "三。")) -> JobRecord:
    body = json.dumps({"voice": "中文女", "response_format": "pcm"}, ensure_ascii=False)
    return JobRecord(job_id, owner, "tts-1", body, segments, 7, 24000, "node-a", created_at=float(len(job_id)))


def test_job_round_trip_and_limits(opener):
    store: VoiceBackend = opener()
    limits = JobLimits(max_active=2, max_bytes=1000)
    store.create_job(_job("a"), limits)
    store.create_job(_job("bb"), limits)
    with pytest.raises(JobLimitReached):
        store.create_job(_job("ccc"), limits)
    store.create_job(_job("ccc", owner="k2"), limits)  # another owner has its own count
    assert [j.id for j in store.jobs("k1")] == ["a", "bb"] and store.job("a", "k2") is None

    assert not store.record_job_segment("a", 0, 10, 40)  # only a running job records segments
    assert store.set_job_status("a", "running", at=5.0)
    assert not store.record_job_segment("a", 1, 10, 40)  # in order only
    assert store.record_job_segment("a", 0, 100, 400) and store.record_job_segment("a", 1, 150, 600)
    job = store.job("a", "k1")
    assert job is not None and (job.status, job.segments_done, job.samples_done, job.bytes_stored) == (
        "running",
        2,
        250,
        1000,
    )
    assert job.segments == ("一。", "二。", "三。") and job.started_at == 5.0 and job.chars_total == 6
    assert store.job_segments("a") == [(100, 400), (150, 600)] and store.job_stored_bytes("k1") == 1000
    assert store.set_job_status("a", "cancelled", at=9.0)
    assert not store.record_job_segment("a", 2, 10, 40)  # cancelled: nothing more is recorded
    assert not store.set_job_status("a", "completed")  # a final status stays

    # The owner's stored bytes reached the limit: 507 even with a free job slot.
    with pytest.raises(InsufficientStorage):
        store.create_job(_job("dddd"), limits)
    removed = store.delete_job("a")
    assert removed is not None and removed.id == "a" and store.job_segments("a") == []
    assert store.delete_job("a") is None
    store.create_job(_job("dddd"), limits)
    store.close()

    reopened = opener()  # every write was committed
    assert [j.id for j in reopened.jobs("k1")] == ["bb", "dddd"]
    assert [j.id for j in reopened.jobs(statuses=("queued",), node="node-a")] == ["bb", "ccc", "dddd"]
    reopened.close()


def test_concurrent_creates_hold_the_cap(opener):
    stores = [opener() for _ in range(2)]
    limits = JobLimits(max_active=3, max_bytes=10**9)

    def create(i: int) -> bool:
        try:
            stores[i % 2].create_job(_job(f"job{i:02d}"), limits)
            return True
        except JobLimitReached:
            return False

    with ThreadPoolExecutor(8) as pool:
        created = sum(pool.map(create, range(16)))
    assert created == 3 and len(stores[0].jobs("k1")) == 3
    for store in stores:
        store.close()
