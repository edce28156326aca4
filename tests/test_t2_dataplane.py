"""The data plane in-process: a bug while handling one connection costs that connection only."""

from __future__ import annotations

import os
import socket

import trio

from pstoraged.engine.engine import Engine
from pstoraged.engine.pool import open_pool
from pstoraged.frontends import protocol as P
from pstoraged.frontends.dataplane import DataPlane


def _request(sock: socket.socket, op: int, payload: bytes = b"", length: int = 0) -> bytes | None:
    sock.sendall(P.REQ.pack(P.REQ_MAGIC, op, 0, 7, 0, length, len(payload)) + payload)
    hdr = sock.recv(P.REP.size, socket.MSG_WAITALL)
    if not hdr:
        return None
    _, err, _, plen, _ = P.REP.unpack(hdr)
    assert err == 0
    return sock.recv(plen, socket.MSG_WAITALL) if plen else b""


def _serve(dp: DataPlane, client) -> None:
    """Run the data plane while `client` (blocking socket code) talks to it, then stop it."""
    async def main() -> None:
        dp.start()
        try:
            await trio.to_thread.run_sync(client)
        finally:
            await dp.stop()

    trio.run(main)


def test_internal_error_drops_one_connection_not_the_daemon(pool_dir, caplog):
    caplog.allowed_errors = True
    engine = Engine(open_pool(pool_dir))
    engine.create_volume("v", 1 << 20)
    path = os.path.join(pool_dir, "data.sock")
    dp = DataPlane(engine, path)
    real_parse = dp._parse

    def buggy_parse(conn, batch, op, *args):
        if op == P.OP_SIZE:
            raise RuntimeError("injected bug")
        return real_parse(conn, batch, op, *args)

    dp._parse = buggy_parse  # type: ignore[method-assign]

    def client() -> None:
        with socket.socket(socket.AF_UNIX) as a, socket.socket(socket.AF_UNIX) as b:
            a.connect(path)
            b.connect(path)
            assert _request(a, P.OP_OPEN, b"v") is not None
            assert _request(a, P.OP_SIZE) is None  # the bug: this connection is dropped
            assert _request(b, P.OP_OPEN, b"v") is not None  # others are served
            assert _request(b, P.OP_READ, length=4096) == bytes(4096)

    _serve(dp, client)
    assert "dropped after an internal error" in caplog.text


def test_frames_split_and_joined_anyhow_are_served_in_order(pool_dir):
    """Frames cut at every kind of boundary (a large write dribbled in pieces,
    several frames in one send) are all served; large aligned writes take the
    reducer path and read back exactly."""
    engine = Engine(open_pool(pool_dir))
    engine.create_volume("v", 1 << 20)
    path = os.path.join(pool_dir, "data.sock")
    dp = DataPlane(engine, path)
    data = os.urandom(64 << 10) + bytes(32 << 10) + b"pstorage" * (4 << 10)

    def frame(op: int, offset: int = 0, length: int = 0, payload: bytes = b"", handle: int = 1
              ) -> bytes:
        return P.REQ.pack(P.REQ_MAGIC, op, 0, handle, offset, length, len(payload)) + payload

    def replies(sock: socket.socket, n: int) -> list[tuple[int, int, bytes]]:
        out = []
        for _ in range(n):
            _, err, handle, plen, _ = P.REP.unpack(sock.recv(P.REP.size, socket.MSG_WAITALL))
            out.append((handle, err, sock.recv(plen, socket.MSG_WAITALL) if plen else b""))
        return out

    def client() -> None:
        import time

        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(20)  # a frame lost in the pieces must fail the test, not hang it
            s.connect(path)
            assert _request(s, P.OP_OPEN, b"v") is not None
            w = frame(P.OP_WRITE, 65536, len(data), data, handle=2)
            for i in range(0, len(w), 7777):  # dribbled: the daemon sees partial frames
                s.sendall(w[i : i + 7777])
                time.sleep(0.001)
            assert replies(s, 1) == [(2, 0, b"")]
            # a flush, a read and a second write in one send
            s.sendall(frame(P.OP_FLUSH, handle=3) + frame(P.OP_READ, 65536, len(data), handle=4)
                      + frame(P.OP_WRITE, 0, 16384, data[:16384], handle=5))
            # (the flush is answered after its commit, the others when applied)
            got = sorted(replies(s, 3))
            assert [(h, e) for h, e, _ in got] == [(3, 0), (4, 0), (5, 0)]
            assert got[1][2] == data
            assert _request(s, P.OP_READ, length=16384) == data[:16384]

    _serve(dp, client)
    assert engine.volume("v").stats.zero_bytes == 32 << 10  # reduced: the zero blocks seen


def test_only_durable_requests_wait_for_the_commit(pool_dir):
    """A write without FUA is answered when applied, while the flush sent with
    it still waits for its commit."""
    import threading

    engine = Engine(open_pool(pool_dir))
    engine.create_volume("v", 1 << 20)
    path = os.path.join(pool_dir, "data.sock")
    dp = DataPlane(engine, path)
    real_flush, release, held = engine.flush, threading.Event(), threading.Event()

    def slow_flush() -> None:
        if not release.is_set():
            held.set()
            assert release.wait(20)
        real_flush()

    engine.flush = slow_flush  # type: ignore[method-assign]

    def client() -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(path)
            assert _request(s, P.OP_OPEN, b"v") is not None
            s.sendall(P.REQ.pack(P.REQ_MAGIC, P.OP_WRITE, 0, 2, 0, 4096, 4096) + b"x" * 4096
                      + P.REQ.pack(P.REQ_MAGIC, P.OP_FLUSH, 0, 3, 0, 0, 0))
            _, err, handle, _, _ = P.REP.unpack(s.recv(P.REP.size, socket.MSG_WAITALL))
            assert (handle, err) == (2, 0)  # answered before the commit was let go
            assert held.wait(10)  # ... which the flush is waiting for
            release.set()
            _, err, handle, _, _ = P.REP.unpack(s.recv(P.REP.size, socket.MSG_WAITALL))
            assert (handle, err) == (3, 0)

    try:
        _serve(dp, client)
    finally:
        release.set()


def test_the_executor_records_accesses_for_the_heat_map(pool_dir):
    """Requests from the data socket warm their extents up: the executor records
    them for the heat map, and they commit with the data (here, at close)."""
    from pstoraged.analytics.temperature import HeatMap

    engine = Engine(open_pool(pool_dir), clock=lambda: 1_800_000_000.0)
    v = engine.create_volume("v", 4 << 20)
    path = os.path.join(pool_dir, "data.sock")
    dp = DataPlane(engine, path)
    HeatMap.attach(engine).listen(dp.executor)  # as the daemon wires it

    def client() -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            assert _request(s, P.OP_OPEN, b"v") is not None
            assert _request(s, P.OP_WRITE, b"x" * 4096, 4096) is not None
            assert _request(s, P.OP_READ, length=4096) == b"x" * 4096

    _serve(dp, client)
    assert engine.closed_clean
    again = Engine(open_pool(pool_dir))
    try:
        assert HeatMap.attach(again).extents(v.id) == [(0, 1_800_000_000, 1)]
    finally:
        again.close()
