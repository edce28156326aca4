"""The data socket: binary frames from the nbdkit plugin to the engine.

Each connection has a reader (parses and validates frames, submits engine
jobs without waiting) and a writer (sends completed replies in batches).
Nothing a client sends can crash the connection handler or the daemon: bad
frames get an errno reply and a log line.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket as pysocket
from typing import Any

import trio

from . import protocol as P
from .engine import Engine, Volume
from .errors import PStorageError
from .worker import EngineWorker

log = logging.getLogger(__name__)

_conn_ids = itertools.count(1)


class ProtocolViolation(Exception):
    """The stream can no longer be parsed safely: reply, then close."""


async def bind_unix(path: str, mode: int = 0o660) -> trio.SocketListener:
    """Listen on a unix socket, refusing to steal one a live daemon still serves."""
    probe = trio.socket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    try:
        await probe.connect(path)
    except FileNotFoundError:
        pass
    except OSError:
        await trio.Path(path).unlink(missing_ok=True)  # stale socket of an earlier run
    else:
        raise OSError(errno.EADDRINUSE, f"{path} is served by another process")
    finally:
        probe.close()
    await trio.Path(os.path.dirname(path)).mkdir(parents=True, exist_ok=True)
    sock = trio.socket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    await sock.bind(path)
    await trio.Path(path).chmod(mode)
    sock.listen(128)
    return trio.SocketListener(sock)


class _Conn:
    __slots__ = ("id", "stream", "vol", "out", "wake", "inflight", "room", "closed")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.id = next(_conn_ids)
        self.stream = stream
        self.vol: Volume | None = None
        self.out: list[bytes] = []
        self.wake = trio.Event()
        self.inflight = 0
        self.room = trio.Event()
        self.closed = False

    def send(self, data: bytes) -> None:
        self.out.append(data)
        self.wake.set()


class DataServer:
    def __init__(self, worker: EngineWorker, path: str) -> None:
        self.worker = worker
        self.engine: Engine = worker.engine
        self.path = path
        self.connections = 0
        self.protocol_errors = 0

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listener = await bind_unix(self.path)
        task_status.started()
        await trio.serve_listeners(self._handle, [listener])

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = _Conn(stream)
        self.connections += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, conn)
                try:
                    await self._reader(conn)
                finally:
                    conn.closed = True
                    conn.wake.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass
        finally:
            self.connections -= 1
            await trio.aclose_forcefully(stream)

    async def _writer(self, conn: _Conn) -> None:
        while True:
            await conn.wake.wait()
            conn.wake = trio.Event()
            if conn.out:
                data = b"".join(conn.out)
                conn.out.clear()
                await conn.stream.send_all(data)
            if conn.closed and not conn.inflight:
                return

    async def _reader(self, conn: _Conn) -> None:
        buf = bytearray()
        pos = 0
        hsize = P.REQ.size
        while True:
            data = await conn.stream.receive_some(1 << 20)
            if not data:
                return
            if pos:
                del buf[:pos]
                pos = 0
            buf += data
            while len(buf) - pos >= hsize:
                magic, op, flags, handle, offset, length, plen = P.REQ.unpack_from(buf, pos)
                try:
                    if magic != P.REQ_MAGIC:
                        raise ProtocolViolation(f"bad magic {magic:#x}")
                    if plen > P.MAX_REQUEST:
                        raise ProtocolViolation(f"payload of {plen} bytes is over 32 MiB")
                except ProtocolViolation as e:
                    self._refuse(conn, 0 if magic != P.REQ_MAGIC else handle, errno.EPROTO
                                 if magic != P.REQ_MAGIC else errno.EINVAL, str(e))
                    return
                if len(buf) - pos < hsize + plen:
                    break
                payload = bytes(buf[pos + hsize : pos + hsize + plen])
                pos += hsize + plen
                self._dispatch(conn, op, flags, handle, offset, length, payload)
            while conn.inflight >= P.MAX_IN_FLIGHT:
                conn.room = trio.Event()
                await conn.room.wait()

    def _refuse(self, conn: _Conn, handle: int, err: int, msg: str) -> None:
        self.protocol_errors += 1
        log.warning("data conn %d: refused request %#x: %s (%s)", conn.id, handle, msg,
                    errno.errorcode.get(err, err))
        conn.send(P.reply(handle, err, msg.encode()))

    def _dispatch(self, conn: _Conn, op: int, flags: int, handle: int, offset: int,
                  length: int, payload: bytes) -> None:
        eng = self.engine
        if flags & ~P.KNOWN_FLAGS:
            return self._refuse(conn, handle, errno.EINVAL, f"unknown flags {flags:#x}")
        if op == P.OP_OPEN:
            return self._open(conn, handle, payload)
        if op == P.OP_LIST:
            names = "\n".join(sorted(eng.volumes)).encode()
            return conn.send(P.reply(handle, 0, names))
        if op not in P.OP_NAMES:
            return self._refuse(conn, handle, errno.EINVAL, f"unknown op {op}")
        vol = conn.vol
        if vol is None:
            return self._refuse(conn, handle, errno.EINVAL, f"{P.OP_NAMES[op]} before OPEN")
        if op == P.OP_SIZE:
            return conn.send(P.reply(handle, 0, vol.size.to_bytes(8, "little")))
        if op == P.OP_FLUSH:
            return self._submit(conn, handle, eng.flush, (), flush=True)
        if offset % P.SECTOR or length % P.SECTOR:
            return self._refuse(conn, handle, errno.EINVAL,
                                f"{P.OP_NAMES[op]} {offset}+{length} is not 512-byte aligned")
        if length > P.MAX_REQUEST:
            return self._refuse(conn, handle, errno.EINVAL, f"length {length} is over 32 MiB")
        if offset + length > vol.size:
            err = errno.ENOSPC if op in (P.OP_WRITE, P.OP_ZERO) else errno.EINVAL
            return self._refuse(conn, handle, err,
                                f"{P.OP_NAMES[op]} {offset}+{length} beyond the end ({vol.size})")
        if op in (P.OP_WRITE, P.OP_TRIM, P.OP_ZERO) and vol.readonly:
            return self._refuse(conn, handle, errno.EROFS, f"volume {vol.name} is read-only")
        if (op == P.OP_WRITE) != bool(payload) or (op == P.OP_WRITE and len(payload) != length):
            return self._refuse(conn, handle, errno.EINVAL,
                                f"{P.OP_NAMES[op]} carries {len(payload)} payload bytes")
        fua = bool(flags & P.FLAG_FUA)
        if op == P.OP_READ:
            self._submit(conn, handle, eng.read, (vol, offset, length))
        elif op == P.OP_WRITE:
            self._submit(conn, handle, eng.write, (vol, offset, payload), flush=fua)
        elif op in (P.OP_ZERO, P.OP_TRIM):
            self._submit(conn, handle, eng.zero, (vol, offset, length), flush=fua)
        elif op == P.OP_EXTENTS:
            self._submit(conn, handle, eng.extents, (vol, offset, length), encode=_extents)

    def _open(self, conn: _Conn, handle: int, payload: bytes) -> None:
        if conn.vol is not None:
            return self._refuse(conn, handle, errno.EINVAL, "connection already open")
        name = payload.decode("utf-8", "replace")
        vol = self.engine.volumes.get(name)
        if vol is None:
            return self._refuse(conn, handle, errno.ENOENT, f"no volume named {name!r}")
        conn.vol = vol
        eng = self.engine
        body = P.OPEN_REPLY.pack(
            vol.size, P.OPEN_READONLY if vol.readonly else 0, 4096, eng.instance,
            eng.prev_instance, 1 if eng.prev_clean else 0,
        )
        log.info("data conn %d: opened volume %s", conn.id, name)
        conn.send(P.reply(handle, 0, body))

    def _submit(self, conn: _Conn, handle: int, fn: Any, args: tuple, *,
                flush: bool = False, encode: Any = None) -> None:
        conn.inflight += 1

        def done(res: Any, exc: BaseException | None) -> None:
            conn.inflight -= 1
            if conn.inflight < P.MAX_IN_FLIGHT:
                conn.room.set()
            if exc is not None:
                err = exc.errno if isinstance(exc, PStorageError) else errno.EIO
                log.warning("data conn %d: %s failed: %s", conn.id, fn.__name__, exc)
                conn.send(P.reply(handle, err, str(exc).encode()))
            elif encode is not None:
                conn.send(P.reply(handle, 0, encode(res)))
            elif isinstance(res, bytes):
                conn.send(P.reply(handle, 0, res))
            else:
                conn.send(P.reply(handle, 0))

        self.worker.submit(fn, args, done, flush)


def _extents(runs: list[tuple[int, int]]) -> bytes:
    return b"".join(P.EXTENT.pack(n, t, 0) for n, t in runs)
