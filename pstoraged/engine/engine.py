"""The data-reducing engine: volumes, L2P maps, dedupe, compression, refcounts.

The engine is synchronous and single-threaded by design: the daemon runs it
in its data-plane thread and feeds it batches (see dataplane.py), tests drive it
directly. All state changes go into the metadata store's open transaction;
`flush()` writes the segment data, syncs it, then commits the metadata, so
data is always durable before anything points at it.

Per written 4 KiB block: all-zero -> no chunk; else SHA-256 fingerprint ->
pool-wide dedupe index -> hit: one more reference; miss: compress (early
abort) and append a new chunk record to the segment log. Large writes come
hashed and compressed by the reducer thread (reducer.py), small ones are
reduced inline; both end in the one write path, `_apply`.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn, Protocol

from ..errors import Conflict, CorruptData, DeviceIOError, InvalidArgument, NotFound, ReadOnly
from . import codecs
from .background import Supervisor
from .format import (
    BLOCK_SIZE,
    CHUNK_KEY,
    CHUNK_META,
    KIND_CHUNK,
    L2P_KEY,
    NO_CHUNK,
    U64,
    ZERO_BLOCK,
    ChunkHeader,
    crc32,
    l2p_key,
    l2p_unpack,
    pack_chunk_header,
    record_size,
)
from .fpindex import FingerprintIndex
from .pool import Pool
from .reducer import KIND_ZERO, Pending, Reduction, reduce_inline
from .segments import RELOCATED, SegmentLog
from .units import validate_name, validate_volume_size

log = logging.getLogger(__name__)

MAX_EXTENTS = 1024  # runs per extents reply; NBD lets a reply cover less
MAX_COALESCE = 256  # chunks per device read when reading adjacent records
MAX_GAP = 4096  # padding between records worth reading through
UNMAP_SLICE = 4096  # map entries released per slice of a trim
# A volume's first generation: no older (frozen) map entries can exist below it,
# so map lookups are exact gets. Snapshots move a volume past it.
FIRST_GEN = 1
PRUNE_MIN_STALE = 4096  # stale fingerprint entries worth a background sweep
L2P_LBA_END = (1 << 64) - 1  # reclaim position past every lba
RECLAIM_SLICE = 1024  # per background step: a few ms, the most a request waits for it
TOUCH_BATCH = 512  # accesses recorded before they are handed to the observer

_unpack_chunk = CHUNK_META.unpack
_pack_chunk = CHUNK_META.pack
_ckey = CHUNK_KEY.pack


class Observer(Protocol):
    """Watches the data's use and placement from outside the engine (the heat map,
    analytics/temperature.py), attached by the layer above (Engine.observer).
    Called on the engine thread; accesses come in batches, not per request."""

    def accessed(self, touches: list[int], n: int) -> None:
        """touches[:n] holds n // 4 accesses as (volume id, offset, length, unix time)."""

    def mapped(self, vid: int, lba: int, delta: int) -> None:
        """A block of a volume's live map gained (+1) or lost (-1) its data."""

    def before_commit(self) -> None:
        """Put pending state into the open transaction (it commits with the data)."""

    def drop_volume(self, vid: int, budget: int) -> int:
        """A deleted volume: drop up to `budget` of its records; returns how many."""


class BackgroundService(Protocol):
    """Always-on engine background work (see Engine.background_step).

    A `name` attribute names it in logs, health and metrics (else its class name).
    """

    def wanted(self, busy: bool) -> bool: ...

    def step(self, budget: int, busy: bool) -> int: ...


@dataclass(slots=True)
class VolumeStats:
    """Per-volume counters. `*_bytes` ingest counters are cumulative."""

    written_bytes: int = 0  # bytes of blocks written (after read-modify-write)
    zero_bytes: int = 0  # of those, all-zero blocks: stored as nothing
    dedupe_bytes: int = 0  # of those, blocks already in the pool
    unique_bytes: int = 0  # of those, new unique blocks
    stored_bytes: int = 0  # what the new unique blocks took in segments
    mapped_blocks: int = 0  # current: blocks that hold data (not zero, not hole)
    reads: int = 0
    writes: int = 0
    read_bytes: int = 0


@dataclass(slots=True)
class Volume:
    id: int
    name: str
    size: int
    compression: str = "lz4"
    gen: int = 1  # the live map generation (snapshots freeze older ones); 1 = FIRST_GEN
    created_ns: int = 0
    readonly: bool = False
    frozen: list[int] = field(default_factory=list)  # generations snapshots hold, ascending
    destroyed_ns: int = 0  # deleted, recoverable until eradicated (SafeMode grace period)
    stats: VolumeStats = field(default_factory=VolumeStats)
    base: Volume | None = None  # a read-only view of a snapshot: the volume it belongs to

    def record(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("stats")
        d.pop("base")
        return d


@dataclass(frozen=True, slots=True)
class EngineStatistics:
    volumes: int
    provisioned_bytes: int
    logical_bytes: int  # blocks that hold data, over all volumes
    unique_bytes: int  # raw size of the live chunks
    stored_bytes: int  # their size in segments, headers included
    allocated_bytes: int  # segments in use
    capacity_bytes: int
    free_bytes: int
    live_chunks: int
    checksum_errors: int
    io_errors: int
    read_errors: int  # device reads that failed, since start
    commits: int


class Engine:
    def __init__(self, pool: Pool, *, reserve_segments: int = 2,
                 clock: Callable[[], float] = time.time) -> None:
        self.pool = pool
        self.meta = pool.meta
        self.clock = clock
        self.observer: Observer | None = None  # e.g. the heat map (data temperature)
        # accesses (volume id, offset, length, time) for the observer, handed
        # over in batches: one preallocated list, no allocation per request
        self._touches = [0] * (4 * TOUCH_BATCH)
        self._ntouch = 0
        self.segs = SegmentLog(pool.backing, pool.sb, reserve=reserve_segments)
        self.comp = codecs.Compressor()
        txn = self.meta.txn
        self.segs.load((bytes(k), bytes(v)) for k, v in txn.cursor(db=self.meta.segs))
        self.volumes: dict[str, Volume] = {}
        self.by_id: dict[int, Volume] = {}
        for _name, v in txn.cursor(db=self.meta.vols):
            rec = json.loads(bytes(v))
            vol = Volume(**rec)
            vol.stats = VolumeStats(**self.meta.get_json(f"vstats:{vol.id}", {}))
            self.volumes[vol.name] = vol
            self.by_id[vol.id] = vol
        c = self.meta.get_json("counters", {})
        self.next_chunk = c.get("next_chunk", 1)
        self.next_volume = c.get("next_volume", 1)
        self.live_chunks = c.get("live_chunks", 0)
        self.live_stored = c.get("live_stored", 0)
        self.checksum_errors = c.get("checksum_errors", 0)
        self.io_errors = c.get("io_errors", 0)
        self.stale_fps = c.get("stale_fps", 0)  # fingerprint entries of freed chunks
        # where the background prune of stale fingerprint entries goes on (None: not running)
        prune = self.meta.get_json("prune", None)
        self.prune_from: bytes | None = None if prune is None else bytes.fromhex(prune)
        # deleted volumes whose map entries are still being released: id -> next lba
        self.reclaiming: dict[int, int] = {
            int(k): v for k, v in self.meta.get_json("reclaim", {}).items()}
        # released snapshot generations whose entries are still being dropped:
        # [volume id, generation, next lba]
        self.dropping: list[list[int]] = self.meta.get_json("dropping", [])
        # map copies running in the background (restore_step, fill_step); the
        # volume refuses I/O until its copy is done:
        # restores: volume id -> [generation, size, next lba, blocks changed]
        self.restoring: dict[int, list[int]] = {
            int(k): v for k, v in self.meta.get_json("restoring", {}).items()}
        # clones being filled: new volume id -> [source id, generation, next lba, blocks shared]
        self.filling: dict[int, list[int]] = {
            int(k): v for k, v in self.meta.get_json("filling", {}).items()}
        self.finished_copies: dict[int, dict[str, Any]] = {}  # since start: id -> result
        self.jobs: list[tuple[str, Callable[[int], int]]] = []  # (name, step): background_step
        # background work that raises is backed off and reported, not retried in a loop
        self.supervisor = Supervisor()
        # the dedupe index; its merge is the first always-on background service
        sb = pool.sb
        self.fps = FingerprintIndex(self.meta, self.next_chunk, self._updated,
                                    capacity_blocks=sb.segment_count * sb.segment_size // BLOCK_SIZE)
        self.services: list[BackgroundService] = [self.fps]
        self.commits = 0
        # bumped by every change of a map entry, a reference count or a record's
        # size: a cached walk of the maps (usage.py) is current while it stays
        self.map_changes = 0
        # Safe points (between slices of long map changes, after each step of
        # background work) offer the engine's owner a group commit: the owner
        # decides (the executor's CommitPolicy); the engine only offers commit().
        # Without an owner (tests, tools) only flush() and commit() commit.
        self.safe_point: Callable[[], None] | None = None
        self.dirty = False
        self.failed: str | None = None  # set when the device failed a write or sync
        self.closed_clean = False  # close() committed everything and marked the pool clean
        # Instance tracking lets a reconnecting client learn whether writes it
        # had acknowledged from the previous run could have been lost.
        self.instance = uuidlib.uuid4().bytes
        prev = self.meta.get_json("instance", {})
        self.prev_instance = bytes.fromhex(prev.get("id", "00" * 16))
        self.prev_clean = bool(prev.get("clean", False))
        self.meta.put_json("instance", {"id": self.instance.hex(), "clean": False})
        self.commit()
        # no transaction may stay open: the engine moves to the data plane
        # thread next, and LMDB's writer lock belongs to the thread that took it
        self.meta.commit()

    # ------------------------------------------------------------------ volumes
    def _persist_volume(self, vol: Volume) -> None:
        self.meta.txn.put(vol.name.encode(), json.dumps(vol.record()).encode(), db=self.meta.vols)

    def volume(self, name: str) -> Volume:
        vol = self.volumes.get(name)
        if vol is None:
            raise NotFound(f"no volume named {name!r}", "see 'pstorage volume list'")
        if vol.destroyed_ns:
            raise NotFound(f"volume {name!r} is destroyed",
                           f"recover it: pstorage volume recover {name}")
        return vol

    def _new_volume(self, name: str, size: int, compression: str) -> Volume:
        validate_name(name)
        validate_volume_size(size)
        codecs.codec_id(compression)
        if name in self.volumes:
            raise Conflict(f"volume {name!r} already exists", "choose another name")
        vol = Volume(self.next_volume, name, size, compression, created_ns=time.time_ns())
        self.next_volume += 1
        self.volumes[name] = vol
        self.by_id[vol.id] = vol
        self._persist_volume(vol)
        return vol

    def create_volume(self, name: str, size: int, compression: str = "lz4") -> Volume:
        vol = self._new_volume(name, size, compression)
        self.flush()
        return vol

    def resize_volume(self, name: str, size: int, shrink: bool = False) -> Volume:
        vol = self.volume(name)
        self.check_ready(vol)
        validate_volume_size(size)
        if size < vol.size:
            if not shrink:
                raise InvalidArgument(
                    f"{size} is smaller than the volume ({vol.size})",
                    "pass --shrink to cut the volume; data past the new end is released",
                )
            self._unmap_range(vol, size // BLOCK_SIZE, vol.size // BLOCK_SIZE)
        vol.size = size
        self._persist_volume(vol)
        self.flush()
        return vol

    def set_readonly(self, name: str, readonly: bool) -> Volume:
        vol = self.volume(name)
        vol.readonly = bool(readonly)
        self._persist_volume(vol)
        self.flush()
        return vol

    def set_compression(self, name: str, compression: str) -> Volume:
        vol = self.volume(name)
        codecs.codec_id(compression)
        vol.compression = compression
        self._persist_volume(vol)
        self.flush()
        return vol

    def delete_volume(self, name: str) -> None:
        """Remove a volume now; its space comes back in the background (reclaim_step)."""
        vol = self.volumes.get(name)
        if vol is None:
            raise NotFound(f"no volume named {name!r}", "see 'pstorage volume list'")
        self.check_not_copied_from(vol)
        for copies in (self.restoring, self.filling):  # a copy into it stops
            copies.pop(vol.id, None)
        self._save_copies()
        self.meta.txn.delete(name.encode(), db=self.meta.vols)
        self.meta.delete(f"vstats:{vol.id}")
        del self.volumes[name]
        del self.by_id[vol.id]
        self.reclaiming[vol.id] = 0
        self._save_reclaim()
        self.flush()

    # ------------------------------------------------------------------ chunks
    def _dedupe_lookup(self, fp: bytes) -> tuple[int, bytes | memoryview] | None:
        """The live chunk holding this fingerprint, and its record, if there is one.

        The fingerprint index is a hint: freeing a chunk leaves its entry in
        place (deleting random keys inline costs a B-tree page per block), so
        an entry counts only if its chunk still exists with that fingerprint.
        Chunk ids are never reused, so a stale entry can never name another
        chunk. Stale entries are overwritten on reuse or pruned in the
        background (prune_step).
        """
        cid = self.fps.get(fp)
        if cid is None:
            return None
        raw = self.meta.txn.get(_ckey(cid), db=self.meta.chunks)
        if raw is None or raw[-32:] != fp:
            self.stale_fps -= 1  # the caller overwrites it with a new chunk
            return None
        return cid, raw

    def _incref(self, cid: int, raw: bytes | memoryview | None = None) -> None:
        txn, key = self.meta.txn, _ckey(cid)
        if raw is None:
            raw = txn.get(key, db=self.meta.chunks)
            assert raw is not None, f"reference to missing chunk {cid}"
        rc, s, off, slen, codec, slot, res, fp = _unpack_chunk(raw)
        txn.put(key, _pack_chunk(rc + 1, s, off, slen, codec, slot, res, fp), db=self.meta.chunks)
        self.map_changes += 1

    def _decref(self, cid: int) -> None:
        txn, key = self.meta.txn, _ckey(cid)
        raw = txn.get(key, db=self.meta.chunks)
        if raw is None:
            log.error("refcount underflow: chunk %d is not in the index", cid)
            return
        self.map_changes += 1
        rc, s, off, slen, codec, slot, res, fp = _unpack_chunk(raw)
        if rc > 1:
            txn.put(key, _pack_chunk(rc - 1, s, off, slen, codec, slot, res, fp), db=self.meta.chunks)
            return
        txn.delete(key, db=self.meta.chunks)
        if self.fps.forget(fp, cid):
            self.stale_fps += 1  # its fingerprint entry stays until reused or pruned
        size = record_size(slen)
        self.segs.release(s, size)
        self.live_chunks -= 1
        self.live_stored -= size

    def _new_chunk(self, vol: Volume, fp: bytes, codec: int, payload: bytes,
                   crc: int | None = None) -> int:
        cid = self.next_chunk
        if crc is None:
            crc = crc32(payload)
        hdr = pack_chunk_header(KIND_CHUNK, codec, cid, BLOCK_SIZE, len(payload), fp, crc)
        try:
            s, off, size = self.segs.append(hdr, payload)
        except DeviceIOError as e:  # the write-behind of full blocks failed
            self._fail(e)
            raise
        self.next_chunk += 1
        txn = self.meta.txn
        # chunk ids only grow: appending skips the B-tree search
        txn.put(_ckey(cid), _pack_chunk(1, s, off, len(payload), codec, 0, 0, fp),
                db=self.meta.chunks, append=True)
        self.fps.add(fp, cid)
        self.live_chunks += 1
        self.live_stored += size
        vol.stats.stored_bytes += size
        return cid

    def _chunk_location(self, cid: int) -> tuple[int, int, int, bytes]:
        raw = self.meta.txn.get(_ckey(cid), db=self.meta.chunks)
        if raw is None:
            self._count_corruption(f"chunk {cid} is referenced but not in the chunk index")
        _, s, off, slen, _, _, _, fp = _unpack_chunk(raw)
        return s, off, slen, fp

    def _count_corruption(self, msg: str) -> NoReturn:
        self.checksum_errors += 1
        self.dirty = True
        log.error("checksum error: %s", msg)
        raise CorruptData(msg)

    def _decode(self, cid: int, s: int, off: int, slen: int, fp: bytes,
                rec: bytes | memoryview) -> bytes:
        """Verify a chunk record read from the device and return its data."""
        try:
            h = ChunkHeader.from_buffer(rec)
            payload = memoryview(rec)[ChunkHeader.SIZE : ChunkHeader.SIZE + slen]
            if h.chunk_id != cid or h.stored_len != slen or h.fingerprint != fp:
                raise CorruptData(f"segment {s} offset {off} holds chunk {h.chunk_id}, not {cid}")
            if crc32(payload) != h.payload_crc:
                raise CorruptData(f"chunk {cid} (segment {s} offset {off}): payload checksum mismatch")
            return self.comp.decompress(h.codec, payload, h.raw_len)
        except CorruptData as e:
            self._count_corruption(str(e))

    def rewrite_chunk(self, cid: int, codec: int, payload: bytes | memoryview, *,
                      reserve_ok: bool = False) -> tuple[int, int]:
        """Store chunk `cid` again as `payload` (its data encoded with `codec`).

        The new record is appended, the chunk's entry points at it and the old
        record's bytes are released, all in the open transaction: a crash
        before the commit leaves the old record in use. References and the
        fingerprint do not change. Returns (old record size, new record size).
        The segment cleaner moves chunks with this (reserve_ok: it may use the
        segments kept free for it).
        """
        txn, key = self.meta.txn, _ckey(cid)
        raw = txn.get(key, db=self.meta.chunks)
        if raw is None:
            raise NotFound(f"chunk {cid} does not exist")
        rc, s, off, slen, _old_codec, slot, res, fp = _unpack_chunk(raw)
        hdr = pack_chunk_header(KIND_CHUNK, codec, cid, BLOCK_SIZE, len(payload), fp, crc32(payload))
        try:
            # (to the relocated stream: data that outlived a segment is colder than new writes)
            ns, noff, size = self.segs.append(hdr, bytes(payload), reserve_ok=reserve_ok,
                                              stream=RELOCATED)
        except DeviceIOError as e:
            self._fail(e)
            raise
        txn.put(key, _pack_chunk(rc, ns, noff, len(payload), codec, slot, res, fp), db=self.meta.chunks)
        old = record_size(slen)
        self.segs.release(s, old)
        self.live_stored += size - old
        self.map_changes += 1
        self.meta.pending_ops += 1
        self.dirty = True
        return old, size

    def chunk_codec(self, cid: int) -> tuple[int, int]:
        """(codec id, stored length) of a live chunk."""
        raw = self.meta.txn.get(_ckey(cid), db=self.meta.chunks)
        if raw is None:
            raise NotFound(f"chunk {cid} does not exist")
        _, _, _, slen, codec, _, _, _ = _unpack_chunk(raw)
        return codec, slen

    def read_chunk(self, cid: int) -> bytes:
        s, off, slen, fp = self._chunk_location(cid)
        return self._decode(cid, s, off, slen, fp, self.segs.read(s, off, ChunkHeader.SIZE + slen))

    def _read_chunks(self, cids: list[int]) -> dict[int, bytes]:
        """Read many chunks, one device read per run of physically adjacent records."""
        locs = sorted((self._chunk_location(c), c) for c in set(cids) if c != NO_CHUNK)
        out: dict[int, bytes] = {}
        i = 0
        while i < len(locs):
            (s, start, slen, _), _ = locs[i]
            end = start + ChunkHeader.SIZE + slen
            j = i + 1
            while j < len(locs) and j - i < MAX_COALESCE:
                (s2, off2, slen2, _), _ = locs[j]
                if s2 != s or not end <= off2 <= end + MAX_GAP:  # not adjacent: new read
                    break
                end = off2 + ChunkHeader.SIZE + slen2
                j += 1
            buf = memoryview(self.segs.read(s, start, end - start))
            for (s_, off, slen_, fp), cid in locs[i:j]:
                out[cid] = self._decode(cid, s_, off, slen_, fp, buf[off - start :])
            i = j
        return out

    # ------------------------------------------------------------------ the map
    def _lookup(self, vol: Volume, lba: int, gen: int) -> int:
        key = l2p_key(vol.id, lba, gen)
        if gen == FIRST_GEN:  # nothing older can exist: one exact get, no cursor
            raw = self.meta.txn.get(key, db=self.meta.l2p)
            return NO_CHUNK if raw is None else U64.unpack(raw)[0]
        cur = self.meta.txn.cursor(db=self.meta.l2p)
        if cur.set_range(key) and cur.key()[:12] == key[:12]:
            return U64.unpack(cur.value())[0]
        return NO_CHUNK

    def _map(self, vol: Volume, lba: int, cid: int) -> None:
        """Point (vol, lba) at chunk `cid` (NO_CHUNK: zeros) in the live generation."""
        txn, db = self.meta.txn, self.meta.l2p
        gen = vol.gen
        key = l2p_key(vol.id, lba, gen)
        old, own, older = NO_CHUNK, False, False
        if gen == FIRST_GEN:  # no frozen generation below: one B-tree update
            raw = txn.pop(key, db=db) if cid == NO_CHUNK else txn.replace(key, U64.pack(cid), db=db)
            if raw is not None:
                old, own = U64.unpack(raw)[0], True
        else:
            prefix = key[:12]
            cur = txn.cursor(db=db)
            if cur.set_range(key) and cur.key()[:12] == prefix:
                old = U64.unpack(cur.value())[0]
                found = bytes(cur.key())
                # the entry the live generation sees is ours to replace unless a
                # snapshot's (frozen) generation sees it too
                own = l2p_unpack(found)[2] > (vol.frozen[-1] if vol.frozen else 0)
                # an older entry would show through if ours became a hole
                older = not own or (cur.next() and cur.key()[:12] == prefix)
                if own and found != key:
                    txn.delete(found, db=db)
            if cid == NO_CHUNK and not older:
                if own:
                    txn.delete(key, db=db)
            else:
                txn.put(key, U64.pack(cid), db=db)
        if own and old != NO_CHUNK:
            self._decref(old)
        delta = (cid != NO_CHUNK) - (old != NO_CHUNK)
        if delta:
            vol.stats.mapped_blocks += delta
            if self.observer is not None:
                self.observer.mapped(vol.id, lba, delta)
        self.map_changes += 1
        self.meta.pending_ops += 1

    def _unmap_range(self, vol: Volume, first: int, end: int) -> int:
        """Drop blocks [first, end) of the live generation; cost is O(mapped blocks).

        Works in slices of UNMAP_SLICE blocks so that memory stays bounded
        however much of the range is mapped.
        """
        done = 0
        while True:
            todo = self._mapped_lbas(vol, first, end, UNMAP_SLICE)
            for lba in todo:
                self._map(vol, lba, NO_CHUNK)
                self._maybe_commit()
            done += len(todo)
            if len(todo) < UNMAP_SLICE:
                return done
            first = todo[-1] + 1

    def _mapped_lbas(self, vol: Volume, first: int, end: int, limit: int) -> list[int]:
        """Up to `limit` blocks in [first, end) that hold data at the live generation."""
        out: list[int] = []
        for lba, cid in self._visible(vol, first, end, vol.gen):
            if cid != NO_CHUNK:
                out.append(lba)
                if len(out) == limit:
                    break
        return out

    def visible(self, vol: Volume, first: int, end: int) -> Iterator[tuple[int, int]]:
        """(lba, chunk id) of the data blocks in [first, end) of the live generation."""
        for lba, cid in self._visible(vol, first, end, vol.gen):
            if cid != NO_CHUNK:
                yield lba, cid

    def _visible(self, vol: Volume, first: int, end: int, gen: int) -> Iterator[tuple[int, int]]:
        """(lba, chunk id) of every block in [first, end) with a map entry visible at `gen`.

        Keys sort newest generation first, so the first entry of an lba whose
        generation is not newer than `gen` is the one a read at `gen` sees.
        Chunk id NO_CHUNK is a tombstone: the block reads as zeros.
        """
        cur = self.meta.txn.cursor(db=self.meta.l2p)
        last = -1
        ok = cur.set_range(L2P_KEY.pack(vol.id, first, 0))
        while ok:
            v, lba, g = l2p_unpack(cur.key())
            if v != vol.id or lba >= end:
                return
            if lba != last and g <= gen:
                last = lba
                yield lba, U64.unpack(cur.value())[0]
            ok = cur.next()

    def index_statistics(self) -> dict[str, Any]:
        """The dedupe index: entries waiting in memory, stale entries, running sweeps."""
        return {"in_memory": len(self.fps), "merging": bool(self.fps.merging),
                "merged_below_chunk": self.fps.upto, "stale": self.stale_fps,
                "pruning": self.prune_from is not None, "filter": self.fps.filter_statistics()}

    # ------------------------------------------------------------------ background work
    def has_background_work(self) -> bool:
        sup = self.supervisor
        # a failed service is tried again when due even if it wants nothing now:
        # that run is what shows it works again
        return (any(sup.due(name) for name in self._pending_work())
                or any(sup.due(_name(svc)) and (sup.is_failing(_name(svc))
                                                or self._service_wanted(svc))
                       for svc in self.services))

    def _service_wanted(self, svc: BackgroundService) -> bool:
        try:
            return svc.wanted(False)
        except Exception as e:  # counts as a failure of the service (it backs off)
            self.supervisor.failed(_name(svc), e)
            return False

    def _pending_work(self) -> list[str]:
        """Names of the queued background work other than the services."""
        out = [name for name, todo in (("reclaim", self.reclaiming),
                                       ("snapshot release", self.dropping),
                                       ("restore", self.restoring), ("clone fill", self.filling))
               if todo]
        out += [name for name, _ in self.jobs]
        if self._prune_wanted(busy=False):
            out.append("index prune")
        return out

    def background_step(self, budget: int, busy: bool) -> int:
        """One bounded slice of background work: reclaim, services, jobs, pruning.

        A service (the segment cleaner, wear leveling) is always registered
        and says itself whether it wants to run (`wanted(busy)`) and does a
        bounded step (`step(budget, busy)` -> work done). A job is a callable
        taking the budget and returning the work it did; it is dropped once it
        returns 0 (tiering recompression and scrub queue theirs with
        `start_job`). Each runs under the supervisor: one that raises is
        skipped for a growing pause while the others go on (background.py).
        """
        sup = self.supervisor
        if self.reclaiming and sup.due("reclaim"):
            done = sup.run("reclaim", self.reclaim_step, budget, default=0)
            if done:
                return done
        if self.dropping and sup.due("snapshot release"):
            done = sup.run("snapshot release", self.drop_step, budget, default=0)
            if done:
                return done
        for svc in self.services:
            name = _name(svc)
            if sup.due(name):
                done = sup.run(name, _service_step, svc, budget, busy, default=0)
                if done:
                    return done
        # after the services: a copy of a huge volume runs for minutes, and
        # must not hold up the cleaner (ENOSPC) or the index merge meanwhile
        if self.restoring and sup.due("restore"):
            done = sup.run("restore", self.restore_step, budget, default=0)
            if done:
                return done
        if self.filling and sup.due("clone fill"):
            done = sup.run("clone fill", self.fill_step, budget, default=0)
            if done:
                return done
        for job in list(self.jobs):
            name, step = job
            if not sup.due(name):
                continue
            done = sup.run(name, step, budget, default=-1)
            if done > 0:
                return done
            if done == 0:
                self.jobs.remove(job)
        if self._prune_wanted(busy) and sup.due("index prune"):
            return sup.run("index prune", self.prune_step, budget, default=0)
        return 0

    def start_job(self, step: Callable[[int], int], name: str = "job") -> None:
        self.jobs.append((name, step))

    def _prune_wanted(self, busy: bool) -> bool:
        if self.prune_from is not None:  # a started sweep finishes, busy or not
            return True
        # idle: once stale entries are an eighth of the index; busy: only once
        # they outnumber live ones (sustained overwrites must not pay for it)
        limit = self.live_chunks if busy else max(PRUNE_MIN_STALE, self.live_chunks // 8)
        return self.stale_fps > limit

    def prune_step(self, budget: int = RECLAIM_SLICE) -> int:
        """Look at up to `budget` fingerprint entries, delete the stale ones.

        A sweep walks the index in key order, so its deletes touch each
        B-tree page once; progress is saved with the work (crash-safe).
        """
        txn = self.meta.txn
        if self.prune_from is None:
            self.prune_from = b""
        cur = txn.cursor(db=self.meta.fp)
        ok = cur.set_range(self.prune_from) if self.prune_from else cur.first()
        seen = 0
        stale: list[bytes] = []
        pending = self.fps.pending
        while ok and seen < budget:
            fp = bytes(cur.key())
            raw = txn.get(_ckey(U64.unpack(cur.value())[0]), db=self.meta.chunks)
            # an entry about to be replaced by the merge was counted as reused already
            if (raw is None or raw[-32:] != fp) and not pending(fp):
                stale.append(fp)
            seen += 1
            ok = cur.next()
        next_key = bytes(cur.key()) if ok else None
        for fp in stale:
            txn.delete(fp, db=self.meta.fp)
        self.stale_fps = max(0, self.stale_fps - len(stale))
        self.meta.pending_ops += len(stale)
        if next_key is None:
            self.prune_from = None
            log.info("dedupe index pruned; %d live fingerprints", self.live_chunks)
        else:
            self.prune_from = next_key
        self.meta.put_json("prune", None if self.prune_from is None else self.prune_from.hex())
        self.dirty = True
        self._maybe_commit()
        return seen

    def _save_reclaim(self) -> None:
        self.meta.put_json("reclaim", {str(k): v for k, v in self.reclaiming.items()})

    def reclaim_step(self, budget: int = RECLAIM_SLICE) -> int:
        """Release up to `budget` map entries of deleted volumes; returns how many.

        A deleted volume disappears at once; its blocks are given back here,
        a slice at a time between client requests, so a delete never stalls
        I/O. Progress is saved in the same transaction as the work, so a
        crash resumes where the last commit left off.
        """
        if not self.reclaiming:
            return 0
        vid = min(self.reclaiming)
        txn, db = self.meta.txn, self.meta.l2p
        cur = txn.cursor(db=db)
        ok = cur.set_range(L2P_KEY.pack(vid, self.reclaiming[vid], 0))
        keys: list[bytes] = []
        cids: list[int] = []
        while ok and len(keys) < budget:
            k = cur.key()
            if L2P_KEY.unpack(k)[0] != vid:
                break
            keys.append(bytes(k))
            cids.append(U64.unpack(cur.value())[0])
            ok = cur.next()
        for k, cid in zip(keys, cids, strict=True):
            txn.delete(k, db=db)
            if cid != NO_CHUNK:
                self._decref(cid)
        self.meta.pending_ops += len(keys)
        done = len(keys)
        if len(keys) < budget:  # map done: then its temperature records
            left = budget - len(keys)
            dropped = self.observer.drop_volume(vid, left) if self.observer is not None else 0
            done += dropped
            if dropped < left:
                del self.reclaiming[vid]
                log.info("volume id %d: all space reclaimed", vid)
            else:
                self.reclaiming[vid] = L2P_LBA_END  # nothing left in the map
        else:
            self.reclaiming[vid] = L2P_KEY.unpack(keys[-1])[1] + 1
        self._save_reclaim()
        self.dirty = True
        self._maybe_commit()
        return done

    # ------------------------------------------------------------------ generations
    # A snapshot freezes the volume's live generation G (O(1): the live one
    # becomes G+1 and later writes add entries instead of replacing frozen
    # ones). Every map entry holds one reference and is visible to the
    # generations from its own up to (not including) the next newer entry of
    # its block; invariant: each entry is visible to at least one generation
    # that still exists (a snapshot's or the live one).

    def freeze(self, vol: Volume) -> int:
        """Freeze the live generation for a snapshot; returns it. O(1)."""
        self.check_ready(vol)
        g = vol.gen
        vol.frozen.append(g)
        vol.gen += 1
        self._persist_volume(vol)
        self.dirty = True
        return g

    def view(self, vol: Volume, gen: int, name: str, size: int) -> Volume:
        """A read-only volume object reading `vol` as of frozen generation `gen`."""
        if gen not in vol.frozen:
            raise NotFound(f"generation {gen} of {vol.name!r} is not frozen")
        return Volume(vol.id, name, size, vol.compression, gen, vol.created_ns, True, base=vol)

    def release(self, vol: Volume, gen: int) -> None:
        """A snapshot is gone: drop (in the background) the entries only it could see."""
        self.check_not_copied_from(vol, gen)
        vol.frozen.remove(gen)
        self._persist_volume(vol)
        self.dropping.append([vol.id, gen, 0])
        self.meta.put_json("dropping", self.dropping)
        self.dirty = True

    def _blocks_entries(self, vid: int, first: int, budget: int
                        ) -> tuple[list[tuple[int, list[tuple[int, int, bytes]]]], int | None]:
        """Entries of up to ~budget map keys from lba `first`, grouped by block
        [(lba, [(gen, chunk, key), newest first])], and the lba to resume at
        (None: the volume's map is done). Whole blocks only."""
        cur = self.meta.txn.cursor(db=self.meta.l2p)
        ok = cur.set_range(L2P_KEY.pack(vid, first, 0))
        out: list[tuple[int, list[tuple[int, int, bytes]]]] = []
        n = 0
        while ok:
            k = bytes(cur.key())
            v, lba, g = l2p_unpack(k)
            if v != vid:
                return out, None
            if not out or out[-1][0] != lba:
                if n >= budget:
                    return out, lba
                out.append((lba, []))
            out[-1][1].append((g, U64.unpack(cur.value())[0], k))
            n += 1
            ok = cur.next()
        return out, None

    def drop_step(self, budget: int = RECLAIM_SLICE) -> int:
        """Drop entries of a released generation that no remaining one sees."""
        vid, gen, first = self.dropping[0]
        vol = self.by_id.get(vid)
        if vol is None:  # the volume went: its reclaim releases everything
            self.dropping.pop(0)
            self.meta.put_json("dropping", self.dropping)
            return 1
        alive = sorted([*vol.frozen, vol.gen])
        prev = max((x for x in alive if x < gen), default=0)
        nxt = min(x for x in alive if x > gen)
        groups, resume = self._blocks_entries(vid, first, budget)
        txn, db = self.meta.txn, self.meta.l2p
        for _lba, entries in groups:
            for i in range(1, len(entries)):
                g, cid, key = entries[i]
                # visible to the released generation and hidden from the next alive one
                if prev < g <= gen and entries[i - 1][0] <= nxt:
                    txn.delete(key, db=db)
                    if cid != NO_CHUNK:
                        self._decref(cid)
        done = sum(len(e) for _, e in groups)
        self.meta.pending_ops += done
        if resume is None:
            self.dropping.pop(0)
            log.info("volume %s: generation %d released", vol.name, gen)
        else:
            self.dropping[0][2] = resume
        self.meta.put_json("dropping", self.dropping)
        self.dirty = True
        self._maybe_commit()
        return max(done, 1)

    # ------------------------------------------------------------------ map copies
    # A restore (the live generation made to read as a frozen one) and a
    # clone's fill (a new volume given a snapshot's blocks) walk the whole
    # map: minutes on a large volume, which must not stall every volume's I/O.
    # Both run as background work, a slice at a time between client requests,
    # with their progress saved in the same transaction as each slice, so a
    # crash resumes them where the last commit left off. Until its copy is
    # done the volume refuses I/O and snapshots (Conflict): half a restore
    # or half a clone is never served. References only: no data is copied.

    def copy_state(self, vol: Volume) -> tuple[str, float, int]:
        """("restoring" | "filling" | "ready", fraction done, blocks so far)."""
        for state, copies in (("restoring", self.restoring), ("filling", self.filling)):
            job = copies.get(vol.id)
            if job is not None:
                blocks = max(1, vol.size // BLOCK_SIZE)
                return state, min(1.0, job[-2] / blocks), job[-1]
        return "ready", 1.0, 0

    def check_ready(self, vol: Volume) -> None:
        """Conflict while a restore or a clone's fill runs into the volume."""
        if not (self.restoring or self.filling) or vol.base is not None:
            return  # (a snapshot's view reads a frozen generation: copies never change it)
        state, done, _ = self.copy_state(vol)
        if state != "ready":
            what = "restored from a snapshot" if state == "restoring" else "filled from a snapshot"
            raise Conflict(f"volume {vol.name!r} is being {what} ({100 * done:.0f}% done)",
                           f"wait until 'pstorage volume show {vol.name}' says ready")

    def check_not_copied_from(self, vol: Volume, gen: int | None = None) -> None:
        """Refuse to release generation `gen` of a volume that it is being restored
        from, or to delete a volume (or release `gen`) that a clone is still being
        filled from."""
        job = self.restoring.get(vol.id)
        if gen is not None and job is not None and job[0] == gen:
            raise Conflict(f"volume {vol.name!r} is being restored from that snapshot",
                           f"wait until 'pstorage volume show {vol.name}' says ready")
        for dst_id, (src_id, g, _, _) in self.filling.items():
            if src_id == vol.id and gen in (None, g):
                dst = self.by_id.get(dst_id)
                raise Conflict(f"clone {dst.name if dst else dst_id!r} is still being filled "
                               f"from {vol.name!r}",
                               "wait until the clone is ready (or delete the clone)")

    def _save_copies(self) -> None:
        self.meta.put_json("restoring", {str(k): v for k, v in self.restoring.items()})
        self.meta.put_json("filling", {str(k): v for k, v in self.filling.items()})
        self.dirty = True

    def start_restore(self, vol: Volume, gen: int, size: int) -> None:
        """Make the live generation read as frozen generation `gen` (and the volume
        `size` bytes long): in the background, see restore_step."""
        if gen not in vol.frozen:
            raise NotFound(f"generation {gen} of {vol.name!r} is not frozen")
        self.check_ready(vol)
        self.restoring[vol.id] = [gen, size, 0, 0]
        self._save_copies()

    def restore_step(self, budget: int = RECLAIM_SLICE, vid: int | None = None) -> int:
        """Restore up to ~budget map entries of a volume (the oldest, or `vid`);
        writes only where the two generations differ."""
        if vid is None:
            vid = min(self.restoring)
        gen, size, first, changed = self.restoring[vid]
        vol = self.by_id[vid]  # (delete_volume drops its restore)
        groups, resume = self._blocks_entries(vid, first, budget)
        todo = []
        for lba, entries in groups:
            live = entries[0][1] if entries[0][0] <= vol.gen else NO_CHUNK
            old = next((c for g, c, _ in entries if g <= gen), NO_CHUNK)
            if live != old and not (lba * BLOCK_SIZE >= size and live == NO_CHUNK):
                todo.append((lba, old))
        for lba, cid in todo:
            if cid != NO_CHUNK:
                self._incref(cid)
            self._map(vol, lba, cid)
        changed += len(todo)
        if resume is None:
            del self.restoring[vid]
            vol.size = size
            self._persist_volume(vol)
            self.finished_copies[vid] = {"kind": "restore", "blocks_changed": changed}
            log.info("volume %s: restore from generation %d done (%d blocks changed)",
                     vol.name, gen, changed)
        else:
            self.restoring[vid] = [gen, size, resume, changed]
        self._save_copies()
        self._maybe_commit()
        return max(1, sum(len(e) for _, e in groups))

    def start_clone(self, src: Volume, gen: int, size: int, name: str) -> Volume:
        """A new volume of `size` bytes (the snapshot's: the source may have been
        resized since) that will read as `src` at frozen generation `gen`, filled
        in the background (fill_step). Created and registered in one commit,
        so that no crash leaves an empty clone that looks complete."""
        if gen not in src.frozen:
            raise NotFound(f"generation {gen} of {src.name!r} is not frozen")
        dst = self._new_volume(name, size, src.compression)
        self.filling[dst.id] = [src.id, gen, 0, 0]
        self._save_copies()
        self.flush()
        return dst

    def finish_copy(self, vol: Volume) -> None:
        """Run the copy into `vol` to its end now (tests, and callers that would
        rather stall than wait), then commit."""
        while True:
            if vol.id in self.restoring:
                self.restore_step(RECLAIM_SLICE, vol.id)
            elif vol.id in self.filling:
                self.fill_step(RECLAIM_SLICE, vol.id)
            else:
                break
        self.flush()

    def fill_step(self, budget: int = RECLAIM_SLICE, dst_id: int | None = None) -> int:
        """Give a clone being filled (the oldest, or `dst_id`) its next `budget`
        blocks: map entries and references."""
        if dst_id is None:
            dst_id = min(self.filling)
        src_id, gen, first, shared = self.filling[dst_id]
        dst, src = self.by_id[dst_id], self.by_id[src_id]  # (both kept, see delete_volume)
        txn, db = self.meta.txn, self.meta.l2p
        # a slice first, then the writes: no cursor walks keys that are changing
        rows = list(itertools.islice(
            ((lba, cid) for lba, cid in self._visible(src, first, dst.size // BLOCK_SIZE, gen)
             if cid != NO_CHUNK), budget))
        for lba, cid in rows:
            self._incref(cid)
            txn.put(l2p_key(dst.id, lba, dst.gen), U64.pack(cid), db=db)
            if self.observer is not None:
                self.observer.mapped(dst.id, lba, 1)
        dst.stats.mapped_blocks += len(rows)
        self.meta.pending_ops += len(rows)
        shared += len(rows)
        if len(rows) < budget:
            del self.filling[dst_id]
            self.finished_copies[dst_id] = {"kind": "fill", "blocks_shared": shared}
            log.info("clone %s filled from %s (%d blocks shared)", dst.name, src.name, shared)
        else:
            self.filling[dst_id] = [src_id, gen, rows[-1][0] + 1, shared]
        self._save_copies()
        self._maybe_commit()
        return max(1, len(rows))

    # ------------------------------------------------------------------ I/O
    def _check_range(self, vol: Volume, offset: int, length: int) -> None:
        live = vol.base or vol
        if self.restoring or self.filling:
            self.check_ready(vol)
        if (self.by_id.get(vol.id) is not live or live.destroyed_ns
                or (vol.base and vol.gen not in live.frozen)):
            raise NotFound(f"volume {vol.name!r} was deleted")
        if offset < 0 or length < 0 or offset + length > vol.size:
            raise InvalidArgument(
                f"range {offset}+{length} is outside volume {vol.name!r} ({vol.size} bytes)"
            )

    def _resolve(self, vol: Volume, first: int, count: int, gen: int) -> list[int]:
        """Chunk ids of blocks [first, first + count) at `gen`, in one cursor walk."""
        if count == 1:
            return [self._lookup(vol, first, gen)]
        out: list[int] = [NO_CHUNK] * count
        for lba, cid in self._visible(vol, first, first + count, gen):
            out[lba - first] = cid
        return out

    def read(self, vol: Volume, offset: int, length: int) -> bytes:
        self._check_range(vol, offset, length)
        vol.stats.reads += 1
        vol.stats.read_bytes += length
        self._touch(vol.id, offset, length)
        if length == 0:
            return b""
        first = offset // BLOCK_SIZE
        count = (offset + length - 1) // BLOCK_SIZE - first + 1
        cids = self._resolve(vol, first, count, vol.gen)
        if count == 1:
            cid = cids[0]
            if cid == NO_CHUNK:
                return bytes(length)
            boff = offset - first * BLOCK_SIZE
            return self.read_chunk(cid)[boff : boff + length]
        data = self._read_chunks(cids)
        out = bytearray(count * BLOCK_SIZE)
        for i, cid in enumerate(cids):
            if cid != NO_CHUNK:
                out[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE] = data[cid]
        boff = offset - first * BLOCK_SIZE
        return bytes(out[boff : boff + length]) if boff or len(out) != length else bytes(out)

    def _read_block(self, vol: Volume, lba: int) -> bytes:
        cid = self._lookup(vol, lba, vol.gen)
        return ZERO_BLOCK if cid == NO_CHUNK else self.read_chunk(cid)

    def _blocks(self, vol: Volume, offset: int, data: bytes | memoryview) -> list[bytes]:
        """Cut a write into whole blocks, merging partial edges with what is stored."""
        mv = memoryview(data)
        first = offset // BLOCK_SIZE
        end = offset + len(mv)
        if offset % BLOCK_SIZE == 0 and end % BLOCK_SIZE == 0:
            return [bytes(mv[i : i + BLOCK_SIZE]) for i in range(0, len(mv), BLOCK_SIZE)]
        count = (end - 1) // BLOCK_SIZE - first + 1
        buf = bytearray(count * BLOCK_SIZE)
        head = offset - first * BLOCK_SIZE
        if head:  # read-modify-write of the partial first block
            buf[:BLOCK_SIZE] = self._read_block(vol, first)
        if end % BLOCK_SIZE and (count > 1 or not head):  # and of the partial last one
            buf[-BLOCK_SIZE:] = self._read_block(vol, first + count - 1)
        buf[head : head + len(mv)] = mv
        return [bytes(buf[i : i + BLOCK_SIZE]) for i in range(0, len(buf), BLOCK_SIZE)]

    def write(self, vol: Volume, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        """Write bytes: partial edge blocks are merged with what is stored, the
        blocks reduced inline, then applied like the reducer thread's results."""
        self._writable(vol)
        self._check_range(vol, offset, len(data))
        if not len(data):
            return
        blocks = self._blocks(vol, offset, data)
        self._touch(vol.id, offset, len(data))
        red = reduce_inline(blocks, codecs.IDS[vol.compression])
        self._apply(vol, offset // BLOCK_SIZE, red, blocks)
        self._written(vol, fua)

    def write_reduced(self, vol: Volume, offset: int, pending: Pending,
                      fua: bool = False) -> None:
        """write() of whole blocks already reduced (hashed and compressed) by the
        reducer thread: the engine thread only does the metadata."""
        self._writable(vol)
        red = pending.wait()
        length = len(red[1]) * BLOCK_SIZE
        self._check_range(vol, offset, length)
        assert offset % BLOCK_SIZE == 0, "the reducer takes whole blocks only"
        self._touch(vol.id, offset, length)
        self._apply(vol, offset // BLOCK_SIZE, red, None)
        self._written(vol, fua)

    def _written(self, vol: Volume, fua: bool) -> None:
        """A write request is applied: count it, and commit if asked."""
        vol.stats.writes += 1
        self.dirty = True
        if fua:
            self.flush()

    def _apply(self, vol: Volume, lba: int, red: Reduction, blocks: list[bytes] | None) -> None:
        """The one write path: map reduced blocks from `lba`. Zero -> hole; known
        fingerprint -> one more reference; else a new chunk. `blocks`: the raw
        blocks, for payloads not compressed yet (reduce_inline)."""
        fps, kinds, payloads, crcs = red
        zeros = unique = dupes = 0
        for i, kind in enumerate(kinds):
            if kind == KIND_ZERO:
                zeros += 1
                self._map(vol, lba + i, NO_CHUNK)
                continue
            fp = fps[32 * i : 32 * i + 32]
            hit = self._dedupe_lookup(fp)
            if hit is not None:
                cid = hit[0]
                self._incref(cid, hit[1])
                dupes += 1
            else:
                payload = payloads[i]
                if payload is None:  # reduced inline: compressed only now
                    assert blocks is not None
                    used, data = self.comp.compress(kind, blocks[i])
                    cid = self._new_chunk(vol, fp, used, data)
                else:
                    cid = self._new_chunk(vol, fp, kind, payload, crcs[i])
                unique += 1
            self._map(vol, lba + i, cid)
        st = vol.stats
        st.written_bytes += len(kinds) * BLOCK_SIZE
        st.zero_bytes += zeros * BLOCK_SIZE
        st.dedupe_bytes += dupes * BLOCK_SIZE
        st.unique_bytes += unique * BLOCK_SIZE

    def _check_failed(self) -> None:
        if self.failed is not None:
            raise DeviceIOError(
                f"the pool failed and refuses writes: {self.failed}",
                "check the device, then restart pstoraged; data up to the last good flush is safe",
            )

    def _writable(self, vol: Volume) -> None:
        self._check_failed()
        if vol.readonly:
            raise ReadOnly(f"volume {vol.name!r} is read-only")

    def zero(self, vol: Volume, offset: int, length: int, fua: bool = False) -> None:
        """Write zeros; whole blocks become holes (no space), edges are rewritten."""
        self._writable(vol)
        self._check_range(vol, offset, length)
        self._touch(vol.id, offset, length)
        end = offset + length
        first = -(-offset // BLOCK_SIZE)
        last = end // BLOCK_SIZE
        if first >= last:  # inside one block
            if length:
                self.write(vol, offset, bytes(length))
        else:
            if offset < first * BLOCK_SIZE:
                self.write(vol, offset, bytes(first * BLOCK_SIZE - offset))
            if end > last * BLOCK_SIZE:
                self.write(vol, last * BLOCK_SIZE, bytes(end - last * BLOCK_SIZE))
            self._unmap_range(vol, first, last)
        self.dirty = True
        if fua:
            self.flush()

    # TRIM: our discarded blocks read back as zeros, which NBD allows.
    trim = zero

    def extents(self, vol: Volume, offset: int, length: int) -> list[tuple[int, int]]:
        """Runs of (length, type) from offset: type 0 data, 3 hole+zero."""
        self._check_range(vol, offset, length)
        end = offset + length
        first = offset // BLOCK_SIZE
        runs: list[tuple[int, int]] = []
        pos = offset

        def add(upto: int, typ: int) -> None:
            nonlocal pos
            upto = min(upto, end)
            if upto <= pos:
                return
            if runs and runs[-1][1] == typ:
                runs[-1] = (runs[-1][0] + upto - pos, typ)
            else:
                runs.append((upto - pos, typ))
            pos = upto

        for lba, cid in self._visible(vol, first, -(-end // BLOCK_SIZE), vol.gen):
            if pos >= end or len(runs) >= MAX_EXTENTS:
                break
            add(lba * BLOCK_SIZE, 3)
            add((lba + 1) * BLOCK_SIZE, 0 if cid != NO_CHUNK else 3)
        if len(runs) < MAX_EXTENTS:
            add(end, 3)
        return runs

    # ------------------------------------------------------------------ durability
    def _touch(self, vid: int, offset: int, length: int) -> None:
        """Record an access for the observer (a few stores; batches go out full)."""
        if self.observer is None:
            return
        n = self._ntouch
        t = self._touches
        t[n] = vid
        t[n + 1] = offset
        t[n + 2] = length
        t[n + 3] = int(self.clock())
        n += 4
        if n == len(t):
            self.observer.accessed(t, n)
            n = 0
        self._ntouch = n

    def pass_accesses(self) -> None:
        """Hand the accesses recorded so far to the observer now."""
        if self._ntouch and self.observer is not None:
            self.observer.accessed(self._touches, self._ntouch)
        self._ntouch = 0

    def _observer_commit(self) -> None:
        if self.observer is not None:
            self.pass_accesses()
            self.observer.before_commit()

    def _maybe_commit(self) -> None:
        """A safe point: no change is half applied, the owner may commit now."""
        if self.safe_point is not None:
            self.safe_point()

    def _updated(self) -> None:
        self.dirty = True
        self._maybe_commit()

    def _persist_counters(self) -> None:
        for vol in self.volumes.values():
            self.meta.put_json(f"vstats:{vol.id}", asdict(vol.stats))
        self.meta.put_json("counters", {
            "next_chunk": self.next_chunk, "next_volume": self.next_volume,
            "live_chunks": self.live_chunks, "live_stored": self.live_stored,
            "checksum_errors": self.checksum_errors, "io_errors": self.io_errors,
            "stale_fps": self.stale_fps,
        })

    def commit(self) -> None:
        """Group commit: segment data first, synced, then the metadata pointing at it.

        A failed device write or sync puts the pool in a failed state (writes
        and flushes get EIO until a restart): after a failed fsync the kernel
        may already have dropped the dirty pages, so retrying could report
        success for data that is gone. Reads keep working.
        """
        self._check_failed()
        try:
            self.segs.flush_data()
            self._observer_commit()
            self._persist_counters()
            txn = self.meta.txn
            for k, v in self.segs.dirty_records():
                txn.put(k, v, db=self.meta.segs)
            self.meta.commit()
        except DeviceIOError as e:
            self._fail(e)
            raise
        self.commits += 1
        self.dirty = False
        if self.segs.after_commit():
            # record the segments' new FREE state in the next commit
            txn = self.meta.txn
            for k, v in self.segs.dirty_records():
                txn.put(k, v, db=self.meta.segs)

    def _fail(self, e: DeviceIOError) -> None:
        self.failed = e.message
        self.io_errors += 1
        log.error("pool failed, writes are refused until restart: %s", e.message)

    def flush(self) -> None:
        """Everything acknowledged before this call is on stable storage when it returns."""
        self.commit()

    def close(self) -> None:
        """Commit and mark the pool clean (not after a failure: see `closed_clean`), close."""
        try:
            if self.failed is None:
                self.meta.put_json("instance", {"id": self.instance.hex(), "clean": True})
                self.commit()
                self.meta.commit()
                self.closed_clean = True
        finally:
            self.segs.close()
            self.pool.close()

    # ------------------------------------------------------------------ reporting
    def statistics(self) -> EngineStatistics:
        ss = self.segs.statistics()
        return EngineStatistics(
            volumes=len(self.volumes),
            provisioned_bytes=sum(v.size for v in self.volumes.values()),
            logical_bytes=sum(v.stats.mapped_blocks for v in self.volumes.values()) * BLOCK_SIZE,
            unique_bytes=self.live_chunks * BLOCK_SIZE,
            stored_bytes=self.live_stored,
            allocated_bytes=(ss.total - ss.free) * ss.segment_size,
            capacity_bytes=ss.total * ss.segment_size,
            free_bytes=ss.free * ss.segment_size,
            live_chunks=self.live_chunks,
            checksum_errors=self.checksum_errors,
            io_errors=self.io_errors,
            read_errors=self.pool.backing.read_errors,
            commits=self.commits,
        )


def _service_step(svc: BackgroundService, budget: int, busy: bool) -> int:
    return svc.step(budget, busy) if svc.wanted(busy) else 0


def _name(svc: BackgroundService) -> str:
    return str(getattr(svc, "name", type(svc).__name__))
