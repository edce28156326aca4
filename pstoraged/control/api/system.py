"""Routes about the service itself: liveness (/healthz), Prometheus metrics
(/metrics) and the self-contained API page (/docs). Included by build_app()."""

from __future__ import annotations

import html
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from ... import __version__
from .context import Ctx

router = APIRouter()


@router.get("/healthz", tags=["service"], summary="Liveness and readiness")
async def healthz(ctx: Ctx) -> JSONResponse:
    # 503 only when the daemon cannot serve (starting, stopping, pool failed).
    # Problems it serves through (failed device reads, a background service
    # that keeps failing) make it "degraded" with 200: restarting it would
    # not help and would drop its clients. docs/analytics.md explains.
    eng = ctx.engine
    failed = eng.failed
    ok = ctx.ready and failed is None
    problems = [f.reason() for f in eng.supervisor.failing()]
    backing = eng.pool.backing
    if backing.read_errors:
        problems.insert(0, f"{backing.read_errors} read errors from the backing device "
                           f"since start; last: {backing.last_read_error}")
    status = ("degraded" if problems else "ok") if ok else (
        "failed" if failed else "starting")
    body = {"status": status, "ready": ctx.ready, "pool_failed": failed,
            "problems": problems,
            "uptime_s": round(time.time() - ctx.started, 1), "version": __version__}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/docs", include_in_schema=False)
async def docs(request: Request) -> HTMLResponse:
    return HTMLResponse(render_docs(request.app.openapi()))


@router.get("/metrics", tags=["service"], response_class=PlainTextResponse,
            summary="Prometheus metrics")
async def metrics(ctx: Ctx) -> Response:
    from ...frontends.metrics import CONTENT_TYPE, render

    st = await ctx.call(ctx.engine.statistics)
    return Response(render(ctx, st), media_type=CONTENT_TYPE)


def render_docs(spec: dict[str, Any]) -> str:
    """A self-contained API page (no CDN scripts: daemons often run offline)."""
    e = html.escape
    rows = []
    for path, ops in spec.get("paths", {}).items():
        for method, op in ops.items():
            params = ", ".join(p["name"] for p in op.get("parameters", []))
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            ref = body.get("schema", {}).get("$ref", "").rsplit("/", 1)[-1]
            rows.append(
                f"<tr><td><code>{e(method.upper())}</code></td><td><code>{e(path)}</code></td>"
                f"<td>{e(op.get('summary', ''))}</td><td>{e(params)}</td><td>{e(ref)}</td></tr>")
    schemas = []
    for name, sch in spec.get("components", {}).get("schemas", {}).items():
        props = sch.get("properties", {})
        fields = "".join(
            f"<li><code>{e(k)}</code> {e(str(v.get('type') or v.get('anyOf') or v.get('enum') or ''))}"
            f" {e(v.get('description', ''))}</li>" for k, v in props.items())
        schemas.append(f"<h3>{e(name)}</h3><ul>{fields}</ul>")
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>{e(spec['info']['title'])} API</title>
<style>body{{font-family:sans-serif;margin:2em}}td{{padding:2px 8px;vertical-align:top}}
tr:nth-child(even){{background:#f4f4f4}}</style></head><body>
<h1>{e(spec['info']['title'])} API {e(spec['info']['version'])}</h1>
<p>{e(spec['info'].get('description', ''))}</p>
<p>Machine-readable: <a href="/openapi.json">/openapi.json</a>. Errors are
<code>{{"error": CODE, "message": ..., "hint": ...}}</code>.</p>
<table><tr><th>method</th><th>path</th><th>what</th><th>parameters</th><th>body</th></tr>
{''.join(rows)}</table><h2>Schemas</h2>{''.join(schemas)}</body></html>"""
