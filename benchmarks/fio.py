"""The fio jobs of the benchmark and one fio run, its JSON output parsed.

Used by bench.py (the jobs and prefills) and memory.py (the unique-data write).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .system import MiB, cpu_snapshot, cpu_usage


@dataclass(frozen=True, slots=True)
class Job:
    key: str  # the name in the JSON results
    label: str  # the name in the progress lines and the table
    rw: str  # fio --rw
    bs: str  # fio --bs
    qd: int  # fio --iodepth
    metric: str  # "iops" or "bw": what the table shows


JOBS = [
    Job("randwrite-4k-qd32", "4k randwrite QD32", "randwrite", "4k", 32, "iops"),
    Job("randread-4k-qd32", "4k randread QD32", "randread", "4k", 32, "iops"),
    Job("randwrite-4k-qd1", "4k randwrite QD1", "randwrite", "4k", 1, "iops"),
    Job("write-128k", "128k seq write QD8", "write", "128k", 8, "bw"),
    Job("read-128k", "128k seq read QD8", "read", "128k", 8, "bw"),
]
JOB_BY_KEY = {j.key: j for j in JOBS}
# writes first, so that the reads read what the writes left
RUN_ORDER = ["randwrite-4k-qd32", "randwrite-4k-qd1", "write-128k", "randread-4k-qd32", "read-128k"]

# Data kinds. "mixed": half of every 4 KiB chunk compressible, 30 % of the
# buffers repeats of earlier ones, a fresh buffer for every write.
DATA = {
    "mixed": ["--buffer_compress_percentage=50", "--buffer_compress_chunk=4k",
              "--dedupe_percentage=30", "--refill_buffers"],
    "incompressible": [],  # fio's default: random buffer, scrambled per write
}


@dataclass(slots=True)
class Endpoint:
    """Where a job runs: an NBD URI (fio's nbd engine) or a block device
    (libaio, direct I/O), and the processes whose CPU use is measured."""
    uri: str | None = None
    device: str | None = None
    watch: dict[str, int] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "nbd" if self.uri else "dev"

    @property
    def address(self) -> str:
        return self.uri or self.device or ""


def run_fio(tmp: str, tag: str, where: Endpoint, rw: str, bs: str, qd: int, data: str,
            size: int, runtime: int | None) -> dict:
    """One fio job over the first `size` bytes, time based when `runtime` is
    given; the figures the report and the JSON use, with "error" None or why."""
    out = os.path.join(tmp, "fio.json")
    # randrepeat=0: fresh seeds every run, so no run rewrites the data
    # (or the offsets) of an earlier one, which dedupe would make free
    cmd = ["fio", f"--name={tag}", "--numjobs=1", "--group_reporting", "--randrepeat=0",
           "--output-format=json", f"--output={out}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={qd}", f"--size={size}"]
    if where.kind == "nbd":
        cmd += ["--ioengine=nbd", f"--uri={where.uri}"]
    else:
        cmd += ["--ioengine=libaio", "--direct=1", f"--filename={where.device}"]
    timeout: float
    if runtime is not None:
        cmd += ["--time_based", f"--runtime={runtime}"]
        timeout = runtime + 120
    else:
        timeout = max(600, size / (5 * MiB))
    if "write" in rw:
        cmd += DATA[data]
    if os.path.exists(out):
        os.unlink(out)
    watch = {k: pid for k, pid in where.watch.items() if pid}
    cpu0 = {k: cpu_snapshot(pid) for k, pid in watch.items()}
    t0 = time.monotonic()
    res: dict = {"error": None}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        res["error"] = f"fio timed out after {timeout:.0f} s"
        res["elapsed_s"] = round(time.monotonic() - t0, 1)
        return res
    wall = time.monotonic() - t0
    res["elapsed_s"] = round(wall, 1)
    res["cpu"] = cpu_usage(cpu0, {k: cpu_snapshot(pid) for k, pid in watch.items()}, wall)
    try:
        job = json.loads(Path(out).read_text())["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError):
        res["error"] = f"fio exited {p.returncode}: {(p.stderr or p.stdout).strip()[-600:]}"
        return res
    res.update(_figures(job["read"] if "read" in rw else job["write"]))
    res["cpu"]["fio"] = round(job.get("usr_cpu", 0) + job.get("sys_cpu", 0), 1)
    if job.get("error") or p.returncode != 0:
        res["error"] = (f"fio error {job.get('error')} (exit {p.returncode}): "
                        f"{(p.stderr or '').strip()[-600:]}")
    return res


def _figures(side: dict) -> dict:
    """IOPS, bandwidth and completion latency (µs) of one direction of a fio job."""
    clat = side.get("clat_ns", {})
    pct = clat.get("percentile", {})
    return {
        "iops": side["iops"], "bw_bytes": side["bw_bytes"], "io_bytes": side["io_bytes"],
        "runtime_ms": side["runtime"], "clat_mean_us": round(clat.get("mean", 0) / 1000, 1),
        "clat_p50_us": round(pct.get("50.000000", 0) / 1000, 1),
        "clat_p99_us": round(pct.get("99.000000", 0) / 1000, 1),
        "clat_max_us": round(clat.get("max", 0) / 1000, 1),
    }
