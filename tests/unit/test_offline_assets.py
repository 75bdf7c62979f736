"""Offline start of the 1.0 models (issue 14, item 7): the tokenizer vocabulary cannot be downloaded.

tests/conftest.py points COSYSERVE_ASSETS_DIR at ../shared/assets so that other tests need no network;
these tests remove it again, so that the path a new offline user takes is the one under test.
"""

from __future__ import annotations

import dataclasses
import socket
import time

import pytest
from golden import manifest, model_dir, model_version
from resources import missing_mark

from cosyserve import hub
from cosyserve.engine.pipeline import load_model
from cosyserve.errors import ModelLoadError
from cosyserve.hub import AssetError, asset_path

# Slow: end-to-end on the golden models, servers, browsers or databases (the fast tier: -m "not slow").
pytestmark = pytest.mark.slow


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No COSYSERVE_ASSETS_DIR, an empty cache, and every asset URL on a closed 127.0.0.1 port."""
    monkeypatch.delenv("COSYSERVE_ASSETS_DIR", raising=False)
    monkeypatch.setenv("COSYSERVE_CACHE_DIR", str(tmp_path / "cache"))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: connections are refused
    real = dict(hub.ASSETS)
    monkeypatch.setattr(
        hub,
        "ASSETS",
        {n: dataclasses.replace(a, url=f"http://127.0.0.1:{port}/{n}") for n, a in real.items()},
    )
    return hub.ASSETS


def _assert_says_how_to_provide(message: str, asset: hub.Asset) -> None:
    assert "COSYSERVE_ASSETS_DIR" in message, message
    assert asset.name in message and asset.sha256 in message and asset.url in message, message
    assert str(asset.size) in message, message


@pytest.mark.parametrize("name", sorted(hub.ASSETS))
def test_failed_download_says_how_to_provide_the_asset(offline, name):
    started = time.monotonic()
    with pytest.raises(AssetError) as err:
        asset_path(name)
    assert time.monotonic() - started < 5, "the reachability check must fail fast"
    _assert_says_how_to_provide(str(err.value), offline[name])
    with pytest.raises(AssetError) as err:
        asset_path(name, download=False)
    _assert_says_how_to_provide(str(err.value), offline[name])


def _v1_models() -> list[str]:
    found = [m for m in sorted(manifest()["models"]) if model_version(m) == "v1"]
    return found or [pytest.param(None, marks=missing_mark("no golden 1.0 model"))]


@pytest.mark.parametrize("model", _v1_models())
def test_offline_start_of_a_1_0_model_explains_the_vocabulary(offline, model):
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        load_model(model_dir(model))
    assert time.monotonic() - started < 30
    message = str(err.value)
    asset = next(a for a in offline.values() if a.name in message)
    _assert_says_how_to_provide(message, asset)
