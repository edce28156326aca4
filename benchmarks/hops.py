"""Count the Python function calls one 4 KiB request makes inside pstoraged.

    .venv/bin/python -m benchmarks.hops [write|read]

Starts a data plane on a small pool in a temporary directory, sends one
4 KiB NBD-style request over the data socket (after a warm-up request) and
lists every pstoraged function called on the way, in order, until the
reply is handed to the socket: the "hops" docs/design.md counts. Unique random data, so a write
takes the whole path (fingerprint miss, compression, a new chunk record).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from types import FrameType
from typing import Any

import trio

from pstoraged.analytics.temperature import HeatMap
from pstoraged.engine.engine import Engine
from pstoraged.engine.pool import create_pool, open_pool
from pstoraged.frontends import protocol as P
from pstoraged.frontends.dataplane import DataPlane


def trace(kind: str) -> list[str]:
    d = tempfile.mkdtemp(dir="/var/tmp", prefix="pstorage-hops-")
    try:
        create_pool(d, os.path.join(d, "dev.img"), file_size=64 << 20, segment_size=1 << 20)
        engine = Engine(open_pool(d))
        HeatMap.attach(engine)  # as the daemon does
        engine.create_volume("v", 8 << 20)
        path = os.path.join(d, "data.sock")
        dp = DataPlane(engine, path)
        HeatMap.of(engine).listen(dp.executor)  # as the daemon does
        on = threading.Event()
        calls: list[str] = []

        def prof(frame: FrameType, event: str, arg: Any) -> None:
            if event == "call" and on.is_set():
                mod = frame.f_globals.get("__name__", "?")
                if mod.startswith("pstoraged"):
                    calls.append(f"{mod}.{frame.f_code.co_qualname}")
                    if mod.startswith("pstoraged.frontends") and "send" in frame.f_code.co_name:
                        on.clear()  # the reply goes out: the request's way ends here

        def req(sock: socket.socket, op: int, payload: bytes = b"", length: int = 0,
                offset: int = 0) -> bytes:
            sock.sendall(P.REQ.pack(P.REQ_MAGIC, op, 0, 7, offset, length, len(payload))
                         + payload)
            _, err, _, plen, _ = P.REP.unpack(sock.recv(P.REP.size, socket.MSG_WAITALL))
            assert err == 0, err
            return sock.recv(plen, socket.MSG_WAITALL) if plen else b""

        def client() -> None:
            with socket.socket(socket.AF_UNIX) as a:
                a.connect(path)
                req(a, P.OP_OPEN, b"v")
                req(a, P.OP_WRITE, os.urandom(4096), 4096, 0)  # warm up
                req(a, P.OP_WRITE, os.urandom(4096), 4096, 8192)
                req(a, P.OP_READ, length=4096, offset=0)
                time.sleep(0.5)  # the engine thread finishes that round and goes idle
                on.set()
                if kind == "write":
                    req(a, P.OP_WRITE, os.urandom(4096), 4096, 16384)
                else:
                    req(a, P.OP_READ, length=4096, offset=8192)
                on.clear()

        threading.setprofile(prof)  # threads started from now on: the engine's

        async def main() -> None:
            dp.start()
            try:
                await trio.to_thread.run_sync(client)
            finally:
                await dp.stop()

        trio.run(main)
        threading.setprofile(None)  # type: ignore[arg-type]
        return calls
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    kind = sys.argv[1] if len(sys.argv) > 1 else "write"
    if kind not in ("write", "read"):
        sys.exit("usage: python -m benchmarks.hops [write|read]")
    calls = trace(kind)
    modules = [".".join(c.split(".")[:3]) for c in calls]  # pstoraged.PACKAGE.MODULE
    switches = sum(1 for a, b in zip(modules, modules[1:], strict=False) if a != b)
    print(f"4 KiB {kind}: {len(calls)} pstoraged calls, {switches} changes of module, "
          f"{len(set(modules))} modules")
    for c in calls:
        print("  ", c)


if __name__ == "__main__":
    main()
