"""Serving routes: export a volume or snapshot over NBD, attach it as a local
block device, and undo either. The exporting itself (nbdkit, loop devices,
FUSE) is frontends/exports.py, run in a worker thread since it blocks.
Included by build_app()."""

from __future__ import annotations

from typing import Annotated, Any

import trio
from fastapi import APIRouter, Body, Query

from ...errors import NotFound
from .context import Ctx
from .models import ERRORS, ExportRequest, SnapName, VolumeName

router = APIRouter()


# ---------------------------------------------------------------- volumes
@router.post("/api/v1/volumes/{name}/export", tags=["exports"], responses=ERRORS,
             summary="Serve a volume over NBD (unix socket, optionally TCP)")
async def export(ctx: Ctx, name: VolumeName,
                 req: Annotated[ExportRequest | None, Body()] = None) -> dict[str, Any]:
    req = req or ExportRequest(tcp=None, tls_psk_file=None, tls_certificates=None, allow=None)
    async with ctx.serving(name):
        vol = ctx.ready_volume(name)
        await trio.to_thread.run_sync(lambda: ctx.exports.export(
            name, readonly=req.readonly or vol.readonly, tcp=req.tcp,
            tls_psk=req.tls_psk_file, tls_certificates=req.tls_certificates, allow=req.allow))
    return ctx.describe(vol)


@router.delete("/api/v1/volumes/{name}/export", tags=["exports"], responses=ERRORS,
               summary="Stop serving a volume")
async def unexport(ctx: Ctx, name: VolumeName, force: bool = False) -> dict[str, Any]:
    ctx.volume(name)
    await trio.to_thread.run_sync(lambda: ctx.exports.unexport(name, force=force))
    return {"unexported": name}


@router.post("/api/v1/volumes/{name}/attach", tags=["exports"], responses=ERRORS,
             summary="Make a volume a local block device")
async def attach(ctx: Ctx, name: VolumeName) -> dict[str, Any]:
    async with ctx.serving(name):
        vol = ctx.ready_volume(name)
        await trio.to_thread.run_sync(lambda: ctx.exports.attach(name, readonly=vol.readonly))
    return ctx.describe(vol)


@router.delete("/api/v1/volumes/{name}/attach", tags=["exports"], responses=ERRORS,
               summary="Remove a volume's block device")
async def detach(ctx: Ctx, name: VolumeName, force: bool = False) -> dict[str, Any]:
    ctx.volume(name)
    if ctx.exports.get(name) is None:
        raise NotFound(f"volume {name!r} is not attached")
    await trio.to_thread.run_sync(lambda: ctx.exports.detach(name, force=force))
    return {"detached": name}


# ---------------------------------------------------------------- snapshots (read-only)
@router.post("/api/v1/volumes/{name}/snapshots/{snap}/export", tags=["snapshots"],
             responses=ERRORS, summary="Serve a snapshot read-only over NBD (export VOL@SNAP)")
async def export_snapshot(ctx: Ctx, name: VolumeName, snap: SnapName) -> dict[str, Any]:
    sn = await ctx.call(ctx.catalog.get, name, snap)
    await trio.to_thread.run_sync(lambda: ctx.exports.export(f"{name}@{snap}", readonly=True))
    return ctx.describe_snapshot(sn)


@router.delete("/api/v1/volumes/{name}/snapshots/{snap}/export", tags=["snapshots"],
               responses=ERRORS, summary="Stop serving a snapshot")
async def unexport_snapshot(ctx: Ctx, name: VolumeName, snap: SnapName,
                            force: bool = Query(False, description="even while attached")
                            ) -> dict[str, Any]:
    await ctx.call(ctx.catalog.get, name, snap, True)
    await trio.to_thread.run_sync(lambda: ctx.exports.unexport(f"{name}@{snap}", force=force))
    return {"unexported": f"{name}@{snap}"}


@router.post("/api/v1/volumes/{name}/snapshots/{snap}/attach", tags=["snapshots"],
             responses=ERRORS, summary="Make a snapshot a local read-only block device")
async def attach_snapshot(ctx: Ctx, name: VolumeName, snap: SnapName) -> dict[str, Any]:
    async with ctx.serving(f"{name}@{snap}"):
        await ctx.call(ctx.catalog.get, name, snap)
        await trio.to_thread.run_sync(lambda: ctx.exports.attach(f"{name}@{snap}"))
    return ctx.describe_snapshot(await ctx.call(ctx.catalog.get, name, snap))


@router.delete("/api/v1/volumes/{name}/snapshots/{snap}/attach", tags=["snapshots"],
               responses=ERRORS, summary="Remove a snapshot's block device")
async def detach_snapshot(ctx: Ctx, name: VolumeName, snap: SnapName, force: bool = False
                          ) -> dict[str, Any]:
    await ctx.call(ctx.catalog.get, name, snap, True)
    await trio.to_thread.run_sync(lambda: ctx.exports.detach(f"{name}@{snap}", force=force))
    return {"detached": f"{name}@{snap}"}
