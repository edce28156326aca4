"""The segment allocator (freespace.py, SegmentLog._allocate): the same choices
as a full scan of the segments, in O(log n).

The reference below is the scan the allocator replaced: client writes get the
least-erased free segment, moved chunks the most-erased, ties by position,
segments still being discarded never.
"""

from __future__ import annotations

import random
from array import array

import pytest

from pstoraged.engine.format import SEG_FREE
from pstoraged.engine.freespace import GROUP, FreeSegments
from pstoraged.engine.segments import RELOCATED, USER
from pstoraged.errors import PoolFull


def scan(avail: bytearray | list[int], erase: array, most: bool) -> int:
    best, best_erase = -1, None
    for s, a in enumerate(avail):
        if not a:
            continue
        e = erase[s]
        if best_erase is None or (e > best_erase if most else e < best_erase):
            best, best_erase = s, e
    return best


@pytest.mark.parametrize("n", [1, 7, GROUP, GROUP + 1, 5 * GROUP - 3, 1000])
def test_free_segments_match_a_full_scan(n):
    rng = random.Random(n)
    erase = array("I", [rng.randrange(6) for _ in range(n)])
    avail = [rng.randrange(2) for _ in range(n)]
    fs = FreeSegments(erase, bytes(avail))
    assert fs.count == sum(avail)
    for _ in range(3000):
        assert fs.least_worn() == scan(avail, erase, most=False)
        assert fs.most_worn() == scan(avail, erase, most=True)
        s = rng.randrange(n)
        op = rng.randrange(4)
        if op == 0:
            fs.add(s)
            avail[s] = 1
        elif op == 1:
            fs.remove(s)
            avail[s] = 0
        elif op == 2 and not avail[s]:  # taken segments get worn, then come back
            erase[s] += rng.randrange(3)
        elif op == 3:
            erase[s] = rng.randrange(8)
            fs.update(s)
        assert fs.count == sum(avail)


def test_allocation_follows_wear_leveling_reserve_and_discards(engine):
    segs = engine.segs
    rng = random.Random(5)
    for s in range(segs.count):
        if segs.state_of(s) == SEG_FREE:
            segs.set_erase_count(s, rng.randrange(4))
    for stream in (USER, RELOCATED):
        if segs.open_segment(stream) >= 0:
            segs._seal(segs.open_segment(stream))
    # a free segment still being discarded is never handed out
    held = scan(bytearray(int(segs.state_of(s) == SEG_FREE) for s in range(segs.count)),
                segs.erase, most=False)
    segs.discarding.add(held)
    segs._recount()
    taken = []
    while True:
        avail = bytearray(int(segs.state_of(s) == SEG_FREE and s not in segs.discarding)
                          for s in range(segs.count))
        stream = rng.choice((USER, RELOCATED))
        if sum(avail) <= segs.reserve and stream == USER:
            with pytest.raises(PoolFull):  # client writes leave the reserve alone
                segs._allocate(USER)
            stream = RELOCATED
        if not sum(avail):
            break
        want = scan(avail, segs.erase, most=stream == RELOCATED)
        got = segs._allocate(stream, reserve_ok=stream == RELOCATED)
        assert got == want and got != held
        taken.append(got)
        segs._seal(got)
    assert segs.free_count() == 1 and segs.sealed_count() == segs.count - 1
    segs.discarding.discard(held)  # (no discard was queued: nothing to wait for)
