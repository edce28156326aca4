"""Async replication routes: pair a volume with a peer (`replication create`),
sync it now (`replication sync`), the status of every pair this daemon is in
(source or replica), and ending a pair. The work is
replication/async_repl.py's (ctx.async_replication). Included by build_app()."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from ...engine.replica import DEFAULT_KEEP
from ...errors import NotFound
from ...replication.async_repl import AsyncReplication
from .context import Context, Ctx
from .peers import PEER_ERRORS, PEER_NAME

router = APIRouter()

VolumeName = Annotated[str, Path(description="the replicated volume",
                                 pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]


class PairRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    volume: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$", description="the source volume")
    peer: str = Field(pattern=PEER_NAME, description="the peer to replicate to")
    keep: int = Field(DEFAULT_KEEP, ge=1, le=10000,
                      description="replica snapshots the target keeps")
    every: float = Field(0, ge=0, le=366 * 86400,
                         description="seconds between scheduled syncs; 0: on demand only")


def service(ctx: Context) -> AsyncReplication:
    svc: AsyncReplication | None = getattr(ctx, "async_replication", None)
    if svc is None:
        raise NotFound("replication is not running in this daemon")
    return svc


@router.get("/api/v1/replication", tags=["replication"], responses=PEER_ERRORS,
            summary="Every replication pair this daemon is part of, source or target")
async def status(ctx: Ctx) -> dict[str, Any]:
    return {"pairs": await service(ctx).status()}


@router.post("/api/v1/replication", tags=["replication"], responses=PEER_ERRORS,
             summary="Replicate a volume to a peer (asynchronously)")
async def create(ctx: Ctx, req: PairRequest) -> dict[str, Any]:
    return await service(ctx).create(req.volume, req.peer, req.keep, req.every)


@router.post("/api/v1/replication/{volume}/sync", tags=["replication"], responses=PEER_ERRORS,
             summary="Ship the volume's changes since the last replica point now")
async def sync(ctx: Ctx, volume: VolumeName,
               wait: Annotated[bool, Query(description="return when the sync is done")] = True
               ) -> dict[str, Any]:
    return await service(ctx).sync(volume, wait=wait)


@router.delete("/api/v1/replication/{volume}", tags=["replication"], responses=PEER_ERRORS,
               summary="Stop replicating a volume (the target keeps its replica)")
async def delete(ctx: Ctx, volume: VolumeName) -> dict[str, Any]:
    await service(ctx).delete(volume)
    return {"deleted": volume}
