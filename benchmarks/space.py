"""Space-management benchmarks (run by `scripts/bench --space`).

1. Snapshot creation time on a fully written 1 GiB and a fully written
   16 GiB volume (target: both under 50 ms and equal within noise: a snapshot
   freezes a map generation, it never copies the map). Measured as the
   round trip of `POST /api/v1/volumes/{name}/snapshots` (which includes the
   commit that makes the snapshot durable), median of several.
2. Write amplification and GC throughput under 4k random overwrites at 80%
   pool fill (target WA < 2.5): a small pool, a volume of 80% of its
   capacity filled with incompressible data, then random 4 KiB overwrites of
   incompressible data (nothing dedupes or compresses, so every overwrite
   frees one old record and needs one new one) until --overwrite-factor times
   the volume has been rewritten. WA = (client record bytes + bytes the
   cleaner moved) / client record bytes over that run, from the cleaner's
   counters.

Needs fio with the nbd engine. Run as root.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from pstoraged.control.client import Client

from .system import GiB, MiB, log
from .targets import PStorage

SNAP_GOAL_MS = 50
WA_GOAL = 2.5


def daemon(tmp: str, pool_size: str) -> PStorage:
    """A started pstoraged on a pool of `pool_size` with 4 MiB segments."""
    d = PStorage(tmp, pool_size, segment_size="4M", cli_timeout=600)
    d.start()
    return d


def stop(d: PStorage) -> None:
    d.unexport_all()
    d.stop()


def api_ms(d: PStorage, method: str, path: str, body: dict | None = None) -> float:
    """Round trip of one API request over the control socket, in ms."""
    c = Client(d.env["PSTORAGE_CONTROL"])
    t = time.perf_counter()
    c.request(method, path, body)
    return (time.perf_counter() - t) * 1000


def fio(uri: str, rw: str, bs: str, qd: int, size: int, io_size: int | None = None,
        distribution: str = "random") -> dict:
    cmd = ["fio", "--name=space", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={qd}", f"--size={size}", "--randrepeat=0", "--refill_buffers",
           f"--random_distribution={distribution}", "--output-format=json"]
    if io_size:
        cmd.append(f"--io_size={io_size}")
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd.append(f"--output={out.name}")
        t = time.monotonic()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
        if p.returncode:
            raise RuntimeError(f"fio failed: {(p.stderr or p.stdout).strip()[-500:]}")
        job = json.loads(Path(out.name).read_text())["jobs"][0]["write"]
    return {"seconds": time.monotonic() - t, "bw_bytes": job["bw_bytes"], "iops": job["iops"]}


def snapshot_times(d: PStorage, gib: float, repeats: int) -> dict:
    name = f"snap{gib:g}g".replace(".", "_")
    size = int(gib * GiB)
    d.cli("volume", "create", name, "--size", str(size))
    uri = d.cli("export", name)["uri"]
    log(f"  fill {gib:g} GiB ...")
    fill = fio(uri, "write", "1M", 8, size)
    time.sleep(5)  # the idle commit and the kernel's writeback of the fill settle
    times = []
    for i in range(repeats):
        times.append(api_ms(d, "POST", f"/api/v1/volumes/{name}/snapshots", {"name": f"s{i}"}))
        time.sleep(0.5)
    d.cli("unexport", name, "--force")
    d.cli("volume", "delete", name, "--force")
    d.cli("volume", "eradicate", name)
    return {"gib": gib, "fill_mib_s": round(fill["bw_bytes"] / MiB), "times_ms": [round(t, 2) for t in times],
            "median_ms": round(statistics.median(times), 2)}


def write_amplification(tmp: str, pool_gib: float, factor: float,
                        distribution: str = "random") -> dict:
    d = daemon(tmp, f"{pool_gib:g}G")
    try:
        cap = d.cli("pool", "show")["statistics"]["capacity_bytes"]
        size = int(cap * 0.8) // MiB * MiB
        d.cli("volume", "create", "wa", "--size", str(size), "--compression", "none")
        uri = d.cli("export", "wa")["uri"]
        log(f"  fill {size / GiB:.2f} GiB of a {cap / GiB:.2f} GiB pool (80%) ...")
        fio(uri, "write", "1M", 8, size)
        before = d.cli("pool", "show")["cleaner"]
        log(f"  4k random overwrites ({distribution}): {factor:g} x the volume ...")
        r = fio(uri, "randwrite", "4k", 32, size, io_size=int(size * factor),
                distribution=distribution)
        after = d.cli("pool", "show")
        c = after["cleaner"]
        user = c["user_bytes"] - before["user_bytes"]
        moved = c["bytes_moved"] - before["bytes_moved"]
        return {
            "pool_bytes": cap, "volume_bytes": size, "overwritten_bytes": int(size * factor),
            "seconds": round(r["seconds"], 1), "iops": round(r["iops"]),
            "user_record_bytes": user, "gc_moved_bytes": moved,
            "write_amplification": round((user + moved) / user, 3) if user else None,
            "gc_mib_s": round(moved / MiB / r["seconds"], 1),
            "segments_cleaned": c["segments_cleaned"] - before["segments_cleaned"],
            "free_segments_end": c["free_segments"],
        }
    finally:
        stop(d)


def snapshots(a: argparse.Namespace, tmp: str, out: dict) -> None:
    log("snapshot creation time (fully written volumes)")
    d = daemon(os.path.join(tmp, "snap"), f"{int(a.big_gib * 1.5) + 4}G")
    try:
        out["snapshots"] = [snapshot_times(d, g, a.repeats) for g in (1, a.big_gib)]
    finally:
        stop(d)
    for s in out["snapshots"]:
        log(f"  {s['gib']:g} GiB: median {s['median_ms']} ms  {s['times_ms']}")
    small, big = (s["median_ms"] for s in out["snapshots"])
    ok = max(small, big) < SNAP_GOAL_MS
    log(f"  target: both under {SNAP_GOAL_MS} ms and equal within noise: "
        f"{'yes' if ok else 'NO'} (ratio {big / small:.2f})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench --space", description=__doc__.split("\n\n")[0])
    ap.add_argument("--big-gib", type=float, default=16, help="size of the big snapshot volume")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--wa-pool-gib", type=float, default=4)
    ap.add_argument("--overwrite-factor", type=float, default=2.0)
    ap.add_argument("--quick", action="store_true", help="4 GiB big volume, 2 GiB WA pool, 1x")
    ap.add_argument("--distribution", default="random",
                    help="fio random_distribution of the overwrites: random (uniform, the "
                         "target's case), zipf:1.2, pareto:0.9, ... (hot and cold data)")
    ap.add_argument("--wa-only", action="store_true", help="skip the snapshot timings")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--tmpdir", default="/var/tmp")
    a = ap.parse_args(argv)
    if a.quick:
        a.big_gib, a.wa_pool_gib, a.overwrite_factor, a.repeats = 4, 2, 1.0, 5
    out: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = tempfile.mkdtemp(prefix="pstorage-space.", dir=a.tmpdir)
    try:
        if not a.wa_only:
            snapshots(a, tmp, out)
        log("write amplification under 4k random overwrites at 80% fill")
        out["wa"] = write_amplification(os.path.join(tmp, "wa"), a.wa_pool_gib, a.overwrite_factor,
                                        a.distribution)
        w = out["wa"]
        log(f"  {w['overwritten_bytes'] / GiB:.2f} GiB overwritten in {w['seconds']} s "
            f"({w['iops']} IOPS); GC moved {w['gc_moved_bytes'] / MiB:.0f} MiB "
            f"({w['gc_mib_s']} MiB/s) cleaning {w['segments_cleaned']} segments")
        wa = w["write_amplification"]
        log(f"  write amplification {wa} (target < {WA_GOAL}: "
            f"{'yes' if wa is not None and wa < WA_GOAL else 'NO'})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
        log(f"wrote {a.json}")
    return 0
