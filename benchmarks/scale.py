"""Scale benchmarks (run by `scripts/bench --scale`): does a 10 TiB pool cost
more per operation, or more memory, than a 1 GiB one?

Engine level, no daemon, on sparse pool files in a temporary directory:

1. Segment allocation: the cost of opening a segment (SegmentLog._allocate
   and sealing it) on a 1 GiB and a 10 TiB pool of 4 MiB segments, with
   random wear (erase counts 0..99) on the free segments; target: ratio < 2.
   For reference, the full scan it replaced, timed on the same 10 TiB pool.
2. Pool open time (open_pool + Engine) for both, the 10 TiB one also with
   every segment's record in the `segs` table (a pool used everywhere).
3. Dedupe index memory per TiB of unique 4 KiB chunks (fpindex.filter_plan),
   and the false "maybe" rate at the quota: synthetic fingerprints in a
   filter scaled down by a power of two (same bits per entry, so the same
   rate), filled to its rebuild point (the worst case); at 10 TiB under the
   default 1 GiB quota the index is sparse: B-tree reads per new block =
   sample rate x false "maybe" rate. Target: <= 1 GiB per TiB.
4. Metadata bytes per TiB: --meta-mib of unique data written, then the same
   data again into a second volume (all duplicates); LMDB bytes used per
   table (pages x page size) per unique chunk and per logical 4 KiB block,
   extrapolated to a TiB.
5. Flush-heavy writes: 4 KiB writes of compressible data (Python source
   files) with a flush (FUA) after each; segment bytes used per byte
   written, now and with the old padding of the tail at every flush.

    scripts/bench --scale [--quick] [--json FILE] [--tmpdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pstoraged.engine import fpindex
from pstoraged.engine.engine import Engine
from pstoraged.engine.format import BLOCK_SIZE, SEG_FREE, SEG_KEY, SEG_META, SEG_SEALED
from pstoraged.engine.pool import create_pool, open_pool
from pstoraged.engine.segments import RELOCATED, USER

from .system import GiB, MiB, log

TiB = 1 << 40
SEGMENT = 4 * MiB
ALLOC_RATIO_GOAL = 2.0
INDEX_GOAL = GiB  # bytes of index memory per TiB of unique data


def new_pool(tmp: str, name: str, size: int) -> str:
    d = os.path.join(tmp, name)
    create_pool(d, os.path.join(d, "dev.img"), file_size=size, segment_size=SEGMENT)
    return d


def open_engine(d: str, **kw: Any) -> tuple[Engine, float]:
    t = time.perf_counter()
    eng = Engine(open_pool(d), **kw)
    return eng, time.perf_counter() - t


# ---------------------------------------------------------------- 1, 2
def allocation(tmp: str, size: int, cycles: int, old_scan: bool) -> dict[str, Any]:
    d = new_pool(tmp, f"alloc-{size >> 30}g", size)
    eng, opened = open_engine(d)
    segs = eng.segs
    rng = np.random.default_rng(1)
    np.frombuffer(segs.erase, dtype=np.uint32)[:] = rng.integers(0, 100, segs.count)
    segs._recount()
    costs = []
    for i in range(min(cycles, segs.count - 2)):  # (a 1 GiB pool has 255 segments)
        stream = RELOCATED if i % 4 == 3 else USER
        t = time.perf_counter()
        s = segs._allocate(stream, reserve_ok=True)
        segs._seal(s)
        costs.append(time.perf_counter() - t)
    out = {"pool_bytes": size, "segments": segs.count, "open_s": opened,
           "alloc_us_median": float(np.median(costs)) * 1e6,
           "alloc_us_p99": float(np.percentile(costs, 99)) * 1e6}
    if old_scan:  # the loop _allocate ran before (USER stream), for reference
        t = time.perf_counter()
        best, best_erase = -1, 1 << 32
        for s in range(segs.count):
            if (segs.state[s] == SEG_FREE and segs.erase[s] < best_erase
                    and s not in segs.discarding):
                best, best_erase = s, segs.erase[s]
        assert best >= 0
        out["old_scan_s"] = time.perf_counter() - t
    eng.meta.abort()
    eng.segs.close()
    eng.pool.close()
    return out


def open_used(tmp: str, size: int) -> dict[str, Any]:
    """Open time of a pool whose every segment has a record in the segs table."""
    d = new_pool(tmp, "used", size)
    eng, _ = open_engine(d)
    txn, n = eng.meta.txn, eng.segs.count
    rec = SEG_META.pack(SEG_SEALED, USER, 0, 1, SEGMENT, SEGMENT // 2, 3, 0)
    cur = txn.cursor(db=eng.meta.segs)
    cur.putmulti(((SEG_KEY.pack(s), rec) for s in range(n)), append=True)
    eng.meta.commit()
    eng.segs.close()
    eng.pool.close()
    eng, opened = open_engine(d)
    eng.meta.abort()
    eng.segs.close()
    eng.pool.close()
    return {"segments": n, "open_s": opened}


# ---------------------------------------------------------------- 3
def index_memory(quota: int, scale_shift: int) -> dict[str, Any]:
    if fpindex.FingerprintFilter is None:
        return {"error": "pstoraged.engine._filter is not built"}
    out: dict[str, Any] = {"quota": quota, "per_tib": {}}
    for tib in (1, 10):
        chunks = tib * TiB // BLOCK_SIZE
        size, shift = fpindex.filter_plan(chunks, quota)
        full, _ = fpindex.filter_plan(chunks, 1 << 50)  # the same index without a quota
        # a filter 2**scale_shift times smaller at the same load: the same rate
        small = size >> scale_shift
        capacity = small * 8 // fpindex.FILTER_BITS_PER_ENTRY  # filled to its rebuild point
        flt = fpindex.FingerprintFilter(small)
        for _ in range(0, capacity, 65536):
            flt.add_many([os.urandom(32) for _ in range(min(65536, capacity))])
        probes = 200_000
        false = sum(flt.maybe(os.urandom(32)) for _ in range(probes))
        rate = false / probes
        out["per_tib"][f"{tib}TiB"] = {
            "unique_chunks": chunks, "filter_bytes": size, "sample_shift": shift,
            "filter_bytes_unbounded": full,
            "bytes_per_tib_unbounded": full / tib,
            "false_maybe_at_rebuild_point": rate,
            "btree_reads_per_new_block": rate / (1 << shift),
            "formula_at_plan": fpindex.false_maybe_rate(
                size, int(chunks / (1 << shift))),
        }
    return out


# ---------------------------------------------------------------- 4
def table_bytes(eng: Engine) -> dict[str, int]:
    m = eng.meta
    psize = m.env.stat()["psize"]
    out = {}
    with m.env.begin() as txn:
        for name in ("l2p", "chunks", "fp", "segs", "vols", "meta", "heat", "hist", "snaps"):
            st = txn.stat(getattr(m, name))
            out[name] = (st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]) * psize
    out["env_used"] = (m.env.info()["last_pgno"] + 1) * psize
    return out


def metadata(tmp: str, mib: int) -> dict[str, Any]:
    blocks = mib * MiB // BLOCK_SIZE
    d = new_pool(tmp, "meta", max(4 * GiB, 3 * mib * MiB))
    eng, _ = open_engine(d)
    eng.fps.table_entries = 8192  # merge into the B-tree as a big pool would
    base = table_bytes(eng)
    a = eng.create_volume("a", blocks * BLOCK_SIZE)
    b = eng.create_volume("b", blocks * BLOCK_SIZE)
    rng = random.Random(4)
    step = 256  # 1 MiB writes
    seeds = []
    for i in range(0, blocks, step):
        seed = rng.randbytes(64)
        seeds.append(seed)
        eng.write(a, i * BLOCK_SIZE, _unique(seed, step))
        while eng.background.step(4096, busy=False):
            pass
    eng.fps.finish_merge()
    eng.flush()
    after_unique = table_bytes(eng)
    for j, i in enumerate(range(0, blocks, step)):
        eng.write(b, i * BLOCK_SIZE, _unique(seeds[j], step))
    eng.flush()
    after_dup = table_bytes(eng)
    chunks = eng.chunks.live_chunks
    eng.close()

    def per(x: dict[str, int], y: dict[str, int], keys: tuple[str, ...], n: int) -> float:
        return sum(y[k] - x[k] for k in keys) / n
    per_chunk = per(base, after_unique, ("chunks", "fp"), chunks)
    per_block = per(base, after_unique, ("l2p",), blocks)
    per_dup_block = per(after_unique, after_dup, ("l2p", "chunks"), blocks)
    return {
        "unique_chunks": chunks, "logical_blocks": 2 * blocks,
        "tables_after_unique": after_unique, "tables_after_duplicates": after_dup,
        "bytes_per_unique_chunk": per_chunk,  # chunks + fp
        "bytes_per_mapped_block": per_block,  # l2p
        "bytes_per_duplicate_block": per_dup_block,  # l2p (+ refcount updates: 0 growth)
        "per_tib_unique": (per_chunk + per_block) * TiB / BLOCK_SIZE,
        "per_tib_logical_duplicate": per_dup_block * TiB / BLOCK_SIZE,
        "env_per_tib_unique": (after_unique["env_used"] - base["env_used"])
        / (chunks * BLOCK_SIZE) * TiB,
    }


def _unique(seed: bytes, n: int) -> bytes:
    """n incompressible-looking, unique 4 KiB blocks from a seed (repeatable)."""
    r = random.Random(seed)
    return r.randbytes(n * BLOCK_SIZE)


# ---------------------------------------------------------------- 5
def source_blocks(n: int) -> list[bytes]:
    """n distinct 4 KiB blocks of Python source: compressible like text files."""
    out: list[bytes] = []
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        data = p.read_bytes()
        for i in range(0, len(data) - BLOCK_SIZE + 1, BLOCK_SIZE):
            out.append(data[i : i + BLOCK_SIZE])
            if len(out) == n:
                return out
    return out


def segment_bytes_used(eng: Engine) -> int:
    segs = eng.segs
    return sum(segs.write_ptr_of(s) - 4096 for s in range(segs.count)
               if segs.state_of(s) != SEG_FREE)


def flush_heavy(tmp: str, writes: int) -> dict[str, Any]:
    blocks = source_blocks(writes)
    out: dict[str, Any] = {"writes": len(blocks)}
    for mode in ("now", "padded"):
        d = new_pool(tmp, f"flush-{mode}", 2 * GiB)
        eng, _ = open_engine(d)
        v = eng.create_volume("v", len(blocks) * BLOCK_SIZE)
        eng.flush()
        before = segment_bytes_used(eng)
        t = time.perf_counter()
        for i, blk in enumerate(blocks):
            eng.write(v, i * BLOCK_SIZE, blk)
            if mode == "padded":  # what every flush did before: pad the tail
                eng.segs._write_out(USER, full=True)
            eng.flush()
        secs = time.perf_counter() - t
        used = segment_bytes_used(eng) - before
        out[mode] = {"segment_bytes_per_byte_written": used / (len(blocks) * BLOCK_SIZE),
                     "record_bytes_per_byte_written":
                         eng.statistics().stored_bytes / (len(blocks) * BLOCK_SIZE),
                     "writes_per_s": len(blocks) / secs}
        eng.close()
    return out


# ---------------------------------------------------------------- main
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench --scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer cycles, less data")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--tmpdir", default="/var/tmp")
    p.add_argument("--meta-mib", type=int, help="MiB of unique data for the metadata "
                   "measurement (default 512; 64 with --quick)")
    a = p.parse_args(argv)
    cycles = 100 if a.quick else 250
    meta_mib = a.meta_mib or (64 if a.quick else 512)
    res: dict[str, Any] = {}
    tmp = tempfile.mkdtemp(prefix="pstorage-scale-", dir=a.tmpdir)
    try:
        log("1-2. segment allocation and open time, 1 GiB vs 10 TiB")
        small = allocation(tmp, GiB, cycles, old_scan=False)
        big = allocation(tmp, 10 * TiB, cycles, old_scan=True)
        ratio = big["alloc_us_median"] / small["alloc_us_median"]
        res["allocation"] = {"1GiB": small, "10TiB": big, "ratio": ratio,
                             "goal": ALLOC_RATIO_GOAL, "ok": ratio < ALLOC_RATIO_GOAL}
        log(f"   allocate+seal median: {small['alloc_us_median']:.0f} us (1 GiB, "
            f"{small['segments']} segs) vs {big['alloc_us_median']:.0f} us (10 TiB, "
            f"{big['segments']} segs): ratio {ratio:.2f} (goal < {ALLOC_RATIO_GOAL}); "
            f"the old full scan: {big['old_scan_s'] * 1e3:.0f} ms")
        used = open_used(tmp, 10 * TiB)
        res["open"] = {"1GiB_s": small["open_s"], "10TiB_fresh_s": big["open_s"],
                       "10TiB_all_segments_used_s": used["open_s"]}
        log(f"   open: {small['open_s'] * 1e3:.0f} ms (1 GiB), {big['open_s'] * 1e3:.0f} ms "
            f"(10 TiB fresh), {used['open_s'] * 1e3:.0f} ms (10 TiB, every segment used)")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)

        log("3. dedupe index memory and false 'maybe' rate (synthetic fingerprints)")
        idx = index_memory(fpindex.DEFAULT_QUOTA, 6 if a.quick else 4)
        res["index"] = idx
        for k, v in idx.get("per_tib", {}).items():
            log(f"   {k} unique: filter {v['filter_bytes'] / MiB:.0f} MiB, sampling 1 in "
                f"{1 << v['sample_shift']}; without a quota "
                f"{v['bytes_per_tib_unbounded'] / MiB:.0f} MiB/TiB; false 'maybe' at the "
                f"rebuild point {v['false_maybe_at_rebuild_point'] * 100:.2f} %; B-tree reads "
                f"per new block {v['btree_reads_per_new_block'] * 100:.3f} %")

        log(f"4. metadata bytes: {meta_mib} MiB unique, then the same again (duplicates)")
        m = metadata(tmp, meta_mib)
        res["metadata"] = m
        log(f"   per unique chunk {m['bytes_per_unique_chunk']:.1f} B (chunks+fp), per "
            f"mapped block {m['bytes_per_mapped_block']:.1f} B (l2p), per duplicate block "
            f"{m['bytes_per_duplicate_block']:.1f} B")
        log(f"   per TiB: unique {m['per_tib_unique'] / GiB:.2f} GiB, duplicate "
            f"{m['per_tib_logical_duplicate'] / GiB:.2f} GiB (LMDB env growth: "
            f"{m['env_per_tib_unique'] / GiB:.2f} GiB per TiB unique)")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)

        log("5. flush-heavy: 4 KiB writes of Python source, a flush after each")
        f = flush_heavy(tmp, 500 if a.quick else 3000)
        res["flush_heavy"] = f
        for mode in ("now", "padded"):
            log(f"   {mode:6}: {f[mode]['segment_bytes_per_byte_written']:.3f} segment bytes "
                f"per byte written (records alone {f[mode]['record_bytes_per_byte_written']:.3f}),"
                f" {f[mode]['writes_per_s']:.0f} writes/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)
    ok = res["allocation"]["ok"] and all(
        v["bytes_per_tib_unbounded"] <= INDEX_GOAL for v in res["index"].get("per_tib", {}).values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
