"""The web page at ``/web`` (``/`` redirects there): try the loaded model's modes and voices in a browser.

Plain HTML, CSS and JavaScript shipped as package data, no build step. The page itself holds no data,
so it is served without an API key (a browser cannot send one when it opens a page); every API call it
makes sends the key typed into it as ``Authorization: Bearer``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException

STATIC_DIR = Path(__file__).resolve().parent
FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
# Open without an API key (see the module docstring).
PUBLIC_PATHS = ("/", "/web", "/web/*")

router = APIRouter(include_in_schema=False)


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("web/", status_code=307)


@router.get("/web")
async def web_no_slash() -> RedirectResponse:
    # The page's relative links (app.js, style.css) need the trailing slash.
    return RedirectResponse("web/", status_code=307)


@router.get("/web/{name:path}")
async def web_file(name: str) -> Response:
    name = name or "index.html"
    if name not in FILES:
        raise HTTPException(404, f"no such file: /web/{name}")
    return FileResponse(
        STATIC_DIR / name, media_type=f"{FILES[name]}; charset=utf-8", headers={"Cache-Control": "no-cache"}
    )
