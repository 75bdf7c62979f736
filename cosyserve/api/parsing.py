"""Reading a request: the size-limited body, form fields (multipart, urlencoded, query), text and audio
fields, and the options every synthesis route shares, each checked once, strictly, with a clear 4xx."""

from __future__ import annotations

import math
import re
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import anyio
from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect
from starlette.types import Message

from cosyserve.audio.encode import ENCODERS
from cosyserve.audio.prompt import CheckedAudio, PromptLimits, check_prompt_audio
from cosyserve.engine.client import EngineClient
from cosyserve.engine.inputs import unsupported_mode
from cosyserve.errors import AudioError, InvalidRequest, MalformedBody, MissingField, PayloadTooLarge, TextError

Fields = dict[str, str | UploadFile]


def check_mode(engine: EngineClient, mode: str) -> None:
    """Refuse, before reading uploads, a mode the loaded model cannot serve."""
    if mode not in engine.modes:
        raise unsupported_mode(engine.info.family, mode, engine.modes)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole request body, refused as soon as it passes ``max_bytes``."""
    too_large = PayloadTooLarge(f"the request body is over the limit of {max_bytes} bytes")
    declared = request.headers.get("content-length", "")
    if _ASCII_INTEGER.fullmatch(declared) and (len(declared) > 18 or int(declared) > max_bytes):
        raise too_large
    body = bytearray()
    try:
        async for piece in request.stream():
            body += piece
            if len(body) > max_bytes:
                raise too_large
    except ClientDisconnect as exc:
        raise MalformedBody("the client disconnected during the upload") from exc
    return bytes(body)


Body = TypeVar("Body", bound=BaseModel)


def parse_json_body(model: type[Body], body: bytes, empty_hint: str) -> Body:
    """A JSON body as ``model``: an empty body is a 400 saying ``empty_hint`` (what to send); broken JSON and
    a field pydantic refuses are 400s naming what is wrong (the first field's path as ``param``)."""
    if not body.strip():
        raise MalformedBody(empty_hint)
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise MalformedBody(f"the body is not valid JSON: {first['msg']}") from exc
        param = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidRequest(f"{param}: {first['msg']}" if param else first["msg"], param=param) from exc


async def read_fields(request: Request, max_bytes: int) -> Fields:
    """Query parameters overlaid with the form body (multipart or urlencoded), size-limited."""
    body = await read_body(request, max_bytes)

    fields: Fields = _urlencoded(request.scope.get("query_string", b""), "query string")
    if not body:
        return fields
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/x-www-form-urlencoded":
        fields.update(_urlencoded(bytes(body), "form body"))
        return fields
    if content_type != "multipart/form-data":
        raise MalformedBody(
            f"send the fields as multipart/form-data or application/x-www-form-urlencoded, not {content_type or '?'}"
        )
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": bytes(body), "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_part_size=max_bytes)
    except Exception as exc:  # python-multipart / starlette parse errors: the body is at fault
        raise MalformedBody(f"the form body does not parse: {getattr(exc, 'detail', exc)}") from exc
    fields.update(form.items())
    return fields


def _urlencoded(raw: bytes, where: str) -> Fields:
    """Decode ``a=1&b=2`` as UTF-8, raw or percent-encoded (curl -d sends Chinese text unencoded)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedBody(f"the {where} is not valid UTF-8") from exc
    try:
        return dict(parse_qsl(text, keep_blank_values=True, max_num_fields=1000))
    except ValueError as exc:
        raise MalformedBody(f"the {where} has too many fields") from exc


def text_field(fields: Fields, name: str, max_length: int) -> str:
    value = fields.get(name)
    if isinstance(value, UploadFile):
        raise InvalidRequest(f"{name} must be a text field, not a file", param=name)
    if value is None or not value.strip():
        raise MissingField(f"{name} is {'required' if value is None else 'empty'}", param=name)
    if len(value) > max_length:
        raise TextError(f"{name} has {len(value)} characters; at most {max_length} are accepted", param=name)
    return value


def check_audio(name: str, data: bytes, limits: PromptLimits) -> CheckedAudio:
    """An uploaded recording decoded and checked once, with the engine's limits (it is not decoded again)."""
    return check_prompt_audio(data, name, limits)


async def audio_field(fields: Fields, name: str, limits: PromptLimits) -> CheckedAudio:
    value = fields.get(name)
    if value is None or value == "":
        raise MissingField(f"{name} is required: upload an audio file (multipart/form-data)", param=name)
    if not isinstance(value, UploadFile):
        raise AudioError(f"{name} must be an uploaded file (multipart/form-data), not a text value", param=name)
    data = await value.read()
    if not data:
        raise AudioError(f"{name} is empty (0 bytes)", param=name)
    return await anyio.to_thread.run_sync(check_audio, name, data, limits)


MAX_SEED = 2**63 - 1
MAX_SAMPLE_RATE = 10**6  # far above every output rate; the format check names the ones it takes
# Numbers from a query string or a form field are ASCII: str.isdigit() and float() also take other
# scripts' digits, and "²" passes isdigit() but not int().
_ASCII_INTEGER = re.compile(r"[0-9]+", re.ASCII)
_ASCII_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)


def parse_integer(raw: str, name: str, maximum: int, what: str) -> int:
    """A field's non-negative decimal integer, at most ``maximum``; anything else is a 400 naming ``what``."""
    # The length check comes first: int() refuses strings of over 4300 digits with a ValueError.
    if not _ASCII_INTEGER.fullmatch(raw) or len(raw) > len(str(maximum)) or int(raw) > maximum:
        raise InvalidRequest(f"{name} must be {what}, not {raw!r}", param=name)
    return int(raw)


def parse_number(raw: str, name: str, what: str) -> float:
    """A field's finite decimal number (no inf / nan / non-ASCII digits); anything else is a 400."""
    value = float(raw) if len(raw) <= 64 and _ASCII_NUMBER.fullmatch(raw) else math.nan
    if not math.isfinite(value):
        raise InvalidRequest(f"{name} must be {what}, not {raw!r}", param=name)
    return value


def option(fields: Fields, name: str) -> str | None:
    value = fields.get(name)
    if isinstance(value, UploadFile):
        raise InvalidRequest(f"{name} must be a text field, not a file", param=name)
    return value.strip() if value is not None and value.strip() else None


def parse_flag(fields: Fields, name: str) -> bool:
    """An optional boolean field (true / false, 1 / 0, yes / no, on / off; absent: false)."""
    raw = option(fields, name)
    if raw is None:
        return False
    if raw.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        raise InvalidRequest(f"{name} must be true or false, not {raw!r}", param=name)
    return raw.lower() in ("true", "1", "yes", "on")


def parse_options(fields: Fields, default_format: str = "wav") -> tuple[dict[str, Any], str]:
    """``({stream, speed, seed}, format)`` from the optional fields; ``default_format`` when none is named."""
    stream = parse_flag(fields, "stream")
    speed = 1.0
    if (raw := option(fields, "speed")) is not None:
        speed = parse_number(raw, "speed", "a positive number")
        if speed <= 0:
            raise InvalidRequest(f"speed must be a positive number, not {raw!r}", param="speed")
    seed = None
    if (raw := option(fields, "seed")) is not None:
        seed = parse_integer(raw, "seed", MAX_SEED, "an integer in 0..2^63-1")
    fmt = (option(fields, "format") or default_format).lower()
    if fmt not in ENCODERS:
        raise InvalidRequest(f"format must be one of {', '.join(ENCODERS)}, not {fmt!r}", param="format")
    return {"stream": stream, "speed": speed, "seed": seed}, fmt


def parse_sample_rate(fields: Fields) -> int | None:
    """The optional ``sample_rate`` field (checked against the format when the response is made)."""
    raw = option(fields, "sample_rate")
    if raw is None:
        return None
    return parse_integer(raw, "sample_rate", MAX_SAMPLE_RATE, "an integer number of Hz")
