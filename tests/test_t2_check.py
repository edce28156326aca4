"""Level 2: `pool check` finds broken refcounts, orphans, stale records and
index gaps in plain words, repairs what can be derived, and reports (never
"fixes") what cannot."""

from __future__ import annotations

import os

import pytest

from pstoraged.engine import check
from pstoraged.engine.check import check_offline
from pstoraged.engine.engine import Engine
from pstoraged.engine.format import (
    CHUNK_KEY,
    CHUNK_META,
    SEG_KEY,
    SEG_META,
    SEG_TAIL,
    ChunkHeader,
    SegmentHeader,
    l2p_key,
)
from pstoraged.engine.pool import open_pool
from pstoraged.engine.segments import TAIL_KEYS
from pstoraged.errors import CorruptData, PoolLocked

B = 4096


def _populate(pool_dir: str) -> dict[tuple[str, int], bytes]:
    """Volumes with unique and duplicate blocks, a snapshot with overwrites
    after it, a clone, and a merged dedupe index; returns what each block reads."""
    eng = Engine(open_pool(pool_dir))
    v = eng.create_volume("v", 1 << 20)
    want: dict[tuple[str, int], bytes] = {}
    for lba in range(40):
        data = os.urandom(B) if lba % 3 else b"dup!" * (B // 4)  # every third block dedupes
        eng.write(v, lba * B, data)
        want["v", lba] = data
    eng.generations.freeze(v)  # a snapshot's generation holds the old blocks
    for lba in range(0, 40, 4):
        data = os.urandom(B)
        eng.write(v, lba * B, data)
        want["v", lba] = data
    w = eng.create_volume("w", 1 << 20)
    eng.write(w, 0, want["v", 1])  # a dedupe across volumes
    want["w", 0] = want["v", 1]
    eng.fps._start_merge(eng.chunks.next_chunk)  # the index in the B-tree, so it is checked
    eng.fps.finish_merge()
    eng.close()
    return want


def _read_back(pool_dir: str, want: dict[tuple[str, int], bytes]) -> None:
    eng = Engine(open_pool(pool_dir))
    try:
        for (name, lba), data in want.items():
            assert eng.read(eng.volume(name), lba * B, B) == data, (name, lba)
    finally:
        eng.close()


def _edit(pool_dir: str, fn) -> None:
    """Change the LMDB tables of a closed pool directly (damage on purpose)."""
    pool = open_pool(pool_dir)
    try:
        fn(pool)
        pool.meta.commit()
    finally:
        pool.close()


def _chunk_of(pool, vid: int, lba: int, gen: int = 2) -> int:
    """The chunk block `lba` reads at generation `gen`."""
    cur = pool.meta.txn.cursor(db=pool.meta.l2p)
    key = l2p_key(vid, lba, gen)
    assert cur.set_range(key) and cur.key()[:12] == key[:12]
    return int.from_bytes(cur.value(), "little")


def _set_chunk(pool, cid: int, **change: int) -> tuple:
    t, key = pool.meta.txn, CHUNK_KEY.pack(cid)
    rc, s, off, slen, codec, slot, res, fp = CHUNK_META.unpack(t.get(key, db=pool.meta.chunks))
    old = (rc, s, off, slen, codec, slot, res, fp)
    rc, s, off = change.get("rc", rc), change.get("s", s), change.get("off", off)
    t.put(key, CHUNK_META.pack(rc, s, off, slen, codec, slot, res, fp), db=pool.meta.chunks)
    return old


def test_a_healthy_pool_checks_clean(pool_dir):
    want = _populate(pool_dir)
    job = check_offline(pool_dir)
    assert job.counts == {}, job.problems
    assert job.remaining() == 0 and job.state == "done"
    assert job.checked["chunks"] > 30 and job.checked["map_entries"] > 40
    assert job.checked["bytes_verified"] > 0
    _read_back(pool_dir, want)


def test_check_finds_and_repairs_a_broken_refcount_and_an_orphan(pool_dir):
    want = _populate(pool_dir)
    cids = {}

    def damage(pool):
        cids["bumped"] = _chunk_of(pool, 1, 1)  # v lba 1 (unique; w shares it: 2 refs)
        _set_chunk(pool, cids["bumped"], rc=5)
        cids["orphan"] = _chunk_of(pool, 1, 2, gen=1)  # only the snapshot's entry refers to it
        pool.meta.txn.delete(l2p_key(1, 2, 1), db=pool.meta.l2p)  # ... drop that entry

    _edit(pool_dir, damage)
    del want["v", 2]  # that block now reads zeros: its map entry is gone
    job = check_offline(pool_dir)
    assert job.counts == {"refcount": 1, "orphan": 1, "live_bytes": 1, "counters": 2}
    lines = "\n".join(check.summary_lines(job))
    assert (f"1 chunks have a wrong reference count: chunk {cids['bumped']} says 5, "
            "2 references found") in lines
    assert f"chunk {cids['orphan']} says 1, nothing refers to it" in lines
    assert job.remaining() == 5

    fixed = check_offline(pool_dir, repair=True)
    assert fixed.remaining() == 0 and all(p["fixed"] for p in fixed.problems)
    again = check_offline(pool_dir)
    assert again.counts == {} and again.remaining() == 0, again.problems
    _read_back(pool_dir, want)
    # the repaired refcount counts right: dropping both references frees the chunk
    eng = Engine(open_pool(pool_dir))
    eng.write(eng.volume("v"), B, bytes(B))
    eng.write(eng.volume("w"), 0, bytes(B))
    eng.close()
    assert check_offline(pool_dir).counts == {}


def test_check_finds_a_stale_record_and_repairs_it_from_the_valid_copy(pool_dir, caplog):
    """Chunk X was moved out of segment S, S was reused (new seq), and X's entry
    points at S again, where its old record still lies: same chunk id, same
    fingerprint, valid checksums. Only the record's seq tells it is stale."""
    eng = Engine(open_pool(pool_dir))
    v = eng.create_volume("v", 1 << 20)
    data = os.urandom(B)
    eng.write(v, 0, data)  # (alone in its segment: the "reuse" below makes all of it stale)
    eng.flush()
    cid = eng.maps.lookup(v, 0, v.gen)
    s, off, slen, _fp = eng.chunks.location(cid)
    codec, _ = eng.chunks.chunk_codec(cid)
    rec = eng.segs.read(s, off + ChunkHeader.SIZE, slen)  # (its tail may be in memory)
    eng.chunks.rewrite_chunk(cid, codec, rec)  # the cleaner's move: a valid copy elsewhere
    eng.flush()
    eng.close()

    def reuse(pool):
        t = pool.meta.txn
        raw = SEG_META.unpack(t.get(SEG_KEY.pack(s), db=pool.meta.segs))
        seq = 1 + max(SEG_META.unpack(x)[3] for _, x in t.cursor(db=pool.meta.segs))
        # segment s opened again (new seq, header rewritten); its old record of
        # chunk X survived at `off` (e.g. a write of the new use was lost)
        t.put(SEG_KEY.pack(s), SEG_META.pack(raw[0], raw[1], raw[2], seq, *raw[4:]),
              db=pool.meta.segs)
        for key in TAIL_KEYS:  # an open segment's committed tail follows its new seq
            tail = t.get(key, db=pool.meta.meta)
            if tail is not None and SEG_TAIL.unpack_from(tail)[0] == s:
                _, _, start = SEG_TAIL.unpack_from(tail)
                t.put(key, SEG_TAIL.pack(s, seq, start) + bytes(tail[SEG_TAIL.size:]),
                      db=pool.meta.meta)
        hdr = SegmentHeader(s, seq, pool.sb.uuid, 1).to_bytes()
        pool.backing.pwrite(pool.sb.data_offset + s * pool.sb.segment_size, hdr)
        _set_chunk(pool, cid, s=s, off=off)  # and X's entry points at it

    _edit(pool_dir, reuse)
    eng = Engine(open_pool(pool_dir))
    caplog.allowed_errors = True  # the read logs its checksum error
    with pytest.raises(CorruptData, match="stale record"):  # a read refuses it, never serves it
        eng.read(eng.volume("v"), 0, B)
    eng.close()

    job = check_offline(pool_dir)
    assert job.counts.get("stale_record") == 1, job.problems
    msg = next(p["message"] for p in job.problems if p["kind"] == "stale_record")
    assert msg.startswith(f"chunk {cid}: segment {s} offset {off} holds a stale record, "
                          "left from an earlier use of the segment")
    assert job.remaining() >= 1

    fixed = check_offline(pool_dir, repair=True)
    p = next(p for p in fixed.problems if p["kind"] == "stale_record")
    assert p["fixed"] and "now points to a valid copy at segment" in p["repair"]
    assert fixed.remaining() == 0
    assert check_offline(pool_dir).counts == {}
    _read_back(pool_dir, {("v", 0): data})
    pool = open_pool(pool_dir)
    assert pool.meta.txn.get(CHUNK_KEY.pack(cid), db=pool.meta.chunks) is not None
    pool.close()


def test_a_map_entry_whose_chunk_is_gone_is_reported_not_fixed(pool_dir):
    want = _populate(pool_dir)
    gone = {}

    def lose(pool):
        gone["cid"] = cid = _chunk_of(pool, 1, 5)
        pool.meta.txn.delete(CHUNK_KEY.pack(cid), db=pool.meta.chunks)

    _edit(pool_dir, lose)
    job = check_offline(pool_dir, repair=True)
    p = next(p for p in job.problems if p["kind"] == "missing_chunk")
    assert p["message"] == (f"volume id 1 lba 5 (generation 1) points to chunk {gone['cid']}, "
                            "which does not exist")
    assert not p["fixed"] and job.remaining() >= 1
    again = check_offline(pool_dir)
    assert set(again.counts) == {"missing_chunk"}  # the rest (live bytes, counters) repaired
    del want["v", 5]
    _read_back(pool_dir, want)


def test_a_damaged_record_with_no_copy_is_reported(pool_dir):
    want = _populate(pool_dir)
    pool = open_pool(pool_dir)
    cid = _chunk_of(pool, 1, 7)
    _, s, off, *_ = CHUNK_META.unpack(pool.meta.txn.get(CHUNK_KEY.pack(cid), db=pool.meta.chunks))
    pos = pool.sb.data_offset + s * pool.sb.segment_size + off + ChunkHeader.SIZE + 10
    block = bytearray(pool.backing.pread(pos // B * B, B))
    block[pos % B] ^= 0xFF
    pool.backing.pwrite(pos // B * B, bytes(block))
    pool.meta.abort()
    pool.close()
    job = check_offline(pool_dir, repair=True)
    assert job.counts == {"bad_record": 1}
    assert job.problems[0]["message"] == (f"chunk {cid}: segment {s} offset {off}: payload "
                                          "checksum mismatch")
    assert job.remaining() == 1 and not job.problems[0]["fixed"]
    del want["v", 7]
    _read_back(pool_dir, want)


@pytest.mark.parametrize("slice_", [16384, 5], ids=["one-transaction", "slices-of-5"])
def test_a_dedupe_index_gap_is_rebuilt(pool_dir, monkeypatch, slice_):
    """(slices-of-5: the rebuild commits every few entries, as a 10 TiB pool's must)"""
    monkeypatch.setattr(check, "COMMIT_EVERY", slice_)
    want = _populate(pool_dir)

    def drop(pool):
        cur = pool.meta.txn.cursor(db=pool.meta.fp)
        cur.first()
        cur.delete()

    _edit(pool_dir, drop)
    job = check_offline(pool_dir)
    assert set(job.counts) == {"index"}, job.problems
    assert "is not in the dedupe index" in job.problems[0]["message"]
    assert check_offline(pool_dir, repair=True).remaining() == 0
    assert check_offline(pool_dir).counts == {}
    _read_back(pool_dir, want)


def test_reference_counting_spills_sorted_runs(pool_dir, monkeypatch):
    """Bounded memory: with tiny runs the counts (merged from many runs) agree."""
    _populate(pool_dir)
    monkeypatch.setattr(check, "RUN_ENTRIES", 7)
    monkeypatch.setattr(check, "READ_BLOCK", 3)
    job = check_offline(pool_dir)
    assert job.counts == {}, job.problems

    def bump(pool):
        _set_chunk(pool, _chunk_of(pool, 1, 9), rc=1)  # it has 2 (the snapshot's, and live)

    _edit(pool_dir, bump)
    assert check_offline(pool_dir).counts == {"refcount": 1}


def test_an_open_pool_is_refused(engine, pool_dir):
    with pytest.raises(PoolLocked, match="open in another pstoraged"):
        check_offline(pool_dir)
