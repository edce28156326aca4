"""The chunk store: chunk records, reference counts and the dedupe index.

A chunk is one stored 4 KiB block: a record in the segment log (header,
payload encoded with a codec) plus an entry in the `chunks` table (reference
count, location, codec, fingerprint). This module appends, references,
releases, reads, verifies and rewrites chunks, keeps the pool-wide counters
that go with them, and maintains the fingerprint index (fpindex.py) and its
background prune of stale entries.

The engine (engine.py) owns one ChunkStore and calls it on its thread; the
per-block methods (`dedupe_lookup`, `incref`, `new_chunk`, `read_chunk`) are
on the write and read paths and stay lean. Commits are the engine's business:
these methods only change the open transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NoReturn
from zlib import crc32 as _zcrc32

from ..errors import CorruptData, DeviceIOError, NotFound
from . import codecs
from .format import (
    BLOCK_SIZE,
    CHUNK_KEY,
    CHUNK_META,
    KIND_CHUNK,
    NO_CHUNK,
    SEQ_MASK,
    U64,
    ChunkHeader,
    crc32,
    record_size,
    stale_message,
    unpack_chunk_header,
)
from .fpindex import FingerprintIndex
from .metadata import MetaStore
from .segments import RELOCATED, SegmentLog
from .volumes import Volume

log = logging.getLogger(__name__)

MAX_COALESCE = 256  # chunks per device read when reading adjacent records
MAX_GAP = 4096  # padding between records worth reading through
PRUNE_MIN_STALE = 4096  # stale fingerprint entries worth a background sweep

_unpack_chunk = CHUNK_META.unpack
_pack_chunk = CHUNK_META.pack
_ckey = CHUNK_KEY.pack


class ChunkStore:
    """Chunk records, their reference counts and the fingerprint index.

    `on_failure` is called with a device error that hit an append (the engine
    then refuses writes); `mark_dirty` says the open transaction holds changes
    worth committing; `on_index_update` runs after each step of the index
    merge (fpindex.py's `after_step`).
    """

    def __init__(self, meta: MetaStore, segs: SegmentLog, counters: dict[str, Any], *,
                 on_failure: Callable[[DeviceIOError], None], mark_dirty: Callable[[], None],
                 on_index_update: Callable[[], None], index_memory: int) -> None:
        self.meta = meta
        self.segs = segs
        self.comp = codecs.Compressor()
        self.on_failure = on_failure
        self.mark_dirty = mark_dirty
        self.next_chunk: int = counters.get("next_chunk", 1)
        self.live_chunks: int = counters.get("live_chunks", 0)
        self.live_stored: int = counters.get("live_stored", 0)
        self.checksum_errors: int = counters.get("checksum_errors", 0)
        self.stale_fps: int = counters.get("stale_fps", 0)  # entries of freed chunks
        # where the background prune of stale fingerprint entries goes on (None: not running)
        prune = meta.get_json("prune", None)
        self.prune_from: bytes | None = None if prune is None else bytes.fromhex(prune)
        # bumped by every change of a reference count or a record's location
        # (the engine adds its map changes: Engine.map_changes)
        self.changes = 0
        self.fps = FingerprintIndex(meta, self.next_chunk, on_index_update,
                                    quota=index_memory)

    # ------------------------------------------------------------------ references
    def dedupe_lookup(self, fp: bytes) -> tuple[int, bytes | memoryview] | None:
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

    def find(self, fp: bytes) -> int | None:
        """The live chunk holding this fingerprint, exactly: not subject to the
        sparse index's sampling (a B-tree lookup per fingerprint not in memory),
        and checked against the chunk's entry. Replication asks this."""
        cid = self.fps.get_exact(fp)
        if cid is None:
            return None
        raw = self.meta.txn.get(_ckey(cid), db=self.meta.chunks)
        return cid if raw is not None and raw[-32:] == fp else None

    def fingerprint(self, cid: int) -> bytes:
        """The fingerprint of a live chunk."""
        return self.location(cid)[3]

    def incref(self, cid: int, raw: bytes | memoryview | None = None) -> None:
        """One more reference to chunk `cid` (`raw`: its entry, if the caller has it)."""
        txn, key = self.meta.txn, _ckey(cid)
        if raw is None:
            raw = txn.get(key, db=self.meta.chunks)
            assert raw is not None, f"reference to missing chunk {cid}"
        rc, s, off, slen, codec, slot, res, fp = _unpack_chunk(raw)
        txn.put(key, _pack_chunk(rc + 1, s, off, slen, codec, slot, res, fp), db=self.meta.chunks)
        self.changes += 1

    def decref(self, cid: int) -> None:
        """One reference fewer; the last one frees the chunk and its record's space."""
        txn, key = self.meta.txn, _ckey(cid)
        raw = txn.get(key, db=self.meta.chunks)
        if raw is None:
            log.error("refcount underflow: chunk %d is not in the index", cid)
            return
        self.changes += 1
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

    def new_chunk(self, vol: Volume, fp: bytes, codec: int, payload: bytes,
                  crc: int | None = None) -> int:
        """Append a new chunk (one reference) for a write to `vol`; returns its id."""
        cid = self.next_chunk
        if crc is None:
            crc = _zcrc32(payload)  # format.crc32 of one part, without the extra call
        try:
            s, off, size = self.segs.append_chunk(KIND_CHUNK, codec, cid, BLOCK_SIZE, fp, crc,
                                                  payload)
        except DeviceIOError as e:  # the write-behind of full blocks failed
            self.on_failure(e)
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

    # ------------------------------------------------------------------ reading
    def location(self, cid: int) -> tuple[int, int, int, bytes]:
        """(segment, offset, stored length, fingerprint) of a live chunk."""
        raw = self.meta.txn.get(_ckey(cid), db=self.meta.chunks)
        if raw is None:
            self.count_corruption(f"chunk {cid} is referenced but not in the chunk index")
        _, s, off, slen, _, _, _, fp = _unpack_chunk(raw)
        return s, off, slen, fp

    def note_checksum_error(self) -> None:
        """Count a checksum error found elsewhere (the cleaner's walk)."""
        self.checksum_errors += 1
        self.mark_dirty()

    def count_corruption(self, msg: str) -> NoReturn:
        """Count and log a checksum error, then raise CorruptData."""
        self.note_checksum_error()
        log.error("checksum error: %s", msg)
        raise CorruptData(msg)

    def decode(self, cid: int, s: int, off: int, slen: int, fp: bytes,
               rec: bytes | memoryview) -> bytes:
        """Verify a chunk record read from the device and return its data."""
        try:
            _kind, codec, chunk_id, raw_len, stored_len, fpr, pcrc, rseq = unpack_chunk_header(rec)
            payload = memoryview(rec)[ChunkHeader.SIZE : ChunkHeader.SIZE + slen]
            if chunk_id != cid or stored_len != slen or fpr != fp:
                raise CorruptData(f"segment {s} offset {off} holds chunk {chunk_id}, not {cid}")
            if rseq and rseq != self.segs.seq_of(s) & SEQ_MASK:  # (0: a version-1 record)
                raise CorruptData(stale_message(s, off, rseq, self.segs.seq_of(s)))
            if _zcrc32(payload) != pcrc:
                raise CorruptData(f"chunk {cid} (segment {s} offset {off}): payload checksum mismatch")
            return self.comp.decompress(codec, payload, raw_len)
        except CorruptData as e:
            self.count_corruption(str(e))

    def read_chunk(self, cid: int) -> bytes:
        """The data of a live chunk, verified."""
        s, off, slen, fp = self.location(cid)
        return self.decode(cid, s, off, slen, fp, self.segs.read(s, off, ChunkHeader.SIZE + slen))

    def read_stored(self, cid: int) -> tuple[int, int, bytes, int]:
        """(codec, raw length, payload as stored, payload CRC-32) of a live chunk:
        its record's header checked against the metadata and the payload
        against its CRC, not decompressed (replication ships it as it is)."""
        s, off, slen, fp = self.location(cid)
        rec = self.segs.read(s, off, ChunkHeader.SIZE + slen)
        try:
            _kind, codec, chunk_id, raw_len, stored_len, fpr, pcrc, rseq = unpack_chunk_header(rec)
            if chunk_id != cid or stored_len != slen or fpr != fp:
                raise CorruptData(f"segment {s} offset {off} holds chunk {chunk_id}, not {cid}")
            if rseq and rseq != self.segs.seq_of(s) & SEQ_MASK:
                raise CorruptData(stale_message(s, off, rseq, self.segs.seq_of(s)))
            payload = bytes(memoryview(rec)[ChunkHeader.SIZE : ChunkHeader.SIZE + slen])
            if _zcrc32(payload) != pcrc:
                raise CorruptData(f"chunk {cid} (segment {s} offset {off}): payload checksum mismatch")
        except CorruptData as e:
            self.count_corruption(str(e))
        return codec, raw_len, payload, pcrc

    def read_chunks(self, cids: list[int]) -> dict[int, bytes]:
        """Read many chunks, one device read per run of physically adjacent records."""
        locs = sorted((self.location(c), c) for c in set(cids) if c != NO_CHUNK)
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
                out[cid] = self.decode(cid, s_, off, slen_, fp, buf[off - start :])
            i = j
        return out

    def chunk_codec(self, cid: int) -> tuple[int, int]:
        """(codec id, stored length) of a live chunk."""
        raw = self.meta.txn.get(_ckey(cid), db=self.meta.chunks)
        if raw is None:
            raise NotFound(f"chunk {cid} does not exist")
        _, _, _, slen, codec, _, _, _ = _unpack_chunk(raw)
        return codec, slen

    # ------------------------------------------------------------------ rewriting
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
        try:
            # (to the relocated stream: data that outlived a segment is colder than new writes)
            ns, noff, size = self.segs.append_chunk(
                KIND_CHUNK, codec, cid, BLOCK_SIZE, fp, crc32(payload), bytes(payload),
                reserve_ok=reserve_ok, stream=RELOCATED)
        except DeviceIOError as e:
            self.on_failure(e)
            raise
        txn.put(key, _pack_chunk(rc, ns, noff, len(payload), codec, slot, res, fp), db=self.meta.chunks)
        old = record_size(slen)
        self.segs.release(s, old)
        self.live_stored += size - old
        self.changes += 1
        self.meta.pending_ops += 1
        self.mark_dirty()
        return old, size

    # ------------------------------------------------------------------ the index
    def prune_wanted(self, busy: bool) -> bool:
        """A sweep of stale fingerprint entries is running or worth starting."""
        if self.prune_from is not None:  # a started sweep finishes, busy or not
            return True
        # idle: once stale entries are an eighth of the index; busy: only once
        # they outnumber live ones (sustained overwrites must not pay for it)
        limit = self.live_chunks if busy else max(PRUNE_MIN_STALE, self.live_chunks // 8)
        return self.stale_fps > limit

    def prune_step(self, budget: int) -> int:
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
        self.mark_dirty()
        return seen

    def index_statistics(self) -> dict[str, Any]:
        """The dedupe index: entries waiting in memory, stale entries, running sweeps."""
        return {"in_memory": len(self.fps), "merging": bool(self.fps.merging),
                "merged_below_chunk": self.fps.upto, "stale": self.stale_fps,
                "pruning": self.prune_from is not None, "filter": self.fps.filter_statistics()}
