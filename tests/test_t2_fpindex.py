"""Level 2: the write path's batch reducer and the two-tier dedupe index."""

from __future__ import annotations

import hashlib
import os
import zlib

import pytest

from pstoraged import codecs, fpindex, reducer
from pstoraged.engine import Engine
from pstoraged.format import BLOCK_SIZE
from pstoraged.metadata import MetaStore
from pstoraged.pool import open_pool

from .conftest import crash
from .test_t2_engine_model import fingerprint_index_state

# the compiled reducer is part of the product: CI builds it (scripts/setup)
needs_reducer = pytest.mark.skipif(not reducer.AVAILABLE and not os.environ.get("CI"),
                                   reason="pstoraged._reduce is not built")


@needs_reducer
@pytest.mark.parametrize("codec", [codecs.CODEC_NONE, codecs.CODEC_LZ4, codecs.CODEC_ZSTD])
def test_reducer_matches_the_python_path(codec):
    assert reducer.AVAILABLE, "pstoraged._reduce must be built (scripts/setup installs its headers)"
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
    while eng.background_step(16, busy=busy):
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
    assert idx.merging and len(idx) == 80 and eng.has_background_work()
    assert eng.background_step(16, busy=True) == 16  # a bounded slice at a time
    _settle(eng, busy=True)
    assert not idx.merging and idx.upto > 1 and len(idx) <= 64
    eng.flush()
    # everything dedupes, from either tier
    before = eng.live_chunks
    eng.write(v, 1 << 20, b"".join(blocks))
    assert eng.live_chunks == before
    assert fingerprint_index_state(eng) == (before, eng.stale_fps)


def test_memory_stays_bounded_when_merges_cannot_keep_up(eng):
    v = eng.create_volume("v", 4 << 20)
    for i in range(10):  # no background steps at all
        _write_unique(eng, v, i * 30, 30)
        assert len(eng.fps) <= 2 * 64
    assert fingerprint_index_state(eng) == (300, 0)


def test_crash_during_a_merge_loses_no_index_entry(eng, pool_dir):
    v = eng.create_volume("v", 4 << 20)
    blocks = _write_unique(eng, v, 0, 100)
    eng.background_step(16, busy=True)
    eng.flush()  # part of the merge is committed ...
    eng.background_step(16, busy=True)  # ... and part is lost
    assert eng.fps.merging  # (not finished)
    _write_unique(eng, v, 100, 10)  # never committed
    crash(eng)
    eng = Engine(open_pool(pool_dir))
    try:
        assert eng.live_chunks == 100
        assert fingerprint_index_state(eng) == (100, eng.stale_fps)
        before = eng.live_chunks
        eng.write(eng.volume("v"), 1 << 20, b"".join(blocks))
        assert eng.live_chunks == before  # all deduped
        _settle(eng)
        eng.flush()
        assert fingerprint_index_state(eng) == (100, 0)
    finally:
        eng.close()


def test_chunks_freed_before_their_merge_leave_no_stale_entry(eng):
    v = eng.create_volume("v", 4 << 20)
    _write_unique(eng, v, 0, 50)
    _write_unique(eng, v, 0, 50)  # frees the first 50 while they are still in memory
    assert eng.stale_fps == 0
    _settle(eng)
    eng.flush()
    assert fingerprint_index_state(eng) == (50, 0)


def test_version_2_store_is_upgraded_and_keeps_deduping(pool_dir):
    eng = Engine(open_pool(pool_dir))
    v = eng.create_volume("v", 4 << 20)
    blocks = _write_unique(eng, v, 0, 20)
    eng.fps._start_merge(eng.next_chunk)  # as version 2 kept it: every entry in the B-tree
    eng.fps.finish_merge()
    eng.meta.txn.delete(b"fp_upto", db=eng.meta.meta)
    eng.meta.put_json("format_version", 2)
    eng.flush()
    eng.meta.txn.delete(b"fp_upto", db=eng.meta.meta)  # the commit wrote it back
    eng.meta.commit()
    eng.close()
    meta = MetaStore(os.path.join(pool_dir, "meta"))
    assert meta.get_json("fp_upto") is None
    meta.close()
    eng = Engine(open_pool(pool_dir))
    try:
        assert eng.meta.get_json("format_version") == 3
        eng.write(eng.volume("v"), 1 << 20, b"".join(blocks))
        assert eng.live_chunks == 20
    finally:
        eng.close()
