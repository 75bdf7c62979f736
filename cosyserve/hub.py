"""Where files come from: model directories (local or hub) and the tokenizer assets cache."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cosyserve.errors import ModelLoadError
from cosyserve.families import FAMILIES


class AssetError(ModelLoadError):
    """A tokenizer asset is neither cached, nor given locally, nor downloadable."""


@dataclass(frozen=True)
class Asset:
    name: str
    sha256: str
    size: int
    url: str


# Files the official models need but do not ship (see docs: never committed to this repo), by name.
_WHISPER = "https://raw.githubusercontent.com/openai/whisper/c0d2f624c09dc18e709e37c2ad90c039a4eb72a2/whisper/assets/"
_COSYVOICE = (
    "https://raw.githubusercontent.com/FunAudioLLM/CosyVoice/ace7c47f41bbd303aa6bf1ea80e6f9fbd595cd40/"
    "cosyvoice/tokenizer/assets/"
)
_ASSET_LIST = (
    Asset(
        name="multilingual.tiktoken",
        sha256="b34b360dbb493e781e479794586d661700670d65564001f23024971d1f2fa126",
        size=816730,
        url=_WHISPER + "multilingual.tiktoken",
    ),
    Asset(
        name="multilingual_zh_ja_yue_char_del.tiktoken",
        sha256="747979631e813193436aabcff7c1c235d37de8097b71c563ec8b63b7a515c718",
        size=907395,
        url=_COSYVOICE + "multilingual_zh_ja_yue_char_del.tiktoken",
    ),
)
ASSETS: dict[str, Asset] = {asset.name: asset for asset in _ASSET_LIST}


def cache_dir() -> Path:
    """``$COSYSERVE_CACHE_DIR`` or ``$XDG_CACHE_HOME/cosyserve`` (``~/.cache/cosyserve``)."""
    explicit = os.environ.get("COSYSERVE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cosyserve"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _asset_dirs() -> list[Path]:
    """Local folders searched before the cache: ``$COSYSERVE_ASSETS_DIR`` (os.pathsep-separated)."""
    raw = os.environ.get("COSYSERVE_ASSETS_DIR", "")
    return [Path(p) for p in raw.split(os.pathsep) if p]


def asset_path(name: str, local: str | Path | None = None, download: bool = True, timeout: float = 20.0) -> Path:
    """Return a verified local copy of asset ``name``.

    Looks at ``local`` (a file or folder), then ``$COSYSERVE_ASSETS_DIR``, then the cache; if none
    holds a copy with the right sha256, downloads it into the cache (atomically) when allowed.
    """
    asset = ASSETS.get(name)
    if asset is None:
        raise AssetError(f"unknown asset '{name}'")
    candidates: list[Path] = []
    if local is not None:
        local = Path(local)
        candidates.append(local / name if local.is_dir() else local)
    candidates += [d / name for d in _asset_dirs()]
    cached = cache_dir() / "assets" / name
    candidates.append(cached)
    for path in candidates:
        if path.is_file():
            if _sha256(path) == asset.sha256:
                return path
            if path != cached:
                raise AssetError(f"{path} does not have the sha256 of {name} ({asset.sha256})")
    looked = f"looked in {', '.join(str(c) for c in candidates)}"
    if not download:
        raise AssetError(f"asset {name} not found ({looked}); downloads are disabled. {_how_to_provide(asset)}")
    # An offline machine fails here at once instead of inside urlopen (whose DNS lookup has no timeout);
    # behind a proxy only urlopen can tell.
    proxied = urllib.parse.urlparse(asset.url).scheme in urllib.request.getproxies()
    if not proxied and (reason := _reachable(asset.url, min(timeout, 5.0))):
        raise AssetError(
            f"asset {name} not found ({looked}) and cannot be downloaded: {reason}. {_how_to_provide(asset)}"
        )
    cached.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=cached.parent, prefix=f".{name}.")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(asset.url, timeout=timeout) as resp:
            while block := resp.read(1 << 16):
                out.write(block)
        if _sha256(tmp) != asset.sha256:
            raise AssetError(f"downloaded {name} from {asset.url} but its sha256 does not match")
        os.replace(tmp, cached)
    except AssetError:
        raise
    except Exception as exc:
        raise AssetError(f"cannot download {name} from {asset.url}: {exc}. {_how_to_provide(asset)}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return cached


def _how_to_provide(asset: Asset) -> str:
    """What an offline user does instead of the download."""
    return (
        f"To provide it: fetch {asset.url} on a machine that can ({asset.size} bytes, "
        f"sha256 {asset.sha256}), put it as '{asset.name}' in a folder and start with "
        f"COSYSERVE_ASSETS_DIR=<that folder>, or copy it to {cache_dir() / 'assets' / asset.name}"
    )


# --------------------------------------------------------------------------------------------
# Model directories

# The yaml present decides the family, checked in the official order.
FAMILY_YAMLS: tuple[tuple[str, str], ...] = tuple((f.yaml, f.name) for f in FAMILIES.values())

# Files no inference path reads; skipping them saves gigabytes (TensorRT/ONNX estimators, training
# tokenizers, the BlankEN safetensors that llm.pt overrides, demo assets).
_IGNORE_PATTERNS = [
    "*.plan",
    "flow.decoder.estimator.*.onnx",
    "speech_tokenizer_v3.batch.onnx",
    "CosyVoice-BlankEN/model.safetensors",
    "asset/*",
    "*.zip",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_HOSTS = {"modelscope": "https://www.modelscope.cn", "huggingface": "https://huggingface.co"}


def is_hub_id(text: str) -> bool:
    """``owner/name`` as the hubs spell model ids, and not a local directory of that relative name."""
    return _HUB_ID.match(text) is not None and not Path(text).expanduser().is_dir()


def detect_family(model_dir: Path) -> str:
    """The family of an official model directory, from the yaml it holds."""
    for yaml_name, family in FAMILY_YAMLS:
        if (model_dir / yaml_name).is_file():
            return family
    names = ", ".join(y for y, _ in FAMILY_YAMLS)
    raise ModelLoadError(f"{model_dir} is not a CosyVoice model directory: none of {names} is present")


def _hub_for(model_id: str, hub: str) -> list[str]:
    if hub in ("modelscope", "huggingface"):
        return [hub]
    if hub != "auto":
        raise ModelLoadError(f"unknown hub '{hub}' (expected auto, modelscope or huggingface)")
    # iic/* exists only on ModelScope; the FunAudioLLM/* ids exist on both, Hugging Face first.
    return ["modelscope"] if model_id.startswith("iic/") else ["huggingface", "modelscope"]


def _reachable(url: str, timeout: float) -> str | None:
    """None when the host accepts a TCP connection, else the reason (hub clients retry for long)."""
    parsed = urllib.parse.urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{parsed.hostname} is unreachable ({exc.strerror or exc})"


def _download(model_id: str, hub: str, allow_download: bool, timeout: float) -> Path:
    if hub == "huggingface":
        import huggingface_hub

        try:
            return Path(huggingface_hub.snapshot_download(model_id, local_files_only=True))
        except Exception:
            pass
        if not allow_download:
            raise ModelLoadError(f"{model_id} is not in the Hugging Face cache and downloads are disabled")
        endpoint = os.environ.get("HF_ENDPOINT", _HUB_HOSTS[hub])
        if reason := _reachable(endpoint, timeout):
            raise ModelLoadError(f"cannot download {model_id} from Hugging Face: {reason}")
        try:
            return Path(
                huggingface_hub.snapshot_download(model_id, ignore_patterns=_IGNORE_PATTERNS, etag_timeout=timeout)
            )
        except Exception as exc:
            raise ModelLoadError(f"cannot download {model_id} from Hugging Face: {exc}") from exc

    from modelscope import snapshot_download

    try:
        cached = Path(snapshot_download(model_id, local_files_only=True))
        if any((cached / y).is_file() for y, _ in FAMILY_YAMLS):
            return cached
    except Exception:
        pass
    if not allow_download:
        raise ModelLoadError(f"{model_id} is not in the ModelScope cache and downloads are disabled")
    endpoint = os.environ.get("MODELSCOPE_DOMAIN", _HUB_HOSTS[hub])
    if "://" not in endpoint:
        endpoint = "https://" + endpoint
    if reason := _reachable(endpoint, timeout):
        raise ModelLoadError(f"cannot download {model_id} from ModelScope: {reason}")
    try:
        return Path(snapshot_download(model_id, ignore_patterns=_IGNORE_PATTERNS))
    except Exception as exc:
        raise ModelLoadError(f"cannot download {model_id} from ModelScope: {exc}") from exc


def resolve_model_dir(
    model: str | Path, hub: str = "auto", allow_download: bool = True, timeout: float = 5.0
) -> tuple[Path, str]:
    """Return ``(directory, family)`` for a local model directory or a hub id.

    A hub id is fetched into the hub's standard cache (``~/.cache/modelscope`` or
    ``~/.cache/huggingface``) with its progress bar, or taken from that cache when present.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path, detect_family(path)
    text = str(model)
    if path.exists():
        raise ModelLoadError(f"{text} is not a directory (a model is a directory holding a cosyvoice*.yaml)")
    if not is_hub_id(text):
        raise ModelLoadError(f"model directory {text} does not exist and is not a hub id like iic/CosyVoice-300M")
    errors = []
    for name in _hub_for(text, hub):
        try:
            directory = _download(text, name, allow_download, timeout)
            return directory, detect_family(directory)
        except ModelLoadError as exc:
            errors.append(str(exc))
    raise ModelLoadError(f"{text} is not a local directory and could not be fetched: " + "; ".join(errors))
