"""Level 2: snapshots, clones, restores, SafeMode and generation drops
against a model, with restarts and crashes; exact reference accounting."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections import Counter

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pstoraged.engine.cleaner import SegmentCleaner
from pstoraged.engine.engine import NO_CHUNK, Engine
from pstoraged.engine.format import BLOCK_SIZE, CHUNK_META, SEG_SEALED, U64, l2p_unpack
from pstoraged.engine.pool import open_pool
from pstoraged.engine.snapshots import Catalog, diff, parse_until, space
from pstoraged.errors import Conflict, NotFound

from .conftest import crash, make_pool

VOL_BLOCKS = 32
VOL_SIZE = VOL_BLOCKS * BLOCK_SIZE
_rng = random.Random(3)
PATTERNS = [bytes(BLOCK_SIZE), _rng.randbytes(BLOCK_SIZE), _rng.randbytes(BLOCK_SIZE),
            (b"snapshot " * 500)[:BLOCK_SIZE]]


def check_references(eng: Engine) -> None:
    """Every chunk's refcount is the number of map entries naming it; every
    entry is visible to a generation that still exists."""
    txn = eng.meta.txn
    refs: Counter[int] = Counter()
    by_vol: dict[int, list[tuple[int, int, int]]] = {}
    for k, v in txn.cursor(db=eng.meta.l2p):
        vid, lba, g = l2p_unpack(k)
        cid = U64.unpack(v)[0]
        if cid != NO_CHUNK:
            refs[cid] += 1
        by_vol.setdefault(vid, []).append((lba, g, cid))
    chunks = {}
    for k, v in txn.cursor(db=eng.meta.chunks):
        chunks[int.from_bytes(k, "big")] = CHUNK_META.unpack(v)[0]
    if not eng.reclaiming and not eng.dropping:
        assert dict(refs) == chunks
        assert eng.chunks.live_chunks == len(chunks)
    for vid, rows in by_vol.items():
        vol = eng.by_id.get(vid)
        if vol is None or eng.dropping:
            continue
        alive = sorted([*vol.frozen, vol.gen])
        newer: dict[int, int] = {}
        for lba, g, _cid in sorted(rows, key=lambda r: (r[0], -r[1])):
            upper = newer.get(lba, 1 << 40)
            assert any(g <= a < upper for a in alive), (vid, lba, g, alive)
            newer[lba] = g


class SnapshotModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="pst-snap-")
        make_pool(self.dir, size=4 << 20, segment_size=64 << 10)
        self._open()
        self.eng.create_volume("a", VOL_SIZE)
        self.model = {"a": bytearray(VOL_SIZE)}
        self.snaps: dict[tuple[str, str], bytes] = {}
        self.n = 0
        self.eng.flush()
        self._durable()

    def _open(self) -> None:
        self.eng = Engine(open_pool(self.dir))
        self.cat = Catalog(self.eng, grace_s=0)  # delete = eradicate at once
        self.cleaner = SegmentCleaner(self.eng)
        self.eng.services.append(self.cleaner)

    def _durable(self) -> None:
        self.saved = ({k: bytes(v) for k, v in self.model.items()}, dict(self.snaps))
        self.commits = self.eng.commits

    def _after(self) -> None:
        if self.eng.commits != self.commits:
            self._durable()

    def vols(self):
        return sorted(self.model)

    def busy(self, name: str) -> bool:
        """A restore or a clone's fill into it is still running (background)."""
        return self.eng.generations.copy_state(self.eng.volume(name))[0] != "ready"

    def sources(self, restores: bool = True) -> set[tuple[str, str]]:
        """Snapshots that clones are still being filled from (and volumes restored from)."""
        gens = {(src, gen) for src, gen, _, _ in self.eng.filling.values()}
        if restores:
            gens |= {(vid, job[0]) for vid, job in self.eng.restoring.items()}
        return {(v, sn) for v, sn in self.snaps
                if (self.eng.volume(v).id, self.cat.get(v, sn).gen) in gens}

    @rule(data=st.data(), block=st.integers(0, VOL_BLOCKS - 1), n=st.integers(1, 6),
          pat=st.integers(0, len(PATTERNS)))
    def write(self, data, block, n, pat):
        name = data.draw(st.sampled_from(self.vols()))
        n = min(n, VOL_BLOCKS - block)
        buf = b"".join(PATTERNS[pat] if pat < len(PATTERNS) else os.urandom(BLOCK_SIZE)
                       for _ in range(n))
        if self.busy(name):
            with pytest.raises(Conflict, match="being"):
                self.eng.write(self.eng.volume(name), block * BLOCK_SIZE, buf)
            event("write refused during a copy")
            return
        self.eng.write(self.eng.volume(name), block * BLOCK_SIZE, buf)
        self.model[name][block * BLOCK_SIZE : (block + n) * BLOCK_SIZE] = buf
        self._after()

    @rule(data=st.data(), block=st.integers(0, VOL_BLOCKS - 16))
    def write_unique(self, data, block):
        """16 new blocks: fills and seals segments, so the cleaner has work."""
        free = [v for v in self.vols() if not self.busy(v)]
        if not free:
            return
        name = data.draw(st.sampled_from(free))
        buf = os.urandom(16 * BLOCK_SIZE)
        self.eng.write(self.eng.volume(name), block * BLOCK_SIZE, buf)
        self.model[name][block * BLOCK_SIZE : (block + 16) * BLOCK_SIZE] = buf
        self._after()

    @rule(data=st.data(), block=st.integers(0, VOL_BLOCKS - 1), n=st.integers(1, 8))
    def trim(self, data, block, n):
        name = data.draw(st.sampled_from(self.vols()))
        n = min(n, VOL_BLOCKS - block)
        if self.busy(name):
            with pytest.raises(Conflict):
                self.eng.trim(self.eng.volume(name), block * BLOCK_SIZE, n * BLOCK_SIZE)
            return
        self.eng.trim(self.eng.volume(name), block * BLOCK_SIZE, n * BLOCK_SIZE)
        self.model[name][block * BLOCK_SIZE : (block + n) * BLOCK_SIZE] = bytes(n * BLOCK_SIZE)
        self._after()

    @precondition(lambda self: len(self.snaps) < 6)
    @rule(data=st.data())
    def snapshot(self, data):
        name = data.draw(st.sampled_from(self.vols()))
        self.n += 1
        if self.busy(name):  # half a restore or clone is never frozen
            with pytest.raises(Conflict):
                self.cat.create(name, f"s{self.n}")
            return
        s = self.cat.create(name, f"s{self.n}")
        self.snaps[(name, s.name)] = bytes(self.model[name])
        self._durable()

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def delete_snapshot(self, data):
        vol, snap = data.draw(st.sampled_from(sorted(self.snaps)))
        if (vol, snap) in self.sources():
            with pytest.raises(Conflict, match="being"):
                self.cat.delete(vol, snap)
            return
        self.cat.delete(vol, snap)
        del self.snaps[(vol, snap)]
        self._durable()

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def restore(self, data):
        vol, snap = data.draw(st.sampled_from(sorted(self.snaps)))
        wait = data.draw(st.booleans())
        if self.busy(vol):
            with pytest.raises(Conflict):
                self.cat.restore(vol, snap)
            return
        r = self.cat.restore(vol, snap, wait=wait)
        assert r["state"] == ("ready" if wait else "restoring") or not wait
        event(f"restore waited: {wait}")
        self.model[vol] = bytearray(self.snaps[(vol, snap)])
        self._durable()

    @precondition(lambda self: self.snaps and len(self.model) < 4)
    @rule(data=st.data())
    def clone(self, data):
        vol, snap = data.draw(st.sampled_from(sorted(self.snaps)))
        self.n += 1
        new = f"c{self.n}"
        self.cat.clone(vol, snap, new, wait=data.draw(st.booleans()))
        self.model[new] = bytearray(self.snaps[(vol, snap)])
        self._durable()

    @precondition(lambda self: len(self.model) > 1)
    @rule(data=st.data())
    def delete_volume(self, data):
        name = data.draw(st.sampled_from(self.vols()))
        if any(v == name for v, _ in self.sources(restores=False)):
            with pytest.raises(Conflict, match="still being filled"):
                self.cat.destroy_volume(name)
            return
        self.cat.destroy_volume(name)
        del self.model[name]
        self.snaps = {k: v for k, v in self.snaps.items() if k[0] != name}
        self._durable()

    @rule(steps=st.integers(1, 50))
    def background(self, steps):
        for _ in range(steps):
            if not self.eng.background.step(7, busy=True):
                break
        self._after()

    @rule(segments=st.integers(1, 4))
    def garbage_collect(self, segments):
        # the cleaner moves chunks that frozen generations still reference
        moved = self.cleaner.chunks_moved
        segs = self.eng.segs
        sealed = sorted((segs.live[x], x) for x in range(segs.count)
                        if segs.state[x] == SEG_SEALED and segs.live[x]
                        and x not in segs.pending_free)
        for _live, x in sealed[:segments]:  # the emptiest first, whatever the policy says
            self.cleaner.clean_segment(x, flush=False)
        event("the cleaner moved chunks" if self.cleaner.chunks_moved > moved else "nothing to move")
        self._after()

    @rule()
    def flush(self):
        self.eng.flush()
        self._durable()

    @rule()
    def restart(self):
        self.eng.close()
        self._open()
        self._durable()

    @rule()
    def kill9(self):
        crash(self.eng)
        self._open()
        model, snaps = self.saved
        self.model = {k: bytearray(v) for k, v in model.items()}
        self.snaps = dict(snaps)
        self._durable()

    @invariant()
    def contents(self):
        for name, m in self.model.items():
            if self.busy(name):
                with pytest.raises(Conflict):
                    self.eng.read(self.eng.volume(name), 0, VOL_SIZE)
                continue
            assert self.eng.read(self.eng.volume(name), 0, VOL_SIZE) == bytes(m), name
        for (vol, snap), m in self.snaps.items():
            view = self.cat.view(f"{vol}@{snap}")
            assert self.eng.read(view, 0, VOL_SIZE) == m, (vol, snap)

    @invariant()
    def references(self):
        check_references(self.eng)

    def teardown(self):
        try:
            while self.eng.background.step(1000, busy=False):
                pass
            self.contents()  # every restore and clone finished, with the right data
            check_references(self.eng)
            self.eng.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


TestSnapshotModel = SnapshotModel.TestCase
TestSnapshotModel.settings = settings(
    max_examples=int(os.environ.get("PSTORAGE_MODEL_EXAMPLES", "40")),
    stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------
# Focused tests

@pytest.fixture
def cat(engine):
    return Catalog(engine)


def test_snapshot_is_o1_and_readonly_view(engine, cat):
    v = engine.create_volume("v", 4 << 20)
    data = os.urandom(1 << 20)
    engine.write(v, 0, data)
    commits = engine.commits
    s = cat.create("v", "monday")
    assert engine.commits == commits + 1 and v.frozen == [s.gen] and v.gen == s.gen + 1
    engine.write(v, 0, bytes(4096) + os.urandom(4096))
    view = cat.view("v@monday")
    assert engine.read(view, 0, 1 << 20) == data and view.readonly
    with pytest.raises(NotFound):
        cat.view("v@tuesday")
    with pytest.raises(Conflict):
        cat.create("v", "monday")


def test_retention_lock_refuses_deletion_even_forced(engine, cat, clock_engine=None):
    v = engine.create_volume("v", 1 << 20)
    engine.write(v, 0, os.urandom(8192))
    now = engine.clock()
    s = cat.create("v", "keep", lock_until=parse_until("7d", now))
    assert s.to_dict()["locked"]
    with pytest.raises(Conflict, match="locked"):
        cat.delete("v", "keep")
    with pytest.raises(Conflict, match="locked"):
        cat.destroy_volume("v")
    with pytest.raises(Exception, match="extended"):
        cat.lock("v", "keep", now + 3600)  # shortening is refused
    cat.lock("v", "keep", now + 30 * 86400)
    assert cat.get("v", "keep").lock_until == now + 30 * 86400


def test_destroyed_volume_and_snapshot_recover_intact(tmp_path):
    make_pool(str(tmp_path), size=16 << 20)
    t = [1_800_000_000.0]
    eng = Engine(open_pool(str(tmp_path)), clock=lambda: t[0])
    cat = Catalog(eng, grace_s=3600)
    v = eng.create_volume("v", 1 << 20)
    data = os.urandom(1 << 19)
    eng.write(v, 0, data)
    cat.create("v", "s1")
    eng.write(v, 0, os.urandom(4096))
    cat.delete("v", "s1")
    with pytest.raises(NotFound):
        cat.view("v@s1")
    assert [s.name for s in cat.list("v", destroyed=True)] == ["s1"] and not cat.list("v")
    cat.recover("v", "s1")
    assert eng.read(cat.view("v@s1"), 0, len(data)) == data
    live = eng.read(v, 0, 1 << 20)
    cat.destroy_volume("v")
    with pytest.raises(NotFound, match="destroyed"):
        eng.volume("v")
    with pytest.raises(NotFound):
        eng.read(v, 0, 4096)
    eng.close()
    eng = Engine(open_pool(str(tmp_path)), clock=lambda: t[0])  # survives a restart
    cat = Catalog(eng, grace_s=3600)
    assert cat.eradicate_due() == 0
    cat.recover_volume("v")
    v = eng.volume("v")
    assert eng.read(v, 0, 1 << 20) == live
    assert eng.read(cat.view("v@s1"), 0, len(data)) == data
    # past the grace period, destroyed things are eradicated and their space freed
    cat.destroy_volume("v")
    t[0] += 3601
    assert cat.eradicate_due() == 1
    while eng.background.step(1000, busy=False):
        pass
    eng.flush()
    assert eng.chunks.live_chunks == 0 and "v" not in eng.volumes
    eng.close()


def test_clone_is_independent_of_its_source(engine, cat):
    v = engine.create_volume("v", 2 << 20)
    data = os.urandom(2 << 20)
    engine.write(v, 0, data)
    cat.create("v", "s")
    chunks = engine.chunks.live_chunks
    c = cat.clone("v", "s", "c")
    assert engine.chunks.live_chunks == chunks  # everything shared, nothing copied
    assert c.stats.mapped_blocks == 512
    engine.write(c, 0, bytes(4096))
    cat.delete("v", "s")
    cat.destroy_volume("v")
    cat.eradicate_due()  # grace period not over: still recoverable
    cat.grace_s = 0
    cat.eradicate_due()
    while engine.background.step(100, busy=False):
        pass
    assert engine.read(c, 4096, (2 << 20) - 4096) == data[4096:]
    check_references(engine)


def test_diff_and_space_accounting(engine, cat):
    v = engine.create_volume("v", 4 << 20)
    engine.write(v, 0, os.urandom(1 << 20))
    cat.create("v", "a")
    engine.write(v, 8192, os.urandom(8192))  # blocks 2-3
    engine.write(v, 3 << 20, os.urandom(4096))  # block 768
    engine.trim(v, 1 << 19, 4096)  # block 128
    cat.create("v", "b")
    engine.write(v, 16384, os.urandom(4096))  # block 4: live only
    engine.flush()
    txn = engine.meta.env.begin(write=False)
    try:
        _, ga, gb = cat.generations("v", "a", "b")
        d = diff(txn, engine.meta, v.id, ga, gb, tracked=True)
        assert [(r["offset"], r["length"]) for r in d["ranges"]] == [
            (8192, 8192), (1 << 19, 4096), (3 << 20, 4096)]
        d2 = diff(txn, engine.meta, v.id, gb, v.gen, tracked=True)
        assert [(r["offset"], r["length"]) for r in d2["ranges"]] == [(16384, 4096)]
        sp = space(txn, engine.meta, v.id, [ga, gb, v.gen])
    finally:
        txn.abort()
    rec = 4096 + 64  # incompressible block + chunk header
    assert sp[ga]["logical_bytes"] == 1 << 20
    assert sp[ga]["unique_bytes"] == 3 * rec  # blocks 2, 3 and 128 as they were
    assert sp[gb]["unique_bytes"] == 0  # all it sees, a or the live volume sees too
    assert sp[v.gen]["unique_bytes"] == rec  # the new block 4
    assert sp[v.gen]["logical_bytes"] == (256 - 1 + 1) * 4096


def _written_volume(engine, cat, blocks):
    v = engine.create_volume("v", blocks * BLOCK_SIZE)
    data = os.urandom(blocks * BLOCK_SIZE)
    engine.write(v, 0, data)
    cat.create("v", "s")
    engine.write(v, 0, os.urandom(BLOCK_SIZE * (blocks // 2)))  # diverge from the snapshot
    return v, data


def test_clone_fills_in_the_background_and_resumes_after_a_crash(pool_dir):
    engine = Engine(open_pool(pool_dir))
    cat = Catalog(engine, grace_s=0)
    _, data = _written_volume(engine, cat, 1200)
    c = cat.clone("v", "s", "c", wait=False)
    assert engine.generations.copy_state(c) == ("filling", 0.0, 0)
    with pytest.raises(Conflict, match="being filled"):
        engine.read(c, 0, BLOCK_SIZE)  # half a clone is never served
    with pytest.raises(Conflict, match="still being filled"):
        cat.delete("v", "s")  # its source stays until it is done
    with pytest.raises(Conflict, match="still being filled"):
        cat.destroy_volume("v")
    with pytest.raises(Conflict):
        cat.create("c", "early")
    assert engine.background.step(400, busy=True) == 400  # a slice at a time
    engine.flush()  # one slice committed ...
    engine.background.step(400, busy=True)  # ... and one lost
    state, done, shared = engine.generations.copy_state(c)
    assert state == "filling" and 0.6 < done < 0.7 and shared == 800
    crash(engine)
    engine = Engine(open_pool(pool_dir))
    cat = Catalog(engine, grace_s=0)
    c = engine.volume("c")
    assert engine.generations.copy_state(c)[:2] == ("filling", 400 / 1200)  # resumes after the commit
    while engine.background.step(1000, busy=False):
        pass
    assert engine.generations.copy_state(c) == ("ready", 1.0, 0)
    assert engine.finished_copies[c.id] == {"kind": "fill", "blocks_shared": 1200}
    assert engine.read(c, 0, len(data)) == data
    cat.delete("v", "s")
    cat.destroy_volume("v")
    while engine.background.step(1000, busy=False):
        pass
    assert engine.read(c, 0, len(data)) == data
    check_references(engine)
    engine.close()


def test_restore_runs_in_the_background_and_resumes_after_a_crash(pool_dir):
    engine = Engine(open_pool(pool_dir))
    cat = Catalog(engine)
    v, data = _written_volume(engine, cat, 1200)
    r = cat.restore("v", "s", wait=False)
    assert (r["state"], r["progress"]) == ("restoring", 0.0)
    with pytest.raises(Conflict, match="being restored"):
        engine.write(v, 0, bytes(BLOCK_SIZE))
    with pytest.raises(Conflict, match="being restored"):
        engine.resize_volume("v", 2 * v.size)
    with pytest.raises(Conflict, match="being restored"):
        cat.restore("v", "s")
    assert engine.read(cat.view("v@s"), 0, len(data)) == data  # snapshots stay readable
    engine.background.step(400, busy=True)
    engine.flush()
    engine.background.step(400, busy=True)
    crash(engine)
    engine = Engine(open_pool(pool_dir))
    cat = Catalog(engine)
    v = engine.volume("v")
    assert engine.generations.copy_state(v)[0] == "restoring"
    while engine.background.step(1000, busy=False):
        pass
    assert engine.read(v, 0, len(data)) == data
    # 600 blocks differ: counted across the crash (the count is saved with the progress)
    assert engine.finished_copies[v.id]["blocks_changed"] == 600
    assert cat.restore("v", "s")["blocks_changed"] == 0  # nothing left to change
    check_references(engine)
    engine.close()


def test_deleting_a_clone_while_it_fills_stops_the_fill(engine):
    cat = Catalog(engine, grace_s=0)
    _written_volume(engine, cat, 1200)
    chunks = engine.chunks.live_chunks
    cat.clone("v", "s", "c", wait=False)
    engine.background.step(400, busy=True)
    cat.destroy_volume("c")
    assert not engine.filling
    while engine.background.step(1000, busy=False):
        pass
    assert engine.chunks.live_chunks == chunks
    check_references(engine)


@pytest.mark.parametrize("new_size", [1 << 20, 4 << 20])
def test_clone_has_the_snapshots_size_after_the_volume_was_resized(engine, new_size):
    cat = Catalog(engine)
    v = engine.create_volume("v", 2 << 20)
    data = os.urandom(2 << 20)
    engine.write(v, 0, data)
    cat.create("v", "s")
    engine.resize_volume("v", new_size, shrink=True)
    c = cat.clone("v", "s", "c")
    assert c.size == 2 << 20 and engine.read(c, 0, 2 << 20) == data


def test_copies_do_not_hold_up_the_background_services(engine):
    cat = Catalog(engine)
    _written_volume(engine, cat, 1200)
    cat.clone("v", "s", "c", wait=False)

    class Urgent:  # e.g. the cleaner below its free-segment watermark
        steps = 0

        def wanted(self, busy):
            return self.steps < 3

        def step(self, budget, busy):
            self.steps += 1
            return 1

    svc = Urgent()
    engine.services.append(svc)
    for _ in range(3):
        engine.background.step(100, busy=True)
    assert svc.steps == 3 and engine.filling[engine.volume("c").id][2] == 0
    engine.background.step(100, busy=True)  # then the fill goes on
    assert engine.filling[engine.volume("c").id][2] > 0
