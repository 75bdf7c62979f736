"""Skipping a test for a missing resource (the golden set, an asset, Chromium, PostgreSQL, an optional
package): a skip on a developer's machine, a failure in CI (``CI=true``: tests/conftest.py turns these
skips into failures), so that a CI run without ``../shared`` cannot pass with the tests skipped."""

from __future__ import annotations

import os
from types import ModuleType
from typing import NoReturn

import pytest

MISSING = "missing test resource"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def reason(what: str) -> str:
    return f"{MISSING}: {what}"


def missing(what: str) -> NoReturn:
    """Skip the running test: ``what`` is not there."""
    pytest.skip(reason(what))


def missing_mark(what: str) -> pytest.MarkDecorator:
    return pytest.mark.skip(reason=reason(what))


def needs(present: bool, what: str) -> pytest.MarkDecorator:
    """A mark skipping the test (failing it in CI) unless ``present``."""
    return pytest.mark.skipif(not present, reason=reason(what))


def import_or_missing(module: str, what: str | None = None) -> ModuleType:
    return pytest.importorskip(module, reason=reason(what or f"the {module} package is not installed"))
