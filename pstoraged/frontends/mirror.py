"""Synchronous replication's data path: a volume's mirror to its peer.

Who calls it: the executor (executor.py) hands every write, zero and trim of
a mirrored volume to its Mirror right after the engine applied it, and holds
the reply of a flush or FUA request on that volume until the local commit
AND the peer's flush are done (DRBD protocol C over NBD's durability
contract); plain writes are answered as before. The daemon (with the
replication transport) makes one Mirror per volume of a sync pair, over a
PeerLink, and attaches it with Executor.add_mirror. `apply` is the other
side: what the peer's engine thread does with the ops it receives.
LocalPeer is such a peer in this process (a second engine), for tests and
benchmarks. docs/replication.md "Sync replication: data path" has the model.

Threads. Everything named `_e_*` and the public request-path methods run on
the engine thread (the data plane's): they own the out-of-sync bitmap, the
held flushes and the state. The link thread (`_run`) only talks to the peer:
it takes queued ops, sends them, flushes the peer when asked, and reports
back by submitting calls to the executor (`_post`), which run on the engine
thread in FIFO order with the requests. The engine thread never waits for
the network; the only thing shared is the op queue (under `_cv`).

The out-of-sync bitmap (one bit per 1 MiB extent, `meta` keys
`mirror_oos:<volume id>:<page>`, docs/format.md) says which extents the peer
may lack. A bit is set, in the open transaction, before a change to its
extent is queued or (peer away) made, so it commits with the data; it is
cleared once the peer reported everything queued for the extent durable.
So after a link loss, a queue overflow or a crash of either daemon, the
bits name every extent to resync, and a resync reads the current data of
those extents only.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from hashlib import sha256
from typing import Any, NamedTuple, Protocol

from ..engine import codecs, reducer
from ..engine.engine import Engine, Volume
from ..engine.format import BLOCK_SIZE
from ..engine.reducer import KIND_ZERO, Reduction
from ..errors import CorruptData, DeviceIOError, InvalidArgument, PStorageError
from . import executor as X

log = logging.getLogger(__name__)

EXTENT = 1 << 20  # out-of-sync tracking granularity: a resync ships whole extents
PAGE_BYTES = 512  # bitmap bytes per LMDB record: 4096 extents, 4 GiB of volume
MAX_QUEUED = 64 << 20  # bytes queued for the peer; beyond, changes wait for a resync
RESYNC_BYTES = 8 << 20  # extents read per resync step on the engine thread
RETRY_SECONDS = 1.0  # between attempts to reach a lost peer
# A quiet link flushes the peer after this long, a busy one at least this
# often, so that its confirmation clears the bitmap and the lag records
# without waiting for the client's next flush.
IDLE_FLUSH_SECONDS = 1.0
OP_HEADER = 24  # bytes counted on the wire per op besides its payload (seq, offset, length)

STRICT, DEGRADE = "strict", "degrade"
POLICIES = (STRICT, DEGRADE)
# states: IN_SYNC: every change goes to the peer and nothing is owed;
# SYNCING: connected, extents owed are being resent (resync, or the queue overflowed);
# DEGRADED: peer away, policy degrade: writes go on, their extents are tracked;
# STALLED: peer away, policy strict: writes and flushes fail with EIO.
IN_SYNC, SYNCING, DEGRADED, STALLED = "in_sync", "syncing", "degraded", "stalled"

_BIT_COUNT = [bin(i).count("1") for i in range(256)]


class MirrorOp(NamedTuple):
    """One change for the peer, in order. A write carries `data` (raw bytes,
    any 512-byte aligned range) or `red` (the reducer's result for whole
    blocks: fingerprints, codecs, compressed payloads, CRCs, as they are
    stored); neither: zeros (a zero or trim)."""

    seq: int
    offset: int
    length: int
    data: bytes | None
    red: Reduction | None


class PeerLink(Protocol):
    """The transport to the peer's daemon (the replication package implements
    it over its RPC layer). Called on the mirror's link thread only; every
    method blocks, and raises OSError (ConnectionError...) when the link is lost."""

    def connect(self) -> None:
        """(Re)establish the session with the peer's copy of the volume."""

    def apply(self, ops: list[MirrorOp]) -> None:
        """Send ops; the peer applies them in order (`apply` below)."""

    def flush(self) -> None:
        """Return once everything applied so far is durable on the peer."""

    def close(self) -> None:
        """Drop the session (the mirror stops)."""


@dataclass(frozen=True, slots=True)
class MirrorStatistics:
    volume: str
    policy: str
    state: str
    connected: bool
    sent_ops: int
    sent_bytes: int  # on the wire: payloads (compressed where the reducer compressed) + headers
    logical_bytes: int  # bytes of the volume those ops cover
    resync_bytes: int  # of logical_bytes, resent by resyncs
    pending_bytes: int  # queued, not sent yet
    lag_bytes: int  # queued or sent, not reported durable by the peer yet
    lag_seconds: float  # at most this old is the oldest change not durable on the peer
    out_of_sync_bytes: int  # extents the peer may lack something of (bitmap), x 1 MiB
    resync_left_bytes: int  # of those, still to resend in the running resync
    held_flushes: int  # flush/FUA replies waiting for the peer
    disconnects: int
    last_error: str


def _page_key(vid: int, page: int) -> bytes:
    return b"mirror_oos:%d:%d" % (vid, page)


class Mirror:
    """The sync mirror of one volume. Make it (any thread, before it is
    attached), `start()` it, then attach it on the engine thread or before the
    data plane starts: `executor.add_mirror(m)`. `stop()` from any thread
    other than the engine thread, after `executor.remove_mirror`."""

    def __init__(self, engine: Engine, vol: Volume, link: PeerLink, executor: X.Executor,
                 policy: str = DEGRADE, *, retry: float = RETRY_SECONDS,
                 max_queued: int = MAX_QUEUED, idle_flush: float = IDLE_FLUSH_SECONDS) -> None:
        if policy not in POLICIES:
            raise InvalidArgument(f"unknown sync replication policy {policy!r}",
                                  f"use one of {', '.join(POLICIES)}")
        self.engine = engine
        self.vol = vol
        self.link = link
        self.executor = executor
        self.policy = policy
        self.retry = retry
        self.idle_flush = idle_flush
        self.max_queued = max_queued
        # --- engine thread
        self._accepting = False  # connected: changes are queued for the peer
        self.state = STALLED if policy == STRICT else DEGRADED
        self._bits = bytearray(-(-vol.size // EXTENT) // 8 + 1)  # out of sync, persisted
        self._oos = 0  # bits set
        self._hot: dict[int, int] = {}  # extent -> seq of its last queued op
        self._seq = 0  # last op queued
        self._durable = 0  # the peer reported ops up to this seq durable
        self._held: deque[tuple[int, X.Request]] = deque()  # (seq it needs, flush or FUA)
        self._resync: bytearray | None = None  # extents still to resend in this resync
        self._resync_pos = 0  # byte index where the scan for the next one resumes
        self._resync_left = 0
        self._resync_end = 0  # seq of the last op a resync queued
        self._oldest = 0.0  # monotonic time of the oldest op not durable yet (0: none)
        # wire bytes queued since start, and up to the last durable op: (seq, total) per op
        self._queued_total = self._durable_total = 0
        self._totals: deque[tuple[int, int]] = deque()
        self._load()
        # --- shared with the link thread: the queue (deque appends and pops are
        # atomic; the link waits on _cv, woken when the queue was empty), the rest under _cv
        self._cv = threading.Condition()
        self._queue: deque[MirrorOp] = deque()
        self._taken_total = 0  # link thread: wire bytes taken off the queue since start
        self._in_flight = 0  # link thread: bytes being sent
        self._flush_upto = 0  # the engine wants the peer flushed through this seq
        self._resync_asked = False  # a resync step is posted and has not run yet
        self._stopping = False
        # --- link thread (counters read by statistics(), ints: no lock needed)
        self._thread: threading.Thread | None = None
        self._sent = 0  # last seq sent
        self.sent_ops = self.sent_bytes = self.logical_bytes = self.resync_bytes = 0
        self.disconnects = 0
        self.last_error = ""

    # ------------------------------------------------------------ life
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"mirror-{self.vol.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the link thread (not from the engine thread: it may wait for a post)."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            self.link.close()
        except OSError as e:
            log.warning("mirror %s: closing the link failed: %s", self.vol.name, e)

    def detach(self) -> None:
        """Engine thread, from Executor.remove_mirror: held flushes are answered as
        on a link loss (strict: EIO), nothing more is queued."""
        self._e_lost("the mirror was stopped", count=False)

    # ------------------------------------------------------------ request path (engine thread)
    def check_writable(self) -> None:
        """Strict policy with the peer away: refuse the change before it is applied."""
        if self.state == STALLED:
            raise DeviceIOError(
                f"volume {self.vol.name!r}: its sync replication peer is unreachable and the "
                "pair's policy is strict: writes are refused",
                "bring the peer back, or set the pair's policy to degrade")

    def write(self, offset: int, data: bytes) -> None:
        self._change(offset, len(data), data, None)

    def write_reduced(self, offset: int, red: Reduction) -> None:
        self._change(offset, len(red[1]) * BLOCK_SIZE, None, red)

    def zero(self, offset: int, length: int) -> None:
        self._change(offset, length, None, None)

    def mark(self, offset: int, length: int) -> None:
        """A change the peer did not get (a write that failed half way, a snapshot
        restore of the volume): its extents go to the next resync."""
        self._mark(offset, length)
        if self._accepting:
            self._e_behind(offset, length)

    def hold(self, req: X.Request) -> None:
        """A flush or FUA request is durable here: answer it once the peer has
        everything queued so far durable too (executor._commit_and_answer)."""
        if not self._accepting:
            if self.policy == STRICT:
                req.error = DeviceIOError(
                    f"volume {self.vol.name!r}: the sync replication peer is unreachable "
                    "(strict policy): the flush is not confirmed by the peer",
                    "bring the peer back, or set the pair's policy to degrade")
            self.executor.answer(req)  # degrade: durable here, the bitmap holds the rest
            return
        if self._durable >= self._seq and (self.policy != STRICT or self._caught_up()):
            self.executor.answer(req)
            return
        self._held.append((self._seq, req))
        with self._cv:
            self._flush_upto = self._seq
            self._cv.notify()

    def _change(self, offset: int, length: int, data: bytes | None,
                red: Reduction | None) -> None:
        self._mark(offset, length)  # before the op can reach the peer: commits with the data
        if not self._accepting:
            return
        if self._queued_total - self._taken_total > self.max_queued:
            # the peer falls behind: resend from the data later
            self._e_behind(offset, length)
            return
        self._queue_op(offset, length, data, red)

    def _queue_op(self, offset: int, length: int, data: bytes | None,
                  red: Reduction | None) -> None:
        self._seq = seq = self._seq + 1
        first = offset // EXTENT
        for ext in range(first, (offset + max(length, 1) - 1) // EXTENT + 1):
            self._hot[ext] = seq
        if not self._oldest:
            self._oldest = time.monotonic()
        size = _wire_size(length, data, red)
        self._queued_total += size
        self._totals.append((seq, self._queued_total))
        self._queue.append(MirrorOp(seq, offset, length, data, red))  # kick() wakes the link

    def kick(self) -> None:
        """The end of an executor batch: wake the link thread for what the batch
        queued (once per batch, not per op: a wake-up per 4 KiB write cost ~40 us
        of thread switching at QD32)."""
        if self._queue:
            with self._cv:
                self._cv.notify()

    # ------------------------------------------------------------ the bitmap (engine thread)
    def _load(self) -> None:
        meta = self.engine.meta
        prefix = b"mirror_oos:%d:" % self.vol.id
        cur = meta.txn.cursor(db=meta.meta)
        if not cur.set_range(prefix):
            return
        for k, v in cur:
            if not bytes(k).startswith(prefix):
                break
            page = int(bytes(k)[len(prefix):])
            self._grow((page + 1) * PAGE_BYTES)
            self._bits[page * PAGE_BYTES:(page + 1) * PAGE_BYTES] = bytes(v)
        self._oos = sum(_BIT_COUNT[b] for b in self._bits)

    def _grow(self, nbytes: int) -> None:
        if len(self._bits) < nbytes:
            self._bits += bytes(nbytes - len(self._bits))

    def _mark(self, offset: int, length: int) -> None:
        bits = self._bits
        first = offset // EXTENT
        for ext in range(first, (offset + max(length, 1) - 1) // EXTENT + 1):
            i = ext >> 3
            if i >= len(bits):
                self._grow(i + 1)
            if not bits[i] & (1 << (ext & 7)):
                bits[i] |= 1 << (ext & 7)
                self._oos += 1
                self._persist(i // PAGE_BYTES)

    def _clear(self, ext: int) -> None:
        i = ext >> 3
        if self._bits[i] & (1 << (ext & 7)):
            self._bits[i] &= ~(1 << (ext & 7)) & 0xFF
            self._oos -= 1
            self._persist(i // PAGE_BYTES)

    def _persist(self, page: int) -> None:
        """Into the open transaction: it commits with the data it covers."""
        meta = self.engine.meta
        raw = bytes(self._bits[page * PAGE_BYTES:(page + 1) * PAGE_BYTES])
        key = _page_key(self.vol.id, page)
        if raw.count(0) == len(raw):
            meta.txn.delete(key, db=meta.meta)
        else:
            meta.txn.put(key, raw, db=meta.meta)
        self.engine.mark_dirty()

    def _e_behind(self, offset: int, length: int) -> None:
        """Connected, but these extents go to the resync instead of the queue."""
        if self._resync is None:
            self._resync = bytearray(len(self._bits))
            self._resync_pos = 0
        self.state = SYNCING
        first = offset // EXTENT
        for ext in range(first, (offset + max(length, 1) - 1) // EXTENT + 1):
            i = ext >> 3
            if i >= len(self._resync):
                self._resync += bytes(i + 1 - len(self._resync))
            if not self._resync[i] & (1 << (ext & 7)):
                self._resync[i] |= 1 << (ext & 7)
                self._resync_left += 1
                self._resync_pos = min(self._resync_pos, i)
        with self._cv:
            self._cv.notify()

    def _caught_up(self) -> bool:
        return not self._resync_left and self._durable >= self._resync_end

    # ------------------------------------------------------------ reports (engine thread)
    def _e_connected(self) -> None:
        self._accepting = True
        self._hot.clear()
        self._totals.clear()
        self._durable_total = self._queued_total
        if self._oos:  # everything the peer may lack, from the bitmap as it is now
            self._resync = bytearray(self._bits)
            self._resync_pos = 0
            self._resync_left = self._oos
            self.state = SYNCING
            log.info("mirror %s: peer connected, resyncing %d MiB of changed extents",
                     self.vol.name, self._oos * EXTENT >> 20)
        else:
            self.state = IN_SYNC
            log.info("mirror %s: peer connected, in sync", self.vol.name)
        with self._cv:
            self._cv.notify()

    def _e_lost(self, why: str, count: bool = True) -> None:
        was = self._accepting
        self._accepting = False
        self._hot.clear()  # their bits stay set: the next resync sends them
        self._resync, self._resync_left, self._resync_pos = None, 0, 0
        self._oldest = 0.0
        self._totals.clear()
        self._durable_total = self._queued_total
        self.state = STALLED if self.policy == STRICT else DEGRADED
        if was and count:
            log.warning("mirror %s: peer lost (%s): %s", self.vol.name, why,
                        "writes are refused (strict policy)" if self.policy == STRICT
                        else "continuing alone, tracking changed extents (degrade policy)")
        while self._held:
            _, req = self._held.popleft()
            if self.policy == STRICT:
                req.error = DeviceIOError(
                    f"volume {self.vol.name!r}: the sync replication peer was lost before it "
                    f"confirmed the flush ({why})", "bring the peer back, or set the pair's "
                    "policy to degrade")
            self.executor.answer(req)

    def _e_durable(self, seq: int) -> None:
        if seq <= self._durable:
            return
        self._durable = seq
        totals = self._totals
        while totals and totals[0][0] <= seq:
            self._durable_total = totals.popleft()[1]
        resync = self._resync
        done = [ext for ext, s in self._hot.items() if s <= seq]
        for ext in done:
            del self._hot[ext]
            i = ext >> 3
            if resync is not None and i < len(resync) and resync[i] & (1 << (ext & 7)):
                continue  # owed to the resync still
            self._clear(ext)
        self._oldest = time.monotonic() if seq < self._seq else 0.0
        if self.state == SYNCING and self._caught_up():
            self._resync = None
            self.state = IN_SYNC
            log.info("mirror %s: resync done, in sync", self.vol.name)
        held = self._held
        caught_up = self.policy != STRICT or self._caught_up()
        while held and held[0][0] <= seq and caught_up:
            self.executor.answer(held.popleft()[1])

    def _e_resync_step(self) -> None:
        """Queue the current data of the next owed extents (RESYNC_BYTES of them)."""
        with self._cv:
            self._resync_asked = False
        resync = self._resync
        if not self._accepting or resync is None:
            return
        eng, vol = self.engine, self.vol
        budget = RESYNC_BYTES
        while budget > 0 and self._resync_left:
            rest = resync[self._resync_pos:]
            i = self._resync_pos + len(rest) - len(rest.lstrip(b"\0"))
            if i >= len(resync):
                self._resync_left = 0
                break
            self._resync_pos = i
            b = resync[i]
            ext = i * 8 + (b & -b).bit_length() - 1
            resync[i] &= ~(1 << (ext & 7)) & 0xFF
            self._resync_left -= 1
            start = ext * EXTENT
            end = min(start + EXTENT, vol.size)
            pos = start
            try:
                while pos < end:
                    for n, typ in eng.extents(vol, pos, end - pos):
                        data = None if typ & 2 else eng.read(vol, pos, n)
                        self._queue_op(pos, n, data, None)
                        self.resync_bytes += n
                        pos += n
            except PStorageError as e:  # deleted or cut meanwhile: nothing more to send there
                log.warning("mirror %s: resync of extent %d stopped: %s", vol.name, ext, e)
                self._hot.pop(ext, None)
            self._hot.setdefault(ext, self._seq)  # an extent past the end clears too
            self._resync_end = self._seq
            budget -= EXTENT
        if not self._resync_left:  # the last step: have the peer make it durable
            with self._cv:
                self._flush_upto = max(self._flush_upto, self._seq)
                self._cv.notify()

    # ------------------------------------------------------------ the link thread
    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        self.executor.submit([X.call(fn, args, False, _ignore)])

    def _run(self) -> None:
        up = False
        flushed = 0
        last_flush = time.monotonic()
        while True:
            with self._cv:
                if self._stopping:
                    return
            if not up:
                self._take()  # dropped: their extents are in the bitmap, the resync sends them
                try:
                    self.link.connect()
                except Exception as e:  # unreachable, or refused: try again later
                    self.last_error = _describe(e)
                    with self._cv:
                        if not self._stopping:
                            self._cv.wait(self.retry)
                    continue
                up = True
                flushed = self._sent  # a flush now would confirm nothing of the old session
                self._post(self._e_connected)
            idle = False
            with self._cv:
                while (not self._queue and self._flush_upto <= flushed and not self._stopping
                       and not (self._resync_left and not self._resync_asked)):
                    if not self._cv.wait(self.idle_flush) and self._sent > flushed:
                        idle = True  # quiet: have the peer confirm what it got
                        break
                if self._stopping:
                    return
                want = self._flush_upto  # before the take: ops up to it are queued already
                if idle:
                    want = max(want, self._sent)
                ops = self._take()
                self._in_flight = sum(_wire_size(op.length, op.data, op.red) for op in ops)
                if self._resync_left and not self._resync_asked and \
                        self._in_flight < self.max_queued // 2:
                    self._resync_asked = True
                    self._post(self._e_resync_step)
            try:
                if ops:
                    self.link.apply(ops)
                    self._sent = ops[-1].seq
                    self.sent_ops += len(ops)
                    self.sent_bytes += self._in_flight
                    self.logical_bytes += sum(op.length for op in ops)
                self._in_flight = 0
                now = time.monotonic()
                if (want > flushed and self._sent >= want) or (
                        self._sent > flushed and now - last_flush >= self.idle_flush):
                    # asked for, or due: a writer that never flushes must not keep
                    # the bitmap and the per-op lag records growing
                    self.link.flush()
                    flushed, last_flush = self._sent, now
                    self._post(self._e_durable, flushed)
            except Exception as e:
                # OSError: the link is lost. Anything else: the peer refused an
                # op (its pool is full, a bug): also a loss, never a dead thread.
                if not isinstance(e, OSError):
                    log.error("mirror %s: the peer refused a change, the pair is split until a "
                              "resync succeeds: %s", self.vol.name, _describe(e))
                up = False
                self._in_flight = 0
                self.disconnects += 1
                self.last_error = _describe(e)
                self._post(self._e_lost, self.last_error)
                with self._cv:
                    self._resync_asked = False
                    if not self._stopping:
                        self._cv.wait(self.retry)

    def _take(self) -> list[MirrorOp]:
        """Everything queued so far (link thread)."""
        q, ops = self._queue, []
        while q:
            ops.append(q.popleft())
        self._taken_total += sum(_wire_size(op.length, op.data, op.red) for op in ops)
        return ops

    # ------------------------------------------------------------ status
    def statistics(self) -> MirrorStatistics:
        """Any thread (figures may be a moment apart)."""
        oldest = self._oldest
        return MirrorStatistics(
            volume=self.vol.name, policy=self.policy, state=self.state,
            connected=self._accepting, sent_ops=self.sent_ops, sent_bytes=self.sent_bytes,
            logical_bytes=self.logical_bytes, resync_bytes=self.resync_bytes,
            pending_bytes=max(0, self._queued_total - self._taken_total),
            lag_bytes=max(0, self._queued_total - self._durable_total),
            lag_seconds=time.monotonic() - oldest if oldest else 0.0,
            out_of_sync_bytes=self._oos * EXTENT,
            resync_left_bytes=self._resync_left * EXTENT, held_flushes=len(self._held),
            disconnects=self.disconnects, last_error=self.last_error)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _ignore(req: X.Request) -> None:
    return None


def _wire_size(length: int, data: bytes | None, red: Reduction | None) -> int:
    if data is not None:
        return OP_HEADER + len(data)
    if red is not None:
        return OP_HEADER + len(red[0]) + len(red[1]) + sum(
            len(p) for p in red[2] if p is not None) + 4 * len(red[3])
    return OP_HEADER


# ---------------------------------------------------------------- the peer's side
def apply(engine: Engine, vol: Volume, ops: list[MirrorOp]) -> None:
    """Apply a mirror's ops to the peer's copy of the volume, in order (the
    peer's engine thread). Reduced writes are checked before they are stored:
    each payload must decompress to its fingerprint and match its CRC, so a
    bad or hostile sender cannot plant a chunk under another block's
    fingerprint (which dedupe would then hand to other volumes)."""
    comp = engine.comp
    for op in ops:
        if op.offset < 0 or op.length < 0 or op.offset + op.length > vol.size:
            raise InvalidArgument(f"mirror op {op.seq}: {op.offset}+{op.length} is outside "
                                  f"volume {vol.name!r} ({vol.size} bytes)")
        if op.data is not None:
            if len(op.data) != op.length:
                raise InvalidArgument(f"mirror op {op.seq}: {len(op.data)} bytes for a "
                                      f"{op.length}-byte write")
            engine.write(vol, op.offset, op.data)
        elif op.red is not None:
            _check_reduction(comp, op)
            engine.write_reduced(vol, op.offset, reducer.finished(op.red))
        else:
            engine.zero(vol, op.offset, op.length)


def _check_reduction(comp: codecs.Compressor, op: MirrorOp) -> None:
    fps, kinds, payloads, crcs = op.red  # type: ignore[misc]
    n = len(kinds)
    if (op.offset % BLOCK_SIZE or op.length != n * BLOCK_SIZE or len(fps) != 32 * n
            or len(payloads) != n or len(crcs) not in (0, n)):
        raise InvalidArgument(f"mirror op {op.seq}: malformed reduced write")
    for i in range(n):
        kind, payload = kinds[i], payloads[i]
        if kind == KIND_ZERO:
            continue
        if payload is None or kind not in codecs.NAMES:
            raise InvalidArgument(f"mirror op {op.seq}: block {i} has no payload or codec")
        try:
            raw = comp.decompress(kind, payload, BLOCK_SIZE)
        except Exception as e:
            raise CorruptData(f"mirror op {op.seq}: block {i} does not decompress: {e}") from e
        if (len(raw) != BLOCK_SIZE or sha256(raw).digest() != fps[32 * i:32 * i + 32]
                or (crcs and zlib.crc32(payload) != crcs[i])):
            raise CorruptData(f"mirror op {op.seq}: block {i} does not match its fingerprint "
                              "or checksum")


class LocalPeer:
    """A PeerLink to a second engine in this process, for tests and benchmarks:
    its engine runs on a thread of its own (as the peer daemon's data plane
    would); `delay` seconds are added to every call, and while `down` is set
    every call fails as a lost link does."""

    def __init__(self, engine: Engine, volume: str, delay: float = 0.0) -> None:
        self.engine = engine
        self.volume = volume
        self.delay = delay
        self.down = False
        self.received_ops = 0
        self.received_bytes = 0  # on the wire, counted as the mirror counts them
        self.flushes = 0
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="peer-engine")
        self._stopped = False

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on the peer's engine thread."""
        return self._thread.submit(fn, *args).result()

    def _gate(self) -> None:
        if self.delay:
            time.sleep(self.delay)
        if self.down:
            raise ConnectionError("peer unreachable (link down)")

    def connect(self) -> None:
        self._gate()
        self.run(self.engine.volume, self.volume)

    def apply(self, ops: list[MirrorOp]) -> None:
        self._gate()
        vol = self.run(self.engine.volume, self.volume)
        self.run(apply, self.engine, vol, ops)
        self.received_ops += len(ops)
        self.received_bytes += sum(_wire_size(op.length, op.data, op.red) for op in ops)

    def flush(self) -> None:
        self._gate()
        self.run(self.engine.flush)
        self.flushes += 1

    def close(self) -> None:
        return None

    def shutdown(self, fn: Callable[[Engine], Any] | None = None) -> None:
        """End the peer's thread, after fn(engine) on it (close, or a crash); once."""
        if self._stopped:
            return
        self._stopped = True
        if fn is not None:
            self.run(fn, self.engine)
        self._thread.shutdown()
