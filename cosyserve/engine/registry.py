"""The served models: which model a request names, and each one's engine client once it is loaded.

A :class:`ModelSlot` is one ``--model_dir`` entry: its name, its source and, once loaded, its
:class:`EngineClient`. The :class:`ModelRegistry` holds them in order (the first, or the one
``default_model`` names, is the default), finds the one a request names (its name, id or family), and
loads them: all at start-up, one after the other in a background thread (peak memory is one model's
load at a time), or each on its first request (``lazy_load``). A request waiting for a load waits on
the slot's ``asyncio.Event``; loads run outside the event loop and hand their result back to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from cosyserve.errors import ModelNotFound, ModelNotReady
from cosyserve.hub import is_hub_id

from .client import EngineClient

logger = logging.getLogger("cosyserve.engine")

# Names of OpenAI's speech models: they reach the default model.
OPENAI_MODELS = ("tts-1", "tts-1-hd")
LOADING_RETRY_AFTER_S = 5  # what a request for a model still loading is told to wait

# A loaded model (or an engine client already), made into the client the server talks to.
ClientFactory = Callable[[object], EngineClient]
Loader = Callable[[], object]


def _normalized(name: str) -> str:
    # Hub caches rewrite names (ModelScope stores CosyVoice2-0.5B as CosyVoice2-0___5B): compare loosely.
    return re.sub(r"[^a-z0-9]", "", name.rsplit("/", 1)[-1].lower())


class ModelSlot:
    """One served model: its name, where it comes from, its engine client once loaded.

    ``loader``: a zero-argument callable that loads the model (None: ``engine`` was given ready);
    ``owned``: its engine is closed with the registry (a client given ready belongs to its maker).
    """

    def __init__(
        self,
        name: str,
        source: str,
        loader: Loader | None = None,
        *,
        named: bool = False,
        engine: EngineClient | None = None,
        owned: bool = True,
    ) -> None:
        self.name = name  # what clients send as model (an explicit name=, else the source)
        self.source = source  # the --model_dir value
        self.named = named
        self.loader = loader
        self.engine = engine
        self.owned = owned
        self.load_error: str | None = None
        self.loading = False  # a load has started (and may have ended)
        self.load_seconds: float | None = None
        self._loaded = asyncio.Event()  # set, in the event loop, once the load ended either way
        if engine is not None:
            self._loaded.set()

    @property
    def status(self) -> str:
        if self.engine is not None:
            return "ok"
        if self.load_error is not None:
            return "error"
        return "loading" if self.loading else "not_loaded"

    @property
    def model_id(self) -> str:
        """The id /v1/models shows: the name given, else the hub id it was started with, else its directory."""
        if self.named or self.engine is None:
            return self.name
        # Never a local path (it tells clients nothing and shows them the server's file system). The hub
        # caches hold the id in the path: .../iic/CosyVoice2-0___5B, .../models--org--name/snapshots/<hash>.
        path = Path(self.engine.info.model_dir)
        names = {_normalized(part.rsplit("--", 1)[-1]) for part in path.parts}
        if is_hub_id(self.source) and _normalized(self.source) in names:
            return self.source
        return path.name

    def answers_to(self, wanted: str) -> bool:
        """Whether ``wanted`` (normalized) is this model's name or id (before it is loaded: its source)."""
        if self.engine is None:
            names = [self.name, self.source]
        else:  # what it really is: an unnamed slot's source may be a default that another model stands in for
            names = [self.model_id, self.engine.info.name] + ([self.name] if self.named else [])
        return wanted in {_normalized(n) for n in names}

    def ready_engine(self) -> EngineClient:
        """Its engine; ModelNotReady while it loads (worth a retry) or after it failed (not)."""
        if self.engine is not None:
            return self.engine
        if self.load_error is not None:
            raise ModelNotReady(f"the model {self.name} failed to load: {self.load_error}", retry_after=None)
        raise ModelNotReady(f"the model {self.name} is still loading, retry shortly", LOADING_RETRY_AFTER_S)


class ModelRegistry:
    """The served models, in order; ``make_client`` turns what a loader returns into an engine client;
    ``on_loaded(slot)`` runs in the event loop after each successful load."""

    def __init__(
        self,
        slots: Iterable[ModelSlot],
        make_client: ClientFactory,
        *,
        default_model: str = "",
        lazy_load: bool = False,
        on_loaded: Callable[[ModelSlot], None] | None = None,
    ) -> None:
        self.slots = list(slots)
        if not self.slots:
            raise ValueError("a registry needs at least one model")
        self.make_client = make_client
        self.default_model = default_model
        self.lazy_load = lazy_load
        self.on_loaded = on_loaded
        self._claim_lock = threading.Lock()

    @property
    def default(self) -> ModelSlot:
        for slot in self.slots:
            if self.default_model and self.default_model in (slot.name, slot.source):
                return slot
        return self.slots[0]

    def find(self, model: str | None) -> ModelSlot:
        """The slot a request's ``model`` names: its name, id or family; none or an OpenAI name: the
        default. ModelNotFound lists the served ones."""
        if model is None or not model.strip():
            return self.default
        lowered = model.strip().lower()
        if lowered in OPENAI_MODELS or lowered.startswith("gpt-4o-mini-tts"):
            return self.default
        wanted = _normalized(lowered)
        for slot in self.slots:
            if slot.answers_to(wanted):
                return slot
        for slot in self.slots:  # a family name: the first model of that family
            if slot.engine is not None and _normalized(slot.engine.info.family) == wanted:
                return slot
        names = ", ".join((*(slot.model_id for slot in self.slots), *OPENAI_MODELS))
        raise ModelNotFound(f"model '{model}' is not served here; use one of: {names}", param="model")

    def require(self, model: str | None = None) -> EngineClient:
        """The engine of the model named (default: the default one), loaded; ModelNotReady if it is not."""
        return self.find(model).ready_engine()

    async def get(self, model: str | None = None) -> EngineClient:
        """Like :meth:`require`, but with ``lazy_load`` a model not loaded yet is loaded now, the caller
        waiting for it."""
        slot = self.find(model)
        if slot.engine is None and slot.load_error is None and self.lazy_load:
            self.start_loading([slot])
            await slot._loaded.wait()
        return slot.ready_engine()

    def start_loading(self, slots: Iterable[ModelSlot] | None = None) -> None:
        """Load ``slots`` (default: every slot with a loader) one after the other in a background
        thread; a slot already loading or loaded is skipped. Call from the event loop."""
        claimed = [slot for slot in (self.slots if slots is None else slots) if self._claim(slot)]
        if claimed:
            loop = asyncio.get_running_loop()
            thread = threading.Thread(target=self._load, args=(claimed, loop), name="cosyserve-model-loader")
            thread.daemon = True  # a server stopped mid-load does not wait for it
            thread.start()

    def _claim(self, slot: ModelSlot) -> bool:
        with self._claim_lock:
            if slot.loading or slot.loader is None:
                return False
            slot.loading = True
            return True

    def _load(self, slots: list[ModelSlot], loop: asyncio.AbstractEventLoop) -> None:
        for slot in slots:
            assert slot.loader is not None
            started = time.perf_counter()
            engine, error = None, None
            try:
                engine = self.make_client(slot.loader())
            except Exception as exc:
                error = str(exc) or type(exc).__name__
                logger.error("model %s: loading failed: %s", slot.name, error)
                logger.debug("model loading traceback", exc_info=exc)
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server stopped meanwhile
                loop.call_soon_threadsafe(self._loaded, slot, engine, error, time.perf_counter() - started)

    def _loaded(self, slot: ModelSlot, engine: EngineClient | None, error: str | None, seconds: float) -> None:
        slot.engine, slot.load_error, slot.load_seconds = engine, error, seconds
        slot._loaded.set()
        if engine is not None:
            logger.info(
                "model %s ready in %.1f s: %s, %d Hz, modes %s",
                slot.name,
                seconds,
                engine.info.family,
                engine.info.sample_rate,
                ", ".join(sorted(engine.modes)),
            )
            if self.on_loaded is not None:
                self.on_loaded(slot)

    async def close(self) -> None:
        """Stop the engines this registry made."""
        for slot in self.slots:
            if slot.engine is not None and slot.owned:
                await slot.engine.close()
