"""Changed-block tracking: which extents of a volume had a map change in each generation.

A snapshot diff (snapshots.diff) and the export of a replication delta
(replica.py) want the blocks whose visible map entry differs between two
generations. Walking every map entry of the volume costs O(volume); this
module keeps, per (volume, generation), the set of 64 KiB extents (EXTENT_BLOCKS
blocks) that had a map entry created, replaced or removed while that
generation was the live one, so a diff of (lo, hi] visits only the extents
marked in generations lo+1..hi: O(changes).

Every change of a map entry marks its extent: `Engine._map` (client writes,
zeros and trims, shrinks, restores) and a clone's fill (generations.py).
The hot path only adds (volume, generation, extent) to an in-memory set
(`ChangeTracker.mark` or the set's own `add`); `persist()` ORs the set into
bitmap records in the `cbt` table in the open transaction, and the engine
calls it before every commit, so committed marks always cover committed maps.
A released snapshot generation's marks are merged into the next generation
that still exists (its entries may survive there); a deleted volume's records
are dropped with its map (maps.Reclaimer, through the engine).

Volumes that existed before metadata version 5 have no marks for what was
written before it: `cbt_since` (meta) holds, per such volume, the live
generation at the upgrade; a diff from an older generation walks the whole map
as before (`tracked`). Records and keys: docs/format.md, "cbt".
"""

from __future__ import annotations

import heapq
import struct
from collections.abc import Iterable, Iterator
from typing import Any

import lmdb

from .format import NO_CHUNK
from .maps import L2P_LBA_END, entries_by_block
from .metadata import MetaStore
from .volumes import Volume

EXTENT_SHIFT = 4  # 16 blocks: 64 KiB extents (a diff walks whole extents)
EXTENT_BLOCKS = 1 << EXTENT_SHIFT
GROUP_SHIFT = 10  # extents per record: a 128-byte bitmap covers 64 MiB of volume
GROUP_EXTENTS = 1 << GROUP_SHIFT
GROUP_BYTES = GROUP_EXTENTS // 8
CBT_KEY = struct.Struct(">III")  # volume id, generation, group (big-endian: ordered)

# (volume id, generation, extent) marked since the last persist()
Mark = tuple[int, int, int]


class ChangeTracker:
    """The marks of one pool. Runs on the engine thread; `pending` is the hot
    path's set (never replaced: the engine binds its `add`)."""

    def __init__(self, meta: MetaStore, volumes: Iterable[Volume]) -> None:
        self.meta = meta
        self.pending: set[Mark] = set()
        since = meta.get_json("cbt_since")
        if since is None:  # first open with tracking: what exists now was written untracked
            since = {str(v.id): v.gen for v in volumes}
            meta.put_json("cbt_since", since)
        self.since: dict[int, int] = {int(k): v for k, v in since.items()}

    def mark(self, vid: int, gen: int, lba: int) -> None:
        self.pending.add((vid, gen, lba >> EXTENT_SHIFT))

    def tracked(self, vid: int, lo: int) -> bool:
        """Whether the marks of generations after `lo` cover every change since."""
        return lo >= self.since.get(vid, 0)

    def persist(self) -> None:
        """OR the pending marks into their records in the open transaction."""
        if not self.pending:
            return
        groups: dict[tuple[int, int, int], list[int]] = {}
        for vid, gen, ext in self.pending:
            groups.setdefault((vid, gen, ext >> GROUP_SHIFT), []).append(ext & (GROUP_EXTENTS - 1))
        self.pending.clear()
        txn, db = self.meta.txn, self.meta.cbt
        for key, bits in groups.items():
            k = CBT_KEY.pack(*key)
            raw = txn.get(k, db=db)
            bm = bytearray(raw) if raw is not None else bytearray(GROUP_BYTES)
            for b in bits:
                bm[b >> 3] |= 1 << (b & 7)
            txn.put(k, bytes(bm), db=db)
        self.meta.pending_ops += len(groups)

    def release(self, vid: int, gen: int, nxt: int) -> None:
        """Generation `gen` is gone: its marks move to `nxt`, the next one that
        exists (the entries written in `gen` that survive are seen from there)."""
        self.persist()
        txn, db = self.meta.txn, self.meta.cbt
        rows = list(_records(txn, db, vid, gen))
        for group, bm in rows:
            k = CBT_KEY.pack(vid, nxt, group)
            raw = txn.get(k, db=db)
            if raw is not None:
                bm = bytes(a | b for a, b in zip(bm, bytes(raw), strict=True))
            txn.put(k, bm, db=db)
            txn.delete(CBT_KEY.pack(vid, gen, group), db=db)
        self.meta.pending_ops += 2 * len(rows)

    def drop_volume(self, vid: int, budget: int) -> int:
        """A deleted volume: drop up to `budget` of its records; returns how many."""
        self.pending = {m for m in self.pending if m[0] != vid} if self.pending else self.pending
        txn, db = self.meta.txn, self.meta.cbt
        cur = txn.cursor(db=db)
        keys: list[bytes] = []
        ok = cur.set_range(CBT_KEY.pack(vid, 0, 0))
        while ok and len(keys) < budget and CBT_KEY.unpack(cur.key())[0] == vid:
            keys.append(bytes(cur.key()))
            ok = cur.next()
        for k in keys:
            txn.delete(k, db=db)
        if len(keys) < budget and vid in self.since:
            del self.since[vid]
            self.meta.put_json("cbt_since", {str(k): v for k, v in self.since.items()})
        self.meta.pending_ops += len(keys)
        return len(keys)


def _records(txn: lmdb.Transaction, db: Any, vid: int, gen: int,
             first_group: int = 0) -> Iterator[tuple[int, bytes]]:
    """(group, bitmap) of one generation's records from `first_group` on."""
    cur = txn.cursor(db=db)
    ok = cur.set_range(CBT_KEY.pack(vid, gen, first_group))
    while ok:
        v, g, group = CBT_KEY.unpack(cur.key())
        if v != vid or g != gen:
            return
        yield group, bytes(cur.value())
        ok = cur.next()


def changed_extents(txn: lmdb.Transaction, db: Any, vid: int, lo: int, hi: int,
                    first_extent: int = 0) -> Iterator[int]:
    """Extents (ascending, each once) marked in a generation of (lo, hi], from
    `first_extent` on. Memory: one record per generation that has any."""
    gens: list[int] = []
    cur = txn.cursor(db=db)
    g = lo + 1
    while g <= hi and cur.set_range(CBT_KEY.pack(vid, g, 0)):
        v, found, _ = CBT_KEY.unpack(cur.key())
        if v != vid or found > hi:
            break
        gens.append(found)
        g = found + 1
    first_group = first_extent >> GROUP_SHIFT
    streams = [_records(txn, db, vid, g, first_group) for g in gens]
    merged = heapq.merge(*streams, key=lambda r: r[0])
    group, acc = -1, bytearray(GROUP_BYTES)

    def bits(group: int, bm: bytearray) -> Iterator[int]:
        base = group << GROUP_SHIFT
        for i, byte in enumerate(bm):
            while byte:
                low = byte & -byte
                ext = base + i * 8 + low.bit_length() - 1
                if ext >= first_extent:
                    yield ext
                byte ^= low

    for grp, bm in merged:
        if grp != group:
            if group >= 0:
                yield from bits(group, acc)
            group, acc = grp, bytearray(bm)
        else:
            for i, b in enumerate(bm):
                acc[i] |= b
    if group >= 0:
        yield from bits(group, acc)


def _at(entries: list[tuple[int, int]], gen: int) -> int:
    return next((c for g, c in entries if g <= gen), NO_CHUNK)


def changed_blocks(txn: lmdb.Transaction, l2p: Any, cbt: Any, vid: int, lo: int, hi: int,
                   first: int = 0, *, tracked: bool = True) -> Iterator[tuple[int, int]]:
    """(lba, chunk id at `hi`, NO_CHUNK for a hole) of every block from lba
    `first` on whose visible entry differs between generations lo and hi (lo < hi),
    in lba order. tracked=False (marks do not cover (lo, hi]): the whole map is walked.

    Compares chunk ids only: equal ids are equal data (a rewrite with the
    same data dedupes to the same chunk).
    """
    if not tracked:
        areas: Iterable[tuple[int, int]] = [(first, L2P_LBA_END)]
    else:
        areas = ((max(first, e << EXTENT_SHIFT), (e + 1) << EXTENT_SHIFT)
                 for e in changed_extents(txn, cbt, vid, lo, hi, first >> EXTENT_SHIFT))
    for a, b in areas:
        for lba, entries in entries_by_block(txn, l2p, vid, a, b):
            new = _at(entries, hi)
            if new != _at(entries, lo):
                yield lba, new
