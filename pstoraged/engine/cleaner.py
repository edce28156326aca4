"""The segment cleaner: garbage collection and static wear leveling.

A log-structured pool gets space back only by emptying segments. Overwrites,
trims and deletes leave dead records scattered over sealed segments; the
cleaner picks a victim, moves its live chunks to the relocated stream's open
segment (colder data, kept apart from client writes: segments.py) with
`ChunkStore.rewrite_chunk` (crash-safe: the old record stays in use until the
commit that repoints the chunk) and the emptied segment is freed and
discarded after the next commit (segments.py).

Policy (docs/cleaner.md explains the numbers):

* **When**: below a low watermark of free segments, until a high one
  (hysteresis), in small slices while clients are busy and harder the closer
  the pool gets to its reserve; at the reserve itself (client writes already
  fail with ENOSPC) it works in bigger slices. Its moves may use the reserve:
  a victim is only taken if it surely fits and frees more than it takes. When
  idle it also compacts once a quarter of the sealed bytes are dead, and does
  static wear leveling once erase counts spread too far.
* **Which**: cost-benefit (Rosenblum and Ousterhout's LFS): the sealed segment
  maximising (1 - u) * age / (1 + u), u = live / capacity, age = time since
  it was sealed. Old data that is still live is likely to stay live, so an
  old segment is worth cleaning at a higher u than a young one that is still
  dying by itself. At the reserve it is greedy (lowest u): space now beats
  space well spent.
* **Never guess**: a record whose header or payload fails its checks stops
  the walk of that segment; nothing in it is moved again, an error is logged
  and counted, and the segment is left for scrub/repair.

Everything runs on the engine thread between client batches (a background
service, see `BackgroundWork.step`), so no locking; each step is bounded.
Victim selection is one vectorised pass over the per-segment arrays (numpy
views of segments.py's compact arrays, no per-segment Python objects), done
once per victim.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..errors import CorruptData, DeviceIOError, FormatError, InvalidArgument, PoolFull
from .engine import Engine
from .format import (
    ALIGN,
    BLOCK_SIZE,
    CHUNK_KEY,
    CHUNK_META,
    KIND_CHUNK,
    SEG_SEALED,
    SEQ_MASK,
    ChunkHeader,
    SegmentHeader,
    align_down,
    align_up,
    crc32,
    record_size,
    stale_message,
)
from .segments import RELOCATED

log = logging.getLogger(__name__)

# --- policy ---------------------------------------------------------------------
# A victim must give back a real fraction of a segment: cleaning a 95% full
# segment already writes 19 bytes for every byte it frees.
UTILIZATION_CEILING = 0.95
# Opportunistic (idle) cleaning takes only segments that pay back well; when
# more than DEAD_FRACTION_IDLE of the sealed bytes are dead, the average
# segment is below 1 - DEAD_FRACTION_IDLE, so such a victim always exists.
IDLE_UTILIZATION_CEILING = 0.75
DEAD_FRACTION_IDLE = 0.25
# Free-segment watermarks: cleaning starts below reserve + max(4, 1% of the
# segments) and goes on until max(2, 1%) more are free. Kept small on purpose:
# free segments cannot hold data, so every segment kept free raises the
# utilization of the rest and with it the write amplification (80% fill, 256
# segments: keeping 5-10% free measured WA 4.3 instead of 3.2, docs/cleaner.md).
# The free pool only has to absorb what clients write between two steps.
WATERMARK_FRACTION = 0.01
LOW_WATERMARK_EXTRA = 4
HYSTERESIS_MIN = 2
# Static wear leveling starts when the most-erased segment is this many
# program/erase cycles ahead of the least-erased segment that holds data.
WEAR_SPREAD_LIMIT = 16
# Seconds added to every age: segments sealed within about a second of each
# other compete on utilization (greedy), and a clock stepping backwards can
# never make a score negative.
AGE_BIAS = 1.0
# Records examined per step: budget // BUSY_SHARE while clients are busy,
# ramping up to budget * EMERGENCY_FACTOR as free segments approach the
# reserve; budget // IDLE_SHARE when idle.
BUSY_SHARE = 4
IDLE_SHARE = 2
EMERGENCY_FACTOR = 2
IDLE_BUDGET = 2048  # what the data plane passes when idle; run_pass uses it
READ_WINDOW = 128 << 10  # bytes of a victim read per device read
MAX_RECORD = record_size(BLOCK_SIZE)  # largest single-chunk record

Mode = Literal["emergency", "space", "fragmentation", "wear"]
Kind = Literal["gc", "wear"]


@dataclass(frozen=True, slots=True)
class CleanerStatistics:
    """Counters are cumulative over the pool's life (persisted in the meta table)."""

    segments_cleaned: int  # by garbage collection
    chunks_moved: int
    bytes_moved: int  # record bytes GC wrote (padding included)
    wear_segments_cleaned: int  # by static wear leveling
    wear_chunks_moved: int
    wear_bytes_moved: int
    passes: int  # times the cleaner started working after having nothing to do
    user_bytes: int  # record bytes the clients' new chunks took
    write_amplification: float | None  # (user + moved) / user; None before any user data
    # times a victim was left alone: a record failed its checks, a read
    # failed, or its live bytes disagreed with the chunk index (each logged)
    corrupt_records: int
    skipped_segments: tuple[int, ...]  # left alone until they are reused
    victim: int | None  # segment being cleaned now
    victim_offset: int  # where its walk resumes
    mode: Mode | None  # what the cleaner would do now if clients were idle
    free_segments: int
    low_watermark: int
    high_watermark: int
    reserve: int
    utilization_ceiling: float
    dead_fraction: float  # of the sealed segments' capacity
    wear_spread: int  # max - min erase count over all segments
    wear_spread_limit: int
    requested: bool  # an operator's pass (pstorage gc) is pending


@dataclass(frozen=True, slots=True)
class CleanResult:
    """What `clean_segment` did to one segment."""

    segment: int
    complete: bool  # no live chunk left: the segment is freed by the next commit
    chunks_moved: int
    bytes_moved: int
    error: str | None  # why it stopped early


class _Victim:
    """The segment being cleaned and where its walk resumes (kept across steps)."""

    __slots__ = ("segment", "seq", "kind", "off", "end", "win", "win_off",
                 "chunks", "moved", "error")

    def __init__(self, segment: int, seq: int, kind: Kind, end: int) -> None:
        self.segment = segment
        self.seq = seq
        self.kind: Kind = kind
        self.off = 0  # 0: the segment header is not checked yet
        self.end = end
        self.win = b""  # bytes of the segment read from the device ...
        self.win_off = 0  # ... starting at this offset
        self.chunks = 0
        self.moved = 0
        self.error: str | None = None


class _Unreadable(Exception):
    """A victim record failed its checks; its segment is left alone."""

    def __init__(self, message: str, checksum: bool = True) -> None:
        super().__init__(message)
        self.checksum = checksum  # counts as a checksum error of the pool


class SegmentCleaner:
    """Background service: segment cleaning and static wear leveling.

    Register with `engine.background.add_service(SegmentCleaner(engine))`; the
    engine thread calls `wanted(busy)` and `step(budget, busy)` between
    client batches. `run_pass()` and `clean_segment()` drive it directly
    (tests, `pstorage gc`).
    """

    name = "cleaner"

    @classmethod
    def of(cls, engine: Engine) -> SegmentCleaner | None:
        """The cleaner registered with `engine`, if any."""
        return next((s for s in engine.services if isinstance(s, cls)), None)

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        segs = engine.segs
        self.capacity = segs.size - SegmentHeader.SIZE  # record bytes a segment can hold
        # A victim must free at least two records' worth, or packing losses
        # (a record that does not fit at a segment's end, padding at a
        # flush) could make cleaning it gain nothing, forever.
        slack = 2 * MAX_RECORD
        self.max_live = max(0, min(int(self.capacity * UTILIZATION_CEILING),
                                   self.capacity - slack))
        self.idle_max_live = min(self.max_live, int(self.capacity * IDLE_UTILIZATION_CEILING))
        step = math.ceil(segs.count * WATERMARK_FRACTION)
        self.low = segs.reserve + max(LOW_WATERMARK_EXTRA, step)
        self.high = self.low + max(HYSTERESIS_MIN, step)
        c: dict[str, Any] = engine.meta.get_json("cleaner", {})
        self.segments_cleaned: int = c.get("segments_cleaned", 0)
        self.chunks_moved: int = c.get("chunks_moved", 0)
        self.bytes_moved: int = c.get("bytes_moved", 0)
        self.wear_segments_cleaned: int = c.get("wear_segments_cleaned", 0)
        self.wear_chunks_moved: int = c.get("wear_chunks_moved", 0)
        self.wear_bytes_moved: int = c.get("wear_bytes_moved", 0)
        self.passes: int = c.get("passes", 0)
        self.user_bytes: int = c.get("user_bytes", 0)
        self.corrupt_records: int = c.get("corrupt_records", 0)
        # volume id -> its stored_bytes when last added to user_bytes
        self._seen: dict[int, int] = {int(k): v for k, v in c.get("seen", {}).items()}
        # segment -> seq: left alone (unreadable record); void once the segment is reused
        self.skip: dict[int, int] = {int(k): v for k, v in c.get("skip", {}).items()}
        self._victim: _Victim | None = None
        # an operator asked for a pass (pstorage gc): compact when idle even
        # below the fragmentation threshold, until no victim is left
        self.requested = False
        self._space_active = False  # between the watermarks, on the way up
        self._in_pass = False
        self._stalled: tuple[int, ...] | None = None  # state in which nothing could be done
        self._wear_cache: tuple[tuple[int, int], int, int] | None = None
        self._full_warned = False  # one warning per episode of "no room to move"

    # ------------------------------------------------------------------ policy
    def _key(self) -> tuple[int, ...]:
        """Changes whenever a victim could have appeared or room been made."""
        eng = self.engine
        return (eng.commits, eng.chunks.live_stored, eng.segs.next_seq, eng.segs.free_count())

    def dead_fraction(self) -> float:
        """Dead share of the sealed segments' capacity (O(1): from totals)."""
        eng, segs = self.engine, self.engine.segs
        sealed = segs.sealed_count() - segs.pending_free_count()
        if sealed <= 0:
            return 0.0
        live = eng.chunks.live_stored - segs.open_live_bytes()
        return max(0.0, 1.0 - live / (sealed * self.capacity))

    def _wear(self) -> tuple[int, int]:
        """(max erase count, least-erased segment holding data or -1), cached.

        Erase counts change only when a segment is allocated and the set of
        sealed segments only at allocation and at commits, so the cache key
        is (next_seq, commits).
        """
        key = (self.engine.segs.next_seq, self.engine.commits)
        if self._wear_cache is None or self._wear_cache[0] != key:
            cols = self.engine.segs.columns()
            erase = np.frombuffer(cols.erase, dtype=np.uint32)
            top = int(erase.max()) if erase.size else 0
            idx = np.flatnonzero(self._holding_data())
            coldest = int(idx[np.argmin(erase[idx])]) if idx.size else -1
            self._wear_cache = (key, top, coldest)
            del erase, cols
        return self._wear_cache[1], self._wear_cache[2]

    def _wear_wanted(self) -> bool:
        top, coldest = self._wear()
        return coldest >= 0 and top - self.engine.segs.erase_count(coldest) > WEAR_SPREAD_LIMIT

    def _mode(self, busy: bool, update: bool = True) -> Mode | None:
        """What needs doing now; update=False leaves the hysteresis state alone."""
        eng = self.engine
        if eng.failed is not None:
            return None
        segs = eng.segs
        free = segs.free_count()
        if free <= segs.reserve:
            return "emergency"  # client writes fail with ENOSPC until we free a segment
        pending = segs.pending_free_count()
        soon = free + pending  # free after the next commit
        active = self._space_active
        if soon < self.low:
            active = True
        elif soon >= self.high:
            active = False
        if update:
            self._space_active = active
        if active or (free < self.low and pending):
            return "space"
        if busy:
            return None  # the rest waits for a quiet moment
        if self.requested or self.dead_fraction() > DEAD_FRACTION_IDLE:
            return "fragmentation"
        if self._wear_wanted():
            return "wear"
        return None

    def wanted(self, busy: bool) -> bool:
        mode = self._mode(busy)
        if mode is None:
            self._in_pass = False
            return False
        # nothing could be done and nothing changed since: do not rescan
        return self._victim is not None or self._stalled != self._key()

    # ------------------------------------------------------------------ victims
    def _holding_data(self) -> np.ndarray:
        """Mask of the segments a victim can be chosen from."""
        segs = self.engine.segs
        cols = segs.columns()
        state = np.frombuffer(cols.state, dtype=np.uint8)
        live = np.frombuffer(cols.live, dtype=np.uint32)
        mask = (state == SEG_SEALED) & (live > 0)  # excludes open, free and pending_free
        for s, seq in tuple(self.skip.items()):
            if s < segs.count and segs.seq_of(s) == seq:
                mask[s] = False
        del state, live, cols  # release the arrays' buffers at once
        return mask

    def _room(self, reserve_ok: bool) -> int:
        """Record bytes the cleaner can surely append before running out of segments."""
        segs = self.engine.segs
        free = segs.free_count() - (0 if reserve_ok else segs.reserve)
        # per segment: a record that does not fit at the end, one flush's padding
        room = max(free, 0) * (self.capacity - MAX_RECORD - ALIGN)
        moving = segs.open_segment(RELOCATED)  # where moved chunks go
        if moving >= 0:
            room += max(0, segs.size - segs.write_ptr_of(moving) - MAX_RECORD)
        return room

    def choose_victim(self, mode: Mode = "space") -> tuple[int, Kind] | None:
        """The segment the policy for `mode` would clean next, or None.

        space/fragmentation: cost-benefit; emergency: greedy; wear: the
        least-erased segment holding data. A victim is chosen only if its
        live data surely fits in the space the cleaner may use.
        """
        segs = self.engine.segs
        mask = self._holding_data()
        cols = segs.columns()
        live = np.frombuffer(cols.live, dtype=np.uint32)
        try:
            if mode == "wear":
                top, s = self._wear()
                if s >= 0 and not mask[s]:  # emptied or left since the cache was made
                    self._wear_cache = None
                    top, s = self._wear()
                if s < 0 or top - segs.erase_count(s) <= WEAR_SPREAD_LIMIT:
                    return None
                # not from the reserve: moving a full segment gains nothing
                return (s, "wear") if segs.live_bytes(s) <= self._room(False) else None
            limit = self.idle_max_live if mode == "fragmentation" else self.max_live
            idx = np.flatnonzero(mask & (live <= min(limit, self._room(True))))
            if not idx.size:
                return None
            if mode == "emergency":
                return int(idx[np.argmin(live[idx])]), "gc"
            u = live[idx] / self.capacity
            sealed = np.frombuffer(cols.sealed_ns, dtype=np.uint64)[idx].astype(np.float64)
            age = np.maximum(self.engine.clock() - sealed / 1e9, 0.0) + AGE_BIAS
            score = (1.0 - u) * age / (1.0 + u)
            return int(idx[np.argmax(score)]), "gc"
        finally:
            del live, cols

    def _start(self, s: int, kind: Kind) -> None:
        segs = self.engine.segs
        self._victim = _Victim(s, segs.seq_of(s), kind, segs.write_ptr_of(s))
        if not self._in_pass:
            self._in_pass = True
            self.passes += 1
        log.debug("cleaner: segment %d (%s), %d live bytes", s, kind, segs.live_bytes(s))

    def _victim_valid(self) -> bool:
        v, segs = self._victim, self.engine.segs
        return (v is not None and segs.state_of(v.segment) == SEG_SEALED
                and segs.seq_of(v.segment) == v.seq)

    # ------------------------------------------------------------------ the work
    def step(self, budget: int, busy: bool) -> int:
        """Do a bounded slice of cleaning; returns records examined (0: nothing to do)."""
        mode = self._mode(busy)
        if mode is None:
            return 0
        eng, segs = self.engine, self.engine.segs
        if (mode in ("emergency", "space") and segs.free_count() < self.low
                and segs.pending_free_count()):
            self._save()
            eng.flush()  # emptied segments come back only with a commit
            return 1
        if self._victim is not None and (
                not self._victim_valid()
                or (mode == "emergency" and self._victim.kind == "wear")):
            self._victim = None  # reused, or the wrong work for now; its moves stand
        if self._victim is None:
            picked = self.choose_victim(mode)
            if picked is None:
                self._stalled = self._key()
                if self.requested:
                    log.info("cleaner: requested pass done")
                self.requested = False
                return 0
            self._start(*picked)
        done = self._work(self._limit(budget, busy, mode))
        self._save()
        if self._victim is None and segs.pending_free_count() and segs.free_count() < self.low:
            eng.flush()  # space is needed now: free the emptied segment with a commit
        else:
            eng.commit_if_due()
        return max(done, 1)

    def _limit(self, budget: int, busy: bool, mode: Mode) -> int:
        """Records to examine in this step: small under load, more as space runs out."""
        if not busy:
            return max(1, budget // IDLE_SHARE)
        segs = self.engine.segs
        base, top = max(1, budget // BUSY_SHARE), budget * EMERGENCY_FACTOR
        if mode == "emergency":
            return top
        if mode != "space":
            return base
        # linear ramp from the low watermark down to the reserve
        short = self.low - segs.free_count()
        span = max(1, self.low - segs.reserve)
        return base + (top - base) * min(max(short, 0), span) // span

    def _work(self, limit: int) -> int:
        """Walk the victim for up to `limit` records, moving the live ones."""
        v = self._victim
        assert v is not None
        eng, segs = self.engine, self.engine.segs
        txn, chunks = eng.meta.txn, eng.meta.chunks
        s = v.segment
        seen = 0
        try:
            if v.off == 0:
                self._check_header(v)
                v.off = SegmentHeader.SIZE
            while seen < limit and v.off < v.end and segs.live_bytes(s):
                off = v.off
                head = self._view(v, off, min(ChunkHeader.SIZE, v.end - off))
                if head[:4] != ChunkHeader.MAGIC:
                    # zeros to the next 4 KiB boundary: a flush padded there
                    nxt = min(align_up(off + 1), v.end)
                    if off % ALIGN and bytes(self._view(v, off, nxt - off)) == bytes(nxt - off):
                        v.off = nxt
                        continue
                    raise _Unreadable(f"no chunk record at offset {off}")
                h = ChunkHeader.from_buffer(head)
                if h.seq and h.seq != v.seq & SEQ_MASK:  # (0: a version-1 record)
                    raise _Unreadable(stale_message(s, off, h.seq, v.seq))
                size = record_size(h.stored_len)
                if h.kind != KIND_CHUNK:
                    raise _Unreadable(f"record kind {h.kind} at offset {off} is not "
                                      "understood by this version", checksum=False)
                if off + size > v.end:
                    raise _Unreadable(f"record at offset {off} runs past the end of the data")
                seen += 1
                raw = txn.get(CHUNK_KEY.pack(h.chunk_id), db=chunks)
                if raw is not None:
                    _, cs, coff, slen, codec, _, _, fp = CHUNK_META.unpack(raw)
                    if cs == s and coff == off:  # live: this record is the chunk's home
                        if slen != h.stored_len or fp != h.fingerprint or codec != h.codec:
                            raise _Unreadable(f"record at offset {off} does not match the "
                                              f"chunk index entry of chunk {h.chunk_id}")
                        payload = self._view(v, off + ChunkHeader.SIZE, slen)
                        if crc32(payload) != h.payload_crc:
                            raise _Unreadable(f"chunk {h.chunk_id} at offset {off}: payload "
                                              "checksum mismatch")
                        _, new = eng.chunks.rewrite_chunk(h.chunk_id, codec, payload, reserve_ok=True)
                        self._count(v, new)
                v.off = off + size
        except _Unreadable as e:
            self._leave(v, str(e), checksum=e.checksum)
            return seen
        except CorruptData as e:  # a header failed its CRC or magic
            self._leave(v, str(e), checksum=True)
            return seen
        except FormatError as e:  # a version this build does not read
            self._leave(v, str(e), checksum=False)
            return seen
        except DeviceIOError as e:
            if eng.failed is not None:
                raise  # a failed write: the engine refuses writes now
            self._leave(v, f"read failed: {e.message}", checksum=False)
            return seen
        except PoolFull:
            # Clients took the space we counted on; the moves so far stand
            # and the victim is chosen afresh once something changed.
            if not self._full_warned:
                log.warning("segment cleaner: no room to move segment %d's chunks; "
                            "waiting for space", s)
                self._full_warned = True
            v.error = "pool full"
            self._victim = None
            self._stalled = self._key()
            return seen
        if segs.live_bytes(s) == 0 or v.off >= v.end:
            self._finish(v)
        return seen

    def _check_header(self, v: _Victim) -> None:
        segs = self.engine.segs
        h = SegmentHeader.from_buffer(self._view(v, 0, SegmentHeader.STRUCT.size))
        if h.segment != v.segment or h.seq != v.seq or h.pool_uuid != segs.sb.uuid:
            raise _Unreadable(f"segment header names segment {h.segment} seq {h.seq}, "
                              f"expected {v.segment} seq {v.seq} of this pool")

    def _view(self, v: _Victim, off: int, n: int) -> memoryview:
        """n bytes of the victim at off, from the read window (refilled as needed)."""
        if not (v.win_off <= off and off + n <= v.win_off + len(v.win)):
            start = align_down(off)
            end = min(max(start + READ_WINDOW, align_up(off + n)), self.engine.segs.size)
            v.win = self.engine.segs.read(v.segment, start, end - start)
            v.win_off = start
        return memoryview(v.win)[off - v.win_off : off - v.win_off + n]

    def _count(self, v: _Victim, size: int) -> None:
        v.chunks += 1
        v.moved += size
        if v.kind == "wear":
            self.wear_chunks_moved += 1
            self.wear_bytes_moved += size
        else:
            self.chunks_moved += 1
            self.bytes_moved += size

    def _finish(self, v: _Victim) -> None:
        segs = self.engine.segs
        self._victim = None
        v.win = b""
        if segs.live_bytes(v.segment):
            # Every record was walked, yet the segment claims live bytes: the
            # accounting and the chunk index disagree. Do not loop on it.
            self._leave(v, f"{segs.live_bytes(v.segment)} live bytes left after every record "
                        "was walked (accounting mismatch)", checksum=False)
            return
        if v.kind == "wear":
            self.wear_segments_cleaned += 1
        else:
            self.segments_cleaned += 1
        self._full_warned = False
        log.debug("cleaner: segment %d emptied (%s): %d chunks, %d bytes moved",
                  v.segment, v.kind, v.chunks, v.moved)

    def _leave(self, v: _Victim, why: str, *, checksum: bool) -> None:
        """Stop cleaning v for good (until it is reused); nothing more is moved from it."""
        eng = self.engine
        log.error("segment cleaner: segment %d: %s; leaving the segment as it is "
                  "(%d chunks moved out of it before)", v.segment, why, v.chunks)
        v.error = why
        self.corrupt_records += 1
        if checksum:
            eng.chunks.note_checksum_error()
        self.skip[v.segment] = v.seq
        self._wear_cache = None
        self._victim = None
        v.win = b""

    # ------------------------------------------------------------------ persistence
    def _observe_user_bytes(self) -> tuple[int, dict[int, int]]:
        """user_bytes including what the volumes stored since we last looked.

        Volume stats are cumulative; the cleaner keeps its own total so that
        a deleted volume's bytes are not forgotten.
        """
        total, seen = self.user_bytes, {}
        for vol in list(self.engine.volumes.values()):
            cur = vol.stats.stored_bytes
            total += max(0, cur - self._seen.get(vol.id, 0))
            seen[vol.id] = cur
        return total, seen

    def _save(self) -> None:
        """Counters go into the open transaction, so they commit with the work."""
        self.user_bytes, self._seen = self._observe_user_bytes()
        segs = self.engine.segs
        self.skip = {s: q for s, q in self.skip.items()
                     if s < segs.count and segs.seq_of(s) == q
                     and segs.state_of(s) == SEG_SEALED}
        self.engine.meta.put_json("cleaner", {
            "segments_cleaned": self.segments_cleaned, "chunks_moved": self.chunks_moved,
            "bytes_moved": self.bytes_moved,
            "wear_segments_cleaned": self.wear_segments_cleaned,
            "wear_chunks_moved": self.wear_chunks_moved,
            "wear_bytes_moved": self.wear_bytes_moved,
            "passes": self.passes, "user_bytes": self.user_bytes,
            "corrupt_records": self.corrupt_records,
            "seen": {str(k): n for k, n in self._seen.items()},
            "skip": {str(k): q for k, q in self.skip.items()},
        })
        self.engine.dirty = True

    # ------------------------------------------------------------------ direct use
    def clean_segment(self, s: int, *, flush: bool = True, kind: Kind = "gc",
                      max_records: int | None = None) -> CleanResult:
        """Clean sealed segment `s` now, whatever the policy says.

        flush: commit at the end, so that an emptied segment is freed at once.
        max_records: stop after examining this many records (the walk then
        resumes in later steps, as if the background service had begun it).
        """
        segs = self.engine.segs
        if not 0 <= s < segs.count:
            raise InvalidArgument(f"segment {s} does not exist (the pool has {segs.count})")
        if segs.state_of(s) != SEG_SEALED:
            raise InvalidArgument(f"segment {s} is not sealed", "only sealed segments are cleaned")
        self.engine.check_failed()
        self._victim = None
        self._start(s, kind)
        v = self._victim
        assert v is not None
        self._work(1 << 30 if max_records is None else max_records)
        self._save()
        complete = v.error is None and segs.live_bytes(s) == 0
        if flush:
            self.engine.flush()
        else:
            self.engine.commit_if_due()
        return CleanResult(s, complete, v.chunks, v.moved, v.error)

    def request_pass(self) -> None:
        """Compact as soon as clients are idle, whatever the fragmentation."""
        self.requested = True
        self._stalled = None

    def run_pass(self, max_segments: int | None = None) -> int:
        """Clean as an idle pool would until nothing is left worth doing; commit.

        At most `max_segments` victims (default: as many as the pool has
        segments, so a pass always ends). Returns the segments emptied.
        """
        limit = self.engine.segs.count if max_segments is None else max_segments
        before = self.segments_cleaned + self.wear_segments_cleaned
        started = 0
        while self.wanted(False):
            if self._victim is None:
                if started >= limit:
                    break
                started += 1
            if not self.step(IDLE_BUDGET, busy=False):
                break
        if self.engine.failed is None:
            self._save()
            self.engine.flush()
        return self.segments_cleaned + self.wear_segments_cleaned - before

    # ------------------------------------------------------------------ reporting
    def statistics(self) -> CleanerStatistics:
        """A snapshot of the counters and the policy state.

        Meant for the engine thread (DataPlane.call); read from another thread
        it does not fail, but figures may be a step apart from each other.
        """
        segs = self.engine.segs
        user, _ = self._observe_user_bytes()
        moved = self.bytes_moved + self.wear_bytes_moved
        cols = segs.columns()
        erase = np.frombuffer(cols.erase, dtype=np.uint32)
        spread = int(erase.max()) - int(erase.min()) if erase.size else 0
        del erase, cols
        mode = self._mode(False, update=False)
        v = self._victim
        return CleanerStatistics(
            segments_cleaned=self.segments_cleaned, chunks_moved=self.chunks_moved,
            bytes_moved=self.bytes_moved, wear_segments_cleaned=self.wear_segments_cleaned,
            wear_chunks_moved=self.wear_chunks_moved, wear_bytes_moved=self.wear_bytes_moved,
            passes=self.passes, user_bytes=user,
            write_amplification=(user + moved) / user if user else None,
            corrupt_records=self.corrupt_records,
            skipped_segments=tuple(sorted(tuple(self.skip))),
            victim=None if v is None else v.segment,
            victim_offset=0 if v is None else v.off,
            mode=mode, free_segments=segs.free_count(), low_watermark=self.low,
            high_watermark=self.high, reserve=segs.reserve,
            utilization_ceiling=self.max_live / self.capacity if self.capacity else 0.0,
            dead_fraction=self.dead_fraction(), wear_spread=spread,
            wear_spread_limit=WEAR_SPREAD_LIMIT,
            requested=self.requested,
        )
