"""Server settings: command-line flags, each with an environment twin (``COSYSERVE_<FLAG>``).

A flag given on the command line wins over its environment variable, which wins over the default.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cosyserve.audio.rates import OUTPUT_RATES
from cosyserve.engine.voice_library import check_voice_store
from cosyserve.precision import (
    DEFAULT_STREAM_CACHE_MB,
    DEFAULT_STREAM_LAST_CHUNK,
    STREAM_LAST_CHUNK_MODES,
    check_engine_precision,
)

if TYPE_CHECKING:
    from cosyserve.engine.loading import EngineOptions

ENV_PREFIX = "COSYSERVE_"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
TEXT_FRONTENDS = ("auto", "wetext", "none")
# Default body of the official routes: wav (a header, then the official server's samples) or pcm
# (raw int16, byte-identical to the official server, for clients written against it).
OFFICIAL_FORMATS = ("wav", "pcm")


class SettingsError(ValueError):
    """A flag or environment value that cannot be used."""


_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ModelSpec:
    """One ``--model_dir`` entry: ``[name=]path_or_hub_id``."""

    source: str  # local directory, ModelScope id or Hugging Face id
    name: str = ""  # the name clients use; empty: the model's id (hub id, else directory name)


def parse_model_specs(text: str) -> tuple[ModelSpec, ...]:
    """``v1=iic/CosyVoice-300M-SFT,/models/CosyVoice2-0.5B`` -> the models, in order.

    ``name=`` is taken as a name only when it looks like one (a path may hold '=' after a '/').
    """
    specs = []
    for item in _comma_list(text):
        name, sep, source = item.partition("=")
        if sep and "/" not in name and "\\" not in name:
            if not _MODEL_NAME.match(name.strip()):
                raise SettingsError(f"model name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
            specs.append(ModelSpec(source.strip(), name.strip()))
        else:
            specs.append(ModelSpec(item))
    if not specs or any(not spec.source for spec in specs):
        raise SettingsError("model_dir needs a model directory or hub id for every entry")
    names = [spec.name.lower() for spec in specs if spec.name]
    if len(set(names)) != len(names):
        raise SettingsError("model names given with name=... must be unique")
    return tuple(specs)


@dataclass(frozen=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = 50000
    # One model or several, comma-separated, each ``[name=]path_or_hub_id`` (see ``models``).
    model_dir: str = "iic/CosyVoice-300M"
    default_model: str = ""  # the model of tts-1 / tts-1-hd and of requests naming none; empty: the first
    lazy_load: bool = False  # load each model on its first request instead of at start-up
    # CUDA device index; None picks cuda:0 when CUDA is there (else the CPU), -1 forces the CPU.
    gpu: int | None = None
    threads: int = 0  # torch intra-op and onnxruntime threads of the engine; 0: every core of the machine
    dtype: str = "fp32"  # precision per stage: fp32 | bf16 | fast | "llm=int8,flow=bf16" (cosyserve.precision)
    flow_steps: int = 0  # Euler steps of the flow; 0: the model's own (10)
    stream_last_chunk: str = DEFAULT_STREAM_LAST_CHUNK  # streamed v2/v3 last chunk: causal | reference (full context)
    stream_cache_mb: int = DEFAULT_STREAM_CACHE_MB  # the streamed requests' flow caches together; 0: automatic
    max_text_length: int = 5000  # characters, per text field
    max_upload_bytes: int = 20 * 1024 * 1024  # whole request body
    cors_origins: tuple[str, ...] = ("*",)  # empty: no CORS headers at all
    cors_allow_credentials: bool = False
    log_level: str = "info"
    # OpenAI voice names (alloy, echo...) -> speaker / stored voice ids, for /v1/audio/speech.
    voice_map: tuple[tuple[str, str], ...] = ()
    pcm_sample_rate: int = 24000  # /v1/audio/speech pcm without sample_rate: OpenAI's 24 kHz
    # The voice library's directory; "" keeps stored voices in memory only (lost at exit).
    data_dir: str = field(default_factory=lambda: default_data_dir())
    max_voices: int = 1000  # stored voices, all model families together
    # Where voices are stored: "" the SQLite library under data_dir; a postgresql:// URL a shared database.
    voice_store: str = ""
    # Long-form jobs (POST /v1/audio/jobs): THE job limits.
    max_job_text_length: int = 500_000  # characters of a job's input
    max_running_jobs: int = 1  # jobs synthesising at once (server-wide); more wait queued
    max_jobs_per_key: int = 8  # jobs queued or running per API key; beyond: 429
    max_job_storage_bytes: int = 2048 * 1024 * 1024  # job audio stored per API key; beyond: 507
    max_concurrency: int = 8  # requests generating at once (the decode batch); more wait in a FIFO queue
    max_queue: int = 64  # requests waiting for a slot; beyond that: 503 with Retry-After
    malloc_arenas: int = 2  # glibc malloc arenas of the server process; 0: glibc's default (8 per core)
    # The LLM weights file in the model directory; Fun-CosyVoice3 also ships the RL-tuned llm.rl.pt.
    llm_weights: str = "llm.pt"
    text_frontend: str = "auto"  # text normaliser: auto (wetext when installed) | wetext | none
    official_format: str = "wav"  # /inference_* without a format field: wav | pcm (as the official server)
    # Accepted API keys; empty: no authentication. Never in the repr, so never in a log line.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    # Paths open without a key; an entry ending in '*' is a prefix.
    auth_exempt: tuple[str, ...] = ("/health", "/metrics")

    @property
    def models(self) -> tuple[ModelSpec, ...]:
        return parse_model_specs(self.model_dir)

    def engine_options(self) -> EngineOptions:
        """The options every model of this server is loaded with."""
        from cosyserve.engine.loading import EngineOptions  # torch: imported when a model is loaded only

        return EngineOptions(
            data_dir=Path(self.data_dir).expanduser() if self.data_dir else None,
            voice_store=self.voice_store,
            max_voices=self.max_voices,
            llm_weights=self.llm_weights,
            text_frontend=self.text_frontend,
            threads=self.threads or os.cpu_count() or 1,
            dtype=self.dtype,
            flow_steps=self.flow_steps or None,
            stream_last_chunk=self.stream_last_chunk,
            stream_cache_mb=self.stream_cache_mb,
        )

    def __post_init__(self) -> None:
        specs = self.models  # raises on a malformed list
        if self.default_model and not any(self.default_model in (s.name, s.source) for s in specs):
            given = ", ".join(s.name or s.source for s in specs)
            raise SettingsError(f"default_model {self.default_model!r} is not one of the models: {given}")
        if not 0 < self.port < 65536:
            raise SettingsError(f"port {self.port} is not in 1..65535")
        try:
            check_engine_precision(self.dtype, self.stream_last_chunk, self.stream_cache_mb)
        except ValueError as exc:
            raise SettingsError(str(exc)) from exc
        if self.flow_steps < 0:
            raise SettingsError(f"flow_steps must be 0 (the model's) or a positive count, not {self.flow_steps}")
        if self.threads < 0:
            raise SettingsError(f"threads must be 0 (every core) or a positive count, not {self.threads}")
        if self.gpu is not None and self.gpu < -1:
            raise SettingsError(f"gpu {self.gpu} is not a device index (use -1 for the CPU)")
        if self.malloc_arenas < 0:
            raise SettingsError(
                f"malloc_arenas must be 0 (glibc's default) or a positive count, not {self.malloc_arenas}"
            )
        if self.max_concurrency < 1 or self.max_queue < 0:
            raise SettingsError("max_concurrency must be at least 1 and max_queue at least 0")
        if self.max_text_length < 1:
            raise SettingsError("max_text_length must be at least 1")
        if self.max_upload_bytes < 1:
            raise SettingsError("max upload size must be positive")
        if self.text_frontend not in TEXT_FRONTENDS:
            raise SettingsError(f"text frontend {self.text_frontend!r} is not one of {', '.join(TEXT_FRONTENDS)}")
        if self.official_format not in OFFICIAL_FORMATS:
            raise SettingsError(f"official format {self.official_format!r} is not one of {', '.join(OFFICIAL_FORMATS)}")
        if not self.llm_weights or Path(self.llm_weights).name != self.llm_weights:
            raise SettingsError(f"llm_weights {self.llm_weights!r} must be a file name inside the model directory")
        if self.log_level not in LOG_LEVELS:
            raise SettingsError(f"log level {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        if self.cors_allow_credentials and "*" in self.cors_origins:
            # Browsers refuse credentialed responses with a wildcard origin; echoing any origin instead
            # would let every site act with the user's cookies, so refuse the combination outright.
            raise SettingsError("CORS credentials cannot be allowed with the wildcard origin '*': list the origins")
        if self.max_voices < 1:
            raise SettingsError(f"max_voices must be at least 1, not {self.max_voices}")
        for name in ("max_job_text_length", "max_running_jobs", "max_jobs_per_key", "max_job_storage_bytes"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be at least 1, not {getattr(self, name)}")
        for key in self.api_keys:
            if not key or any(c.isspace() or not c.isprintable() for c in key) or not key.isascii():
                # A header value cannot carry it intact, so no client could ever send it.
                raise SettingsError("an API key must be non-empty printable ASCII without spaces")
        if any(not path.startswith("/") for path in self.auth_exempt):
            raise SettingsError("auth_exempt entries are URL paths starting with '/'")
        try:
            check_voice_store(self.voice_store)
        except ValueError as exc:
            raise SettingsError(str(exc)) from exc
        if self.pcm_sample_rate not in OUTPUT_RATES:
            rates = ", ".join(map(str, OUTPUT_RATES))
            raise SettingsError(f"pcm sample rate {self.pcm_sample_rate} is not one of {rates}")


def default_data_dir(environ: Mapping[str, str] | None = None) -> str:
    """The per-user data directory: ``$XDG_DATA_HOME/cosyserve`` or ``~/.local/share/cosyserve``
    (``%LOCALAPPDATA%\\cosyserve`` on Windows, ``~/Library/Application Support/cosyserve`` on macOS)."""
    env = os.environ if environ is None else environ
    if os.name == "nt":
        base = env.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = str(Path.home() / "Library" / "Application Support")
    else:
        xdg = env.get("XDG_DATA_HOME", "")
        base = xdg if os.path.isabs(xdg) else str(Path.home() / ".local" / "share")  # the spec ignores relative ones
    return str(Path(base) / "cosyserve")


def _env(name: str, environ: Mapping[str, str]) -> str | None:
    """The twin's value; an empty one counts as unset, except for CORS origins (empty: no CORS) and the
    data directory (empty: voices in memory only)."""
    value = environ.get(ENV_PREFIX + name.upper())
    if value == "" and name not in ("cors_origins", "data_dir"):
        return None
    return value


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"{text!r} is not a boolean (use true/false)")


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def read_api_key_file(path: str) -> tuple[str, ...]:
    """The keys in ``path``: one a line; blank lines and lines starting with '#' are skipped."""
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"cannot read the API key file {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    return tuple(s for line in lines if (s := line.strip()) and not s.startswith("#"))


class _AppendOverDefault(argparse.Action):
    """A repeatable flag whose command-line values replace its (environment) default instead of extending it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None):
        current = getattr(namespace, self.dest)
        kept = [] if current is self.default else list(current)
        setattr(namespace, self.dest, [*kept, values])


def parse_voice_map(text: str) -> tuple[tuple[str, str], ...]:
    """``alloy=中文女,echo=英文男`` or a JSON object ``{"alloy": "中文女"}`` -> ((name, voice id), ...)."""
    text = text.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SettingsError(f"voice map is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise SettingsError("voice map JSON must map names to voice id strings")
        pairs = list(data.items())
    else:
        pairs = []
        for item in filter(None, (p.strip() for p in text.split(","))):
            name, sep, voice = item.partition("=")
            if not sep:
                raise SettingsError(f"voice map entry {item!r} is not name=voice_id")
            pairs.append((name, voice))
    pairs = [(k.strip(), v.strip()) for k, v in pairs]
    if any(not k or not v for k, v in pairs):
        raise SettingsError("voice map entries need a name and a voice id")
    return tuple(pairs)


def _env_default(name: str, parse: Callable[[str], Any], fallback: Any, environ: Mapping[str, str]) -> Any:
    raw = _env(name, environ)
    if raw is None:
        return fallback
    try:
        return parse(raw)
    except (ValueError, SettingsError) as exc:
        raise SettingsError(f"${ENV_PREFIX}{name.upper()}={raw!r}: {exc}") from exc


def add_server_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    """Add the server flags to ``parser``; their defaults come from the environment twins.

    Raises SettingsError when an environment value does not parse.
    """
    env = os.environ if environ is None else environ
    d = Settings()
    mb = 1024 * 1024

    def opt(name: str, help_text: str, parse: Callable[[str], Any], fallback: Any, **kwargs: Any) -> None:
        dashed = name.replace("_", "-")
        flags = [f"--{name}"] + ([f"--{dashed}"] if dashed != name else [])
        default = _env_default(name, parse, fallback, env)
        parser.add_argument(
            *flags, dest=name, default=default, help=f"{help_text} (env {ENV_PREFIX}{name.upper()})", **kwargs
        )

    opt("host", "interface to listen on (default %(default)s)", str, d.host)
    opt("port", "port to listen on (default %(default)s)", int, d.port, type=int)
    opt(
        "model_dir",
        "local model directory, ModelScope id or Hugging Face id, optionally name=...; repeat to serve several "
        "models (the env twin takes a comma-separated list) (default %(default)s)",
        _comma_list,
        _comma_list(d.model_dir),
        action=_AppendOverDefault,
        metavar="[NAME=]MODEL",
    )
    opt(
        "default_model",
        "model (name or --model_dir value) that tts-1 and requests naming no model use (default: the first)",
        str,
        d.default_model,
    )
    opt(
        "lazy_load",
        "load each model on its first request instead of at start-up",
        _parse_bool,
        d.lazy_load,
        type=_parse_bool,
        nargs="?",
        const=True,
    )
    opt("gpu", "CUDA device index, -1 for the CPU (default: cuda:0 when available, else the CPU)", int, d.gpu, type=int)
    opt(
        "dtype",
        "precision: fp32, bf16 (LLM and flow), fast (per stage the fastest this CPU runs within measured bounds: "
        "int8 LLM, bf16 flow where the CPU has bf16 instructions), or per stage like llm=int8,flow=bf16 "
        "(default %(default)s)",
        str.lower,
        d.dtype,
    )
    opt("flow_steps", "Euler steps of the flow; 0: the model's 10 (default %(default)s)", int, d.flow_steps, type=int)
    opt(
        "stream_last_chunk",
        "attention of a streamed v2/v3 request's last chunk: causal (chunk-causal like the others: only its "
        "own frames; its audio differs slightly from the reference's) or reference (full context, as the "
        "official code: a full re-run of the flow) (default %(default)s)",
        str.lower,
        d.stream_last_chunk,
        type=str.lower,
        choices=STREAM_LAST_CHUNK_MODES,
    )
    opt(
        "stream_cache_mb",
        "MB of the flow's cached keys / values of all streamed v2/v3 requests together (~4.6 MB per mel "
        "frame, 9 s of audio ~ 2 GB for CosyVoice2 in fp32); a request beyond it re-runs the flow for its "
        "later chunks; 0: half the memory available when the model loads (default %(default)s)",
        int,
        d.stream_cache_mb,
        type=int,
    )
    opt(
        "threads",
        "engine threads, torch and onnxruntime; 0: every core (default %(default)s)",
        int,
        d.threads,
        type=int,
    )
    opt(
        "max_text_length",
        "longest accepted text field, in characters (default %(default)s)",
        int,
        d.max_text_length,
        type=int,
    )
    opt(
        "max_upload_mb",
        "largest accepted request body, in MiB (default %(default)s)",
        float,
        d.max_upload_bytes / mb,
        type=float,
    )
    opt(
        "cors_origins",
        "comma-separated allowed CORS origins, '*' for all, empty to disable CORS (default %(default)s)",
        str,
        ",".join(d.cors_origins),
    )
    opt(
        "cors_allow_credentials",
        "allow credentialed CORS requests (needs explicit origins)",
        _parse_bool,
        d.cors_allow_credentials,
        type=_parse_bool,
        nargs="?",
        const=True,
    )
    opt("log_level", "log level (default %(default)s)", str.lower, d.log_level, type=str.lower, choices=LOG_LEVELS)
    opt(
        "voice_map",
        "OpenAI voice names to voices for /v1/audio/speech: 'alloy=中文女,echo=英文男' or a JSON object",
        parse_voice_map,
        d.voice_map,
        type=parse_voice_map,
    )
    opt(
        "pcm_sample_rate",
        "sample rate of /v1/audio/speech pcm when the request names none (default %(default)s)",
        int,
        d.pcm_sample_rate,
        type=int,
    )

    opt(
        "data_dir",
        "directory of the voice library, created if missing; '' keeps voices in memory only (default %(default)s)",
        str,
        default_data_dir(env),
    )
    opt("max_voices", "most voices the library holds (default %(default)s)", int, d.max_voices, type=int)
    opt(
        "voice_store",
        "a postgresql://user:password@host:port/db URL to keep voices in a PostgreSQL database shared by several "
        "servers (pip install 'cosyserve[postgres]'); empty: the SQLite library under --data_dir (the default)",
        str,
        d.voice_store,
    )
    opt(
        "max_job_text_length",
        "longest input of a long-form job (POST /v1/audio/jobs), in characters (default %(default)s)",
        int,
        d.max_job_text_length,
        type=int,
    )
    opt(
        "max_running_jobs",
        "long-form jobs synthesising at once, below interactive requests (default %(default)s)",
        int,
        d.max_running_jobs,
        type=int,
    )
    opt(
        "max_jobs_per_key",
        "long-form jobs an API key may have queued or running (default %(default)s)",
        int,
        d.max_jobs_per_key,
        type=int,
    )
    opt(
        "max_job_storage_mb",
        "MiB of job audio an API key may keep stored (default %(default)s)",
        float,
        d.max_job_storage_bytes / mb,
        type=float,
    )
    opt(
        "max_concurrency",
        "generations running at once; more requests wait for a slot (default %(default)s)",
        int,
        d.max_concurrency,
        type=int,
    )
    opt("max_queue", "requests that may wait for a slot before 503 (default %(default)s)", int, d.max_queue, type=int)
    opt(
        "malloc_arenas",
        "glibc malloc arenas of the server (fewer: flat memory under load); 0: glibc's default (default %(default)s)",
        int,
        d.malloc_arenas,
        type=int,
    )
    opt(
        "llm_weights",
        "LLM weights file in the model directory, e.g. llm.rl.pt for Fun-CosyVoice3's RL-tuned LLM "
        "(default %(default)s)",
        str,
        d.llm_weights,
    )
    opt(
        "text_frontend",
        "text normaliser: auto (wetext when installed), wetext or none (default %(default)s)",
        str.lower,
        d.text_frontend,
        type=str.lower,
        choices=TEXT_FRONTENDS,
    )
    opt(
        "official_format",
        "body of the official /inference_* routes when a request names no format: wav, or pcm for raw int16 "
        "byte-identical to the official server (default %(default)s)",
        str.lower,
        d.official_format,
        type=str.lower,
        choices=OFFICIAL_FORMATS,
    )
    opt(
        "api_key",
        "API key clients must send (Authorization: Bearer KEY); repeat for several; the env twin takes a "
        "comma-separated list (default: none, no authentication)",
        _comma_list,
        d.api_keys,
        action=_AppendOverDefault,
        metavar="KEY",
    )
    opt("api_key_file", "file of API keys, one a line, added to --api_key", str, None, metavar="PATH")
    opt(
        "auth_exempt",
        "comma-separated paths open without an API key, '*' at the end for a prefix (default %(default)s)",
        str,
        ",".join(d.auth_exempt),
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Build validated Settings from the namespace filled by :func:`add_server_arguments`."""
    upload_mb = float(args.max_upload_mb)
    return Settings(
        host=args.host,
        port=int(args.port),
        model_dir=",".join(args.model_dir) if isinstance(args.model_dir, (list, tuple)) else args.model_dir,
        default_model=args.default_model,
        lazy_load=bool(args.lazy_load),
        gpu=None if args.gpu is None else int(args.gpu),
        threads=int(args.threads),
        dtype=args.dtype,
        flow_steps=int(args.flow_steps),
        stream_last_chunk=args.stream_last_chunk,
        stream_cache_mb=int(args.stream_cache_mb),
        max_text_length=int(args.max_text_length),
        max_upload_bytes=int(upload_mb * 1024 * 1024),
        cors_origins=_comma_list(args.cors_origins),
        cors_allow_credentials=bool(args.cors_allow_credentials),
        log_level=args.log_level,
        voice_map=tuple(args.voice_map),
        pcm_sample_rate=int(args.pcm_sample_rate),
        data_dir=args.data_dir,
        max_voices=int(args.max_voices),
        voice_store=args.voice_store,
        max_job_text_length=int(args.max_job_text_length),
        max_running_jobs=int(args.max_running_jobs),
        max_jobs_per_key=int(args.max_jobs_per_key),
        max_job_storage_bytes=int(float(args.max_job_storage_mb) * 1024 * 1024),
        max_concurrency=int(args.max_concurrency),
        max_queue=int(args.max_queue),
        malloc_arenas=int(args.malloc_arenas),
        llm_weights=args.llm_weights,
        text_frontend=args.text_frontend,
        official_format=args.official_format,
        api_keys=tuple(args.api_key) + (read_api_key_file(args.api_key_file) if args.api_key_file else ()),
        auth_exempt=_comma_list(args.auth_exempt),
    )
