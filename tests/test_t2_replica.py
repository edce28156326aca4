"""Async replication's engine side (engine/replica.py), two pools in one process:
deltas in batches, only missing chunks shipped, resume after restarts, refusal
of bad payloads, replica snapshots and their retention."""

from __future__ import annotations

import hashlib
import os
import random
import tracemalloc
import zlib
from dataclasses import dataclass, replace

import pytest

from pstoraged.engine import replica
from pstoraged.engine.engine import Engine
from pstoraged.engine.format import BLOCK_SIZE
from pstoraged.engine.pool import open_pool
from pstoraged.engine.replica import (
    HOLE,
    RECENT_LIMIT,
    DeltaExport,
    Outbound,
    ReplicaImport,
    verify_payload,
)
from pstoraged.engine.snapshots import Catalog
from pstoraged.errors import Conflict, CorruptData

from .conftest import crash, make_pool
from .test_t2_snapshots import check_references

MiB = 1 << 20
VOL = 8 * MiB


@dataclass
class Wire:
    """What a transport would have sent."""

    batches: int = 0
    blocks: int = 0  # (lba, fingerprint) entries
    payloads: int = 0
    payload_bytes: int = 0


class Side:
    """One pool: its engine and catalog, reopened at will."""

    def __init__(self, d: str) -> None:
        self.d = d
        self.open()

    def open(self) -> None:
        self.eng = Engine(open_pool(self.d))
        self.cat = Catalog(self.eng, grace_s=0)

    def reopen(self, crashed: bool = False) -> None:
        if crashed:
            crash(self.eng)
        else:
            self.eng.close()
        self.open()

    def close(self) -> None:
        if self.eng.pool.backing.fd >= 0:
            self.eng.close()


@pytest.fixture
def sides(tmp_path):
    a = Side(make_pool(str(tmp_path / "a"), size=64 * MiB))
    b = Side(make_pool(str(tmp_path / "b"), size=64 * MiB))
    yield a, b
    a.close()
    b.close()


def mixed_data(rnd: random.Random, nblocks: int) -> bytes:
    out = []
    for _ in range(nblocks):
        r = rnd.random()
        if r < 0.15:
            out.append(bytes(BLOCK_SIZE))  # zeros: a hole
        elif r < 0.6:
            out.append((f"line {rnd.randrange(1000)} " * 600).encode()[:BLOCK_SIZE])  # compressible
        else:
            out.append(rnd.randbytes(BLOCK_SIZE))
    return b"".join(out)


def replicate(a: Side, b: Side, volume: str, base: str | None, snap: str, replica: str,
              *, max_blocks: int = 64, stop_after: int | None = None, wire: Wire | None = None,
              keep: int = 4) -> Wire:
    """One round, as the transport drives it; stop_after: batches before an interruption."""
    wire = wire or Wire()
    if replica not in b.eng.volumes:
        ReplicaImport.create(b.eng, b.cat, replica, a.cat.get(volume, snap).size)
    tgt = ReplicaImport(b.eng, b.cat, replica)
    out = Outbound(a.eng, a.cat.volume(volume), "b")
    if out.state is None or out.state["snap"] != snap:
        out.start(base, snap)
    exp = DeltaExport.between(a.eng, a.cat, volume, base, snap)
    cursor = tgt.begin(base, snap, exp.size)  # the target says where to go on
    n = 0
    while True:
        if stop_after is not None and n == stop_after:
            return wire
        batch = exp.batch(cursor, max_blocks)
        assert len(batch.blocks) <= max_blocks and len(exp._recent) <= RECENT_LIMIT
        wire.batches += 1
        wire.blocks += len(batch.blocks)
        lacking = tgt.missing(fp for _, fp in batch.blocks if fp is not HOLE)
        payloads = exp.chunk_payloads(lacking)
        wire.payloads += len(payloads)
        wire.payload_bytes += sum(len(p.data) for p in payloads)
        tgt.store_chunks(payloads)
        tgt.apply(batch)
        out.advance(batch.next_lba)
        n += 1
        if batch.done:
            break
        cursor = batch.next_lba
    tgt.commit_point(snap, keep=keep)
    out.finish()
    a.eng.flush()
    return wire


def read_all(eng: Engine, vol) -> bytes:
    return eng.read(vol, 0, vol.size)


def same(a: Side, volume: str, snap: str, b: Side, replica: str) -> None:
    src = read_all(a.eng, a.cat.view(f"{volume}@{snap}"))
    assert read_all(b.eng, b.cat.view(f"{replica}@{snap}")) == src


def test_full_then_incremental_ships_only_changes(sides):
    a, b = sides
    rnd = random.Random(1)
    v = a.eng.create_volume("v", VOL)
    a.eng.write(v, 0, mixed_data(rnd, VOL // BLOCK_SIZE))
    a.cat.create("v", "s1")
    w1 = replicate(a, b, "v", None, "s1", "r")
    same(a, "v", "s1", b, "r")
    assert b.eng.volumes["r"].readonly
    mapped = v.stats.mapped_blocks
    assert w1.blocks == mapped  # holes of a full copy are not sent: nothing to undo
    assert 0 < w1.payloads <= mapped and w1.payload_bytes < mapped * BLOCK_SIZE  # compressed as stored

    # round two: 20 blocks rewritten, 7 trimmed
    changed = set()
    for lba in rnd.sample(range(VOL // BLOCK_SIZE), 20):
        a.eng.write(v, lba * BLOCK_SIZE, rnd.randbytes(BLOCK_SIZE))
        changed.add(lba)
    a.eng.trim(v, 1000 * BLOCK_SIZE, 7 * BLOCK_SIZE)
    a.cat.create("v", "s2")
    diff = {lba for lba, _ in a.eng.changed_blocks(v, a.cat.get("v", "s1").gen,
                                                  a.cat.get("v", "s2").gen)}
    w2 = replicate(a, b, "v", "s1", "s2", "r")
    assert w2.blocks == len(diff) <= 27 and changed <= diff
    assert w2.payloads == 20
    same(a, "v", "s2", b, "r")
    same(a, "v", "s1", b, "r")  # the older point is intact
    assert b.cat.list("r") and [s.name for s in b.cat.list("r")] == ["s1", "s2"]
    assert b.eng.read(b.eng.volumes["r"], 0, VOL) == a.eng.read(a.cat.view("v@s2"), 0, VOL)
    b.eng.flush()
    check_references(b.eng)


def test_duplicate_volume_ships_almost_no_chunk_bytes(sides):
    a, b = sides
    rnd = random.Random(2)
    data = mixed_data(rnd, VOL // BLOCK_SIZE)
    v = a.eng.create_volume("v", VOL)
    a.eng.write(v, 0, data)
    a.cat.create("v", "s1")
    first = replicate(a, b, "v", None, "s1", "r")
    w = a.eng.create_volume("w", VOL)  # the same content, another volume
    a.eng.write(w, 0, data)
    a.cat.create("w", "s1")
    second = replicate(a, b, "w", None, "s1", "rw")
    same(a, "w", "s1", b, "rw")
    assert first.payload_bytes > 1 * MiB
    assert second.payloads == 0 and second.payload_bytes == 0
    # what the wire carries instead: 40 bytes (lba, fingerprint) per data block
    assert second.blocks * 40 < first.payload_bytes / 10


@pytest.mark.parametrize("crashed", [False, True])
def test_interrupted_transfer_resumes_after_restarts(sides, crashed):
    a, b = sides
    rnd = random.Random(3)
    v = a.eng.create_volume("v", VOL)
    a.eng.write(v, 0, mixed_data(rnd, VOL // BLOCK_SIZE))
    a.cat.create("v", "s1")
    replicate(a, b, "v", None, "s1", "r")
    for lba in rnd.sample(range(VOL // BLOCK_SIZE), 300):
        a.eng.write(v, lba * BLOCK_SIZE, rnd.randbytes(BLOCK_SIZE))
    a.cat.create("v", "s2")
    wire = Wire()
    replicate(a, b, "v", "s1", "s2", "r", max_blocks=32, stop_after=3, wire=wire)
    b.eng.flush()
    a.eng.flush()
    if crashed:  # one more batch applied, never committed: it is lost, and sent again
        replicate(a, b, "v", "s1", "s2", "r", max_blocks=32, stop_after=1, wire=wire)
    # both daemons restart
    b.reopen(crashed=crashed)
    a.reopen(crashed=crashed)
    tgt = ReplicaImport(b.eng, b.cat, "r")
    assert tgt.delta is not None and tgt.delta["snap"] == "s2"
    assert 0 < tgt.delta["next_lba"] < VOL // BLOCK_SIZE
    out = Outbound(a.eng, a.eng.volumes["v"], "b")
    assert out.state == {"base": "s1", "snap": "s2", "next_lba": out.state["next_lba"]}
    resumed_at = tgt.begin("s1", "s2", VOL)
    assert resumed_at == tgt.delta["next_lba"]
    # the replica's last point still reads as s1 meanwhile
    same(a, "v", "s1", b, "r")
    rest = replicate(a, b, "v", "s1", "s2", "r", max_blocks=32)
    assert wire.blocks + rest.blocks <= 300 + 32  # at most one batch sent twice
    same(a, "v", "s2", b, "r")
    b.eng.flush()
    check_references(b.eng)


def test_staged_chunks_are_not_leaked_by_a_crash(sides):
    a, b = sides
    rnd = random.Random(4)
    v = a.eng.create_volume("v", VOL)
    a.eng.write(v, 0, mixed_data(rnd, 256))
    a.cat.create("v", "s1")
    ReplicaImport.create(b.eng, b.cat, "r", VOL)
    tgt = ReplicaImport(b.eng, b.cat, "r")
    exp = DeltaExport.between(a.eng, a.cat, "v", None, "s1")
    tgt.begin(None, "s1", VOL)
    batch = exp.batch(0, 64)
    tgt.store_chunks(exp.chunk_payloads(tgt.missing(fp for _, fp in batch.blocks if fp)))
    b.eng.flush()  # stored, never applied
    b.reopen(crashed=True)
    assert b.eng.chunks.live_chunks > 0
    tgt = ReplicaImport(b.eng, b.cat, "r")
    tgt.abort()  # a staging reference per stored chunk: the abort frees them
    b.eng.flush()
    assert b.eng.chunks.live_chunks == 0
    check_references(b.eng)


def test_corrupt_or_malicious_payloads_are_refused(sides):
    a, b = sides
    v = a.eng.create_volume("v", VOL)
    a.eng.write(v, 0, (b"compressible " * 400)[:BLOCK_SIZE] + os.urandom(BLOCK_SIZE))
    a.cat.create("v", "s1")
    ReplicaImport.create(b.eng, b.cat, "r", VOL)
    tgt = ReplicaImport(b.eng, b.cat, "r")
    exp = DeltaExport.between(a.eng, a.cat, "v", None, "s1")
    tgt.begin(None, "s1", VOL)
    batch = exp.batch(0)
    good = exp.chunk_payloads(tgt.missing(fp for _, fp in batch.blocks))
    assert len(good) == 2 and good[0].codec != 0
    p = good[0]
    flipped = bytes([p.data[0] ^ 1]) + p.data[1:]
    other = good[1]
    bad = [
        replace(p, data=flipped),  # the CRC catches it
        replace(p, data=flipped, crc=zlib.crc32(flipped)),  # decoding or the hash
        replace(p, fingerprint=other.fingerprint),  # someone else's fingerprint
        replace(p, codec=77),
        replace(p, raw_len=1 << 30),
        replace(other, data=other.data * 2, crc=zlib.crc32(other.data * 2)),
        replace(p, fingerprint=p.fingerprint[:16]),
    ]
    for q in bad:
        with pytest.raises(CorruptData):
            verify_payload(q)
        with pytest.raises(CorruptData):
            tgt.store_chunks([good[1], q])  # one bad payload: nothing of the call is stored
        assert b.eng.chunks.live_chunks == 0
    with pytest.raises(Conflict, match="lacks 2 chunk"):
        tgt.apply(batch)  # nothing stored: nothing mapped
    tgt.store_chunks(good)
    tgt.apply(batch)
    tgt.commit_point("s1")
    same(a, "v", "s1", b, "r")


def test_base_mismatch_and_a_different_half_applied_delta(sides):
    a, b = sides
    rnd = random.Random(5)
    v = a.eng.create_volume("v", VOL)
    a.eng.write(v, 0, mixed_data(rnd, 512))
    a.cat.create("v", "s1")
    replicate(a, b, "v", None, "s1", "r")
    tgt = ReplicaImport(b.eng, b.cat, "r")
    with pytest.raises(Conflict, match="holds s1"):
        tgt.begin(None, "s9", VOL)
    a.eng.write(v, 0, rnd.randbytes(300 * BLOCK_SIZE))
    a.cat.create("v", "s2")
    a.cat.create("v", "s3")
    replicate(a, b, "v", "s1", "s2", "r", max_blocks=16, stop_after=3)
    live = b.eng.volumes["r"]
    before = read_all(b.eng, b.cat.view("r@s1"))
    assert read_all(b.eng, live) != before  # half applied
    # the source gives up s2 and sends s3 instead: the half delta is undone first
    replicate(a, b, "v", "s1", "s3", "r")
    same(a, "v", "s3", b, "r")
    assert [s.name for s in b.cat.list("r")] == ["s1", "s3"]
    b.eng.flush()
    check_references(b.eng)


def test_replica_snapshots_keep_last_n_and_locks_hold(sides):
    a, b = sides
    rnd = random.Random(6)
    v = a.eng.create_volume("v", VOL)
    base = None
    for i in range(5):
        a.eng.write(v, i * BLOCK_SIZE, rnd.randbytes(BLOCK_SIZE))
        a.cat.create("v", f"s{i}")
        replicate(a, b, "v", base, f"s{i}", "r", keep=2)
        if i == 1:  # SafeMode on the target: s1 is locked
            b.cat.lock("r", "s1", b.eng.clock() + 3600)
        base = f"s{i}"
    assert [s.name for s in b.cat.list("r")] == ["s1", "s3", "s4"]
    assert ReplicaImport(b.eng, b.cat, "r").points == ["s1", "s3", "s4"]
    same(a, "v", "s4", b, "r")
    same(a, "v", "s1", b, "r")


def test_memory_is_bounded_by_the_batch(sides, monkeypatch):
    a, b = sides
    monkeypatch.setattr(replica, "RECENT_LIMIT", 100)
    v = a.eng.create_volume("v", 32 * MiB)
    block = os.urandom(BLOCK_SIZE)
    for i in range(0, 32 * MiB, MiB):  # 8192 data blocks, one chunk: the map is what counts
        a.eng.write(v, i, block * (MiB // BLOCK_SIZE))
    a.cat.create("v", "s1")
    exp = DeltaExport.between(a.eng, a.cat, "v", None, "s1")
    tracemalloc.start()
    try:
        cursor, seen = 0, 0
        while True:
            batch = exp.batch(cursor, 64)
            seen += len(batch.blocks)
            assert len(exp._recent) <= 100
            if batch.done:
                break
            cursor = batch.next_lba
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == 8192
    assert peak < 256 << 10, peak  # a per-block dict of the volume would be ~1 MiB
    # a fingerprint no longer in the recent table is still found (the exact index)
    assert len(exp.chunk_payloads([hashlib.sha256(block).digest()])) == 1
