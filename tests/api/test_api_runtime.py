"""The guide's workflow with real processes: ``runtime/python/fastapi/server.py`` on a free port, then
``runtime/python/fastapi/client.py`` for every mode the model serves, checking the written files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from golden import golden_root, manifest, model_dir
from resources import missing_mark

# Slow: end-to-end on the golden models, servers, browsers or databases (the fast tier: -m "not slow").
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SERVER = REPO / "runtime" / "python" / "fastapi" / "server.py"
CLIENT = REPO / "runtime" / "python" / "fastapi" / "client.py"
ARG_FIELDS = ("tts_text", "spk_id", "prompt_text", "instruct_text", "prompt_wav", "source_wav")


def mode_of(meta: dict[str, Any]) -> str:
    if "source_wav" in meta:
        return "vc"
    if "instruct_text" in meta:
        return "instruct" if "spk_id" in meta else "instruct2"
    if "spk_id" in meta:
        return "sft"
    return "zero_shot" if "prompt_text" in meta else "cross_lingual"


def inputs_by_mode(model: str) -> dict[str, dict[str, Any]]:
    """Client inputs per mode: the model's own e2e case, else another model's (first one wins)."""
    found: dict[str, dict[str, Any]] = {}
    cases = [e for e in manifest()["entries"] if e["stage"] == "e2e"]
    for entry in sorted(cases, key=lambda e: e["model"] != model):
        found.setdefault(mode_of(entry["meta"]), entry["meta"])
    return found


def _one_model_per_version() -> list[Any]:
    best: dict[str, tuple[int, str]] = {}
    for name, info in manifest()["models"].items():
        n_cases = sum(1 for e in manifest()["entries"] if e["model"] == name and e["stage"] == "e2e")
        best[info["version"]] = max(best.get(info["version"], (-1, "")), (n_cases, name))
    names = sorted(name for _, name in best.values())
    return names or [pytest.param(None, marks=missing_mark("no golden models"))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
@pytest.mark.parametrize("model", _one_model_per_version())
def test_server_and_client_scripts(model, tmp_path):
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, str(SERVER), "--port", str(port), "--model_dir", str(model_dir(model)), "--host", "127.0.0.1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # one intra-op thread: steady timing on a shared CI box
    )
    try:
        deadline, health = time.monotonic() + 180, None
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            try:
                status, health = get_json(f"http://127.0.0.1:{port}/health")
            except OSError:
                status = None
            if status == 200:
                break
            assert status in (None, 503), health
            time.sleep(0.2)
        assert health and health["status"] == "ok", "server did not become ready"

        inputs = inputs_by_mode(model)
        for mode in health["modes"]:
            meta = inputs[mode]
            out = tmp_path / f"{mode}.wav"
            args = [sys.executable, str(CLIENT), "--host", "127.0.0.1", "--port", str(port), "--mode", mode]
            for name in ARG_FIELDS:
                if name in meta:
                    value = meta[name]
                    args += [f"--{name}", str(golden_root() / "audio" / value) if name.endswith("_wav") else value]
            proc = subprocess.run(
                [*args, "--tts_wav", str(out), "--seed", "1"], capture_output=True, text=True, timeout=300
            )
            assert proc.returncode == 0, f"{mode}: {proc.stderr}"
            with wave.open(str(out)) as w:
                assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (health["sample_rate"], 1, 2)
                samples = np.frombuffer(w.readframes(w.getnframes()), "<i2")
            assert out.stat().st_size == 44 + 2 * samples.shape[0], "WAV sizes do not match the data"
            assert 0.05 < samples.shape[0] / health["sample_rate"] < 30 and np.abs(samples).max() > 0, mode

        # An HTTP error becomes one readable line and a non-zero exit.
        proc = subprocess.run(
            [
                sys.executable,
                str(CLIENT),
                "--port",
                str(port),
                "--mode",
                "sft",
                "--spk_id",
                "nobody",
                "--tts_wav",
                str(tmp_path / "x.wav"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if "sft" in health["modes"]:
            assert proc.returncode == 1 and "404" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        else:
            assert proc.returncode == 1 and "400" in proc.stderr
    finally:
        server.terminate()
        server.wait(30)
        log.close()
