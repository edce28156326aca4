"""Asynchronous replication, the engine's side: exporting a delta between two
snapshots of a volume (source) and importing it into a replica volume (target).

Network-free: the transport (peers, frames, encryption) moves what these
methods return and calls them on the engine thread (DataPlane.call). One round:

  source                                        target
  ------                                        ------
  snapshot S (the replication point)            ReplicaImport.begin(base, S, size)
  DeltaExport(vol, base, S).batch(cursor)       -> next lba to send from (resume)
    -> (lba, fingerprint | HOLE) ...  ------->  missing(fingerprints) -> lacking
  chunk_payloads(lacking)  <-------------------
    -> stored bytes, codec, CRC  ------------>  store_chunks(payloads)  (verified)
                                                apply(batch)  (records next lba)
  ... until a batch says done ...               commit_point(S, keep=N)

The delta is the changed-block walk of (base, S] (changes.py): its cost grows
with the changes. Chunks travel as stored (no recompression) and only those
the target lacks (its whole pool's dedupe index, exactly: not the Bloom
filter's "maybe", not sparse sampling). The target verifies every payload
(CRC, decompression, SHA-256 = fingerprint) before storing it.

Crash safety on the target: each apply() changes the replica's map and its
progress record (`meta` key `replica:<volume id>`) in one transaction, so a
restart resumes at the recorded lba; until commit_point() the last replica
snapshot is the consistent point (the volume itself may be half updated and
is read-only to clients). Chunks stored but not yet mapped hold a "staging"
reference listed in the record (dropped when a batch maps them, or at the
commit point or an abort), so a crash never leaks them. On the source, the
snapshots pin the chunks; `Outbound` records which delta is in flight to a
target (`repl_out:<volume id>:<target>`).

docs/replication.md, "Async replication: data path", describes the model.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from hashlib import sha256
from typing import Any
from zlib import crc32

from ..errors import Conflict, CorruptData, InvalidArgument, NotFound
from . import codecs
from .engine import Engine, Volume
from .format import BLOCK_SIZE, NO_CHUNK
from .snapshots import Catalog, Snapshot

log = logging.getLogger(__name__)

BATCH_BLOCKS = 1024  # blocks per batch: 32 KiB of fingerprints
RECENT_LIMIT = 4 * BATCH_BLOCKS  # fingerprint -> chunk id kept on the source for chunk_payloads
DEFAULT_KEEP = 4  # replica snapshots kept on the target
HOLE = None  # a block that reads as zeros (never written, zeroed or trimmed)

Block = tuple[int, bytes | None]  # (lba, fingerprint or HOLE)


@dataclass(frozen=True, slots=True)
class ChunkPayload:
    """One chunk as stored: `data` is encoded with `codec`; `crc` is its CRC-32."""

    fingerprint: bytes  # SHA-256 of the decoded block
    codec: int
    raw_len: int
    data: bytes
    crc: int


@dataclass(frozen=True, slots=True)
class DeltaBatch:
    """Changed blocks of [first_lba, next_lba), ascending; done: the last batch."""

    first_lba: int
    next_lba: int
    blocks: list[Block]
    done: bool


@dataclass(frozen=True, slots=True)
class ReplicaStatistics:
    chunks_stored: int  # payloads stored (the replica lacked them)
    chunks_known: int  # payloads sent that it had after all
    bytes_stored: int  # payload bytes of those stored
    blocks_applied: int


def verify_payload(p: ChunkPayload, comp: codecs.Compressor | None = None) -> None:
    """CorruptData unless the payload is a well-formed chunk whose decoded data
    has its fingerprint. Pure: the transport may run it on a worker thread first."""
    if len(p.fingerprint) != 32:
        raise CorruptData(f"payload fingerprint has {len(p.fingerprint)} bytes, not 32")
    if p.codec not in codecs.NAMES:
        raise CorruptData(f"payload has unknown codec id {p.codec}")
    if p.raw_len != BLOCK_SIZE or not 0 < len(p.data) <= BLOCK_SIZE:
        raise CorruptData(f"payload of {len(p.data)} bytes for {p.raw_len}: chunks are "
                          f"{BLOCK_SIZE}-byte blocks stored in at most that")
    if crc32(p.data) != p.crc:
        raise CorruptData(f"payload of chunk {p.fingerprint.hex()[:16]}: CRC mismatch")
    data = (comp or codecs.Compressor()).decompress(p.codec, p.data, p.raw_len)
    if sha256(data).digest() != p.fingerprint:
        raise CorruptData(f"payload of chunk {p.fingerprint.hex()[:16]}: its data does not "
                          "have that fingerprint")


# ---------------------------------------------------------------- source
class DeltaExport:
    """The blocks of `vol` that differ between generations `base` (0: none, a
    full copy) and `gen` (a snapshot's), and the chunks they point at."""

    def __init__(self, engine: Engine, vol: Volume, base: int, gen: int, size: int) -> None:
        if base >= gen:
            raise InvalidArgument(f"generation {base} is not older than {gen}")
        self.engine = engine
        self.vol = vol
        self.base, self.gen, self.size = base, gen, size
        self.end = -(-size // BLOCK_SIZE)
        self._recent: OrderedDict[bytes, int] = OrderedDict()  # fingerprint -> chunk id

    @classmethod
    def between(cls, engine: Engine, catalog: Catalog, volume: str, base: str | None,
                snap: str) -> DeltaExport:
        """The delta from snapshot `base` (None: from nothing) to snapshot `snap`."""
        vol = catalog.volume(volume)
        s = catalog.get(volume, snap)
        b = catalog.get(volume, base).gen if base is not None else 0
        return cls(engine, vol, b, s.gen, s.size)

    def _check_pinned(self) -> None:
        vol = self.engine.by_id.get(self.vol.id)
        if vol is not self.vol or self.gen not in vol.frozen or (
                self.base and self.base not in vol.frozen):
            raise NotFound(f"a snapshot of {self.vol.name!r} that this delta reads was deleted",
                           "start a new replication round")

    def batch(self, cursor: int = 0, max_blocks: int = BATCH_BLOCKS) -> DeltaBatch:
        """The changed blocks from lba `cursor` on, at most `max_blocks` of them."""
        self._check_pinned()
        chunks = self.engine.chunks
        blocks: list[Block] = []
        nxt, done = self.end, True
        for lba, cid in self.engine.changed_blocks(self.vol, self.base, self.gen, cursor):
            if lba >= self.end:
                break
            if len(blocks) == max_blocks:
                nxt, done = lba, False
                break
            if cid == NO_CHUNK:
                blocks.append((lba, HOLE))
                continue
            fp = chunks.fingerprint(cid)
            blocks.append((lba, fp))
            self._recent[fp] = cid
            self._recent.move_to_end(fp)
        while len(self._recent) > RECENT_LIMIT:
            self._recent.popitem(last=False)
        return DeltaBatch(cursor, nxt, blocks, done)

    def chunk_payloads(self, fingerprints: Iterable[bytes]) -> list[ChunkPayload]:
        """The chunks with these fingerprints as stored (verified by their CRC)."""
        self._check_pinned()
        chunks = self.engine.chunks
        out = []
        for fp in fingerprints:
            cid = self._recent.get(fp)
            if cid is None:
                cid = chunks.find(fp)
                if cid is None:
                    raise NotFound(f"no chunk with fingerprint {fp.hex()[:16]} in this delta")
            codec, raw_len, data, crc = chunks.read_stored(cid)
            out.append(ChunkPayload(fp, codec, raw_len, data, crc))
        return out


class Outbound:
    """Which delta of a volume is in flight to one target, and how far it got,
    kept in the pool's metadata so that a restarted source resumes it."""

    def __init__(self, engine: Engine, vol: Volume, target: str) -> None:
        self.engine = engine
        self.key = f"repl_out:{vol.id}:{target}"
        self.state: dict[str, Any] | None = engine.meta.get_json(self.key)

    def start(self, base: str | None, snap: str) -> None:
        self.state = {"base": base, "snap": snap, "next_lba": 0}
        self._save()

    def advance(self, next_lba: int) -> None:
        assert self.state is not None
        self.state["next_lba"] = next_lba
        self._save()

    def finish(self) -> None:
        """The target committed the point: the next round's base is this snap."""
        assert self.state is not None
        self.state = {"base": self.state["snap"], "snap": None, "next_lba": 0}
        self._save()

    def _save(self) -> None:
        self.engine.meta.put_json(self.key, self.state)
        self.engine.mark_dirty()


# ---------------------------------------------------------------- target
class ReplicaImport:
    """A replica volume on the target: read-only to clients, changed only by
    applied deltas, with a replica snapshot per completed delta."""

    def __init__(self, engine: Engine, catalog: Catalog, name: str) -> None:
        self.engine = engine
        self.catalog = catalog
        self.vol = catalog.volume(name)
        self.key = f"replica:{self.vol.id}"
        rec = engine.meta.get_json(self.key)
        if rec is None:
            raise Conflict(f"volume {name!r} is not a replica",
                           "create the replica with ReplicaImport.create")
        self.rec: dict[str, Any] = rec
        self.stats = ReplicaStatistics(0, 0, 0, 0)

    @classmethod
    def create(cls, engine: Engine, catalog: Catalog, name: str, size: int,
               compression: str = "lz4") -> ReplicaImport:
        """A new, empty replica volume (read-only to clients)."""
        vol = engine.create_volume(name, size, compression)
        vol.readonly = True
        engine.catalog.persist(vol)
        engine.meta.put_json(f"replica:{vol.id}", {"points": [], "delta": None, "staged": {}})
        engine.flush()
        return cls(engine, catalog, name)

    # ------------------------------------------------------------ state
    @property
    def points(self) -> list[str]:
        """Replica snapshots, oldest first; the last is the consistent point."""
        return list(self.rec["points"])

    @property
    def delta(self) -> dict[str, Any] | None:
        """The delta being applied: base, snap, size, next_lba, complete."""
        return self.rec["delta"]

    def _save(self) -> None:
        self.engine.meta.put_json(self.key, self.rec)
        self.engine.mark_dirty()

    def _staged(self) -> dict[str, int]:
        staged: dict[str, int] = self.rec["staged"]
        return staged

    def _release_staged(self, fps: Iterable[str] | None = None) -> None:
        staged = self._staged()
        for h in list(staged) if fps is None else fps:
            cid = staged.pop(h, None)
            if cid is not None:
                self.engine.chunks.decref(cid)

    def _check(self) -> None:
        self.engine.check_failed()
        vol = self.engine.by_id.get(self.vol.id)
        if vol is not self.vol or vol.destroyed_ns:
            raise NotFound(f"replica volume {self.vol.name!r} was deleted")

    # ------------------------------------------------------------ a delta
    def begin(self, base: str | None, snap: str, size: int) -> int:
        """Start (or resume) applying the delta base -> snap; returns the lba to
        send from. A different delta left half applied is rolled back to the
        last replica snapshot first."""
        self._check()
        d = self.delta
        if d is not None and d["base"] == base and d["snap"] == snap:
            if d["size"] != size:
                raise Conflict(f"delta {base}->{snap} was begun with size {d['size']}, not {size}")
            return int(d["next_lba"])
        last = self.points[-1] if self.points else None
        if base != last:
            raise Conflict(f"replica {self.vol.name!r} holds {last or 'nothing yet'}, "
                           f"not {base or 'nothing'}: a delta from {base} cannot apply",
                           f"send the delta from {last}" if last else "send a full copy first")
        if d is not None:
            self._roll_back()
        if size != self.vol.size:
            self.engine.resize_volume(self.vol.name, size, shrink=True)
        self.rec["delta"] = {"base": base, "snap": snap, "size": size, "next_lba": 0,
                             "complete": False}
        self._save()
        self.engine.flush()
        return 0

    def _roll_back(self) -> None:
        """Undo a half-applied delta: the volume reads as its last replica snapshot."""
        self._release_staged()
        self.rec["delta"] = None
        self._save()
        if self.points:
            self.catalog.restore(self.vol.name, self.points[-1], wait=True)
        else:
            self.engine.clear_volume(self.vol)
        self.engine.flush()
        log.info("replica %s: half-applied delta rolled back", self.vol.name)

    def abort(self) -> None:
        """Give up the delta in progress (roll back to the last replica snapshot)."""
        self._check()
        if self.delta is not None:
            self._roll_back()

    def missing(self, fingerprints: Iterable[bytes]) -> list[bytes]:
        """The fingerprints (of those asked) whose chunks this pool lacks, each once."""
        find = self.engine.chunks.find
        out: list[bytes] = []
        seen: set[bytes] = set()
        for fp in fingerprints:
            if fp not in seen:
                seen.add(fp)
                if find(bytes(fp)) is None:
                    out.append(bytes(fp))
        return out

    def store_chunks(self, payloads: Sequence[ChunkPayload]) -> int:
        """Store the chunks this pool lacks, as sent (no recompression); returns
        how many were new. Every payload is verified first: one bad payload
        refuses the whole call (CorruptData) and nothing is stored."""
        self._check()
        if self.delta is None:
            raise Conflict(f"replica {self.vol.name!r} has no delta in progress", "call begin first")
        self.engine.check_room()
        comp = self.engine.comp
        for p in payloads:
            try:
                verify_payload(p, comp)
            except CorruptData as e:
                log.warning("replica %s: payload refused: %s", self.vol.name, e)
                raise
        chunks, staged = self.engine.chunks, self._staged()
        new = known = nbytes = 0
        for p in payloads:
            if chunks.find(p.fingerprint) is not None:
                known += 1
                continue
            cid = chunks.new_chunk(self.vol, p.fingerprint, p.codec, p.data, p.crc)
            staged[p.fingerprint.hex()] = cid
            new += 1
            nbytes += len(p.data)
        self._save()
        s = self.stats
        self.stats = ReplicaStatistics(s.chunks_stored + new, s.chunks_known + known,
                                       s.bytes_stored + nbytes, s.blocks_applied)
        self.engine.commit_if_due()
        return new

    def apply(self, batch: DeltaBatch) -> None:
        """Map a batch's blocks onto the replica volume and record how far the
        delta got, in one transaction. Conflict (and no change) if a chunk it
        names is missing: ask missing() and store_chunks() again."""
        self._check()
        d = self.delta
        if d is None:
            raise Conflict(f"replica {self.vol.name!r} has no delta in progress", "call begin first")
        end = -(-d["size"] // BLOCK_SIZE)
        if not 0 <= batch.first_lba <= batch.next_lba <= end:
            raise InvalidArgument(f"batch [{batch.first_lba}, {batch.next_lba}) is outside the "
                                  f"replica ({end} blocks)")
        chunks, staged = self.engine.chunks, self._staged()
        resolved: list[tuple[int, int]] = []
        lacking = 0
        prev = batch.first_lba - 1
        for lba, fp in batch.blocks:
            if not prev < lba < batch.next_lba:
                raise InvalidArgument(f"block {lba} of a batch is out of order or outside "
                                      f"[{batch.first_lba}, {batch.next_lba})")
            prev = lba
            if fp is HOLE:
                resolved.append((lba, NO_CHUNK))
                continue
            cid = staged.get(fp.hex()) or chunks.find(fp)
            if cid is None:
                lacking += 1
            else:
                resolved.append((lba, cid))
        if lacking:
            raise Conflict(f"replica {self.vol.name!r} lacks {lacking} chunk(s) of this batch",
                           "send the chunks that missing() names, then apply again")
        self.engine.map_blocks(self.vol, resolved)
        # the map holds them now: their staging references go
        self._release_staged(fp.hex() for _, fp in batch.blocks if fp is not HOLE)
        d["next_lba"] = batch.next_lba
        d["complete"] = batch.done
        self._save()
        s = self.stats
        self.stats = ReplicaStatistics(s.chunks_stored, s.chunks_known, s.bytes_stored,
                                       s.blocks_applied + len(resolved))
        self.engine.commit_if_due()

    def commit_point(self, name: str, keep: int = DEFAULT_KEEP) -> Snapshot:
        """The whole delta is applied: take replica snapshot `name` (atomically with
        the end of the delta), then delete replica snapshots older than the newest
        `keep` (locked ones stay: SafeMode)."""
        self._check()
        d = self.delta
        if d is None or d["snap"] != name:
            raise Conflict(f"replica {self.vol.name!r} is not applying a delta to {name!r}")
        if not d["complete"]:
            raise Conflict(f"the delta to {name!r} is applied up to block {d['next_lba']} only",
                           "send the rest first")
        if keep < 1:
            raise InvalidArgument("keep at least one replica snapshot (the next delta's base)")
        try:
            self.catalog.get(self.vol.name, name, destroyed=True)
        except NotFound:
            pass
        else:
            raise Conflict(f"replica {self.vol.name!r} already has a snapshot {name!r}")
        self._release_staged()
        self.rec["delta"] = None
        self.rec["points"].append(name)
        self._save()
        snap = self.catalog.create(self.vol.name, name)  # commits the record with it
        log.info("replica %s: consistent point %s", self.vol.name, name)
        self._expire(keep)
        return snap

    def _expire(self, keep: int) -> None:
        """Delete the replica snapshots older than the newest `keep`; a locked one
        stays (SafeMode) beyond them, until its lock ends and a later round comes."""
        points = self.rec["points"]
        for name in list(points[:-keep]):
            try:
                self.catalog.delete(self.vol.name, name)
            except NotFound:
                pass  # deleted by hand meanwhile
            except Conflict as e:  # a retention lock
                log.info("replica %s: snapshot %s kept: %s", self.vol.name, name, e.message)
                continue
            points.remove(name)
        self._save()
        self.engine.flush()
