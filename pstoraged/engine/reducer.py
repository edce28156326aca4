"""Write-path reduction on a worker thread, one request at a time.

The engine thread is the daemon's bottleneck on large writes: per 4 KiB it
spent ~2.3 us hashing and ~4.6 us compressing before any metadata work. The
data plane hands every large aligned write to this worker as soon as the frame
is parsed; the worker runs the C batch reducer (`_reduce.c`: zero test,
SHA-256, compression, one GIL release per request) on the other core while the
engine thread applies earlier requests, and the engine then only looks up
fingerprints and updates the map (Engine.write_reduced).

Small writes (the hand-off costs more than it saves) and unaligned ones (they
need a read-modify-write first) are reduced inline instead (`reduce_inline`,
on the engine thread), and without the compiled module everything is. Both
give a `Reduction`, which the engine's one write path applies
(Engine._apply), so the choice is only about speed; the executor makes it
(frontends/executor.py).
"""

from __future__ import annotations

import logging
import queue
import threading
from hashlib import sha256
from typing import Any

from .format import BLOCK_SIZE, ZERO_BLOCK

log = logging.getLogger(__name__)

try:
    from ._reduce import KIND_ZERO
    from ._reduce import Reducer as _CReducer
except ImportError:  # built without a C compiler or headers: reduce inline
    _CReducer = None
    KIND_ZERO = 255

AVAILABLE = _CReducer is not None
OFFLOAD_MIN = 16384  # bytes: below this a write is reduced inline

# (fingerprints: 32 bytes per block, kinds: codec per block or KIND_ZERO,
#  payloads: what to store per block, None for zero blocks (and, from
#  reduce_inline, for blocks not compressed yet), their CRC-32s)
Reduction = tuple[bytes, bytes, list[bytes | None], list[int]]
_NO_FP = bytes(32)  # the fingerprint slot of a zero block
_NO_CRCS: list[int] = []


def reduce_inline(blocks: list[bytes], codec: int) -> Reduction:
    """The Reduction of whole blocks on the calling thread: zero test and
    fingerprints only. Payloads stay None: the engine compresses a block only
    when the dedupe index misses, so a duplicate never pays for compression."""
    if len(blocks) == 1:  # the common small write: no joins
        b = blocks[0]
        if b == ZERO_BLOCK:
            return _NO_FP, _ZERO_KINDS, [None], _NO_CRCS
        return sha256(b).digest(), bytes((codec,)), [None], _NO_CRCS
    fps: list[bytes] = []
    kinds = bytearray(len(blocks))
    for i, b in enumerate(blocks):
        if b == ZERO_BLOCK:
            kinds[i] = KIND_ZERO
            fps.append(_NO_FP)
        else:
            kinds[i] = codec
            fps.append(sha256(b).digest())
    return b"".join(fps), bytes(kinds), [None] * len(blocks), _NO_CRCS


_ZERO_KINDS = bytes((KIND_ZERO,))


class Pending:
    """One submitted write: wait() returns its Reduction (or raises the worker's error)."""

    __slots__ = ("_data", "_codec", "_done", "_result", "_error")

    def __init__(self, data: bytes, codec: int) -> None:
        self._data: bytes | None = data
        self._codec = codec
        self._done = threading.Lock()
        self._done.acquire()  # released by the worker when the result is in
        self._result: Reduction | None = None
        self._error: BaseException | None = None

    def ready(self) -> bool:
        return not self._done.locked()

    def wait(self) -> Reduction:
        with self._done:
            pass
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


class ReducerThread:
    """The worker. submit() from any thread (data plane, FUSE front end); each Pending
    is waited for on the engine thread, in any order."""

    def __init__(self, zstd_level: int = 3) -> None:
        if _CReducer is None:
            raise RuntimeError("pstoraged.engine._reduce is not built")
        self._reducer: Any = _CReducer(zstd_level)
        self._queue: queue.SimpleQueue[Pending | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="reducer", daemon=True)
        self._thread.start()

    def wants(self, offset: int, length: int) -> bool:
        return length >= OFFLOAD_MIN and offset % BLOCK_SIZE == 0 and length % BLOCK_SIZE == 0

    def submit(self, data: bytes, codec: int) -> Pending:
        """Queue a write's reduction: one C call for the whole write.

        (Reducing in 32 KiB slices, so that the engine could start sooner, was
        slower: every slice costs two GIL hand-offs. Measured 270 vs 310 MiB/s.)
        """
        p = Pending(data, codec)
        self._queue.put(p)
        return p

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        reduce = self._reducer.reduce
        while (p := self._queue.get()) is not None:
            try:
                p._result = reduce(p._data, p._codec)
            except BaseException as e:  # handed to the waiter: the request fails, not the daemon
                log.exception("reducer failed")
                p._error = e
            finally:
                p._data = None
                p._done.release()


def reduce_now(data: bytes, codec: int, zstd_level: int = 3) -> Pending:
    """A finished Pending, reduced on the calling thread (tests and tools)."""
    if _CReducer is None:
        raise RuntimeError("pstoraged.engine._reduce is not built")
    p = Pending(data, codec)
    p._result = _CReducer(zstd_level).reduce(data, codec)
    p._data = None
    p._done.release()
    return p


def finished(red: Reduction) -> Pending:
    """A Pending holding a Reduction made elsewhere (a sync replication peer's
    write, frontends/mirror.py), for Engine.write_reduced."""
    p = Pending(b"", 0)
    p._result = red
    p._data = None
    p._done.release()
    return p


def start(zstd_level: int = 3) -> ReducerThread | None:
    """The worker, or None when the compiled reducer is missing (logged once)."""
    if not AVAILABLE:
        log.warning("pstoraged.engine._reduce is not built: writes are hashed and compressed on "
                    "the engine thread (slower); reinstall with gcc, python3-dev, libssl-dev, "
                    "liblz4-dev and libzstd-dev present")
        return None
    return ReducerThread(zstd_level)
