"""Model directory resolution (local / hub ids, offline) and the verified tokenizer-asset cache."""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import shutil
import threading
import time
from pathlib import Path

import huggingface_hub
import modelscope
import pytest
from golden import golden_root, manifest, model_dir, model_version
from resources import missing, missing_mark

from cosyserve import hub
from cosyserve.engine.pipeline import load_model
from cosyserve.errors import ModelLoadError
from cosyserve.hub import Asset, AssetError, asset_path, resolve_model_dir

FAMILY_OF = {"v1": "cosyvoice1", "v2": "cosyvoice2", "v3": "cosyvoice3"}
FAKE_ID = "cosyserve-tests/NoSuchModel-0.1B"  # an id no hub or cache has


def _models() -> list:
    names = list(manifest()["models"])
    if not names:
        return [pytest.param(None, marks=missing_mark(f"no golden models in {golden_root()}"))]
    return names


# --- model directories ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", _models())
def test_local_dir_resolves_with_its_family(name):
    directory = model_dir(name)
    family = FAMILY_OF[model_version(name)]
    assert resolve_model_dir(directory) == (directory, family)
    assert resolve_model_dir(str(directory)) == (directory, family)


class FakeHubs:
    """Both hub clients replaced: the caches hold ``cached`` (id -> dir); downloads are recorded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cached: dict[str, Path] | None = None) -> None:
        self.cached = cached or {}
        self.downloads: list[tuple[str, str]] = []
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self._client("huggingface"))
        monkeypatch.setattr(modelscope, "snapshot_download", self._client("modelscope"))

    def _client(self, hub_name: str):
        def snapshot_download(model_id: str, local_files_only: bool = False, **kwargs) -> str:
            if model_id in self.cached:
                return str(self.cached[model_id])
            if local_files_only:
                raise FileNotFoundError(f"{model_id} is not cached")
            self.downloads.append((hub_name, model_id))
            raise ConnectionError("no network in this test")

        return snapshot_download


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(hub, "_reachable", lambda url, timeout: "the host is unreachable (test)")
    return FakeHubs(monkeypatch)


def test_hub_id_offline_names_id_and_hubs(offline):
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        resolve_model_dir(FAKE_ID)
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert FAKE_ID in message and "Hugging Face" in message and "ModelScope" in message
    assert "unreachable" in message
    assert offline.downloads == []  # nothing tried past the reachability check


def test_hub_choice(offline):
    with pytest.raises(ModelLoadError) as err:
        resolve_model_dir("iic/NoSuchModel-300M")  # iic/* lives on ModelScope only
    assert "ModelScope" in str(err.value) and "Hugging Face" not in str(err.value)
    with pytest.raises(ModelLoadError) as err:
        resolve_model_dir(FAKE_ID, hub="huggingface")
    assert "Hugging Face" in str(err.value) and "ModelScope" not in str(err.value)
    with pytest.raises(ModelLoadError, match="unknown hub 'githab'"):
        resolve_model_dir(FAKE_ID, hub="githab")


def test_hub_id_downloads_disabled(offline):
    with pytest.raises(ModelLoadError) as err:
        resolve_model_dir(FAKE_ID, allow_download=False)
    assert FAKE_ID in str(err.value) and "downloads are disabled" in str(err.value)


def test_load_model_hub_id_offline(offline):
    with pytest.raises(ModelLoadError, match=re.escape(FAKE_ID)):
        load_model(FAKE_ID)


def test_hub_id_without_network_fails_fast():
    """The real client, with whatever network this machine has: a quick, clear failure."""
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        resolve_model_dir(FAKE_ID, hub="huggingface", timeout=2.0)
    assert time.monotonic() - start < 15
    assert FAKE_ID in str(err.value) and "Hugging Face" in str(err.value)


@pytest.mark.parametrize("hub_name", ["huggingface", "modelscope"])
def test_hub_cache_hit(hub_name, monkeypatch, tmp_path):
    name = next(iter(manifest()["models"]), None)
    if name is None:
        missing("no golden models")
    cached = tmp_path / "snapshot"
    shutil.copytree(model_dir(name), cached)
    monkeypatch.setattr(hub, "_reachable", lambda url, timeout: pytest.fail("the cache hit went online"))
    fake = FakeHubs(monkeypatch, cached={"Org/Model-0.5B": cached})
    assert resolve_model_dir("Org/Model-0.5B", hub=hub_name) == (cached, FAMILY_OF[model_version(name)])
    assert fake.downloads == []


def test_missing_local_paths(offline, tmp_path, monkeypatch):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        resolve_model_dir(missing)
    assert str(missing) in str(err.value)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(missing))
    (tmp_path / "file.yaml").write_text("x: 1")
    with pytest.raises(ModelLoadError, match=r"file\.yaml is not a directory"):
        resolve_model_dir(tmp_path / "file.yaml")
    with pytest.raises(ModelLoadError, match="not a CosyVoice model directory"):
        resolve_model_dir(tmp_path)
    # A relative path that also looks like a hub id says both.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="models/cosyvoice2 is not a local directory"):
        resolve_model_dir("models/cosyvoice2")


# --- assets --------------------------------------------------------------------------------------


def test_real_assets_verified():
    """The tokenizer vocabularies, where this machine has them (tests set COSYSERVE_ASSETS_DIR)."""
    found = 0
    for name, asset in hub.ASSETS.items():
        try:
            path = asset_path(name, download=False)
        except AssetError:
            continue
        found += 1
        assert hashlib.sha256(path.read_bytes()).hexdigest() == asset.sha256
        assert path.stat().st_size == asset.size
    if not found:
        missing("no local copy of the tokenizer assets")


PAYLOAD = b"a small fake asset\n" * 50


class _Server(http.server.ThreadingHTTPServer):
    payload = PAYLOAD
    hits = 0


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.hits += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.payload)))
        self.end_headers()
        self.wfile.write(self.server.payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


@pytest.fixture
def fake_asset(monkeypatch, tmp_path, server):
    """One fake asset served on 127.0.0.1; empty assets dir and cache under tmp_path."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    url = f"http://127.0.0.1:{server.server_address[1]}/fake.bin"
    asset = Asset("fake.bin", hashlib.sha256(PAYLOAD).hexdigest(), len(PAYLOAD), url)
    monkeypatch.setattr(hub, "ASSETS", {asset.name: asset})
    (tmp_path / "assets").mkdir()
    monkeypatch.setenv("COSYSERVE_ASSETS_DIR", str(tmp_path / "assets"))
    monkeypatch.setenv("COSYSERVE_CACHE_DIR", str(tmp_path / "cache"))
    return asset


def test_asset_from_assets_dir(fake_asset, tmp_path, monkeypatch, server):
    (tmp_path / "assets" / "fake.bin").write_bytes(PAYLOAD)
    assert asset_path("fake.bin") == tmp_path / "assets" / "fake.bin"
    # Several folders, os.pathsep-separated: the first holding the file wins.
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv("COSYSERVE_ASSETS_DIR", f"{other}{os.pathsep}{tmp_path / 'assets'}")
    assert asset_path("fake.bin") == tmp_path / "assets" / "fake.bin"
    assert server.hits == 0


def test_asset_local_argument(fake_asset, tmp_path):
    folder = tmp_path / "given"
    folder.mkdir()
    (folder / "fake.bin").write_bytes(PAYLOAD)
    assert asset_path("fake.bin", local=folder) == folder / "fake.bin"
    assert asset_path("fake.bin", local=folder / "fake.bin") == folder / "fake.bin"


def test_asset_wrong_sha256_is_rejected(fake_asset, tmp_path, server):
    bad = tmp_path / "assets" / "fake.bin"
    bad.write_bytes(PAYLOAD + b"tampered")
    with pytest.raises(AssetError) as err:
        asset_path("fake.bin")
    assert str(bad) in str(err.value) and "sha256" in str(err.value)
    assert server.hits == 0


def test_asset_download_disabled_says_where_it_looked(fake_asset, tmp_path, server):
    with pytest.raises(AssetError) as err:
        asset_path("fake.bin", download=False)
    message = str(err.value)
    assert str(tmp_path / "assets" / "fake.bin") in message
    assert str(tmp_path / "cache") in message
    assert "COSYSERVE_ASSETS_DIR" in message and fake_asset.url in message
    assert server.hits == 0


def test_asset_download_and_cache(fake_asset, tmp_path, server):
    path = asset_path("fake.bin")
    assert path.is_relative_to(tmp_path / "cache") and path.read_bytes() == PAYLOAD
    assert server.hits == 1
    assert asset_path("fake.bin") == path and server.hits == 1  # served from the cache
    path.write_bytes(b"corrupted cache")
    assert asset_path("fake.bin") == path and path.read_bytes() == PAYLOAD  # fetched again
    assert server.hits == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.bin"]  # no temporary files left


def test_asset_download_with_wrong_content(fake_asset, tmp_path, server):
    server.payload = b"something else entirely"
    with pytest.raises(AssetError, match="sha256 does not match"):
        asset_path("fake.bin")
    cache = tmp_path / "cache" / "assets"
    assert not cache.exists() or list(cache.iterdir()) == []


def test_asset_download_unreachable(fake_asset, monkeypatch, server):
    server.shutdown()
    server.server_close()
    with pytest.raises(AssetError) as err:
        asset_path("fake.bin", timeout=2.0)
    assert fake_asset.url in str(err.value)


def test_unknown_asset():
    with pytest.raises(AssetError, match="unknown asset"):
        asset_path("no-such.tiktoken")
