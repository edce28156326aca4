"""What the REST handlers reach: the data plane (and through it the engine),
the exports, the snapshot catalog and the background services.

The daemon builds one Context and hands it to build_app(), which keeps it in
`app.state.ctx`; every handler receives it as a parameter of type `Ctx` (a
FastAPI dependency, see get_context). Handlers never touch the engine
directly: engine work is queued on the data plane thread with `ctx.call()`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Annotated, Any

import trio
from fastapi import Depends, Request

from ...engine.cleaner import SegmentCleaner
from ...engine.engine import Engine, Volume
from ...engine.format import BLOCK_SIZE
from ...engine.snapshots import Catalog, Snapshot
from ...engine.units import validate_name
from ...engine.usage import UsageCache
from ...errors import NotFound
from ...frontends.dataplane import DataPlane
from ...frontends.exports import ExportManager
from ...frontends.loopdev import device_size


class Context:
    """The daemon's services as the handlers see them, and the views they share."""

    def __init__(self, dataplane: DataPlane, exports: ExportManager) -> None:
        self.dataplane = dataplane
        self.engine: Engine = dataplane.engine
        self.call = dataplane.call  # run a function on the engine thread (awaitable)
        self.exports = exports
        self.started = time.time()
        self.ready = False
        self.analytics: Any = None  # analytics.Analytics, set by the daemon
        self.fuse: Any = None  # fusefs.FuseFrontEnd when the daemon serves one
        self.replication: Any = None  # replication.service.Replication, set by the daemon
        self.async_replication: Any = None  # replication.async_repl.AsyncReplication, too
        self.catalog: Catalog = Catalog(self.engine)  # snapshots and SafeMode
        self.usage = UsageCache(self.engine.meta)  # cached walks of the volumes' maps
        # per volume, held from check to change by export, attach and the start
        # of a restore: otherwise an export could pass its "not being restored"
        # check while a restore passes its "not exported" one
        self._serving: dict[str, trio.Lock] = {}

    def cleaner(self) -> SegmentCleaner | None:
        return SegmentCleaner.of(self.engine)

    def running_analytics(self) -> Any:
        """The analytics service (404 when the daemon runs without it)."""
        if self.analytics is None:
            raise NotFound("analytics are not running")
        return self.analytics

    def volume(self, name: str) -> Volume:
        validate_name(name)
        return self.engine.volume(name)

    def serving(self, name: str) -> trio.Lock:
        return self._serving.setdefault(name, trio.Lock())

    def ready_volume(self, name: str) -> Volume:
        """The volume, if no restore or clone fill is running into it (those refuse I/O)."""
        vol = self.volume(name)
        self.engine.generations.check_ready(vol)
        return vol

    async def wait_copy(self, vol: Volume) -> None:
        """Until the background restore or fill into `vol` is done (the engine serves
        I/O meanwhile: this only polls)."""
        # (the engine thread makes the change between client batches: polling
        # costs less than waking trio from there after every slice)
        while True:
            if self.engine.generations.copy_state(vol)[0] == "ready" or self.engine.by_id.get(vol.id) is not vol:
                return
            await trio.sleep(0.05)

    async def read_committed(self, walk: Callable[[Any], Any]) -> Any:
        """Run walk(txn) in a worker thread on a read-only transaction; the jobs
        queued before it have been committed (flush=True), so it sees them."""
        def run() -> Any:
            with self.engine.meta.env.begin(write=False) as txn:
                return walk(txn)
        return await trio.to_thread.run_sync(run)

    def describe(self, v: Volume) -> dict[str, Any]:
        """A volume as the API shows it."""
        ex = self.exports.get(v.name)
        state, progress, _ = self.engine.generations.copy_state(v)
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

    def describe_snapshot(self, sn: Snapshot) -> dict[str, Any]:
        """A snapshot as the API shows it, with its export if it has one."""
        d = sn.to_dict(self.engine.clock())
        ex = self.exports.get(f"{sn.volume}@{sn.name}")
        d["uri"] = (ex.uri or None) if ex else None
        d["exported"] = bool(ex and ex.uri)
        d["device"] = ex.device if ex else None
        d["device_link"] = ex.link if ex else None
        return d


async def get_context(request: Request) -> Context:
    """The app's Context, for handlers (async: FastAPI would run a plain function
    in a worker thread, a hop per request for an attribute read)."""
    ctx: Context = request.app.state.ctx
    return ctx


# a handler parameter `ctx: Ctx` receives the Context (nothing shows in the schema)
Ctx = Annotated[Context, Depends(get_context)]
