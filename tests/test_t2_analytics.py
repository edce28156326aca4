"""Level 2: analytics inside the engine, with a controllable clock: data
temperature, capacity history and its compaction, tiering recommendations
and the recompression job."""

from __future__ import annotations

import os
import random

import pytest

from pstoraged.analytics.history import DAILY, DAY, HOURLY, RAW, CapacityHistory, snapshot
from pstoraged.analytics.temperature import MAX_PENDING, HeatMap, Thresholds
from pstoraged.analytics.tiering import Tiering
from pstoraged.engine.engine import Engine
from pstoraged.engine.format import BLOCK_SIZE
from pstoraged.engine.pool import open_pool
from pstoraged.errors import NotFound

from .conftest import crash, make_pool
from .executor_util import Front

MiB = 1 << 20
T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t

    def advance(self, days: float) -> None:
        self.t += days * DAY


@pytest.fixture
def clock():
    return Clock()


def open_engine(path, clock) -> Engine:
    """An engine with its heat map attached, as the daemon opens it (accesses are
    recorded by an executor: I/O that should count goes through `Front`)."""
    e = Engine(open_pool(str(path)), clock=clock)
    HeatMap.attach(e)
    return e


@pytest.fixture
def eng(tmp_path, clock):
    make_pool(str(tmp_path), size=160 << 20)
    e = open_engine(tmp_path, clock)
    yield e
    if e.pool.backing.fd >= 0:
        e.close()


@pytest.fixture
def io(eng):
    """eng's I/O through an executor, which records the accesses (as in the daemon)."""
    return Front(eng)


def text_block(i: int) -> bytes:
    """Compressible, distinct blocks (so dedupe does not hide compression)."""
    line = f"{i:08d} cold log line: user=alice action=read path=/srv/data/{i}\n".encode()
    return (line * (BLOCK_SIZE // len(line) + 1))[:BLOCK_SIZE]


def temps(eng: Engine, name: str, th: Thresholds | None = None) -> dict[str, int]:
    v = eng.volume(name)
    t = HeatMap.of(eng).classify(v.id, v.name, v.size, v.stats.mapped_blocks * BLOCK_SIZE,
                          th or Thresholds())
    return {c: d["bytes"] for c, d in t.classes.items()} | {"untracked": t.untracked_bytes}


def test_temperature_classes_follow_the_clock(eng, io, clock, tmp_path):
    v = eng.create_volume("v", 16 * MiB)
    for e in range(4):  # four extents, written 40, 10, 3 days and 1 hour ago
        io.write(v, e * MiB, os.urandom(MiB // 2))  # half an extent of data each
        clock.advance((30, 7, 3 - 1 / 24, 1 / 24)[e])
    io.write(v, 8 * MiB, bytes(MiB))  # zeros: an access, but no data
    assert temps(eng, "v") == {"hot": MiB // 2, "warm": MiB // 2, "cold": MiB // 2,
                               "frozen": MiB // 2, "untracked": 0}
    # a read warms an extent up; the thresholds are configurable
    io.read(v, 0, 4096)
    t = temps(eng, "v")
    assert t["frozen"] == 0 and t["hot"] == MiB
    assert temps(eng, "v", Thresholds(0.01, 0.02, 0.03))["frozen"] == 3 * MiB // 2
    # trimming data removes it from the classes; everything survives a restart
    io.trim(v, MiB, MiB)
    eng.flush()
    before = temps(eng, "v")
    assert before["cold"] == 0 and before["hot"] == MiB and before["warm"] == MiB // 2
    eng.close()
    e2 = open_engine(tmp_path, clock)
    try:
        assert temps(e2, "v") == before
    finally:
        e2.close()


def test_temperature_memory_is_bounded_and_crash_consistent(eng, io, clock, tmp_path):
    v = eng.create_volume("big", 1 << 40)  # 1 TiB thin volume: a million extents
    for e in range(MAX_PENDING + 100):
        HeatMap.of(eng).touch(v.id, e * MiB, 512)
        assert len(HeatMap.of(eng)._last) <= MAX_PENDING
    io.write(v, 0, os.urandom(2 * BLOCK_SIZE))
    eng.flush()
    io.write(v, 5 * MiB, os.urandom(BLOCK_SIZE))  # not flushed: lost in the crash
    crash(eng)
    e2 = open_engine(tmp_path, clock)
    try:
        vv = e2.volume("big")
        assert vv.stats.mapped_blocks == 2
        t = HeatMap.of(e2).classify(vv.id, "big", vv.size, 2 * BLOCK_SIZE, Thresholds())
        assert t.classes["hot"]["bytes"] == 2 * BLOCK_SIZE and t.untracked_bytes == 0
        # deleting the volume drops its temperature records in the background
        e2.delete_volume("big")
        while e2.background.step(1000, busy=False):
            pass
        assert HeatMap.of(e2).extents(vv.id) == []
    finally:
        e2.close()


def test_capacity_history_compacts_and_survives_restart(eng, clock, tmp_path):
    h = CapacityHistory(eng.meta)
    v = eng.create_volume("v", 64 * MiB)
    # 100 days of samples every 6 hours, the pool growing 4 KiB a sample
    for i in range(400):
        eng.write(v, (i % 1000) * BLOCK_SIZE, os.urandom(BLOCK_SIZE))
        h.record(clock(), snapshot(eng))
        clock.advance(0.25)
    folded = h.compact(clock())
    assert folded > 300
    raw, hourly, daily = (list(h.rows(t)) for t in (RAW, HOURLY, DAILY))
    assert all(t >= clock() - 2 * DAY for t, _ in raw)
    assert all(clock() - 90 * DAY <= t < clock() - 2 * DAY for t, _ in hourly)
    assert daily and all(t < clock() - 90 * DAY for t, _ in daily)
    assert all(t % DAY == 0 for t, _ in daily)
    # every sample is accounted for, and averages lie between their inputs
    assert sum(r["n"] for _, r in raw + hourly + daily) == 400
    d0 = daily[1][1]  # (the first day is partial)
    assert d0["n"] == 4 and d0["volumes"]["v"]["logical"] > 0
    series = h.series()
    assert [t for t, _ in series] == sorted(t for t, _ in series)
    used = [r["volumes"]["v"]["logical"] for _, r in series]
    assert used == sorted(used)  # growth survives averaging
    eng.flush()
    eng.close()
    e2 = open_engine(tmp_path, clock)
    try:
        assert len(CapacityHistory(e2.meta).series()) == len(series)
    finally:
        e2.close()


def test_recompress_cold_data_recommendation_and_job(eng, io, clock, tmp_path):
    v = eng.create_volume("logs", 32 * MiB)  # lz4 by default
    hot = eng.create_volume("hot", 8 * MiB)
    data = b"".join(text_block(i) for i in range(1024))  # 4 MiB of compressible text
    io.write(v, 0, data)
    io.write(hot, 0, b"".join(text_block(10_000 + i) for i in range(256)))
    eng.flush()
    clock.advance(45)
    io.read(hot, 0, MiB)  # 'hot' stays hot: no recommendation for it
    t = Tiering(eng)
    recs = {r["id"]: r for r in t.recommendations()["recommendations"]}
    assert set(recs) == {"recompress-cold:logs"}
    rec = recs["recompress-cold:logs"]
    assert rec["estimated_savings_bytes"] > 0 and "sample" in rec["estimate"]
    stored_before = eng.chunks.live_stored
    out = t.apply("recompress-cold:logs")
    job = t.jobs[out["job"]["id"]]
    steps = 0
    while eng.background.step(64, busy=False):
        steps += 1
        assert 0 <= job.to_dict()["progress"] <= 1
    assert job.state == "done" and job.extents_done == job.extents_total == 4
    assert job.chunks_examined == 1024 and job.chunks_rewritten > 900
    saved = job.bytes_before - job.bytes_after
    assert saved > 0 and eng.chunks.live_stored == stored_before - saved
    # the estimate was in the right range (sampled, so allow a wide margin)
    assert 0.5 * saved <= rec["estimated_savings_bytes"] <= 2 * saved
    assert io.read(v, 0, len(data)) == data
    eng.flush()
    eng.close()
    e2 = open_engine(tmp_path, clock)
    try:
        assert Front(e2).read(e2.volume("logs"), 0, len(data)) == data
        # done: the rule no longer fires
        assert not any(r["kind"] == "recompress-cold"
                       for r in Tiering(e2).recommendations()["recommendations"])
    finally:
        e2.close()


def test_recompression_crash_midway_loses_nothing(eng, io, clock, tmp_path):
    v = eng.create_volume("logs", 32 * MiB)
    data = b"".join(text_block(i) for i in range(768))
    io.write(v, 0, data)
    eng.flush()
    clock.advance(60)
    t = Tiering(eng)
    job = t.jobs[t.apply("recompress-cold:logs")["job"]["id"]]
    stored0 = eng.chunks.live_stored
    assert eng.background.step(64, busy=False)
    eng.flush()  # half committed ...
    committed = job.chunks_rewritten
    stored1 = eng.chunks.live_stored
    assert committed > 0 and stored1 < stored0, "nothing was rewritten before the commit"
    assert eng.background.step(64, busy=False)  # ... the rest lost in the crash
    assert job.chunks_rewritten > committed and eng.chunks.live_stored < stored1, \
        "nothing was rewritten between the commit and the crash"
    assert job.state != "done", "the job finished: the crash would not be midway"
    crash(eng)
    e2 = open_engine(tmp_path, clock)
    try:
        assert Front(e2).read(e2.volume("logs"), 0, len(data)) == data
        assert e2.chunks.live_stored == stored1  # the committed half stays rewritten, the rest as before
    finally:
        e2.close()


def test_no_reduction_and_overprovisioned_rules(eng, clock):
    rnd = random.Random(5)
    v = eng.create_volume("random", 80 * MiB)
    big = eng.create_volume("big", 1 << 40)
    eng.write(big, 0, text_block(1))
    for i in range(0, 64 * MiB + MiB, MiB):
        eng.write(v, i, rnd.randbytes(MiB))
    t = Tiering(eng)
    recs = {r["id"]: r for r in t.recommendations()["recommendations"]}
    assert "no-reduction:random" in recs and "overprovisioned:big" in recs
    assert not recs["overprovisioned:big"]["applicable"]
    assert recs["overprovisioned:big"]["estimated_savings_bytes"] == (1 << 40) - BLOCK_SIZE
    with pytest.raises(NotFound):
        t.apply("recompress-cold:random")
    with pytest.raises(NotFound):
        t.apply("bogus")
    assert t.apply("no-reduction:random") == {"applied": "no-reduction:random", "compression": "none"}
    assert eng.volume("random").compression == "none"
    assert "no-reduction:random" not in {r["id"] for r in t.recommendations()["recommendations"]}


def test_scrub_reads_every_chunk_and_reports_the_bad_one(eng, caplog):
    from pstoraged.engine.format import CHUNK_KEY, CHUNK_META
    from pstoraged.engine.jobs import JobRegistry
    from pstoraged.engine.scrub import ScrubJob, ScrubRun

    caplog.allowed_errors = True  # the engine logs the checksum error
    v = eng.create_volume("v", 16 * MiB)
    eng.write(v, 0, os.urandom(2 * MiB))
    eng.flush()
    cid = eng._lookup(v, 100, v.gen)
    _, s, off, *_ = CHUNK_META.unpack(eng.meta.txn.get(CHUNK_KEY.pack(cid), db=eng.meta.chunks))
    with open(eng.pool.backing.path, "r+b") as f:
        f.seek(eng.segs.offset(s) + off + 64 + 10)
        f.write(b"\x00\x01\x02")
    reg = JobRegistry()
    job = reg.add(lambda i: ScrubJob(i))
    eng.background.start_job(ScrubRun(eng, job).step)
    progress = []
    while eng.background.step(128, busy=True):
        progress.append(job.to_dict()["progress"])
    assert progress == sorted(progress) and progress[-1] == 1.0 and len(progress) > 10
    assert job.state == "done" and job.chunks_checked == 512 == job.chunks_total
    assert job.bad_chunks == 1 and job.bad[0]["chunk"] == cid and job.bad[0]["segment"] == s
    assert eng.chunks.checksum_errors == 1


def test_scrub_counts_a_device_read_error_and_goes_on(eng, monkeypatch):
    """A chunk the device cannot read is listed as bad; the chunks after it in
    the same batch are still checked (before, the error ended the batch)."""
    from pstoraged.engine.jobs import JobRegistry
    from pstoraged.engine.scrub import ScrubJob, ScrubRun
    from pstoraged.errors import DeviceIOError

    v = eng.create_volume("v", 16 * MiB)
    eng.write(v, 0, os.urandom(1 * MiB))
    eng.flush()
    bad = eng.maps.lookup(v, 10, v.gen)
    real = eng.chunks.read_chunk

    def read_chunk(cid):
        if cid == bad:
            raise DeviceIOError("read of segment 0 failed: Input/output error")
        return real(cid)

    monkeypatch.setattr(eng.chunks, "read_chunk", read_chunk)
    job = JobRegistry().add(lambda i: ScrubJob(i))
    eng.background.start_job(ScrubRun(eng, job).step)
    while eng.background.step(4096, busy=True):
        pass
    assert job.state == "done" and job.chunks_checked == 256
    assert job.bad_chunks == 1 and job.bad[0]["chunk"] == bad
    assert "Input/output error" in job.bad[0]["problem"]


# ---------------------------------------------------------------- reduction report
def reduction(eng: Engine) -> dict:
    """GET /api/v1/metrics/reduction's report, on the committed state."""
    from pstoraged.control.api.analytics import reduction_report
    from pstoraged.engine.usage import walk_volume

    eng.flush()
    with eng.meta.env.begin(write=False) as txn:
        walks = {v.id: walk_volume(txn, eng.meta, v.id, v.gen, v.frozen)
                 for v in eng.volumes.values()}
        walks.update({vid: walk_volume(txn, eng.meta, vid, None, []) for vid in eng.reclaiming})
    vols = sorted(eng.volumes.values(), key=lambda v: v.name)
    return reduction_report(vols, eng.statistics(), walks, list(eng.reclaiming), 0.0)


def mixed(n: int, seed: int = 0) -> bytes:
    """Blocks that compress (text), repeat (dedupe), are zero, or are random."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        k = i % 4
        out.append(text_block(seed * 10_000 + i) if k == 0 else text_block(7) if k == 1
                   else bytes(BLOCK_SIZE) if k == 2 else rnd.randbytes(BLOCK_SIZE))
    return b"".join(out)


def held(r: dict) -> int:
    return sum(r["pool"]["stored_by"].values())


def test_one_volume_reduction_equals_the_pools_and_goes_down(eng):
    v = eng.create_volume("v", 4 * MiB)
    eng.write(v, 0, mixed(256))
    eng.write(v, 0, mixed(64, seed=1))  # overwrites: the ingest counters count them again
    r = reduction(eng)
    p, x = r["pool"], r["volumes"]["v"]
    # one volume holding all data: the same figures as the pool, the same ratios
    for k in ("logical_bytes", "unique_bytes", "stored_bytes", "dedupe_ratio",
              "compression_ratio", "data_reduction_ratio"):
        assert x[k] == p[k], k
    assert x["exclusive_bytes"] == p["stored_bytes"] and x["shared_bytes"] == 0
    assert held(r) == p["stored_bytes"]
    ingest = x["ingest"]
    assert ingest["written_bytes"] == 320 * BLOCK_SIZE and ingest["zero_bytes"] == 80 * BLOCK_SIZE
    before = x
    # zeros over data, a trim, then overwriting with duplicates: the current figures go down
    eng.zero(v, 0, 32 * BLOCK_SIZE)
    eng.trim(v, 64 * BLOCK_SIZE, 64 * BLOCK_SIZE)
    eng.write(v, 128 * BLOCK_SIZE, text_block(7) * 64)
    r = reduction(eng)
    x = r["volumes"]["v"]
    for k in ("logical_bytes", "unique_bytes", "stored_bytes"):
        assert x[k] < before[k], k
        assert x[k] == r["pool"][k], k
    assert x["data_reduction_ratio"] == r["pool"]["data_reduction_ratio"]
    # ... while the ingest counters never do
    assert x["ingest"]["written_bytes"] > ingest["written_bytes"]
    assert x["ingest"]["new_chunk_stored_bytes"] == ingest["new_chunk_stored_bytes"]
    assert "share" in r["explanation"]["stored_bytes"] and "ingest" in r["explanation"]


def test_volume_shares_add_up_to_the_pool(eng):
    a = eng.create_volume("a", 4 * MiB)
    b = eng.create_volume("b", 4 * MiB)
    shared = os.urandom(32 * BLOCK_SIZE)
    eng.write(a, 0, shared + mixed(64, seed=2))
    eng.write(a, MiB, shared[:BLOCK_SIZE] * 4)  # duplicates within a: still a's alone
    eng.write(b, 0, shared)
    eng.write(b, MiB, os.urandom(16 * BLOCK_SIZE))
    r = reduction(eng)
    p, xa, xb = r["pool"], r["volumes"]["a"], r["volumes"]["b"]
    assert abs(xa["stored_bytes"] + xb["stored_bytes"] - p["stored_bytes"]) <= 2
    assert abs(xa["unique_bytes"] + xb["unique_bytes"] - p["unique_bytes"]) <= 2
    assert xa["logical_bytes"] + xb["logical_bytes"] == p["logical_bytes"]
    rec = BLOCK_SIZE + 64  # a random block's record
    # the 32 random blocks both hold are shared (block 0 has a's 4 duplicates too)
    assert xb["shared_bytes"] == xa["shared_bytes"] == 32 * rec
    assert xb["exclusive_bytes"] == 16 * rec
    assert xa["exclusive_bytes"] + xa["shared_bytes"] + xb["exclusive_bytes"] == p["stored_bytes"]
    # the share of a shared chunk is split by references: b holds 32 of a's 37 + 32 references
    assert xb["stored_bytes"] == round(16 * rec + 31 * rec / 2 + rec / 6)
    assert held(r) == p["stored_bytes"]


def test_snapshots_restores_and_destroyed_volumes_hold_their_part(eng):
    from pstoraged.engine.snapshots import Catalog

    cat = Catalog(eng)
    v = eng.create_volume("v", 4 * MiB)
    w = eng.create_volume("w", 4 * MiB)
    eng.write(v, 0, os.urandom(64 * BLOCK_SIZE))
    eng.write(w, 0, os.urandom(8 * BLOCK_SIZE))
    cat.create("v", "s")
    eng.write(v, 64 * BLOCK_SIZE, os.urandom(64 * BLOCK_SIZE))
    eng.write(v, 0, os.urandom(16 * BLOCK_SIZE))  # the snapshot alone holds the old 16
    r = reduction(eng)
    rec = BLOCK_SIZE + 64
    x = r["volumes"]["v"]
    assert x["logical_bytes"] == 128 * BLOCK_SIZE and x["stored_bytes"] == 128 * rec
    assert x["snapshot_stored_bytes"] == r["pool"]["stored_by"]["snapshots"] == 16 * rec
    assert held(r) == r["pool"]["stored_by"]["volumes"] + 16 * rec == r["pool"]["stored_bytes"]
    written = x["ingest"]["written_bytes"]
    # a restore brings the volume back to 64 blocks: its figures go down, ingest does not
    cat.restore("v", "s")
    r = reduction(eng)
    x = r["volumes"]["v"]
    assert x["logical_bytes"] == 64 * BLOCK_SIZE
    # the 16 restored blocks are new references to the snapshot's chunks: half theirs
    assert x["stored_bytes"] == 48 * rec + 16 * rec // 2 == 128 * rec - 72 * rec
    assert x["snapshot_stored_bytes"] == 16 * rec // 2
    assert x["ingest"]["written_bytes"] == written
    assert held(r) == r["pool"]["stored_bytes"]
    # a destroyed volume is out of the volume rows; the pool says what it still holds
    cat.destroy_volume("w")
    r = reduction(eng)
    assert set(r["volumes"]) == {"v"}
    assert r["pool"]["stored_by"]["destroyed_volumes"] == 8 * rec
    assert held(r) == r["pool"]["stored_bytes"]
    cat.eradicate_volume("w")
    r = reduction(eng)
    assert r["pool"]["stored_by"]["destroyed_volumes"] == 0
    assert r["pool"]["stored_by"]["released"] == 8 * rec  # until reclaim_step gives it back
    assert held(r) == r["pool"]["stored_bytes"]


def test_no_reduction_is_shown_as_a_cost(eng, capsys):
    import argparse

    from pstoraged.control import cli
    from pstoraged.engine.format import record_size

    rnd = random.Random(6)
    v = eng.create_volume("mostly-random", 80 * MiB)
    for i in range(0, 64 * MiB + MiB, MiB):  # one block in 16 compresses: ~6% saved
        eng.write(v, i, b"".join(text_block(i + j) if j % 16 == 0 else rnd.randbytes(BLOCK_SIZE)
                                 for j in range(MiB // BLOCK_SIZE)))
    st = v.stats
    recs = {r["id"]: r for r in Tiering(eng).recommendations()["recommendations"]}
    rec = recs["no-reduction:mostly-random"]
    cost = st.unique_bytes // BLOCK_SIZE * record_size(BLOCK_SIZE) - st.stored_bytes
    assert cost > 0 and rec["estimated_savings_bytes"] == -cost  # turning compression off loses it
    assert "cost" in rec["estimate"] and "costs" in rec["action"]

    class Client:
        def get(self, path: str) -> dict:
            return {"recommendations": list(recs.values()), "notes": []}

    cli.cmd_tiering_list(argparse.Namespace(json=False), Client())
    line = next(x for x in capsys.readouterr().out.splitlines()
                if x.startswith("no-reduction:mostly-random "))
    assert f"costs ~{cli.human_bytes(cost)}" in line
