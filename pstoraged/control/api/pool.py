"""Routes about the pool as a whole: its state (with the space destroyed
objects hold), flush, and the background work: cleaner passes, scrubs, jobs.
Included by build_app()."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Annotated, Any

import trio
from fastapi import APIRouter, Path

from ...engine.backing import Backing
from ...engine.check import CheckJob, check_online
from ...engine.engine import Volume
from ...engine.snapshots import Snapshot
from ...engine.usage import VolumeWalk, WalkSpec
from ...errors import Conflict, NotFound, PStorageError
from .context import Context, Ctx
from .models import ERRORS, MaxAge

router = APIRouter()


@router.get("/api/v1/pool", tags=["pool"], summary="Pool geometry, capacity and state")
async def pool(ctx: Ctx, max_age: MaxAge = 60.0) -> dict[str, Any]:
    st = await ctx.call(ctx.engine.statistics)
    destroyed = await destroyed_space(ctx, max_age)
    cleaner = ctx.cleaner()
    cstats = asdict(await ctx.call(cleaner.statistics)) if cleaner is not None else None
    ss = ctx.engine.segs.statistics()
    p = ctx.engine.pool
    usage = await ctx.call(ctx.engine.meta.usage)
    return {
        "uuid": p.sb.uuid.hex(), "label": p.sb.label, "format": p.sb.version,
        "device": p.backing.path, "directory": p.directory,
        "metadata": {**p.metadata_location(), "used_bytes": usage["used"],
                     "high_water_bytes": usage["high_water"], "full": ctx.engine.meta_full},
        "segment_size": ss.segment_size, "segments": asdict(ss),
        "statistics": asdict(st), "instance": ctx.engine.instance.hex(),
        "failed": ctx.engine.failed,
        "reclaiming_volumes": len(ctx.engine.reclaiming),
        "dropping_generations": len(ctx.engine.dropping),
        "dedupe_index": await ctx.call(ctx.engine.chunks.index_statistics),
        "background_work": await ctx.call(ctx.engine.background.has_work),
        "cleaner": cstats,
        "dataplane": asdict(ctx.dataplane.statistics()),
        "destroyed": destroyed,
    }


async def destroyed_space(ctx: Context, max_age: float) -> dict[str, Any]:
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

    vols, snaps, sp, version = await ctx.call(find)
    walks: dict[int, VolumeWalk] = {}
    as_of = time.time()
    if sp:
        if not ctx.usage.current(sp, version, max_age):  # the walk reads committed state
            await ctx.call(ctx.engine.flush, flush=True)
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


@router.post("/api/v1/flush", tags=["pool"], summary="Commit everything to stable storage")
async def flush(ctx: Ctx) -> dict[str, Any]:
    await ctx.call(ctx.engine.flush, flush=True)
    return {"flushed": True}


@router.post("/api/v1/gc", tags=["jobs"], status_code=202, responses=ERRORS,
             summary="Ask the segment cleaner for a full compaction pass when clients are idle")
async def gc(ctx: Ctx) -> dict[str, Any]:
    cleaner = ctx.cleaner()
    if cleaner is None:
        raise NotFound("the segment cleaner is not running")
    await ctx.call(cleaner.request_pass)
    return {"cleaner": asdict(await ctx.call(cleaner.statistics))}


@router.post("/api/v1/scrub", tags=["jobs"], status_code=202, responses=ERRORS,
             summary="Start a scrub: read and verify every live chunk")
async def scrub(ctx: Ctx) -> dict[str, Any]:
    return {"job": await ctx.call(ctx.running_analytics().start_scrub)}


@router.post("/api/v1/pool/check", tags=["jobs"], status_code=202, responses=ERRORS,
             summary="Start a read-only check of the pool's metadata and records")
async def pool_check(ctx: Ctx) -> dict[str, Any]:
    """The check reads the last commit in a worker thread (an LMDB read
    transaction and its own read-only handle on the device): clients keep
    being served. Repairs need the daemon stopped: `pstorage pool check --repair`."""
    a = ctx.running_analytics()
    if any(j.kind == "check" and j.state == "running" for j in a.jobs.jobs.values()):
        raise Conflict("a pool check is already running", "follow it: pstorage jobs")
    await ctx.call(ctx.engine.flush, flush=True)  # check what was acknowledged so far
    job = a.jobs.add(lambda i: CheckJob(i, mode="online"))
    eng = ctx.engine

    def run() -> None:
        try:  # (the engine's handle shares one O_DIRECT buffer: not from two threads)
            backing = Backing(eng.pool.backing.path, writable=False, lock=False)
        except PStorageError as e:
            job.state, job.error, job.finished = "failed", e.message, time.time()
            return
        try:
            check_online(eng.meta, backing, eng.pool.sb, job)  # (reports its own failures)
        finally:
            backing.close()

    async def task() -> None:
        # abandoned at shutdown: the thread then fails on the closed store and ends
        await trio.to_thread.run_sync(run, abandon_on_cancel=True)

    trio.lowlevel.spawn_system_task(task, name=f"pool check job {job.id}")
    return {"job": job.to_dict()}


@router.get("/api/v1/jobs", tags=["jobs"], summary="Background jobs and their progress")
async def jobs(ctx: Ctx) -> dict[str, Any]:
    a = ctx.running_analytics()
    return {"jobs": [j.to_dict() for j in a.jobs.jobs.values()]}


@router.get("/api/v1/jobs/{job_id}", tags=["jobs"], responses=ERRORS, summary="One job")
async def job(ctx: Ctx, job_id: Annotated[int, Path(ge=0, le=2**62)]) -> dict[str, Any]:
    j = ctx.running_analytics().jobs.jobs.get(job_id)
    if j is None:
        raise NotFound(f"no job {job_id}", "list them: pstorage jobs")
    return j.to_dict()
