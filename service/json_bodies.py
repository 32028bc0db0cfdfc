"""JSON bodies bounded in depth: a fixed limit of our own, not the parser's recursion limit.

How deep ``json.loads`` goes before it gives up (RecursionError) depends on the process's recursion
limit, which any library may raise. Every route with a JSON body parses it here first: a value nested
deeper than MAX_JSON_DEPTH is a 422 naming the body, whatever the process's limit, and what the parser
refuses is a 422 too. The parsed value is what the route then validates (a valid body is not parsed
twice).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

# No request of this API nests deeper than a few levels (a fine-tune recipe: 4).
MAX_JSON_DEPTH = 32


def nesting_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """How deeply ``value`` nests lists and objects (a scalar: 0), counted without recursion and
    stopping once past ``limit``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((child, depth) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def json_problem(exc: Exception) -> str:
    """Why ``json.loads`` refused a text, in words a client can act on."""
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON at character {exc.pos}: {exc.msg}"
    if isinstance(exc, RecursionError):
        return too_deep()
    if "digits" in str(exc):
        return "the JSON holds an integer with more digits than allowed (4300)"
    return "not valid JSON"


def too_deep() -> str:
    return f"the JSON is nested too deeply (more than {MAX_JSON_DEPTH} levels of lists and objects)"


def parse_bounded(text: str | bytes) -> Any:
    """``json.loads`` with the depth bound: ValueError (with :func:`json_problem`'s words) when refused."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(json_problem(exc)) from None
    if nesting_depth(value) > MAX_JSON_DEPTH:
        raise ValueError(too_deep())
    return value


class BoundedJsonRoute(APIRoute):
    """A route whose JSON body is parsed with :func:`parse_bounded` before FastAPI validates it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            content_type = request.headers.get("content-type", "")
            if request.method in ("POST", "PUT", "PATCH") and (not content_type or "json" in content_type):
                body = await request.body()
                if body:
                    try:
                        value = json.loads(body)
                    except (ValueError, RecursionError):
                        # Unreadable: FastAPI parses it again and answers as for any such body (422
                        # naming the body, with the byte position of a syntax error).
                        return await handler(request)
                    if nesting_depth(value) > MAX_JSON_DEPTH:
                        return JSONResponse({"detail": f"body: {too_deep()}", "field": "body"}, 422)
                    # Starlette keeps the parsed body here; FastAPI's request.json() returns it.
                    request._json = value
            return await handler(request)

        return route
