"""The REST API (FastAPI), served by control.py on the daemon's trio loop.

Handlers never touch the engine directly: engine work is queued on the data
plane thread with `DataPlane.call()`, blocking tools (nbdkit, losetup,
nvme-cli) run in `trio.to_thread`. Every error leaves as
`{"error": CODE, "message": ..., "hint": ...}` with the status its class in
errors.py names; a handler bug is logged and reported as `internal` (500),
and the schemathesis test makes sure no input reaches that.
"""

from __future__ import annotations

import html
import logging
import time
import uuid as uuidlib
from collections.abc import Callable, Mapping
from dataclasses import asdict
from functools import partial
from typing import Annotated, Any, Literal

import trio
from fastapi import Body, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from .. import __version__
from ..engine.cleaner import SegmentCleaner
from ..engine.engine import Engine, Volume
from ..engine.format import BLOCK_SIZE
from ..engine.snapshots import Catalog, Snapshot, parse_until
from ..engine.units import MAX_VOLUME_SIZE, NAME_RE, parse_size, validate_name
from ..engine.usage import UsageCache, VolumeWalk, WalkSpec
from ..errors import Conflict, InvalidArgument, NotFound, PStorageError
from ..frontends.dataplane import DataPlane
from ..frontends.exports import ExportManager
from ..frontends.loopdev import device_size

log = logging.getLogger(__name__)

NAME_PATTERN = "^" + NAME_RE.pattern + "$"
VolumeName = Annotated[str, Path(description="volume name", pattern=NAME_PATTERN)]
SnapName = Annotated[str, Path(description="snapshot name", pattern=NAME_PATTERN)]
Compression = Literal["lz4", "zstd", "none"]
MaxAge = Annotated[float, Query(ge=0, le=86400, description=(
    "reuse a walk of the volumes' maps up to this many seconds old (0: walk now); a walk "
    "is always reused while nothing changed since"))]
# The schema states every rule on a request's form and values, so one that
# matches it is never refused as malformed (400/422); refusals that depend on
# state (a volume's size, the clock, a lock already set) are 409. A size
# string: a count of M/G/T/P, or of K in multiples of 4 (whole 4 KiB blocks).
_K4 = r"(?:[48]|[13579][26]|[2468][048]|[1-9][0-9]*(?:[02468][048]|[13579][26]))"
SIZE_PATTERN = rf"^(?:[1-9][0-9]*[MGTP]|{_K4}K)(?:i?B)?$"
SizeValue = Annotated[
    Annotated[int, Field(ge=BLOCK_SIZE, multiple_of=BLOCK_SIZE)]
    | Annotated[str, Field(pattern=SIZE_PATTERN, max_length=32)],
    Field(description='bytes, a multiple of 4096 (4096), or a count with a binary suffix '
                      '("10G", "512M", "64K"); above 1 PiB is refused as too large (413)')]
# size_gb is rounded down to whole blocks: anything below one block would be nothing
MIN_SIZE_GB = BLOCK_SIZE / (1 << 30)
# lock_until: a positive duration, a date or an ISO 8601 date-time
LOCK_UNTIL_SCHEMA: dict[str, Any] = {"anyOf": [
    {"type": "string", "pattern": r"^(?:[1-9][0-9]{0,4}(?:\.[0-9]+)?|0\.[0-9]*[1-9][0-9]*)[smhdw]$"},
    {"type": "string", "format": "date"},
    {"type": "string", "format": "date-time"},
]}
# horizons: 1-20 comma-separated day counts in (0, 3650]
_HORIZON = (r"(?:(?:[1-9][0-9]{0,2}|[12][0-9]{3}|3[0-5][0-9]{2}|36[0-4][0-9])(?:\.[0-9]+)?"
            r"|3650(?:\.0+)?|0\.[0-9]*[1-9][0-9]*)")
HORIZONS_PATTERN = rf"^{_HORIZON}(?:,{_HORIZON}){{0,19}}$"

# what to say when a value does not fit its field (the patterns are unreadable)
FIELD_HINTS = {
    "size": 'give bytes as a multiple of 4096, or a count with a suffix: "10G", "512M", "64K"',
    "size_gb": f"give GiB from {MIN_SIZE_GB:.3g} (one 4 KiB block) to {MAX_VOLUME_SIZE >> 30}",
    "horizons": "give 1-20 comma-separated day counts above 0 and at most 3650, e.g. 7,30,90",
}


# ---------------------------------------------------------------- request models
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _invalid(message: str, hint: str) -> PydanticCustomError:
    """A validation error that carries its hint to the 422 answer."""
    return PydanticCustomError("invalid_value", message.replace("{", "(").replace("}", ")"),
                               {"hint": hint})


def _check_until(text: str) -> str:
    try:
        parse_until(text, 0.0)  # the form only: whether it is still ahead is checked on use
    except InvalidArgument as e:
        raise _invalid(e.message, e.hint) from None
    return text


LockUntil = Annotated[str, Field(max_length=64), AfterValidator(_check_until),
                      WithJsonSchema({**LOCK_UNTIL_SCHEMA, "maxLength": 64})]


def _not_null(field: str) -> dict[str, Any]:
    return {"required": [field], "properties": {field: {"not": {"type": "null"}}}}


class VolumeCreate(_Strict):
    # the schema says "size or size_gb" too, not only the validator
    model_config = ConfigDict(json_schema_extra={"anyOf": [_not_null("size"), _not_null("size_gb")]})

    name: str = Field(description="1-63 characters: a-z 0-9 . _ -", examples=["demo-vol"],
                      pattern=NAME_PATTERN)
    size_gb: float | None = Field(None, ge=MIN_SIZE_GB, le=MAX_VOLUME_SIZE >> 30,
                                  allow_inf_nan=False, description=(
                                      "size in GiB (the prototype's field), rounded down to "
                                      "whole 4 KiB blocks"))
    size: SizeValue | None = None
    compression: Compression = "lz4"

    @model_validator(mode="after")
    def _has_size(self) -> VolumeCreate:
        if self.size is None and self.size_gb is None:
            raise _invalid("a volume needs a size", 'pass "size": "10G" or "size_gb": 10')
        return self


class VolumePatch(_Strict):
    size: SizeValue | None = None
    size_gb: float | None = Field(None, ge=MIN_SIZE_GB, le=MAX_VOLUME_SIZE >> 30,
                                  allow_inf_nan=False)
    shrink: bool = Field(False, description="allow cutting the volume; data past the new end is released")
    force: bool = Field(False, description="shrink even while exported")
    compression: Compression | None = None
    readonly: bool | None = None


class ExportRequest(_Strict):
    readonly: bool = False
    tcp: str | None = Field(None, description="also serve NBD on this ADDR:PORT",
                            examples=["127.0.0.1:10809"], max_length=64)
    tls_psk_file: str | None = Field(None, max_length=4096, description=(
        "TCP requires TLS with these pre-shared keys (lines of user:hexkey, mode 0600)"))
    tls_certificates: str | None = Field(None, max_length=4096, description=(
        "TCP requires TLS with the certificates in this directory (ca-cert.pem, "
        "server-cert.pem, server-key.pem)"))
    allow: list[Annotated[str, Field(max_length=64)]] | None = Field(
        None, max_length=64, description="TCP clients accepted (addresses or CIDR blocks)")


class SnapshotCreate(_Strict):
    name: str | None = Field(None, pattern=NAME_PATTERN, description="default: snap-<generation>")
    lock_until: LockUntil | None = Field(None, description=(
        "retention lock: a date, a time or a duration (2027-01-31, 7d); nothing deletes "
        "or alters the snapshot until then"))


class SnapshotPatch(_Strict):
    lock_until: LockUntil = Field(description="a later end for the retention lock")


class CloneRequest(_Strict):
    name: str = Field(pattern=NAME_PATTERN, description="the new volume's name")


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable code, e.g. not_found, conflict")
    message: str
    hint: str = ""


ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorBody, "description": d} for s, d in (
        (400, "bad input"), (404, "unknown volume or object"), (409, "conflict"),
        (413, "too large"), (422, "request does not match the schema"),
        (503, "the pool failed or the daemon is stopping"), (507, "the pool is full"))
}


# ---------------------------------------------------------------- helpers
def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def _size_from(size: int | str | None, size_gb: float | None) -> int | None:
    if size is not None:
        n = parse_size(size)
    elif size_gb is not None:
        n = int(size_gb * (1 << 30))
        n -= n % BLOCK_SIZE  # the prototype took GiB as a float: round down to whole blocks
    else:
        return None
    return n


def reduction_report(vols: list[Volume], st: Any, walks: dict[int, VolumeWalk],
                     reclaiming: list[int], as_of: float) -> dict[str, Any]:
    """Data-reduction figures, each explained, for the pool and per volume.

    The pool row and the volume rows have the same definitions (current
    data: logical, unique, stored); a volume's unique and stored bytes are
    its share of the pool's (usage.py). The ingest counters (cumulative:
    what was written, not what is held) are reported apart, under `ingest`.
    """
    per_volume = {}
    by = {"volumes": 0.0, "snapshots": 0.0, "destroyed_volumes": 0.0, "released": 0.0}
    exact = True
    for v in vols:
        w = walks[v.id]
        exact &= w.exact
        if v.destroyed_ns:
            by["destroyed_volumes"] += w.total_stored_share
            continue
        by["volumes"] += w.stored_share
        by["snapshots"] += w.snapshot_stored_share
        by["released"] += w.released_stored_share
        s = v.stats
        logical, unique, stored = w.logical_bytes, round(w.unique_share), round(w.stored_share)
        per_volume[v.name] = {
            "provisioned_bytes": v.size,
            "logical_bytes": logical,
            "unique_bytes": unique,
            "stored_bytes": stored,
            "exclusive_bytes": w.exclusive_bytes,
            "shared_bytes": w.shared_bytes,
            "snapshot_stored_bytes": round(w.snapshot_stored_share),
            "dedupe_saved_bytes": logical - unique,
            "compression_saved_bytes": unique - stored,
            "dedupe_ratio": _ratio(logical, unique),
            "compression_ratio": _ratio(unique, stored),
            "data_reduction_ratio": _ratio(logical, stored),
            "thin_provisioning_ratio": _ratio(v.size, logical),
            "ingest": {
                "written_bytes": s.written_bytes,
                "zero_bytes": s.zero_bytes,
                "dedupe_bytes": s.dedupe_bytes,
                "new_chunk_bytes": s.unique_bytes,
                "new_chunk_stored_bytes": s.stored_bytes,
                "reduction_ratio": _ratio(s.written_bytes, s.stored_bytes),
            },
        }
    by["released"] += sum(walks[vid].total_stored_share for vid in reclaiming)
    live = [v for v in vols if not v.destroyed_ns]
    return {
        "pool": {
            "provisioned_bytes": st.provisioned_bytes,
            "logical_bytes": st.logical_bytes,
            "unique_bytes": st.unique_bytes,
            "stored_bytes": st.stored_bytes,
            "allocated_bytes": st.allocated_bytes,
            "dedupe_saved_bytes": st.logical_bytes - st.unique_bytes,
            "compression_saved_bytes": st.unique_bytes - st.stored_bytes,
            "dedupe_ratio": _ratio(st.logical_bytes, st.unique_bytes),
            "compression_ratio": _ratio(st.unique_bytes, st.stored_bytes),
            "data_reduction_ratio": _ratio(st.logical_bytes, st.stored_bytes),
            "total_efficiency": _ratio(st.provisioned_bytes, st.stored_bytes),
            "stored_by": {k: round(x) for k, x in by.items()},
            "ingest": {
                "written_bytes": sum(v.stats.written_bytes for v in live),
                "zero_bytes": sum(v.stats.zero_bytes for v in live),
                "dedupe_bytes": sum(v.stats.dedupe_bytes for v in live),
                "new_chunk_bytes": sum(v.stats.unique_bytes for v in live),
                "new_chunk_stored_bytes": sum(v.stats.stored_bytes for v in live),
            },
        },
        "volumes": per_volume,
        "as_of": as_of,
        "exact": exact,
        "explanation": REDUCTION_EXPLANATION,
    }


REDUCTION_EXPLANATION = {
    "logical_bytes": "data currently held (mapped, non-zero 4 KiB blocks): by all volumes in the "
                     "pool row, by the live volume in a volume row",
    "unique_bytes": "logical data after dedupe: one copy of each distinct block; a volume's is its "
                    "share (each chunk's 4 KiB split evenly over its references)",
    "stored_bytes": "what the unique blocks take in segments after compression, record headers "
                    "included; a volume's is its share (each chunk's record split evenly over its "
                    "references), so the shares add up to the pool's (see stored_by)",
    "allocated_bytes": "segments in use, including space not yet reclaimed",
    "exclusive_bytes": "per volume: stored bytes of chunks only its live data references (trimming "
                       "all of it frees them)",
    "shared_bytes": "per volume: stored bytes of chunks its live data references that other "
                    "volumes, clones or its snapshots reference too, each counted whole",
    "snapshot_stored_bytes": "per volume: share of stored held by map entries only its snapshots see",
    "stored_by": "the pool's stored bytes by holder: live volumes, snapshots, destroyed (not yet "
                 "eradicated) volumes, and map entries being released in the background",
    "dedupe_saved_bytes": "logical - unique: space dedupe saves now",
    "compression_saved_bytes": "unique - stored: space compression saves now",
    "dedupe_ratio": "logical / unique",
    "compression_ratio": "unique / stored",
    "data_reduction_ratio": "logical / stored (zero removal not counted: zeros are not data)",
    "total_efficiency": "provisioned / stored: data reduction plus thin provisioning",
    "thin_provisioning_ratio": "per volume: provisioned / logical",
    "ingest": "cumulative counters since the volume was created (they never go down): "
              "written_bytes (blocks written, zeros and overwrites included), zero_bytes (all-zero "
              "blocks among them, stored as nothing), dedupe_bytes (blocks already in the pool), "
              "new_chunk_bytes (blocks that became new chunks), new_chunk_stored_bytes (what those "
              "took in segments), reduction_ratio (written / new_chunk_stored)",
    "as_of": "when the walk of the volumes' maps behind the volume rows and stored_by was made",
    "exact": "false when a volume shares more chunks than a walk counts exactly: exclusive_bytes "
             "is then a lower bound",
}


def error_response(status: int, code: str, message: str, hint: str = "",
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message, "hint": hint}, status_code=status,
                        headers=headers)


class Context:
    """What the handlers reach: the data plane (and through it the engine), exports, services."""

    def __init__(self, dataplane: DataPlane, exports: ExportManager) -> None:
        self.dataplane = dataplane
        self.engine: Engine = dataplane.engine
        self.exports = exports
        self.started = time.time()
        self.ready = False
        self.analytics: Any = None  # analytics.Analytics, set by the daemon
        self.fuse: Any = None  # fusefs.FuseFrontEnd when the daemon serves one
        self.catalog: Catalog = Catalog(self.engine)  # snapshots and SafeMode
        self.usage = UsageCache(self.engine.meta)  # cached walks of the volumes' maps
        # per volume, held from check to change by export, attach and the start
        # of a restore: otherwise an export could pass its "not being restored"
        # check while a restore passes its "not exported" one
        self._serving: dict[str, trio.Lock] = {}

    def cleaner(self) -> SegmentCleaner | None:
        return SegmentCleaner.of(self.engine)

    def volume(self, name: str) -> Volume:
        validate_name(name)
        return self.engine.volume(name)

    def serving(self, name: str) -> trio.Lock:
        return self._serving.setdefault(name, trio.Lock())

    def ready_volume(self, name: str) -> Volume:
        """The volume, if no restore or clone fill is running into it (those refuse I/O)."""
        vol = self.volume(name)
        self.engine.check_ready(vol)
        return vol

    async def wait_copy(self, vol: Volume) -> None:
        """Until the background restore or fill into `vol` is done (the engine serves
        I/O meanwhile: this only polls)."""
        # (the engine thread makes the change between client batches: polling
        # costs less than waking trio from there after every slice)
        while True:
            if self.engine.copy_state(vol)[0] == "ready" or self.engine.by_id.get(vol.id) is not vol:
                return
            await trio.sleep(0.05)

    def describe(self, v: Volume) -> dict[str, Any]:
        ex = self.exports.get(v.name)
        state, progress, _ = self.engine.copy_state(v)
        return {
            "name": v.name, "size": v.size, "compression": v.compression,
            "created": v.created_ns / 1e9, "readonly": v.readonly,
            # an NBD export (nbdkit) exists, also when attach started it; the FUSE
            # front end's attach has none
            "exported": bool(ex and ex.uri), "attached": bool(ex and ex.device),
            "uri": (ex.uri or None) if ex else None, "tcp": ex.tcp if ex else None,
            "tls": ex.tls if ex else None, "allow": ex.allow if ex else None,
            "device": ex.device if ex else None,
            "device_link": ex.link if ex else None,
            "device_size": device_size(ex.device) if ex else None,
            "attach_method": ex.method if ex else None,
            "logical_bytes": v.stats.mapped_blocks * BLOCK_SIZE,
            "snapshots": len(v.frozen),
            # "restoring" / "filling" (a clone): a background map copy runs; the
            # volume refuses I/O, snapshots and exports until it is "ready"
            "state": state, "progress": round(progress, 4),
            "destroyed": bool(v.destroyed_ns),
            "destroyed_at": v.destroyed_ns / 1e9 if v.destroyed_ns else None,
            "stats": asdict(v.stats),
        }


def build_app(ctx: Context) -> FastAPI:
    app = FastAPI(
        title="PStorage", version=__version__, openapi_url="/openapi.json",
        docs_url=None, redoc_url=None,
        description="Control API of pstoraged: volumes, data reduction, capacity "
                    "forecast, device health, data temperature and tiering.",
    )
    app.state.ctx = ctx

    @app.middleware("http")
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

    # ------------------------------------------------------------ errors
    @app.exception_handler(PStorageError)
    async def _pstorage_error(request: Request, e: PStorageError) -> JSONResponse:
        return error_response(e.status, e.code, e.message, e.hint)

    @app.exception_handler(RequestValidationError)
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
            elif err.get("type") == "invalid_value":  # ours: _invalid() carries a hint
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

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        hint = "see /docs for the endpoints" if e.status_code in (404, 405) else ""
        msg = f"no endpoint {request.method} {request.url.path}" if e.status_code in (404, 405) \
            else str(e.detail)
        # the headers the exception carries stay; Starlette's 405 lists the methods
        # of the first route on the path only, and FastAPI has one route per method
        headers = dict(e.headers or {})
        if e.status_code == 405:
            methods = {m for r in request.app.router.routes if isinstance(r, Route)
                       and r.methods and r.matches(request.scope)[0] != Match.NONE
                       for m in r.methods}
            headers["Allow"] = ", ".join(sorted(methods)) or headers.get("Allow", "")
        return error_response(e.status_code, code, msg, hint, headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(500, "internal", f"internal error: {type(e).__name__}",
                              "this is a bug; the daemon log has the traceback")

    call = ctx.dataplane.call

    # ------------------------------------------------------------ service
    @app.get("/healthz", tags=["service"], summary="Liveness and readiness")
    async def healthz() -> JSONResponse:
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

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(render_docs(app.openapi()))

    # ------------------------------------------------------------ pool
    @app.get("/api/v1/pool", tags=["pool"], summary="Pool geometry, capacity and state")
    async def pool(max_age: MaxAge = 60.0) -> dict[str, Any]:
        st = await call(ctx.engine.statistics)
        destroyed = await destroyed_space(max_age)
        cleaner = ctx.cleaner()
        cstats = asdict(await call(cleaner.statistics)) if cleaner is not None else None
        ss = ctx.engine.segs.statistics()
        p = ctx.engine.pool
        return {
            "uuid": p.sb.uuid.hex(), "device": p.backing.path, "directory": p.directory,
            "segment_size": ss.segment_size, "segments": asdict(ss),
            "statistics": asdict(st), "instance": ctx.engine.instance.hex(),
            "failed": ctx.engine.failed,
            "reclaiming_volumes": len(ctx.engine.reclaiming),
            "dropping_generations": len(ctx.engine.dropping),
            "dedupe_index": await call(ctx.engine.index_statistics),
            "background_work": await call(ctx.engine.has_background_work),
            "cleaner": cstats,
            "dataplane": asdict(ctx.dataplane.statistics()),
            "destroyed": destroyed,
        }

    @app.post("/api/v1/flush", tags=["pool"], summary="Commit everything to stable storage")
    async def flush() -> dict[str, Any]:
        await call(ctx.engine.flush, flush=True)
        return {"flushed": True}

    @app.get("/api/v1/metrics/reduction", tags=["pool"],
             summary="Data reduction now (pool and per volume) and the ingest counters")
    async def reduction(max_age: MaxAge = 60.0) -> dict[str, Any]:
        def specs() -> tuple[Any, list[Volume], list[int], list[WalkSpec], int]:
            eng = ctx.engine
            vols = sorted(eng.volumes.values(), key=lambda v: v.name)
            sp = [WalkSpec(v.id, v.gen, tuple(v.frozen)) for v in vols]
            sp += [WalkSpec(vid, None, ()) for vid in eng.reclaiming]
            return eng.statistics(), vols, list(eng.reclaiming), sp, eng.changes

        st, vols, reclaiming, sp, version = await call(specs, flush=True)
        ctx.usage.forget({x.vid for x in sp})
        walks, as_of = await ctx.usage.walks(sp, version, max_age)
        return reduction_report(vols, st, walks, reclaiming, as_of)

    async def destroyed_space(max_age: float) -> dict[str, Any]:
        """Destroyed volumes and snapshots: what they hold, what eradicating frees."""
        grace = ctx.catalog.grace_s

        def find() -> tuple[list[Volume], list[Snapshot], list[WalkSpec], int]:
            eng = ctx.engine
            vols = sorted((v for v in eng.volumes.values() if v.destroyed_ns), key=lambda v: v.name)
            snaps = [x for x in ctx.catalog.list(None, True)
                     if x.destroyed_ns and x.vol_id in eng.by_id
                     and not eng.by_id[x.vol_id].destroyed_ns]
            ids = {v.id for v in vols} | {x.vol_id for x in snaps}
            sp = [WalkSpec(i, eng.by_id[i].gen, tuple(eng.by_id[i].frozen)) for i in sorted(ids)]
            return vols, snaps, sp, eng.changes

        vols, snaps, sp, version = await call(find)
        walks: dict[int, VolumeWalk] = {}
        as_of = time.time()
        if sp:
            if not ctx.usage.current(sp, version, max_age):  # the walk reads committed state
                await call(ctx.engine.flush, flush=True)
            walks, as_of = await ctx.usage.walks(sp, version, max_age)
        out_v = [{"name": v.name, "destroyed_at": v.destroyed_ns / 1e9,
                  "eradicate_after": v.destroyed_ns / 1e9 + grace,
                  "logical_bytes": walks[v.id].logical_bytes,
                  "stored_bytes": round(walks[v.id].total_stored_share),
                  "reclaimable_bytes": walks[v.id].reclaimable_bytes,
                  "snapshots": len(v.frozen)} for v in vols]
        out_s = [{"volume": x.volume, "name": x.name, "destroyed_at": x.destroyed_ns / 1e9,
                  "eradicate_after": x.destroyed_ns / 1e9 + grace,
                  "logical_bytes": walks[x.vol_id].gens[x.gen]["logical_bytes"],
                  "reclaimable_bytes": walks[x.vol_id].gens[x.gen]["unique_bytes"]}
                 for x in snaps]
        return {"volumes": out_v, "snapshots": out_s,
                "reclaimable_bytes": sum(x["reclaimable_bytes"] for x in out_v + out_s),
                "as_of": as_of,
                "explanation": "destroyed objects stay recoverable until eradicate_after; their "
                               "space comes back when they are eradicated (then, or now with "
                               "'pstorage volume eradicate'). reclaimable_bytes: stored bytes only "
                               "the object holds, which eradicating it frees (at least that much)"}

    # ------------------------------------------------------------ volumes
    @app.get("/api/v1/volumes", tags=["volumes"], summary="List volumes")
    async def list_volumes(destroyed: bool = Query(
            False, description="list destroyed (recoverable) volumes instead")) -> dict[str, Any]:
        return {"volumes": [ctx.describe(v) for v in sorted(
            ctx.engine.volumes.values(), key=lambda v: v.name)
            if bool(v.destroyed_ns) == destroyed]}

    @app.post("/api/v1/volumes", tags=["volumes"], status_code=201, responses=ERRORS,
              summary="Create a thin-provisioned volume")
    async def create_volume(req: VolumeCreate) -> dict[str, Any]:
        name = validate_name(req.name)
        size = _size_from(req.size, req.size_gb)
        assert size is not None  # VolumeCreate requires one
        vol = await call(ctx.engine.create_volume, name, size, req.compression, flush=True)
        log.info("volume %s created (%d bytes, %s)", name, size, req.compression)
        return ctx.describe(vol)

    @app.get("/api/v1/volumes/{name}", tags=["volumes"], responses=ERRORS, summary="One volume")
    async def get_volume(name: VolumeName) -> dict[str, Any]:
        return ctx.describe(ctx.volume(name))

    @app.patch("/api/v1/volumes/{name}", tags=["volumes"], responses=ERRORS,
               summary="Resize, change compression or the read-only flag")
    async def patch_volume(name: VolumeName, req: VolumePatch) -> dict[str, Any]:
        vol = ctx.volume(name)
        size = _size_from(req.size, req.size_gb)
        notices: list[str] = []
        if size is not None and size != vol.size:
            async with ctx.serving(name):  # no attach between the resize and the device's
                notices = await resize(vol, size, req)
        if req.compression is not None:
            await call(ctx.engine.set_compression, name, req.compression)
        if req.readonly is not None:
            await call(ctx.engine.set_readonly, name, req.readonly)
        return {**ctx.describe(vol), "notices": notices}

    async def resize(vol: Volume, size: int, req: VolumePatch) -> list[str]:
        """Resize, then make what serves the volume show the new size; returns
        what the user must still do (clients that keep the old size)."""
        name, old = vol.name, vol.size
        ex = ctx.exports.get(name)
        if size < old:
            if not req.shrink:  # 409: valid input, but not for this volume's size
                raise Conflict(
                    f"{size} is smaller than the volume ({old})",
                    "pass shrink (--shrink) to cut the volume; data past the new end is released")
            if ex and ex.device:
                # the file system on it still addresses the cut-off end
                raise Conflict(f"volume {name!r} is attached as {ex.device}; shrinking a device "
                               "under its user corrupts it",
                               "shrink the file system, unmount, 'pstorage detach' it, then "
                               "shrink (--force does not override this)")
            if ex and not req.force:
                raise Conflict(f"volume {name!r} is exported; shrinking it under a client is unsafe",
                               "unexport it first, or pass force")
        await call(ctx.engine.resize_volume, name, size, req.shrink, flush=True)
        log.info("volume %s resized to %d bytes", name, size)
        notices = []
        if ctx.fuse is not None:
            try:
                ctx.fuse.invalidate(vol.id)  # the FUSE file's cached size
            except OSError as e:  # the resize itself is done and durable: say so, not 500
                log.warning("volume %s: dropping the FUSE file's cached size failed: %s", name, e)
                notices.append(f"the kernel may still see the old size of the FUSE file ({e}); "
                               "detach and attach the volume to see the new one")
        if ex and ex.device and size > old:
            note = await trio.to_thread.run_sync(ctx.exports.grow_device, name, size)
            if note:
                notices.append(note)
        if ex and ex.uri and not ex.by_attach:
            notices.append("NBD clients connected now keep the old size (NBD has no resize "
                           "notice); clients that connect from now on see the new one")
        return notices

    @app.delete("/api/v1/volumes/{name}", tags=["volumes"], responses=ERRORS,
                summary="Delete a volume: destroyed, recoverable for the grace period; its space "
                        "comes back when it is eradicated")
    async def delete_volume(name: VolumeName, force: bool = Query(
            False, description="unexport/detach first")) -> dict[str, Any]:
        ctx.volume(name)
        if ctx.exports.get(name) and not force:
            raise Conflict(f"volume {name!r} is exported or attached",
                           "detach/unexport it first, or pass force (--force)")
        busy = [e for e, st in ctx.exports.states.items() if e.startswith(name + "@") and st.device]
        if busy and not force:
            raise Conflict(f"snapshot {busy[0]} of volume {name!r} is attached",
                           f"unmount it and 'pstorage detach {busy[0]}' first, or pass force (--force)")
        await call(ctx.catalog.check_destroyable, name)  # before cutting any client off
        if ctx.exports.get(name):
            await trio.to_thread.run_sync(lambda: ctx.exports.unexport(name, force=True))
        await unexport_snapshots(name)
        vol = await call(ctx.catalog.destroy_volume, name)
        await call(ctx.dataplane.io.forget, name)  # on the thread that writes the counters
        log.info("volume %s destroyed (recoverable for %g h)", name, ctx.catalog.grace_s / 3600)
        grace = ctx.catalog.grace_s
        return {"deleted": name, "destroyed": True, "eradicated": grace <= 0,
                "recoverable_hours": max(0.0, grace / 3600),
                "eradicate_after": vol.destroyed_ns / 1e9 + grace if grace > 0 else None}

    async def unexport_snapshots(name: str) -> None:
        for ex in [e for e in list(ctx.exports.states) if e.startswith(name + "@")]:
            await trio.to_thread.run_sync(partial(ctx.exports.unexport, ex, force=True))

    @app.post("/api/v1/volumes/{name}/recover", tags=["volumes"], responses=ERRORS,
              summary="Recover a destroyed volume (within the grace period)")
    async def recover_volume(name: VolumeName) -> dict[str, Any]:
        return ctx.describe(await call(ctx.catalog.recover_volume, name))

    @app.post("/api/v1/volumes/{name}/eradicate", tags=["volumes"], responses=ERRORS,
              summary="Free a destroyed volume now instead of after the grace period")
    async def eradicate_volume(name: VolumeName) -> dict[str, Any]:
        await call(ctx.catalog.eradicate_volume, name)
        return {"eradicated": name}

    # ------------------------------------------------------------ snapshots
    def snap_out(sn: Snapshot) -> dict[str, Any]:
        d = sn.to_dict(ctx.engine.clock())
        ex = ctx.exports.get(f"{sn.volume}@{sn.name}")
        d["uri"] = (ex.uri or None) if ex else None
        d["exported"] = bool(ex and ex.uri)
        d["device"] = ex.device if ex else None
        d["device_link"] = ex.link if ex else None
        return d

    @app.get("/api/v1/snapshots", tags=["snapshots"], summary="All snapshots")
    async def all_snapshots(destroyed: bool = False) -> dict[str, Any]:
        snaps = await call(ctx.catalog.list, None, destroyed)
        return {"snapshots": [snap_out(x) for x in snaps if bool(x.destroyed_ns) == destroyed]}

    @app.get("/api/v1/volumes/{name}/snapshots", tags=["snapshots"], responses=ERRORS,
             summary="A volume's snapshots, with the space only each one holds")
    async def list_snapshots(name: VolumeName, destroyed: bool = False,
                             space: bool = Query(True, description="compute space per snapshot "
                                                 "(walks the volume's map)")) -> dict[str, Any]:
        snaps = [x for x in await call(ctx.catalog.list, name, destroyed)
                 if bool(x.destroyed_ns) == destroyed]
        out = [snap_out(x) for x in snaps]
        if space:
            acct = await volume_space(name)
            for d in out:
                d["space"] = acct["snapshots"].get(d["name"])
        return {"volume": name, "snapshots": out}

    async def read_committed(walk: Callable[[Any], Any]) -> Any:
        """Run walk(txn) in a worker thread on a read-only transaction; the jobs
        queued before it have been committed (flush=True), so it sees them."""
        def run() -> Any:
            with ctx.engine.meta.env.begin(write=False) as txn:
                return walk(txn)
        return await trio.to_thread.run_sync(run)

    async def volume_space(name: str) -> dict[str, Any]:
        from ..engine.usage import walk_volume

        grace = ctx.catalog.grace_s

        def state(destroyed_ns: int) -> dict[str, Any]:
            if not destroyed_ns:
                return {"state": "live", "destroyed_at": None, "eradicate_after": None}
            return {"state": "destroyed", "destroyed_at": destroyed_ns / 1e9,
                    "eradicate_after": destroyed_ns / 1e9 + grace}

        def gens() -> tuple[int, list[tuple[str, int, int]], int, list[int], int]:
            vol = ctx.catalog.volume(name, destroyed=True)
            return (vol.id, [(x.name, x.gen, x.destroyed_ns) for x in ctx.catalog.list(name, True)],
                    vol.gen, list(vol.frozen), vol.destroyed_ns)

        vid, snaps, live, frozen, vol_destroyed = await call(gens, flush=True)
        w = await read_committed(lambda txn: walk_volume(txn, ctx.engine.meta, vid, live, frozen))
        out_snaps = {n: {**w.gens[g], **state(d)} for n, g, d in snaps}
        gone = [x for x in out_snaps.values() if x["state"] == "destroyed"]
        return {"volume": {**w.gens[live], **state(vol_destroyed),
                           "reclaimable_bytes": w.reclaimable_bytes},
                "snapshots": out_snaps,
                "destroyed_snapshots": {"count": len(gone), "reclaimable_bytes": sum(
                    x["unique_bytes"] for x in gone)},
                "explanation": {
                    "logical_bytes": "data the volume or snapshot reads (4 KiB blocks)",
                    "unique_bytes": "physical bytes only it holds: freed if it were eradicated",
                    "shared_bytes": "physical bytes of its data that others hold too",
                    "state": "live, or destroyed: hidden and recoverable until eradicate_after, "
                             "when it is eradicated and its unique bytes come back ('pstorage "
                             "volume eradicate' frees a destroyed volume now)",
                    "reclaimable_bytes": "volume: physical bytes only it and its snapshots hold: "
                                         "freed when it is eradicated; destroyed_snapshots: "
                                         "what eradicating the destroyed snapshots frees"}}

    @app.get("/api/v1/volumes/{name}/space", tags=["snapshots"], responses=ERRORS,
             summary="Logical, unique physical and shared space of a volume and its snapshots")
    async def space_route(name: VolumeName) -> dict[str, Any]:
        return {"name": name, **await volume_space(name)}

    @app.post("/api/v1/volumes/{name}/snapshots", tags=["snapshots"], status_code=201,
              responses=ERRORS, summary="Take a snapshot (instant)")
    async def create_snapshot(name: VolumeName,
                              req: Annotated[SnapshotCreate | None, Body()] = None) -> dict[str, Any]:
        req = req or SnapshotCreate(name=None, lock_until=None)
        until = parse_until(req.lock_until, ctx.engine.clock()) if req.lock_until else None
        sn = await call(ctx.catalog.create, name, req.name, until, flush=True)
        return snap_out(sn)

    @app.get("/api/v1/volumes/{name}/snapshots/{snap}", tags=["snapshots"], responses=ERRORS,
             summary="One snapshot")
    async def get_snapshot(name: VolumeName, snap: SnapName) -> dict[str, Any]:
        return snap_out(await call(ctx.catalog.get, name, snap, True))

    @app.patch("/api/v1/volumes/{name}/snapshots/{snap}", tags=["snapshots"], responses=ERRORS,
               summary="Extend a snapshot's retention lock")
    async def patch_snapshot(name: VolumeName, snap: SnapName, req: SnapshotPatch) -> dict[str, Any]:
        until = parse_until(req.lock_until, ctx.engine.clock())
        return snap_out(await call(ctx.catalog.lock, name, snap, until))

    @app.delete("/api/v1/volumes/{name}/snapshots/{snap}", tags=["snapshots"], responses=ERRORS,
                summary="Delete a snapshot (destroyed first, recoverable for the grace period)")
    async def delete_snapshot(name: VolumeName, snap: SnapName) -> dict[str, Any]:
        ex = ctx.exports.get(f"{name}@{snap}")
        if ex and ex.device:
            raise Conflict(f"snapshot {name}@{snap} is attached as {ex.device}",
                           f"unmount it and 'pstorage detach {name}@{snap}' first")
        if ex:
            await trio.to_thread.run_sync(lambda: ctx.exports.unexport(f"{name}@{snap}", force=True))
        return snap_out(await call(ctx.catalog.delete, name, snap))

    @app.post("/api/v1/volumes/{name}/snapshots/{snap}/recover", tags=["snapshots"],
              responses=ERRORS, summary="Recover a destroyed snapshot")
    async def recover_snapshot(name: VolumeName, snap: SnapName) -> dict[str, Any]:
        return snap_out(await call(ctx.catalog.recover, name, snap))

    @app.post("/api/v1/volumes/{name}/snapshots/{snap}/eradicate", tags=["snapshots"],
              responses=ERRORS, summary="Free a destroyed snapshot now instead of after the "
              "grace period (never a locked one)")
    async def eradicate_snapshot(name: VolumeName, snap: SnapName) -> dict[str, Any]:
        await call(ctx.catalog.eradicate, name, snap)
        return {"eradicated": f"{name}@{snap}"}

    @app.post("/api/v1/volumes/{name}/snapshots/{snap}/restore", tags=["snapshots"],
              responses=ERRORS, summary="Roll the volume back to the snapshot")
    async def restore_snapshot(name: VolumeName, snap: SnapName,
                               force: bool = Query(False, description="even while exported"),
                               wait: bool = Query(True, description=(
                                   "answer when done; false: at once, with state 'restoring' "
                                   "(poll the volume's state and progress)"))
                               ) -> dict[str, Any]:
        vol = ctx.volume(name)
        async with ctx.serving(name):
            if ctx.exports.get(name) and not force:
                raise Conflict(f"volume {name!r} is exported or attached; restoring under a "
                               "client corrupts what it has cached",
                               "detach/unexport it first, or pass force (--force)")
            r = await call(ctx.catalog.restore, name, snap, False, flush=True)
        if wait and r["state"] != "ready":
            await ctx.wait_copy(vol)
            r = await call(ctx.catalog.restore_result, name, snap)
        return r

    @app.get("/api/v1/volumes/{name}/snapshots/{snap}/restore", tags=["snapshots"],
             responses=ERRORS, summary="Where the volume's restore is (state, progress, blocks)")
    async def restore_progress(name: VolumeName, snap: SnapName) -> dict[str, Any]:
        return await call(ctx.catalog.restore_result, name, snap)

    @app.post("/api/v1/volumes/{name}/snapshots/{snap}/clone", tags=["snapshots"], status_code=201,
              responses=ERRORS, summary="A new writable volume sharing every chunk of the snapshot")
    async def clone_snapshot(name: VolumeName, snap: SnapName, req: CloneRequest,
                             wait: bool = Query(True, description=(
                                 "answer when filled; false: at once, with state 'filling'"))
                             ) -> dict[str, Any]:
        validate_name(req.name)
        vol = await call(ctx.catalog.clone, name, snap, req.name, False, flush=True)
        if wait:
            await ctx.wait_copy(vol)
        return ctx.describe(vol)

    @app.post("/api/v1/volumes/{name}/snapshots/{snap}/export", tags=["snapshots"],
              responses=ERRORS, summary="Serve a snapshot read-only over NBD (export VOL@SNAP)")
    async def export_snapshot(name: VolumeName, snap: SnapName) -> dict[str, Any]:
        sn = await call(ctx.catalog.get, name, snap)
        await trio.to_thread.run_sync(lambda: ctx.exports.export(f"{name}@{snap}", readonly=True))
        return snap_out(sn)

    @app.delete("/api/v1/volumes/{name}/snapshots/{snap}/export", tags=["snapshots"],
                responses=ERRORS, summary="Stop serving a snapshot")
    async def unexport_snapshot(name: VolumeName, snap: SnapName,
                                force: bool = Query(False, description="even while attached")
                                ) -> dict[str, Any]:
        await call(ctx.catalog.get, name, snap, True)
        await trio.to_thread.run_sync(lambda: ctx.exports.unexport(f"{name}@{snap}", force=force))
        return {"unexported": f"{name}@{snap}"}

    @app.post("/api/v1/volumes/{name}/snapshots/{snap}/attach", tags=["snapshots"],
              responses=ERRORS, summary="Make a snapshot a local read-only block device")
    async def attach_snapshot(name: VolumeName, snap: SnapName) -> dict[str, Any]:
        async with ctx.serving(f"{name}@{snap}"):
            await call(ctx.catalog.get, name, snap)
            await trio.to_thread.run_sync(lambda: ctx.exports.attach(f"{name}@{snap}"))
        return snap_out(await call(ctx.catalog.get, name, snap))

    @app.delete("/api/v1/volumes/{name}/snapshots/{snap}/attach", tags=["snapshots"],
                responses=ERRORS, summary="Remove a snapshot's block device")
    async def detach_snapshot(name: VolumeName, snap: SnapName, force: bool = False
                              ) -> dict[str, Any]:
        await call(ctx.catalog.get, name, snap, True)
        await trio.to_thread.run_sync(lambda: ctx.exports.detach(f"{name}@{snap}", force=force))
        return {"detached": f"{name}@{snap}"}

    @app.get("/api/v1/volumes/{name}/diff", tags=["snapshots"], responses=ERRORS,
             summary="Changed block ranges between two snapshots (or a snapshot and the volume)")
    async def diff_route(name: VolumeName,
                         base: Annotated[str, Query(alias="from", pattern=NAME_PATTERN,
                                                    description="older snapshot")],
                         to: Annotated[str | None, Query(pattern=NAME_PATTERN, description=
                                                         "newer snapshot (default: the live volume)")] = None,
                         ) -> dict[str, Any]:
        from ..engine.snapshots import diff as walk_diff

        def gens() -> tuple[int, int, int]:
            vol, ga, gb = ctx.catalog.generations(name, base, to)
            return vol.id, ga, gb

        vid, ga, gb = await call(gens, flush=True)
        out = await read_committed(lambda txn: walk_diff(txn, ctx.engine.meta.l2p, vid, ga, gb))
        return {"volume": name, "from": base, "to": to, **out}

    # ------------------------------------------------------------ exports
    @app.post("/api/v1/volumes/{name}/export", tags=["exports"], responses=ERRORS,
              summary="Serve a volume over NBD (unix socket, optionally TCP)")
    async def export(name: VolumeName,
                     req: Annotated[ExportRequest | None, Body()] = None) -> dict[str, Any]:
        req = req or ExportRequest(tcp=None, tls_psk_file=None, tls_certificates=None, allow=None)
        async with ctx.serving(name):
            vol = ctx.ready_volume(name)
            await trio.to_thread.run_sync(lambda: ctx.exports.export(
                name, readonly=req.readonly or vol.readonly, tcp=req.tcp,
                tls_psk=req.tls_psk_file, tls_certificates=req.tls_certificates, allow=req.allow))
        return ctx.describe(vol)

    @app.delete("/api/v1/volumes/{name}/export", tags=["exports"], responses=ERRORS,
                summary="Stop serving a volume")
    async def unexport(name: VolumeName, force: bool = False) -> dict[str, Any]:
        ctx.volume(name)
        await trio.to_thread.run_sync(lambda: ctx.exports.unexport(name, force=force))
        return {"unexported": name}

    @app.post("/api/v1/volumes/{name}/attach", tags=["exports"], responses=ERRORS,
              summary="Make a volume a local block device")
    async def attach(name: VolumeName) -> dict[str, Any]:
        async with ctx.serving(name):
            vol = ctx.ready_volume(name)
            await trio.to_thread.run_sync(lambda: ctx.exports.attach(name, readonly=vol.readonly))
        return ctx.describe(vol)

    @app.delete("/api/v1/volumes/{name}/attach", tags=["exports"], responses=ERRORS,
                summary="Remove a volume's block device")
    async def detach(name: VolumeName, force: bool = False) -> dict[str, Any]:
        ctx.volume(name)
        if ctx.exports.get(name) is None:
            raise NotFound(f"volume {name!r} is not attached")
        await trio.to_thread.run_sync(lambda: ctx.exports.detach(name, force=force))
        return {"detached": name}

    # ------------------------------------------------------------ analytics
    def analytics() -> Any:
        if ctx.analytics is None:
            raise NotFound("analytics are not running")
        return ctx.analytics

    @app.get("/api/v1/analytics/capacity/history", tags=["analytics"],
             summary="Capacity samples (raw recent, hourly and daily averages older)")
    async def capacity_history() -> dict[str, Any]:
        rows = await analytics().capacity_history()
        return {"samples": [{"t": t, **r} for t, r in rows]}

    @app.get("/api/v1/analytics/capacity/forecast", tags=["analytics"], responses=ERRORS,
             summary="Physical capacity forecast with prediction intervals and days until full")
    async def capacity_forecast(
        horizons: str = Query("7,30,90", max_length=400, pattern=HORIZONS_PATTERN, description=(
            "1-20 comma-separated horizons in days, each above 0 and at most 3650")),
        history: bool = Query(False, description="include the history series used"),
    ) -> dict[str, Any]:
        return await analytics().forecast([float(x) for x in horizons.split(",")], history)

    @app.get("/api/v1/analytics/health", tags=["analytics"],
             summary="Backing device and engine health: status with reasons")
    async def health() -> dict[str, Any]:
        return await analytics().health()

    @app.get("/api/v1/analytics/temperature", tags=["analytics"], responses=ERRORS,
             summary="Data temperature per volume: hot / warm / cold / frozen")
    async def temperature(
        hot_days: float | None = Query(None, gt=0, le=36500, description=(
            "age limit of hot data in days (default: the daemon's)")),
        warm_days: float | None = Query(None, gt=0, le=36500, description=(
            "age limit of warm data; at or below the hot limit, nothing is warm")),
        cold_days: float | None = Query(None, gt=0, le=36500, description=(
            "age limit of cold data; at or below the warm limit, nothing is cold")),
    ) -> dict[str, Any]:
        from ..analytics.temperature import Thresholds

        a = analytics()
        d = a.thresholds
        # each limit is taken alone, so any values are valid: a limit not above
        # the one before it leaves its class empty (reported as equal to it)
        hot = hot_days or d.hot_days
        warm = max(warm_days or d.warm_days, hot)
        th = Thresholds(hot, warm, max(cold_days or d.cold_days, warm))
        return await a.temperature(th)

    @app.get("/api/v1/analytics/tiering/recommendations", tags=["analytics"],
             summary="Tiering recommendations with estimated savings")
    async def tiering_list() -> dict[str, Any]:
        a = analytics()
        return await call(a.tiering.recommendations)

    @app.post("/api/v1/analytics/tiering/recommendations/{rec_id}/apply", tags=["analytics"],
              responses=ERRORS, summary="Apply a recommendation (may start a background job)")
    async def tiering_apply(rec_id: Annotated[str, Path(max_length=300)]) -> dict[str, Any]:
        a = analytics()
        return await call(a.tiering.apply, rec_id)

    @app.post("/api/v1/gc", tags=["jobs"], status_code=202, responses=ERRORS,
              summary="Ask the segment cleaner for a full compaction pass when clients are idle")
    async def gc() -> dict[str, Any]:
        cleaner = ctx.cleaner()
        if cleaner is None:
            raise NotFound("the segment cleaner is not running")
        await call(cleaner.request_pass)
        return {"cleaner": asdict(await call(cleaner.statistics))}

    @app.post("/api/v1/scrub", tags=["jobs"], status_code=202, responses=ERRORS,
              summary="Start a scrub: read and verify every live chunk")
    async def scrub() -> dict[str, Any]:
        return {"job": await call(analytics().start_scrub)}

    @app.get("/api/v1/jobs", tags=["jobs"], summary="Background jobs and their progress")
    async def jobs() -> dict[str, Any]:
        a = analytics()
        return {"jobs": [j.to_dict() for j in a.jobs.jobs.values()]}

    @app.get("/api/v1/jobs/{job_id}", tags=["jobs"], responses=ERRORS, summary="One job")
    async def job(job_id: Annotated[int, Path(ge=0, le=2**62)]) -> dict[str, Any]:
        j = analytics().jobs.jobs.get(job_id)
        if j is None:
            raise NotFound(f"no job {job_id}", "list them: pstorage jobs")
        return j.to_dict()

    # ------------------------------------------------------------ metrics
    @app.get("/metrics", tags=["service"], response_class=PlainTextResponse,
             summary="Prometheus metrics")
    async def metrics() -> Response:
        from ..frontends.metrics import CONTENT_TYPE, render

        st = await call(ctx.engine.statistics)
        return Response(render(ctx, st), media_type=CONTENT_TYPE)

    return app


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


