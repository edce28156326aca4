"""The data plane: one thread that owns the engine and the data socket.

Why not trio here: a 4 KiB request costs the engine 6-30 us; handing each
one from the trio loop to a worker thread and back cost ~70 us of wake-ups
and task switches (measured: 8.5k IOPS). So the data socket is served by a
plain epoll loop in the same thread that runs the engine, and every wake-up
handles everything that is ready as one batch:

    poll -> read all ready connections -> parse every complete frame into an
            executor Request -> add the requests other threads submitted
         -> Executor.run: the batch on the engine (FIFO), replies as requests
            finish, one commit before the durable ones' replies

This module is the NBD-style socket's translator (frames -> requests, results
-> reply frames) and the thread's loop; executor.py runs the requests. The
trio loop (control plane) never touches the engine directly: it queues jobs
with `call()` (FUSE submits its requests to the executor the same way), which
wakes this thread through an eventfd, and awaits the result. See
docs/design.md for the concurrency rules.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from time import monotonic_ns
from typing import Any

import trio

from ..engine.engine import Engine, Volume
from ..errors import PStorageError
from . import executor as X
from . import protocol as P
from .executor import IDLE_COMMIT_SECONDS, Executor, Request
from .metrics import IoStats
from .sockets import bind_unix_sync

log = logging.getLogger(__name__)

RECV_SIZE = 1 << 20
MAX_OUT = 64 << 20  # stop reading a connection whose replies pile up beyond this
BUSY_RECLAIM = 128  # map entries of deleted volumes released per batch under load
IDLE_RECLAIM = 2048  # ... and per step when no client is waiting
QUIET_SECONDS = 0.1  # no request for this long: clients are idle
READ_TRIES = 4  # receives per connection and wake-up while a frame is incomplete


@dataclass(frozen=True, slots=True)
class DataPlaneStatistics:
    connections: int
    batches: int
    requests: int
    max_batch: int
    protocol_errors: int
    commits: int


class _Conn:
    __slots__ = ("id", "sock", "fd", "vol", "inbuf", "out", "outsize", "reading", "closing")

    def __init__(self, cid: int, sock: socket.socket) -> None:
        self.id = cid
        self.sock = sock
        self.fd = sock.fileno()
        self.vol: Volume | None = None
        self.inbuf = bytearray()
        self.out: list[bytes] = []
        self.outsize = 0
        self.reading = True
        self.closing = False  # close once the queued replies are sent


_DATA_OPS = {P.OP_READ: X.READ, P.OP_ZERO: X.ZERO, P.OP_TRIM: X.TRIM,
             P.OP_EXTENTS: X.EXTENTS}  # wire op -> executor op (writes and flushes apart)
_CHANGES = (P.OP_WRITE, P.OP_TRIM, P.OP_ZERO)


class DataPlane:
    def __init__(self, engine: Engine, socket_path: str) -> None:
        self.engine = engine
        self.path = socket_path
        self._wakefd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep = select.epoll()
        self._conns: dict[int, _Conn] = {}
        self._next_id = 1
        self._last_io = 0.0  # monotonic time of the last request batch
        self._background_progress = False
        self._stopping = False
        self.close_error: str | None = None  # why closing the engine raised, if it did
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        # One receive buffer for all connections: sock.recv(1 MiB) would
        # allocate (mmap) and free a megabyte per call, ~20 us (measured).
        self._rbuf = memoryview(bytearray(RECV_SIZE))
        self.protocol_errors = 0
        self.io = IoStats()  # per-volume counters and latency histograms (/metrics)
        # runs every front end's requests on this thread, decides commits
        self.executor = Executor(engine, self.io, self._wake)
        self.executor.read_ahead = self._read_ahead
        self._answer_fn = self._answer  # bound once: every request carries it
        # 'VOL@SNAP' -> read-only snapshot view (set by the daemon: snapshots.Catalog.view)
        self.resolve: Callable[[str], Volume] | None = None
        # requests parsed while the engine waited for the reducer: the next batch
        self._ahead: list[Request] = []
    # ------------------------------------------------------------ control side
    def start(self) -> None:
        """Bind the data socket and start the thread (call from the trio thread)."""
        self._listener = bind_unix_sync(self.path)
        self._listener.setblocking(False)
        self._ep.register(self._listener.fileno(), select.EPOLLIN)
        self._ep.register(self._wakefd, select.EPOLLIN)
        self.executor.start()  # the reducer thread; commits at the engine's safe points
        self._thread = threading.Thread(target=self._run, name="dataplane", daemon=True)
        self._thread.start()

    def _wake(self) -> None:
        os.eventfd_write(self._wakefd, 1)

    async def call(self, fn: Callable[..., Any], *args: Any, flush: bool = False) -> Any:
        """Run fn(*args) on the engine thread, after all data requests queued before it."""
        assert self._thread is not None, "the data plane has not started"
        req = X.call(fn, args, flush, X.unanswered)
        await self.executor.run_from_trio([req])
        if req.error is not None:
            raise req.error
        return req.result

    async def stop(self) -> None:
        """Drain, commit, close the engine cleanly (marks the pool clean)."""
        if self._thread is None:
            return
        self._stopping = True
        self._wake()
        await trio.to_thread.run_sync(self._thread.join)
        self._thread = None

    def statistics(self) -> DataPlaneStatistics:
        ex = self.executor
        return DataPlaneStatistics(len(self._conns), ex.batches, ex.requests,
                                   ex.max_batch, self.protocol_errors, self.engine.commits)

    # ------------------------------------------------------------ the thread
    def _run(self) -> None:
        try:
            while not self._stopping:
                self._step()
        except Exception:
            log.exception("data plane crashed")
            raise
        finally:
            self._shut_down()

    def _step(self) -> None:
        """One wake-up: background work, then everything that is ready as one batch."""
        background = self.engine.background.has_work()
        events = self._ep.poll(0 if self._ahead else self._poll_timeout(background))
        done = self._background_step(events) if background else 0
        ex = self.executor
        if not events and not self._ahead and ex.inbox.empty():
            if not done:
                self._guard(ex.policy.idle)
            return
        batch, self._ahead = self._ahead, []
        for fd, ev in events:
            conn = self._conns.get(fd)
            if conn is None:
                self._control_event(fd)
                continue
            try:
                if ev & select.EPOLLOUT:
                    self._flush_out(conn)
                if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    self._read(conn, batch)
            except Exception:  # a bug must cost one connection, not the daemon
                log.exception("data conn %d: dropped after an internal error", conn.id)
                self._close(conn)
        if batch:  # client requests (submitted ones below do not make clients busy)
            self._last_io = time.monotonic()
        if not ex.inbox.empty():  # submitted requests, after the data requests seen so far
            ex.take_submitted(batch)
        if batch:
            ex.run(batch)

    def _poll_timeout(self, background: bool) -> float:
        if background:
            return 0 if self._background_progress else QUIET_SECONDS
        retry = self.engine.supervisor.next_due_in()  # a failed service's retry may be sooner
        return IDLE_COMMIT_SECONDS if retry is None else min(IDLE_COMMIT_SECONDS, retry)

    def _background_step(self, events: list[tuple[int, int]]) -> int:
        """Background work (reclaiming deleted volumes, pruning the dedupe index)
        runs between batches a bounded slice at a time, small slices while
        clients are active, big ones once quiet."""
        # control jobs (the wake-up fd) do not make clients busy
        busy = (any(fd != self._wakefd for fd, _ in events)
                or time.monotonic() - self._last_io < QUIET_SECONDS)
        if busy and self.executor.reducer is not None:
            self._read_ahead()  # the reducer works on them meanwhile
        done = self._guard(partial(self.engine.background.step,
                                   BUSY_RECLAIM if busy else IDLE_RECLAIM, busy=busy)) or 0
        self._background_progress = done > 0
        return done

    def _control_event(self, fd: int) -> None:
        """The wake-up eventfd or the listening socket is ready."""
        if fd == self._wakefd:
            try:
                os.eventfd_read(self._wakefd)
            except BlockingIOError:
                pass
        elif self._listener is not None and fd == self._listener.fileno():
            self._accept()

    def _shut_down(self) -> None:
        for conn in list(self._conns.values()):
            self._close(conn)
        if self._listener is not None:
            self._listener.close()
        try:
            self.engine.close()
        except Exception as e:
            self.close_error = f"{type(e).__name__}: {e}"
            log.exception("closing the pool failed")
        if self.executor.reducer is not None:
            self.executor.reducer.stop()

    def _read_ahead(self) -> None:
        """Parse requests that arrived meanwhile, so the reducer gets them now.

        Called before the engine thread waits for the reducer, commits, or
        runs a background step under load; the requests join the next batch
        (FIFO order is kept). Only incoming data is handled here: everything
        else stays ready for the next poll.
        """
        for fd, ev in self._ep.poll(0):
            conn = self._conns.get(fd)
            if conn is None or not ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                continue
            try:
                self._read(conn, self._ahead)
            except Exception:  # a bug must cost one connection, not the daemon
                log.exception("data conn %d: dropped after an internal error", conn.id)
                self._close(conn)

    def _guard(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception:
            log.exception("%s failed", getattr(fn, "__name__", None) or getattr(fn, "func", fn))
            return None

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                s, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as e:  # EMFILE and friends: keep serving the others
                log.warning("data socket accept failed: %s", e)
                return
            s.setblocking(False)
            conn = _Conn(self._next_id, s)
            self._next_id += 1
            self._conns[conn.fd] = conn
            self._ep.register(conn.fd, select.EPOLLIN)

    def _close(self, conn: _Conn) -> None:
        if self._conns.pop(conn.fd, None) is None:
            return
        try:
            self._ep.unregister(conn.fd)
        except OSError:
            pass
        conn.sock.close()

    def _read(self, conn: _Conn, batch: list[Request]) -> None:
        # A large frame can be caught half sent: read on while one is
        # incomplete and more is there, rather than leaving its rest (and the
        # request) for the next poll, after the whole next batch.
        for _ in range(READ_TRIES):
            try:
                n = conn.sock.recv_into(self._rbuf)
            except BlockingIOError:
                return
            except OSError:
                n = 0
            if not n:
                self._close(conn)
                return
            conn.inbuf += self._rbuf[:n]
            if not self._parse_frames(conn, batch):
                return

    def _parse_frames(self, conn: _Conn, batch: list[Request]) -> bool:
        """Parse every complete frame of conn.inbuf; True if an incomplete one is left."""
        buf = conn.inbuf
        pos = 0
        hsize = P.REQ.size
        while len(buf) - pos >= hsize:
            magic, op, flags, handle, offset, length, plen = P.REQ.unpack_from(buf, pos)
            if magic != P.REQ_MAGIC:
                self._refuse(conn, 0, errno.EPROTO, f"bad magic {magic:#x}; closing")
                conn.closing = True
                break
            if plen > P.MAX_REQUEST or (op == P.OP_WRITE and plen != length) or (
                    op != P.OP_WRITE and op != P.OP_OPEN and plen):
                # the stream cannot be resynchronised safely
                self._refuse(conn, handle, errno.EINVAL,
                             f"{P.OP_NAMES.get(op, op)} with a {plen}-byte payload; closing")
                conn.closing = True
                break
            if len(buf) - pos < hsize + plen:
                break
            payload = bytes(buf[pos + hsize : pos + hsize + plen]) if plen else b""
            pos += hsize + plen
            self._parse(conn, batch, op, flags, handle, offset, length, payload)
        del buf[:pos]
        if conn.closing:
            conn.inbuf.clear()
            self._set_reading(conn, False)
            if not conn.out:
                self._close(conn)
            return False
        return bool(buf)

    def _refuse(self, conn: _Conn, handle: int, err: int, msg: str) -> None:
        self.protocol_errors += 1
        log.warning("data conn %d: refused request %#x: %s (%s)", conn.id, handle, msg,
                    errno.errorcode.get(err, str(err)))
        self._send(conn, P.reply(handle, err, msg.encode()))

    def _parse(self, conn: _Conn, batch: list[Request], op: int, flags: int, handle: int,
               offset: int, length: int, payload: bytes) -> None:
        eng = self.engine
        if flags & ~P.KNOWN_FLAGS:
            return self._refuse(conn, handle, errno.EINVAL, f"unknown flags {flags:#x}")
        if op == P.OP_OPEN:
            return self._open(conn, handle, payload)
        if op == P.OP_LIST:
            names = sorted(n for n, v in eng.volumes.items() if not v.destroyed_ns)
            return self._send(conn, P.reply(handle, 0, "\n".join(names).encode()))
        if op not in P.OP_NAMES:
            return self._refuse(conn, handle, errno.EINVAL, f"unknown op {op}")
        vol = conn.vol
        if vol is None:
            return self._refuse(conn, handle, errno.EINVAL, f"{P.OP_NAMES[op]} before OPEN")
        if op == P.OP_SIZE:
            return self._send(conn, P.reply(handle, 0, vol.size.to_bytes(8, "little")))
        if op == P.OP_FLUSH:
            batch.append(Request(X.FLUSH, vol, 0, 0, None, True, self._answer_fn, conn, handle,
                                 monotonic_ns()))
            return None
        if offset % P.SECTOR or length % P.SECTOR:
            return self._refuse(conn, handle, errno.EINVAL,
                                f"{P.OP_NAMES[op]} {offset}+{length} is not 512-byte aligned")
        if length > P.MAX_REQUEST:
            return self._refuse(conn, handle, errno.EINVAL, f"length {length} is over 32 MiB")
        if offset + length > vol.size:
            err = errno.ENOSPC if op in (P.OP_WRITE, P.OP_ZERO, P.OP_TRIM) else errno.EINVAL
            return self._refuse(conn, handle, err,
                                f"{P.OP_NAMES[op]} {offset}+{length} beyond the end ({vol.size})")
        if op in _CHANGES and vol.readonly:
            return self._refuse(conn, handle, errno.EROFS, f"volume {vol.name} is read-only")
        t0 = monotonic_ns()
        if op == P.OP_WRITE:
            batch.append(self.executor.write(vol, offset, payload, bool(flags & P.FLAG_FUA),
                                             self._answer_fn, conn, handle, t0))
        else:
            batch.append(Request(_DATA_OPS[op], vol, offset, length, None,
                                 bool(flags & P.FLAG_FUA) and op in _CHANGES, self._answer_fn,
                                 conn, handle, t0))
        return None

    def _open(self, conn: _Conn, handle: int, payload: bytes) -> None:
        if conn.vol is not None:
            return self._refuse(conn, handle, errno.EINVAL, "connection already open")
        if len(payload) > P.MAX_NAME:
            return self._refuse(conn, handle, errno.EINVAL, "export name too long")
        name = payload.decode("utf-8", "replace")
        eng = self.engine
        try:
            vol = self.resolve(name) if "@" in name and self.resolve else eng.volume(name)
        except PStorageError as e:
            return self._refuse(conn, handle, errno.ENOENT, e.message)
        conn.vol = vol
        body = P.OPEN_REPLY.pack(vol.size, P.OPEN_READONLY if vol.readonly else 0, 4096,
                                 eng.instance, eng.prev_instance, 1 if eng.prev_clean else 0)
        log.debug("data conn %d: opened volume %s", conn.id, name)
        self._send(conn, P.reply(handle, 0, body))
        return None

    def _answer(self, req: Request) -> None:
        """The executor's answer to one of our requests, as a reply frame."""
        conn: _Conn = req.origin
        if self._conns.get(conn.fd) is not conn:  # closed meanwhile
            return
        failure = req.error
        if failure is not None:
            log.warning("data conn %d: request %#x failed: %s", conn.id, req.tag, failure)
            self._send(conn, P.reply(req.tag, failure.errno, str(failure).encode()))
        elif req.op == X.READ:
            self._send(conn, P.reply(req.tag, 0, req.result))
        elif req.op == X.EXTENTS:
            self._send(conn, P.reply(req.tag, 0, _extents(req.result)))
        else:
            self._send(conn, P.reply(req.tag, 0))

    def _send(self, conn: _Conn, data: bytes) -> None:
        if conn.out:
            conn.out.append(data)
            conn.outsize += len(data)
            return
        try:
            n = conn.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            self._close(conn)
            return
        if n < len(data):
            conn.out.append(data[n:])
            conn.outsize += len(data) - n
            self._update_events(conn)

    def _flush_out(self, conn: _Conn) -> None:
        while conn.out:
            data = conn.out[0]
            try:
                n = conn.sock.send(data)
            except BlockingIOError:
                break
            except OSError:
                self._close(conn)
                return
            conn.outsize -= n
            if n < len(data):
                conn.out[0] = data[n:]
                break
            conn.out.pop(0)
        if conn.closing and not conn.out:
            self._close(conn)
            return
        self._update_events(conn)

    def _set_reading(self, conn: _Conn, on: bool) -> None:
        conn.reading = on
        self._update_events(conn)

    def _update_events(self, conn: _Conn) -> None:
        if self._conns.get(conn.fd) is not conn:
            return
        reading = conn.reading and not conn.closing and conn.outsize < MAX_OUT
        mask = (select.EPOLLIN if reading else 0) | (select.EPOLLOUT if conn.out else 0)
        self._ep.modify(conn.fd, mask)


def _extents(runs: list[tuple[int, int]]) -> bytes:
    return b"".join(P.EXTENT.pack(n, t, 0) for n, t in runs)
