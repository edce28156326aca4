"""The segment log: the flash translation layer's append-only store.

The device is cut into fixed-size segments. One segment is open at a time;
chunk records are appended to its in-memory image and written out in aligned
blocks. A block that reached the device is never rewritten: at each flush
the tail is padded to the next 4 KiB boundary. A sealed segment is immutable
until every chunk in it is dead; then, once the metadata saying so is
committed, it is discarded and becomes free again. Discards run on their
own thread (punching a hole or BLKDISCARD can take milliseconds); a segment
is not handed out again until its discard has finished.

Per-segment state lives in compact arrays (one entry per segment, never per
block) and is persisted in the `segs` table at each commit.
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

from .backing import Backing
from .errors import CorruptData, PoolFull
from .format import (
    ALIGN,
    RECORD_ALIGN,
    SEG_FREE,
    SEG_KEY,
    SEG_META,
    SEG_OPEN,
    SEG_SEALED,
    SegmentHeader,
    Superblock,
    align_up,
)

log = logging.getLogger(__name__)

WRITE_BEHIND = 1 << 20  # write full blocks out once this much is buffered


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
        self.dirty: set[int] = set()
        self.pending_free: set[int] = set()  # dead, waiting for the commit that says so
        self.discarding: set[int] = set()  # free, but the discard is still in flight
        self._discarded: deque[int] = deque()  # filled by the discard thread
        self._discard_q: queue.Queue[int | None] = queue.Queue()
        self._discard_thread: threading.Thread | None = None
        self.next_seq = 1
        self.open_seg = -1
        self.flushed = 0  # bytes of the open segment already on the device
        self.buf = mmap.mmap(-1, self.size)

    # persistence -------------------------------------------------------------
    def load(self, items: Iterator[tuple[bytes, bytes]]) -> None:
        for k, v in items:
            (s,) = SEG_KEY.unpack(k)
            if s >= self.count:
                continue
            st, _, _, seq, wp, live, erase, sealed = SEG_META.unpack(v)
            self.state[s], self.seq[s], self.write_ptr[s] = st, seq, wp
            self.live[s], self.erase[s], self.sealed_ns[s] = live, erase, sealed
            self.next_seq = max(self.next_seq, seq + 1)
            if st == SEG_OPEN:
                self._reopen(s)
            elif st == SEG_SEALED and live == 0:
                self.pending_free.add(s)  # freed by a commit, then a crash

    def _reopen(self, s: int) -> None:
        """Continue the open segment after its last committed record.

        Anything past write_ptr on the device was never committed, so it is
        overwritten. The image is rebuilt from the device up to write_ptr.
        """
        if self.open_seg >= 0:  # two open segments: keep the newer
            self._seal(self.open_seg)
        self.open_seg = s
        wp = self.write_ptr[s]
        self.buf[:] = bytes(self.size)
        if wp:
            self.buf[:wp] = self.backing.pread(self.offset(s), wp)
        self.flushed = wp

    def dirty_records(self) -> Iterator[tuple[bytes, bytes]]:
        for s in sorted(self.dirty):
            yield SEG_KEY.pack(s), SEG_META.pack(
                self.state[s], 0, 0, self.seq[s], self.write_ptr[s], self.live[s],
                self.erase[s], self.sealed_ns[s],
            )
        self.dirty.clear()

    # geometry ----------------------------------------------------------------
    def offset(self, s: int) -> int:
        return self.sb.data_offset + s * self.size

    def free_count(self) -> int:
        return self.state.count(SEG_FREE)

    def _allocatable(self) -> int:
        """Free segments that can be handed out now (discard finished)."""
        self._reap_discards()
        return self.state.count(SEG_FREE) - len(self.discarding)

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
            self.discarding.discard(self._discarded.popleft())

    def wait_discards(self) -> None:
        self._discard_q.join()
        self._reap_discards()

    # allocation --------------------------------------------------------------
    def _allocate(self, reserve_ok: bool = False) -> int:
        """Open a free segment. Client writes leave `reserve` segments free so
        that the segment cleaner (reserve_ok=True) can always make progress."""
        floor = 0 if reserve_ok else self.reserve
        if self._allocatable() <= floor and self.discarding:
            self.wait_discards()
        if self._allocatable() <= floor:
            raise PoolFull(
                "the pool is full",
                "free space: trim data, delete snapshots or volumes and eradicate them "
                "(destroyed ones keep their space until eradicated), or grow the pool",
            )
        # Wear leveling: the least-erased free segment, ties by position.
        best, best_erase = -1, 1 << 32
        for s in range(self.count):
            if (self.state[s] == SEG_FREE and self.erase[s] < best_erase
                    and s not in self.discarding):
                best, best_erase = s, self.erase[s]
                if best_erase == 0 and self.seq[s] == 0:
                    break  # never used: cannot do better
        s = best
        if self.seq[s]:
            self.erase[s] += 1  # reuse after a discard = one program/erase cycle
        self.state[s] = SEG_OPEN
        self.seq[s] = self.next_seq
        self.next_seq += 1
        self.live[s] = 0
        self.buf[:] = bytes(self.size)
        hdr = SegmentHeader(s, self.seq[s], self.sb.uuid, time.time_ns()).to_bytes()
        self.buf[: len(hdr)] = hdr
        self.write_ptr[s] = len(hdr)
        self.flushed = 0
        self.open_seg = s
        self.dirty.add(s)
        return s

    def _seal(self, s: int) -> None:
        self._write_out(full=True)
        self.state[s] = SEG_SEALED
        self.sealed_ns[s] = time.time_ns()
        self.dirty.add(s)
        self.open_seg = -1
        if self.live[s] == 0:
            self.pending_free.add(s)

    def append(self, header: bytes, payload: bytes, *, reserve_ok: bool = False
               ) -> tuple[int, int, int]:
        """Append one record; return (segment, offset, bytes it occupies).

        reserve_ok: the segment cleaner may open a segment from the reserve.
        """
        need = align_up(len(header) + len(payload), RECORD_ALIGN)
        if self.open_seg < 0 or self.write_ptr[self.open_seg] + need > self.size:
            if self.open_seg >= 0:
                self._seal(self.open_seg)
            self._allocate(reserve_ok)
        s = self.open_seg
        off = self.write_ptr[s]
        self.buf[off : off + len(header)] = header
        self.buf[off + len(header) : off + len(header) + len(payload)] = payload
        self.write_ptr[s] = off + need
        self.live[s] += need
        self.dirty.add(s)
        if self.write_ptr[s] - self.flushed >= WRITE_BEHIND:
            self._write_out(full=False)
        return s, off, need

    def _write_out(self, full: bool) -> None:
        """Write buffered bytes of the open segment to the device.

        full=False writes only complete blocks; full=True pads the tail to the
        block boundary (wasting < 4 KiB) so no written block is ever rewritten.
        """
        s = self.open_seg
        if s < 0:
            return
        wp = self.write_ptr[s]
        end = align_up(wp) if full else wp // ALIGN * ALIGN
        if end > self.flushed:
            start = self.offset(s) + self.flushed
            self.backing.pwrite(start, memoryview(self.buf)[self.flushed : end])
            self.backing.start_writeback(start, end - self.flushed)
            self.flushed = end
        if full and wp != end:
            self.write_ptr[s] = end
            self.dirty.add(s)

    def flush_data(self) -> None:
        """Make every appended record durable (before the metadata that points at it)."""
        self._write_out(full=True)
        self.backing.sync()

    def after_commit(self) -> list[int]:
        """The commit recorded these segments as dead: free and discard them."""
        freed = sorted(self.pending_free)
        for s in freed:
            if self.state[s] != SEG_SEALED or self.live[s] != 0:
                continue
            self.state[s] = SEG_FREE
            self.write_ptr[s] = 0
            self.dirty.add(s)
            self._discard(s)
        self.pending_free.clear()
        return freed

    # reading -----------------------------------------------------------------
    def read(self, s: int, off: int, length: int) -> bytes:
        if not (0 <= s < self.count) or off + length > self.size:
            raise CorruptData(f"chunk location {s}:{off}+{length} outside the pool")
        if s == self.open_seg:  # its image in memory is complete
            return self.buf[off : off + length]
        return self.backing.pread(self.offset(s) + off, length)

    def release(self, s: int, size: int) -> None:
        """A chunk of `size` bytes in segment s died."""
        self.live[s] -= size
        self.dirty.add(s)
        if self.live[s] == 0 and self.state[s] == SEG_SEALED:
            self.pending_free.add(s)

    def statistics(self) -> SegmentStatistics:
        free = self.state.count(SEG_FREE)
        sealed = self.state.count(SEG_SEALED)
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
        self.buf.close()
