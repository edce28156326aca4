"""The control socket: REST-shaped requests from the CLI to the daemon.

Transport for now: one JSON object per line on a unix socket,
`{"method": "GET", "path": "/api/v1/volumes", "body": {...}}` answered by
`{"status": 200, "body": {...}}`. The routes and handlers are transport
independent, so an HTTP server can mount the same `Api` later.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import trio

from .dataplane import DataPlane, bind_unix_sync
from .engine import Engine, Volume
from .errors import Conflict, InvalidArgument, NotFound, PStorageError
from .exports import ExportManager
from .format import BLOCK_SIZE
from .units import parse_size, validate_name

log = logging.getLogger(__name__)

Handler = Callable[..., Awaitable[Any]]
MAX_REQUEST_LINE = 1 << 20


def _flag(query: dict[str, str], name: str) -> bool:
    return query.get(name) in ("1", "true", "yes")


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 3) if b else None


def reduction_report(vols: list[Volume], st: Any) -> dict[str, Any]:
    """Data-reduction figures, each explained, for the pool and per volume."""
    per_volume = {}
    for v in vols:
        s = v.stats
        nonzero = s.written_bytes - s.zero_bytes
        per_volume[v.name] = {
            "provisioned_bytes": v.size,
            "logical_bytes": s.mapped_blocks * BLOCK_SIZE,
            "written_bytes": s.written_bytes,
            "zero_removed_bytes": s.zero_bytes,
            "dedupe_removed_bytes": s.dedupe_bytes,
            "unique_bytes": s.unique_bytes,
            "stored_bytes": s.stored_bytes,
            "compression_saved_bytes": s.unique_bytes - s.stored_bytes,
            "ingest_reduction_ratio": _ratio(s.written_bytes, s.stored_bytes),
            "dedupe_ratio": _ratio(nonzero, s.unique_bytes),
            "compression_ratio": _ratio(s.unique_bytes, s.stored_bytes),
        }
    written = sum(v.stats.written_bytes for v in vols)
    zero = sum(v.stats.zero_bytes for v in vols)
    dedupe = sum(v.stats.dedupe_bytes for v in vols)
    return {
        "pool": {
            "provisioned_bytes": st.provisioned_bytes,
            "logical_bytes": st.logical_bytes,
            "unique_bytes": st.unique_bytes,
            "stored_bytes": st.stored_bytes,
            "allocated_bytes": st.allocated_bytes,
            "written_bytes": written,
            "zero_removed_bytes": zero,
            "dedupe_removed_bytes": dedupe,
            "dedupe_ratio": _ratio(st.logical_bytes, st.unique_bytes),
            "compression_ratio": _ratio(st.unique_bytes, st.stored_bytes),
            "data_reduction_ratio": _ratio(st.logical_bytes, st.stored_bytes),
            "total_efficiency": _ratio(st.provisioned_bytes, st.stored_bytes),
        },
        "volumes": per_volume,
        "explanation": {
            "logical_bytes": "data currently held by volumes (mapped, non-zero 4 KiB blocks)",
            "unique_bytes": "logical data after dedupe: one copy of each distinct block",
            "stored_bytes": "what the unique blocks take in segments after compression, record headers included",
            "allocated_bytes": "segments in use, including space not yet reclaimed",
            "zero_removed_bytes": "all-zero blocks written, stored as nothing (cumulative)",
            "dedupe_removed_bytes": "blocks written that were already in the pool (cumulative)",
            "dedupe_ratio": "logical / unique",
            "compression_ratio": "unique / stored",
            "data_reduction_ratio": "logical / stored",
            "total_efficiency": "provisioned / stored: data reduction plus thin provisioning",
            "ingest_reduction_ratio": "per volume: bytes written / bytes its new chunks took",
        },
    }


class Api:
    """Route table and handlers; every handler returns (status, body)."""

    def __init__(self, dataplane: DataPlane, exports: ExportManager) -> None:
        self.dataplane = dataplane
        self.engine: Engine = dataplane.engine
        self.exports = exports
        self.started = time.time()
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = []
        r = self._route
        r("GET", r"/healthz", self.healthz)
        r("GET", r"/api/v1/pool", self.pool)
        r("GET", r"/api/v1/volumes", self.list_volumes)
        r("POST", r"/api/v1/volumes", self.create_volume)
        r("GET", r"/api/v1/volumes/(?P<name>[^/]+)", self.get_volume)
        r("PATCH", r"/api/v1/volumes/(?P<name>[^/]+)", self.patch_volume)
        r("DELETE", r"/api/v1/volumes/(?P<name>[^/]+)", self.delete_volume)
        r("POST", r"/api/v1/volumes/(?P<name>[^/]+)/export", self.export)
        r("DELETE", r"/api/v1/volumes/(?P<name>[^/]+)/export", self.unexport)
        r("POST", r"/api/v1/volumes/(?P<name>[^/]+)/attach", self.attach)
        r("DELETE", r"/api/v1/volumes/(?P<name>[^/]+)/attach", self.detach)
        r("POST", r"/api/v1/flush", self.flush)
        r("GET", r"/api/v1/metrics/reduction", self.reduction)

    def _route(self, method: str, pattern: str, fn: Handler) -> None:
        self.routes.append((method, re.compile(pattern + "$"), fn))

    async def dispatch(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        url = urlsplit(path)
        query = dict(parse_qsl(url.query))
        allowed = []
        for m, pat, fn in self.routes:
            match = pat.match(url.path)
            if match:
                if m != method:
                    allowed.append(m)
                    continue
                try:
                    return await fn(body=body or {}, query=query, **match.groupdict())
                except PStorageError as e:
                    return e.status, {"error": e.code, "message": e.message, "hint": e.hint}
        if allowed:
            return 405, {"error": "method_not_allowed", "message": f"{method} {url.path}",
                         "hint": "allowed: " + ", ".join(allowed)}
        return 404, {"error": "not_found", "message": f"no endpoint {url.path}", "hint": ""}

    # ------------------------------------------------------------ helpers
    def _vol(self, name: str) -> Volume:
        validate_name(name)
        return self.engine.volume(name)

    def _describe(self, v: Volume) -> dict[str, Any]:
        ex = self.exports.get(v.name)
        return {
            "name": v.name, "size": v.size, "compression": v.compression,
            "created": v.created_ns / 1e9, "readonly": v.readonly,
            "exported": ex is not None and not ex.by_attach,
            "uri": ex.uri if ex else None, "tcp": ex.tcp if ex else None,
            "device": ex.device if ex else None,
            "logical_bytes": v.stats.mapped_blocks * BLOCK_SIZE,
            "stats": asdict(v.stats),
        }

    # ------------------------------------------------------------ handlers
    async def healthz(self, **_: Any) -> tuple[int, Any]:
        return 200, {"status": "ok", "uptime_s": round(time.time() - self.started, 1)}

    async def pool(self, **_: Any) -> tuple[int, Any]:
        st = await self.dataplane.call(self.engine.statistics)
        ss = self.engine.segs.statistics()
        p = self.engine.pool
        return 200, {
            "uuid": p.sb.uuid.hex(), "device": p.backing.path, "directory": p.directory,
            "segment_size": ss.segment_size, "segments": asdict(ss),
            "statistics": asdict(st), "instance": self.engine.instance.hex(),
            "reclaiming_volumes": len(self.engine.reclaiming),
            "dataplane": asdict(self.dataplane.statistics()),
        }

    async def list_volumes(self, **_: Any) -> tuple[int, Any]:
        return 200, {"volumes": [self._describe(v) for v in sorted(
            self.engine.volumes.values(), key=lambda v: v.name)]}

    async def create_volume(self, body: dict, **_: Any) -> tuple[int, Any]:
        if not isinstance(body, dict):
            raise InvalidArgument("the request body must be a JSON object")
        name = validate_name(body.get("name", ""))
        if "size" in body:
            size = parse_size(body["size"])
        elif "size_gb" in body:
            gb = body["size_gb"]
            if not isinstance(gb, int | float) or isinstance(gb, bool) or gb <= 0:
                raise InvalidArgument(f"invalid size_gb {gb!r}", "give a positive number")
            size = int(gb * (1 << 30)) // BLOCK_SIZE * BLOCK_SIZE
        else:
            raise InvalidArgument("a volume needs a size", 'pass "size": "10G" or "size_gb": 10')
        compression = body.get("compression", "lz4")
        vol = await self.dataplane.call(self.engine.create_volume, name, size, compression, flush=True)
        log.info("volume %s created (%d bytes, %s)", name, size, compression)
        return 201, self._describe(vol)

    async def get_volume(self, name: str, **_: Any) -> tuple[int, Any]:
        return 200, self._describe(self._vol(name))

    async def patch_volume(self, name: str, body: dict, **_: Any) -> tuple[int, Any]:
        vol = self._vol(name)
        if "size" in body:
            size = parse_size(body["size"])
            if size < vol.size and not body.get("shrink"):
                raise InvalidArgument(
                    f"{size} is smaller than the volume ({vol.size})",
                    "pass --shrink to cut the volume; data past the new end is released",
                )
            if size < vol.size and self.exports.get(name) and not body.get("force"):
                raise Conflict(f"volume {name!r} is exported; shrinking it under a client is unsafe",
                               "unexport it first, or pass force")
            await self.dataplane.call(self.engine.resize_volume, name, size,
                                   bool(body.get("shrink")), flush=True)
            log.info("volume %s resized to %d bytes", name, size)
        if "compression" in body:
            await self.dataplane.call(self.engine.set_compression, name, body["compression"])
        if "readonly" in body:
            await self.dataplane.call(self.engine.set_readonly, name, bool(body["readonly"]))
        return 200, self._describe(vol)

    async def delete_volume(self, name: str, query: dict, **_: Any) -> tuple[int, Any]:
        self._vol(name)
        force = _flag(query, "force")
        if self.exports.get(name):
            if not force:
                raise Conflict(f"volume {name!r} is exported or attached",
                               "detach/unexport it first, or pass --force")
            await trio.to_thread.run_sync(lambda: self.exports.unexport(name, force=True))
        await self.dataplane.call(self.engine.delete_volume, name, flush=True)
        log.info("volume %s deleted", name)
        return 200, {"deleted": name}

    async def export(self, name: str, body: dict, **_: Any) -> tuple[int, Any]:
        vol = self._vol(name)
        st = await trio.to_thread.run_sync(lambda: self.exports.export(
            name, readonly=bool(body.get("readonly")) or vol.readonly, tcp=body.get("tcp")))
        if st.by_attach:
            st.by_attach = False  # explicitly exported now: detach leaves it running
        return 200, self._describe(vol)

    async def unexport(self, name: str, query: dict, **_: Any) -> tuple[int, Any]:
        self._vol(name)
        force = _flag(query, "force")
        await trio.to_thread.run_sync(lambda: self.exports.unexport(name, force=force))
        return 200, {"unexported": name}

    async def attach(self, name: str, **_: Any) -> tuple[int, Any]:
        vol = self._vol(name)
        await trio.to_thread.run_sync(lambda: self.exports.attach(name))
        return 200, self._describe(vol)

    async def detach(self, name: str, query: dict, **_: Any) -> tuple[int, Any]:
        self._vol(name)
        force = _flag(query, "force")
        if self.exports.get(name) is None:
            raise NotFound(f"volume {name!r} is not attached")
        await trio.to_thread.run_sync(lambda: self.exports.detach(name, force=force))
        return 200, {"detached": name}

    async def flush(self, **_: Any) -> tuple[int, Any]:
        await self.dataplane.call(self.engine.flush, flush=True)
        return 200, {"flushed": True}

    async def reduction(self, **_: Any) -> tuple[int, Any]:
        st = await self.dataplane.call(self.engine.statistics)
        vols = sorted(self.engine.volumes.values(), key=lambda v: v.name)
        return 200, reduction_report(vols, st)


class ControlServer:
    def __init__(self, api: Api, path: str) -> None:
        self.api = api
        self.path = path

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(bind_unix_sync(self.path)))
        task_status.started()
        await trio.serve_listeners(self._handle, [listener])

    async def _handle(self, stream: trio.SocketStream) -> None:
        buf = b""
        try:
            while True:
                while b"\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                    if len(buf) > MAX_REQUEST_LINE:
                        await self._send(stream, 413, {"error": "too_large",
                                         "message": "request over 1 MiB", "hint": ""})
                        return
                line, buf = buf.split(b"\n", 1)
                try:
                    req = json.loads(line)
                    method, path = str(req["method"]).upper(), str(req["path"])
                    body = req.get("body")
                except (ValueError, KeyError, TypeError) as e:
                    await self._send(stream, 400, {"error": "bad_request", "message": str(e),
                                                   "hint": "send one JSON object per line"})
                    continue
                try:
                    status, out = await self.api.dispatch(method, path, body)
                except Exception as e:  # never let a request kill the daemon
                    log.exception("control request %s %s failed", method, path)
                    status, out = 500, {"error": "internal", "message": str(e), "hint": "see the daemon log"}
                await self._send(stream, status, out)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    @staticmethod
    async def _send(stream: trio.SocketStream, status: int, body: Any) -> None:
        await stream.send_all(json.dumps({"status": status, "body": body}).encode() + b"\n")
