"""Shared helpers of the API tests: a real uvicorn server in a thread, response decoding."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import soundfile as sf
import uvicorn


class LiveServer:
    """``app`` served by uvicorn on a free localhost port, in a background thread."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_for(lambda: self.server.started, 20, "uvicorn start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        self.sock.close()


class ServerPool:
    """Live servers of a module's models, one per (model, settings), started on first use, stopped by
    :meth:`close`. ``engine(name)`` gives the loaded model to serve."""

    def __init__(self, engine: Callable[[str], Any]) -> None:
        self.engine = engine
        self.servers: dict[str, LiveServer] = {}

    def get(self, name: str, **settings: Any) -> LiveServer:
        from cosyserve.api import create_app
        from cosyserve.settings import Settings

        key = name + repr(sorted(settings.items()))
        if key not in self.servers:
            self.servers[key] = LiveServer(create_app(self.engine(name), Settings(**settings))).__enter__()
        return self.servers[key]

    def close(self) -> None:
        for server in self.servers.values():
            server.__exit__(None, None, None)


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def decode_wav(body: bytes) -> tuple[np.ndarray, int]:
    """int16 samples and rate of a WAV body (sizes may be 0xFFFFFFFF)."""
    assert body[:4] == b"RIFF" and body[8:12] == b"WAVE", "not a WAV body"
    samples, rate = sf.read(io.BytesIO(body), dtype="int16")
    return samples, rate


def decode_pcm(body: bytes) -> np.ndarray:
    assert len(body) % 2 == 0, "raw PCM body with an odd number of bytes"
    return np.frombuffer(body, dtype="<i2")


def wav_bytes(seconds: float, rate: int, channels: int = 1, subtype: str = "PCM_16", seed: int = 0) -> bytes:
    """A noise-like test recording."""
    rng = np.random.default_rng(seed)
    n = round(seconds * rate)
    t = np.arange(n) / rate
    tone = 0.3 * np.sin(2 * np.pi * 180 * t) + 0.05 * rng.standard_normal(n)
    data = np.repeat(tone[:, None], channels, axis=1) if channels > 1 else tone
    out = io.BytesIO()
    sf.write(out, data.astype(np.float32), rate, subtype=subtype, format="WAV")
    return out.getvalue()
