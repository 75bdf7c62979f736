"""Where files come from: model directories (local or hub) and the tokenizer assets cache."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path


class AssetError(RuntimeError):
    """A tokenizer asset is neither cached, nor given locally, nor downloadable."""


@dataclass(frozen=True)
class Asset:
    name: str
    sha256: str
    size: int
    url: str


# Files the official models need but do not ship (see docs: never committed to this repo).
ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            "multilingual.tiktoken",
            "b34b360dbb493e781e479794586d661700670d65564001f23024971d1f2fa126",
            816730,
            "https://raw.githubusercontent.com/openai/whisper/c0d2f624c09dc18e709e37c2ad90c039a4eb72a2/"
            "whisper/assets/multilingual.tiktoken",
        ),
        Asset(
            "multilingual_zh_ja_yue_char_del.tiktoken",
            "747979631e813193436aabcff7c1c235d37de8097b71c563ec8b63b7a515c718",
            907395,
            "https://raw.githubusercontent.com/FunAudioLLM/CosyVoice/ace7c47f41bbd303aa6bf1ea80e6f9fbd595cd40/"
            "cosyvoice/tokenizer/assets/multilingual_zh_ja_yue_char_del.tiktoken",
        ),
    )
}


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
    if not download:
        raise AssetError(
            f"asset {name} not found (looked in {', '.join(str(c) for c in candidates)}); "
            f"set COSYSERVE_ASSETS_DIR to a folder holding it or allow the download from {asset.url}"
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
        raise AssetError(f"cannot download {name} from {asset.url}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return cached
