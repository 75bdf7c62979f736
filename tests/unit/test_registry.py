"""The model registry: which model a request names, and lazy loading (one load, every waiter woken)."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from cosyserve.engine.registry import ModelRegistry, ModelSlot
from cosyserve.errors import ModelNotFound, ModelNotReady


def _engine(name: str) -> SimpleNamespace:
    return SimpleNamespace(info=SimpleNamespace(family="cosyvoice2", model_dir=f"/models/{name}", name=name))


def test_a_lazy_model_loads_once_for_every_waiter() -> None:
    release, calls = threading.Event(), []

    def load() -> str:
        calls.append(1)
        release.wait(10)
        return "loaded"

    registry = ModelRegistry([ModelSlot("v2", "v2", load)], lambda model: _engine(str(model)), lazy_load=True)

    async def main() -> list[object]:
        waiters = [asyncio.create_task(registry.get("v2")) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert not any(w.done() for w in waiters)  # waiting on the load, not answered
        release.set()
        return await asyncio.wait_for(asyncio.gather(*waiters), 10)

    engines = asyncio.run(main())
    assert calls == [1] and engines[0] is engines[1] is engines[2] and registry.default.status == "ok"


def test_a_failed_load_is_a_model_not_ready_without_retry() -> None:
    def load() -> object:
        raise OSError("no such directory")

    registry = ModelRegistry([ModelSlot("bad", "bad", load)], lambda model: _engine("x"), lazy_load=True)
    with pytest.raises(ModelNotReady) as err:
        asyncio.run(registry.get())
    assert err.value.retry_after is None and "no such directory" in err.value.message
    assert err.value.status == 503 and registry.default.status == "error"


def test_a_model_still_loading_is_worth_a_retry_and_an_unknown_one_lists_the_served() -> None:
    registry = ModelRegistry(
        [ModelSlot("a", "a", engine=_engine("a")), ModelSlot("b", "b", lambda: None)], lambda model: _engine("b")
    )
    assert registry.require("tts-1") is registry.slots[0].engine  # OpenAI names: the default model
    with pytest.raises(ModelNotReady) as err:
        registry.require("b")
    assert err.value.retry_after is not None
    with pytest.raises(ModelNotFound, match="use one of: a, b, tts-1") as err:
        registry.find("c")
    assert err.value.status == 404
