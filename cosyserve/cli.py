"""``cosyserve serve | ray | client | synth-file | bench``.

``serve`` and ``client`` take the flags of the official ``runtime/python/fastapi`` scripts. The client
uses the standard library only (no torch), so it runs anywhere Python does.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import socket
import sys
import uuid
import wave
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cosyserve.settings import Settings, SettingsError, add_server_arguments, settings_from_args

logger = logging.getLogger("cosyserve")

MODES = ("sft", "zero_shot", "cross_lingual", "instruct", "instruct2", "vc")

# The official client's defaults.
DEFAULT_TTS_TEXT = "你好，我是通义千问语音合成大模型，请问有什么可以帮您的吗？"
DEFAULT_SPK_ID = "中文女"
DEFAULT_PROMPT_TEXT = "希望你以后能够做的比我还好呦。"
DEFAULT_INSTRUCT_TEXT = (
    "Theo 'Crimson', is a fiery, passionate rebel leader. Fights with fervor for justice, "
    "but struggles with impulsiveness."
)


class CliError(Exception):
    """Ends the command with one line on stderr and a non-zero exit status."""


# -- serve ----------------------------------------------------------------------------------------


def bind_socket(host: str, port: int) -> socket.socket:
    """Listen early, so a taken port fails at once instead of after the model has loaded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def server_loaders(settings: Settings) -> dict[str, Any]:
    """A loader per ``--model_dir`` entry, keyed by its name, on the device ``--gpu`` picks (imports torch)."""
    from cosyserve.engine.loading import resolve_device
    from cosyserve.engine.pipeline import model_loaders

    try:
        device = resolve_device(settings.gpu)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    sources = {spec.name or spec.source: spec.source for spec in settings.models}
    return model_loaders(sources, settings.engine_options(), device)


def serve(settings: Settings) -> int:
    import uvicorn

    from cosyserve.api import create_app
    from cosyserve.engine.memory import bound_kernel_caches, limit_malloc_arenas

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limit_malloc_arenas(settings.malloc_arenas)  # before the loaders and the engine start their threads
    bound_kernel_caches()  # before the models run their first convolution
    sock = bind_socket(settings.host, settings.port)
    failures: list[tuple[str, BaseException]] = []

    def stopping_on_failure(name: str, load: Any) -> Any:
        def guarded() -> Any:
            try:
                return load()
            except BaseException as exc:
                failures.append((name, exc))
                server.should_exit = True  # a server without its models is of no use: stop it
                raise

        # A lazily loaded model fails on its first request: that request and /health report it.
        return load if settings.lazy_load else guarded

    loaders = {name: stopping_on_failure(name, load) for name, load in server_loaders(settings).items()}
    app = create_app(loaders if len(loaders) > 1 else next(iter(loaders.values())), settings)
    logger.info(
        "listening on http://%s:%d; GET /health answers 503 until the model%s loaded",
        settings.host,
        settings.port,
        "s are" if len(loaders) > 1 else " is",
    )
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level))
    server.run(sockets=[sock])
    if failures:
        name, exc = failures[0]
        raise CliError(f"cannot load model {name}: {exc}")
    return 0


# -- client ---------------------------------------------------------------------------------------


def _multipart(fields: dict[str, str], files: dict[str, Path]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = bytearray()
    for name, value in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        out += value.encode() + b"\r\n"
    for name, path in files.items():
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CliError(f"cannot read --{name} {path}: {exc.strerror or exc}") from exc
        filename = path.name.replace('"', "%22")
        out += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def _request_parts(args: argparse.Namespace) -> tuple[dict[str, str], dict[str, Path]]:
    texts = {
        "sft": ("tts_text", "spk_id"),
        "zero_shot": ("tts_text", "prompt_text"),
        "cross_lingual": ("tts_text",),
        "instruct": ("tts_text", "spk_id", "instruct_text"),
        "instruct2": ("tts_text", "instruct_text"),
        "vc": (),
    }[args.mode]
    uploads = {"zero_shot": ("prompt_wav",), "cross_lingual": ("prompt_wav",), "instruct2": ("prompt_wav",)}
    uploads["vc"] = ("source_wav", "prompt_wav")
    fields = {name: getattr(args, name) for name in texts}
    files: dict[str, Path] = {}
    for name in uploads.get(args.mode, ()):
        if getattr(args, name) is None:
            raise CliError(f"--{name} is required for mode {args.mode}")
        files[name] = Path(getattr(args, name))
    fields["format"] = args.format
    for name in ("speed", "seed"):
        if getattr(args, name) is not None:
            fields[name] = str(getattr(args, name))
    if args.stream:
        fields["stream"] = "true"
    return fields, files


def _error_line(status: int, body: bytes) -> str:
    try:
        error = json.loads(body)["error"]
        where = f" [{error['param']}]" if error.get("param") else ""
        return f"HTTP {status} {error.get('code', '')}{where}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        text = body.decode("utf-8", "replace").strip().splitlines()
        return f"HTTP {status}: {text[0] if text else 'no details'}"


def _wav_layout(head: bytes) -> tuple[int, int, int] | None:
    """``(sample_rate, channels, data offset)`` of a PCM16 WAV header in ``head``; None: need more bytes."""
    pos, fmt = 12, None
    while pos + 8 <= len(head):
        chunk_id, size = head[pos : pos + 4], int.from_bytes(head[pos + 4 : pos + 8], "little")
        if chunk_id == b"fmt ":
            if pos + 24 > len(head):
                return None
            tag = int.from_bytes(head[pos + 8 : pos + 10], "little")
            channels = int.from_bytes(head[pos + 10 : pos + 12], "little")
            rate = int.from_bytes(head[pos + 12 : pos + 16], "little")
            bits = int.from_bytes(head[pos + 22 : pos + 24], "little")
            if tag not in (1, 0xFFFE) or bits != 16:
                raise CliError(f"the server sent WAV audio in an unsupported encoding (tag {tag}, {bits} bits)")
            fmt = (rate, channels)
        elif chunk_id == b"data":
            if fmt is None:
                raise CliError("the server sent a WAV without a fmt chunk before its data")
            return fmt[0], fmt[1], pos + 8
        pos += 8 + size + (size & 1)
    return None


def run_client(args: argparse.Namespace) -> int:
    fields, files = _request_parts(args)
    body, content_type = _multipart(fields, files)
    conn = http.client.HTTPConnection(args.host, args.port, timeout=args.timeout)
    out = Path(args.tts_wav)
    partial = out.with_name(out.name + ".part")
    try:
        headers = {"Content-Type": content_type}
        if args.api_key:
            headers["Authorization"] = f"Bearer {args.api_key}"
        conn.request(args.method, f"/inference_{args.mode}", body=body, headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            raise CliError(_error_line(resp.status, resp.read()))
        header_rate = resp.getheader("X-Sample-Rate")
        channels = int(resp.getheader("X-Channels") or 1)
        head = b""
        while len(head) < 4 and (piece := resp.read(16000)):
            head += piece
        if head[:4] == b"RIFF":
            while (layout := _wav_layout(head)) is None:
                piece = resp.read(16000)
                if not piece:
                    raise CliError("the server's WAV header ended before its data chunk")
                head += piece
            rate, channels, offset = layout
            head = head[offset:]
        elif header_rate or args.sample_rate:
            rate = int(header_rate or args.sample_rate)
        else:
            raise CliError(
                "the server sent raw PCM without stating its sample rate: pass --sample_rate "
                "(22050 for CosyVoice-300M models, 24000 for CosyVoice2 / CosyVoice3)"
            )
        frames = 0
        with wave.open(str(partial), "wb") as wav:
            wav.setnchannels(channels)
            wav.setsampwidth(2)
            wav.setframerate(rate)
            pending = head
            while True:
                usable = len(pending) - len(pending) % (2 * channels)
                wav.writeframes(pending[:usable])
                frames += usable // (2 * channels)
                pending = pending[usable:]
                piece = resp.read(16000)
                if not piece:
                    break
                pending += piece
        os.replace(partial, out)
    except http.client.IncompleteRead as exc:
        raise CliError("the server cut the audio stream short (generation failed on the server?)") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise CliError(f"request to {args.host}:{args.port} failed: {exc}") from exc
    finally:
        conn.close()
        partial.unlink(missing_ok=True)
    print(f"wrote {out}: {frames / rate:.2f} s at {rate} Hz")
    return 0


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="server host (default %(default)s)")
    parser.add_argument("--port", type=int, default=50000, help="server port (default %(default)s)")
    parser.add_argument("--mode", default="sft", choices=MODES, help="endpoint to call (default %(default)s)")
    parser.add_argument("--tts_text", default=DEFAULT_TTS_TEXT, help="text to speak")
    parser.add_argument("--spk_id", default=DEFAULT_SPK_ID, help="built-in speaker (sft, instruct)")
    parser.add_argument("--prompt_text", default=DEFAULT_PROMPT_TEXT, help="transcript of --prompt_wav (zero_shot)")
    parser.add_argument("--prompt_wav", help="prompt recording (zero_shot, cross_lingual, instruct2, vc)")
    parser.add_argument("--source_wav", help="recording to convert (vc)")
    parser.add_argument("--instruct_text", default=DEFAULT_INSTRUCT_TEXT, help="instruction (instruct, instruct2)")
    parser.add_argument("--tts_wav", default="demo.wav", help="output WAV file (default %(default)s)")
    parser.add_argument(
        "--sample_rate", type=int, help="sample rate of a server that sends raw PCM without saying it (official)"
    )
    parser.add_argument("--format", default="wav", choices=("wav", "pcm"), help="audio format to ask for")
    parser.add_argument("--stream", action="store_true", help="ask for token-level streaming")
    parser.add_argument("--speed", type=float, help="speaking rate factor")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument("--method", default="POST", choices=("GET", "POST"), help="HTTP method (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server")
    parser.add_argument(
        "--api_key",
        "--api-key",
        default=client_api_key(os.environ),
        help="API key of a server started with --api_key, sent as a Bearer token "
        "(env COSYSERVE_API_KEY; the first key there when it lists several)",
    )


def client_api_key(environ: Mapping[str, str]) -> str | None:
    keys = [k.strip() for k in environ.get("COSYSERVE_API_KEY", "").split(",") if k.strip()]
    return keys[0] if keys else None


# -- entry point ----------------------------------------------------------------------------------


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cosyserve", description="CosyVoice text-to-speech server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the HTTP server (official API)")
    # Server environment variables are parsed only for serve, so a bad one cannot break the client.
    add_server_arguments(serve_parser, None if command == "serve" else {})
    ray_parser = commands.add_parser("ray", help="run the HTTP server as a Ray Serve deployment (cosyserve[ray])")
    add_server_arguments(ray_parser, None if command == "ray" else {})
    from cosyserve.deploy import ray_serve  # imports Ray only when it runs

    ray_serve.add_arguments(ray_parser)
    client_parser = commands.add_parser("client", help="call a running server and write a WAV file")
    add_client_arguments(client_parser)
    synth_parser = commands.add_parser(
        "synth-file", help="speak a text file as a long-form job (a server, or in-process) with a progress bar"
    )
    from cosyserve import synth_file

    synth_file.add_arguments(synth_parser)
    bench_parser = commands.add_parser("bench", help="measure per-stage speed and memory")
    if command == "bench":  # bench imports torch: only when it is the command
        from cosyserve import bench

        bench.add_arguments(bench_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(argv[0] if argv else None).parse_args(argv)
        if args.command == "serve":
            return serve(settings_from_args(args))
        if args.command == "ray":
            from cosyserve.deploy import ray_serve

            return ray_serve.run(settings_from_args(args), args)
        if args.command == "client":
            return run_client(args)
        if args.command == "synth-file":
            from cosyserve import synth_file

            try:
                return synth_file.run(args)
            except synth_file.SynthFileError as exc:
                raise CliError(str(exc)) from exc
        from cosyserve import bench

        return bench.run(args)
    except (CliError, SettingsError) as exc:
        print(f"cosyserve: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, SettingsError) else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
