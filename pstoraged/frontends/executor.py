"""The executor: runs typed requests from every front end against the engine,
and decides when the engine commits.

Front ends (the NBD data socket in dataplane.py, FUSE in fusefs.py, later
replication) translate their wire requests into `Request` records; the
data plane's engine thread runs them here, one batch per wake-up, in FIFO
order. One place therefore decides:

- which large aligned writes go to the reducer thread (`Executor.write`, at
  parse time, so that it hashes and compresses while the engine runs the
  requests before them);
- how a request runs on the engine (`Executor.run`);
- when to commit (CommitPolicy), and that durable requests (flush, FUA,
  fsync, a control job with flush=True) are answered only after their commit
  while the others are answered as soon as they ran (see docs/design.md).

The answer goes to `request.reply(request)`, a front end's callback, called
on the engine thread with `result` or `error` filled in.

Accesses (volume id, offset, length, time) of the reads, writes, zeroes and
trims that ran are recorded here, for every front end at once, into one
preallocated list that goes to the access sink (the heat map, wired by the
daemon) when it is full or when the sink pulls it (`pass_accesses`, before a
commit); the engine's request methods know nothing of them.

CommitPolicy, owned by the executor, decides when the open metadata
transaction becomes a group commit:

- a durable request: one commit after the batch that holds it, before its
  reply;
- COMMIT_EVERY metadata updates: a group commit after the batch's replies are
  sent (and new requests handed to the reducer), or at one of the engine's
  safe points inside long work (a big trim, a background step);
- IDLE_COMMIT_SECONDS without requests: commit what is open, which bounds
  what a crash can lose.

A volume in a sync replication pair has a mirror (mirror.py, `add_mirror`):
its writes, zeroes and trims are handed to the mirror right after the engine
applied them, in the order they ran, and its flush and FUA requests, once
durable here, are held by the mirror until the peer has everything queued
before them durable too; the mirror answers them later, on this thread
(`answer`). Volumes without a mirror pay one dict truth test per request.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from time import monotonic_ns
from typing import Any, Protocol

import trio

from ..engine import codecs, reducer
from ..engine.engine import Engine, Volume
from ..errors import DeviceIOError, InvalidArgument, NotFound, PStorageError, ReadOnly
from .metrics import IoStats

log = logging.getLogger(__name__)

COMMIT_EVERY = 16384  # metadata updates per group commit when no flush comes
IDLE_COMMIT_SECONDS = 1.0

# Request ops; the data ops are metrics.OPS indexes, so IoStats.record takes them as they are.
READ, WRITE, ZERO, TRIM, FLUSH, EXTENTS, CALL = range(7)
TOUCH_BATCH = 512  # accesses recorded before they are handed to the access sink


class AccessSink(Protocol):
    """Takes the accesses the executor records (analytics/temperature.py's HeatMap).
    Called on the engine thread, with batches, not per request."""

    def accessed(self, touches: list[int], n: int) -> None:
        """touches[:n] holds n // 4 accesses as (volume id, offset, length, unix time)."""


class MirrorHook(Protocol):
    """What the executor needs of a volume's sync mirror (mirror.Mirror).
    Engine thread only."""

    vol: Volume

    def check_writable(self) -> None:
        """Raise (EIO) if a change may not be applied now (strict, peer away)."""

    def write(self, offset: int, data: bytes) -> None: ...

    def write_reduced(self, offset: int, red: reducer.Reduction) -> None: ...

    def zero(self, offset: int, length: int) -> None: ...

    def mark(self, offset: int, length: int) -> None:
        """A change that may be half applied: resend its extents later."""

    def hold(self, req: Request) -> None:
        """A durable request, committed here: answer it via Executor.answer once
        the peer has it durable too."""

    def kick(self) -> None:
        """A batch ran: send what it queued."""

    def detach(self) -> None:
        """No more requests come: answer what is held."""


class CommitPolicy:
    """When to group-commit. Engine thread only; Executor.start installs it at the
    engine's safe points (Engine.safe_point)."""

    __slots__ = ("engine", "every")

    def __init__(self, engine: Engine, every: int = COMMIT_EVERY) -> None:
        self.engine = engine
        self.every = every

    def due(self) -> bool:
        """The open transaction is big enough for a group commit (or as big as
        the free part of the metadata region allows: MetaStore.refresh)."""
        m = self.engine.meta
        return m.pending_ops >= self.every or m.pending_ops >= m.op_budget

    def at_safe_point(self) -> None:
        if self.due():
            self.engine.commit()

    def idle(self) -> None:
        """No requests wait: commit what is open."""
        eng = self.engine
        if eng.failed is None and (eng.dirty or eng.meta.pending_ops):
            eng.commit()


class Request:
    """One request from a front end. `data`: a write's bytes or the reducer's
    pending result; for CALL, (fn, args). `origin`/`tag`: the front end's own
    (connection, handle) or (batch, unique). Hot: one per I/O, hence slots."""

    __slots__ = ("op", "volume", "offset", "length", "data", "durable", "reply", "origin",
                 "tag", "t0", "result", "error")

    def __init__(self, op: int, volume: Volume | None, offset: int, length: int, data: Any,
                 durable: bool, reply: Callable[[Request], None], origin: Any, tag: int,
                 t0: int) -> None:
        self.op = op
        self.volume = volume
        self.offset = offset
        self.length = length
        self.data = data
        self.durable = durable
        self.reply = reply
        self.origin = origin
        self.tag = tag
        self.t0 = t0
        self.result: Any = None
        self.error: PStorageError | None = None


def unanswered(req: Request) -> None:
    """The reply of a request built for run_from_trio, which sets the real one."""
    raise AssertionError("a request ran before run_from_trio set its reply")


def call(fn: Callable[..., Any], args: tuple, durable: bool,
         reply: Callable[[Request], None], origin: Any = None, tag: int = 0) -> Request:
    """A request that runs fn(*args) on the engine thread (control jobs, FUSE lseek...)."""
    return Request(CALL, None, 0, 0, (fn, args), durable, reply, origin, tag, monotonic_ns())


class Executor:
    """Runs batches of requests on the engine thread. `submit` may be called
    from any thread; everything else runs on the engine thread."""

    def __init__(self, engine: Engine, io: IoStats, wake: Callable[[], None]) -> None:
        self.engine = engine
        self.io = io  # per-volume counters and latency histograms (/metrics)
        self._wake = wake
        # requests other threads submitted; the engine thread checks inbox.empty()
        self.inbox: queue.SimpleQueue[list[Request]] = queue.SimpleQueue()
        self.policy = CommitPolicy(engine)  # this thread decides commits
        # hashes and compresses large writes on the other core (see reducer.py)
        self.reducer: reducer.ReducerThread | None = None
        # called while the engine waits for the reducer or before a group commit,
        # so that the front end hands newly arrived writes to the reducer meanwhile
        self.read_ahead: Callable[[], None] = _noop
        self.batches = self.requests = self.max_batch = 0
        self.access_sink: AccessSink | None = None  # see set_access_sink
        # accesses not handed over yet: one preallocated list, no allocation per request
        self._touches = [0] * (4 * TOUCH_BATCH)
        self._ntouch = 0
        self.mirrors: dict[int, MirrorHook] = {}  # volume id -> its sync mirror

    def add_mirror(self, mirror: MirrorHook) -> None:
        """Mirror the volume's changes from the next request on (engine thread, or
        before the data plane starts)."""
        self.mirrors[mirror.vol.id] = mirror

    def remove_mirror(self, vid: int) -> None:
        """Stop mirroring a volume (engine thread): its held flushes are answered."""
        m = self.mirrors.pop(vid, None)
        if m is not None:
            m.detach()

    def start(self) -> None:
        """The engine thread is about to serve: start the reducer, and from now on
        this executor decides the commits at the engine's safe points too."""
        self.reducer = reducer.start()
        self.engine.safe_point = self.policy.at_safe_point

    def set_access_sink(self, sink: AccessSink | None) -> None:
        """Record the accesses of the requests that run from now on for `sink`
        (before the data plane starts: the engine thread reads it)."""
        self.pass_accesses()
        self.access_sink = sink

    def pass_accesses(self) -> None:
        """Hand the accesses recorded so far to the sink now (engine thread; the
        sink calls this before a commit and before it answers a query)."""
        if self._ntouch and self.access_sink is not None:
            self.access_sink.accessed(self._touches, self._ntouch)
        self._ntouch = 0

    def write(self, vol: Volume, offset: int, data: bytes, durable: bool,
              reply: Callable[[Request], None], origin: Any, tag: int, t0: int) -> Request:
        """A write request: large aligned ones go to the reducer now.

        The reducer starts on it at once (any thread may call this), while the
        engine runs earlier requests; the engine then only does the metadata.
        """
        red = self.reducer
        length = len(data)
        if red is not None and red.wants(offset, length):
            pending = red.submit(data, codecs.IDS[vol.compression])
            return Request(WRITE, vol, offset, length, pending, durable, reply, origin, tag, t0)
        return Request(WRITE, vol, offset, length, data, durable, reply, origin, tag, t0)

    def submit(self, requests: list[Request]) -> None:
        """Queue requests from another thread (FUSE, control jobs); they run after
        the data requests the engine thread has seen so far."""
        self.inbox.put(requests)
        self._wake()

    async def run_from_trio(self, requests: list[Request]) -> None:
        """Submit from the trio loop and wait until every request is answered
        (their `reply` is replaced: the answers are read from the requests)."""
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()
        left = len(requests)

        def answered(_: Request) -> None:  # engine thread
            nonlocal left
            left -= 1
            if not left:
                token.run_sync_soon(done.set)

        for req in requests:
            req.reply = answered
        self.submit(requests)
        await done.wait()

    def take_submitted(self, batch: list[Request]) -> None:
        """Append the submitted requests to batch (engine thread)."""
        while True:
            try:
                batch += self.inbox.get_nowait()
            except queue.Empty:
                return

    def run(self, batch: list[Request]) -> None:
        """Run a batch in order; answer each request, durable ones after one commit."""
        eng = self.engine
        durable: list[Request] = []
        sink = self.access_sink
        touches = self._touches
        now = int(eng.clock()) if sink is not None else 0  # seconds: one reading per batch
        mirrors = self.mirrors
        for req in batch:
            op = req.op
            try:  # the engine call, inline: this loop is the hot path of every request
                if mirrors and WRITE <= op <= TRIM and req.volume.id in mirrors:  # type: ignore[union-attr]
                    self._run_mirrored(req, mirrors[req.volume.id])  # type: ignore[union-attr]
                elif op == WRITE and isinstance(req.data, bytes):
                    eng.write(req.volume, req.offset, req.data)  # type: ignore[arg-type]
                elif op == WRITE:  # the reducer's pending result
                    if not req.data.ready():
                        self.read_ahead()  # keep the reducer busy while we wait for it
                    eng.write_reduced(req.volume, req.offset, req.data)  # type: ignore[arg-type]
                elif op == READ:
                    req.result = eng.read(req.volume, req.offset,  # type: ignore[arg-type]
                                          req.length)
                elif op == ZERO or op == TRIM:  # a trim zeroes too (Engine.trim is zero)
                    eng.zero(req.volume, req.offset, req.length)  # type: ignore[arg-type]
                elif op == EXTENTS:
                    req.result = eng.extents(req.volume, req.offset,  # type: ignore[arg-type]
                                             req.length)
                elif op == CALL:
                    fn, args = req.data
                    req.result = fn(*args)
            except PStorageError as e:
                req.error = e
            except Exception as e:  # a bug must not take the daemon down
                log.exception("engine request %d failed", op)
                req.error = DeviceIOError(f"internal error: {e}")
            if op < FLUSH and sink is not None and req.error is None:
                # the access, for the sink: four stores, batches go out full
                n = self._ntouch
                touches[n] = req.volume.id  # type: ignore[union-attr]
                touches[n + 1] = req.offset
                touches[n + 2] = req.length
                touches[n + 3] = now
                n += 4
                if n == len(touches):
                    sink.accessed(touches, n)
                    n = 0
                self._ntouch = n
            if req.durable:
                durable.append(req)
                continue
            # Answer now, not after the batch: at low queue depth the client
            # sends its next request sooner (128 KiB writes, QD8: ~5 %, A/B).
            if op < CALL:
                self.io.record(req.volume.name, op,  # type: ignore[union-attr]
                               req.length if op < FLUSH else 0, monotonic_ns() - req.t0,
                               req.error is not None)
            req.reply(req)
        self.batches += 1
        self.requests += len(batch)
        self.max_batch = max(self.max_batch, len(batch))
        if durable:
            self._commit_and_answer(durable)
        if mirrors:
            for m in mirrors.values():
                m.kick()
        if self.policy.due():
            # the replies are out; the reducer works on what came in while we commit
            self.read_ahead()
            try:
                self.engine.commit()  # the group commit that is due
            except Exception:
                log.exception("group commit failed")

    def _run_mirrored(self, req: Request, m: MirrorHook) -> None:
        """A change to a mirrored volume: applied here, then queued for the peer."""
        m.check_writable()
        eng, vol, op = self.engine, req.volume, req.op
        assert vol is not None
        try:
            if op == WRITE and isinstance(req.data, bytes):
                eng.write(vol, req.offset, req.data)
                m.write(req.offset, req.data)
            elif op == WRITE:
                if not req.data.ready():
                    self.read_ahead()
                eng.write_reduced(vol, req.offset, req.data)
                m.write_reduced(req.offset, req.data.wait())
            else:
                eng.zero(vol, req.offset, req.length)
                m.zero(req.offset, req.length)
        except (ReadOnly, NotFound, InvalidArgument):
            raise  # refused before anything changed
        except Exception:
            m.mark(req.offset, req.length)  # it may be half applied here
            raise

    def answer(self, req: Request) -> None:
        """Count and answer a request (engine thread): mirrors answer held ones so."""
        if req.op < CALL:
            self.io.record(req.volume.name, req.op,  # type: ignore[union-attr]
                           req.length if req.op < FLUSH else 0, monotonic_ns() - req.t0,
                           req.error is not None)
        req.reply(req)

    def _commit_and_answer(self, durable: list[Request]) -> None:
        if any(req.error is None for req in durable):
            try:
                self.engine.flush()
            except Exception as e:
                log.exception("commit failed")
                fail = e if isinstance(e, PStorageError) else DeviceIOError(str(e))
                # Only requests that asked for durability learn of it (the
                # others are answered already: their data is readable and a
                # later flush retries).
                for req in durable:
                    req.error = fail
        now = monotonic_ns()
        record = self.io.record
        mirrors = self.mirrors
        for req in durable:
            if (mirrors and req.op <= FLUSH and req.error is None
                    and req.volume.id in mirrors):  # type: ignore[union-attr]
                mirrors[req.volume.id].hold(req)  # type: ignore[union-attr]
                continue
            if req.op < CALL:
                record(req.volume.name, req.op,  # type: ignore[union-attr]
                       req.length if req.op < FLUSH else 0, now - req.t0, req.error is not None)
            req.reply(req)


def _noop() -> None:
    return None
