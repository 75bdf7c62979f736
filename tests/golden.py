"""Access to the golden reference set (``$COSYSERVE_GOLDEN_DIR``, default ``../shared/golden``).

Tests walk the manifest instead of naming cases, so they also run against other golden sets of
the same format.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from resources import missing, missing_mark

REPO = Path(__file__).resolve().parents[1]
# Where the engine tests put the models: cpu here; scripts/gpu_check.sh runs them on cuda.
TEST_DEVICE = os.environ.get("COSYSERVE_TEST_DEVICE", "cpu")


def golden_root() -> Path:
    return Path(os.environ.get("COSYSERVE_GOLDEN_DIR", REPO.parent / "shared" / "golden")).resolve()


@cache
def manifest() -> dict[str, Any]:
    path = golden_root() / "manifest.json"
    if not path.is_file():
        return {"entries": [], "models": {}, "inputs": {}}
    return json.loads(path.read_text(encoding="utf-8"))


def entries(stage: str, versions: tuple[str, ...] | None = None, having: str | None = None) -> list[Any]:
    """Manifest entries of ``stage`` (optionally only for model versions in ``versions``, and only
    cases that hold the tensor ``having``).

    Returned as pytest params with the entry id as test id; with no golden set, one skipped param.
    """
    models = manifest()["models"]
    found = [
        e
        for e in manifest()["entries"]
        if e["stage"] == stage
        and (versions is None or models.get(e["model"], {}).get("version") in versions)
        and (having is None or having in e.get("tensors", {}))
    ]
    if not found:
        return [pytest.param(None, marks=missing_mark(f"no golden '{stage}' cases in {golden_root()}"))]
    return [pytest.param(e, id=e["id"]) for e in found]


def model_dir(model: str) -> Path:
    return golden_root() / manifest()["models"][model]["model_dir"]


def model_version(model: str) -> str:
    return manifest()["models"][model]["version"]


def load_case(entry: dict[str, Any]) -> dict[str, np.ndarray]:
    path = golden_root() / entry["file"]
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def load_json(entry: dict[str, Any]) -> dict[str, Any]:
    return json.loads((golden_root() / entry["file"]).read_text(encoding="utf-8"))


def assert_close(actual: Any, expected: np.ndarray, atol: float, what: str) -> float:
    """Assert max |actual - expected| <= atol with matching shapes; return the max error."""
    actual = np.asarray(actual.detach().cpu() if hasattr(actual, "detach") else actual)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != golden {expected.shape}"
    err = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64)))) if actual.size else 0.0
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol:g}"
    return err


def load_tiny(name: str, **options: Any) -> Any:
    """The golden set's model folder ``name`` (``v2-tiny``...) loaded with ``options`` (missing: a skip, a
    failure in CI). Test modules cache it themselves, so each module has models of its own."""
    from cosyserve.engine.pipeline import load_model

    path = golden_root() / "models" / name
    if not path.is_dir():
        missing(f"the golden tiny model {name}")
    return load_model(path, **options)
