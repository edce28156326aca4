"""Pool check and repair: verify the metadata against itself and the device.

Called by `pstorage pool check` (offline: `check_offline` opens the pool
with open_pool, so a pool open in a daemon is refused by its lock) and by the
REST layer (`POST /api/v1/pool/check`: `check_online` in a worker thread,
read-only, on an LMDB read transaction of the last commit: it never takes the
writer lock, so the engine thread goes on serving).

What is checked, in one streaming pass per table:
  1. every `l2p` entry's chunk reference is counted (see `_RefCounts`);
  2. `chunks`, in id order, joined with those counts: a chunk's refcount
     equals its references; a chunk nothing refers to is an orphan; a
     reference to a chunk that does not exist is a lost block; each chunk's
     record is read from the device and verified (header CRC, chunk id,
     fingerprint, length, payload CRC, decompression, the segment's state
     and write pointer, and the record's segment seq: a stale record left
     from an earlier use of a reused segment is never taken for live);
     the dedupe index has an entry for each chunk below `fp_upto`;
  3. per-segment live bytes equal the sum of their live records' sizes;
  4. the pool-wide counters (live chunks, stored bytes, stale index entries).

Repairs (offline only, `repair=True`) fix only what can be derived without
guessing: refcounts rewritten from the references counted, orphans
released, segment live bytes and counters recomputed, the dedupe index
rebuilt from the chunk table, and a chunk whose location holds a stale or
damaged record pointed at a verified copy of the very same chunk (same id,
fingerprint, length, checksums and its segment's current seq) if the
segments hold one. A map entry whose chunk is missing or unreadable with no
such copy is reported, never "fixed".

Memory does not grow with the pool: references are counted in sorted runs
of RUN_ENTRIES ids spilled to a temporary file and merged (an external
sort), per-segment sums are one array entry per segment, and listed
problems are capped at MAX_LISTED per kind.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import lmdb
import numpy as np

from ..errors import CorruptData, FormatError, PStorageError
from . import codecs
from .backing import Backing
from .format import (
    CHUNK_KEY,
    CHUNK_META,
    KIND_CHUNK,
    NO_CHUNK,
    SEG_FREE,
    SEG_KEY,
    SEG_META,
    SEG_SEALED,
    SEQ_MASK,
    U64,
    ChunkHeader,
    SegmentHeader,
    Superblock,
    crc32,
    l2p_unpack,
    record_size,
    stale_message,
    unpack_chunk_header,
)
from .jobs import JobRecord, fraction
from .metadata import MetaStore
from .pool import open_pool
from .segments import TAIL_KEYS, parse_tail

log = logging.getLogger(__name__)

RUN_ENTRIES = 1 << 20  # references buffered (8 MiB) before a sorted run is spilled
READ_BLOCK = 1 << 16  # (id, count) pairs read back per run at a time in the merge
MAX_LISTED = 100  # problems listed per kind (all are counted)
MAX_RELOCATE = 100_000  # chunks with a bad record a repair looks for copies of
COMMIT_EVERY = 16384  # repairs per write transaction (bounded dirty pages)

# Problem kinds: what each is called in a report, and whether a repair fixes it.
KINDS: dict[str, tuple[str, bool]] = {
    "missing_chunk": ("map entries point to a chunk that does not exist", False),
    "unknown_volume": ("map entries belong to no volume", False),
    "refcount": ("chunks have a wrong reference count", True),
    "orphan": ("chunks are not referenced by any map entry (orphans)", True),
    "stale_record": ("chunks point to a stale record left from an earlier use of a segment", True),
    "bad_record": ("chunks point to a damaged or missing record", True),
    "segment": ("segments have a bad header", False),
    "live_bytes": ("segments have wrong live byte counts", True),
    "index": ("chunks are missing from the dedupe index", True),
    "counters": ("pool counters are wrong", True),
}


@dataclass
class CheckJob(JobRecord):
    """A check's report and progress; also what the REST job list shows."""

    kind: str = "check"
    volume: str = "(pool)"
    mode: str = "offline"  # offline | online (read-only)
    repair: bool = False
    phase: str = "starting"  # references | chunks | segments | index | repair | done
    done_items: int = 0
    total_items: int = 0
    checked: dict[str, int] = field(default_factory=dict)  # what was looked at
    counts: dict[str, int] = field(default_factory=dict)  # problems found, per kind
    fixed: dict[str, int] = field(default_factory=dict)  # of those, repaired
    problems: list[dict[str, Any]] = field(default_factory=list)  # first MAX_LISTED per kind

    def progress(self) -> float:
        return fraction(self.done_items, self.total_items, self.state)

    def problem(self, kind: str, message: str, **detail: Any) -> None:
        n = self.counts.get(kind, 0)
        self.counts[kind] = n + 1
        if n < MAX_LISTED:
            self.problems.append({"kind": kind, "message": message, "fixed": False, **detail})

    def mark_fixed(self, kind: str, n: int = 1) -> None:
        if n:
            self.fixed[kind] = self.fixed.get(kind, 0) + n

    def remaining(self) -> int:
        """Problems found and not repaired."""
        return sum(n - self.fixed.get(k, 0) for k, n in self.counts.items())

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["remaining"] = self.remaining()
        d["summary"] = summary_lines(self)
        return d


def summary_lines(job: CheckJob) -> list[str]:
    """The report in plain words: one line per kind of problem, its first example."""
    lines = []
    for kind, n in job.counts.items():
        what, _ = KINDS[kind]
        first = next((p["message"] for p in job.problems if p["kind"] == kind), "")
        fixed = job.fixed.get(kind, 0)
        state = (" (all repaired)" if fixed >= n else f" ({fixed} repaired)" if fixed else "")
        lines.append(f"{n} {what}{state}: {first}" + (", ..." if n > 1 else ""))
    return lines


# ---------------------------------------------------------------------------- counting

class _RefCounts:
    """References per chunk id, counted with bounded memory (an external sort).

    Map entries come in (volume, lba, generation) order, so chunk ids arrive
    at random. They are buffered RUN_ENTRIES at a time, sorted and reduced to
    (id, count) pairs (numpy: no per-entry Python objects), spilled to one
    temporary file, and merged in id order at the end, READ_BLOCK pairs per
    run in memory. A temporary LMDB would also bound memory but pays a random
    B-tree update per entry; sorted runs write and read sequentially.
    """

    def __init__(self) -> None:
        self.buf = array("Q")
        self.file = tempfile.TemporaryFile(prefix="pstorage-check-")
        self.runs: list[tuple[int, int]] = []  # (byte offset, pairs)
        self.pos = 0

    def add(self, cid: int) -> None:
        self.buf.append(cid)
        if len(self.buf) >= RUN_ENTRIES:
            self._spill()

    def _spill(self) -> None:
        if not self.buf:
            return
        ids, counts = np.unique(np.frombuffer(self.buf, dtype=np.uint64), return_counts=True)
        pairs = np.empty((len(ids), 2), dtype=np.uint64)
        pairs[:, 0], pairs[:, 1] = ids, counts
        raw = pairs.tobytes()
        os.pwrite(self.file.fileno(), raw, self.pos)
        self.runs.append((self.pos, len(ids)))
        self.pos += len(raw)
        self.buf = array("Q")

    def _run(self, offset: int, n: int) -> Iterator[tuple[int, int]]:
        done = 0
        while done < n:
            k = min(READ_BLOCK, n - done)
            raw = os.pread(self.file.fileno(), 16 * k, offset + 16 * done)
            pairs = np.frombuffer(raw, dtype=np.uint64).reshape(-1, 2)
            yield from zip(pairs[:, 0].tolist(), pairs[:, 1].tolist(), strict=True)
            done += k

    def merged(self) -> Iterator[tuple[int, int]]:
        """(chunk id, references) in id order."""
        self._spill()
        cur, total = -1, 0
        for cid, n in heapq.merge(*(self._run(o, n) for o, n in self.runs)):
            if cid != cur:
                if total:
                    yield cur, total
                cur, total = cid, 0
            total += n
        if total:
            yield cur, total

    def close(self) -> None:
        self.file.close()


# ---------------------------------------------------------------------------- the checker

@dataclass(slots=True)
class _Segments:
    """The committed `segs` table as arrays (one entry per segment), and the
    open segments' tails that live in the metadata (segments.py: a flush
    writes whole blocks only; the partial last block is committed as
    `seg_tail:<stream>`): segment -> (start, bytes from start to write_ptr)."""

    state: bytearray
    seq: array
    write_ptr: array
    live: array
    tails: dict[int, tuple[int, bytes]]

    @classmethod
    def load(cls, txn: lmdb.Transaction, meta: MetaStore, count: int) -> _Segments:
        out = cls(bytearray(count), array("Q", bytes(8 * count)), array("I", bytes(4 * count)),
                  array("I", bytes(4 * count)), {})
        for k, v in txn.cursor(db=meta.segs):
            (s,) = SEG_KEY.unpack(k)
            if s < count:
                st, _stream, _, seq, wp, live, _erase, _sealed = SEG_META.unpack(v)
                out.state[s], out.seq[s], out.write_ptr[s], out.live[s] = st, seq, wp, live
        for key in TAIL_KEYS:
            rec = parse_tail(txn.get(key, db=meta.meta))
            if rec is not None and rec[0] < count and rec[1] == out.seq[rec[0]]:
                out.tails[rec[0]] = (rec[2], rec[3])
        return out


class Checker:
    """One check of a pool's committed state (and, offline, its repair).

    `txn` is a read transaction (online) or the pool's write transaction
    (offline); `progress` is called now and then (the CLI prints it).
    """

    def __init__(self, meta: MetaStore, backing: Backing, sb: Superblock, job: CheckJob,
                 txn: lmdb.Transaction, progress: Callable[[CheckJob], None] | None = None) -> None:
        self.meta, self.backing, self.sb, self.job = meta, backing, sb, job
        self.txn = txn
        self.progress = progress or (lambda job: None)
        self.comp = codecs.Compressor()
        self.segs = _Segments.load(txn, meta, sb.segment_count)
        self.live_sum = array("Q", bytes(8 * sb.segment_count))  # counted live bytes
        self.live_chunks = 0
        self.live_stored = 0
        self.refcount_fixes: list[tuple[int, int]] = []  # (chunk, references) for the repair
        self.orphans: list[int] = []
        # chunk -> (segment, offset) of its bad record, and the problem's kind
        self.relocate: dict[int, tuple[int, int, str]] = {}
        self.index_missing = 0
        self._tick = 0.0

    def _meta_json(self, key: str, default: Any) -> Any:
        raw = self.txn.get(key.encode(), db=self.meta.meta)
        return default if raw is None else json.loads(bytes(raw))

    def _step(self, n: int = 1) -> None:
        self.job.done_items += n
        now = time.monotonic()
        if now - self._tick >= 0.5:
            self._tick = now
            self.progress(self.job)

    # -------------------------------------------------------------- phases
    def run(self) -> None:
        job = self.job
        st = self.txn.stat(self.meta.l2p)
        job.total_items = st["entries"] + self.txn.stat(self.meta.chunks)["entries"]
        self._segment_headers()
        refs = _RefCounts()
        try:
            job.phase = "references"
            self._count_references(refs)
            job.phase = "chunks"
            self._chunks(refs.merged())
        finally:
            refs.close()
        job.phase = "segments"
        self._live_bytes()
        self._counters()

    def _segment_headers(self) -> None:
        """Each segment in use starts with its own header, at the seq the table says."""
        sg = self.segs
        for s in range(self.sb.segment_count):
            if sg.state[s] == SEG_FREE:
                continue
            try:
                raw = self.backing.pread(self._offset(s), SegmentHeader.STRUCT.size)
                h = SegmentHeader.from_buffer(raw)
                if h.segment != s or h.seq != sg.seq[s] or h.pool_uuid != self.sb.uuid:
                    raise CorruptData(f"its header names segment {h.segment} seq {h.seq}, "
                                      f"the table says seq {sg.seq[s]} of this pool")
            except PStorageError as e:
                self.job.problem("segment", f"segment {s}: {e.message}", segment=s)
        self.job.checked["segments"] = sum(1 for x in sg.state if x != SEG_FREE)

    def _count_references(self, refs: _RefCounts) -> None:
        vols = {json.loads(bytes(v))["id"] for _, v in self.txn.cursor(db=self.meta.vols)}
        known = vols | {int(k) for k in self._meta_json("reclaim", {})}
        entries = 0
        cur = self.txn.cursor(db=self.meta.l2p)
        last_vid, ok_vid = -1, True
        for k, v in cur:
            entries += 1
            vid = int.from_bytes(k[:4], "big")
            if vid != last_vid:
                last_vid, ok_vid = vid, vid in known
            if not ok_vid:
                _, lba, gen = l2p_unpack(k)
                self.job.problem("unknown_volume", f"volume id {vid} (lba {lba}, generation "
                                 f"{gen}) is in no volume list and not being reclaimed",
                                 volume_id=vid, lba=lba)
            cid = U64.unpack(v)[0]
            if cid != NO_CHUNK:
                refs.add(cid)
            if entries % 4096 == 0:
                self._step(4096)
        self._step(entries % 4096)
        self.job.checked["map_entries"] = entries

    def _chunks(self, refs: Iterator[tuple[int, int]]) -> None:
        """Join the chunk table with the counted references, both in id order."""
        job, txn, meta = self.job, self.txn, self.meta
        fp_upto = self._meta_json("fp_upto", 0)
        nxt = next(refs, None)
        missing: list[tuple[int, int]] = []
        chunks = 0
        for k, v in txn.cursor(db=meta.chunks):
            (cid,) = CHUNK_KEY.unpack(k)
            while nxt is not None and nxt[0] < cid:
                missing.append(nxt)
                nxt = next(refs, None)
            found = 0
            if nxt is not None and nxt[0] == cid:
                found = nxt[1]
                nxt = next(refs, None)
            rc, s, off, slen, codec, _slot, _res, fp = CHUNK_META.unpack(v)
            chunks += 1
            if found == 0:
                job.problem("orphan", f"chunk {cid} says {rc}, nothing refers to it", chunk=cid)
                self.orphans.append(cid)
            elif rc != found:
                job.problem("refcount", f"chunk {cid} says {rc}, {found} "
                            f"reference{'s' if found != 1 else ''} found",
                            chunk=cid, says=rc, found=found)
                self.refcount_fixes.append((cid, found))
            self._verify_record(cid, s, off, slen, codec, fp)
            if found:
                if s < self.sb.segment_count:
                    self.live_sum[s] += record_size(slen)
                self.live_chunks += 1
                self.live_stored += record_size(slen)
            if cid < fp_upto and not self._indexed(fp):
                self.index_missing += 1
                job.problem("index", f"chunk {cid}'s fingerprint {fp.hex()[:16]}... is not in "
                            "the dedupe index", chunk=cid)
            self._step()
        while nxt is not None:
            missing.append(nxt)
            nxt = next(refs, None)
        job.checked["chunks"] = chunks
        if missing:
            self._report_missing(missing)

    def _indexed(self, fp: bytes) -> bool:
        """The dedupe index finds a live chunk with this fingerprint."""
        hit = self.txn.get(fp, db=self.meta.fp)
        if hit is None:
            return False
        raw = self.txn.get(CHUNK_KEY.pack(U64.unpack(hit)[0]), db=self.meta.chunks)
        return raw is not None and bytes(raw[-32:]) == fp

    def _report_missing(self, missing: list[tuple[int, int]]) -> None:
        """Name the map entries of missing chunks (a second walk, for the first few)."""
        listed = {cid for cid, _ in missing[:MAX_LISTED]}
        named = 0
        for k, v in self.txn.cursor(db=self.meta.l2p):
            cid = U64.unpack(v)[0]
            if cid in listed:
                vid, lba, gen = l2p_unpack(k)
                self.job.problem("missing_chunk", f"volume id {vid} lba {lba} (generation "
                                 f"{gen}) points to chunk {cid}, which does not exist",
                                 volume_id=vid, lba=lba, chunk=cid)
                named += 1
        # the rest are counted, not listed
        total = sum(n for _, n in missing)
        self.job.counts["missing_chunk"] = self.job.counts.get("missing_chunk", 0) + total - named

    def _offset(self, s: int) -> int:
        return self.sb.data_offset + s * self.sb.segment_size

    def _read(self, s: int, off: int, n: int) -> bytes:
        """Committed bytes of segment s: the device, and past an open segment's
        last full block, the tail committed with the metadata."""
        tail = self.segs.tails.get(s)
        if tail is None or off + n <= tail[0]:
            return self.backing.pread(self._offset(s) + off, n)
        start, data = tail
        head = self.backing.pread(self._offset(s) + off, start - off) if off < start else b""
        lo = max(off, start) - start
        return head + data[lo : off + n - start]

    def _verify_record(self, cid: int, s: int, off: int, slen: int, codec: int,
                       fp: bytes) -> None:
        sg = self.segs
        try:
            if s >= self.sb.segment_count or off + ChunkHeader.SIZE + slen > self.sb.segment_size:
                raise CorruptData(f"its location segment {s} offset {off} is outside the pool")
            if sg.state[s] == SEG_FREE:
                raise CorruptData(f"segment {s} holding it is free")
            if off + ChunkHeader.SIZE + slen > sg.write_ptr[s]:
                raise CorruptData(f"segment {s} offset {off} is past the segment's written end "
                                  f"({sg.write_ptr[s]})")
            rec = self._read(s, off, ChunkHeader.SIZE + slen)
            kind, rcodec, rcid, raw_len, rlen, rfp, pcrc, rseq = unpack_chunk_header(rec)
            if rseq and rseq != sg.seq[s] & SEQ_MASK:
                self.job.problem("stale_record", f"chunk {cid}: "
                                 + stale_message(s, off, rseq, sg.seq[s]),
                                 chunk=cid, segment=s, offset=off)
                self._want_copy(cid, s, off, "stale_record")
                return
            if kind != KIND_CHUNK:
                raise CorruptData(f"segment {s} offset {off} holds a record of kind {kind}")
            if rcid != cid or rlen != slen or rfp != fp or rcodec != codec:
                raise CorruptData(f"segment {s} offset {off} holds chunk {rcid}, not this one")
            payload = rec[ChunkHeader.SIZE:]
            if crc32(payload) != pcrc:
                raise CorruptData(f"segment {s} offset {off}: payload checksum mismatch")
            self.comp.decompress(codec, payload, raw_len)
            self.job.checked["bytes_verified"] = self.job.checked.get("bytes_verified", 0) + slen
        except (CorruptData, FormatError) as e:
            self.job.problem("bad_record", f"chunk {cid}: {e.message}", chunk=cid, segment=s,
                             offset=off)
            self._want_copy(cid, s, off)
        except PStorageError as e:  # a read error of the device
            self.job.problem("bad_record", f"chunk {cid}: segment {s} offset {off}: {e.message}",
                             chunk=cid, segment=s, offset=off)
            self._want_copy(cid, s, off)

    def _want_copy(self, cid: int, s: int, off: int, kind: str = "bad_record") -> None:
        if len(self.relocate) < MAX_RELOCATE:
            self.relocate[cid] = (s, off, kind)

    def _live_bytes(self) -> None:
        sg = self.segs
        for s in range(self.sb.segment_count):
            if sg.live[s] != self.live_sum[s]:
                self.job.problem("live_bytes", f"segment {s} says {sg.live[s]} live bytes, its "
                                 f"live chunks hold {self.live_sum[s]}", segment=s,
                                 says=sg.live[s], found=self.live_sum[s])

    def _counters(self) -> None:
        c = self._meta_json("counters", {})
        stale = 0
        for k, v in self.txn.cursor(db=self.meta.fp):
            raw = self.txn.get(CHUNK_KEY.pack(U64.unpack(v)[0]), db=self.meta.chunks)
            if raw is None or raw[-32:] != k:
                stale += 1
        self.job.checked["stale_index_entries"] = stale
        for name, found in (("live_chunks", self.live_chunks), ("live_stored", self.live_stored),
                            ("stale_fps", stale)):
            if c.get(name, 0) != found:
                self.job.problem("counters", f"counter {name} says {c.get(name, 0)}, "
                                 f"{found} found", counter=name)

    # -------------------------------------------------------------- repairs (offline)
    def repair(self) -> None:
        """Fix what the check found that can be derived; commits as it goes."""
        job, meta = self.job, self.meta
        job.phase = "repair"
        done = 0
        for cid, refs in self.refcount_fixes:
            self._put_chunk(cid, refcount=refs)
            done = self._commit_maybe(done)
        job.mark_fixed("refcount", len(self.refcount_fixes))
        for cid in self.orphans:
            meta.txn.delete(CHUNK_KEY.pack(cid), db=meta.chunks)
            done = self._commit_maybe(done)
        job.mark_fixed("orphan", len(self.orphans))
        self._relocate()
        self._rebuild_index()
        meta.commit()
        # live bytes and counters from the repaired state, counted afresh
        self._recount()
        meta.commit()
        for p in job.problems:
            if job.fixed.get(p["kind"], 0) >= job.counts[p["kind"]]:
                p["fixed"] = True

    def _put_chunk(self, cid: int, **change: int) -> None:
        meta = self.meta
        raw = meta.txn.get(CHUNK_KEY.pack(cid), db=meta.chunks)
        assert raw is not None, f"chunk {cid} went during the repair"
        rc, s, off, slen, codec, slot, res, fp = CHUNK_META.unpack(raw)
        rc, s, off = change.get("refcount", rc), change.get("segment", s), change.get("offset", off)
        meta.txn.put(CHUNK_KEY.pack(cid), CHUNK_META.pack(rc, s, off, slen, codec, slot, res, fp),
                     db=meta.chunks)

    def _commit_maybe(self, done: int) -> int:
        done += 1
        if done % COMMIT_EVERY == 0:
            self.meta.commit()
        return done

    def _relocate(self) -> None:
        """Point chunks whose record is stale or damaged at a verified copy, if any.

        Walks the records of every segment in use (up to its write pointer)
        looking for the chunks in `relocate`. A copy counts only if it is a
        whole, valid record of that chunk: same id, length, codec and
        fingerprint as the chunk table says, payload checksum right, and the
        seq of the segment it lies in now (so never another stale one).
        """
        if not self.relocate:
            return
        meta, sg, size = self.meta, self.segs, self.sb.segment_size
        want = {}
        for cid in self.relocate:
            raw = meta.txn.get(CHUNK_KEY.pack(cid), db=meta.chunks)
            if raw is not None:  # (not an orphan released above)
                want[cid] = CHUNK_META.unpack(raw)
        found: dict[int, tuple[int, int]] = {}
        for s in range(self.sb.segment_count):
            if sg.state[s] == SEG_FREE or len(found) == len(want):
                continue
            data = self._read(s, 0, min(sg.write_ptr[s], size))
            off = SegmentHeader.SIZE
            while off + ChunkHeader.SIZE <= len(data):
                if data[off : off + 4] != ChunkHeader.MAGIC:
                    off += 16  # padding up to a flush boundary
                    continue
                try:
                    kind, codec, cid, raw_len, slen, fp, pcrc, rseq = unpack_chunk_header(
                        data[off:])
                except PStorageError:
                    off += 16
                    continue
                w = want.get(cid)
                end = off + ChunkHeader.SIZE + slen
                if (w is not None and cid not in found and (s, off) != self.relocate[cid][:2]
                        and rseq == sg.seq[s] & SEQ_MASK and end <= len(data)
                        and (slen, codec, fp) == (w[3], w[4], w[7])
                        and crc32(data[off + ChunkHeader.SIZE : end]) == pcrc):
                    found[cid] = (s, off)
                off += record_size(slen)
        for cid, (s, off) in found.items():
            self._put_chunk(cid, segment=s, offset=off)
            bad = self.relocate[cid]
            what = bad[2]
            for p in self.job.problems:
                if p.get("chunk") == cid and p["kind"] == what:
                    p["fixed"] = True
                    p["repair"] = (f"now points to a valid copy at segment {s} offset {off} "
                                   f"(was segment {bad[0]} offset {bad[1]})")
            self.job.mark_fixed(what)
            log.info("check: chunk %d moved from segment %d offset %d to its valid copy at "
                     "segment %d offset %d", cid, bad[0], bad[1], s, off)

    def _rebuild_index(self) -> None:
        """The dedupe index from the chunk table alone: emptied, then every live
        chunk's fingerprint (the newest chunk of a fingerprint wins)."""
        if not self.job.counts.get("index"):
            return
        meta = self.meta
        meta.txn.drop(meta.fp, delete=False)
        meta.commit()
        # in slices of COMMIT_EVERY, each its own transaction: one transaction
        # for a 10 TiB pool's index would outgrow LMDB's dirty-page limit. A
        # crash in between leaves the index short (it is a hint: duplicates
        # are stored again, never wrongly shared) and the next check says so.
        done, last = 0, b""
        while True:
            cur = meta.txn.cursor(db=meta.chunks)
            ok = cur.set_range(last) if last else cur.first()
            if ok and last and cur.key() == last:
                ok = cur.next()
            n = 0
            while ok and n < COMMIT_EVERY:
                k, v = cur.key(), cur.value()
                meta.txn.put(bytes(v[-32:]), U64.pack(CHUNK_KEY.unpack(k)[0]), db=meta.fp)
                last = bytes(k)
                n += 1
                ok = cur.next()
            done += n
            if not ok:
                break
            meta.commit()
            self._step(0)
        nxt = self._meta_json_txn("counters", {}).get("next_chunk", 1)
        meta.put_json("fp_upto", nxt)
        meta.put_json("prune", None)
        self.job.mark_fixed("index", self.job.counts.get("index", 0))
        self.job.checked["index_entries_rebuilt"] = done

    def _meta_json_txn(self, key: str, default: Any) -> Any:
        return self.meta.get_json(key, default)

    def _recount(self) -> None:
        """Segment live bytes and the counters, recomputed from the repaired chunk table."""
        meta, sg = self.meta, self.segs
        live = array("Q", bytes(8 * self.sb.segment_count))
        chunks = stored = 0
        for _k, v in meta.txn.cursor(db=meta.chunks):
            _rc, s, _off, slen, *_ = CHUNK_META.unpack(v)
            if s < self.sb.segment_count:
                live[s] += record_size(slen)
            chunks += 1
            stored += record_size(slen)
        unfixed = 0
        for s in range(self.sb.segment_count):
            if sg.live[s] == live[s]:
                continue  # right, or right again after the repairs above
            raw = meta.txn.get(SEG_KEY.pack(s), db=meta.segs)
            if raw is None:  # a chunk in a segment the table does not know
                unfixed += 1
                continue
            st, stream, r, seq, wp, _old, erase, sealed = SEG_META.unpack(raw)
            meta.txn.put(SEG_KEY.pack(s), SEG_META.pack(st, stream, r, seq, wp, live[s], erase,
                                                         sealed), db=meta.segs)
            if st == SEG_SEALED and live[s] == 0:
                log.info("check: segment %d has no live data left; it is freed when the "
                         "pool is next opened", s)
        self.job.mark_fixed("live_bytes", max(0, self.job.counts.get("live_bytes", 0) - unfixed))
        c = meta.get_json("counters", {})
        stale = 0
        for k, v in meta.txn.cursor(db=meta.fp):
            raw = meta.txn.get(CHUNK_KEY.pack(U64.unpack(v)[0]), db=meta.chunks)
            if raw is None or raw[-32:] != k:
                stale += 1
        c.update(live_chunks=chunks, live_stored=stored, stale_fps=stale)
        meta.put_json("counters", c)
        self.job.mark_fixed("counters", self.job.counts.get("counters", 0))


# ---------------------------------------------------------------------------- entry points

def check_offline(directory: str, *, repair: bool = False,
                  progress: Callable[[CheckJob], None] | None = None) -> CheckJob:
    """Check (and with `repair`, fix) a pool no daemon has open.

    open_pool takes the pool's lock: a pool open in a daemon is refused
    (PoolLocked) before anything is read.
    """
    pool = open_pool(directory)
    job = CheckJob(0, mode="offline", repair=repair)
    try:
        checker = Checker(pool.meta, pool.backing, pool.sb, job, pool.meta.txn, progress)
        checker.run()
        if repair and job.counts:
            checker.repair()
        pool.meta.abort()  # a check alone changes nothing
        job.phase = "done"
        job.state, job.finished = "done", time.time()
    except BaseException as e:
        job.state, job.error = "failed", str(e)
        raise
    finally:
        pool.close()
    return job


def check_online(meta: MetaStore, backing: Backing, sb: Superblock, job: CheckJob,
                 progress: Callable[[CheckJob], None] | None = None) -> CheckJob:
    """A read-only check of an open pool's last commit (run in a worker thread).

    It reads an LMDB read transaction, never the engine's write transaction,
    so the engine goes on serving. A chunk the engine moves or frees after
    that commit can look bad in the snapshot (its old place may be reused
    meanwhile): record problems are confirmed against a fresh read
    transaction before they are reported.
    """
    try:
        with meta.env.begin(write=False, buffers=False) as txn:
            checker = Checker(meta, backing, sb, job, txn, progress)
            checker.run()
        _confirm(meta, job)
        job.phase = "done"
        job.state, job.finished = "done", time.time()
    except Exception as e:
        job.state, job.error, job.finished = "failed", str(e), time.time()
        log.error("pool check failed: %s", e)
    return job


def _confirm(meta: MetaStore, job: CheckJob) -> None:
    """Drop listed record problems of chunks that moved or went since the snapshot."""
    keep = []
    with meta.env.begin(write=False) as txn:
        for p in job.problems:
            if p["kind"] in ("stale_record", "bad_record"):
                raw = txn.get(CHUNK_KEY.pack(p["chunk"]), db=meta.chunks)
                if raw is None or CHUNK_META.unpack(raw)[1:3] != (p["segment"], p["offset"]):
                    job.counts[p["kind"]] -= 1
                    continue
            keep.append(p)
    job.problems = keep
    job.counts = {k: n for k, n in job.counts.items() if n}
