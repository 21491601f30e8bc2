"""GET / (the browser playground) and its script and stylesheet, shipped in server/static/.

The page holds no data, and a browser cannot send an Authorization header with a page load,
so these paths are open like /health: the page's own API calls carry the key (llama.cpp's
server does the same). A strict Content-Security-Policy lets the page run only its own script
and talk only to this server, so even markup that slipped into the DOM could not run inline
code or send anything elsewhere.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
PAGE_PATH = "/"
# URL path → (file in STATIC_DIR, content type); served from memory, read once per app
FILES = {
    PAGE_PATH: ("index.html", "text/html; charset=utf-8"),
    "/static/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
    "/static/playground.css": ("playground.css", "text/css; charset=utf-8"),
}
# open without an API key (server/middleware.py); with --no-ui they are 404 like any path
PUBLIC_PATHS = frozenset(FILES)
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate, so a server upgrade shows its new page at once
}


def ui_router() -> APIRouter:
    """The playground's routes (GET and HEAD), out of the OpenAPI schema: they are not API."""
    router = APIRouter(include_in_schema=False)
    for path, (name, media_type) in FILES.items():
        router.add_api_route(path, _endpoint((STATIC_DIR / name).read_bytes(), media_type),
                             methods=["GET", "HEAD"], name=f"ui:{name}")
    return router


def _endpoint(content: bytes, media_type: str) -> Callable[[], Awaitable[Response]]:
    async def serve_file() -> Response:
        return Response(content, media_type=media_type, headers=SECURITY_HEADERS)

    return serve_file
