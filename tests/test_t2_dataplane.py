"""The data plane in-process: a bug while handling one connection costs that connection only."""

from __future__ import annotations

import os
import socket

import trio

from pstoraged import protocol as P
from pstoraged.dataplane import DataPlane
from pstoraged.engine import Engine
from pstoraged.pool import open_pool


def _request(sock: socket.socket, op: int, payload: bytes = b"", length: int = 0) -> bytes | None:
    sock.sendall(P.REQ.pack(P.REQ_MAGIC, op, 0, 7, 0, length, len(payload)) + payload)
    hdr = sock.recv(P.REP.size, socket.MSG_WAITALL)
    if not hdr:
        return None
    _, err, _, plen, _ = P.REP.unpack(hdr)
    assert err == 0
    return sock.recv(plen, socket.MSG_WAITALL) if plen else b""


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

    async def main() -> None:
        dp.start()
        try:
            await trio.to_thread.run_sync(client)
        finally:
            await dp.stop()

    trio.run(main)
    assert "dropped after an internal error" in caplog.text
