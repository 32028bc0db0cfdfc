"""The browser playground: static HTML/CSS/JS served at ``/``, no build step.

The files carry no secret and call the same authenticated API as any client, so they are served
without a key; the page asks for one when the API wants it.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.admission import ApiError
from service.json_bodies import BoundedJsonRoute

PLAYGROUND_DIR = Path(__file__).resolve().parent.parent / "playground"
# Only these files are served: a fixed list, so no request path ever reaches the file system.
ASSETS = {"playground.css": "text/css", "playground.js": "text/javascript"}
NO_CACHE = {"Cache-Control": "no-cache"}

router = APIRouter(route_class=BoundedJsonRoute, tags=["playground"], include_in_schema=False)


@router.get("/")
def playground_page() -> FileResponse:
    """The playground page."""
    return FileResponse(PLAYGROUND_DIR / "index.html", media_type="text/html", headers=NO_CACHE)


@router.get("/playground/{name}")
def playground_asset(name: str) -> FileResponse:
    """The page's stylesheet and script."""
    if name not in ASSETS:
        raise ApiError(404, f"no playground file {name!r}")
    return FileResponse(PLAYGROUND_DIR / name, media_type=ASSETS[name], headers=NO_CACHE)
