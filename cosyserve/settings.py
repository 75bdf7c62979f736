"""Server settings: command-line flags, each with an environment twin (``COSYSERVE_<FLAG>``).

A flag given on the command line wins over its environment variable, which wins over the default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

ENV_PREFIX = "COSYSERVE_"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


class SettingsError(ValueError):
    """A flag or environment value that cannot be used."""


@dataclass(frozen=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = 50000
    model_dir: str = "iic/CosyVoice-300M"
    # CUDA device index; None picks cuda:0 when CUDA is there (else the CPU), -1 forces the CPU.
    gpu: int | None = None
    max_text_length: int = 5000  # characters, per text field
    max_upload_bytes: int = 20 * 1024 * 1024  # whole request body
    cors_origins: tuple[str, ...] = ("*",)  # empty: no CORS headers at all
    cors_allow_credentials: bool = False
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise SettingsError(f"port {self.port} is not in 1..65535")
        if self.gpu is not None and self.gpu < -1:
            raise SettingsError(f"gpu {self.gpu} is not a device index (use -1 for the CPU)")
        if self.max_text_length < 1:
            raise SettingsError("max_text_length must be at least 1")
        if self.max_upload_bytes < 1:
            raise SettingsError("max upload size must be positive")
        if self.log_level not in LOG_LEVELS:
            raise SettingsError(f"log level {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        if self.cors_allow_credentials and "*" in self.cors_origins:
            # Browsers refuse credentialed responses with a wildcard origin; echoing any origin instead
            # would let every site act with the user's cookies, so refuse the combination outright.
            raise SettingsError("CORS credentials cannot be allowed with the wildcard origin '*': list the origins")


def _env(name: str, environ: Mapping[str, str]) -> str | None:
    """The twin's value; an empty one counts as unset, except for CORS origins where it disables CORS."""
    value = environ.get(ENV_PREFIX + name.upper())
    if value == "" and name != "cors_origins":
        return None
    return value


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"{text!r} is not a boolean (use true/false)")


def _parse_origins(text: str) -> tuple[str, ...]:
    return tuple(o.strip() for o in text.split(",") if o.strip())


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
        "local model directory, ModelScope id or Hugging Face id (default %(default)s)",
        str,
        d.model_dir,
    )
    opt("gpu", "CUDA device index, -1 for the CPU (default: cuda:0 when available, else the CPU)", int, d.gpu, type=int)
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


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Build validated Settings from the namespace filled by :func:`add_server_arguments`."""
    upload_mb = float(args.max_upload_mb)
    return Settings(
        host=args.host,
        port=int(args.port),
        model_dir=args.model_dir,
        gpu=None if args.gpu is None else int(args.gpu),
        max_text_length=int(args.max_text_length),
        max_upload_bytes=int(upload_mb * 1024 * 1024),
        cors_origins=_parse_origins(args.cors_origins),
        cors_allow_credentials=bool(args.cors_allow_credentials),
        log_level=args.log_level,
    )


def load_settings(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from command-line style ``argv`` (none: defaults) and the environment."""
    parser = argparse.ArgumentParser(add_help=False)
    add_server_arguments(parser, environ)
    return settings_from_args(parser.parse_args(argv or []))
