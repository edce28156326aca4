"""The free segments the log can hand out, ordered for wear leveling.

SegmentLog._allocate used to scan every segment in Python for the least (or
most) erased free one: ~0.25 s per segment at 10 TiB of 4 MiB segments,
which capped writes near 16 MiB/s. This keeps the same choice in O(log n):

- client writes get the free segment with the fewest erases, the lowest
  position among equals;
- moved (cold) chunks get the one with the most erases, the lowest position
  among equals.

Segments are taken in groups of GROUP; each group keeps the least and the
most erase count among its available segments, and two tournament trees
over the groups (one for each order) name the winning group at their root.
Taking or giving back a segment rescans its group (GROUP entries) and
replays the matches on its path to the root (log2 of the group count). The
memory is one byte per segment and a few bytes per group; building it at
open is vectorised (numpy), so opening a 10 TiB pool stays quick.

Only the segment log uses it, on its own thread. A free segment's erase
count does not change while it is here (it is bumped when the segment is
taken): `update()` is for the rare caller that changes one anyway.
"""

from __future__ import annotations

from array import array

import numpy as np

GROUP = 64  # segments per group: a rescan is ~GROUP cheap steps
_NONE_MIN = 1 << 40  # a group's least erase count when none of it is available
_NONE_MAX = -1  # and its greatest


class FreeSegments:
    def __init__(self, erase: array, avail: bytes | bytearray) -> None:
        self.erase = erase  # the log's erase counts (shared, read only here)
        self.n = n = len(erase)
        self.avail = bytearray(n)  # 1: free and ready to hand out
        self.count = 0
        groups = max(1, (n + GROUP - 1) // GROUP)
        size = 1
        while size < groups:
            size *= 2
        self.size = size  # leaves of the trees (groups, padded to a power of two)
        # per group: the least and the greatest erase count among its available segments
        self.gmin = self.gmax = array("q")
        # tmin[i], tmax[i]: the winning group below tree node i (root 1, leaves size..2size-1)
        self.tmin = self.tmax = array("i")
        self.build(avail)

    def build(self, avail: bytes | bytearray) -> None:
        """Start over with `avail` (one byte per segment, nonzero: available)."""
        n, size = self.n, self.size
        flat = np.zeros(size * GROUP, dtype=bool)
        flat[:n] = np.frombuffer(avail, dtype=np.uint8)[:n] != 0
        self.avail[:] = flat[:n].astype(np.uint8).tobytes()
        self.count = int(flat.sum())
        erase = np.zeros(size * GROUP, dtype=np.int64)
        erase[:n] = np.frombuffer(self.erase, dtype=np.uint32)[:n]
        er = erase.reshape(size, GROUP)
        av = flat.reshape(size, GROUP)
        gmin = np.where(av, er, _NONE_MIN).min(axis=1)
        gmax = np.where(av, er, _NONE_MAX).max(axis=1)
        self.gmin = array("q", gmin.tobytes())
        self.gmax = array("q", gmax.tobytes())
        tmin = np.zeros(2 * size, dtype=np.int32)
        tmax = np.zeros(2 * size, dtype=np.int32)
        tmin[size:] = tmax[size:] = np.arange(size, dtype=np.int32)
        lo = size
        while lo > 1:  # one level of matches at a time, leaves first
            left = slice(lo, 2 * lo, 2)
            right = slice(lo + 1, 2 * lo, 2)
            lmin, rmin = tmin[left], tmin[right]
            tmin[lo // 2 : lo] = np.where(gmin[lmin] <= gmin[rmin], lmin, rmin)
            lmax, rmax = tmax[left], tmax[right]
            tmax[lo // 2 : lo] = np.where(gmax[lmax] >= gmax[rmax], lmax, rmax)
            lo //= 2
        self.tmin = array("i", tmin.tobytes())
        self.tmax = array("i", tmax.tobytes())

    def add(self, s: int) -> None:
        """Segment s is free and may be handed out."""
        if not self.avail[s]:
            self.avail[s] = 1
            self.count += 1
            self._regroup(s // GROUP)

    def remove(self, s: int) -> None:
        if self.avail[s]:
            self.avail[s] = 0
            self.count -= 1
            self._regroup(s // GROUP)

    def update(self, s: int) -> None:
        """Segment s's erase count changed while it was available."""
        if self.avail[s]:
            self._regroup(s // GROUP)

    def least_worn(self) -> int:
        """The available segment with the fewest erases (lowest position among
        equals), or -1."""
        g = self.tmin[1]
        return self._first(g, self.gmin[g]) if self.gmin[g] != _NONE_MIN else -1

    def most_worn(self) -> int:
        """The available segment with the most erases (lowest position among
        equals), or -1."""
        g = self.tmax[1]
        return self._first(g, self.gmax[g]) if self.gmax[g] != _NONE_MAX else -1

    def _first(self, g: int, erase: int) -> int:
        av, er = self.avail, self.erase
        s = av.find(1, g * GROUP, min(self.n, (g + 1) * GROUP))
        while er[s] != erase:
            s = av.find(1, s + 1)
        return s

    def _regroup(self, g: int) -> None:
        lo, hi = g * GROUP, min(self.n, (g + 1) * GROUP)
        av, er = self.avail, self.erase
        mn, mx = _NONE_MIN, _NONE_MAX
        s = av.find(1, lo, hi)
        while s >= 0:
            e = er[s]
            if e < mn:
                mn = e
            if e > mx:
                mx = e
            s = av.find(1, s + 1, hi)
        gmin, gmax, tmin, tmax = self.gmin, self.gmax, self.tmin, self.tmax
        gmin[g], gmax[g] = mn, mx
        # Replay the matches on the way to the root. Once a node's winner is
        # another group and stays so, nothing above it changes.
        i = (self.size + g) >> 1
        while i:
            a, b = tmin[2 * i], tmin[2 * i + 1]
            w = a if gmin[a] <= gmin[b] else b
            if w == tmin[i] != g:
                break
            tmin[i] = w
            i >>= 1
        i = (self.size + g) >> 1
        while i:
            a, b = tmax[2 * i], tmax[2 * i + 1]
            w = a if gmax[a] >= gmax[b] else b
            if w == tmax[i] != g:
                break
            tmax[i] = w
            i >>= 1
