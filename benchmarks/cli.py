"""Benchmark PStorage against nbdkit baselines with fio.

Starts a private pstoraged on a sparse pool file in a temporary directory
under /var/tmp, exports (and attaches) one volume, and runs the same fio jobs
against it and against two baselines over the same NBD transport:

  file         nbdkit's C `file` plugin on a sparse file: the NBD ceiling
  passthrough  scripts/bench_passthrough.py, a minimal Python plugin doing
               pread/pwrite on a file: the ceiling of any Python plugin

Jobs: 4k randwrite QD32, 4k randread QD32, 4k randwrite QD1, 128k seq write
and 128k seq read, each on "mixed" data (50 % compressible, 30 % duplicate
blocks) and on fio's default incompressible data. Every store is prefilled
(sequential 1 MiB writes over the test region, same data kind) before its
jobs, so reads hit written data and writes are overwrites. Then a memory
check: the daemon's RssAnon before and after writing --mem-gib GiB of unique
data. Everything is cleaned up at exit, Ctrl-C included.

Run as root (attach needs loop devices and FUSE):
    scripts/bench                 # full run: 10 s per job, 2 GiB region
    scripts/bench --quick         # smoke run: 3 s per job, 512 MiB region
    scripts/bench --json out.json --targets pstorage,file
    scripts/bench --space         # snapshot creation time, GC write amplification
                                  # (benchmarks/space.py; --quick for a short run)
    scripts/bench --scale         # 1 GiB vs 10 TiB: allocation, open, index memory,
                                  # metadata bytes per TiB, flush-heavy writes (scale.py)
scripts/bench runs this with the repository's .venv python (scripts/setup).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys

from pstoraged.engine.units import parse_size
from pstoraged.errors import PStorageError

from . import replication, scale, space
from .bench import ALL_TARGETS, Bench
from .system import MiB, log


class Interrupted(Exception):
    pass


def _on_signal(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtime", type=int, help="seconds per job (default 10; 3 with --quick)")
    p.add_argument("--size", help="test region size (default 2G; 512M with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 s per job, 512M region, "
                   "1 GiB memory test")
    p.add_argument("--mem-gib", type=float, help="GiB of unique data for the memory check "
                   "(default 8; 1 with --quick; 0 skips it)")
    p.add_argument("--targets", default=",".join(ALL_TARGETS),
                   help="comma-separated subset of pstorage,file,passthrough (default all)")
    p.add_argument("--no-attach", action="store_true", help="skip the block-device runs")
    p.add_argument("--fuse", action="store_true",
                   help="attach through the daemon's FUSE front end ('ps dev' column) instead "
                        "of nbdfuse")
    p.add_argument("--baseline-attach", action="store_true",
                   help="also run the baselines through nbdfuse+loop block devices")
    p.add_argument("--json", metavar="FILE", help="write the raw results here")
    p.add_argument("--pool-size", default="40G", help="sparse pool file size (default 40G)")
    p.add_argument("--tmpdir", default="/var/tmp", help="parent of the temporary directory")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (debugging)")
    a = p.parse_args(argv)
    a.runtime = a.runtime or (3 if a.quick else 10)
    try:
        a.size = parse_size(a.size or ("512M" if a.quick else "2G"))
    except PStorageError as e:
        p.error(f"--size: {e}")
    a.size -= a.size % MiB
    if a.size < 16 * MiB:
        p.error("--size must be at least 16M")
    if a.mem_gib is None:
        a.mem_gib = 1 if a.quick else 8
    a.targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    bad = [t for t in a.targets if t not in ALL_TARGETS]
    if bad or not a.targets:
        p.error(f"unknown target(s) {bad}; choose from {','.join(ALL_TARGETS)}")
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--space" in argv:  # snapshot creation time, GC write amplification (space.py)
        return space.main([x for x in argv if x != "--space"])
    if "--replication" in argv:  # diff cost, async replication data path (replication.py)
        return replication.main([x for x in argv if x != "--replication"])
    if "--scale" in argv:  # allocation and memory at 10 TiB, metadata per TiB (scale.py)
        return scale.main([x for x in argv if x != "--scale"])
    args = parse_args(argv)
    if os.geteuid() != 0 and ("pstorage" in args.targets and not args.no_attach
                              or args.baseline_attach):
        sys.exit("bench: run as root (attach uses loop devices), or pass --no-attach")
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is not installed (run scripts/setup)")
    bench = Bench(args)
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    rc = 1
    try:
        rc = bench.main()
    except (KeyboardInterrupt, Interrupted) as e:
        log(f"\ninterrupted ({str(e) or 'SIGINT'})")
        rc = 130
    except Exception as e:  # noqa: BLE001 - report, then clean up
        log(f"\nbench: {type(e).__name__}: {e}")
        if bench.daemon_log:
            log("pstoraged log tail:\n" + bench.log_tail())
        rc = 1
    finally:
        reported = len(bench.problems)
        bench.cleanup()
        for pr in bench.problems[reported:]:  # found while cleaning up
            log(f"problem: {pr}")
            rc = rc or 1
        if args.json:
            try:
                bench.res.write_json(args.json)
            except OSError as e:
                log(f"cannot write {args.json}: {e}")
    return rc
