"""``cosyserve synth-file book.txt -o book.mp3``: a text file as a long-form job, with a progress bar.

Against a running server (``--url``, ``--api_key`` / ``COSYSERVE_API_KEY``; standard library only), or
in-process (``--model_dir``: a server on 127.0.0.1 in this process, its jobs under ``--data_dir`` so an
interrupted run is resumed by the next one on that directory). The job follows ``/v1/audio/jobs``: the
progress comes from its server-sent events, the file from ``.../audio`` once it completed (written to
``<out>.part`` then renamed); ``--captions`` also writes ``<out>.srt``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, TextIO

FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
BAR_WIDTH = 30


class SynthFileError(Exception):
    """Ends the command with one line on stderr."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text_file", help="UTF-8 text file to speak")
    parser.add_argument("-o", "--output", required=True, help="audio file to write (its suffix picks the format)")
    parser.add_argument("--url", help="a running server, e.g. http://127.0.0.1:50000 (else --model_dir)")
    parser.add_argument(
        "--api_key",
        "--api-key",
        default=(os.environ.get("COSYSERVE_API_KEY", "").split(",")[0].strip() or None),
        help="API key of the server (env COSYSERVE_API_KEY)",
    )
    parser.add_argument("--model_dir", "--model-dir", help="synthesise in this process with this model")
    parser.add_argument("--data_dir", "--data-dir", help="in-process: where the job is kept (default: the server's)")
    parser.add_argument("--text_frontend", "--text-frontend", default="auto", help="in-process: text normaliser")
    parser.add_argument("--model", help="the server's model (default: its default)")
    parser.add_argument("--voice", help="voice (GET /v1/audio/voices)")
    parser.add_argument("--response_format", "--format", choices=FORMATS, help="default: from --output's suffix")
    parser.add_argument("--speed", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--instructions")
    parser.add_argument("--captions", action="store_true", help="also write the SRT captions next to --output")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for one HTTP answer")


class _Http:
    def __init__(self, url: str, api_key: str | None, timeout: float) -> None:
        self.url, self.timeout = url.rstrip("/"), timeout
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def open(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = dict(self.headers) | ({"Content-Type": "application/json"} if data is not None else {})
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as exc:
            raise SynthFileError(_error_line(exc.code, exc.read())) from exc
        except OSError as exc:
            raise SynthFileError(f"cannot reach {self.url}: {exc}") from exc

    def json(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        with self.open(method, path, body) as response:
            return json.loads(response.read())


def _error_line(status: int, body: bytes) -> str:
    try:
        error = json.loads(body)["error"]
        return f"HTTP {status} {error.get('code', '')}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}"


def progress_line(job: dict[str, Any]) -> str:
    p = job["progress"]
    filled = int(BAR_WIDTH * p["percent"] / 100)
    eta = p.get("eta_seconds")
    left = f"  ETA {int(eta) // 60}:{int(eta) % 60:02d}" if eta is not None and job["status"] == "running" else ""
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    done = f"{p['segments_done']}/{p['segments_total']} segments"
    return f"[{bar}] {p['percent']:5.1f}%  {done}  {p['audio_seconds']:.1f} s audio  {job['status']}{left}"


def follow(http: _Http, job_id: str, out: TextIO) -> dict[str, Any]:
    """Print the job's progress from its events until it ends; the last state."""
    job: dict[str, Any] | None = None
    while True:  # the events stream ends with 'done'; a dropped connection is reopened
        try:
            with http.open("GET", f"/v1/audio/jobs/{job_id}/events", timeout=3600) as response:
                for raw in response:
                    line = raw.decode("utf-8").rstrip("\n")
                    if line.startswith("data: "):
                        job = json.loads(line[len("data: ") :])
                        out.write("\r" + progress_line(job))
                        out.flush()
                        if job["status"] not in ("queued", "running"):
                            out.write("\n")
                            return job
        except (SynthFileError, OSError):
            job = http.json("GET", f"/v1/audio/jobs/{job_id}")
            if job["status"] not in ("queued", "running"):
                out.write("\r" + progress_line(job) + "\n")
                return job
            time.sleep(1)


class InProcessServer:
    """A cosyserve server for this command only, on a free 127.0.0.1 port (imports torch)."""

    def __init__(self, args: argparse.Namespace) -> None:
        import uvicorn

        from cosyserve.api import create_app
        from cosyserve.engine.loading import resolve_device
        from cosyserve.engine.pipeline import model_loaders
        from cosyserve.settings import Settings

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        extra = {"data_dir": args.data_dir} if args.data_dir else {}
        settings = Settings(
            host="127.0.0.1", port=port, model_dir=args.model_dir, text_frontend=args.text_frontend, **extra
        )
        spec = settings.models[0]
        device = resolve_device(settings.gpu)
        loaders = model_loaders({spec.name or spec.source: spec.source}, settings.engine_options(), device)
        app = create_app(next(iter(loaders.values())), settings)
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="synth-file-server", daemon=True)

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        deadline = time.monotonic() + 600
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise SynthFileError("the in-process server did not start (see the log above)")
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def run(args: argparse.Namespace, out: TextIO = sys.stderr) -> int:
    try:
        text = Path(args.text_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SynthFileError(f"cannot read {args.text_file}: {exc}") from exc
    output = Path(args.output)
    fmt = args.response_format or output.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        names = ", ".join(FORMATS)
        raise SynthFileError(f"cannot tell the format from {output.name}: pass --response_format ({names})")
    if bool(args.url) == bool(args.model_dir):
        raise SynthFileError("pass either --url (a running server) or --model_dir (synthesise in this process)")
    body: dict[str, Any] = {"input": text, "response_format": fmt}
    for name in ("model", "voice", "speed", "seed", "instructions"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    if args.model_dir:
        with InProcessServer(args) as server:
            return _synthesise(_Http(server.url, None, args.timeout), body, output, args.captions, out)
    return _synthesise(_Http(args.url, args.api_key, args.timeout), body, output, args.captions, out)


def _synthesise(http: _Http, body: dict[str, Any], output: Path, captions: bool, out: TextIO) -> int:
    job = http.json("POST", "/v1/audio/jobs", body)
    out.write(f"job {job['id']}: {job['characters']} characters, {job['progress']['segments_total']} segments\n")
    job = follow(http, job["id"], out)
    if job["status"] != "completed":
        error = job.get("error") or {}
        raise SynthFileError(f"job {job['id']} {job['status']}: {error.get('message', 'no details')}")
    partial = output.with_name(output.name + ".part")
    with http.open("GET", f"/v1/audio/jobs/{job['id']}/audio", timeout=3600) as response, partial.open("wb") as f:
        shutil.copyfileobj(response, f)
    partial.replace(output)
    if captions:
        with http.open("GET", f"/v1/audio/jobs/{job['id']}/captions.srt") as response:
            output.with_suffix(".srt").write_bytes(response.read())
    out.write(f"wrote {output} ({job['progress']['audio_seconds']:.1f} s of audio)\n")
    return 0
