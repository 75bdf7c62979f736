"""cosyserve on Ray Serve: the same FastAPI app (``create_app``) as a Serve deployment, one engine
per model in every replica, replicas placed on the cluster's CPUs / GPUs.

``cosyserve ray [server flags] --num_replicas 2`` starts (or joins, ``--ray_address``) a cluster and
runs the deployment until interrupted; ``serve deploy docs/ray-serve.yaml`` deploys the application
builder :func:`build` with the same settings as ``args``. Ray is imported here only: the plain server
never needs it (``pip install 'cosyserve[ray]'``).

Two Serve applications: ``cosyserve-engine`` (the engine replicas, each the whole server's app with its
models, at the internal route ``/_engine``) and ``cosyserve`` (at ``/``: a model-less gateway in front
of them, :mod:`cosyserve.deploy.gateway`), so that a replica lost before a response starts costs a
retry on another replica, never a bare 500 from Serve's proxy.

Replicas share nothing but the voice store, so more than one replica needs a shared one
(``--voice_store postgresql://...``, env ``COSYSERVE_VOICE_STORE``); ``--single_node_sqlite`` lets the
replicas of ONE machine share the data directory's SQLite file instead (never across machines).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cosyserve.deploy.gateway import ENGINE_APP, ENGINE_PREFIX, Gateway, forward_http
from cosyserve.settings import (
    ENV_PREFIX,
    Settings,
    SettingsError,
    _parse_bool,
    add_server_arguments,
    settings_from_args,
)

logger = logging.getLogger("cosyserve.ray")

SERVED_BY_HEADER = "X-Served-By"
DEPLOYMENT_NAME = "CosyServe"
GATEWAY_NAME = "CosyServeGateway"
APP_NAME = "cosyserve"
# The app of this engine replica, once its builder ran (the gateway's requests go through it).
_replica_app: Any = None
SHARED_STORE_SCHEMES = ("postgresql://", "postgres://")


@dataclass(frozen=True)
class RayOptions:
    """How the deployment is scaled and placed (the server's own settings stay in Settings)."""

    num_replicas: int = 1
    min_replicas: int | None = None  # both bounds given: autoscaling instead of a fixed count
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0  # autoscaling target per replica
    num_cpus: float = 1.0  # per replica
    num_gpus: float = 0.0  # per replica
    address: str = "local"  # a running cluster (host:port, "auto"), or "local": start one in this process
    single_node_sqlite: bool = False  # replicas on one machine may share the data_dir's SQLite file

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise SettingsError(f"num_replicas must be at least 1, not {self.num_replicas}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise SettingsError("autoscaling needs both min_replicas and max_replicas")
        if self.max_replicas is not None and not 0 <= self.min_replicas <= self.max_replicas >= 1:
            raise SettingsError("autoscaling bounds need 0 <= min_replicas <= max_replicas, max_replicas >= 1")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise SettingsError("ray_num_cpus and ray_num_gpus cannot be negative")

    @property
    def most_replicas(self) -> int:
        return self.max_replicas if self.max_replicas is not None else self.num_replicas


def voice_store(settings: Settings, environ: Mapping[str, str] | None = None) -> str:
    """The voice store setting (``--voice_store`` / ``COSYSERVE_VOICE_STORE``); empty: the data_dir's SQLite."""
    env = os.environ if environ is None else environ
    return str(getattr(settings, "voice_store", "") or env.get(ENV_PREFIX + "VOICE_STORE", "")).strip()


def check_shared_store(settings: Settings, options: RayOptions, environ: Mapping[str, str] | None = None) -> None:
    """Refuse replicas that would each keep their own voices: a voice made through one replica must be
    usable through every other one."""
    if options.most_replicas <= 1:
        return
    store = voice_store(settings, environ)
    if store.lower().startswith(SHARED_STORE_SCHEMES):
        return
    count = f"{options.most_replicas} replicas"
    if store:
        raise SettingsError(f"{count} need a shared voice store: voice_store {store!r} is not a postgresql:// URL")
    if options.single_node_sqlite and settings.data_dir:
        logger.warning(
            "%s share the SQLite voice library in %s: all of them must run on this machine", count, settings.data_dir
        )
        return
    where = "in memory (data_dir '')" if not settings.data_dir else f"in its own SQLite file under {settings.data_dir}"
    raise SettingsError(
        f"{count} need a shared voice store, or each would keep its voices {where}: pass --voice_store "
        f"postgresql://USER:PASSWORD@HOST/DB (env {ENV_PREFIX}VOICE_STORE)"
        + "; on a single machine, --single_node_sqlite lets the replicas share the data_dir's SQLite file"
    )


class ServedByMiddleware:
    """Names the replica (Serve's replica id and the process id) in an ``X-Served-By`` response header."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.label = f"{_replica_id()}/{os.getpid()}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_labelled(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-served-by", self.label)]}
            await send(message)

        await self.app(scope, receive, send_labelled)


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (tests of the app alone)
        return "local"


def app_builder(settings: Settings) -> Callable[[], Any]:
    """What each replica runs: the single-process server's app, its models loaded in the replica."""

    def build_app() -> Any:
        from cosyserve.api import create_app
        from cosyserve.engine.loading import resolve_device
        from cosyserve.engine.memory import bound_kernel_caches, limit_malloc_arenas
        from cosyserve.engine.pipeline import model_loaders

        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        limit_malloc_arenas(settings.malloc_arenas)
        bound_kernel_caches()
        sources = {spec.name or spec.source: spec.source for spec in settings.models}
        models = model_loaders(sources, settings.engine_options(), resolve_device(settings.gpu))
        if not settings.lazy_load:
            # Loaded before the replica counts as started: Serve sends it no request before, and a
            # model that cannot load fails the replica's start (Serve retries, then reports the deployment).
            models = {name: load() for name, load in models.items()}
        app = create_app(models if len(models) > 1 else next(iter(models.values())), settings)
        app.add_middleware(ServedByMiddleware)
        _keep_replica_app(app)
        return app

    return build_app


def _keep_replica_app(app: Any) -> None:
    # A module-level function: Serve ships the builder by value (its globals would be a copy), this by name.
    global _replica_app
    _replica_app = app


class _EngineReplica:
    """The engine deployment's class: the app's routes (through ``serve.ingress``) and the gateway's call."""

    async def forward_http(self, scope: dict[str, Any], body: bytes) -> AsyncIterator[dict[str, Any]]:
        async for message in forward_http(_replica_app, scope, body):
            yield message


def gateway_builder(settings: Settings) -> Callable[[], Any]:
    """What the gateway replica runs: HTTP through a handle to the engine deployment, WebSockets relayed."""

    def build_gateway() -> Any:
        from ray import serve
        from starlette.applications import Starlette
        from starlette.routing import Mount

        engine = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=ENGINE_APP)
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
        gateway = Gateway(engine, f"ws://{host}:{settings.port}", settings.max_upload_bytes)
        return Starlette(routes=[Mount("/", app=gateway)])

    return build_gateway


def deployment(settings: Settings, options: RayOptions) -> Any:
    """The bound Serve application (``serve.run`` / an application builder's return value)."""
    from ray import serve

    check_shared_store(settings, options)
    scaling: dict[str, Any]
    if options.max_replicas is not None:
        scaling = {
            "autoscaling_config": {
                "min_replicas": options.min_replicas,
                "max_replicas": options.max_replicas,
                "target_ongoing_requests": options.target_ongoing_requests,
            }
        }
    else:
        scaling = {"num_replicas": options.num_replicas}
    # What replicas read from the environment themselves (asset and cache folders, the voice store);
    # API keys travel in the settings only, never in the runtime env that the dashboard shows.
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX) and "API_KEY" not in k}
    ingress = serve.ingress(app_builder(settings))(type(DEPLOYMENT_NAME, (_EngineReplica,), {}))
    return serve.deployment(
        ingress,
        name=DEPLOYMENT_NAME,
        ray_actor_options={
            "num_cpus": options.num_cpus,
            "num_gpus": options.num_gpus,
            "runtime_env": {"env_vars": env},
        },
        # A replica may wait for its engine; 503s while a model loads are the app's own answer.
        max_ongoing_requests=max(settings.max_concurrency + settings.max_queue, 1),
        health_check_period_s=2,
        health_check_timeout_s=30,
        **scaling,
    ).bind()


def gateway(settings: Settings) -> Any:
    """The bound gateway application (one replica without a model, on no CPU of its own)."""
    from ray import serve

    ingress = serve.ingress(gateway_builder(settings))(type(GATEWAY_NAME, (), {}))
    return serve.deployment(
        ingress, name=GATEWAY_NAME, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000
    ).bind()


# -- `serve deploy` -------------------------------------------------------------------------------

_RAY_ARGS = {
    "num_replicas": int,
    "min_replicas": int,
    "max_replicas": int,
    "target_ongoing_requests": float,
    "ray_num_cpus": float,
    "ray_num_gpus": float,
    "single_node_sqlite": lambda v: v if isinstance(v, bool) else _parse_bool(str(v)),
}


def settings_from_build_args(args: Mapping[str, Any] | None) -> tuple[Settings, RayOptions]:
    """The server settings and scaling options of a Serve config's ``args``."""
    args = dict(args or {})
    ray_args = {k: parse(args.pop(k)) for k, parse in _RAY_ARGS.items() if k in args}
    parser = argparse.ArgumentParser(prog="cosyserve.deploy.ray_serve:build", add_help=False)
    add_server_arguments(parser)
    if "voice_store" in args and not any(a.dest == "voice_store" for a in parser._actions):
        # A server without the store flag reads the store from the environment (the replicas' too).
        os.environ[ENV_PREFIX + "VOICE_STORE"] = str(args.pop("voice_store"))
    argv: list[str] = []
    for key, value in args.items():
        for item in value if isinstance(value, list) else [value]:
            argv += [f"--{key}", str(item).lower() if isinstance(item, bool) else str(item)]
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        raise SettingsError(f"unknown args in the Serve config: {' '.join(a for a in unknown if a.startswith('--'))}")
    return settings_from_args(namespace), _ray_options(ray_args)


def build_engine(args: dict[str, Any]) -> Any:
    """Application builder of the engine replicas (the ``cosyserve-engine`` application, route
    ``/_engine``) for ``serve deploy``: ``args`` holds the server flags by name (``model_dir``, a list when
    repeated; ``data_dir``, ``voice_store``...) and the scaling options above; the environment twins
    (``COSYSERVE_*``) apply as for ``cosyserve serve``."""
    return deployment(*settings_from_build_args(args))


def build(args: dict[str, Any]) -> Any:
    """Application builder of the gateway (the ``cosyserve`` application, route ``/``), with the same
    ``args`` as :func:`build_engine` (it reads the port, the host and the upload limit)."""
    return gateway(settings_from_build_args(args)[0])


def _ray_options(values: Mapping[str, Any], address: str = "local") -> RayOptions:
    return RayOptions(
        num_replicas=int(values.get("num_replicas") or 1),
        min_replicas=values.get("min_replicas"),
        max_replicas=values.get("max_replicas"),
        target_ongoing_requests=float(values.get("target_ongoing_requests") or 2.0),
        num_cpus=float(values.get("ray_num_cpus", 1.0)),
        num_gpus=float(values.get("ray_num_gpus", 0.0)),
        address=address,
        single_node_sqlite=bool(values.get("single_node_sqlite", False)),
    )


# -- `cosyserve ray` ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``cosyserve ray`` beyond the server's."""
    group = parser.add_argument_group("Ray Serve")
    group.add_argument("--num_replicas", "--num-replicas", type=int, default=1, help="replicas (default %(default)s)")
    group.add_argument("--min_replicas", type=int, help="autoscaling: fewest replicas (with --max_replicas)")
    group.add_argument("--max_replicas", type=int, help="autoscaling: most replicas (with --min_replicas)")
    group.add_argument(
        "--target_ongoing_requests", type=float, default=2.0, help="autoscaling: requests per replica to aim at"
    )
    group.add_argument("--ray_num_cpus", type=float, default=1.0, help="CPUs per replica (default %(default)s)")
    group.add_argument("--ray_num_gpus", type=float, default=0.0, help="GPUs per replica (default %(default)s)")
    group.add_argument(
        "--ray_address",
        default="local",
        help="Ray cluster to join (host:port or 'auto'); 'local' starts one in this process (default %(default)s)",
    )
    group.add_argument("--ray_temp_dir", help="temporary directory of a local cluster (default: Ray's /tmp/ray)")
    group.add_argument(
        "--single_node_sqlite",
        action="store_true",
        help="let the replicas of this one machine share the data_dir's SQLite voice library "
        "(instead of --voice_store postgresql://...)",
    )
    if not any(a.dest == "voice_store" for a in parser._actions):  # the store flag belongs to the server
        group.add_argument(
            "--voice_store",
            default=os.environ.get(ENV_PREFIX + "VOICE_STORE", ""),
            help=f"shared voice store, postgresql://... (env {ENV_PREFIX}VOICE_STORE)",
        )


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run the deployment on Ray until SIGINT / SIGTERM; the HTTP proxy listens on host:port."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "voice_store", "") and not getattr(settings, "voice_store", None):
        os.environ[ENV_PREFIX + "VOICE_STORE"] = args.voice_store
    options = _ray_options(vars(args), args.ray_address)
    check_shared_store(settings, options)  # before a cluster is started for nothing
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise SettingsError("Ray Serve is not installed: pip install 'cosyserve[ray]'") from exc

    if options.address == "local":
        ray.init(address="local", include_dashboard=False, _temp_dir=args.ray_temp_dir or None)
    else:
        ray.init(address=options.address)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(deployment(settings, options), name=ENGINE_APP, route_prefix=ENGINE_PREFIX, blocking=False)
        serve.run(gateway(settings), name=APP_NAME, route_prefix="/", blocking=False)
        logger.info(
            "cosyserve on Ray Serve: http://%s:%d, %s",
            settings.host,
            settings.port,
            f"{options.min_replicas}-{options.max_replicas} replicas"
            if options.max_replicas is not None
            else f"{options.num_replicas} replica(s)",
        )
        print(f"cosyserve ray: serving on http://{settings.host}:{settings.port}", flush=True)
        while not stop.wait(0.5):  # a timed wait lets the signal handlers run
            pass
        logger.info("stopping the deployment and the Ray connection")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
