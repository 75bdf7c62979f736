"""``cosyserve bench --mixed``: how much one request's work delays a stream beside it, through HTTP.

A stream's listener hears silence when two chunks arrive far apart. Three scenarios, each run on an
idle server (127.0.0.1, the OpenAI route, raw PCM), measure the streamed request's largest gap between
two chunks (its first-chunk latency is reported apart):

- ``solo``: the stream alone;
- ``beside_offline``: a non-streamed request of the same length submitted just before it;
- ``zero_shot_admitted``: a zero-shot request with a long prompt (``--long-prompt-seconds``) submitted
  when the stream's first chunk arrives (its frontend, prefill and flow over the prompt frames).

Each later scenario's largest gap is reported as a ratio of the solo one.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soundfile as sf

# Reads of one response closer than this belong to one engine chunk (a chunk may span several reads).
BURST_S = 0.02


@dataclass
class Timeline:
    """When one HTTP response's bytes arrived."""

    started: float
    arrivals: list[float] = field(default_factory=list)
    nbytes: int = 0
    status: int = 0
    error: str = ""

    def bursts(self) -> list[float]:
        """The arrival time of each burst of reads (one engine chunk, roughly)."""
        out: list[float] = []
        previous = float("-inf")
        for t in self.arrivals:
            if t - previous > BURST_S:
                out.append(t)
            previous = t
        return out

    def summary(self) -> dict[str, Any]:
        bursts = self.bursts()
        gaps = np.diff(bursts) if len(bursts) > 1 else np.zeros(0)
        return {
            "status": self.status,
            "error": self.error,
            "bytes": self.nbytes,
            "chunks": len(bursts),
            "first_chunk_s": round(bursts[0] - self.started, 3) if bursts else None,
            "total_s": round(self.arrivals[-1] - self.started, 3) if self.arrivals else None,
            "gap_max_s": round(float(gaps.max()), 3) if gaps.size else 0.0,
            "gap_median_s": round(float(np.median(gaps)), 3) if gaps.size else 0.0,
        }


def _post(port: int, body: dict[str, Any], timeline: Timeline) -> None:
    """POST /v1/audio/speech and note when each read of the response arrives."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    try:
        connection.request("POST", "/v1/audio/speech", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        timeline.status = response.status
        while True:
            data = response.read1(1 << 16)
            if not data:
                break
            timeline.arrivals.append(time.perf_counter())
            timeline.nbytes += len(data)
        if response.status != 200:
            timeline.error = "HTTP error"
    except OSError as exc:
        timeline.error = str(exc)
    finally:
        connection.close()


def _start(port: int, body: dict[str, Any]) -> tuple[Timeline, threading.Thread]:
    timeline = Timeline(time.perf_counter())
    thread = threading.Thread(target=_post, args=(port, body, timeline), daemon=True)
    thread.start()
    return timeline, thread


def long_prompt_wav(seconds: float, sample_rate: int = 16000, seed: int = 0) -> bytes:
    """A voiced-sounding test recording (harmonics with a wandering pitch, plus noise) as WAV bytes."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    wave = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
    wave = 0.2 * wave / np.abs(wave).max() + 0.01 * rng.standard_normal(t.size)
    buffer = io.BytesIO()
    sf.write(buffer, wave.astype(np.float32), sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _serve(engine: Any) -> tuple[int, Any, threading.Thread]:
    import uvicorn

    from cosyserve.api import create_app
    from cosyserve.settings import Settings

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings = Settings(host="127.0.0.1", port=port, model_dir="bench", data_dir="")
    config = uvicorn.Config(create_app(engine, settings), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the bench's HTTP server did not start")
        time.sleep(0.05)
    return port, server, thread


def run_mixed(engine: Any, speaker: str, text: str, prompt_text: str, long_prompt_seconds: float) -> dict[str, Any]:
    """The three scenarios through HTTP on ``engine`` (which fixes every request's length)."""
    port, server, thread = _serve(engine)
    stream = {"model": "tts-1", "input": text, "voice": speaker, "response_format": "pcm", "stream": True}
    offline = {**stream, "stream": False}
    prompt = base64.b64encode(long_prompt_wav(long_prompt_seconds)).decode()
    zero_shot = {**offline, "voice": None, "ref_audio": prompt, "ref_text": prompt_text}
    report: dict[str, Any] = {"long_prompt_seconds": long_prompt_seconds}
    try:
        solo, t = _start(port, stream)
        t.join()
        report["solo"] = {"stream": solo.summary()}

        other, t_other = _start(port, offline)
        time.sleep(0.2)  # the offline request is admitted first
        beside, t = _start(port, stream)
        t.join()
        t_other.join()
        report["beside_offline"] = {"stream": beside.summary(), "offline": other.summary()}

        admitted, t = _start(port, stream)
        while not admitted.arrivals and t.is_alive():
            time.sleep(0.005)
        late, t_late = _start(port, zero_shot)
        t.join()
        t_late.join()
        report["zero_shot_admitted"] = {"stream": admitted.summary(), "zero_shot": late.summary()}
    finally:
        server.should_exit = True
        thread.join(30)
    solo_gap = report["solo"]["stream"]["gap_max_s"] or float("nan")
    for name in ("beside_offline", "zero_shot_admitted"):
        report[name]["gap_max_vs_solo"] = round(report[name]["stream"]["gap_max_s"] / solo_gap, 3)
    return report


def print_mixed(report: dict[str, Any]) -> None:
    print(f"mixed load through HTTP (zero-shot prompt {report['long_prompt_seconds']} s):")
    print("scenario             request     status  chunks  first s  total s  gap max s  gap median s  vs solo")
    for name in ("solo", "beside_offline", "zero_shot_admitted"):
        for role, s in report[name].items():
            if not isinstance(s, dict):
                continue
            ratio = report[name].get("gap_max_vs_solo", 1.0) if role == "stream" else ""
            print(
                f"{name:20s} {role:10s} {s['status']:7d} {s['chunks']:7d} {s['first_chunk_s'] or 0:8.2f} "
                f"{s['total_s'] or 0:8.2f} {s['gap_max_s']:10.2f} {s['gap_median_s']:13.2f}  {ratio}"
            )
