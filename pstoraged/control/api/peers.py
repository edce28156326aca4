"""Peer routes: this daemon's replication identity, pairing with another
daemon (a one-time connection key made on the target, used on the source),
the paired peers with their reachability, bandwidth limits, and forgetting a
peer. The work is replication/service.py's (ctx.replication). Included by
build_app()."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path
from pydantic import BaseModel, ConfigDict, Field

from ...engine.units import parse_size
from ...errors import NotFound
from ...replication.peers import DEFAULT_KEY_TTL
from ...replication.service import Replication
from .context import Context, Ctx
from .models import ERRORS, SIZE_PATTERN

router = APIRouter()

PEER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
PeerName = Annotated[str, Path(description="peer name (or its pool UUID)", pattern=PEER_NAME)]
PEER_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS, 403: {"model": ERRORS[400]["model"], "description": "the peer refused (key, "
                    "certificate)"},
    502: {"model": ERRORS[400]["model"], "description": "the peer broke the protocol"},
}


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_PORT = r"(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
# HOST:PORT: an IPv4 address or host name, or [IPv6]
ADDRESS = rf"^(?:\[[0-9A-Fa-f:.]{{2,45}}\]|{_LABEL}(?:\.{_LABEL}){{0,126}}):{_PORT}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KeyRequest(Strict):
    ttl: float = Field(DEFAULT_KEY_TTL, gt=0, le=7 * 86400,
                       description="seconds the key stays valid (default one hour)")


class ConnectRequest(Strict):
    address: str = Field(pattern=ADDRESS, max_length=300, description="the target's replication listener",
                         examples=["127.0.0.1:8471"])
    key: str = Field(pattern=r"^pst1-[a-z2-7]{8}(-[a-z2-7]{8}){3}$",
                     description="the connection key 'pstorage peer key' printed on the target")
    name: str | None = Field(None, pattern=PEER_NAME,
                             description="what to call the peer here (default: its own name)")


class PeerPatch(Strict):
    bandwidth: Annotated[int, Field(ge=0, le=1 << 50)] | Annotated[str, Field(pattern=SIZE_PATTERN.replace("K)", "K|0)"),
                                          max_length=32)] = Field(
        description="bytes per second sent to the peer at most (\"50M\"); 0: no limit")


def service(ctx: Context) -> Replication:
    repl: Replication | None = getattr(ctx, "replication", None)
    if repl is None:
        raise NotFound("replication is not running in this daemon")
    return repl


@router.get("/api/v1/peers", tags=["replication"], responses=PEER_ERRORS,
            summary="This daemon's replication identity and its paired peers")
async def list_peers(ctx: Ctx) -> dict[str, Any]:
    repl = service(ctx)
    return {"self": repl.info(), "peers": repl.status()}


@router.post("/api/v1/peers/key", tags=["replication"], responses=PEER_ERRORS,
             summary="A one-time connection key for pairing a peer with this daemon")
async def new_key(ctx: Ctx, req: Annotated[KeyRequest | None, Body()] = None) -> dict[str, Any]:
    repl = service(ctx)
    key, expires = await repl.new_key(req.ttl if req else DEFAULT_KEY_TTL)
    return {"key": key, "expires": expires, "listen": repl.bound or None,
            "fingerprint": repl.info()["fingerprint"]}


@router.post("/api/v1/peers", tags=["replication"], responses=PEER_ERRORS,
             summary="Pair with the daemon at ADDRESS using its connection key")
async def connect(ctx: Ctx, req: ConnectRequest) -> dict[str, Any]:
    repl = service(ctx)
    peer = await repl.pair(req.address, req.key, req.name)
    await repl.ping(peer.name)  # the first mutual-TLS connection with the pinned certificates
    return next(p for p in repl.status() if p["id"] == peer.id)


@router.post("/api/v1/peers/{name}/ping", tags=["replication"], responses=PEER_ERRORS,
             summary="Round-trip time to a peer")
async def ping(ctx: Ctx, name: PeerName) -> dict[str, Any]:
    rtt = await service(ctx).ping(name)
    return {"name": name, "rtt_ms": round(rtt, 3)}


@router.patch("/api/v1/peers/{name}", tags=["replication"], responses=PEER_ERRORS,
              summary="Set a peer's bandwidth limit")
async def patch(ctx: Ctx, name: PeerName, req: PeerPatch) -> dict[str, Any]:
    repl = service(ctx)
    bw = req.bandwidth if isinstance(req.bandwidth, int) else (
        0 if req.bandwidth == "0" else parse_size(req.bandwidth))
    peer = await repl.set_bandwidth(name, bw)
    return next(p for p in repl.status() if p["id"] == peer.id)


@router.delete("/api/v1/peers/{name}", tags=["replication"], responses=PEER_ERRORS,
               summary="Forget a peer (and tell it to forget this daemon, if it answers)")
async def disconnect(ctx: Ctx, name: PeerName) -> dict[str, Any]:
    told = await service(ctx).disconnect(name)
    return {"disconnected": name, "peer_told": told}
