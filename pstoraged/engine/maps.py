"""The L2P maps: reading (volume, lba, generation) -> chunk entries, and the
background release of deleted volumes' entries.

Keys are L2P_KEY (volume id, lba, inverted generation: newest first), values
a chunk id; NO_CHUNK is a tombstone (the block reads as zeros while an
older, frozen entry exists below it). `L2PMap` answers the engine's lookups
and walks (reads, extents, trims, snapshot work, tiering); the engine itself
changes entries (`Engine._map`, on the write path). `entries_by_block` is the
whole-volume walk that usage.py and snapshots.py use on a read transaction.
`Reclaimer` gives back a deleted volume's blocks a slice at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import lmdb

from .chunks import ChunkStore
from .format import L2P_KEY, NO_CHUNK, U64, l2p_key, l2p_unpack
from .metadata import MetaStore
from .volumes import FIRST_GEN, Volume

log = logging.getLogger(__name__)

L2P_LBA_END = (1 << 64) - 1  # reclaim position past every lba

# [(lba, [(generation, chunk id, key), newest first])]
BlockEntries = list[tuple[int, list[tuple[int, int, bytes]]]]


class L2PMap:
    """Read-side queries of the map table, in the engine's open transaction."""

    def __init__(self, meta: MetaStore) -> None:
        self.meta = meta

    def lookup(self, vol: Volume, lba: int, gen: int) -> int:
        """The chunk block `lba` of `vol` reads at generation `gen` (NO_CHUNK: zeros)."""
        key = l2p_key(vol.id, lba, gen)
        if gen == FIRST_GEN:  # nothing older can exist: one exact get, no cursor
            raw = self.meta.txn.get(key, db=self.meta.l2p)
            return NO_CHUNK if raw is None else U64.unpack(raw)[0]
        cur = self.meta.txn.cursor(db=self.meta.l2p)
        if cur.set_range(key) and cur.key()[:12] == key[:12]:
            return U64.unpack(cur.value())[0]
        return NO_CHUNK

    def entries(self, vol: Volume, first: int, end: int, gen: int) -> Iterator[tuple[int, int]]:
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

    def data_blocks(self, vol: Volume, first: int, end: int) -> Iterator[tuple[int, int]]:
        """(lba, chunk id) of the data blocks in [first, end) of the live generation."""
        for lba, cid in self.entries(vol, first, end, vol.gen):
            if cid != NO_CHUNK:
                yield lba, cid

    def mapped_lbas(self, vol: Volume, first: int, end: int, limit: int) -> list[int]:
        """Up to `limit` blocks in [first, end) that hold data at the live generation."""
        out: list[int] = []
        for lba, cid in self.entries(vol, first, end, vol.gen):
            if cid != NO_CHUNK:
                out.append(lba)
                if len(out) == limit:
                    break
        return out

    def block_entries(self, vid: int, first: int, budget: int) -> tuple[BlockEntries, int | None]:
        """Entries of up to ~budget map keys from lba `first`, grouped by block
        [(lba, [(gen, chunk, key), newest first])], and the lba to resume at
        (None: the volume's map is done). Whole blocks only."""
        cur = self.meta.txn.cursor(db=self.meta.l2p)
        ok = cur.set_range(L2P_KEY.pack(vid, first, 0))
        out: BlockEntries = []
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


def entries_by_block(txn: lmdb.Transaction, db: Any, vid: int, first: int = 0,
                     end: int = L2P_LBA_END) -> Iterator[tuple[int, list[tuple[int, int]]]]:
    """(lba, [(gen, chunk), newest first]) for every block of the volume in
    [first, end) with entries (by default: the whole volume)."""
    cur = txn.cursor(db=db)
    ok = cur.set_range(L2P_KEY.pack(vid, first, 0))
    lba_cur, entries = -1, list[tuple[int, int]]()
    while ok:
        v, lba, g = l2p_unpack(cur.key())
        if v != vid or lba >= end:
            break
        if lba != lba_cur:
            if entries:
                yield lba_cur, entries
            lba_cur, entries = lba, []
        entries.append((g, U64.unpack(cur.value())[0]))
        ok = cur.next()
    if entries:
        yield lba_cur, entries


class Reclaimer:
    """Deleted volumes whose map entries are still being released (background work).

    A deleted volume disappears from the catalog at once; its blocks are
    given back here, a slice at a time between client requests, so a delete
    never stalls I/O. Progress (volume id -> next lba) is saved in the same
    transaction as the work, so a crash resumes where the last commit left
    off. `drop_heat(volume id, budget)` drops its temperature records last.
    """

    def __init__(self, meta: MetaStore, chunks: ChunkStore,
                 drop_heat: Callable[[int, int], int]) -> None:
        self.meta = meta
        self.chunks = chunks
        self.drop_heat = drop_heat
        self.reclaiming: dict[int, int] = {
            int(k): v for k, v in meta.get_json("reclaim", {}).items()}

    def start(self, vid: int) -> None:
        """Queue the release of a deleted volume's entries."""
        self.reclaiming[vid] = 0
        self._save()

    def _save(self) -> None:
        self.meta.put_json("reclaim", {str(k): v for k, v in self.reclaiming.items()})

    def step(self, budget: int) -> int:
        """Release up to `budget` map entries of deleted volumes; returns how many."""
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
        decref = self.chunks.decref
        for k, cid in zip(keys, cids, strict=True):
            txn.delete(k, db=db)
            if cid != NO_CHUNK:
                decref(cid)
        self.meta.pending_ops += len(keys)
        done = len(keys)
        if len(keys) < budget:  # map done: then its temperature records
            left = budget - len(keys)
            dropped = self.drop_heat(vid, left)
            done += dropped
            if dropped < left:
                del self.reclaiming[vid]
                log.info("volume id %d: all space reclaimed", vid)
            else:
                self.reclaiming[vid] = L2P_LBA_END  # nothing left in the map
        else:
            self.reclaiming[vid] = L2P_KEY.unpack(keys[-1])[1] + 1
        self._save()
        return done
