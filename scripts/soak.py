#!/usr/bin/env python3
"""Soak a cosyserve server on this machine: N clients for T seconds, then a report.

Starts a server (``--model_dir``) on a free 127.0.0.1 port, or targets a running one (``--url``,
loopback only, with ``--pid`` for its memory). Every client loops over one synthesis request
(``--route official``: GET /inference_sft with query parameters; ``--route openai``: POST
/v1/audio/speech) until the time is up, reading the whole body. The report gives the number of
requests, the errors by status, latency percentiles, the audio produced, and the server's resident
memory at the start, the warm mark (``--warm_mark``, one minute by default), the middle, the end and its
peak, with the growth from the warm mark (after warm-up allocations) to the end, as two samples and as the
medians of the minute after the warm mark and of the last minute (steadier: RSS read at one instant
jumps with the requests in flight then). ``--memory_probe FILE``
starts the server under ``scripts/memory_probe.py`` (tracemalloc and glibc heap statistics per phase).
Standard library only.

    python3 scripts/soak.py --model_dir ../shared/golden/models/v2-tiny --clients 8 --duration 60
    python3 scripts/soak.py --url http://127.0.0.1:50000 --pid 12345 --clients 32 --duration 300 --json out.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any

MAX_CLIENTS = 256
MAX_DURATION_S = 3 * 3600
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
REQUEST_TIMEOUT_S = 120.0
RSS_SAMPLE_S = 1.0
DEFAULT_TEXTS = (
    "Hello, this is a short sentence for the soak test.",
    "你好，这是一段用于长时间压力测试的中文句子。",
    "The meeting is at 10:30 on March 3rd; it costs $45.99.",
)


def rss_mb(pid: int) -> float | None:
    """Resident memory of ``pid`` in MiB (Linux /proc), None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, int]:
    port = free_port()
    launcher = ["-m", "cosyserve.cli"]
    if args.memory_probe:
        probe = Path(__file__).resolve().with_name("memory_probe.py")
        launcher = [str(probe), "--out", args.memory_probe, "--every", str(args.probe_every)]
        launcher += [*(["--no_trace"] if args.no_trace else ["--group", args.probe_group]), "--"]
    command = [
        sys.executable,
        *launcher,
        "serve",
        "--model_dir",
        args.model_dir,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log_level",
        "warning",
        "--max_concurrency",
        str(args.max_concurrency),
        "--max_queue",
        str(max(args.clients, 1)),
        "--data_dir",
        "",  # stored voices in memory only: a soak leaves nothing behind
    ]
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode} before it was ready")
        try:
            if get("127.0.0.1", port, "/health")[0] == 200:
                return server, port
        except OSError:
            pass
        time.sleep(0.2)
    stop_server(server)
    raise SystemExit(f"the server was not ready within {args.start_timeout:g} s")


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)


class Request:
    """One synthesis request of the soak, as (method, path, body, headers)."""

    def __init__(self, route: str, text: str, voice: str, fmt: str) -> None:
        self.route, self.text, self.voice, self.fmt = route, text, voice, fmt

    def parts(self) -> tuple[str, str, bytes | None, dict[str, str]]:
        if self.route == "official":
            query = urllib.parse.urlencode({"tts_text": self.text, "spk_id": self.voice, "format": self.fmt})
            return "GET", f"/inference_sft?{query}", None, {}
        body = json.dumps({"model": "tts-1", "input": self.text, "voice": self.voice, "response_format": self.fmt})
        return "POST", "/v1/audio/speech", body.encode(), {"Content-Type": "application/json"}


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.body_bytes = 0

    def record(self, status: str, latency: float, size: int) -> None:
        with self.lock:
            self.statuses[status] += 1
            if status == "200":
                self.latencies.append(latency)
                self.body_bytes += size


def client_loop(host: str, port: int, requests: list[Request], stop_at: float, stats: Stats, offset: int) -> None:
    i = offset
    while time.monotonic() < stop_at:
        method, path, body, headers = requests[i % len(requests)].parts()
        i += 1
        started = time.monotonic()
        conn = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT_S)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            stats.record(str(resp.status), time.monotonic() - started, len(data))
            if resp.status == 503:
                time.sleep(float(resp.getheader("Retry-After") or 1))
        except (OSError, http.client.HTTPException) as exc:
            stats.record(type(exc).__name__, time.monotonic() - started, 0)
            time.sleep(0.5)
        finally:
            conn.close()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))], 3)


def sample_rss(pid: int | None, stop: threading.Event, samples: list[tuple[float, float]], t0: float) -> None:
    while not stop.is_set():
        if pid is not None and (value := rss_mb(pid)) is not None:
            samples.append((time.monotonic() - t0, round(value, 1)))
        stop.wait(RSS_SAMPLE_S)


def median_rss(samples: list[tuple[float, float]], start: float, end: float) -> float | None:
    """The median of the samples within [start, end): RSS read once a second jumps with the requests in
    flight at that instant, a minute's median does not."""
    window = [v for s, v in samples if start <= s < end]
    return round(statistics.median(window), 1) if window else None


def rss_at(samples: list[tuple[float, float]], t: float) -> float | None:
    before = [v for s, v in samples if s <= t]
    return before[-1] if before else (samples[0][1] if samples else None)


def run(args: argparse.Namespace) -> dict[str, Any]:
    server = None
    if args.url:
        parsed = urllib.parse.urlparse(args.url)
        if parsed.hostname not in LOOPBACK:
            raise SystemExit(f"--url must be a loopback address ({', '.join(sorted(LOOPBACK))}), not {parsed.hostname}")
        host, port, pid = parsed.hostname, parsed.port or 80, args.pid
    else:
        server, port = start_server(args)
        host, pid = "127.0.0.1", server.pid
    try:
        voice = args.voice
        if voice is None:
            status, body = get(host, port, "/speakers")
            speakers = json.loads(body).get("speakers", []) if status == 200 else []
            if not speakers:
                raise SystemExit("the model has no built-in speakers: pass --voice (a stored voice id)")
            voice = speakers[0]
        texts = args.text or list(DEFAULT_TEXTS)
        requests = [Request(args.route, text, voice, args.format) for text in texts]
        stats = Stats()
        samples: list[tuple[float, float]] = []
        stop = threading.Event()
        t0 = time.monotonic()
        sampler = threading.Thread(target=sample_rss, args=(pid, stop, samples, t0), daemon=True)
        sampler.start()
        stop_at = t0 + args.duration
        clients = [
            threading.Thread(target=client_loop, args=(host, port, requests, stop_at, stats, i), daemon=True)
            for i in range(args.clients)
        ]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(args.duration + REQUEST_TIMEOUT_S + 10)
        elapsed = time.monotonic() - t0
        stop.set()
        sampler.join(5)
        if pid is not None and (final := rss_mb(pid)) is not None:
            samples.append((elapsed, round(final, 1)))
    finally:
        if server is not None:
            stop_server(server)

    lat = stats.latencies
    warm_s = args.warm_mark if elapsed > 1.5 * args.warm_mark else elapsed / 4
    warm = rss_at(samples, warm_s)
    warm_median, end_median = median_rss(samples, warm_s, warm_s + 60), median_rss(samples, elapsed - 60, elapsed + 1)
    end = samples[-1][1] if samples else None
    errors = {k: v for k, v in sorted(stats.statuses.items()) if k != "200"}
    return {
        "route": args.route,
        "clients": args.clients,
        "duration_s": round(elapsed, 1),
        "requests": sum(stats.statuses.values()),
        "ok": stats.statuses.get("200", 0),
        "errors_by_status": errors,
        "requests_per_s": round(sum(stats.statuses.values()) / elapsed, 2) if elapsed else None,
        "latency_s": {
            "p50": percentile(lat, 50),
            "p90": percentile(lat, 90),
            "p95": percentile(lat, 95),
            "p99": percentile(lat, 99),
            "max": round(max(lat), 3) if lat else None,
            "mean": round(statistics.fmean(lat), 3) if lat else None,
        },
        "body_mb": round(stats.body_bytes / 2**20, 2),
        "server_rss_mb": {
            "start": samples[0][1] if samples else None,
            "warm_mark": warm,
            "warm_mark_s": round(warm_s, 1),
            "middle": rss_at(samples, elapsed / 2),
            "end": end,
            "peak": max((v for _, v in samples), default=None),
            "growth_warm_to_end_pct": round(100 * (end - warm) / warm, 2) if end is not None and warm else None,
            # The same from the minute after the warm mark to the last minute, each by its median.
            "warm_minute_median": warm_median,
            "last_minute_median": end_median,
            "growth_median_pct": round(100 * (end_median - warm_median) / warm_median, 2)
            if warm_median and end_median
            else None,
            # One sample a minute (and the last): where the memory went over time.
            "per_minute": {f"{m}m": rss_at(samples, 60.0 * m) for m in range(int(elapsed // 60) + 1)} | {"end": end},
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--model_dir", help="start a server on 127.0.0.1 with this model (directory or hub id)")
    target.add_argument("--url", help="a running server on this machine, e.g. http://127.0.0.1:50000")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id, for its memory")
    parser.add_argument("--clients", type=int, default=8, help=f"concurrent clients, 1..{MAX_CLIENTS} (default 8)")
    parser.add_argument("--duration", type=float, default=60, help=f"seconds, up to {MAX_DURATION_S} (default 60)")
    parser.add_argument("--route", choices=("official", "openai"), default="official")
    parser.add_argument("--format", default="wav", help="response format (default wav)")
    parser.add_argument("--voice", help="speaker / voice id (default: the first built-in speaker)")
    parser.add_argument("--text", action="append", help="a text to speak (repeatable; default: three mixed texts)")
    parser.add_argument("--max_concurrency", type=int, default=4, help="for a started server (default 4)")
    parser.add_argument("--start_timeout", type=float, default=300, help="seconds to wait for a started server")
    parser.add_argument(
        "--warm_mark", type=float, default=60, help="seconds of warm-up the memory growth is measured from (default 60)"
    )
    parser.add_argument("--memory_probe", help="a started server records its memory per phase in this JSON lines file")
    parser.add_argument("--probe_every", type=float, default=60, help="seconds between memory probes (default 60)")
    parser.add_argument("--no_trace", action="store_true", help="the memory probe without tracemalloc")
    parser.add_argument("--probe_group", default="filename", help="how the probe sums up Python growth")
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= MAX_CLIENTS:
        parser.error(f"--clients must be within 1..{MAX_CLIENTS}")
    if not 0 < args.duration <= MAX_DURATION_S:
        parser.error(f"--duration must be within 0..{MAX_DURATION_S} s")
    report = run(args)
    text = json.dumps(report, indent=2, ensure_ascii=False)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0 if not report["errors_by_status"] else 1


if __name__ == "__main__":
    sys.exit(main())
