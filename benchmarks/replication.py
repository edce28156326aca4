"""Replication benchmarks, engine side (run by `scripts/bench --replication`).

In one process, no daemon, no network (the transport's cost comes on top):

1. Snapshot diff cost: a volume of --volume-size (default 16 GiB) with every
   block mapped, a snapshot, then 1 MiB changed (256 scattered 4 KiB writes,
   or one 1 MiB run with --contiguous); the diff of the snapshot and the live
   volume timed with the whole-map walk (what `snapshots.diff` did before
   changed-block tracking) and with the marked extents.
2. Async replication data path between two pools (engine/replica.py): initial
   sync of --data-size of mixed data (zeros, text, random), logical MiB/s and
   bytes "on the wire" (40 bytes per (lba, fingerprint) entry plus payloads)
   per logical byte; then the same content in a second volume (duplicate data).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time

from pstoraged.engine.engine import Engine
from pstoraged.engine.format import BLOCK_SIZE
from pstoraged.engine.pool import create_pool, open_pool
from pstoraged.engine.reducer import reduce_now
from pstoraged.engine.replica import HOLE, DeltaExport, ReplicaImport
from pstoraged.engine.snapshots import Catalog, diff
from pstoraged.engine.units import parse_size

from .system import GiB, MiB, log

ENTRY_BYTES = 40  # (lba u64, fingerprint 32 B) per block of a batch


def new_engine(directory: str, size: int, meta: int) -> Engine:
    os.makedirs(directory)
    create_pool(directory, os.path.join(directory, "dev.img"), file_size=size + meta,
                segment_size=4 * MiB, meta_size=meta)
    return Engine(open_pool(directory))


def bench_diff(tmp: str, vol_size: int, contiguous: bool) -> dict[str, float]:
    eng = new_engine(os.path.join(tmp, "diff"), 1 * GiB, max(256 * MiB, vol_size // 40))
    try:
        cat = Catalog(eng)
        vol = eng.create_volume("v", vol_size)
        # every block mapped to one chunk: the map, not the data, is what a diff walks
        pending = reduce_now(os.urandom(BLOCK_SIZE) * 256, 1)
        t = time.perf_counter()
        for off in range(0, vol_size, MiB):
            eng.write_reduced(vol, off, pending)
            if off % (256 * MiB) == 0:
                eng.flush()
        eng.flush()
        log(f"  filled {vol_size / GiB:.0f} GiB ({vol_size // BLOCK_SIZE} map entries) in "
            f"{time.perf_counter() - t:.0f} s")
        s = cat.create("v", "a")
        rnd = random.Random(1)
        if contiguous:
            eng.write(vol, rnd.randrange(vol_size // MiB) * MiB, os.urandom(MiB))
        else:
            for lba in rnd.sample(range(vol_size // BLOCK_SIZE), 256):
                eng.write(vol, lba * BLOCK_SIZE, os.urandom(BLOCK_SIZE))
        eng.flush()
        out = {}
        with eng.meta.env.begin(write=False) as txn:
            for name, tracked in (("full walk", False), ("marked extents", True)):
                t = time.perf_counter()
                d = diff(txn, eng.meta, vol.id, s.gen, vol.gen, tracked=tracked)
                out[name] = time.perf_counter() - t
                assert d["changed_blocks"] == 256, d["changed_blocks"]
                log(f"  diff ({name}): {out[name] * 1000:.1f} ms, {d['changed_blocks']} blocks")
        return out
    finally:
        eng.close()


def mixed(rnd: random.Random, n: int) -> bytes:
    out = []
    for _ in range(n):
        r = rnd.random()
        if r < 0.1:
            out.append(bytes(BLOCK_SIZE))
        elif r < 0.6:
            out.append((f"row {rnd.randrange(10**6)} value {rnd.random()} " * 120).encode()[:BLOCK_SIZE])
        else:
            out.append(rnd.randbytes(BLOCK_SIZE))
    return b"".join(out)


def replicate(src: Engine, scat: Catalog, dst: Engine, dcat: Catalog, volume: str,
              snap: str) -> tuple[int, int, float]:
    """A full round; (logical bytes, wire bytes, seconds)."""
    s = scat.get(volume, snap)
    t = time.perf_counter()
    ReplicaImport.create(dst, dcat, volume, s.size)
    tgt = ReplicaImport(dst, dcat, volume)
    exp = DeltaExport.between(src, scat, volume, None, snap)
    cursor = tgt.begin(None, snap, s.size)
    logical = wire = 0
    while True:
        batch = exp.batch(cursor)
        fps = [fp for _, fp in batch.blocks if fp is not HOLE]
        logical += len(fps) * BLOCK_SIZE
        payloads = exp.chunk_payloads(tgt.missing(fps))
        wire += len(batch.blocks) * ENTRY_BYTES + sum(len(p.data) + 45 for p in payloads)
        tgt.store_chunks(payloads)
        tgt.apply(batch)
        dst.commit_if_due()
        if batch.done:
            break
        cursor = batch.next_lba
    tgt.commit_point(snap)
    return logical, wire, time.perf_counter() - t


def bench_replication(tmp: str, data_size: int) -> dict[str, float]:
    size = 4 * data_size + 256 * MiB
    a = new_engine(os.path.join(tmp, "a"), size, 256 * MiB)
    b = new_engine(os.path.join(tmp, "b"), size, 256 * MiB)
    try:
        sa, sb = Catalog(a), Catalog(b)
        rnd = random.Random(2)
        for name in ("v", "w"):
            a.create_volume(name, data_size)
        for off in range(0, data_size, 4 * MiB):
            chunk = mixed(rnd, 4 * MiB // BLOCK_SIZE)
            a.write(a.volumes["v"], off, chunk)
            a.write(a.volumes["w"], off, chunk)  # the same content: a duplicate volume
        a.flush()
        sa.create("v", "s")
        sa.create("w", "s")
        out = {}
        for name, what in (("v", "mixed"), ("w", "duplicate")):
            logical, wire, secs = replicate(a, sa, b, sb, name, "s")
            out[f"{what} MiB/s"] = logical / MiB / secs
            out[f"{what} wire/logical"] = wire / logical
            log(f"  {what}: {logical / MiB:.0f} MiB logical in {secs:.1f} s "
                f"({logical / MiB / secs:.0f} MiB/s), wire {wire / MiB:.1f} MiB = "
                f"{wire / logical:.3f} per logical byte")
        return out
    finally:
        a.close()
        b.close()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench --replication")
    p.add_argument("--volume-size", default="16G", help="volume of the diff benchmark")
    p.add_argument("--contiguous", action="store_true", help="change one 1 MiB run, not 256 blocks")
    p.add_argument("--data-size", default="256M", help="data of the replication benchmark")
    p.add_argument("--tmpdir", default="/var/tmp")
    a = p.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="pstorage-bench-repl-", dir=a.tmpdir)
    try:
        log("snapshot diff, 1 MiB changed:")
        d = bench_diff(tmp, parse_size(a.volume_size), a.contiguous)
        log(f"  speed-up: {d['full walk'] / d['marked extents']:.0f}x")
        log("async replication data path (in process):")
        bench_replication(tmp, parse_size(a.data_size))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0
