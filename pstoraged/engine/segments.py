"""The segment log: the flash translation layer's append-only store.

The device is cut into fixed-size segments. Records are appended to the
in-memory image of an open segment and written out in aligned blocks. There
is one open segment per stream: client writes go to USER; chunks the
segment cleaner (or tiering) moves go to RELOCATED. Moved chunks survived
at least one segment's worth of overwrites, so they are colder than new
writes; keeping them apart makes segments that die (or stay) together,
which is what lets the cleaner find nearly empty ones (hot/cold separation,
as in LFS and F2FS). A block that reached the device is never rewritten while
the segment is in use. A flush writes the complete 4 KiB blocks only; the
open segment's partial last block (its "tail", < 4 KiB) goes into the metadata
commit instead (`tail_records`, the meta key `seg_tail:<stream>`), and reaches
the segment once it is full or the segment is sealed. Padding the tail at each
flush, as before, stored every FUA'd 4 KiB write in a whole block and undid
its compression; re-writing the partial block in place would be unsafe, since
a torn write on a power cut could destroy records acknowledged by an earlier
flush (docs/format.md "Segment"). A sealed segment is immutable
until every chunk in it is dead; then, once the metadata saying so is
committed, it is discarded and becomes free again. Discards run on their
own thread (punching a hole or BLKDISCARD can take milliseconds); a segment
is not handed out again until its discard has finished.

Per-segment state lives in compact arrays (one entry per segment, never per
block) and is persisted in the `segs` table at each commit. The arrays are the
log's own: other modules read them through the query methods below
(`state_of`, `live_bytes`, `columns()` for vectorised scans, ...), and only
the log changes them. The engine owns the log; the segment cleaner, the
sampler and the REST layer read it.
"""

from __future__ import annotations

import logging
import mmap
import queue
import threading
import time
from array import array
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import CorruptData, PoolFull
from .backing import Backing
from .format import (
    ALIGN,
    RECORD_ALIGN,
    SEG_FREE,
    SEG_KEY,
    SEG_META,
    SEG_OPEN,
    SEG_SEALED,
    SEG_TAIL,
    SEG_TAIL_NONE,
    ChunkHeader,
    SegmentHeader,
    Superblock,
    align_up,
    pack_chunk_header,
)
from .freespace import FreeSegments

log = logging.getLogger(__name__)

# SEG_META as a numpy record: state, stream, reserved, seq, write_ptr, live,
# erase_count, sealed_ns (little-endian, packed: 32 bytes)
_SEG_DTYPE = np.dtype([("state", "u1"), ("stream", "u1"), ("res", "<u2"), ("seq", "<u8"),
                       ("write_ptr", "<u4"), ("live", "<u4"), ("erase", "<u4"),
                       ("sealed_ns", "<u8")])
assert _SEG_DTYPE.itemsize == SEG_META.size

_HEADER = ChunkHeader.SIZE
WRITE_BEHIND = 1 << 20  # write full blocks out once this much is buffered
USER, RELOCATED = 0, 1  # streams: client writes; chunks moved by the cleaner or tiering
STREAMS = 2
TAIL_KEYS = [b"seg_tail:%d" % stream for stream in range(STREAMS)]  # in the meta table
_FREE_TO_ONE = bytes(int(i == SEG_FREE) for i in range(256))  # translate(): SEG_FREE -> 1


@dataclass(frozen=True, slots=True)
class SegmentColumns:
    """Read-only views of the per-segment arrays, one entry per segment.

    For vectorised scans (numpy.frombuffer takes them without a copy); they
    show the log's current values. Drop them when done: a live view pins
    the array's buffer.
    """

    state: memoryview  # uint8: SEG_FREE, SEG_OPEN or SEG_SEALED
    live: memoryview  # uint32: bytes of live records
    seq: memoryview  # uint64: sequence number given when the segment was opened
    erase: memoryview  # uint32: program/erase cycles
    sealed_ns: memoryview  # uint64: when it was sealed (time.time_ns())


@dataclass(frozen=True, slots=True)
class SegmentStatistics:
    total: int
    free: int
    open: int
    sealed: int
    reclaimable: int
    segment_size: int
    min_erase: int
    max_erase: int


def parse_tail(raw: bytes | memoryview | None) -> tuple[int, int, int, bytes] | None:
    """A `seg_tail:<stream>` record: (segment, its seq, start, the bytes from
    start to the write pointer); None if there is none."""
    if raw is None or len(raw) < SEG_TAIL.size:
        return None
    seg, seq, start = SEG_TAIL.unpack_from(raw)
    return seg, seq, start, bytes(raw[SEG_TAIL.size:])


class SegmentLog:
    def __init__(self, backing: Backing, sb: Superblock, reserve: int = 2) -> None:
        self.backing = backing
        self.sb = sb
        self.size = sb.segment_size
        self.count = sb.segment_count
        self.reserve = reserve
        n = self.count
        self.state = bytearray(n)
        self.seq = array("Q", bytes(8 * n))
        self.write_ptr = array("I", bytes(4 * n))
        self.live = array("I", bytes(4 * n))
        self.erase = array("I", bytes(4 * n))
        self.sealed_ns = array("Q", bytes(8 * n))
        self.stream = bytearray(n)  # the stream each segment was opened for
        self.dirty: set[int] = set()
        self.pending_free: set[int] = set()  # dead, waiting for the commit that says so
        self.discarding: set[int] = set()  # free, but the discard is still in flight
        self._discarded: deque[int] = deque()  # filled by the discard thread
        self._discard_q: queue.Queue[int | None] = queue.Queue()
        self._discard_thread: threading.Thread | None = None
        self.next_seq = 1
        self.open = [-1] * STREAMS  # the open segment of each stream, or -1
        self.flushed = [0] * STREAMS  # bytes of it already on the device
        self._tail_dirty = [True] * STREAMS  # its tail changed since the last commit
        self.bufs = [mmap.mmap(-1, self.size) for _ in range(STREAMS)]  # its image
        # free segments ready to hand out, by erase count (O(log n) allocation)
        self._tails: dict[bytes, bytes] = {}  # tail records, while load() runs
        self._free = FreeSegments(self.erase, b"\1" * n)  # (load() rebuilds it)
        self._nfree, self._nsealed = n, 0  # segments in state SEG_FREE, SEG_SEALED

    # persistence -------------------------------------------------------------
    def load(self, keys: bytes, values: bytes,
             tails: dict[bytes, bytes] | None = None) -> None:
        """Load the `segs` table, given as all its keys and all its values
        joined (read in two passes, so that a 10 TiB pool's 2.6 M records are
        decoded as arrays, not one by one), then reopen the open segments;
        `tails` holds the meta table's tail records (key: TAIL_KEYS[stream])."""
        self._tails = tails or {}
        ids = np.frombuffer(keys, dtype=">u4").astype(np.int64)
        recs = np.frombuffer(values, dtype=_SEG_DTYPE)
        if len(ids) != len(recs):
            raise CorruptData(f"segs table: {len(ids)} keys but {len(recs)} records")
        keep = ids < self.count  # (records past the end: a pool upgraded in place)
        ids, recs = ids[keep], recs[keep]
        np.frombuffer(self.state, dtype=np.uint8)[ids] = recs["state"]
        np.frombuffer(self.seq, dtype=np.uint64)[ids] = recs["seq"]
        np.frombuffer(self.write_ptr, dtype=np.uint32)[ids] = recs["write_ptr"]
        np.frombuffer(self.live, dtype=np.uint32)[ids] = recs["live"]
        np.frombuffer(self.erase, dtype=np.uint32)[ids] = recs["erase"]
        np.frombuffer(self.sealed_ns, dtype=np.uint64)[ids] = recs["sealed_ns"]
        stream = recs["stream"].copy()
        stream[stream >= STREAMS] = USER
        np.frombuffer(self.stream, dtype=np.uint8)[ids] = stream
        if len(recs):
            self.next_seq = max(self.next_seq, int(recs["seq"].max()) + 1)
        # freed by a commit, then a crash
        dead = (recs["state"] == SEG_SEALED) & (recs["live"] == 0)
        self.pending_free.update(int(x) for x in ids[dead])
        opened = [int(x) for x in ids[recs["state"] == SEG_OPEN]]
        for s in sorted(opened, key=lambda x: self.seq[x]):
            self._reopen(s)
        self._tails = {}
        self._recount()

    def _recount(self) -> None:
        """Rebuild the counts and the free-segment order from the state array."""
        self._nfree = self.state.count(SEG_FREE)
        self._nsealed = self.state.count(SEG_SEALED)
        avail = self.state.translate(_FREE_TO_ONE)
        for s in self.discarding:
            avail[s] = 0
        self._free.build(avail)

    def set_erase_count(self, s: int, n: int) -> None:
        """Set segment s's erase count (tests and tools: a pool with a known wear history)."""
        self.erase[s] = n
        self._free.update(s)

    def _reopen(self, s: int) -> None:
        """Continue an open segment after its last committed record.

        Anything past write_ptr on the device was never committed, so it is
        overwritten. The image is rebuilt from the device up to the last
        complete block below write_ptr, and from the committed tail record
        past it (that block on the device, if any, was never committed).
        """
        stream = self.stream[s]
        if self.open[stream] >= 0:  # two open in one stream: keep the newer
            self._seal(self.open[stream])
        self.open[stream] = s
        wp = self.write_ptr[s]
        start = wp // ALIGN * ALIGN
        tail = b""
        if wp > start:
            rec = parse_tail(self._tails.get(TAIL_KEYS[stream]))
            if rec is not None and rec[:3] == (s, self.seq[s], start):
                tail = rec[3]
            if len(tail) != wp - start:
                raise CorruptData(
                    f"open segment {s}: the metadata has no tail record for its last "
                    f"{wp - start} bytes", "run `pstorage pool check`")
        buf = self.bufs[stream]
        buf[:] = bytes(self.size)
        if start:
            buf[:start] = self.backing.pread(self.offset(s), start)
        buf[start:wp] = tail
        self.flushed[stream] = start
        self._tail_dirty[stream] = True

    def dirty_records(self) -> Iterator[tuple[bytes, bytes]]:
        for s in sorted(self.dirty):
            yield SEG_KEY.pack(s), SEG_META.pack(
                self.state[s], self.stream[s], 0, self.seq[s], self.write_ptr[s], self.live[s],
                self.erase[s], self.sealed_ns[s],
            )
        self.dirty.clear()

    # geometry ----------------------------------------------------------------
    def offset(self, s: int) -> int:
        return self.sb.data_offset + s * self.size

    def free_count(self) -> int:
        return self._nfree

    def _allocatable(self) -> int:
        """Free segments that can be handed out now (discard finished)."""
        self._reap_discards()
        return self._free.count

    # discards ----------------------------------------------------------------
    def _discard(self, s: int) -> None:
        self.discarding.add(s)
        if self._discard_thread is None:
            self._discard_thread = threading.Thread(
                target=self._discard_loop, name="discard", daemon=True)
            self._discard_thread.start()
        self._discard_q.put(s)

    def _discard_loop(self) -> None:
        while (s := self._discard_q.get()) is not None:
            try:
                self.backing.discard(self.offset(s), self.size)
            except Exception as e:  # discard is advisory; never fail a flush on it
                log.warning("discard of segment %d failed: %s", s, e)
            self._discarded.append(s)
            self._discard_q.task_done()
        self._discard_q.task_done()

    def _reap_discards(self) -> None:
        while self._discarded:
            s = self._discarded.popleft()
            self.discarding.discard(s)
            if self.state[s] == SEG_FREE:
                self._free.add(s)

    def wait_discards(self) -> None:
        self._discard_q.join()
        self._reap_discards()

    # allocation --------------------------------------------------------------
    def _allocate(self, stream: int, reserve_ok: bool = False) -> int:
        """Open a free segment for `stream`. Client writes leave `reserve` segments
        free so that the segment cleaner (reserve_ok=True) can always make progress."""
        floor = 0 if reserve_ok else self.reserve
        if self._allocatable() <= floor and self.discarding:
            self.wait_discards()
        if self._allocatable() <= floor:
            raise PoolFull(
                "the pool is full",
                "free space: trim data, delete snapshots or volumes and eradicate them "
                "(destroyed ones keep their space until eradicated), or grow the pool",
            )
        # Wear leveling: client writes (hot) get the least-erased free segment;
        # moved chunks (cold, rarely rewritten) park on the most-erased one, so
        # that worn segments rest and fresh ones take the churn. Ties by position.
        s = self._free.most_worn() if stream == RELOCATED else self._free.least_worn()
        self._free.remove(s)
        if self.seq[s]:
            self.erase[s] += 1  # reuse after a discard = one program/erase cycle
        self.state[s] = SEG_OPEN
        self._nfree -= 1
        self.seq[s] = self.next_seq
        self.next_seq += 1
        self.live[s] = 0
        self.stream[s] = stream
        buf = self.bufs[stream]
        buf[:] = bytes(self.size)
        hdr = SegmentHeader(s, self.seq[s], self.sb.uuid, time.time_ns()).to_bytes()
        buf[: len(hdr)] = hdr
        self.write_ptr[s] = len(hdr)
        self.flushed[stream] = 0
        self._tail_dirty[stream] = True
        self.open[stream] = s
        self.dirty.add(s)
        return s

    def _seal(self, s: int) -> None:
        stream = self.stream[s]
        self._write_out(stream, full=True)
        self.state[s] = SEG_SEALED
        self._nsealed += 1
        self.sealed_ns[s] = time.time_ns()
        self.dirty.add(s)
        self.open[stream] = -1
        self._tail_dirty[stream] = True
        if self.live[s] == 0:
            self.pending_free.add(s)

    def append_chunk(self, kind: int, codec: int, cid: int, raw_len: int, fp: bytes,
                     crc: int, payload: bytes, *, reserve_ok: bool = False,
                     stream: int = USER) -> tuple[int, int, int]:
        """Append one chunk record to `stream`; return (segment, offset, bytes it occupies).

        The header is built here, once the segment is known: it carries that
        segment's sequence number (format.ChunkHeader). reserve_ok: the
        segment cleaner may open a segment from the reserve.
        """
        # align_up(..., RECORD_ALIGN), inline: this runs once per stored chunk
        need = (_HEADER + len(payload) + RECORD_ALIGN - 1) // RECORD_ALIGN * RECORD_ALIGN
        s = self.open[stream]
        if s < 0 or self.write_ptr[s] + need > self.size:
            if s >= 0:
                self._seal(s)
            s = self._allocate(stream, reserve_ok)
        header = pack_chunk_header(kind, codec, cid, raw_len, len(payload), fp, crc, self.seq[s])
        buf = self.bufs[stream]
        off = self.write_ptr[s]
        buf[off : off + len(header)] = header
        buf[off + len(header) : off + len(header) + len(payload)] = payload
        self.write_ptr[s] = off + need
        self.live[s] += need
        self.dirty.add(s)
        self._tail_dirty[stream] = True
        if self.write_ptr[s] - self.flushed[stream] >= WRITE_BEHIND:
            self._write_out(stream, full=False)
        return s, off, need

    def _write_out(self, stream: int, full: bool) -> None:
        """Write buffered bytes of the stream's open segment to the device.

        full=False writes only complete blocks; full=True (sealing) pads the
        tail to the block boundary (wasting < 4 KiB once per segment).
        """
        s = self.open[stream]
        if s < 0:
            return
        wp = self.write_ptr[s]
        flushed = self.flushed[stream]
        end = align_up(wp) if full else wp // ALIGN * ALIGN
        if end > flushed:
            start = self.offset(s) + flushed
            self.backing.pwrite(start, memoryview(self.bufs[stream])[flushed:end])
            self.backing.start_writeback(start, end - flushed)
            self.flushed[stream] = end
        if full and wp != end:
            self.write_ptr[s] = end
            self.dirty.add(s)

    def flush_data(self) -> None:
        """Make the complete blocks of every appended record durable, before the
        metadata that points at them; the partial tails go into that metadata
        (tail_records), which makes every appended record durable."""
        for stream in range(STREAMS):
            self._write_out(stream, full=False)
        self.backing.sync()

    def tail_records(self) -> Iterator[tuple[bytes, bytes]]:
        """For the meta table, in the commit after flush_data: each stream's
        unflushed tail (the bytes of its open segment past the last complete
        block), where it changed."""
        for stream in range(STREAMS):
            if not self._tail_dirty[stream]:
                continue
            self._tail_dirty[stream] = False
            s = self.open[stream]
            if s < 0:
                yield TAIL_KEYS[stream], SEG_TAIL.pack(SEG_TAIL_NONE, 0, 0)
                continue
            start = self.flushed[stream]
            yield TAIL_KEYS[stream], (SEG_TAIL.pack(s, self.seq[s], start)
                                      + self.bufs[stream][start : self.write_ptr[s]])

    def after_commit(self) -> list[int]:
        """The commit recorded these segments as dead: free and discard them."""
        freed = sorted(self.pending_free)
        for s in freed:
            if self.state[s] != SEG_SEALED or self.live[s] != 0:
                continue
            self.state[s] = SEG_FREE
            self._nfree += 1
            self._nsealed -= 1
            self.write_ptr[s] = 0
            self.dirty.add(s)
            self._discard(s)
        self.pending_free.clear()
        return freed

    # queries (for the cleaner, the sampler, reports) ---------------------------
    def state_of(self, s: int) -> int:
        """SEG_FREE, SEG_OPEN or SEG_SEALED."""
        return self.state[s]

    def live_bytes(self, s: int) -> int:
        """Bytes of live records in segment s."""
        return self.live[s]

    def seq_of(self, s: int) -> int:
        """The sequence number segment s got when it was last opened (0: never used)."""
        return self.seq[s]

    def erase_count(self, s: int) -> int:
        """Program/erase cycles segment s has been through."""
        return self.erase[s]

    def write_ptr_of(self, s: int) -> int:
        """Where the next record of segment s would go (its data end once sealed)."""
        return self.write_ptr[s]

    def open_segment(self, stream: int) -> int:
        """The open segment of `stream`, or -1."""
        return self.open[stream]

    def open_live_bytes(self) -> int:
        """Live bytes in the open segments (not yet sealed, so not reclaimable)."""
        return sum(self.live[o] for o in self.open if o >= 0)

    def sealed_count(self) -> int:
        """Sealed segments, including those waiting to be freed by a commit."""
        return self._nsealed

    def pending_free_count(self) -> int:
        """Sealed segments with no live data left: freed by the next commit."""
        return len(self.pending_free)

    def erase_counts(self) -> list[int]:
        """Erase count of every segment, in segment order (a copy)."""
        return self.erase.tolist()

    def columns(self) -> SegmentColumns:
        """Read-only views of the per-segment arrays (see SegmentColumns)."""
        return SegmentColumns(
            memoryview(self.state).toreadonly(), memoryview(self.live).toreadonly(),
            memoryview(self.seq).toreadonly(), memoryview(self.erase).toreadonly(),
            memoryview(self.sealed_ns).toreadonly())

    # reading -----------------------------------------------------------------
    def read(self, s: int, off: int, length: int) -> bytes:
        if not (0 <= s < self.count) or off + length > self.size:
            raise CorruptData(f"chunk location {s}:{off}+{length} outside the pool")
        for stream, o in enumerate(self.open):
            if s == o:  # its image in memory is complete
                return self.bufs[stream][off : off + length]
        return self.backing.pread(self.offset(s) + off, length)

    def release(self, s: int, size: int) -> None:
        """A chunk of `size` bytes in segment s died."""
        self.live[s] -= size
        self.dirty.add(s)
        if self.live[s] == 0 and self.state[s] == SEG_SEALED:
            self.pending_free.add(s)

    def statistics(self) -> SegmentStatistics:
        free, sealed = self._nfree, self._nsealed
        return SegmentStatistics(
            total=self.count, free=free, open=self.count - free - sealed, sealed=sealed,
            reclaimable=len(self.pending_free), segment_size=self.size,
            min_erase=min(self.erase) if self.count else 0,
            max_erase=max(self.erase) if self.count else 0,
        )

    def close(self) -> None:
        if self._discard_thread is not None:  # finish discards before the device closes
            self._discard_q.put(None)
            self._discard_thread.join()
            self._discard_thread = None
        for buf in self.bufs:
            buf.close()
