"""Level 2: the engine against a model (a plain bytearray per volume).

Random writes (aligned and not, all sizes), reads, trims, zeroes, flushes,
clean restarts and crashes on a tiny pool with 64 KiB segments. After a
crash the engine must hold exactly the state of its last commit: everything
flushed, nothing torn.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pstoraged.engine import codecs, fpindex, reducer
from pstoraged.engine.engine import Engine
from pstoraged.engine.format import BLOCK_SIZE
from pstoraged.engine.pool import open_pool
from pstoraged.errors import CorruptData, InvalidArgument, NotFound, PoolFull

from .conftest import crash, make_pool

VOL_BLOCKS = 48
VOL_SIZE = VOL_BLOCKS * BLOCK_SIZE

# A small alphabet of block contents so that dedupe and compression happen.
_rng = random.Random(1)
PATTERNS = [
    bytes(BLOCK_SIZE),
    (b"pstorage compresses well " * 200)[:BLOCK_SIZE],
    _rng.randbytes(BLOCK_SIZE),
    _rng.randbytes(BLOCK_SIZE),
    bytes([7]) * BLOCK_SIZE,
]


def fill(pattern: int, length: int, salt: int) -> bytes:
    base = PATTERNS[pattern % len(PATTERNS)]
    if pattern >= len(PATTERNS):  # unique data
        return random.Random(salt).randbytes(length)
    return (base * (length // BLOCK_SIZE + 2))[salt % BLOCK_SIZE : salt % BLOCK_SIZE + length]


offsets = st.one_of(
    st.integers(0, VOL_BLOCKS - 1).map(lambda b: b * BLOCK_SIZE),
    st.integers(0, VOL_SIZE - 1),
)
lengths = st.one_of(
    st.integers(1, 4).map(lambda b: b * BLOCK_SIZE),
    st.integers(1, 3 * BLOCK_SIZE),
    st.integers(8 * BLOCK_SIZE, 12 * BLOCK_SIZE),  # large writes
)


def fingerprint_index_state(eng: Engine) -> tuple[int, int]:
    """(valid, stale) entries of the dedupe index; every live chunk must be findable."""
    from pstoraged.engine.format import CHUNK_KEY

    txn = eng.meta.txn
    valid = stale = 0
    for fp, cid in eng.fps.entries().items():  # B-tree and in-memory tiers
        raw = txn.get(CHUNK_KEY.pack(cid), db=eng.meta.chunks)
        if raw is not None and raw[-32:] == fp:
            valid += 1
        else:
            stale += 1
    for _k, raw in txn.cursor(db=eng.meta.chunks):
        assert eng._dedupe_lookup(raw[-32:]) is not None
    if eng.fps.filter is not None:  # a ready filter must say "maybe" for every B-tree key
        assert all(eng.fps.filter.maybe(k) for k in txn.cursor(db=eng.meta.fp).iternext(values=False))
    return valid, stale


@pytest.fixture(autouse=True)
def tiny_fingerprint_table(monkeypatch):
    """Merges of the dedupe index's in-memory table happen every few chunks; its
    Bloom filter is tiny (rebuilt every few hundred entries) and built a few keys a step."""
    monkeypatch.setattr(fpindex, "TABLE_ENTRIES", 6)
    monkeypatch.setattr(fpindex, "FILTER_MIN_BYTES", 256)
    monkeypatch.setattr(fpindex, "FILTER_MAX_BYTES", 256)
    monkeypatch.setattr(fpindex, "FILTER_BUILD_SLICE", 5)


class EngineModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="pst-model-")
        make_pool(self.dir, size=24 << 20)
        self.eng = Engine(open_pool(self.dir))
        self.names = ["a", "b"]
        self.model: dict[str, bytearray] = {}
        for n in self.names:
            self.eng.create_volume(n, VOL_SIZE, "zstd" if n == "b" else "lz4")
            self.model[n] = bytearray(VOL_SIZE)
        self._track_commit()

    def _track_commit(self) -> None:
        self.durable = {n: bytes(m) for n, m in self.model.items()}
        self.commits = self.eng.commits

    def _after(self) -> None:
        if self.eng.commits != self.commits:
            self._track_commit()

    @rule(name=st.sampled_from(["a", "b"]), offset=offsets, length=lengths,
          pattern=st.integers(0, len(PATTERNS)), salt=st.integers(0, 1 << 20),
          fua=st.booleans())
    def write(self, name, offset, length, pattern, salt, fua):
        length = min(length, VOL_SIZE - offset)
        data = fill(pattern, length, salt)
        self.eng.write(self.eng.volume(name), offset, data, fua=fua)
        self.model[name][offset : offset + length] = data
        self._after()
        if fua:
            assert self.durable[name] == bytes(self.model[name])

    @rule(name=st.sampled_from(["a", "b"]), block=st.integers(0, VOL_BLOCKS - 1),
          blocks=st.integers(1, 12), pattern=st.integers(0, len(PATTERNS)),
          salt=st.integers(0, 1 << 20), fua=st.booleans())
    def write_reduced(self, name, block, blocks, pattern, salt, fua):
        """The data plane's path for large writes: reduced by the C reducer first."""
        if not reducer.AVAILABLE:
            return
        offset = block * BLOCK_SIZE
        length = min(blocks * BLOCK_SIZE, VOL_SIZE - offset)
        data = fill(pattern, length, salt)
        vol = self.eng.volume(name)
        self.eng.write_reduced(vol, offset, reducer.reduce_now(data, codecs.IDS[vol.compression]),
                               fua=fua)
        self.model[name][offset : offset + length] = data
        self._after()
        if fua:
            assert self.durable[name] == bytes(self.model[name])

    @rule(busy=st.booleans())
    def background(self, busy):
        self.eng.background.step(64, busy=busy)
        self._after()

    @rule(name=st.sampled_from(["a", "b"]), offset=offsets, length=lengths)
    def read(self, name, offset, length):
        length = min(length, VOL_SIZE - offset)
        assert self.eng.read(self.eng.volume(name), offset, length) == bytes(
            self.model[name][offset : offset + length])

    @rule(name=st.sampled_from(["a", "b"]), offset=offsets, length=lengths, trim=st.booleans())
    def zero(self, name, offset, length, trim):
        length = min(length, VOL_SIZE - offset)
        vol = self.eng.volume(name)
        (self.eng.trim if trim else self.eng.zero)(vol, offset, length)
        self.model[name][offset : offset + length] = bytes(length)
        self._after()

    @rule()
    def flush(self):
        self.eng.flush()
        self._after()
        assert self.durable == {n: bytes(m) for n, m in self.model.items()}

    @rule()
    def restart(self):
        self.eng.close()
        self.eng = Engine(open_pool(self.dir))
        assert self.eng.prev_clean
        self._track_commit()

    @rule()
    def crash_and_recover(self):
        crash(self.eng)
        self.eng = Engine(open_pool(self.dir))
        assert not self.eng.prev_clean
        self.model = {n: bytearray(d) for n, d in self.durable.items()}
        self._track_commit()

    @rule(name=st.sampled_from(["a", "b"]))
    def extents_match_contents(self, name):
        vol = self.eng.volume(name)
        pos = 0
        for length, typ in self.eng.extents(vol, 0, VOL_SIZE):
            if typ & 2:  # claims zeros: must really be zeros
                assert not any(self.model[name][pos : pos + length])
            pos += length
        assert pos == VOL_SIZE

    @invariant()
    def accounting(self):
        vols = self.eng.volumes.values()
        mapped = sum(v.stats.mapped_blocks for v in vols)
        nonzero = sum(
            1 for m in self.model.values() for i in range(0, VOL_SIZE, BLOCK_SIZE)
            if any(m[i : i + BLOCK_SIZE])
        )
        assert mapped == nonzero
        distinct = {
            bytes(m[i : i + BLOCK_SIZE]) for m in self.model.values()
            for i in range(0, VOL_SIZE, BLOCK_SIZE) if any(m[i : i + BLOCK_SIZE])
        }
        # global dedupe: exactly one chunk per distinct non-zero block
        assert self.eng.chunks.live_chunks == len(distinct)
        assert fingerprint_index_state(self.eng) == (len(distinct), self.eng.chunks.stale_fps)

    def teardown(self):
        try:
            self.eng.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


TestEngineModel = EngineModel.TestCase
TestEngineModel.settings = settings(
    max_examples=int(os.environ.get("PSTORAGE_MODEL_EXAMPLES", "40")),
    stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ---------------------------------------------------------------------------
# Focused engine tests


def test_dedupe_and_compression_really_happen(engine):
    a = engine.create_volume("a", 64 << 20)
    b = engine.create_volume("b", 64 << 20, "zstd")
    text = (b"log line: user=alice action=login ok\n" * 200)[:BLOCK_SIZE]
    unique = [os.urandom(BLOCK_SIZE) for _ in range(64)]
    for i, u in enumerate(unique):
        engine.write(a, i * BLOCK_SIZE, u)
        engine.write(b, i * BLOCK_SIZE, u)  # same data in another volume: deduped
    for i in range(64):
        engine.write(a, (100 + i) * BLOCK_SIZE, text)
    engine.write(a, 200 * BLOCK_SIZE, bytes(1 << 20))  # zeros: nothing stored
    engine.flush()
    st = engine.statistics()
    assert st.logical_bytes == (64 + 64 + 64) * BLOCK_SIZE
    assert st.live_chunks == 65
    # 64 incompressible chunks stored raw (+64 B header each), one text chunk compressed
    assert 64 * 4096 < st.stored_bytes < 64 * 4160 + 400
    assert b.stats.dedupe_bytes == 64 * BLOCK_SIZE
    assert a.stats.dedupe_bytes == 63 * BLOCK_SIZE
    assert a.stats.zero_bytes == 1 << 20
    assert engine.extents(a, 200 * BLOCK_SIZE, 1 << 20) == [(1 << 20, 3)]
    assert engine.read(b, 5 * BLOCK_SIZE, BLOCK_SIZE) == unique[5]


def test_overwrite_frees_segments_for_reuse(engine):
    v = engine.create_volume("v", 1 << 20)
    free0 = engine.segs.free_count()
    for _ in range(20):  # 20 x 1 MiB of unique data into a 16 MiB pool
        last = os.urandom(1 << 20)
        engine.write(v, 0, last)
        engine.flush()
    # fully dead segments came back: only ~1 MiB (17 small segments) is live
    assert engine.segs.free_count() >= free0 - 20
    assert engine.read(v, 0, 1 << 20) == last


def test_full_pool_gives_enospc_and_keeps_data(engine):
    v = engine.create_volume("v", 64 << 20)
    keep = os.urandom(BLOCK_SIZE)
    engine.write(v, 0, keep)
    engine.flush()
    with pytest.raises(PoolFull):
        for i in range(1, 16384):
            engine.write(v, i * BLOCK_SIZE, os.urandom(BLOCK_SIZE))
    engine.flush()
    assert engine.read(v, 0, BLOCK_SIZE) == keep
    # dedupe hits and zeros need no space and still work
    engine.write(v, BLOCK_SIZE, keep)
    engine.zero(v, 2 * BLOCK_SIZE, BLOCK_SIZE)
    # freeing space makes writes work again
    engine.trim(v, BLOCK_SIZE * 8, 32 << 20)
    engine.flush()
    engine.write(v, 10 * BLOCK_SIZE, os.urandom(BLOCK_SIZE))


def test_corruption_is_detected_on_read(engine, caplog):
    caplog.allowed_errors = True
    v = engine.create_volume("v", 1 << 20)
    data = os.urandom(BLOCK_SIZE)
    engine.write(v, 0, data)
    engine.write(v, BLOCK_SIZE, os.urandom(BLOCK_SIZE * 20))  # roll the segment over
    engine.flush()
    from pstoraged.engine.format import CHUNK_KEY, CHUNK_META

    cid = engine._lookup(v, 0, v.gen)
    _, s, off, *_ = CHUNK_META.unpack(engine.meta.txn.get(CHUNK_KEY.pack(cid), db=engine.meta.chunks))
    assert s not in engine.segs.open
    with open(engine.pool.backing.path, "r+b") as f:
        f.seek(engine.segs.offset(s) + off + 64 + 100)
        f.write(b"\x00\xff\x00")
    with pytest.raises(CorruptData):
        engine.read(v, 0, BLOCK_SIZE)
    with pytest.raises(CorruptData):  # also when read together with its neighbours
        engine.read(v, 0, 4 * BLOCK_SIZE)
    assert engine.statistics().checksum_errors == 2
    assert engine.read(v, BLOCK_SIZE, BLOCK_SIZE)  # other data unaffected


def test_bad_requests_are_refused(engine):
    v = engine.create_volume("v", 1 << 20)
    with pytest.raises(InvalidArgument):
        engine.write(v, (1 << 20) - 10, b"x" * 20)
    with pytest.raises(InvalidArgument):
        engine.read(v, -1, 10)
    with pytest.raises(NotFound):
        engine.volume("nope")
    with pytest.raises(InvalidArgument):
        engine.create_volume("../x", 4096)
    engine.delete_volume("v")
    with pytest.raises(NotFound):
        engine.read(v, 0, 10)


def test_resize_and_delete_release_space(engine):
    free0 = engine.segs.free_count()
    v = engine.create_volume("v", 4 << 20)
    engine.write(v, 0, os.urandom(4 << 20))
    engine.flush()
    assert engine.chunks.live_chunks == 1024
    with pytest.raises(InvalidArgument):
        engine.resize_volume("v", 1 << 20)
    engine.resize_volume("v", 1 << 20, shrink=True)
    assert engine.chunks.live_chunks == 256
    engine.resize_volume("v", 8 << 20)
    assert engine.read(v, 2 << 20, 4096) == bytes(4096)  # regrown range reads zeros
    engine.delete_volume("v")
    with pytest.raises(NotFound):
        engine.volume("v")  # gone at once ...
    while engine.reclaim_step(100):  # ... its space comes back in the background
        pass
    engine.flush()
    assert engine.chunks.live_chunks == 0 and engine.chunks.live_stored == 0
    # every sealed segment is dead and comes back after the commit (the open one stays)
    assert engine.segs.free_count() >= free0 - 1
    assert engine.statistics().allocated_bytes <= engine.segs.size


def test_dedupe_index_stale_entries_are_pruned(engine):
    """Freed chunks leave index entries behind; they never resurrect data and a sweep removes them."""
    v = engine.create_volume("v", 4 << 20)
    old = [os.urandom(BLOCK_SIZE) for _ in range(256)]
    engine.write(v, 0, b"".join(old))
    engine.write(v, 0, os.urandom(256 * BLOCK_SIZE))  # every old chunk dies
    engine.flush()
    assert fingerprint_index_state(engine) == (256, 256) and engine.chunks.stale_fps == 256
    # writing old content again must make new chunks, not revive the dead ones
    engine.write(v, 1 << 20, old[0] + old[1])
    assert engine.chunks.stale_fps == 254 and engine.chunks.live_chunks == 258
    assert engine.read(v, 1 << 20, 2 * BLOCK_SIZE) == old[0] + old[1]
    engine.flush()
    # a sweep in slices, interrupted by a crash, resumes and finishes
    assert engine.prune_step(100) == 100
    engine.flush()
    engine.prune_step(100)  # not committed: lost in the crash
    pool_dir = engine.pool.directory
    crash(engine)
    eng = Engine(open_pool(pool_dir))
    try:
        assert eng.chunks.prune_from is not None and eng.background.has_work()
        while eng.background.step(100, busy=False):
            pass
        assert eng.chunks.prune_from is None and eng.chunks.stale_fps == 0
        assert fingerprint_index_state(eng) == (258, 0)
        vv = eng.volume("v")
        eng.write(vv, 2 << 20, old[2])  # index still dedupes live data after the sweep
        assert eng.chunks.live_chunks == 259
        eng.write(vv, 3 << 20, old[2])
        assert eng.chunks.live_chunks == 259
    finally:
        eng.close()


class FlakyBacking:
    """Wraps a Backing; fails reads, writes or syncs while told to."""

    def __init__(self, inner):
        self.inner = inner
        self.fail: set[str] = set()

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name in ("pread", "pwrite", "sync"):
            def wrapped(*a, **k):
                if name in self.fail:
                    from pstoraged.errors import DeviceIOError

                    raise DeviceIOError(f"{self.inner.path}: {name} failed: Input/output error")
                return attr(*a, **k)
            return wrapped
        return attr


def test_failing_device_gives_eio_and_never_loses_flushed_data(pool_dir, caplog):
    from pstoraged.errors import DeviceIOError

    caplog.allowed_errors = True
    eng = Engine(open_pool(pool_dir))
    flaky = FlakyBacking(eng.pool.backing)
    eng.segs.backing = flaky
    v = eng.create_volume("v", 4 << 20)
    good = os.urandom(64 << 10)
    eng.write(v, 0, good)
    eng.flush()
    eng.write(v, 1 << 20, os.urandom(64 << 10))  # fills more than a 64 KiB segment
    flaky.fail = {"pread"}
    with pytest.raises(DeviceIOError):
        eng.read(v, 0, 4096)  # a read error is that request's EIO only
    flaky.fail = {"sync"}
    with pytest.raises(DeviceIOError):
        eng.flush()
    assert eng.failed
    flaky.fail = set()
    with pytest.raises(DeviceIOError, match="restart"):
        eng.write(v, 0, b"x" * 4096)  # refuses writes until restart
    with pytest.raises(DeviceIOError):
        eng.flush()
    assert eng.read(v, 0, len(good)) == good  # reads still work
    eng.close()
    eng = Engine(open_pool(pool_dir))
    assert not eng.prev_clean
    assert eng.read(eng.volume("v"), 0, len(good)) == good
    eng.close()


def test_reclaim_of_a_deleted_volume_survives_a_crash(pool_dir):
    eng = Engine(open_pool(pool_dir))
    keep = eng.create_volume("keep", 2 << 20)
    gone = eng.create_volume("gone", 2 << 20)
    shared = os.urandom(1 << 20)
    eng.write(keep, 0, shared)
    eng.write(gone, 0, shared)  # deduped: these chunks are shared with "keep"
    eng.write(gone, 1 << 20, os.urandom(1 << 20))
    eng.flush()
    eng.delete_volume("gone")
    assert eng.reclaim_step(100) == 100
    eng.flush()
    eng.reclaim_step(100)  # not committed: lost in the crash, redone after
    crash(eng)
    eng = Engine(open_pool(pool_dir))
    assert "gone" not in eng.volumes and eng.background.has_work()
    while eng.reclaim_step(64):
        pass
    eng.flush()
    assert eng.chunks.live_chunks == 256  # only the shared megabyte is left
    assert eng.read(eng.volume("keep"), 0, 1 << 20) == shared
    eng.close()
