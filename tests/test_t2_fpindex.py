"""Level 2: the write path's batch reducer and the two-tier dedupe index."""

from __future__ import annotations

import hashlib
import os
import zlib

import pytest

from pstoraged.engine import codecs, fpindex, reducer
from pstoraged.engine.engine import Engine
from pstoraged.engine.format import BLOCK_SIZE, METADATA_VERSION
from pstoraged.engine.pool import open_pool, raw_metadata

from .conftest import crash, make_pool
from .test_t2_cleaner import check_consistency
from .test_t2_engine_model import fingerprint_index_state

# the compiled reducer is part of the product: CI builds it (scripts/setup)
needs_reducer = pytest.mark.skipif(not reducer.AVAILABLE and not os.environ.get("CI"),
                                   reason="pstoraged.engine._reduce is not built")


@needs_reducer
@pytest.mark.parametrize("codec", [codecs.CODEC_NONE, codecs.CODEC_LZ4, codecs.CODEC_ZSTD])
def test_reducer_matches_the_python_path(codec):
    assert reducer.AVAILABLE, "pstoraged.engine._reduce must be built (scripts/setup installs its headers)"
    blocks = [os.urandom(BLOCK_SIZE), bytes(BLOCK_SIZE), b"pstorage " * 455 + b"x",
              bytes(BLOCK_SIZE - 1) + b"\1", os.urandom(2048) + bytes(2048)]
    fps, kinds, payloads, crcs = reducer.reduce_now(b"".join(blocks), codec).wait()
    py = codecs.Compressor()
    assert len(kinds) == len(payloads) == len(crcs) == len(blocks) and len(fps) == 32 * len(blocks)
    for i, block in enumerate(blocks):
        if block == bytes(BLOCK_SIZE):
            assert kinds[i] == reducer.KIND_ZERO and payloads[i] is None
            continue
        used, payload = py.compress(codec, block)
        assert fps[32 * i : 32 * i + 32] == hashlib.sha256(block).digest()
        assert kinds[i] == used  # same early-abort decision
        assert crcs[i] == zlib.crc32(payloads[i])
        assert py.decompress(kinds[i], payloads[i], BLOCK_SIZE) == block
        if codec == codecs.CODEC_ZSTD:
            assert payloads[i] == payload  # same frame format (no content size)


@needs_reducer
def test_reducer_refuses_bad_input():
    r = reducer._CReducer()
    with pytest.raises(ValueError):
        r.reduce(bytes(BLOCK_SIZE + 1), codecs.CODEC_LZ4)
    with pytest.raises(ValueError):
        r.reduce(bytes(BLOCK_SIZE), 9)
    assert r.reduce(b"", codecs.CODEC_LZ4) == (b"", b"", [], [])


@needs_reducer
def test_reducer_thread_hands_back_results_and_errors(caplog):
    caplog.allowed_errors = True  # the bad request is logged
    t = reducer.ReducerThread()
    try:
        data = os.urandom(8 * BLOCK_SIZE)
        pending = [t.submit(data, codecs.CODEC_LZ4) for _ in range(20)]
        bad = t.submit(bytes(100), codecs.CODEC_LZ4)  # not whole blocks: the request fails
        for p in pending:
            assert p.wait()[0] == pending[0].wait()[0]
        with pytest.raises(ValueError):
            bad.wait()
        assert t.wants(0, 16384) and not t.wants(512, 16384) and not t.wants(0, 4096)
    finally:
        t.stop()


@needs_reducer
def test_reduced_writes_store_what_plain_writes_store(engine):
    a = engine.create_volume("a", 1 << 20)
    b = engine.create_volume("b", 1 << 20, "zstd")
    data = os.urandom(4 * BLOCK_SIZE) + bytes(2 * BLOCK_SIZE) + b"abc" * 4096 + os.urandom(
        BLOCK_SIZE) * 2
    data = data[: len(data) // BLOCK_SIZE * BLOCK_SIZE]
    engine.write(a, 0, data)
    engine.write_reduced(b, 0, reducer.reduce_now(data, codecs.CODEC_ZSTD))
    engine.write_reduced(a, 1 << 19, reducer.reduce_now(data, codecs.CODEC_LZ4), fua=True)
    assert engine.read(b, 0, len(data)) == data == engine.read(a, 1 << 19, len(data))
    # the second and third copies are all dedupe hits of the first
    sa, sb = engine.volume("a").stats, engine.volume("b").stats
    assert sb.unique_bytes == 0 and sb.zero_bytes == 2 * BLOCK_SIZE
    assert sa.unique_bytes == len(data) - 3 * BLOCK_SIZE  # zeros and one repeated block
    assert sa.written_bytes == 2 * len(data)


@pytest.fixture
def small_index(monkeypatch):
    """A 64-entry table merged 8 entries per step: merges and partial merges are easy to reach."""
    monkeypatch.setattr(fpindex, "TABLE_ENTRIES", 64)
    monkeypatch.setattr(fpindex, "MERGE_SLICE", 8)


@pytest.fixture
def eng(pool_dir, small_index):
    e = Engine(open_pool(pool_dir))
    yield e
    if e.pool.backing.fd >= 0:
        e.close()


def _settle(eng, busy=False):
    while eng.background.step(16, busy=busy):
        pass


def _write_unique(eng, vol, first_block, count):
    blocks = [os.urandom(BLOCK_SIZE) for _ in range(count)]
    eng.write(vol, first_block * BLOCK_SIZE, b"".join(blocks))
    return blocks


def test_new_fingerprints_wait_in_memory_and_merge_in_the_background(eng):
    v = eng.create_volume("v", 4 << 20)
    blocks = _write_unique(eng, v, 0, 40)
    idx = eng.fps
    assert len(idx.recent) == 40 and not idx.merging  # nothing in the B-tree yet
    blocks += _write_unique(eng, v, 40, 40)  # the table filled: a merge started
    assert idx.merging and len(idx) == 80 and eng.background.has_work()
    assert eng.background.step(16, busy=True) == 16  # a bounded slice at a time
    _settle(eng, busy=True)
    assert not idx.merging and idx.upto > 1 and len(idx) <= 64
    eng.flush()
    # everything dedupes, from either tier
    before = eng.chunks.live_chunks
    eng.write(v, 1 << 20, b"".join(blocks))
    assert eng.chunks.live_chunks == before
    assert fingerprint_index_state(eng) == (before, eng.chunks.stale_fps)


def test_memory_stays_bounded_when_merges_cannot_keep_up(eng):
    v = eng.create_volume("v", 4 << 20)
    for i in range(10):  # no background steps at all
        _write_unique(eng, v, i * 30, 30)
        assert len(eng.fps) <= 2 * 64
    assert fingerprint_index_state(eng) == (300, 0)


def test_crash_during_a_merge_loses_no_index_entry(eng, pool_dir):
    v = eng.create_volume("v", 4 << 20)
    blocks = _write_unique(eng, v, 0, 100)
    eng.background.step(16, busy=True)
    eng.flush()  # part of the merge is committed ...
    eng.background.step(16, busy=True)  # ... and part is lost
    assert eng.fps.merging  # (not finished)
    _write_unique(eng, v, 100, 10)  # never committed
    crash(eng)
    eng = Engine(open_pool(pool_dir))
    try:
        assert eng.chunks.live_chunks == 100
        assert fingerprint_index_state(eng) == (100, eng.chunks.stale_fps)
        before = eng.chunks.live_chunks
        eng.write(eng.volume("v"), 1 << 20, b"".join(blocks))
        assert eng.chunks.live_chunks == before  # all deduped
        _settle(eng)
        eng.flush()
        assert fingerprint_index_state(eng) == (100, 0)
    finally:
        eng.close()


def test_chunks_freed_before_their_merge_leave_no_stale_entry(eng):
    v = eng.create_volume("v", 4 << 20)
    _write_unique(eng, v, 0, 50)
    _write_unique(eng, v, 0, 50)  # frees the first 50 while they are still in memory
    assert eng.chunks.stale_fps == 0
    _settle(eng)
    eng.flush()
    assert fingerprint_index_state(eng) == (50, 0)


def test_version_2_store_is_upgraded_and_keeps_deduping(pool_dir):
    eng = Engine(open_pool(pool_dir))
    v = eng.create_volume("v", 4 << 20)
    blocks = _write_unique(eng, v, 0, 20)
    eng.fps._start_merge(eng.chunks.next_chunk)  # as version 2 kept it: every entry in the B-tree
    eng.fps.finish_merge()
    eng.meta.txn.delete(b"fp_upto", db=eng.meta.meta)
    eng.meta.put_json("format_version", 2)
    eng.flush()
    eng.meta.txn.delete(b"fp_upto", db=eng.meta.meta)  # the commit wrote it back
    eng.meta.commit()
    eng.close()
    with raw_metadata(pool_dir) as meta:
        assert meta.get_json("fp_upto") is None
    eng = Engine(open_pool(pool_dir))
    try:
        assert eng.meta.get_json("format_version") == METADATA_VERSION
        eng.write(eng.volume("v"), 1 << 20, b"".join(blocks))
        assert eng.chunks.live_chunks == 20
    finally:
        eng.close()


# ---------------------------------------------------------------- the Bloom filter
needs_filter = pytest.mark.skipif(fpindex.FingerprintFilter is None and not os.environ.get("CI"),
                                  reason="pstoraged.engine._filter is not built")


def _fps(n, salt=b""):
    return [hashlib.sha256(salt + i.to_bytes(8, "little")).digest() for i in range(n)]


@needs_filter
def test_filter_never_forgets_and_rarely_says_maybe_wrongly():
    assert fpindex.FingerprintFilter is not None, "pstoraged.engine._filter must be built"
    size = fpindex.filter_bytes(100_000)
    assert size == 256 << 10  # the power of two with >= 12 bits per entry
    f = fpindex.FingerprintFilter(size)
    inside = _fps(size * 8 // fpindex.FILTER_BITS_PER_ENTRY)  # the designed load
    f.add_many(inside[1:])
    f.add(memoryview(inside[0]))
    assert f.added == len(inside) and f.nbytes == size
    assert all(f.maybe(fp) for fp in inside)
    wrong = sum(f.maybe(fp) for fp in _fps(100_000, b"other"))
    assert wrong < 1500  # ~0.5 % expected; an empty or saturated filter fails this
    assert not fpindex.FingerprintFilter(size).maybe(inside[0])
    with pytest.raises(ValueError):
        fpindex.FingerprintFilter(1000)  # not a power of two
    with pytest.raises(ValueError):
        f.maybe(b"short")
    with pytest.raises(TypeError):
        f.add_many([inside[0], 7])


def test_filter_size_is_bounded():
    assert fpindex.filter_bytes(0) == fpindex.FILTER_MIN_BYTES
    assert fpindex.filter_bytes(10 << 20) == 16 << 20  # 40 GiB of 4 KiB blocks
    assert fpindex.filter_bytes(1 << 40) == fpindex.FILTER_MAX_BYTES


@pytest.fixture
def slow_build(monkeypatch):
    """A small filter built 4 keys a step, so that builds take many steps."""
    monkeypatch.setattr(fpindex, "FILTER_MIN_BYTES", 4096)
    monkeypatch.setattr(fpindex, "FILTER_MAX_BYTES", 4096)
    monkeypatch.setattr(fpindex, "FILTER_BUILD_SLICE", 4)


def _btree_keys(eng):
    return list(eng.meta.txn.cursor(db=eng.meta.fp).iternext(values=False))


@needs_filter
def test_filter_is_built_from_the_btree_while_merges_go_on(slow_build, pool_dir, small_index):
    eng = Engine(open_pool(pool_dir))
    assert eng.fps.filter is not None  # an empty index: ready at once, nothing to walk
    v = eng.create_volume("v", 4 << 20)
    blocks = _write_unique(eng, v, 0, 200)
    _settle(eng)
    eng.close()
    eng = Engine(open_pool(pool_dir))  # a restart: the filter is built again
    try:
        idx = eng.fps
        assert idx.filter is None and idx._building is not None
        # merges land keys on both sides of the walk while it goes on
        more = _write_unique(eng, eng.volume("v"), 200, 200)
        steps = 0
        while idx.filter is None:
            assert eng.background.step(1, busy=True)
            steps += 1
        assert steps > 20 and idx.filter_statistics()["ready"]
        _settle(eng)
        keys = _btree_keys(eng)
        assert len(keys) > 300 and all(idx.filter.maybe(k) for k in keys)
        # lookups of new blocks skip the B-tree; known ones still dedupe
        skips = idx.filter_skips
        _write_unique(eng, eng.volume("v"), 400, 50)
        assert idx.filter_skips - skips >= 40
        before = eng.chunks.live_chunks
        eng.write(eng.volume("v"), 600 * BLOCK_SIZE, b"".join(blocks + more))
        assert eng.chunks.live_chunks == before
        assert fingerprint_index_state(eng)[1] == eng.chunks.stale_fps
        assert eng.chunks.index_statistics()["filter"]["bytes"] == 4096
    finally:
        eng.close()


@needs_filter
def test_filter_is_rebuilt_when_freed_chunks_fill_it(slow_build, monkeypatch, pool_dir, small_index):
    monkeypatch.setattr(fpindex, "FILTER_MAX_BYTES", 1024)  # sized for 682 entries
    monkeypatch.setattr(fpindex, "FILTER_MIN_BYTES", 1024)
    eng = Engine(open_pool(pool_dir))
    idx = eng.fps
    _settle(eng)
    first = idx.filter
    assert first is not None
    v = eng.create_volume("v", 4 << 20)
    for _ in range(10):  # overwrites: each round frees the last round's chunks
        _write_unique(eng, v, 0, 100)
        _settle(eng)
    assert idx.filter is not first  # rebuilt once past 682 entries
    assert idx.filter.added < 10 * 100  # (the first took every one of them)
    assert all(idx.filter.maybe(k) for k in _btree_keys(eng))
    assert fingerprint_index_state(eng)[0] == 100
    eng.close()


# ---------------------------------------------------------------------------
# The memory quota and sparse mode


def test_filter_plan_follows_unique_chunks_within_the_quota():
    assert fpindex.filter_plan(0, 1 << 30) == (fpindex.FILTER_MIN_BYTES, 0)
    size, shift = fpindex.filter_plan(10 << 20, 1 << 30)  # 40 GiB of unique data
    assert shift == 0 and size == 32 << 20  # 1.25 x 12 bits each, a power of two
    # 10 TiB of unique 4 KiB chunks: sparse under the default quota, at most half of it
    size, shift = fpindex.filter_plan(10 << 28, 1 << 30)
    assert size == 512 << 20 and shift == 4  # 5 GiB at full rate: 1 in 16
    assert (10 << 28) * 1.25 / (1 << shift) * fpindex.FILTER_BITS_PER_ENTRY <= size * 8
    # a quota large enough for everything: full mode, <= 30 bits per entry
    size, shift = fpindex.filter_plan(10 << 28, 16 << 30)
    assert shift == 0 and size * 8 <= 30 * (10 << 28)


def test_sparse_mode_bounds_memory_and_lookups_and_still_dedupes_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(fpindex, "FILTER_MIN_BYTES", 64)
    quota = 1024  # a 512-byte filter: full mode up to ~270 entries
    eng = Engine(open_pool(make_pool(str(tmp_path), 64 << 20)), index_memory=quota)
    try:
        idx = eng.fps
        idx.table_entries = 128
        v = eng.create_volume("v", 6000 * BLOCK_SIZE)
        blocks: list[bytes] = []
        for i in range(20):
            blocks += _write_unique(eng, v, i * 100, 100)
            _settle(eng)
            st = idx.filter_statistics()
            assert st["bytes"] <= quota
        _settle(eng)
        eng.flush()
        st = idx.filter_statistics()
        assert st["sparse"] and st["ready"] and st["sample_rate"] <= 1 / 8
        assert st["false_maybe_rate"] < 0.02  # the filter stays at its design load
        # new data: almost no lookup reaches the B-tree
        skipped = st["skipped_lookups"] + st["sparse_skips"]
        for _ in range(4000):
            assert idx.get(os.urandom(32)) is None
        st = idx.filter_statistics()
        reads = 4000 - (st["skipped_lookups"] + st["sparse_skips"] - skipped)
        assert reads < 40  # < 1 %: 1 in 2**shift sampled, then the filter's false "maybe"
        # a copy of the first 1000 blocks (one run in write order) dedupes after its
        # first sampled block; isolated duplicates may be stored again
        before = eng.chunks.live_chunks
        eng.write(v, 4000 * BLOCK_SIZE, b"".join(blocks[:1000]))
        assert eng.chunks.live_chunks - before < 100
        st = idx.filter_statistics()
        assert st["locality_hits"] > 800
        assert st["locality_entries"] <= fpindex.CACHE_CHAPTERS * fpindex.CHAPTER
        # never a wrong chunk: every block reads back, also after overwrites free chunks
        eng.write(v, 0, b"".join(os.urandom(BLOCK_SIZE) for _ in range(500)))
        eng.write(v, 5000 * BLOCK_SIZE, b"".join(blocks[:1000]))
        assert eng.read(v, 4000 * BLOCK_SIZE, 1000 * BLOCK_SIZE) == b"".join(blocks[:1000])
        assert eng.read(v, 5000 * BLOCK_SIZE, 1000 * BLOCK_SIZE) == b"".join(blocks[:1000])
        assert eng.read(v, 500 * BLOCK_SIZE, 1500 * BLOCK_SIZE) == b"".join(blocks[500:2000])
        check_consistency(eng)
    finally:
        eng.close()
