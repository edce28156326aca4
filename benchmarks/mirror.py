"""The CPU and latency cost of the sync mirror's data path, in one process.

    .venv/bin/python -m benchmarks.mirror [--writes N]

Two pools in a temporary directory under /var/tmp; volume `v` of the first
is served by an executor on an engine thread (as the data plane runs it),
alone, mirrored (frontends/mirror.py) to a peer that discards what it gets
(the source side's own cost: queueing, bitmap, the link thread), and
mirrored to the second pool through LocalPeer with no delay (the peer's
engine applies and commits everything a second time on the same two cores,
so that column is a floor, not what two hosts would see). Reports 4 KiB random
writes at QD1 and QD32 (IOPS, CPU us per write) and write+flush at QD1
(flush latency p50/p99), for each case in the same run.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from time import monotonic_ns
from typing import Any

from pstoraged.engine.engine import Engine, Volume
from pstoraged.engine.pool import create_pool, open_pool
from pstoraged.frontends import executor as X
from pstoraged.frontends.metrics import IoStats
from pstoraged.frontends.mirror import IN_SYNC, LocalPeer, Mirror

SIZE = 256 << 20
BLOCK = 4096


class _Loop:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.wake = threading.Event()
        self.ex = X.Executor(engine, IoStats(), self.wake.set)
        self.ex.start()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            self.wake.wait(0.05)
            self.wake.clear()
            batch: list[X.Request] = []
            self.ex.take_submitted(batch)
            if batch:
                self.ex.run(batch)
        self.engine.close()
        if self.ex.reducer is not None:
            self.ex.reducer.stop()

    def run(self, reqs: list[X.Request]) -> None:
        left = [len(reqs)]
        done = threading.Event()

        def reply(r: X.Request) -> None:  # engine thread
            left[0] -= 1
            if not left[0]:
                done.set()

        for r in reqs:
            r.reply = reply
        self.ex.submit(reqs)
        done.wait()
        for r in reqs:
            if r.error is not None:
                raise r.error

    def call(self, fn: Any) -> Any:
        req = X.call(fn, (), False, X.unanswered)
        self.run([req])
        return req.result


class _Discard:
    """A peer that takes everything and stores nothing: the source side's cost alone."""

    def connect(self) -> None:
        return None

    def apply(self, ops: list[Any]) -> None:
        return None

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None


def _write(vol: Volume, off: int, durable: bool = False) -> X.Request:
    return X.Request(X.WRITE, vol, off, BLOCK, os.urandom(BLOCK), durable, X.unanswered,
                     None, 0, monotonic_ns())


def _flush(vol: Volume) -> X.Request:
    return X.Request(X.FLUSH, vol, 0, 0, None, True, X.unanswered, None, 0, monotonic_ns())


def measure(loop: _Loop, vol: Volume, n: int) -> dict[str, float]:
    rng = random.Random(1)
    nblk = SIZE // BLOCK
    out: dict[str, float] = {}
    for qd in (1, 32):
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(n // qd):
            loop.run([_write(vol, rng.randrange(nblk) * BLOCK) for _ in range(qd)])
        loop.run([_flush(vol)])
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        out[f"qd{qd}_iops"] = n / dt
        out[f"qd{qd}_cpu_us"] = dc / n * 1e6
    lat = []
    for _ in range(n // 10):
        loop.run([_write(vol, rng.randrange(nblk) * BLOCK)])
        t = time.perf_counter()
        loop.run([_flush(vol)])
        lat.append(time.perf_counter() - t)
    lat.sort()
    out["flush_p50_ms"] = statistics.median(lat) * 1e3
    out["flush_p99_ms"] = lat[int(len(lat) * 0.99)] * 1e3
    return out


def run_case(d: str, case: str, n: int) -> dict[str, float]:
    a, b = os.path.join(d, case + "-a"), os.path.join(d, case + "-b")
    for p in (a, b):
        os.mkdir(p)
        create_pool(p, os.path.join(p, "dev.img"), file_size=1 << 30, segment_size=1 << 20)
    src = Engine(open_pool(a))
    vol = src.create_volume("v", SIZE)
    loop = _Loop(src)
    peer = None
    mirror = None
    if case != "alone":
        link: Any = _Discard()
        if case == "mirrored":
            dst = Engine(open_pool(b))
            dst.create_volume("v", SIZE)
            link = peer = LocalPeer(dst, "v")
        mirror = loop.call(lambda: Mirror(src, vol, link, loop.ex))
        loop.call(lambda: loop.ex.add_mirror(mirror))
        mirror.start()
        while mirror.statistics().state != IN_SYNC:
            time.sleep(0.01)
    out = measure(loop, vol, n)
    if mirror is not None:
        loop.call(lambda: loop.ex.remove_mirror(vol.id))
        mirror.stop()
        st = mirror.statistics()
        out["wire_bytes_per_write"] = st.sent_bytes / max(1, st.sent_ops)
    loop.stopping = True
    loop.wake.set()
    loop.thread.join()
    if peer is not None:
        peer.shutdown(lambda e: e.close())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--writes", type=int, default=6400)
    args = ap.parse_args()
    d = tempfile.mkdtemp(dir="/var/tmp", prefix="pstorage-mirror-")
    try:
        cases = ("alone", "discard", "mirrored")
        results = {case: run_case(d, case, args.writes) for case in cases}
        print(f"{'4 KiB random writes':24}" + "".join(f"{c:>10}" for c in cases))
        for k in results["mirrored"]:
            print(f"{k:24}" + "".join(f"{results[c].get(k, 0):10.1f}" for c in cases))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
