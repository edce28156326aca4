"""Level 2: the segment cleaner (garbage collection and static wear leveling).

Tiny geometry: 64 KiB segments (14 incompressible 4 KiB records each) in
pools of a few MiB, so that cleaning happens after a few hundred writes.
Every test that moves data ends with `check_consistency`, which recomputes
refcounts and per-segment live bytes from the tables and compares them with
the engine's accounting.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pstoraged.engine import cleaner as cleaner_mod
from pstoraged.engine.cleaner import SegmentCleaner
from pstoraged.engine.engine import Engine, Volume
from pstoraged.engine.format import (
    BLOCK_SIZE,
    CHUNK_KEY,
    CHUNK_META,
    SEG_FREE,
    SEG_SEALED,
    U64,
    ChunkHeader,
    align_up,
    record_size,
)
from pstoraged.engine.pool import open_pool
from pstoraged.errors import CorruptData, InvalidArgument, PoolFull

from .conftest import SMALL_SEGMENT, crash, make_pool

REC = record_size(BLOCK_SIZE)  # an incompressible block's record: 4160 bytes
PER_SEG = (SMALL_SEGMENT - 4096) // REC  # 14 records in a 64 KiB segment


def pool_of(directory: str, segments: int) -> str:
    return make_pool(directory, size=(1 << 20) + segments * SMALL_SEGMENT)


def open_engine(directory: str, **kw) -> tuple[Engine, SegmentCleaner]:
    eng = Engine(open_pool(directory), **kw)
    c = SegmentCleaner(eng)
    eng.services.append(c)
    return eng, c


def chunk_home(eng: Engine, cid: int) -> tuple[int, int]:
    _, s, off, *_ = CHUNK_META.unpack(eng.meta.txn.get(CHUNK_KEY.pack(cid), db=eng.meta.chunks))
    return s, off


def block_home(eng: Engine, vol: Volume, lba: int) -> tuple[int, int]:
    return chunk_home(eng, eng._lookup(vol, lba, vol.gen))


def check_consistency(eng: Engine, read_all: bool = True) -> None:
    """Recompute the accounting from the tables and compare with the engine's."""
    segs, txn = eng.segs, eng.meta.txn
    refs: Counter[int] = Counter()
    for _k, v in txn.cursor(db=eng.meta.l2p):
        cid = U64.unpack(v)[0]
        if cid:
            refs[cid] += 1
    live: Counter[int] = Counter()
    homes: set[tuple[int, int]] = set()
    chunks = stored = 0
    for k, raw in txn.cursor(db=eng.meta.chunks):
        (cid,) = CHUNK_KEY.unpack(k)
        rc, s, off, slen, *_ = CHUNK_META.unpack(raw)
        assert rc == refs[cid], f"chunk {cid}: refcount {rc}, {refs[cid]} map entries"
        assert segs.state[s] != SEG_FREE, f"chunk {cid} lives in free segment {s}"
        assert (s, off) not in homes, f"two chunks at {s}:{off}"
        homes.add((s, off))
        live[s] += record_size(slen)
        chunks += 1
        stored += record_size(slen)
        if read_all:
            eng.chunks.read_chunk(cid)  # header, lengths, fingerprint and payload CRC
    assert set(refs) <= {CHUNK_KEY.unpack(k)[0] for k, _ in txn.cursor(db=eng.meta.chunks)}
    for s in range(segs.count):
        assert segs.live[s] == live[s], f"segment {s}: live {segs.live[s]}, records {live[s]}"
    assert chunks == eng.chunks.live_chunks
    assert stored == eng.chunks.live_stored


def fill_unique(eng: Engine, vol: Volume, model: bytearray, blocks: range,
                rng: random.Random, cleaner: SegmentCleaner | None = None) -> None:
    for b in blocks:
        data = rng.randbytes(BLOCK_SIZE)
        eng.write(vol, b * BLOCK_SIZE, data)
        model[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE] = data
        if cleaner is not None:
            eng.background.step(128, busy=True)


def random_overwrites(eng: Engine, vol: Volume, model: bytearray, count: int,
                      rng: random.Random, background: bool, flush_every: int = 64) -> None:
    blocks = len(model) // BLOCK_SIZE
    for i in range(count):
        b = rng.randrange(blocks)
        data = rng.randbytes(BLOCK_SIZE)
        eng.write(vol, b * BLOCK_SIZE, data)
        model[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE] = data
        if i % flush_every == 0:
            eng.flush()
        if background:  # what the data plane does between client batches
            eng.background.step(128, busy=True)


# ---------------------------------------------------------------------------
# Sustained overwrites


@pytest.mark.parametrize("cleaner", [False, True], ids=["without-cleaner", "with-cleaner"])
def test_random_overwrites_need_the_cleaner(tmp_path, cleaner):
    """A volume over half the pool, overwritten at random for 10x the pool size."""
    segments = 64
    d = pool_of(str(tmp_path), segments)
    eng = Engine(open_pool(d))
    c = SegmentCleaner(eng)
    if cleaner:
        eng.services.append(c)
    blocks = segments * PER_SEG // 2 + 24  # ~55% of what the records can fill
    vol = eng.create_volume("v", blocks * BLOCK_SIZE)
    model = bytearray(blocks * BLOCK_SIZE)
    rng = random.Random(7)
    fill_unique(eng, vol, model, range(blocks), rng)
    total = 10 * segments * SMALL_SEGMENT // BLOCK_SIZE
    if not cleaner:
        with pytest.raises(PoolFull):
            random_overwrites(eng, vol, model, total, rng, background=True)
        eng.close()
        return
    random_overwrites(eng, vol, model, total, rng, background=True)
    assert eng.read(vol, 0, len(model)) == bytes(model)
    s = c.statistics()
    assert s.segments_cleaned > total // (2 * PER_SEG)  # most written segments were cleaned
    assert s.chunks_moved and s.bytes_moved and s.passes
    assert s.user_bytes == (blocks + total) * REC
    assert s.write_amplification is not None and 1.05 < s.write_amplification < 3
    assert s.write_amplification == pytest.approx((s.user_bytes + s.bytes_moved) / s.user_bytes)
    assert s.free_segments >= eng.segs.reserve and not s.corrupt_records
    check_consistency(eng)
    # the counters are persisted with the work: a restart keeps them
    eng.close()
    eng, c2 = open_engine(d)
    s2 = c2.statistics()
    assert (s2.segments_cleaned, s2.bytes_moved, s2.chunks_moved, s2.user_bytes, s2.passes) == (
        s.segments_cleaned, s.bytes_moved, s.chunks_moved, s.user_bytes, s.passes)
    assert eng.read(eng.volume("v"), 0, len(model)) == bytes(model)
    eng.close()


def test_user_bytes_outlive_a_deleted_volume(engine):
    c = SegmentCleaner(engine)
    assert c.statistics().write_amplification is None  # no user data yet
    a = engine.create_volume("a", 1 << 20)
    engine.write(a, 0, os.urandom(64 * BLOCK_SIZE))
    assert c.statistics().user_bytes == 64 * REC
    c.run_pass()  # nothing to clean, but the counters are saved
    engine.delete_volume("a")
    assert c.statistics().user_bytes == 64 * REC
    assert c.statistics().write_amplification == 1.0


# ---------------------------------------------------------------------------
# Crashes


def fragmented_pool(directory: str, segments: int = 48):
    """A pool whose sealed segments are about half dead; everything flushed."""
    eng, c = open_engine(pool_of(directory, segments))
    blocks = segments * PER_SEG // 2
    vol = eng.create_volume("v", blocks * BLOCK_SIZE)
    model = bytearray(blocks * BLOCK_SIZE)
    rng = random.Random(3)
    fill_unique(eng, vol, model, range(blocks), rng)
    random_overwrites(eng, vol, model, blocks // 2, rng, background=False)
    eng.flush()
    return eng, c, vol, model


def victim_with_live_data(c: SegmentCleaner) -> tuple[int, int]:
    """A sealed, cleanable segment with 8+ live records, and a record count for
    `max_records` that surely moves some of them and leaves some."""
    segs = c.engine.segs
    fits = [s for s in range(segs.count)
            if segs.state[s] == SEG_SEALED and 8 * REC <= segs.live[s] <= c.max_live]
    assert fits
    s = fits[0]
    return s, PER_SEG - segs.live[s] // REC + 1


@pytest.mark.parametrize("point", ["mid-segment", "moves-before-commit", "after-commit",
                                   "mid-segment-with-client-writes"])
def test_crash_during_cleaning(tmp_path, point):
    d = str(tmp_path)
    eng, c, vol, model = fragmented_pool(d)
    durable = bytes(model)
    s, records = victim_with_live_data(c)
    live0, seq0 = eng.segs.live[s], eng.segs.seq[s]
    if point.startswith("mid-segment"):
        r = c.clean_segment(s, flush=False, max_records=records)
        assert not r.complete and r.chunks_moved > 0 and c.statistics().victim == s
        if point.endswith("client-writes"):  # unflushed: may be lost
            eng.write(vol, 0, os.urandom(8 * BLOCK_SIZE))
            eng.background.step(128, busy=False)  # resumes the walk, still no commit
    else:
        r = c.clean_segment(s, flush=point == "after-commit")
        assert r.complete and eng.segs.live[s] == 0
    commits = eng.commits
    crash(eng)
    eng, c = open_engine(d)
    assert eng.read(eng.volume("v"), 0, len(durable)) == durable
    check_consistency(eng)
    st = c.statistics()
    if point == "after-commit":
        assert commits and st.segments_cleaned == 1 and st.chunks_moved == r.chunks_moved
        # recorded dead before the crash: freed by the first commit after the open
        assert eng.segs.live[s] == 0 and eng.segs.state[s] == SEG_FREE
    else:  # the moves were never committed: the victim is as it was
        assert st.segments_cleaned == 0 and st.chunks_moved == 0
        assert (eng.segs.live[s], eng.segs.seq[s]) == (live0, seq0)
        r = c.clean_segment(s)  # and can be cleaned again
        assert r.complete and eng.segs.state[s] == SEG_FREE
        check_consistency(eng)
    assert eng.read(eng.volume("v"), 0, len(durable)) == durable
    eng.close()


# ---------------------------------------------------------------------------
# A full pool


def test_full_pool_recovers_through_the_cleaner(tmp_path):
    segments = 32
    d = pool_of(str(tmp_path), segments)
    eng = Engine(open_pool(d))
    c = SegmentCleaner(eng)
    blocks = segments * PER_SEG
    vol = eng.create_volume("v", blocks * BLOCK_SIZE)
    model = bytearray(blocks * BLOCK_SIZE)
    rng = random.Random(5)
    written = 0
    with pytest.raises(PoolFull):
        for b in range(blocks):
            data = rng.randbytes(BLOCK_SIZE)
            eng.write(vol, b * BLOCK_SIZE, data)
            model[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE] = data
            written += 1
    eng.flush()
    assert eng.segs.free_count() <= eng.segs.reserve
    # trim every other block: each segment half dead, but none wholly
    for b in range(0, written, 2):
        eng.trim(vol, b * BLOCK_SIZE, BLOCK_SIZE)
        model[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE] = bytes(BLOCK_SIZE)
    eng.flush()
    with pytest.raises(PoolFull):  # trimming alone gives no segment back
        eng.write(vol, 0, rng.randbytes(BLOCK_SIZE))
    eng.flush()
    assert c.wanted(busy=True) and c.statistics().mode == "emergency"
    eng.services.append(c)
    steps = 0
    while eng.segs.free_count() <= eng.segs.reserve:
        assert eng.background.step(128, busy=True), "the cleaner made no progress"
        steps += 1
        lba = rng.randrange(written)  # reads work throughout
        assert eng.read(vol, lba * BLOCK_SIZE, BLOCK_SIZE) == model[
            lba * BLOCK_SIZE : (lba + 1) * BLOCK_SIZE]
    assert steps < 50
    # client writes work again, with the cleaner keeping up
    for b in range(0, written // 2, 2):
        data = rng.randbytes(BLOCK_SIZE)
        eng.write(vol, b * BLOCK_SIZE, data)
        model[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE] = data
        eng.background.step(128, busy=True)
    eng.flush()
    assert eng.read(vol, 0, len(model)) == bytes(model)
    assert c.statistics().segments_cleaned >= segments // 2
    check_consistency(eng)
    eng.close()


def test_nothing_to_do_is_cheap_and_quiet(engine):
    c = SegmentCleaner(engine)
    engine.services.append(c)
    assert not c.wanted(False) and not c.wanted(True)
    assert engine.background.step(2048, busy=False) == 0
    assert c.step(2048, busy=False) == 0
    assert c.run_pass() == 0
    assert not engine.background.has_work()
    with pytest.raises(InvalidArgument):
        c.clean_segment(0)  # free, not sealed
    with pytest.raises(InvalidArgument):
        c.clean_segment(10**6)


def test_idle_compaction_of_a_fragmented_pool(tmp_path):
    """Idle and over a quarter dead: cleaned even with plenty of free segments."""
    eng, c = open_engine(pool_of(str(tmp_path), 64))
    vol = eng.create_volume("v", 256 * BLOCK_SIZE)
    model = bytearray(256 * BLOCK_SIZE)
    rng = random.Random(11)
    fill_unique(eng, vol, model, range(256), rng)
    for b in range(0, 256, 2):  # half of everything dies
        eng.trim(vol, b * BLOCK_SIZE, BLOCK_SIZE)
        model[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE] = bytes(BLOCK_SIZE)
    eng.flush()
    free0 = eng.segs.free_count()
    assert free0 > c.high and c.dead_fraction() > 0.4
    assert not c.wanted(busy=True)  # not needed: left alone while clients are busy
    assert eng.background.step(128, busy=True) == 0
    assert c.wanted(busy=False) and c.statistics().mode == "fragmentation"
    cleaned = c.run_pass()
    assert cleaned >= 8 and c.dead_fraction() <= cleaner_mod.DEAD_FRACTION_IDLE
    assert eng.segs.free_count() >= free0 + cleaned // 3
    assert not c.wanted(False) and c.statistics().mode is None
    assert eng.read(vol, 0, len(model)) == bytes(model)
    check_consistency(eng)
    eng.close()


def test_dead_copy_of_a_live_chunk_in_the_same_segment_stays_behind(engine, monkeypatch):
    """A chunk rewritten while its segment was open (recompression) has two
    records there; only the one the chunk index points at is moved. (Rewrites
    now go to the relocated stream's segment; pools written before streams
    existed have this layout, reproduced here by rewriting into the user stream.)"""
    from pstoraged.engine import chunks as engine_module
    from pstoraged.engine import codecs
    from pstoraged.engine.segments import USER

    monkeypatch.setattr(engine_module, "RELOCATED", USER)

    c = SegmentCleaner(engine)
    vol = engine.create_volume("v", 64 * BLOCK_SIZE, "lz4")
    text = (b"recompress me, I am quite redundant. " * 120)[:BLOCK_SIZE]
    engine.write(vol, 0, text)
    cid = engine._lookup(vol, 0, vol.gen)
    s, off = chunk_home(engine, cid)
    lz4_len = engine.chunks.chunk_codec(cid)[1]
    _, zpayload = codecs.Compressor().compress(codecs.IDS["zstd"], text)
    assert len(zpayload) != lz4_len
    engine.chunks.rewrite_chunk(cid, codecs.IDS["zstd"], zpayload)
    assert chunk_home(engine, cid)[0] == s and chunk_home(engine, cid)[1] > off
    rest = os.urandom(20 * BLOCK_SIZE)
    engine.write(vol, BLOCK_SIZE, rest)  # seals s
    engine.trim(vol, 5 * BLOCK_SIZE, 4 * BLOCK_SIZE)
    engine.flush()
    assert engine.segs.state[s] == SEG_SEALED
    live = sum(1 for b in range(21) if engine._lookup(vol, b, vol.gen)
               and block_home(engine, vol, b)[0] == s)
    r = c.clean_segment(s)
    assert r.complete and r.error is None and r.chunks_moved == live
    assert engine.segs.state[s] == SEG_FREE
    assert engine.chunks.chunk_codec(cid) == (codecs.IDS["zstd"], len(zpayload))
    assert engine.read(vol, 0, BLOCK_SIZE) == text
    assert engine.read(vol, BLOCK_SIZE, 4 * BLOCK_SIZE) == rest[: 4 * BLOCK_SIZE]
    check_consistency(engine)


def test_running_out_of_room_mid_segment_keeps_the_moves(tmp_path, caplog):
    d = str(tmp_path)
    eng, c, vol, model = fragmented_pool(d)
    s, _ = victim_with_live_data(c)
    real = eng.chunks.rewrite_chunk
    calls = 0

    def fails_third_time(*a, **k):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise PoolFull("the pool is full")
        return real(*a, **k)

    eng.chunks.rewrite_chunk = fails_third_time  # type: ignore[method-assign]
    r = c.clean_segment(s, flush=False)
    assert not r.complete and r.error == "pool full" and r.chunks_moved == 2
    assert s not in c.statistics().skipped_segments  # not a fault of the segment
    assert [m for m in caplog.messages if "no room" in m]
    check_consistency(eng)
    del eng.chunks.rewrite_chunk
    assert c.clean_segment(s).complete  # later, with room, it finishes
    assert eng.read(vol, 0, len(model)) == bytes(model)
    check_consistency(eng)
    eng.close()


class FailingReads:
    """A Backing whose reads fail (EIO), everything else passed through."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def pread(self, offset, length):
        from pstoraged.errors import DeviceIOError

        raise DeviceIOError(f"{self.inner.path}: read at {offset} failed: Input/output error")


def test_read_error_leaves_the_segment(tmp_path, caplog):
    caplog.allowed_errors = True
    eng, c, vol, model = fragmented_pool(str(tmp_path))
    s, _ = victim_with_live_data(c)
    live = eng.segs.live[s]
    good = eng.segs.backing
    eng.segs.backing = FailingReads(good)
    r = c.clean_segment(s)
    eng.segs.backing = good
    assert not r.complete and "read failed" in (r.error or "")
    assert eng.segs.live[s] == live and c.statistics().skipped_segments == (s,)
    assert eng.failed is None and eng.chunks.checksum_errors == 0
    assert eng.read(vol, 0, len(model)) == bytes(model)
    eng.close()


# ---------------------------------------------------------------------------
# Victim selection


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_cost_benefit_prefers_old_cold_segments_over_young_empty_ones(tmp_path):
    clock = FakeClock(time.time())
    eng, c = open_engine(pool_of(str(tmp_path), 64), clock=clock)
    vol = eng.create_volume("v", 5 * PER_SEG * BLOCK_SIZE)
    model = bytearray(5 * PER_SEG * BLOCK_SIZE)
    fill_unique(eng, vol, model, range(5 * PER_SEG), random.Random(1))
    eng.flush()
    segs = eng.segs
    home: dict[int, list[int]] = {}
    for b in range(5 * PER_SEG):
        home.setdefault(block_home(eng, vol, b)[0], []).append(b)
    full = [s for s, bs in home.items() if len(bs) == PER_SEG and segs.state[s] == SEG_SEALED]
    old, young, other, untouched = full[:4]
    for s, dead in ((old, 5), (young, 10), (other, 2)):  # u ~ 0.61, 0.27, 0.81
        for b in home[s][:dead]:
            eng.trim(vol, b * BLOCK_SIZE, BLOCK_SIZE)
    now_ns = int(clock.t * 1e9)
    for s in range(segs.count):
        segs.sealed_ns[s] = now_ns - 60 * 10**9  # everything sealed a minute ago ...
    segs.sealed_ns[old] = now_ns - 10 * 3600 * 10**9  # ... but this ten hours ago
    assert c.choose_victim("space") == (old, "gc")
    assert c.choose_victim("emergency") == (young, "gc")  # greedy when space is short
    segs.sealed_ns[old] = segs.sealed_ns[young]  # same age: the emptiest wins
    assert c.choose_victim("space") == (young, "gc")
    clock.t += 3600  # an hour later the ages are close: still the emptiest
    assert c.choose_victim("space") == (young, "gc")
    # a segment over the utilization ceiling is never a victim
    for s in (old, young, other):
        assert c.clean_segment(s).complete
    assert segs.live[untouched] > c.max_live
    assert c.choose_victim("space") is None and c.choose_victim("emergency") is None
    check_consistency(eng)
    eng.close()


# ---------------------------------------------------------------------------
# Corruption


def corrupt_at(eng: Engine, offset: int, data: bytes) -> None:
    with open(eng.pool.backing.path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("what", ["live-payload", "dead-header", "gap-garbage"])
def test_corrupt_record_stops_the_cleaner_for_that_segment(tmp_path, caplog, what):
    caplog.allowed_errors = True
    d = pool_of(str(tmp_path), 64)
    eng, c = open_engine(d)
    blocks = 3 * PER_SEG
    vol = eng.create_volume("v", blocks * BLOCK_SIZE)
    model = bytearray(blocks * BLOCK_SIZE)
    rng = random.Random(2)
    fill_unique(eng, vol, model, range(7), rng)
    # a zero gap in the middle of the segment, as every flush left before the
    # open segment's tail went into the metadata (segments written by then)
    eng.segs._write_out(0, full=True)  # (stream 0: USER)
    eng.flush()
    fill_unique(eng, vol, model, range(7, blocks), rng)
    for b in (0, 1):  # dead records before the damage
        eng.trim(vol, b * BLOCK_SIZE, BLOCK_SIZE)
        model[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE] = bytes(BLOCK_SIZE)
    eng.flush()
    s, first = block_home(eng, vol, 7)[0], block_home(eng, vol, 2)
    assert first[0] == s and eng.segs.state[s] == SEG_SEALED
    base = eng.segs.offset(s)
    if what == "live-payload":  # the first live record
        corrupt_at(eng, base + first[1] + ChunkHeader.SIZE + 100, b"\x00\xff\x00")
    elif what == "dead-header":  # the walk cannot know where the next record starts
        corrupt_at(eng, base + 4096 + 20, b"\xff\xff")
    else:  # non-zero bytes where the padding of the flush should be
        gap = block_home(eng, vol, 6)[1] + REC
        assert gap % 4096 and block_home(eng, vol, 7)[1] == align_up(gap)
        corrupt_at(eng, base + gap + 16, b"garbage!")
    homes = {b: block_home(eng, vol, b) for b in range(2, blocks)}
    errors0 = eng.chunks.checksum_errors
    r = c.clean_segment(s)
    assert not r.complete and r.error
    assert r.chunks_moved == (5 if what == "gap-garbage" else 0)  # only what came before
    st = c.statistics()
    assert st.skipped_segments == (s,) and st.corrupt_records == 1
    assert eng.chunks.checksum_errors == errors0 + 1
    assert eng.segs.state[s] == SEG_SEALED and eng.segs.live[s] > 0
    assert any("segment cleaner" in m and f"segment {s}:" in m for m in caplog.messages)
    unreadable = set()
    if what == "live-payload":
        # not moved: a move would have given the damaged payload a fresh, valid CRC
        assert block_home(eng, vol, 2) == homes[2]
        unreadable = {2}
    for b in range(blocks):
        if b in unreadable:
            with pytest.raises(CorruptData):
                eng.read(vol, b * BLOCK_SIZE, BLOCK_SIZE)
        else:
            assert eng.read(vol, b * BLOCK_SIZE, BLOCK_SIZE) == model[
                b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE]
    for b, home in homes.items():  # nothing after the damage moved
        if b >= 7 or what != "gap-garbage":
            assert block_home(eng, vol, b) == home
    # the segment is never chosen again, not even after a restart
    for _ in range(3):
        assert c.choose_victim("emergency") != (s, "gc")
        c.step(2048, busy=False)
    assert c.statistics().corrupt_records == 1
    eng.close()
    eng, c = open_engine(d)
    assert c.statistics().skipped_segments == (s,)
    assert c.choose_victim("emergency") != (s, "gc")
    eng.close()


# ---------------------------------------------------------------------------
# Static wear leveling


def test_static_wear_leveling_moves_cold_data_when_idle(tmp_path):
    eng, c = open_engine(pool_of(str(tmp_path), 48))
    segs = eng.segs
    vol = eng.create_volume("v", 6 * PER_SEG * BLOCK_SIZE)
    model = bytearray(6 * PER_SEG * BLOCK_SIZE)
    fill_unique(eng, vol, model, range(6 * PER_SEG), random.Random(9))
    eng.flush()
    cold = block_home(eng, vol, 0)[0]  # the first segment written: cold data
    assert segs.state[cold] == SEG_SEALED
    assert c.statistics().mode is None  # nothing to do: no spread, no dead space
    # the rest of the pool has been through many more program/erase cycles
    for s in range(segs.count):
        segs.set_erase_count(s, 40 if s != cold else 3)
    eng.flush()
    st = c.statistics()
    assert st.wear_spread == 37 and st.mode == "wear"
    assert not c.wanted(busy=True)
    assert c.step(128, busy=True) == 0 and eng.background.step(128, busy=True) == 0
    assert segs.live[cold] > 0  # not while clients are busy
    assert c.wanted(busy=False)
    for _ in range(100):
        if not eng.background.step(2048, busy=False):
            break
    else:
        pytest.fail("wear leveling does not stop")
    eng.flush()
    st = c.statistics()
    assert st.wear_segments_cleaned == 1 and st.wear_chunks_moved == PER_SEG
    assert st.segments_cleaned == 0 and st.mode is None
    assert segs.state[cold] == SEG_FREE
    # the least-worn segment is the next one the allocator hands out (once discarded)
    segs.wait_discards()
    eng.write(vol, 0, os.urandom(2 * PER_SEG * BLOCK_SIZE))
    model[: 2 * PER_SEG * BLOCK_SIZE] = eng.read(vol, 0, 2 * PER_SEG * BLOCK_SIZE)
    assert segs.state[cold] != SEG_FREE and segs.erase[cold] == 4
    assert eng.read(vol, 0, len(model)) == bytes(model)
    check_consistency(eng)
    eng.close()


# ---------------------------------------------------------------------------
# The cleaner against a model


VOL_BLOCKS = 64  # up to ~4.6 segments of unique data in a 12-segment pool
MODEL_SEGMENTS = 12
PATTERNS = [random.Random(i).randbytes(BLOCK_SIZE) for i in range(3)] + [
    (b"compressible block " * 300)[:BLOCK_SIZE]]


class CleanerModel(RuleBasedStateMachine):
    """Writes, trims, flushes, cleaner steps, restarts and crashes on a 12-segment pool.

    Every write is preceded by a busy background step, as in the daemon, so the
    cleaner has to keep the pool writable; the other rules start, interrupt
    and resume cleaning at any point.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="pst-cleaner-")
        pool_of(self.dir, MODEL_SEGMENTS)
        self.eng, self.cleaner = open_engine(self.dir)
        self.vol = self.eng.create_volume("v", VOL_BLOCKS * BLOCK_SIZE)
        self.model = bytearray(VOL_BLOCKS * BLOCK_SIZE)
        self.rng = random.Random(0)
        # start fragmented and near the low watermark: every rule meets a busy cleaner
        fill_unique(self.eng, self.vol, self.model, range(VOL_BLOCKS), self.rng, self.cleaner)
        random_overwrites(self.eng, self.vol, self.model, VOL_BLOCKS, self.rng,
                          background=True, flush_every=16)
        self.eng.flush()
        self._track_commit()

    def _track_commit(self) -> None:
        self.durable = bytes(self.model)
        self.commits = self.eng.commits

    def _after(self) -> None:
        if self.eng.commits != self.commits:
            self._track_commit()

    @rule(lba=st.integers(0, VOL_BLOCKS - 1), count=st.integers(1, 16),
          unique=st.integers(0, 3), pattern=st.integers(0, len(PATTERNS) - 1))
    def write(self, lba, count, unique, pattern):
        count = min(count, VOL_BLOCKS - lba)
        data = (self.rng.randbytes(count * BLOCK_SIZE) if unique  # mostly unique
                else PATTERNS[pattern] * count)
        # between client batches, as the data plane does
        self.eng.background.step(128, busy=True)
        self._after()
        self.eng.write(self.vol, lba * BLOCK_SIZE, data)
        self.model[lba * BLOCK_SIZE : (lba + count) * BLOCK_SIZE] = data
        self._after()

    @rule(lba=st.integers(0, VOL_BLOCKS - 1), count=st.integers(1, 16))
    def trim(self, lba, count):
        count = min(count, VOL_BLOCKS - lba)
        self.eng.trim(self.vol, lba * BLOCK_SIZE, count * BLOCK_SIZE)
        self.model[lba * BLOCK_SIZE : (lba + count) * BLOCK_SIZE] = bytes(count * BLOCK_SIZE)
        self._after()

    @rule()
    def flush(self):
        self.eng.flush()
        self._after()
        assert self.durable == bytes(self.model)

    @rule(budget=st.sampled_from([4, 32, 128, 2048]), busy=st.booleans())
    def cleaner_step(self, budget, busy):
        done = self.eng.background.step(budget, busy)
        assert done <= budget * cleaner_mod.EMERGENCY_FACTOR  # bounded work per step
        self._after()

    @rule(records=st.integers(1, 20), flush=st.booleans())
    def clean_best(self, records, flush):
        picked = self.cleaner.choose_victim("space")
        if picked is not None:
            self.cleaner.clean_segment(picked[0], flush=flush, max_records=records)
            self._after()

    @rule()
    def idle_pass(self):
        self.cleaner.run_pass()
        self._after()

    @rule()
    def restart(self):
        before = self.cleaner.statistics()
        self.eng.close()
        self.eng, self.cleaner = open_engine(self.dir)
        self.vol = self.eng.volume("v")
        after = self.cleaner.statistics()
        assert (after.segments_cleaned, after.bytes_moved) == (
            before.segments_cleaned, before.bytes_moved)
        self._track_commit()

    @precondition(lambda self: True)
    @rule()
    def crash_and_recover(self):
        crash(self.eng)
        self.eng, self.cleaner = open_engine(self.dir)
        self.vol = self.eng.volume("v")
        self.model = bytearray(self.durable)
        self._track_commit()

    @invariant()
    def reads_and_accounting(self):
        assert self.eng.read(self.vol, 0, VOL_BLOCKS * BLOCK_SIZE) == bytes(self.model)
        check_consistency(self.eng, read_all=False)
        assert not self.cleaner.statistics().corrupt_records

    def teardown(self):
        try:
            self.eng.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


TestCleanerModel = CleanerModel.TestCase
TestCleanerModel.settings = settings(
    max_examples=int(os.environ.get("PSTORAGE_CLEANER_EXAMPLES", "25")),
    stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_moved_chunks_get_their_own_open_segment_and_both_resume_after_a_crash(tmp_path):
    """Hot/cold separation: the cleaner appends to the relocated stream's open
    segment, never to the one client writes fill; both open segments (and which
    stream each is) survive a crash."""
    from pstoraged.engine.segments import RELOCATED, USER

    d = str(tmp_path)
    eng, c, vol, model = fragmented_pool(d)
    segs = eng.segs
    s, _ = victim_with_live_data(c)
    moved = [cid for cid in range(1, eng.chunks.next_chunk) if eng.meta.txn.get(CHUNK_KEY.pack(cid),
             db=eng.meta.chunks) is not None and chunk_home(eng, cid)[0] == s]
    r = c.clean_segment(s)
    assert r.complete and r.chunks_moved == len(moved) > 0
    user, relocated = segs.open[USER], segs.open[RELOCATED]
    assert relocated >= 0 and relocated != user
    assert segs.stream[relocated] == RELOCATED and segs.stream[s] == USER
    homes = {chunk_home(eng, cid)[0] for cid in moved}
    assert user not in homes and homes <= {x for x in range(segs.count) if segs.stream[x] == RELOCATED}
    eng.write(vol, 0, os.urandom(2 * BLOCK_SIZE))  # client writes stay in the user stream
    assert block_home(eng, vol, 0)[0] == segs.open[USER] != segs.open[RELOCATED]
    model[: 2 * BLOCK_SIZE] = eng.read(vol, 0, 2 * BLOCK_SIZE)
    eng.flush()
    opened = list(segs.open)
    crash(eng)
    eng, c = open_engine(d)
    assert eng.segs.open == opened and eng.segs.stream[opened[RELOCATED]] == RELOCATED
    assert eng.read(eng.volume("v"), 0, len(model)) == bytes(model)
    s2, _ = victim_with_live_data(c)
    assert c.clean_segment(s2).complete  # appends after the committed records
    assert eng.read(eng.volume("v"), 0, len(model)) == bytes(model)
    check_consistency(eng)
    eng.close()


def test_moved_data_parks_on_the_most_worn_free_segment(engine):
    from pstoraged.engine.segments import RELOCATED, USER

    segs = engine.segs
    free = [s for s in range(segs.count) if segs.state[s] == SEG_FREE]
    for i, s in enumerate(free):
        segs.set_erase_count(s, 10 + (i * 7) % len(free))  # distinct counts, in no particular order
    worn = max(free, key=lambda s: segs.erase[s])
    fresh = min(free, key=lambda s: segs.erase[s])
    if segs.open[USER] >= 0:
        segs._seal(segs.open[USER])
    assert segs._allocate(RELOCATED, reserve_ok=True) == worn
    assert segs._allocate(USER) == fresh
