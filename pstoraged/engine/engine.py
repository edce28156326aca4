"""The data-reducing engine: the facade the front ends, the control plane and the tests use.

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

This module holds the request path (read, write, trim, extents), the map
updates and the commit policy; the rest lives in the parts it composes:
volumes.py (catalog), maps.py (L2P queries, reclaim of deleted volumes),
chunks.py (chunk records, refcounts, dedupe index), generations.py
(snapshots' generations, restore, clone fill), background.py (scheduling
and supervision of background work), segments.py (the segment log). The
parts change the open transaction only; the engine decides when to commit.
"""

from __future__ import annotations

import logging
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Protocol

import lmdb

from ..errors import DeviceIOError, InvalidArgument, NotFound, PoolFull, ReadOnly
from . import codecs
from .background import BackgroundService, BackgroundWork, QueuedWork, Supervisor
from .changes import EXTENT_SHIFT, ChangeTracker
from .changes import changed_blocks as _changed_blocks
from .chunks import ChunkStore
from .format import (
    BLOCK_SIZE,
    GEN_MAX,
    L2P_KEY,
    NO_CHUNK,
    U64,
    ZERO_BLOCK,
    l2p_unpack,
)
from .fpindex import DEFAULT_QUOTA as DEFAULT_INDEX_MEMORY
from .generations import Generations
from .maps import L2PMap, Reclaimer
from .pool import Pool
from .reducer import KIND_ZERO, Pending, Reduction, reduce_inline
from .segments import TAIL_KEYS, SegmentLog
from .units import validate_volume_size
from .volumes import FIRST_GEN, Volume, VolumeCatalog, VolumeStats

__all__ = ["FIRST_GEN", "NO_CHUNK", "BackgroundService", "Engine", "EngineStatistics",
           "Volume", "VolumeStats"]

log = logging.getLogger(__name__)

MAX_EXTENTS = 1024  # runs per extents reply; NBD lets a reply cover less
UNMAP_SLICE = 4096  # map entries released per slice of a trim
RECLAIM_SLICE = 1024  # per background step: a few ms, the most a request waits for it

_l2p_key = L2P_KEY.pack


class Observer(Protocol):
    """Watches the data's placement from outside the engine (the heat map,
    analytics/temperature.py), attached by the layer above (Engine.observer).
    Called on the engine thread. (Accesses are not the engine's: the executor
    records them, frontends/executor.py.)"""

    def mapped(self, vid: int, lba: int, delta: int) -> None:
        """A block of a volume's live map gained (+1) or lost (-1) its data."""

    def before_commit(self) -> None:
        """Put pending state into the open transaction (it commits with the data)."""

    def drop_volume(self, vid: int, budget: int) -> int:
        """A deleted volume: drop up to `budget` of its records; returns how many."""


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
    # the parts' per-block methods, bound in __init__: the request path calls
    # them with no extra hop (see chunks.py, maps.py)
    _dedupe_lookup: Callable[[bytes], tuple[int, bytes | memoryview] | None]
    _incref: Callable[..., None]
    _decref: Callable[[int], None]
    _new_chunk: Callable[..., int]
    _read_chunks: Callable[[list[int]], dict[int, bytes]]
    _read_chunk: Callable[[int], bytes]
    _lookup: Callable[[Volume, int, int], int]
    _visible: Callable[[Volume, int, int, int], Iterator[tuple[int, int]]]
    _mapped_lbas: Callable[[Volume, int, int, int], list[int]]

    def __init__(self, pool: Pool, *, reserve_segments: int = 2,
                 clock: Callable[[], float] = time.time,
                 index_memory: int = DEFAULT_INDEX_MEMORY) -> None:
        """index_memory: the dedupe index's memory quota (fpindex.py)."""
        self.pool = pool
        self.meta = pool.meta
        self.clock = clock
        self.observer: Observer | None = None  # e.g. the heat map (data temperature)
        self.segs = SegmentLog(pool.backing, pool.sb, reserve=reserve_segments)
        txn = self.meta.txn
        self.segs.load(b"".join(txn.cursor(db=self.meta.segs).iternext(values=False)),
                       b"".join(txn.cursor(db=self.meta.segs).iternext(keys=False)),
                       {k: bytes(v) for k in TAIL_KEYS
                        if (v := txn.get(k, db=self.meta.meta)) is not None})
        c = self.meta.get_json("counters", {})
        self.io_errors = c.get("io_errors", 0)
        self.catalog = VolumeCatalog(self.meta, c.get("next_volume", 1))
        self.volumes = self.catalog.volumes  # name -> Volume
        self.by_id = self.catalog.by_id  # id -> Volume
        # changed-block tracking: every map change marks its extent (changes.py)
        self.tracker = ChangeTracker(self.meta, self.by_id.values())
        self._changed = self.tracker.pending.add
        self.chunks = ChunkStore(
            self.meta, self.segs, c, on_failure=self._fail, mark_dirty=self.mark_dirty,
            on_index_update=self._updated, index_memory=index_memory)
        ch = self.chunks
        self.comp = ch.comp
        self.fps = ch.fps  # the dedupe index
        self._dedupe_lookup, self._incref, self._decref = ch.dedupe_lookup, ch.incref, ch.decref
        self._new_chunk, self._read_chunk, self._read_chunks = (
            ch.new_chunk, ch.read_chunk, ch.read_chunks)
        self.maps = L2PMap(self.meta)
        self._lookup, self._visible = self.maps.lookup, self.maps.entries
        self._mapped_lbas = self.maps.mapped_lbas
        # deleted volumes whose map entries are still being released: id -> next lba
        self.reclaimer = Reclaimer(self.meta, ch, self._observe_drop)
        self.reclaiming = self.reclaimer.reclaiming
        self.generations = Generations(self.meta, self.catalog, self.maps, ch,
                                       map_block=self._map, heat_mapped=self._observe_mapped,
                                       mark_dirty=self.mark_dirty, tracker=self.tracker)
        self.dropping = self.generations.dropping  # [volume id, generation, next lba]
        self.restoring = self.generations.restoring  # volume id -> [gen, size, next lba, changed]
        self.filling = self.generations.filling  # clone id -> [source id, gen, next lba, shared]
        self.finished_copies = self.generations.finished_copies  # since start: id -> result
        # background work that raises is backed off and reported, not retried in a loop
        self.supervisor = Supervisor()
        # (lambdas: the step is looked up when it runs, so a test can replace it)
        self.background = BackgroundWork(
            self.supervisor,
            first=[QueuedWork("reclaim", lambda busy: bool(self.reclaiming),
                              lambda budget: self.reclaim_step(budget)),
                   QueuedWork("snapshot release", lambda busy: bool(self.dropping),
                              lambda budget: self.drop_step(budget))],
            then=[QueuedWork("restore", lambda busy: bool(self.restoring),
                             lambda budget: self.restore_step(budget)),
                  QueuedWork("clone fill", lambda busy: bool(self.filling),
                             lambda budget: self.fill_step(budget))],
            last=[QueuedWork("index prune", ch.prune_wanted,
                             lambda budget: self.prune_step(budget))])
        self.services = self.background.services
        self.jobs = self.background.jobs  # (name, step): see BackgroundWork.step
        self.background.add_service(self.fps)  # the index merge: the first always-on service
        self.commits = 0
        # bumped by every change of a map entry (_map); `changes` adds the chunks'
        self.map_changes = 0
        # Safe points (between slices of long map changes, after each step of
        # background work) offer the engine's owner a group commit: the owner
        # decides (the executor's CommitPolicy); the engine only offers commit().
        # Without an owner (tests, tools) only flush() and commit() commit.
        self.safe_point: Callable[[], None] | None = None
        self.dirty = False
        self.failed: str | None = None  # set when the device failed a write or sync
        # the metadata region is nearly full: writes that add mappings get
        # ENOSPC, trims and deletes (which make room) still run
        self.meta_full = False
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

    # ------------------------------------------------------------------ the parts' figures
    @property
    def changes(self) -> int:
        """Bumped by every change of a map entry, a reference count or a record's
        size: a cached walk of the maps (usage.py) is current while it stays."""
        return self.map_changes + self.chunks.changes

    # ------------------------------------------------------------------ public hooks
    def mark_dirty(self) -> None:
        """The open transaction holds changes that the next idle commit must write."""
        self.dirty = True

    def _observe_mapped(self, vid: int, lba: int, delta: int) -> None:
        if self.observer is not None:
            self.observer.mapped(vid, lba, delta)

    def _observe_drop(self, vid: int, budget: int) -> int:
        """A deleted volume's records beside its map: change marks, then temperature."""
        done = self.tracker.drop_volume(vid, budget)
        if done < budget and self.observer is not None:
            done += self.observer.drop_volume(vid, budget - done)
        return done

    # ------------------------------------------------------------------ volumes
    def volume(self, name: str) -> Volume:
        return self.catalog.get(name)

    def create_volume(self, name: str, size: int, compression: str = "lz4") -> Volume:
        vol = self.catalog.add(name, size, compression)
        self.flush()
        return vol

    def resize_volume(self, name: str, size: int, shrink: bool = False) -> Volume:
        vol = self.volume(name)
        self.generations.check_ready(vol)
        validate_volume_size(size)
        if size < vol.size:
            if not shrink:
                raise InvalidArgument(
                    f"{size} is smaller than the volume ({vol.size})",
                    "pass --shrink to cut the volume; data past the new end is released",
                )
            self._unmap_range(vol, size // BLOCK_SIZE, vol.size // BLOCK_SIZE)
        vol.size = size
        self.catalog.persist(vol)
        self.flush()
        return vol

    def set_readonly(self, name: str, readonly: bool) -> Volume:
        vol = self.volume(name)
        vol.readonly = bool(readonly)
        self.catalog.persist(vol)
        self.flush()
        return vol

    def set_compression(self, name: str, compression: str) -> Volume:
        vol = self.volume(name)
        codecs.codec_id(compression)
        vol.compression = compression
        self.catalog.persist(vol)
        self.flush()
        return vol

    def delete_volume(self, name: str) -> None:
        """Remove a volume now; its space comes back in the background (reclaim_step)."""
        vol = self.volumes.get(name)
        if vol is None:
            raise NotFound(f"no volume named {name!r}", "see 'pstorage volume list'")
        self.generations.check_not_copied_from(vol)
        self.generations.forget(vol.id)  # a copy into it stops
        self.catalog.remove(vol)
        self.reclaimer.start(vol.id)
        self.dirty = True
        self.flush()

    # ------------------------------------------------------------------ the map
    def _map(self, vol: Volume, lba: int, cid: int) -> None:
        """Point (vol, lba) at chunk `cid` (NO_CHUNK: zeros) in the live generation."""
        txn, db = self.meta.txn, self.meta.l2p
        gen = vol.gen
        key = _l2p_key(vol.id, lba, GEN_MAX - gen)  # format.l2p_key, inline: once per block
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
        self._changed((vol.id, gen, lba >> EXTENT_SHIFT))
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
                self.commit_if_due()
            done += len(todo)
            if len(todo) < UNMAP_SLICE:
                return done
            first = todo[-1] + 1


    # ------------------------------------------------------------------ background work
    def prune_step(self, budget: int = RECLAIM_SLICE) -> int:
        """Look at up to `budget` dedupe index entries, delete the stale ones."""
        done = self.chunks.prune_step(budget)
        self.commit_if_due()
        return done

    def reclaim_step(self, budget: int = RECLAIM_SLICE) -> int:
        """Release up to `budget` map entries of deleted volumes; returns how many."""
        if not self.reclaiming:
            return 0
        done = self.reclaimer.step(budget)
        self.dirty = True
        self.commit_if_due()
        return done

    # ------------------------------------------------------------------ generations
    def drop_step(self, budget: int = RECLAIM_SLICE) -> int:
        """Drop entries of a released generation that no remaining one sees."""
        done = self.generations.drop_step(budget)
        self.dirty = True
        self.commit_if_due()
        return done

    def restore_step(self, budget: int = RECLAIM_SLICE, vid: int | None = None) -> int:
        """Restore up to ~budget map entries of a volume (the oldest, or `vid`)."""
        done = self.generations.restore_step(budget, vid)
        self.dirty = True
        self.commit_if_due()
        return done

    def start_clone(self, src: Volume, gen: int, size: int, name: str) -> Volume:
        """A new volume reading as `src` at frozen generation `gen`, filled in the
        background; created and registered in one commit."""
        dst = self.generations.start_clone(src, gen, size, name)
        self.flush()
        return dst

    def fill_step(self, budget: int = RECLAIM_SLICE, dst_id: int | None = None) -> int:
        """Give a clone being filled (the oldest, or `dst_id`) its next `budget` blocks."""
        done = self.generations.fill_step(budget, dst_id)
        self.dirty = True
        self.commit_if_due()
        return done

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

    # ------------------------------------------------------------------ replicas
    def map_blocks(self, vol: Volume, rows: list[tuple[int, int]]) -> None:
        """Point blocks of `vol`'s live generation at live chunks (one more
        reference each) or NO_CHUNK, whatever its read-only flag: a replica's
        apply (replica.py), which verified the chunks first."""
        self.check_failed()
        if self.meta_full:
            self._refuse_meta_full()
        incref = self._incref
        for lba, cid in rows:
            if cid != NO_CHUNK:
                incref(cid)
            self._map(vol, lba, cid)
        self.dirty = True

    def clear_volume(self, vol: Volume) -> int:
        """Drop every block of the live generation (a replica's rollback when it
        has no snapshot yet); returns how many held data."""
        return self._unmap_range(vol, 0, -(-vol.size // BLOCK_SIZE))

    def check_room(self) -> None:
        """PoolFull while the metadata region is too full for new data."""
        if self.meta_full:
            self._refuse_meta_full()

    # ------------------------------------------------------------------ changed blocks
    def changed_blocks(self, vol: Volume, lo: int, hi: int, first: int = 0
                       ) -> Iterator[tuple[int, int]]:
        """(lba, chunk id at `hi` or NO_CHUNK) of the blocks of `vol` from lba `first`
        on whose content differs between generations lo < hi (0: before the
        first), in lba order; visits only the extents marked in (lo, hi]
        (changes.py). Reads the open transaction: consume it before the next
        change to the maps."""
        self.tracker.persist()
        return _changed_blocks(self.meta.txn, self.meta.l2p, self.meta.cbt, vol.id, lo, hi,
                               first, tracked=self.tracker.tracked(vol.id, lo))

    # ------------------------------------------------------------------ I/O
    def _check_range(self, vol: Volume, offset: int, length: int) -> None:
        live = vol.base or vol
        if self.restoring or self.filling:
            self.generations.check_ready(vol)
        if (self.by_id.get(vol.id) is not live or live.destroyed_ns
                or (vol.base and vol.gen not in live.frozen)):
            raise NotFound(f"volume {vol.name!r} was deleted")
        if offset < 0 or length < 0 or offset + length > vol.size:
            raise InvalidArgument(
                f"range {offset}+{length} is outside volume {vol.name!r} ({vol.size} bytes)"
            )

    def _resolve(self, vol: Volume, first: int, count: int, gen: int) -> list[int]:
        """Chunk ids of blocks [first, first + count) at `gen`, in one cursor walk
        (read() looks a single block up directly)."""
        out: list[int] = [NO_CHUNK] * count
        for lba, cid in self._visible(vol, first, first + count, gen):
            out[lba - first] = cid
        return out

    def read(self, vol: Volume, offset: int, length: int) -> bytes:
        self._check_range(vol, offset, length)
        vol.stats.reads += 1
        vol.stats.read_bytes += length
        if length == 0:
            return b""
        first = offset // BLOCK_SIZE
        count = (offset + length - 1) // BLOCK_SIZE - first + 1
        if count == 1:
            cid = self._lookup(vol, first, vol.gen)
            if cid == NO_CHUNK:
                return bytes(length)
            boff = offset - first * BLOCK_SIZE
            return self._read_chunk(cid)[boff : boff + length]
        cids = self._resolve(vol, first, count, vol.gen)
        data = self._read_chunks(cids)
        out = bytearray(count * BLOCK_SIZE)
        for i, cid in enumerate(cids):
            if cid != NO_CHUNK:
                out[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE] = data[cid]
        boff = offset - first * BLOCK_SIZE
        return bytes(out[boff : boff + length]) if boff or len(out) != length else bytes(out)

    def _read_block(self, vol: Volume, lba: int) -> bytes:
        cid = self._lookup(vol, lba, vol.gen)
        return ZERO_BLOCK if cid == NO_CHUNK else self._read_chunk(cid)

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
        if self.meta_full:
            self._refuse_meta_full()
        self._check_range(vol, offset, len(data))
        n = len(data)
        if not n:
            return
        if n == BLOCK_SIZE and not offset % BLOCK_SIZE:  # the common 4 KiB write
            blocks = [bytes(data)]
        else:
            blocks = self._blocks(vol, offset, data)
        red = reduce_inline(blocks, codecs.IDS[vol.compression])
        self._apply(vol, offset // BLOCK_SIZE, red, blocks)
        self._written(vol, fua)

    def write_reduced(self, vol: Volume, offset: int, pending: Pending,
                      fua: bool = False) -> None:
        """write() of whole blocks already reduced (hashed and compressed) by the
        reducer thread: the engine thread only does the metadata."""
        self._writable(vol)
        if self.meta_full:
            self._refuse_meta_full()
        red = pending.wait()
        length = len(red[1]) * BLOCK_SIZE
        self._check_range(vol, offset, length)
        assert offset % BLOCK_SIZE == 0, "the reducer takes whole blocks only"
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
        try:
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
        except lmdb.MapFullError as e:  # past the reserve in one go: the transaction is lost
            err = PoolFull(f"the pool's metadata region ran full: {e}")
            self._fail(err)
            raise err from e
        st = vol.stats
        st.written_bytes += len(kinds) * BLOCK_SIZE
        st.zero_bytes += zeros * BLOCK_SIZE
        st.dedupe_bytes += dupes * BLOCK_SIZE
        st.unique_bytes += unique * BLOCK_SIZE

    def _refuse_meta_full(self) -> None:
        u = self.meta.usage()
        raise PoolFull(
            f"the pool's metadata region is full ({u['used'] >> 20} of {u['size'] >> 20} MiB "
            "in use): new data is refused",
            "delete snapshots or volumes, or trim unused blocks; a larger --meta-size needs "
            "a new pool")

    def check_failed(self) -> None:
        """DeviceIOError if the pool failed (it then refuses writes until a restart)."""
        if self.failed is not None:
            raise DeviceIOError(
                f"the pool failed and refuses writes: {self.failed}",
                "check the device, then restart pstoraged; data up to the last good flush is safe",
            )

    def _writable(self, vol: Volume) -> None:
        if self.failed is not None:
            self.check_failed()
        if vol.readonly:
            raise ReadOnly(f"volume {vol.name!r} is read-only")

    def zero(self, vol: Volume, offset: int, length: int, fua: bool = False) -> None:
        """Write zeros; whole blocks become holes (no space), edges are rewritten."""
        self._writable(vol)
        self._check_range(vol, offset, length)
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
    def commit_if_due(self) -> None:
        """A safe point: no change is half applied, the owner may commit now (the
        executor's CommitPolicy decides); background work (the cleaner, tiering)
        calls this after each slice."""
        if self.safe_point is not None:
            self.safe_point()

    def _updated(self) -> None:
        self.dirty = True
        self.commit_if_due()

    def _persist_counters(self) -> None:
        for vol in self.volumes.values():
            self.meta.put_json(f"vstats:{vol.id}", asdict(vol.stats))
        ch = self.chunks
        self.meta.put_json("counters", {
            "next_chunk": ch.next_chunk, "next_volume": self.catalog.next_volume,
            "live_chunks": ch.live_chunks, "live_stored": ch.live_stored,
            "checksum_errors": ch.checksum_errors, "io_errors": self.io_errors,
            "stale_fps": ch.stale_fps,
        })

    def commit(self) -> None:
        """Group commit: segment data first, synced, then the metadata pointing at it.

        A failed device write or sync puts the pool in a failed state (writes
        and flushes get EIO until a restart): after a failed fsync the kernel
        may already have dropped the dirty pages, so retrying could report
        success for data that is gone. Reads keep working.
        """
        self.check_failed()
        try:
            self.segs.flush_data()
            if self.observer is not None:
                self.observer.before_commit()
            self.tracker.persist()
            self._persist_counters()
            txn = self.meta.txn
            for k, v in self.segs.dirty_records():
                txn.put(k, v, db=self.meta.segs)
            for k, v in self.segs.tail_records():
                txn.put(k, v, db=self.meta.meta)
            self.meta.commit()
        except (DeviceIOError, PoolFull) as e:
            # the open transaction is gone with what it held: like a crash,
            # only a restart from the last commit is safe
            self._fail(e)
            raise
        self.commits += 1
        self.dirty = False
        if self.meta.bounded:
            self.meta.refresh()
            self.meta_full = self.meta.full
        if self.segs.after_commit():
            # record the segments' new FREE state in the next commit
            txn = self.meta.txn
            for k, v in self.segs.dirty_records():
                txn.put(k, v, db=self.meta.segs)

    def _fail(self, e: DeviceIOError | PoolFull) -> None:
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
        ch = self.chunks
        return EngineStatistics(
            volumes=len(self.volumes),
            provisioned_bytes=sum(v.size for v in self.volumes.values()),
            logical_bytes=sum(v.stats.mapped_blocks for v in self.volumes.values()) * BLOCK_SIZE,
            unique_bytes=ch.live_chunks * BLOCK_SIZE,
            stored_bytes=ch.live_stored,
            allocated_bytes=(ss.total - ss.free) * ss.segment_size,
            capacity_bytes=ss.total * ss.segment_size,
            free_bytes=ss.free * ss.segment_size,
            live_chunks=ch.live_chunks,
            checksum_errors=ch.checksum_errors,
            io_errors=self.io_errors,
            read_errors=self.pool.backing.read_errors,
            commits=self.commits,
        )

