"""Changed-block tracking (engine/changes.py): the marked diff agrees with the
whole-map walk on random histories, visits only changed extents, and falls
back to the walk for what was written before tracking existed."""

from __future__ import annotations

import os
import random

import pytest

from pstoraged.engine.changes import CBT_KEY, EXTENT_BLOCKS, changed_blocks, changed_extents
from pstoraged.engine.engine import NO_CHUNK, Engine
from pstoraged.engine.format import BLOCK_SIZE
from pstoraged.engine.pool import open_pool
from pstoraged.engine.snapshots import Catalog, diff

from .conftest import crash, make_pool

VOL_BLOCKS = 1024  # 4 MiB


def both(eng: Engine, vid: int, lo: int, hi: int) -> tuple[list, list]:
    """(marked walk, whole-map walk) of the open transaction."""
    eng.tracker.persist()
    txn, m = eng.meta.txn, eng.meta
    marked = list(changed_blocks(txn, m.l2p, m.cbt, vid, lo, hi, tracked=True))
    full = list(changed_blocks(txn, m.l2p, m.cbt, vid, lo, hi, tracked=False))
    return marked, full


def check_all_pairs(eng: Engine, name: str) -> int:
    vol = eng.volumes[name]
    gens = [0, *vol.frozen, vol.gen]
    n = 0
    for i, lo in enumerate(gens):
        for hi in gens[i + 1:]:
            marked, full = both(eng, vol.id, lo, hi)
            assert marked == full, (lo, hi)
            n += len(full)
    return n


@pytest.mark.parametrize("seed", range(6))
def test_marked_diff_agrees_with_full_walk_on_random_histories(tmp_path, seed):
    rnd = random.Random(seed)
    d = make_pool(str(tmp_path), size=32 << 20)
    eng = Engine(open_pool(d))
    cat = Catalog(eng, grace_s=0)
    vol = eng.create_volume("v", VOL_BLOCKS * BLOCK_SIZE)
    pool_blocks = [os.urandom(BLOCK_SIZE) for _ in range(8)]  # repeated data: dedupe hits
    snaps: list[str] = []
    seen = 0
    try:
        for step in range(60):
            op = rnd.random()
            if op < 0.45:
                lba = rnd.randrange(VOL_BLOCKS)
                n = min(rnd.randint(1, 40), VOL_BLOCKS - lba)
                data = b"".join(rnd.choice(pool_blocks) if rnd.random() < 0.5 else os.urandom(BLOCK_SIZE)
                                for _ in range(n))
                eng.write(vol, lba * BLOCK_SIZE, data)
            elif op < 0.6:
                lba = rnd.randrange(VOL_BLOCKS)
                n = min(rnd.randint(1, 300), VOL_BLOCKS - lba)
                eng.trim(vol, lba * BLOCK_SIZE, n * BLOCK_SIZE)
            elif op < 0.75:
                snaps.append(cat.create("v", f"s{step}").name)
            elif op < 0.85 and snaps:
                cat.delete("v", snaps.pop(rnd.randrange(len(snaps))))  # grace 0: released now
                while eng.dropping:
                    eng.drop_step(rnd.randint(1, 200))
            elif op < 0.92 and snaps:
                cat.restore("v", rnd.choice(snaps))
            elif op < 0.96:
                eng.flush()
            else:  # a crash: the marks of the lost transaction go with its map changes
                eng.flush()
                lba = rnd.randrange(VOL_BLOCKS)
                eng.write(vol, lba * BLOCK_SIZE, os.urandom(BLOCK_SIZE))  # lost
                crash(eng)
                eng = Engine(open_pool(d))
                cat = Catalog(eng, grace_s=0)
                vol = eng.volumes["v"]
            seen += check_all_pairs(eng, "v")
        assert seen > 0
        # and the public diff (a committed read transaction) says the same
        eng.flush()
        gens = [*vol.frozen, vol.gen]
        with eng.meta.env.begin(write=False) as txn:
            for lo, hi in zip(gens, gens[1:], strict=False):
                a = diff(txn, eng.meta, vol.id, lo, hi, tracked=True)
                b = diff(txn, eng.meta, vol.id, hi, lo, tracked=False)
                assert a == b
    finally:
        eng.close()


def test_diff_blocks_are_the_blocks_that_read_differently(engine):
    cat = Catalog(engine)
    vol = engine.create_volume("v", VOL_BLOCKS * BLOCK_SIZE)
    engine.write(vol, 0, os.urandom(VOL_BLOCKS * BLOCK_SIZE // 2))
    s = cat.create("v", "a")
    for lba in (3, 300, 301, 700, 1000):
        engine.write(vol, lba * BLOCK_SIZE, os.urandom(BLOCK_SIZE))
    engine.write(vol, 5 * BLOCK_SIZE, engine.read(vol, 5 * BLOCK_SIZE, BLOCK_SIZE))  # same data
    engine.trim(vol, 10 * BLOCK_SIZE, 2 * BLOCK_SIZE)
    got = dict(engine.changed_blocks(vol, s.gen, vol.gen))
    assert sorted(got) == [3, 10, 11, 300, 301, 700, 1000]
    assert got[10] == got[11] == NO_CHUNK and got[3] != NO_CHUNK
    old = cat.view("v@a")
    for lba in range(VOL_BLOCKS):
        same = (engine.read(old, lba * BLOCK_SIZE, BLOCK_SIZE)
                == engine.read(vol, lba * BLOCK_SIZE, BLOCK_SIZE))
        assert same == (lba not in got), lba


def test_cost_follows_the_changes_not_the_volume(engine):
    cat = Catalog(engine)
    vol = engine.create_volume("v", 64 * EXTENT_BLOCKS * BLOCK_SIZE)
    block = os.urandom(BLOCK_SIZE)
    for ext in range(64):  # every extent has data
        engine.write(vol, ext * EXTENT_BLOCKS * BLOCK_SIZE, block * 4)
    a = cat.create("v", "a")
    engine.write(vol, (40 * EXTENT_BLOCKS + 7) * BLOCK_SIZE, os.urandom(BLOCK_SIZE))
    engine.tracker.persist()
    txn = engine.meta.txn
    assert list(changed_extents(txn, engine.meta.cbt, vol.id, a.gen, vol.gen)) == [40]
    assert len(list(changed_extents(txn, engine.meta.cbt, vol.id, 0, vol.gen))) == 64
    assert [lba for lba, _ in engine.changed_blocks(vol, a.gen, vol.gen)] == [40 * EXTENT_BLOCKS + 7]
    # resuming from an lba skips what comes before it
    assert list(engine.changed_blocks(vol, 0, vol.gen, first=63 * EXTENT_BLOCKS + 2)) == [
        (63 * EXTENT_BLOCKS + 2, engine.maps.lookup(vol, 63 * EXTENT_BLOCKS + 2, vol.gen)),
        (63 * EXTENT_BLOCKS + 3, engine.maps.lookup(vol, 63 * EXTENT_BLOCKS + 3, vol.gen))]


def test_clone_fill_is_marked_and_deleted_volumes_drop_their_records(engine):
    cat = Catalog(engine, grace_s=0)
    vol = engine.create_volume("v", VOL_BLOCKS * BLOCK_SIZE)
    engine.write(vol, 0, os.urandom(16 * BLOCK_SIZE))
    engine.write(vol, 900 * BLOCK_SIZE, os.urandom(BLOCK_SIZE))
    cat.create("v", "a")
    clone = cat.clone("v", "a", "c")
    assert [lba for lba, _ in engine.changed_blocks(clone, 0, clone.gen)] == [*range(16), 900]
    engine.flush()

    def records(vid):
        cur = engine.meta.txn.cursor(db=engine.meta.cbt)
        return [k for k in cur.iternext(values=False) if CBT_KEY.unpack(k)[0] == vid]

    assert records(clone.id)
    cat.destroy_volume("c")
    while engine.reclaiming:
        engine.reclaim_step(3)
    assert records(clone.id) == [] and records(vol.id)


def test_volumes_from_before_tracking_fall_back_to_the_whole_map(tmp_path):
    d = make_pool(str(tmp_path))
    eng = Engine(open_pool(d))
    vol = eng.create_volume("v", VOL_BLOCKS * BLOCK_SIZE)
    eng.write(vol, 0, os.urandom(8 * BLOCK_SIZE))
    Catalog(eng).create("v", "a")
    eng.write(vol, 600 * BLOCK_SIZE, os.urandom(BLOCK_SIZE))
    eng.flush()
    # what a version-4 store holds: maps, no marks
    eng.meta.txn.drop(eng.meta.cbt, delete=False)
    eng.meta.delete("cbt_since")
    eng.close()
    eng = Engine(open_pool(d))
    try:
        vol = eng.volumes["v"]
        a = vol.frozen[0]
        assert eng.tracker.since == {vol.id: vol.gen}
        assert not eng.tracker.tracked(vol.id, a)  # the live generation's old writes are unmarked
        assert [lba for lba, _ in eng.changed_blocks(vol, a, vol.gen)] == [600]
        assert [lba for lba, _ in eng.changed_blocks(vol, 0, a)] == list(range(8))
        b = Catalog(eng).create("v", "b").gen
        eng.write(vol, 601 * BLOCK_SIZE, os.urandom(BLOCK_SIZE))
        assert eng.tracker.tracked(vol.id, b)
        assert [lba for lba, _ in eng.changed_blocks(vol, b, vol.gen)] == [601]
    finally:
        eng.close()
