"""Asynchronous replication between two daemons: per-volume pairs, on-demand
and scheduled syncs, and the target's handlers.

The daemon makes one AsyncReplication on top of the peers service
(service.py) and the engine's delta export/import (engine/replica.py), starts
`run` (the scheduler) in its nursery and hands it to the REST API
(control/api/replication.py). One sync of volume V to peer P:

  source                                   target (handlers here)
  snapshot repl-... of V (or the one       snap.offer  -> ReplicaImport.begin:
  still in flight: resume)                               the lba to resume from
  per batch of changed blocks:             snap.blocks -> the fingerprints it lacks
                                                          (applies the batch if none)
  the lacking chunks, as stored            snap.chunks -> verify, store, apply
  after the last batch                     snap.commit -> replica snapshot (keep N)

The source records the delta in flight (engine Outbound) and the pairs
(`meta` key `repl_pairs`); the target records which peer feeds each replica
(`repl_in:<volume id>`). A broken link or a restart of either side leaves
both records; the next sync offers the same snapshot and resumes at the
target's resume point. docs/replication.md, "Async replication: operation".
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from ..engine import codecs
from ..engine.format import BLOCK_SIZE
from ..engine.replica import (
    DEFAULT_KEEP,
    HOLE,
    ChunkPayload,
    DeltaBatch,
    DeltaExport,
    Outbound,
    ReplicaImport,
    verify_payload,
)
from ..engine.snapshots import Catalog
from ..engine.units import validate_name
from ..errors import Conflict, InvalidArgument, NotFound, ProtocolError, PStorageError
from .channel import Message, Reply
from .peers import Peer
from .service import Replication

log = logging.getLogger("pstoraged.replication")

PAIRS_KEY = "repl_pairs"
SNAP_PREFIX = "repl-"
BATCH_BLOCKS = 1024  # blocks per snap.blocks message
# chunks per snap.chunks message: at most 256 KiB, so that a slow (limited)
# link still carries the pings between them in time
CHUNKS_PER_MESSAGE = 64
CALL_TIMEOUT = 60.0
SCHEDULE_TICK = 1.0  # seconds between looks at the schedules
_BLOCK = struct.Struct(">QB32s")  # lba, 1 = a chunk (0 = a hole), fingerprint
_CHUNK = struct.Struct(">32sBIII")  # fingerprint, codec, raw length, CRC-32, stored length

EngineCall = Callable[..., Any]


@dataclass(slots=True)
class SyncStats:
    """What one sync moved."""

    started: float = 0.0
    finished: float = 0.0
    blocks: int = 0  # changed blocks sent (holes included)
    logical_bytes: int = 0  # blocks * block size
    chunks_sent: int = 0
    payload_bytes: int = 0  # chunk bytes as stored
    wire_bytes: int = 0  # control parts and payloads of the messages this sync sent
    resumed_at: int = 0  # the lba the target said to resume from

    def public(self) -> dict[str, Any]:
        return {"started": self.started or None, "finished": self.finished or None,
                "blocks": self.blocks, "logical_bytes": self.logical_bytes,
                "chunks_sent": self.chunks_sent, "payload_bytes": self.payload_bytes,
                "wire_bytes": self.wire_bytes, "resumed_at": self.resumed_at}


@dataclass(slots=True)
class PairState:
    """A source pair's runtime state (not persisted)."""

    state: str = "idle"  # idle, syncing, error
    progress: float = 0.0  # 0..1 of the volume's blocks walked in the current sync
    last_error: str = ""
    last_attempt: float = 0.0
    last: SyncStats | None = None
    current: SyncStats | None = None
    lock: trio.Lock = field(default_factory=trio.Lock)


def encode_blocks(blocks: list[tuple[int, bytes | None]]) -> bytes:
    return b"".join(_BLOCK.pack(lba, 0, bytes(32)) if fp is HOLE else _BLOCK.pack(lba, 1, fp)
                    for lba, fp in blocks)


def decode_blocks(data: bytes, limit: int) -> list[tuple[int, bytes | None]]:
    if len(data) % _BLOCK.size or len(data) // _BLOCK.size > limit:
        raise ProtocolError(f"a block list of {len(data)} bytes is malformed")
    out: list[tuple[int, bytes | None]] = []
    for lba, kind, fp in _BLOCK.iter_unpack(data):
        if kind not in (0, 1):
            raise ProtocolError(f"block {lba} has kind {kind}")
        out.append((lba, fp if kind else HOLE))
    return out


def encode_chunks(payloads: list[ChunkPayload]) -> bytes:
    return b"".join(_CHUNK.pack(p.fingerprint, p.codec, p.raw_len, p.crc, len(p.data)) + p.data
                    for p in payloads)


def decode_chunks(data: bytes) -> list[ChunkPayload]:
    out, pos = [], 0
    while pos < len(data):
        if pos + _CHUNK.size > len(data):
            raise ProtocolError("a chunk list ends in the middle of a chunk header")
        fp, codec, raw_len, crc, n = _CHUNK.unpack_from(data, pos)
        pos += _CHUNK.size
        if n > BLOCK_SIZE or pos + n > len(data):
            raise ProtocolError(f"a chunk of {n} bytes does not fit the message")
        out.append(ChunkPayload(fp, codec, raw_len, bytes(data[pos:pos + n]), crc))
        pos += n
    return out


def _verify_all(payloads: list[ChunkPayload]) -> None:
    comp = codecs.Compressor()
    for p in payloads:
        verify_payload(p, comp)


def _int(body: dict[str, Any], key: str, lo: int = 0, hi: int = 1 << 62) -> int:
    v = body.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError(f"field {key!r} is not an integer in [{lo}, {hi}]")
    return v


def _name(body: dict[str, Any], key: str, what: str, optional: bool = False) -> str | None:
    v = body.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise ProtocolError(f"field {key!r} is not a {what} name")
    return validate_name(v, what)


class AsyncReplication:
    """Source pairs (volume -> peer) and the target side of incoming deltas."""

    def __init__(self, repl: Replication, call: EngineCall, catalog: Catalog) -> None:
        self.repl = repl
        self.call = call  # run a function on the engine thread
        self.catalog = catalog
        self.engine = catalog.engine
        self.pairs: dict[str, dict[str, Any]] = {}  # volume -> {peer, keep, every, created}
        self.runtime: dict[str, PairState] = {}
        self._pending: dict[str, DeltaBatch] = {}  # target: replica -> batch lacking chunks
        self._target_locks: dict[str, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self._stop = trio.Event()
        repl.register("snap.offer", self._on_offer)
        repl.register("snap.blocks", self._on_blocks)
        repl.register("snap.chunks", self._on_chunks)
        repl.register("snap.commit", self._on_commit)

    # ---------------------------------------------------------------- service
    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.pairs = await self.call(lambda: dict(self.engine.meta.get_json(PAIRS_KEY) or {}))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._scheduler)
            task_status.started()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def stop(self) -> None:
        self._stop.set()

    async def _scheduler(self) -> None:
        while True:
            await trio.sleep(SCHEDULE_TICK)
            now = time.time()
            for vol, p in list(self.pairs.items()):
                rt = self._rt(vol)
                if p.get("every") and not rt.lock.locked() and \
                        now - rt.last_attempt >= p["every"]:
                    self._start(vol)

    def _rt(self, volume: str) -> PairState:
        return self.runtime.setdefault(volume, PairState())

    async def _save_pairs(self) -> None:
        pairs = dict(self.pairs)

        def save() -> None:
            self.engine.meta.put_json(PAIRS_KEY, pairs)
            self.engine.flush()
        await self.call(save)

    # ---------------------------------------------------------------- source API
    async def create(self, volume: str, peer: str, keep: int = DEFAULT_KEEP,
                     every: float = 0.0) -> dict[str, Any]:
        validate_name(volume)
        if keep < 1:
            raise InvalidArgument("keep at least one replica snapshot (the next delta's base)")
        if every < 0:
            raise InvalidArgument("--every is a duration (15m) or 0 for on demand only")
        p = self.repl.store.by_name(peer)
        await self.call(self.catalog.volume, volume)
        if volume in self.pairs:
            raise Conflict(f"volume {volume!r} already replicates to "
                           f"{self.pairs[volume]['peer']}",
                           f"delete that first: pstorage replication delete {volume}")
        self.pairs[volume] = {"peer": p.id, "keep": keep, "every": every,
                              "created": time.time()}
        await self._save_pairs()
        log.info("replication: volume %s replicates to %s (keep %d, every %gs)", volume, p.name,
                 keep, every)
        return self.pair_status(volume)

    async def delete(self, volume: str) -> None:
        if volume not in self.pairs:
            raise NotFound(f"volume {volume!r} is not replicated", "see pstorage replication status")
        rt = self._rt(volume)
        async with rt.lock:
            del self.pairs[volume]
            await self._save_pairs()
        self.runtime.pop(volume, None)
        log.info("replication: volume %s no longer replicates", volume)

    def _start(self, volume: str) -> None:
        assert self._nursery is not None
        self._rt(volume).last_attempt = time.time()
        self._nursery.start_soon(self._sync_logged, volume)

    async def _sync_logged(self, volume: str) -> None:
        try:
            await self.sync(volume)
        except PStorageError:
            pass  # recorded in the pair's state and logged

    async def sync(self, volume: str, wait: bool = True) -> dict[str, Any]:
        """Ship the volume's changes since the last replica point to its peer."""
        if volume not in self.pairs:
            raise NotFound(f"volume {volume!r} is not replicated",
                           f"pstorage replication create {volume} --peer NAME")
        if not wait:
            if not self._rt(volume).lock.locked():
                self._start(volume)
            return self.pair_status(volume)
        rt = self._rt(volume)
        async with rt.lock:
            rt.last_attempt = time.time()
            rt.state, rt.progress, rt.current = "syncing", 0.0, SyncStats(started=time.time())
            try:
                await self._sync(volume, rt)
            except PStorageError as e:
                rt.state, rt.last_error = "error", e.message
                log.warning("replication: sync of %s failed: %s", volume, e.message)
                raise
            except BaseException:
                rt.state, rt.last_error = "error", "interrupted"
                raise
            rt.state, rt.last_error, rt.progress = "idle", "", 1.0
            rt.last, rt.current = rt.current, None
        return self.pair_status(volume)

    async def _sync(self, volume: str, rt: PairState) -> None:
        pair = self.pairs[volume]
        peer = self.repl.store.peers.get(pair["peer"])
        if peer is None:
            raise NotFound(f"the peer of volume {volume!r} was disconnected",
                           f"pstorage replication delete {volume}, then create it again")
        st = rt.current
        assert st is not None

        def prepare() -> tuple[str | None, str, int]:
            vol = self.catalog.volume(volume)
            out = Outbound(self.engine, vol, peer.id)
            state = out.state or {"base": None, "snap": None}
            base, snap = state["base"], state["snap"]
            if snap is not None:  # a delta in flight: resume it
                try:
                    s = self.catalog.get(volume, snap)
                    return base, snap, s.size
                except NotFound:
                    pass  # its snapshot was deleted: start a new one
            stem = name = f"{SNAP_PREFIX}{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
            n = 0
            while True:
                try:
                    self.catalog.get(volume, name, destroyed=True)
                except NotFound:
                    break
                n += 1
                name = f"{stem}.{n}"
            s = self.catalog.create(volume, name)
            out.start(base, name)
            return base, name, s.size
        base, snap, size = await self.call(prepare)
        offer = {"volume": volume, "base": base, "snap": snap, "size": size,
                 "keep": pair["keep"]}
        r = await self._send(peer, "snap.offer", offer, st=st)
        if r.body.get("committed"):  # it took the point; only its answer was lost
            await self.call(self._finish, volume, peer, base)
            return
        cursor = _int(r.body, "next_lba")
        st.resumed_at = cursor
        end = -(-size // BLOCK_SIZE)
        exp: DeltaExport = await self.call(DeltaExport.between, self.engine, self.catalog,
                                           volume, base, snap)
        vol = exp.vol
        while True:
            batch: DeltaBatch = await self.call(exp.batch, cursor, BATCH_BLOCKS)
            head = {"volume": volume, "snap": snap, "first": batch.first_lba,
                    "next": batch.next_lba, "done": batch.done}
            r = await self._send(peer, "snap.blocks", head, encode_blocks(batch.blocks), st=st)
            lacking = r.payload
            if len(lacking) % 32:
                raise ProtocolError("the peer's list of missing chunks is malformed")
            if lacking:
                fps = [lacking[i:i + 32] for i in range(0, len(lacking), 32)]
                for i in range(0, len(fps), CHUNKS_PER_MESSAGE):
                    part = fps[i:i + CHUNKS_PER_MESSAGE]
                    payloads: list[ChunkPayload] = await self.call(exp.chunk_payloads, part)
                    last = i + CHUNKS_PER_MESSAGE >= len(fps)
                    await self._send(peer, "snap.chunks", {**head, "last": last},
                                     encode_chunks(payloads), st=st)
                    st.chunks_sent += len(payloads)
                    st.payload_bytes += sum(len(p.data) for p in payloads)
            st.blocks += len(batch.blocks)
            st.logical_bytes += len(batch.blocks) * BLOCK_SIZE
            rt.progress = batch.next_lba / end if end else 1.0

            def advance(nxt: int = batch.next_lba) -> None:
                Outbound(self.engine, vol, peer.id).advance(nxt)
            await self.call(advance)
            if batch.done:
                break
            cursor = batch.next_lba
        await self._send(peer, "snap.commit", {"volume": volume, "snap": snap,
                                               "keep": pair["keep"]}, st=st)
        await self.call(self._finish, volume, peer, base)
        st.finished = time.time()
        log.info("replication: %s@%s replicated to %s: %d blocks, %d chunks (%d bytes) sent, "
                 "%d bytes on the wire", volume, snap, peer.name, st.blocks, st.chunks_sent,
                 st.payload_bytes, st.wire_bytes)

    def _finish(self, volume: str, peer: Peer, base: str | None) -> None:
        """The target committed the point (engine thread): it is the next base;
        the old base snapshot goes."""
        Outbound(self.engine, self.catalog.volume(volume), peer.id).finish()
        if base is not None:
            try:
                self.catalog.delete(volume, base)
            except PStorageError as e:
                log.info("replication: %s@%s kept: %s", volume, base, e.message)
        self.engine.flush()

    async def _send(self, peer: Peer, type: str, body: dict[str, Any], payload: bytes = b"",
                    *, st: SyncStats) -> Message:
        st.wire_bytes += len(payload) + len(repr(body))  # the JSON part, near enough
        msg = await self.repl.call(peer, type, body, payload, within=CALL_TIMEOUT)
        return msg

    # ---------------------------------------------------------------- status
    def pair_status(self, volume: str) -> dict[str, Any]:
        p = self.pairs.get(volume, {})
        peer = self.repl.store.peers.get(p.get("peer", ""))
        rt = self._rt(volume)
        return {"role": "source", "volume": volume, "peer": peer.name if peer else p.get("peer"),
                "keep": p.get("keep"), "every": p.get("every") or None,
                "state": rt.state, "progress": round(rt.progress, 4),
                "last_error": rt.last_error or None,
                "last_sync": rt.last.public() if rt.last else None,
                "current": rt.current.public() if rt.current else None}

    async def status(self) -> list[dict[str, Any]]:
        """Every pair this daemon is part of: sources, then replicas."""

        def read() -> list[dict[str, Any]]:
            out = []
            now = self.engine.clock()
            for volume in sorted(self.pairs):
                s = self.pair_status(volume)
                try:
                    vol = self.catalog.volume(volume)
                    out_state = Outbound(self.engine, vol, self.pairs[volume]["peer"]).state
                    base = out_state["base"] if out_state else None
                    point = self.catalog.get(volume, base) if base else None
                except NotFound:
                    point = None
                s["last_consistent_point"] = point.name if point else None
                s["lag_seconds"] = round(now - point.created_ns / 1e9, 3) if point else None
                out.append(s)
            for vol in sorted(self.engine.volumes.values(), key=lambda v: v.name):
                rec = self.engine.meta.get_json(f"repl_in:{vol.id}")
                if rec is None or vol.destroyed_ns:
                    continue
                imp = ReplicaImport(self.engine, self.catalog, vol.name)
                peer = self.repl.store.peers.get(rec["peer"])
                points = imp.points
                point = None
                if points:
                    try:
                        point = self.catalog.get(vol.name, points[-1])
                    except NotFound:
                        pass
                d = imp.delta
                end = -(-d["size"] // BLOCK_SIZE) if d else 0
                out.append({"role": "target", "volume": vol.name,
                            "peer": peer.name if peer else rec["peer"],
                            "state": "syncing" if d else "idle",
                            "progress": round(d["next_lba"] / end, 4) if d and end else None,
                            "receiving": d["snap"] if d else None, "points": points,
                            "last_consistent_point": points[-1] if points else None,
                            "lag_seconds": round(now - point.created_ns / 1e9, 3)
                            if point else None})
            return out
        result: list[dict[str, Any]] = await self.call(read)
        return result

    # ---------------------------------------------------------------- target
    def _replica(self, peer: Peer, name: str, create_size: int | None = None,
                 compression: str = "lz4") -> ReplicaImport:
        """The replica `name` fed by `peer` (engine thread); created on an offer."""
        vol = self.engine.volumes.get(name)
        if vol is None or vol.destroyed_ns:
            if create_size is None:
                raise NotFound(f"no replica volume {name!r} here", "offer the delta first")
            imp = ReplicaImport.create(self.engine, self.catalog, name, create_size, compression)
            self.engine.meta.put_json(f"repl_in:{imp.vol.id}", {"peer": peer.id})
            self.engine.flush()
            log.info("replication: replica volume %s created for %s", name, peer.name)
            return imp
        rec = self.engine.meta.get_json(f"repl_in:{vol.id}")
        if rec is None or rec.get("peer") != peer.id:
            raise Conflict(f"volume {name!r} on {self.repl.name} is not a replica fed by "
                           f"{peer.name}", "rename or delete that volume there")
        return ReplicaImport(self.engine, self.catalog, name)

    def _lock(self, name: str) -> trio.Lock:
        return self._target_locks.setdefault(name, trio.Lock())

    async def _on_offer(self, peer: Peer, msg: Message) -> dict[str, Any]:
        b = msg.body
        name = _name(b, "volume", "volume")
        base = _name(b, "base", "snapshot", optional=True)
        snap = _name(b, "snap", "snapshot")
        size = _int(b, "size", BLOCK_SIZE, 1 << 50)
        if size % BLOCK_SIZE:
            raise ProtocolError(f"size {size} is not a multiple of {BLOCK_SIZE}")
        assert name is not None and snap is not None
        async with self._lock(name):
            self._pending.pop(name, None)

            def begin() -> int | None:
                imp = self._replica(peer, name, size)
                if imp.delta is None and imp.points and imp.points[-1] == snap:
                    return None  # committed already: the source missed the answer
                return imp.begin(base, snap, size)
            nxt: int | None = await self.call(begin)
        if nxt is None:
            return {"committed": True}
        log.info("replication: %s offers %s %s -> %s; resuming at block %d", peer.name, name,
                 base or "(full)", snap, nxt)
        return {"next_lba": nxt}

    async def _on_blocks(self, peer: Peer, msg: Message) -> Reply:
        b = msg.body
        name = _name(b, "volume", "volume")
        assert name is not None
        batch = DeltaBatch(_int(b, "first"), _int(b, "next"),
                           decode_blocks(msg.payload, BATCH_BLOCKS), bool(b.get("done")))
        async with self._lock(name):

            def step() -> list[bytes]:
                imp = self._replica(peer, name)
                lacking = imp.missing(fp for _, fp in batch.blocks if fp is not HOLE)
                if not lacking:
                    imp.apply(batch)
                    self.engine.flush()  # durable: a restart resumes after it
                return lacking
            lacking = await self.call(step)
            if lacking:
                self._pending[name] = batch
            else:
                self._pending.pop(name, None)
        return Reply({"missing": len(lacking)}, b"".join(lacking))

    async def _on_chunks(self, peer: Peer, msg: Message) -> dict[str, Any]:
        name = _name(msg.body, "volume", "volume")
        assert name is not None
        payloads = decode_chunks(msg.payload)
        await trio.to_thread.run_sync(_verify_all, payloads)  # off the engine thread
        last = bool(msg.body.get("last", True))
        async with self._lock(name):
            batch = self._pending.get(name)
            if batch is None or batch.first_lba != _int(msg.body, "first"):
                raise Conflict(f"replica {name!r} expects no chunks now",
                               "send the batch's blocks first")

            def step() -> int:
                imp = self._replica(peer, name)
                new = imp.store_chunks(payloads)
                if last:  # the batch's chunks are all here: map it
                    imp.apply(batch)
                    self.engine.flush()  # durable: a restart resumes after it
                return new
            new: int = await self.call(step)
            if last:
                self._pending.pop(name, None)
        return {"stored": new}

    async def _on_commit(self, peer: Peer, msg: Message) -> dict[str, Any]:
        name = _name(msg.body, "volume", "volume")
        snap = _name(msg.body, "snap", "snapshot")
        keep = _int(msg.body, "keep", 1, 1 << 20)
        assert name is not None and snap is not None
        async with self._lock(name):
            s = await self.call(lambda: self._replica(peer, name).commit_point(snap, keep))
        log.info("replication: replica %s@%s committed (from %s)", name, snap, peer.name)
        return {"point": s.name}
