"""The pool-wide dedupe index: fingerprint -> chunk id, in two tiers.

Fingerprints are random, so adding each new chunk's entry straight to the
B-tree dirtied one 4 KiB page per unique block written: on sequential writes
of mixed data the index pages were ~80 % of every group commit (measured:
40 ms commits, 4 ms without them). New entries therefore go to a bounded
in-memory table first, and a background merge moves a full table into the
B-tree in key order, so that each B-tree page is written once per merge
however many new entries land on it.

Crash safety needs no log of its own: every chunk record already carries its
fingerprint, and chunk ids only grow. The meta key `fp_upto` says below which
chunk id every chunk is in the B-tree; on open, the chunks from there on are
read back into the table (a bounded scan: at most two tables' worth).

The index is a hint either way (Engine._dedupe_lookup checks every hit against
the chunk record), so a lost or stale entry can cost dedupe, never data.

Most blocks written are new, and each would cost a B-tree lookup that misses:
a Bloom filter (_filter.c) of the B-tree's keys answers most of those "no"
from memory. It is built in the background by walking the B-tree (lookups go
to the B-tree until it is complete), merges add to it, and since freed
entries cannot be taken out it is rebuilt once it has taken more entries
than it was sized for. Without the compiled module there is no filter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from itertools import islice
from typing import Any

from .format import CHUNK_KEY, U64
from .metadata import MetaStore

log = logging.getLogger(__name__)

TABLE_ENTRIES = 65536  # new fingerprints held in memory before a merge (~13 MiB)
# entries merged per background step: short stalls (quick runs: ~5 % faster than 2048)
MERGE_SLICE = 512

try:
    from ._filter import FingerprintFilter
except ImportError:  # built without a C compiler: every miss asks the B-tree
    FingerprintFilter = None

# Sized for every block of the pool's capacity at 12 bits each (~0.5 % false
# "maybe"), within bounds: a 40 GiB pool gets 16 MiB. Past the cap (a pool of
# ~700 GiB or more), the false rate rises instead of the memory.
FILTER_BITS_PER_ENTRY = 12
FILTER_MIN_BYTES = 64 << 10
FILTER_MAX_BYTES = 256 << 20
FILTER_BUILD_SLICE = 4096  # B-tree keys read per background step while (re)building


def filter_bytes(entries: int) -> int:
    """The filter size for `entries` fingerprints: a power of two within the bounds."""
    size = FILTER_MIN_BYTES
    while size * 8 < entries * FILTER_BITS_PER_ENTRY and size < FILTER_MAX_BYTES:
        size *= 2
    return size


class FingerprintIndex:
    name = "index merge"  # as a background service (Engine.services)

    def __init__(self, meta: MetaStore, next_chunk: int, after_step: Callable[[], None],
                 table_entries: int | None = None, capacity_blocks: int = 0) -> None:
        self.meta = meta
        self.after_step = after_step  # the engine's "updates made" hook (dirty, maybe commit)
        self.table_entries = table_entries or TABLE_ENTRIES
        self.recent: dict[bytes, int] = {}  # entries not yet in the B-tree
        self.merging: dict[bytes, int] = {}  # the table being merged
        self._order: list[bytes] = []  # its keys, sorted
        self._pos = 0  # next key of _order to merge
        self._merge_upto = 0  # chunk id below which all will be in the B-tree after the merge
        upto = meta.get_json("fp_upto", None)
        if upto is None:  # a new store, or one older than metadata v3: all in the B-tree
            upto = next_chunk
            meta.put_json("fp_upto", upto)
        self.upto: int = upto
        self._load_tail()
        # the Bloom filter: `filter` holds every key of the B-tree once built;
        # `_building` is one being filled by the walk that starts at `_build_from`
        self.filter: Any = None
        self._building: Any = None
        self._build_from: bytes | None = None
        self._walked = 0  # keys the current or last build walked
        self.filter_skips = 0  # lookups the filter answered without the B-tree
        self._filter_size = filter_bytes(capacity_blocks)
        if FingerprintFilter is not None and capacity_blocks:
            self._start_build()
            if not meta.txn.stat(meta.fp)["entries"]:  # nothing to walk
                self.filter, self._building = self._building, None

    def _load_tail(self) -> None:
        """Rebuild the table from the chunk records not yet merged (after a restart)."""
        txn, n = self.meta.txn, 0
        cur = txn.cursor(db=self.meta.chunks)
        ok = cur.set_range(CHUNK_KEY.pack(self.upto))
        while ok:
            cid = CHUNK_KEY.unpack(cur.key())[0]
            self.recent[bytes(cur.value()[-32:])] = cid
            n += 1
            ok = cur.next()
        if n:
            log.info("dedupe index: %d fingerprints of chunks %d.. back in memory",
                     n, self.upto)

    def __len__(self) -> int:
        return len(self.recent) + len(self.merging)

    def get(self, fp: bytes) -> int | None:
        cid = self.recent.get(fp)
        if cid is None:
            cid = self.merging.get(fp)
            if cid is None:
                hit = self._btree_get(fp)
                if hit is None:
                    return None
                cid = U64.unpack(hit)[0]
        return cid

    def _btree_get(self, fp: bytes) -> bytes | memoryview | None:
        """The B-tree's entry for fp; a ready filter answers most misses without it."""
        flt = self.filter
        if flt is not None and not flt.maybe(fp):
            self.filter_skips += 1
            return None
        return self.meta.txn.get(fp, db=self.meta.fp)

    def pending(self, fp: bytes) -> bool:
        """An entry for fp waits in memory (and will replace the B-tree's)."""
        return fp in self.recent or fp in self.merging

    def forget(self, fp: bytes, cid: int) -> bool:
        """Chunk `cid` was freed: returns whether that leaves a stale entry behind.

        An entry still in memory is simply dropped (it never reaches the
        B-tree). A B-tree entry for fp stays, stale, until pruned or replaced.
        """
        for table in (self.recent, self.merging):
            held = table.get(fp)
            if held is None:
                continue
            if held != cid:  # superseded by a newer chunk with the same content
                return False
            del table[fp]
            return self._btree_get(fp) is not None
        return True

    def entries(self) -> dict[bytes, int]:
        """The whole index as lookups see it (tests and checks; reads the B-tree)."""
        out = {bytes(k): U64.unpack(v)[0] for k, v in self.meta.txn.cursor(db=self.meta.fp)}
        out.update(self.merging)
        out.update(self.recent)
        return out

    def add(self, fp: bytes, cid: int) -> None:
        self.recent[fp] = cid
        if len(self.recent) >= self.table_entries:
            self._start_merge(cid + 1)
            if len(self.recent) >= self.table_entries:  # the merge could not keep up
                self.finish_merge()
                self._start_merge(cid + 1)

    def _start_merge(self, upto: int) -> None:
        if self.merging:
            return
        self.merging, self.recent = self.recent, {}
        self._order = sorted(self.merging)
        self._pos = 0
        self._merge_upto = upto

    def wanted(self, busy: bool) -> bool:
        return bool(self.merging) or self._building is not None

    def step(self, budget: int, busy: bool) -> int:
        """Merge up to max(budget, MERGE_SLICE) entries of the table, in key order;
        with no merge to do, go on building the filter."""
        if not self.merging:
            return self._build_step(max(budget, FILTER_BUILD_SLICE)) if self._building else 0
        txn, db = self.meta.txn, self.meta.fp
        end = min(len(self._order), self._pos + max(budget, MERGE_SLICE))
        cur = txn.cursor(db=db)
        merging = self.merging
        keys = self._order[self._pos : end]
        cur.putmulti([(fp, U64.pack(cid)) for fp in keys
                      if (cid := merging.get(fp)) is not None])  # freed meanwhile: skipped
        for flt in (self.filter, self._building):
            if flt is not None:  # (the freed ones too: a false "maybe" at worst)
                flt.add_many(keys)
        done = end - self._pos
        self.meta.pending_ops += done
        self._pos = end
        if end == len(self._order):
            # every chunk below _merge_upto is now in the B-tree (in this transaction)
            self.upto = self._merge_upto
            self.meta.put_json("fp_upto", self.upto)
            self.merging, self._order, self._pos = {}, [], 0
            flt = self.filter
            if (flt is not None and self._building is None
                    and flt.added > max(self._filter_size * 8 // FILTER_BITS_PER_ENTRY,
                                        2 * self._walked)):
                # full of freed chunks' bits: its false "maybe"s grow
                self._start_build()
        self.after_step()
        return done

    def _start_build(self) -> None:
        self._building = FingerprintFilter(self._filter_size)
        self._build_from = None
        self._walked = 0

    def _build_step(self, budget: int) -> int:
        """Add the next `budget` keys of the B-tree to the filter being built.

        Keys merged meanwhile are added by the merge itself, so when the walk
        reaches the end the filter holds every key and takes over.
        """
        cur = self.meta.txn.cursor(db=self.meta.fp)
        ok = cur.first() if self._build_from is None else cur.set_range(self._build_from)
        keys = list(islice(cur.iternext(values=False), budget)) if ok else []
        self._building.add_many(keys)
        self._walked += len(keys)
        if len(keys) < budget:
            self.filter, self._building = self._building, None
            log.info("dedupe index: filter of %d MiB ready over %d fingerprints",
                     self._filter_size >> 20, self._walked)
        else:
            self._build_from = bytes(keys[-1]) + b"\0"
        return len(keys) or 1

    def filter_statistics(self) -> dict[str, Any]:
        flt = self.filter or self._building
        return {"bytes": flt.nbytes if flt is not None else 0,
                "ready": self.filter is not None, "building": self._building is not None,
                "skipped_lookups": self.filter_skips}

    def finish_merge(self) -> None:
        while self.merging:
            self.step(len(self._order), busy=True)
