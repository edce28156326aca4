"""Volume routes: list, create, show, change (resize, compression, read-only),
delete (destroyed, recoverable for the grace period), recover, eradicate.
Included by build_app(); snapshots and exports of a volume have their own
routers (snapshots.py, exports.py)."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import trio
from fastapi import APIRouter, Query

from ...engine.engine import Volume
from ...engine.units import validate_name
from ...errors import Conflict
from .context import Context, Ctx
from .models import ERRORS, VolumeCreate, VolumeName, VolumePatch, size_from

log = logging.getLogger(__name__)

router = APIRouter()


@router.get("/api/v1/volumes", tags=["volumes"], summary="List volumes")
async def list_volumes(ctx: Ctx, destroyed: bool = Query(
        False, description="list destroyed (recoverable) volumes instead")) -> dict[str, Any]:
    return {"volumes": [ctx.describe(v) for v in sorted(
        ctx.engine.volumes.values(), key=lambda v: v.name)
        if bool(v.destroyed_ns) == destroyed]}


@router.post("/api/v1/volumes", tags=["volumes"], status_code=201, responses=ERRORS,
             summary="Create a thin-provisioned volume")
async def create_volume(ctx: Ctx, req: VolumeCreate) -> dict[str, Any]:
    name = validate_name(req.name)
    size = size_from(req.size, req.size_gb)
    assert size is not None  # VolumeCreate requires one
    vol = await ctx.call(ctx.engine.create_volume, name, size, req.compression, flush=True)
    log.info("volume %s created (%d bytes, %s)", name, size, req.compression)
    return ctx.describe(vol)


@router.get("/api/v1/volumes/{name}", tags=["volumes"], responses=ERRORS, summary="One volume")
async def get_volume(ctx: Ctx, name: VolumeName) -> dict[str, Any]:
    return ctx.describe(ctx.volume(name))


@router.patch("/api/v1/volumes/{name}", tags=["volumes"], responses=ERRORS,
              summary="Resize, change compression or the read-only flag")
async def patch_volume(ctx: Ctx, name: VolumeName, req: VolumePatch) -> dict[str, Any]:
    vol = ctx.volume(name)
    size = size_from(req.size, req.size_gb)
    notices: list[str] = []
    if size is not None and size != vol.size:
        async with ctx.serving(name):  # no attach between the resize and the device's
            notices = await resize(ctx, vol, size, req)
    if req.compression is not None:
        await ctx.call(ctx.engine.set_compression, name, req.compression)
    if req.readonly is not None:
        await ctx.call(ctx.engine.set_readonly, name, req.readonly)
    return {**ctx.describe(vol), "notices": notices}


async def resize(ctx: Context, vol: Volume, size: int, req: VolumePatch) -> list[str]:
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
    await ctx.call(ctx.engine.resize_volume, name, size, req.shrink, flush=True)
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


@router.delete("/api/v1/volumes/{name}", tags=["volumes"], responses=ERRORS,
               summary="Delete a volume: destroyed, recoverable for the grace period; its space "
                       "comes back when it is eradicated")
async def delete_volume(ctx: Ctx, name: VolumeName, force: bool = Query(
        False, description="unexport/detach first")) -> dict[str, Any]:
    ctx.volume(name)
    if ctx.exports.get(name) and not force:
        raise Conflict(f"volume {name!r} is exported or attached",
                       "detach/unexport it first, or pass force (--force)")
    busy = [e for e, st in ctx.exports.states.items() if e.startswith(name + "@") and st.device]
    if busy and not force:
        raise Conflict(f"snapshot {busy[0]} of volume {name!r} is attached",
                       f"unmount it and 'pstorage detach {busy[0]}' first, or pass force (--force)")
    await ctx.call(ctx.catalog.check_destroyable, name)  # before cutting any client off
    if ctx.exports.get(name):
        await trio.to_thread.run_sync(lambda: ctx.exports.unexport(name, force=True))
    await unexport_snapshots(ctx, name)
    vol = await ctx.call(ctx.catalog.destroy_volume, name)
    await ctx.call(ctx.dataplane.io.forget, name)  # on the thread that writes the counters
    log.info("volume %s destroyed (recoverable for %g h)", name, ctx.catalog.grace_s / 3600)
    grace = ctx.catalog.grace_s
    return {"deleted": name, "destroyed": True, "eradicated": grace <= 0,
            "recoverable_hours": max(0.0, grace / 3600),
            "eradicate_after": vol.destroyed_ns / 1e9 + grace if grace > 0 else None}


async def unexport_snapshots(ctx: Context, name: str) -> None:
    for ex in [e for e in list(ctx.exports.states) if e.startswith(name + "@")]:
        await trio.to_thread.run_sync(partial(ctx.exports.unexport, ex, force=True))


@router.post("/api/v1/volumes/{name}/recover", tags=["volumes"], responses=ERRORS,
             summary="Recover a destroyed volume (within the grace period)")
async def recover_volume(ctx: Ctx, name: VolumeName) -> dict[str, Any]:
    return ctx.describe(await ctx.call(ctx.catalog.recover_volume, name))


@router.post("/api/v1/volumes/{name}/eradicate", tags=["volumes"], responses=ERRORS,
             summary="Free a destroyed volume now instead of after the grace period")
async def eradicate_volume(ctx: Ctx, name: VolumeName) -> dict[str, Any]:
    await ctx.call(ctx.catalog.eradicate_volume, name)
    return {"eradicated": name}
