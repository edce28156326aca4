"""The REST API (FastAPI), served by server.py on the daemon's trio loop.

build_app() makes the app: its OpenAPI metadata, the request-id middleware,
the error handlers, and one router per resource (system, pool, volumes,
snapshots, exports, analytics, peers, replication), each a module here. The
daemon calls it with the Context (context.py) the handlers receive.

Handlers never touch the engine directly: engine work is queued on the data
plane thread with `ctx.call()`, blocking tools (nbdkit, losetup, nvme-cli)
run in `trio.to_thread`. Every error leaves as
`{"error": CODE, "message": ..., "hint": ...}` with the status its class in
errors.py names; a handler bug is logged and reported as `internal` (500),
and the schemathesis test makes sure no input reaches that.
"""

from __future__ import annotations

import logging
import time
import uuid as uuidlib
from collections.abc import Iterator, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from ... import __version__
from ...errors import PStorageError
from . import analytics, exports, peers, pool, replication, snapshots, system, volumes
from .context import Context
from .models import FIELD_HINTS

__all__ = ["Context", "build_app"]

log = logging.getLogger(__name__)

ROUTERS = (system, pool, volumes, snapshots, exports, analytics, peers, replication)


def build_app(ctx: Context) -> FastAPI:
    app = FastAPI(
        title="PStorage", version=__version__, openapi_url="/openapi.json",
        docs_url=None, redoc_url=None,
        description="Control API of pstoraged: volumes, data reduction, capacity "
                    "forecast, device health, data temperature and tiering.",
    )
    app.state.ctx = ctx  # what context.get_context hands the handlers
    app.middleware("http")(request_id)
    app.exception_handler(PStorageError)(_pstorage_error)
    app.exception_handler(RequestValidationError)(_validation_error)
    app.exception_handler(StarletteHTTPException)(_http_error)
    app.exception_handler(Exception)(_internal)
    for module in ROUTERS:
        app.include_router(module.router)
    return app


async def request_id(request: Request, call_next: Any) -> Response:
    """Every request gets an id (the client's X-Request-Id, or a new one):
    logged with its outcome, returned in the X-Request-Id header."""
    rid = request.headers.get("x-request-id", "")[:64] or uuidlib.uuid4().hex[:12]
    request.state.rid = rid
    t0 = time.monotonic()
    response = await call_next(request)
    response.headers["X-Request-Id"] = rid
    level = logging.INFO if request.method != "GET" or response.status_code >= 400 \
        else logging.DEBUG
    log.log(level, "request %s: %s %s -> %d (%.1f ms)", rid, request.method,
            request.url.path, response.status_code, (time.monotonic() - t0) * 1000)
    return response


# ---------------------------------------------------------------- errors
def error_response(status: int, code: str, message: str, hint: str = "",
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message, "hint": hint}, status_code=status,
                        headers=headers)


async def _pstorage_error(request: Request, e: PStorageError) -> JSONResponse:
    return error_response(e.status, e.code, e.message, e.hint)


async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    problems = []
    hint = "see /openapi.json or /docs for the request schema"
    for err in e.errors()[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "path", "query")]
        where = ".".join(loc) or "body"
        if err.get("type") == "string_pattern_mismatch" and loc[-1:] == ["name"]:
            problems.append(f"invalid volume name {err.get('input')!r}")
            hint = ("use 1-63 lowercase letters, digits, '.', '_' or '-', "
                    "starting with a letter or digit")
        elif err.get("type") == "invalid_value":  # ours: models._invalid() carries a hint
            problems.append(err.get("msg", "invalid") if where == "body"
                            else f"{where}: {err.get('msg', 'invalid')}")
            hint = err.get("ctx", {}).get("hint") or hint
        elif loc[:1] and loc[0] in FIELD_HINTS:  # one line, not pydantic's per branch
            problem = f"invalid {loc[0]} {err.get('input')!r}"
            if problem not in problems:
                problems.append(problem)
            hint = FIELD_HINTS[loc[0]]
        else:
            problems.append(f"{where}: {err.get('msg', 'invalid')}")
    return error_response(422, "validation_error", "; ".join(problems) or "invalid request",
                          hint)


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    hint = "see /docs for the endpoints" if e.status_code in (404, 405) else ""
    msg = f"no endpoint {request.method} {request.url.path}" if e.status_code in (404, 405) \
        else str(e.detail)
    # the headers the exception carries stay; Starlette's 405 lists the methods
    # of the first route on the path only, and FastAPI has one route per method
    headers = dict(e.headers or {})
    if e.status_code == 405:
        methods = {m for r in _routes(request.app) if r.methods
                   and r.matches(request.scope)[0] != Match.NONE for m in r.methods}
        headers["Allow"] = ", ".join(sorted(methods)) or headers.get("Allow", "")
    return error_response(e.status_code, code, msg, hint, headers)


def _routes(app: FastAPI) -> Iterator[Route]:
    """Every route of the app: its own (/openapi.json) and the routers'. (Newer
    FastAPI keeps an included router as one entry of app.router.routes, not
    copies of its routes; older copies them, and a route seen twice is harmless.)"""
    for r in app.router.routes:
        if isinstance(r, Route):
            yield r
    for module in ROUTERS:
        for r in module.router.routes:
            if isinstance(r, Route):
                yield r


async def _internal(request: Request, e: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path)
    return error_response(500, "internal", f"internal error: {type(e).__name__}",
                          "this is a bug; the daemon log has the traceback")
