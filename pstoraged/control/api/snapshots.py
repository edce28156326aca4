"""Snapshot routes: list, take, show, lock, delete, recover, eradicate; and
what a snapshot is used for: restore, clone, diff, and the space each holds.
Included by build_app(); serving a snapshot (export, attach) is in exports.py."""

from __future__ import annotations

from typing import Annotated, Any

import trio
from fastapi import APIRouter, Body, Query

from ...engine.snapshots import diff as walk_diff
from ...engine.snapshots import parse_until
from ...engine.units import validate_name
from ...engine.usage import walk_volume
from ...errors import Conflict
from .context import Context, Ctx
from .models import (
    ERRORS,
    NAME_PATTERN,
    CloneRequest,
    SnapName,
    SnapshotCreate,
    SnapshotPatch,
    VolumeName,
)

router = APIRouter()


@router.get("/api/v1/snapshots", tags=["snapshots"], summary="All snapshots")
async def all_snapshots(ctx: Ctx, destroyed: bool = False) -> dict[str, Any]:
    snaps = await ctx.call(ctx.catalog.list, None, destroyed)
    return {"snapshots": [ctx.describe_snapshot(x) for x in snaps
                          if bool(x.destroyed_ns) == destroyed]}


@router.get("/api/v1/volumes/{name}/snapshots", tags=["snapshots"], responses=ERRORS,
            summary="A volume's snapshots, with the space only each one holds")
async def list_snapshots(ctx: Ctx, name: VolumeName, destroyed: bool = False,
                         space: bool = Query(True, description="compute space per snapshot "
                                             "(walks the volume's map)")) -> dict[str, Any]:
    snaps = [x for x in await ctx.call(ctx.catalog.list, name, destroyed)
             if bool(x.destroyed_ns) == destroyed]
    out = [ctx.describe_snapshot(x) for x in snaps]
    if space:
        acct = await volume_space(ctx, name)
        for d in out:
            d["space"] = acct["snapshots"].get(d["name"])
    return {"volume": name, "snapshots": out}


async def volume_space(ctx: Context, name: str) -> dict[str, Any]:
    """Logical, unique and shared space of a volume and each of its snapshots."""
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

    vid, snaps, live, frozen, vol_destroyed = await ctx.call(gens, flush=True)
    w = await ctx.read_committed(lambda txn: walk_volume(txn, ctx.engine.meta, vid, live, frozen))
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


@router.get("/api/v1/volumes/{name}/space", tags=["snapshots"], responses=ERRORS,
            summary="Logical, unique physical and shared space of a volume and its snapshots")
async def space_route(ctx: Ctx, name: VolumeName) -> dict[str, Any]:
    return {"name": name, **await volume_space(ctx, name)}


@router.post("/api/v1/volumes/{name}/snapshots", tags=["snapshots"], status_code=201,
             responses=ERRORS, summary="Take a snapshot (instant)")
async def create_snapshot(ctx: Ctx, name: VolumeName,
                          req: Annotated[SnapshotCreate | None, Body()] = None) -> dict[str, Any]:
    req = req or SnapshotCreate(name=None, lock_until=None)
    until = parse_until(req.lock_until, ctx.engine.clock()) if req.lock_until else None
    sn = await ctx.call(ctx.catalog.create, name, req.name, until, flush=True)
    return ctx.describe_snapshot(sn)


@router.get("/api/v1/volumes/{name}/snapshots/{snap}", tags=["snapshots"], responses=ERRORS,
            summary="One snapshot")
async def get_snapshot(ctx: Ctx, name: VolumeName, snap: SnapName) -> dict[str, Any]:
    return ctx.describe_snapshot(await ctx.call(ctx.catalog.get, name, snap, True))


@router.patch("/api/v1/volumes/{name}/snapshots/{snap}", tags=["snapshots"], responses=ERRORS,
              summary="Extend a snapshot's retention lock")
async def patch_snapshot(ctx: Ctx, name: VolumeName, snap: SnapName,
                         req: SnapshotPatch) -> dict[str, Any]:
    until = parse_until(req.lock_until, ctx.engine.clock())
    return ctx.describe_snapshot(await ctx.call(ctx.catalog.lock, name, snap, until))


@router.delete("/api/v1/volumes/{name}/snapshots/{snap}", tags=["snapshots"], responses=ERRORS,
               summary="Delete a snapshot (destroyed first, recoverable for the grace period)")
async def delete_snapshot(ctx: Ctx, name: VolumeName, snap: SnapName) -> dict[str, Any]:
    ex = ctx.exports.get(f"{name}@{snap}")
    if ex and ex.device:
        raise Conflict(f"snapshot {name}@{snap} is attached as {ex.device}",
                       f"unmount it and 'pstorage detach {name}@{snap}' first")
    if ex:
        await trio.to_thread.run_sync(lambda: ctx.exports.unexport(f"{name}@{snap}", force=True))
    return ctx.describe_snapshot(await ctx.call(ctx.catalog.delete, name, snap))


@router.post("/api/v1/volumes/{name}/snapshots/{snap}/recover", tags=["snapshots"],
             responses=ERRORS, summary="Recover a destroyed snapshot")
async def recover_snapshot(ctx: Ctx, name: VolumeName, snap: SnapName) -> dict[str, Any]:
    return ctx.describe_snapshot(await ctx.call(ctx.catalog.recover, name, snap))


@router.post("/api/v1/volumes/{name}/snapshots/{snap}/eradicate", tags=["snapshots"],
             responses=ERRORS, summary="Free a destroyed snapshot now instead of after the "
             "grace period (never a locked one)")
async def eradicate_snapshot(ctx: Ctx, name: VolumeName, snap: SnapName) -> dict[str, Any]:
    await ctx.call(ctx.catalog.eradicate, name, snap)
    return {"eradicated": f"{name}@{snap}"}


@router.post("/api/v1/volumes/{name}/snapshots/{snap}/restore", tags=["snapshots"],
             responses=ERRORS, summary="Roll the volume back to the snapshot")
async def restore_snapshot(ctx: Ctx, name: VolumeName, snap: SnapName,
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
        r = await ctx.call(ctx.catalog.restore, name, snap, False, flush=True)
    if wait and r["state"] != "ready":
        await ctx.wait_copy(vol)
        r = await ctx.call(ctx.catalog.restore_result, name, snap)
    return r


@router.get("/api/v1/volumes/{name}/snapshots/{snap}/restore", tags=["snapshots"],
            responses=ERRORS, summary="Where the volume's restore is (state, progress, blocks)")
async def restore_progress(ctx: Ctx, name: VolumeName, snap: SnapName) -> dict[str, Any]:
    return await ctx.call(ctx.catalog.restore_result, name, snap)


@router.post("/api/v1/volumes/{name}/snapshots/{snap}/clone", tags=["snapshots"], status_code=201,
             responses=ERRORS, summary="A new writable volume sharing every chunk of the snapshot")
async def clone_snapshot(ctx: Ctx, name: VolumeName, snap: SnapName, req: CloneRequest,
                         wait: bool = Query(True, description=(
                             "answer when filled; false: at once, with state 'filling'"))
                         ) -> dict[str, Any]:
    validate_name(req.name)
    vol = await ctx.call(ctx.catalog.clone, name, snap, req.name, False, flush=True)
    if wait:
        await ctx.wait_copy(vol)
    return ctx.describe(vol)


@router.get("/api/v1/volumes/{name}/diff", tags=["snapshots"], responses=ERRORS,
            summary="Changed block ranges between two snapshots (or a snapshot and the volume)")
async def diff_route(ctx: Ctx, name: VolumeName,
                     base: Annotated[str, Query(alias="from", pattern=NAME_PATTERN,
                                                description="older snapshot")],
                     to: Annotated[str | None, Query(pattern=NAME_PATTERN, description=
                                                     "newer snapshot (default: the live volume)")] = None,
                     ) -> dict[str, Any]:
    def gens() -> tuple[int, int, int, bool]:
        vol, ga, gb = ctx.catalog.generations(name, base, to)
        return vol.id, ga, gb, ctx.engine.tracker.tracked(vol.id, min(ga, gb))

    vid, ga, gb, tracked = await ctx.call(gens, flush=True)
    out = await ctx.read_committed(
        lambda txn: walk_diff(txn, ctx.engine.meta, vid, ga, gb, tracked=tracked))
    return {"volume": name, "from": base, "to": to, **out}
