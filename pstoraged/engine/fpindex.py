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

Memory. The filter is sized by the index's entries (unique chunks), not by
the pool's capacity: 15-30 bits per entry when (re)built, rebuilt larger
once it holds 12 bits per entry (~0.5 % false "maybe"). It never takes more
than half of the configured quota (`[dedupe] index_memory`), so that a
rebuild, which keeps the old filter in use until the new one is complete,
stays within the quota. Beyond that the index goes sparse, as dm-vdo's
sparse index does: only sampled fingerprints (1 in 2**shift, by bits of the
fingerprint) are in the filter and looked up in the B-tree; the others are
looked up only in memory (the tables above and a bounded locality cache).
A sampled hit loads the fingerprints of the chunks written just after the
one it found (a "chapter" of the chunk table, in write order) into that
cache, so a run of duplicates (a copied file, a cloned VM image) dedupes
after its first sampled block; an isolated duplicate that is not sampled is
stored again. So beyond the quota the false "maybe" rate and the memory stay
at their design values, and dedupe, not speed, is what degrades.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
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

# 12 bits per entry: ~0.5 % false "maybe". A filter is (re)built with room for
# a quarter more entries than the index holds, as a power of two of bytes.
FILTER_BITS_PER_ENTRY = 12
FILTER_HEADROOM = 1.25
FILTER_MIN_BYTES = 64 << 10
FILTER_MAX_BYTES = 1 << 40  # (the quota is the real bound; tests lower this)
FILTER_BUILD_SLICE = 4096  # B-tree keys read per background step while (re)building
DEFAULT_QUOTA = 1 << 30  # [dedupe] index_memory
MAX_SHIFT = 16  # sparse mode samples at least 1 fingerprint in 65536

# the locality cache of sparse mode: chapters of the chunk table, in write order
CHAPTER = 256  # chunk ids per chapter
CACHE_CHAPTERS = 256  # chapters held (~65k fingerprints, a few MiB)


def filter_bytes(entries: int) -> int:
    """The filter size for `entries` fingerprints: a power of two within the bounds."""
    size = FILTER_MIN_BYTES
    while size * 8 < entries * FILTER_BITS_PER_ENTRY and size < FILTER_MAX_BYTES:
        size *= 2
    return size


def filter_plan(entries: int, quota: int) -> tuple[int, int]:
    """(filter bytes, sampling shift) for an index of `entries` fingerprints
    under a memory quota: the filter takes at most half of it (a rebuild holds
    two); past that, 1 in 2**shift fingerprints is sampled."""
    cap = FILTER_MIN_BYTES
    while cap * 2 <= min(quota // 2, FILTER_MAX_BYTES):
        cap *= 2
    shift = 0
    want = int(entries * FILTER_HEADROOM) + 1
    while filter_bytes(want >> shift) > cap and shift < MAX_SHIFT:
        shift += 1
    return min(filter_bytes(want >> shift), cap), shift


def sampled(fp: bytes | memoryview, shift: int) -> bool:
    """Whether sparse mode at `shift` indexes fp (bytes 16..19: the filter uses 0..15)."""
    return not shift or not (int.from_bytes(fp[16:20], "little") & ((1 << shift) - 1))


def false_maybe_rate(nbytes: int, added: int) -> float:
    """The expected false "maybe" rate of a filter of `nbytes` holding `added`
    fingerprints (the Bloom formula, K=6; the blocked layout adds a little)."""
    if not nbytes:
        return 1.0
    return float((1 - math.exp(-6 * added / (nbytes * 8))) ** 6)


class FingerprintIndex:
    name = "index merge"  # as a background service (Engine.services)

    def __init__(self, meta: MetaStore, next_chunk: int, after_step: Callable[[], None],
                 table_entries: int | None = None, quota: int = DEFAULT_QUOTA,
                 use_filter: bool = True) -> None:
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
        self._walked = 0  # keys the current or last build added
        self.filter_skips = 0  # lookups the filter answered without the B-tree
        self.quota = quota
        # sparse mode: the filter holds (and the B-tree is asked for) only the
        # fingerprints sampled at `shift`; `_building_shift` is the new filter's
        self.shift = self._building_shift = 0
        self._filter_size = 0
        self.sparse_skips = 0  # lookups not sampled, answered from memory alone
        self.near_hits = 0  # of those and the others: found in the locality cache
        self._near: dict[bytes, int] = {}  # the locality cache: fingerprint -> chunk id
        self._chapters: OrderedDict[int, list[bytes]] = OrderedDict()  # loaded, LRU order
        if FingerprintFilter is not None and use_filter:
            self._start_build()
            if not meta.txn.stat(meta.fp)["entries"]:  # nothing to walk
                self._take_built()

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
                if self.shift and self.filter is not None:
                    return self._sparse_get(fp)
                hit = self._btree_get(fp)
                if hit is None:
                    return None
                cid = U64.unpack(hit)[0]
        return cid

    def get_exact(self, fp: bytes) -> int | None:
        """get() without sparse mode's sampling: every fingerprint not in memory is
        looked up in the B-tree (the filter still answers the sampled misses).
        For callers that must not miss a chunk the pool holds (replica.py)."""
        cid = self.recent.get(fp)
        if cid is None:
            cid = self.merging.get(fp)
            if cid is None:
                hit = self._btree_get(fp)
                return None if hit is None else U64.unpack(hit)[0]
        return cid

    def _sparse_get(self, fp: bytes) -> int | None:
        """Sparse mode: the locality cache, then the B-tree for sampled fps only."""
        cid = self._near.get(fp)
        if cid is not None:
            self.near_hits += 1
        elif not sampled(fp, self.shift):
            self.sparse_skips += 1
            return None
        else:
            hit = self._btree_get(fp)
            if hit is None:
                return None
            cid = U64.unpack(hit)[0]
        # a run of duplicates goes on where this one was written: have it at hand
        self._load_chapter(cid // CHAPTER)
        if cid % CHAPTER >= CHAPTER * 3 // 4:
            self._load_chapter(cid // CHAPTER + 1)
        return cid

    def _load_chapter(self, ch: int) -> None:
        """Put the fingerprints of chunks ch*CHAPTER.. (live ones) in the locality cache."""
        chapters = self._chapters
        if ch in chapters:
            chapters.move_to_end(ch)
            return
        txn, fps = self.meta.txn, []
        cur = txn.cursor(db=self.meta.chunks)
        ok = cur.set_range(CHUNK_KEY.pack(ch * CHAPTER))
        end = CHUNK_KEY.pack((ch + 1) * CHAPTER)
        near = self._near
        while ok and bytes(cur.key()) < end:
            fp = bytes(cur.value()[-32:])
            near[fp] = CHUNK_KEY.unpack(cur.key())[0]
            fps.append(fp)
            ok = cur.next()
        chapters[ch] = fps
        if len(chapters) > CACHE_CHAPTERS:
            old_ch, old = chapters.popitem(last=False)
            lo, hi = old_ch * CHAPTER, (old_ch + 1) * CHAPTER
            for fp in old:
                held = near.get(fp)
                if held is not None and lo <= held < hi:
                    del near[fp]

    def _btree_get(self, fp: bytes) -> bytes | memoryview | None:
        """The B-tree's entry for fp; a ready filter answers most misses without it."""
        flt = self.filter
        if flt is not None and sampled(fp, self.shift) and not flt.maybe(fp):
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
        if self._near.get(fp) == cid:
            del self._near[fp]  # (the cache holds live chunks only)
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
        for flt, shift in ((self.filter, self.shift), (self._building, self._building_shift)):
            if flt is not None:  # (the freed ones too: a false "maybe" at worst)
                flt.add_many(keys if not shift else [k for k in keys if sampled(k, shift)])
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
                    and flt.added > self._filter_size * 8 // FILTER_BITS_PER_ENTRY
                    and (self._plan() != (self._filter_size, self.shift)
                         or flt.added > 2 * self._walked)):
                # full (the index grew, or freed chunks' bits fill it): its
                # false "maybe"s grow. A rebuild sized for the index as it is now.
                self._start_build()
        self.after_step()
        return done

    def _plan(self) -> tuple[int, int]:
        """(bytes, shift) of a filter for the index as it is now."""
        return filter_plan(self.meta.txn.stat(self.meta.fp)["entries"] + len(self), self.quota)

    def _start_build(self) -> None:
        size, self._building_shift = self._plan()
        self._building = FingerprintFilter(size)
        self._build_from = None
        self._walked = 0

    def _take_built(self) -> None:
        """The filter being built holds every key: it takes over."""
        self.filter, self._building = self._building, None
        self.shift, self._filter_size = self._building_shift, self.filter.nbytes
        if not self.shift:
            self._near.clear()
            self._chapters.clear()

    def _build_step(self, budget: int) -> int:
        """Add the next `budget` keys of the B-tree to the filter being built.

        Keys merged meanwhile are added by the merge itself, so when the walk
        reaches the end the filter holds every key and takes over.
        """
        cur = self.meta.txn.cursor(db=self.meta.fp)
        ok = cur.first() if self._build_from is None else cur.set_range(self._build_from)
        keys = list(islice(cur.iternext(values=False), budget)) if ok else []
        shift = self._building_shift
        sample = keys if not shift else [k for k in keys if sampled(k, shift)]
        self._building.add_many(sample)
        self._walked += len(sample)
        if len(keys) < budget:
            self._take_built()
            log.info("dedupe index: filter of %d KiB ready over %d fingerprints%s",
                     self._filter_size >> 10, self._walked,
                     f" (sparse: 1 in {1 << shift} sampled)" if shift else "")
        else:
            self._build_from = bytes(keys[-1]) + b"\0"
        return len(keys) or 1

    def filter_statistics(self) -> dict[str, Any]:
        flt, b = self.filter, self._building
        return {"bytes": (flt.nbytes if flt is not None else 0) + (b.nbytes if b is not None else 0),
                "quota": self.quota,
                "ready": flt is not None, "building": b is not None,
                "entries": flt.added if flt is not None else 0,
                "false_maybe_rate": (round(false_maybe_rate(flt.nbytes, flt.added), 6)
                                     if flt is not None else None),
                "sparse": bool(self.shift), "sample_rate": 1 / (1 << self.shift),
                "skipped_lookups": self.filter_skips, "sparse_skips": self.sparse_skips,
                "locality_hits": self.near_hits, "locality_entries": len(self._near)}

    def finish_merge(self) -> None:
        while self.merging:
            self.step(len(self._order), busy=True)
