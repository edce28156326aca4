"""Current space per volume: a read-only walk of a volume's map, and a cache of walks.

The pool's figures (logical, unique, stored) are counters the engine keeps
up to date. A volume's share of them cannot be kept that way: when another
volume dedupes against one of its chunks, or drops its reference, this
volume's share of that chunk changes, and nothing records which volumes
reference a chunk. So the per-volume figures come from walking the volume's
map entries with one chunk lookup each: O(map entries), done on committed
state in a worker thread (never on the engine thread), and cached
(UsageCache) until the map changes and the walk is older than the caller's
max_age. `pstorage volume space` and `pstorage stats` both use this walk.

Definitions, per volume (each map entry holds one reference to its chunk,
rc = the chunk's references, size = its record's bytes in segments):

* logical_bytes: data blocks the live volume reads (as the pool's logical).
* unique_bytes: Σ 4 KiB / rc over its live entries: its share of the pool's
  unique bytes. stored_bytes: Σ size / rc: its share of the pool's stored
  bytes. With the same definitions as the pool row, the live volumes' shares
  plus those held by snapshots, destroyed volumes and map entries being
  released sum to the pool's figures.
* exclusive_bytes: stored bytes of chunks that only its live data references
  (duplicates within the volume included): what trimming all of it frees.
  shared_bytes: stored bytes of the other chunks its live data references
  (other volumes, clones or its snapshots hold them too), each counted whole.
* reclaimable_bytes: stored bytes of chunks only this volume (live data and
  snapshots) references: what eradicating it frees.
* per generation (snapshots, and the live one), as `pstorage volume space`
  shows: logical bytes it reads, physical bytes only it holds (one reference
  and no other generation sees it: freed if it went) and the rest, shared.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import lmdb
import trio

from .format import (
    BLOCK_SIZE,
    CHUNK_KEY,
    CHUNK_META,
    NO_CHUNK,
    record_size,
)
from .maps import entries_by_block

# chunks with more than one reference whose references one walk counts
# exactly (~50 MiB of memory); past that, references to further ones count
# as shared and the walk says it is not exact
MAX_TRACKED = 1 << 18


@dataclass(slots=True)
class VolumeWalk:
    """What one walk of a volume's map found (see the module docstring)."""

    logical_bytes: int = 0
    unique_share: float = 0.0
    stored_share: float = 0.0
    exclusive_bytes: int = 0
    shared_bytes: int = 0
    reclaimable_bytes: int = 0
    snapshot_stored_share: float = 0.0  # entries only snapshots see
    released_stored_share: float = 0.0  # entries no generation sees (being dropped)
    exact: bool = True
    gens: dict[int, dict[str, int]] = field(default_factory=dict)

    @property
    def total_stored_share(self) -> float:
        return self.stored_share + self.snapshot_stored_share + self.released_stored_share


def walk_volume(txn: lmdb.Transaction, meta: Any, vid: int, live: int | None,
                gens: list[int]) -> VolumeWalk:
    """Walk volume `vid`'s map: `live` is its live generation (None: an
    eradicated volume whose entries are being released), `gens` the frozen
    generations its snapshots (destroyed ones too) hold."""
    alive = sorted(set(gens) | ({live} if live is not None else set()))
    w = VolumeWalk(gens={g: {"logical_bytes": 0, "unique_bytes": 0, "shared_bytes": 0}
                         for g in alive})
    tracked: dict[int, list[int]] = {}  # chunk -> [rc, size, live refs, refs] (rc > 1)
    get, chunks, ckey, unpack = txn.get, meta.chunks, CHUNK_KEY.pack, CHUNK_META.unpack
    for _lba, entries in entries_by_block(txn, meta.l2p, vid):
        newer = 1 << 62
        for g, cid in entries:
            seen = [x for x in alive if g <= x < newer]
            newer = g
            if cid == NO_CHUNK:
                continue
            raw = get(ckey(cid), db=chunks)
            if raw is None:
                continue
            rc, _s, _o, slen, *_ = unpack(raw)
            size = record_size(slen)
            in_live = live in seen
            if in_live:
                w.logical_bytes += BLOCK_SIZE
                w.unique_share += BLOCK_SIZE / rc
                w.stored_share += size / rc
            elif seen:
                w.snapshot_stored_share += size / rc
            else:
                w.released_stored_share += size / rc
            for x in seen:
                acct = w.gens[x]
                acct["logical_bytes"] += BLOCK_SIZE
                acct["unique_bytes" if len(seen) == 1 and rc == 1 else "shared_bytes"] += size
            if rc == 1:
                w.reclaimable_bytes += size
                if in_live:
                    w.exclusive_bytes += size
                continue
            t = tracked.get(cid)
            if t is None:
                if len(tracked) >= MAX_TRACKED:
                    w.exact = False
                    if in_live:
                        w.shared_bytes += size
                    continue
                t = tracked[cid] = [rc, size, 0, 0]
            t[2] += in_live
            t[3] += 1
    for rc, size, nlive, nall in tracked.values():
        if nall == rc:
            w.reclaimable_bytes += size
        if nlive == rc:
            w.exclusive_bytes += size
        elif nlive:
            w.shared_bytes += size
    return w


@dataclass(frozen=True, slots=True)
class WalkSpec:
    """What a volume's walk depends on besides its map: its generations."""

    vid: int
    live: int | None
    gens: tuple[int, ...]


class UsageCache:
    """Walks of volumes' maps, each reused until the map changed (the engine's
    `changes`) and it is older than the caller's max_age. One walk runs at
    a time, in a worker thread on a read-only transaction of committed state;
    callers queue their work on the engine thread with flush=True first so
    the walk sees it."""

    def __init__(self, meta: Any) -> None:
        self.meta = meta
        self._done: dict[int, tuple[WalkSpec, int, float, VolumeWalk]] = {}  # by volume id
        self._lock = trio.Lock()

    async def walks(self, specs: list[WalkSpec], version: int,
                    max_age: float) -> tuple[dict[int, VolumeWalk], float]:
        """The walks of `specs` by volume id, and the time of the oldest."""
        async with self._lock:
            now = time.time()
            todo = self._stale(specs, version, max_age, now)
            if todo:
                def run() -> dict[WalkSpec, VolumeWalk]:
                    out = {}
                    for s in todo:  # a transaction per volume: none stays open for long
                        with self.meta.env.begin(write=False) as txn:
                            out[s] = walk_volume(txn, self.meta, s.vid, s.live, list(s.gens))
                    return out

                for s, w in (await trio.to_thread.run_sync(run)).items():
                    self._done[s.vid] = (s, version, now, w)
            got = [self._done[s.vid] for s in specs]
        return {s.vid: w for s, _, _, w in got}, min((t for _, _, t, _ in got), default=now)

    def _stale(self, specs: list[WalkSpec], version: int, max_age: float,
               now: float) -> list[WalkSpec]:
        return [s for s in specs if (c := self._done.get(s.vid)) is None or c[0] != s
                or (c[1] != version and now - c[2] >= max_age)]

    def current(self, specs: list[WalkSpec], version: int, max_age: float) -> bool:
        """walks() would reuse what it has (callers can skip their commit)."""
        return not self._stale(specs, version, max_age, time.time())

    def last(self) -> dict[int, VolumeWalk]:
        """The latest walk of each volume, however old (for the Prometheus scrape)."""
        return {vid: w for vid, (_, _, _, w) in list(self._done.items())}

    def forget(self, keep: set[int]) -> None:
        """Drop the walks of volumes not in `keep` (gone for good)."""
        for vid in [v for v in self._done if v not in keep]:
            del self._done[vid]
