"""API keys: every registered route refuses a request without a valid key (401, OpenAI error shape,
WWW-Authenticate) and serves it with one; /health, /metrics, the web page and CORS preflights stay open;
the ElevenLabs-style key carriers work where they belong; the CLI client, the official client script and
the openai SDK send keys; keys never reach a log line."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from api_helpers import LiveServer
from fastapi import Request, WebSocket
from fastapi.testclient import TestClient
from golden import REPO, golden_root, manifest, model_dir
from helpers import load_settings
from resources import import_or_missing, needs
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocketDisconnect

from cosyserve.api import create_app
from cosyserve.api.auth import ApiKeys, key_from_scope, scope_has_valid_key
from cosyserve.api.metrics import iter_routes
from cosyserve.cli import main as cli_main
from cosyserve.engine.pipeline import load_model
from cosyserve.settings import Settings, SettingsError

KEYS = ("first-key-123", "second-key-456")
MODEL = "v1-tiny"
OPEN_PATHS = ("/health", "/metrics", "/", "/web", "/web/{name:path}")
# A concrete value for each path parameter of the registered routes.
PATH_VALUES = {"voice_id": "中文女", "name": "index.html"}

pytestmark = [pytest.mark.slow, needs(MODEL in manifest()["models"], f"no golden {MODEL} in {golden_root()}")]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_model(model_dir(MODEL), text_frontend="none", data_dir=tmp_path_factory.mktemp("auth-voices"))


def _app(model: Any, **settings: Any) -> Any:
    return create_app(model, Settings(data_dir="", **{"api_keys": KEYS, **settings}))


@pytest.fixture(scope="module")
def client(model: Any) -> TestClient:
    return TestClient(_app(model))


def _concrete(path: str) -> str:
    return re.sub(r"\{(\w+)(:\w+)?\}", lambda m: PATH_VALUES.get(m.group(1), "x"), path)


def _http_routes(app: Any) -> list[tuple[str, str, str]]:
    """(method, template, concrete path) of every HTTP route the app registers."""
    found = []
    for route in iter_routes(app.routes):
        assert isinstance(route, (Route, Mount, WebSocketRoute)), f"unexpected route type {type(route)}"
        if isinstance(route, Route):
            for method in sorted(route.methods or ()):
                found.append((method, route.path, _concrete(route.path)))
    return found


def _assert_unauthorized(response: Any, message: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    if response.request.method == "HEAD":
        return  # no body
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
    assert message in error["message"]


def test_every_route_needs_a_key_except_the_open_ones(client: TestClient) -> None:
    routes = _http_routes(client.app)
    templates = {template for _, template, _ in routes}
    # The routes this test must cover are really registered (guards against an empty walk).
    assert {"/inference_sft", "/v1/audio/speech", "/v1/audio/voices/{voice_id:path}", "/speakers"} <= templates
    assert set(OPEN_PATHS) <= templates
    for method, template, path in routes:
        anonymous = client.request(method, path, follow_redirects=False)
        authorized = client.request(
            method, path, headers={"Authorization": f"Bearer {KEYS[1]}"}, follow_redirects=False
        )
        assert authorized.status_code != 401, f"{method} {template} refused a valid key: {authorized.text}"
        if template in OPEN_PATHS:
            assert anonymous.status_code == authorized.status_code, f"{method} {template} should be open"
            assert anonymous.status_code < 400, f"{method} {template}: {anonymous.status_code}"
        else:
            _assert_unauthorized(anonymous, "missing API key")
            wrong = client.request(method, path, headers={"Authorization": "Bearer nope"})
            _assert_unauthorized(wrong, "invalid API key")


def test_a_keyed_request_is_served(client: TestClient) -> None:
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    response = client.post(
        "/inference_sft", data={"tts_text": "你好。", "spk_id": "中文女", "format": "pcm"}, headers=headers
    )
    assert response.status_code == 200 and len(response.content) > 0
    assert client.get("/speakers", headers={"authorization": f"bearer {KEYS[0]}"}).status_code == 200  # any case
    # Other carriers are for the ElevenLabs-style routes only.
    assert client.get("/speakers", headers={"xi-api-key": KEYS[0]}).status_code == 401
    assert client.get("/speakers", params={"api_key": KEYS[0]}).status_code == 401
    assert client.get("/speakers", headers={"Authorization": f"Basic {KEYS[0]}"}).status_code == 401


def test_elevenlabs_carriers_under_text_to_speech(client: TestClient) -> None:
    path = "/v1/text-to-speech/中文女/stream"  # no such route yet: 404 means authentication passed
    assert client.post(path).status_code == 401
    assert client.post(path, headers={"xi-api-key": KEYS[0]}).status_code == 404
    assert client.post(path, params={"api_key": KEYS[1]}).status_code == 404
    assert client.post(path, params={"api_key": "wrong"}).status_code == 401


def test_cors_preflight_needs_no_key(model: Any, client: TestClient) -> None:
    preflight = {"Origin": "http://example.com", "Access-Control-Request-Method": "POST"}
    response = client.options("/v1/audio/speech", headers=preflight)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "*"
    # A refusal still carries CORS headers, so a page can read why.
    refused = client.get("/speakers", headers={"Origin": "http://example.com"})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "*"
    without_cors = TestClient(_app(model, cors_origins=()))
    assert without_cors.options("/v1/audio/speech", headers=preflight).status_code == 405


def test_exempt_paths_are_configurable(model: Any) -> None:
    client = TestClient(_app(model, auth_exempt=("/speakers", "/v1/models*")))
    assert client.get("/speakers").status_code == 200
    assert client.get("/v1/models").status_code == 200
    assert client.get("/v1/models/tts-1").status_code == 200
    assert client.get("/health").status_code == 401
    assert client.get("/metrics").status_code == 401
    assert client.get("/web/").status_code == 200  # the page itself holds nothing


def test_no_keys_no_authentication(model: Any) -> None:
    client = TestClient(create_app(model, Settings(data_dir="")))
    assert client.get("/speakers").status_code == 200


def test_websocket_handshake(model: Any) -> None:
    app = _app(model)
    seen: list[bool] = []

    async def echo(websocket: WebSocket) -> None:
        seen.append(scope_has_valid_key(websocket.scope))
        await websocket.accept()
        await websocket.send_text("hello")
        await websocket.close()

    # A stand-in under the ElevenLabs prefix (the real stream-input route: test_websocket.py).
    app.add_api_websocket_route("/v1/text-to-speech/{voice_id}/echo", echo)
    client = TestClient(app)
    with (
        pytest.raises(WebSocketDisconnect) as refused,
        client.websocket_connect("/v1/text-to-speech/中文女/echo") as ws,
    ):
        ws.receive_text()
    assert refused.value.code == 1008
    for kwargs in (
        {"params": None, "headers": {"xi-api-key": KEYS[0]}},
        {"params": None, "headers": {"Authorization": f"Bearer {KEYS[1]}"}},
    ):
        with client.websocket_connect("/v1/text-to-speech/中文女/echo", **kwargs) as ws:
            assert ws.receive_text() == "hello"
    with client.websocket_connect(f"/v1/text-to-speech/中文女/echo?api_key={KEYS[0]}") as ws:
        assert ws.receive_text() == "hello"
    assert seen == [True, True, True]


def test_key_helpers() -> None:
    keys = ApiKeys(KEYS, ("/health", "/docs*"))
    assert keys.valid(KEYS[0]) and keys.valid(KEYS[1])
    assert not keys.valid(KEYS[0][:-1]) and not keys.valid("") and not keys.valid(None)
    assert keys.exempt("/health") and keys.exempt("/docs/oauth2-redirect") and not keys.exempt("/healthz")
    scope = {"type": "http", "path": "/v1/text-to-speech/x", "headers": [], "query_string": b"api_key=a%20b"}
    assert key_from_scope(scope) == "a b"
    assert not ApiKeys(()).enabled and ApiKeys(()).open({"type": "http", "path": "/speakers"})


def test_query_key_is_removed_before_logging(model: Any) -> None:
    app = _app(model)
    queries: list[str] = []

    async def echo(request: Request) -> dict[str, str]:
        queries.append(request.url.query)
        return {}

    app.add_api_route("/v1/text-to-speech/{voice_id}/echo", echo, methods=["GET"])
    client = TestClient(app)
    assert client.get("/v1/text-to-speech/x/echo", params={"a": "1", "api_key": KEYS[0], "b": "2"}).status_code == 200
    assert client.get("/v1/text-to-speech/x/echo", params={"api_key": "wrong"}).status_code == 401
    assert queries == ["a=1&b=2"]


def test_exempt_websocket_route_checks_on_its_own(model: Any) -> None:
    app = _app(model, auth_exempt=("/health", "/ws*"))

    async def guarded(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json({"valid_key": scope_has_valid_key(websocket.scope)})
        await websocket.close()

    app.add_api_websocket_route("/ws", guarded)
    client = TestClient(app)
    with client.websocket_connect("/ws") as ws:
        assert ws.receive_json() == {"valid_key": False}
    with client.websocket_connect("/ws", headers={"Authorization": f"Bearer {KEYS[0]}"}) as ws:
        assert ws.receive_json() == {"valid_key": True}


def test_keys_never_logged(model: Any, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(data_dir="", api_keys=KEYS)
    assert KEYS[0] not in repr(settings) and KEYS[0] not in str(settings)
    client = TestClient(create_app(model, settings))
    with caplog.at_level(logging.DEBUG):
        client.get("/speakers", headers={"Authorization": f"Bearer {KEYS[0]}"})
        client.get("/speakers", headers={"Authorization": "Bearer guessed-key"})
        client.post(
            "/inference_sft",
            data={"tts_text": "你好。", "spk_id": "中文女"},
            headers={"Authorization": f"Bearer {KEYS[0]}"},
        )
    assert caplog.records, "nothing was logged: the check would be vacuous"
    assert KEYS[0] not in caplog.text and "guessed-key" not in caplog.text


# -- settings ---------------------------------------------------------------------------------------


def test_key_flags_env_and_file(tmp_path: Path) -> None:
    assert load_settings(["--api_key", "a", "--api-key", "b"]).api_keys == ("a", "b")
    assert load_settings([], {"COSYSERVE_API_KEY": "x, y"}).api_keys == ("x", "y")
    assert load_settings(["--api_key", "a"], {"COSYSERVE_API_KEY": "x"}).api_keys == ("a",)  # the flag wins
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# operators\nfile-key-1\n\n  file-key-2  \n", encoding="utf-8")
    assert load_settings(["--api_key", "a", "--api_key_file", str(key_file)]).api_keys == (
        "a",
        "file-key-1",
        "file-key-2",
    )
    assert load_settings([], {"COSYSERVE_API_KEY_FILE": str(key_file)}).api_keys == ("file-key-1", "file-key-2")
    assert load_settings([]).api_keys == ()
    assert load_settings(["--auth_exempt", "/health,/docs*"]).auth_exempt == ("/health", "/docs*")
    with pytest.raises(SettingsError, match="API key file"):
        load_settings(["--api_key_file", str(tmp_path / "missing.txt")])
    with pytest.raises(SettingsError, match="printable ASCII"):
        load_settings(["--api_key", "has space"])
    with pytest.raises(SettingsError, match="start"):
        load_settings(["--auth_exempt", "health"])


# -- clients ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(model: Any) -> Any:
    with LiveServer(_app(model)) as server:
        yield server


def test_cli_client_sends_the_key(
    live: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    out = tmp_path / "out.wav"
    base = ["client", "--port", str(live.port), "--mode", "sft", "--spk_id", "中文女", "--tts_text", "你好。"]
    assert cli_main([*base, "--tts_wav", str(out)]) == 1
    assert "HTTP 401 invalid_api_key" in capsys.readouterr().err and not out.exists()
    assert cli_main([*base, "--tts_wav", str(out), "--api_key", KEYS[0]]) == 0
    assert out.stat().st_size > 44
    out.unlink()
    monkeypatch.setenv("COSYSERVE_API_KEY", f"{KEYS[1]},{KEYS[0]}")  # the env twin; the client takes the first
    assert cli_main([*base, "--tts_wav", str(out)]) == 0 and out.exists()


def test_official_client_script_sends_the_key(live: LiveServer, tmp_path: Path) -> None:
    out = tmp_path / "script.wav"
    script = REPO / "runtime" / "python" / "fastapi" / "client.py"
    args = ["--port", str(live.port), "--mode", "sft", "--tts_text", "你好。", "--tts_wav", str(out)]
    done = subprocess.run(
        [sys.executable, str(script), *args, "--api_key", KEYS[1]],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size > 44


def test_openai_sdk_sends_the_key(live: LiveServer) -> None:
    openai = import_or_missing("openai")
    good = openai.OpenAI(base_url=live.url + "/v1", api_key=KEYS[0], max_retries=0, timeout=120)
    audio = good.audio.speech.create(model="tts-1", voice="中文女", input="你好。", response_format="wav")
    assert audio.content[:4] == b"RIFF"
    bad = openai.OpenAI(base_url=live.url + "/v1", api_key="not-a-key", max_retries=0, timeout=120)
    with pytest.raises(openai.AuthenticationError):
        bad.audio.speech.create(model="tts-1", voice="中文女", input="你好。")
