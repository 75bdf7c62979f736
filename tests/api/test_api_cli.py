"""``cosyserve client`` / ``serve`` argument handling, error lines and exit codes (no model needed)."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import types
import wave
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from cosyserve import cli
from cosyserve.settings import Settings

# Slow: end-to-end on the golden models, servers, browsers or databases (the fast tier: -m "not slow").
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "runtime" / "python" / "fastapi" / "client.py"
SERVER = REPO / "runtime" / "python" / "fastapi" / "server.py"


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200
    body = b""
    seen: ClassVar[list[tuple[str, str, bytes]]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        type(self).seen.append((self.command, self.path, self.rfile.read(length)))
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_server():
    """A plain HTTP server answering every request with the class attributes of a handler subclass."""
    handler = type("H", (_Handler,), {"seen": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield handler, httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_wav(path: Path) -> tuple[np.ndarray, int, int]:
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2"), w.getframerate(), w.getnchannels()


def test_client_writes_raw_pcm_at_the_given_rate(fake_server, tmp_path, capsys):
    handler, port = fake_server
    pcm = (np.arange(-500, 501, dtype="<i2") * 30).astype("<i2")
    handler.body = pcm.tobytes()  # like the official server: no header, no rate
    out = tmp_path / "out.wav"
    args = ["client", "--port", str(port), "--mode", "sft", "--tts_wav", str(out), "--format", "pcm"]
    assert cli.main(args) == 1
    assert "--sample_rate" in capsys.readouterr().err
    assert not out.exists()
    assert cli.main([*args, "--sample_rate", "24000"]) == 0
    samples, rate, channels = read_wav(out)
    assert (rate, channels) == (24000, 1)
    np.testing.assert_array_equal(samples, pcm)
    method, path, body = handler.seen[-1]
    assert (method, path) == ("POST", "/inference_sft")
    assert b'name="spk_id"' in body and "中文女".encode() in body


def test_client_uses_the_wav_header_rate(fake_server, tmp_path):
    from cosyserve.audio.encode import wav_header

    handler, port = fake_server
    pcm = np.arange(100, dtype="<i2")
    handler.body = wav_header(16000, 1, None) + pcm.tobytes()
    out = tmp_path / "x.wav"
    assert cli.main(["client", "--port", str(port), "--tts_wav", str(out), "--method", "GET"]) == 0
    samples, rate, _ = read_wav(out)
    assert rate == 16000
    np.testing.assert_array_equal(samples, pcm)
    assert handler.seen[-1][0] == "GET"


def test_client_http_error_is_one_line(fake_server, tmp_path, capsys):
    handler, port = fake_server
    handler.status = 404
    handler.body = json.dumps(
        {"error": {"message": "unknown speaker 'x'; known speakers: a, b", "type": "t", "param": "spk_id", "code": "c"}}
    ).encode()
    assert cli.main(["client", "--port", str(port), "--tts_wav", str(tmp_path / "o.wav")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "404" in err and "known speakers: a, b" in err


def test_client_argument_errors(tmp_path, capsys):
    assert cli.main(["client", "--mode", "zero_shot", "--port", "1"]) == 1
    assert "--prompt_wav is required" in capsys.readouterr().err
    assert cli.main(["client", "--mode", "vc", "--port", "1", "--prompt_wav", "p", "--source_wav", "s"]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert cli.main(["client", "--port", str(free_port())]) == 1
    assert "failed" in capsys.readouterr().err


def test_client_needs_no_torch():
    code = (
        f"import sys, runpy; sys.argv = [{str(CLIENT)!r}, '--port', '1']\n"
        "try: runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit: pass\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'client imported torch/numpy'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_gpu_resolution(monkeypatch, caplog):
    from cosyserve.engine import loading

    torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: False, device_count=lambda: 0))
    monkeypatch.setattr(loading, "torch", torch)
    assert loading.resolve_device(None) == "cpu"
    assert loading.resolve_device(0) == "cpu" and "CUDA is not available" in caplog.text
    assert loading.resolve_device(-1) == "cpu"
    torch.cuda = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 2)
    assert loading.resolve_device(None) == "cuda:0" and loading.resolve_device(1) == "cuda:1"
    with pytest.raises(ValueError, match="out of range"):
        loading.resolve_device(2)
    with pytest.raises(cli.CliError, match="out of range"):  # the server says it in one line
        cli.server_loaders(Settings(model_dir="/nowhere", gpu=2))


def _run_server(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SERVER), *args], capture_output=True, text=True, timeout=120, env=env)


def test_server_port_taken_is_one_line():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _run_server("--host", "127.0.0.1", "--port", str(port), "--model_dir", "/does/not/matter", "--gpu", "-1")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("cosyserve: error: cannot listen on") and str(port) in last


def test_server_bad_model_dir_exits_with_one_line(tmp_path):
    port = free_port()
    proc = _run_server(
        "--host", "127.0.0.1", "--port", str(port), "--model_dir", str(tmp_path / "missing"), "--gpu", "-1"
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("cosyserve: error: cannot load model") and "missing" in last
    assert "Traceback" not in proc.stderr


def test_server_bad_environment_value():
    proc = _run_server(env={**os.environ, "COSYSERVE_PORT": "not-a-port"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cosyserve: error: $COSYSERVE_PORT='not-a-port'")
