"""The container files hold together (no image can be built here): both Dockerfiles install through
docker/install.sh with the pinned torch, run as a non-root user, keep voices and caches in volumes, expose
the server's port and probe /health with a command that really tells 200 from 503; every COSYSERVE_*
variable they set is one cosyserve reads; the compose file wires the server to its PostgreSQL store."""

from __future__ import annotations

import argparse
import http.server
import json
import os
import re
import subprocess
import sys
import threading

import pytest
import yaml
from golden import REPO

from cosyserve.engine.voice_library import check_voice_store
from cosyserve.settings import ENV_PREFIX, Settings, add_server_arguments

DOCKER = REPO / "docker"
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]
# Variables read outside the server flags (cosyserve/hub.py).
OTHER_ENV = {"COSYSERVE_CACHE_DIR", "COSYSERVE_ASSETS_DIR"}


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / name).read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def known_env() -> set[str]:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser, {})
    return {ENV_PREFIX + a.dest.upper() for a in parser._actions if a.dest != "help"} | OTHER_ENV


def env_names(value: str) -> set[str]:
    return set(re.findall(r"\b(COSYSERVE_[A-Z_]+)=", value))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile(name):
    steps = instructions(name)
    kinds = [kind for kind, _ in steps]
    args = dict(steps[::-1])  # of an instruction given twice, the first
    runs = [a for k, a in steps if k == "RUN"]
    assert any("/docker/install.sh" in r and "TORCH_SPEC" in r for r in runs)
    assert re.search(r"TORCH_SPEC=torch==2\.13\.0\b", " ".join(a for k, a in steps if k == "ARG"))
    user = args["USER"]
    assert user not in ("root", "0") and kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN")
    assert args["EXPOSE"] == str(Settings().port)
    volumes = json.loads(args["VOLUME"])
    env = " ".join(a for k, a in steps if k == "ENV")
    assert env_names(env) <= known_env(), env_names(env) - known_env()
    settings = dict(re.findall(r"\b([A-Z_]+)=(\S+)", env))
    for variable in ("COSYSERVE_DATA_DIR", "HF_HOME", "MODELSCOPE_CACHE", "COSYSERVE_CACHE_DIR"):
        assert any(settings[variable].startswith(v + "/") for v in volumes), variable
    assert settings["COSYSERVE_PORT"] == str(Settings().port)
    assert json.loads(args["ENTRYPOINT"]) == ["cosyserve", "serve"]
    assert "/health" in args["HEALTHCHECK"]


def test_cuda_image_is_an_official_pytorch_image_with_the_pinned_torch():
    base = next(a for k, a in instructions("Dockerfile.cuda") if k == "ARG" and a.startswith("BASE_IMAGE="))
    assert re.fullmatch(r"BASE_IMAGE=pytorch/pytorch:2\.13\.0-cuda[\d.]+-cudnn\d+-runtime", base)


def _healthcheck_command() -> list[str]:
    check = dict(instructions("Dockerfile"))["HEALTHCHECK"]
    assert all(dict(instructions(n))["HEALTHCHECK"] == check for n in DOCKERFILES)
    return json.loads(check.split("CMD", 1)[1])


class _Health(http.server.BaseHTTPRequestHandler):
    status = 503

    def do_GET(self):
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_healthcheck_tells_ready_from_loading():
    command = _healthcheck_command()
    assert command[0] == "python"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "COSYSERVE_PORT": str(server.server_address[1])}
    try:

        def probe() -> int:
            return subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30).returncode

        assert probe() != 0  # 503 while the model loads: unhealthy
        _Health.status = 200
        assert probe() == 0
    finally:
        server.shutdown()
        server.server_close()
    assert probe() != 0  # nothing listening


def test_compose_starts_cosyserve_on_postgresql():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    server, database = services["cosyserve"], services["postgres"]
    assert (REPO / "docker" / server["build"]["context"] / server["build"]["dockerfile"]).is_file()
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy" and "healthcheck" in database
    env = server["environment"]
    assert set(env) <= known_env()
    url = env["COSYSERVE_VOICE_STORE"]
    assert check_voice_store(url) == url and "@postgres:5432/" in url
    assert database["environment"]["POSTGRES_USER"] in url and database["environment"]["POSTGRES_DB"] in url
    assert f":{Settings().port}" in server["ports"][0]


def test_install_script_is_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text()
    assert "docker/install.sh" in ci and "venv" in ci
    assert "pip install -q torch==2.13.0" in ci  # the pin the Dockerfiles' TORCH_SPEC repeats
    assert os.access(DOCKER / "install.sh", os.X_OK)
