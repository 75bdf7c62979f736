"""Schema-driven fuzzing of the whole HTTP API (issue 14): no input may be answered with a 5xx, and every
answer must be what the app's own OpenAPI document says (status codes, content types, bodies, headers).

The model is the real v2-tiny engine, so that validation, voice lookups, prompt analysis, the voice
library and generation are the real ones. Each run is bounded: a fixed number of derandomized examples
per operation, short texts, and a wall-clock budget per generation mode.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
from golden import manifest, model_dir
from resources import import_or_missing, missing

# Slow: end-to-end on the golden models, servers, browsers or databases (the fast tier: -m "not slow").
pytestmark = pytest.mark.slow

schemathesis = import_or_missing("schemathesis", "the test extra installs schemathesis")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.specs.openapi import checks as openapi_checks  # noqa: E402

from cosyserve.api import create_app  # noqa: E402
from cosyserve.engine.pipeline import load_model  # noqa: E402
from cosyserve.settings import Settings  # noqa: E402

FUZZ_MODEL = "v2-tiny"
EXAMPLES_PER_OPERATION = 40
BUDGET_S = 30.0  # per generation mode

CHECKS = [
    schemathesis.checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.response_headers_conformance,
]


@pytest.fixture(scope="module")
def schema(tmp_path_factory) -> Iterator[Any]:
    if FUZZ_MODEL not in manifest()["models"]:
        missing(f"no golden {FUZZ_MODEL} model")
    data_dir = tmp_path_factory.mktemp("fuzz-voices")
    model = load_model(model_dir(FUZZ_MODEL), data_dir=data_dir)
    # Short texts keep the (rare) valid synthesis requests quick on the tiny model.
    settings_ = Settings(max_text_length=40, max_upload_bytes=2_000_000, data_dir=str(data_dir))
    app = create_app(model, settings_)

    async def started_once(scope: Any, receive: Any, send: Any) -> None:
        # Schemathesis' ASGI transport runs the lifespan around every call; the app's own lifespan (engine
        # start and shutdown) runs once, below, for the whole module.
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})

    with TestClient(app):
        yield schemathesis.openapi.from_asgi("/openapi.json", started_once)


def _fuzz(operation: Any, mode: Any, deadline: float, statuses: dict[str, set[int]]) -> None:
    """Up to EXAMPLES_PER_OPERATION generated requests to one operation, each validated against the schema."""

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(mode))
    def run(case: Any) -> None:
        if time.monotonic() > deadline:
            return
        response = case.call_and_validate(checks=CHECKS)
        statuses.setdefault(operation.label, set()).add(response.status_code)

    # Negative mode: an operation with nothing that can be made invalid (no parameters) is unsatisfiable.
    with contextlib.suppress(Unsatisfiable):
        run()


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_fuzz_every_operation_of_the_openapi_schema(schema, mode):
    operations = [op.ok() for op in schema.get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]
    deadline = time.monotonic() + BUDGET_S
    failures: dict[str, str] = {}
    statuses: dict[str, set[int]] = {}
    for operation in operations:
        if time.monotonic() > deadline:
            break
        try:
            _fuzz(operation, mode, deadline, statuses)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # recorded, so that the other operations still run
            failures[operation.label] = str(exc)[:2000]
    print(mode.value, {label: sorted(codes) for label, codes in statuses.items()})
    assert not failures, "\n\n".join(f"{k}: {v}" for k, v in failures.items())
    assert len(statuses) >= len(operations) // 3, "the budget ran out before a third of the operations were tried"
    assert all(code < 500 for codes in statuses.values() for code in codes)
