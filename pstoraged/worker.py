"""Runs the engine in its own thread and feeds it batches from the trio loop.

Why a thread: hashing, compression, device I/O and metadata commits all
block; the trio loop must not. Why one thread: the engine is a single-writer
state machine (one LMDB write transaction); ordering is simply FIFO.

Jobs are queued without awaiting (`submit`), the thread drains everything
queued into one batch, runs it, commits once if any job in it asked for a
flush, and hands all results back to trio with a single `run_sync_soon`.
So a flush costs one commit however many requests share it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from .engine import Engine
from .errors import DeviceIOError, PStorageError

log = logging.getLogger(__name__)

IDLE_COMMIT_SECONDS = 1.0

Done = Callable[[Any, BaseException | None], None]


@dataclass(frozen=True, slots=True)
class WorkerStatistics:
    queued: int
    batches: int
    jobs: int
    max_batch: int


class _Flush:
    """Marker result: the job wants the batch's commit before it completes."""


class EngineWorker:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._q: queue.SimpleQueue[tuple[Callable[..., Any], tuple, bool, Done] | None] = (
            queue.SimpleQueue()
        )
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.jobs = 0
        self.max_batch = 0

    def start(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], args: tuple, done: Done, flush: bool = False) -> None:
        """Queue fn(*args); done(result, exc) runs later in the trio thread."""
        self._q.put((fn, args, flush, done))

    async def call(self, fn: Callable[..., Any], *args: Any, flush: bool = False) -> Any:
        """Run fn(*args) on the engine thread and wait for it (control-plane use)."""
        ev = trio.Event()
        box: list[Any] = []

        def done(res: Any, exc: BaseException | None) -> None:
            box.append((res, exc))
            ev.set()

        self.submit(fn, args, done, flush)
        await ev.wait()
        res, exc = box[0]
        if exc is not None:
            raise exc
        return res

    async def stop(self) -> None:
        """Finish queued work, then close the engine cleanly (marks the pool clean)."""
        if self._thread is None:
            return
        self._q.put(None)
        await trio.to_thread.run_sync(self._thread.join)
        self._thread = None

    def statistics(self) -> WorkerStatistics:
        return WorkerStatistics(self._q.qsize(), self.batches, self.jobs, self.max_batch)

    # ---------------------------------------------------------------- the thread
    def _run(self) -> None:
        assert self._token is not None
        eng = self.engine
        stopping = False
        while not stopping:
            try:
                item = self._q.get(timeout=IDLE_COMMIT_SECONDS)
            except queue.Empty:
                self._idle()
                continue
            batch = []
            while item is not None:
                batch.append(item)
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
            else:
                stopping = True
            results: list[tuple[Done, Any, BaseException | None]] = []
            want_flush = False
            for fn, args, flush, done in batch:
                try:
                    results.append((done, fn(*args), None))
                    want_flush |= flush
                except PStorageError as e:
                    results.append((done, None, e))
                except Exception as e:  # a bug must not take the daemon down
                    log.exception("engine job %s failed", getattr(fn, "__name__", fn))
                    results.append((done, None, DeviceIOError(f"internal error: {e}")))
            if want_flush:
                try:
                    eng.flush()
                except Exception as e:
                    log.exception("flush failed")
                    err = e if isinstance(e, PStorageError) else DeviceIOError(str(e))
                    # Only the jobs that asked for durability learn of it; the
                    # others' data is still readable and a later flush retries.
                    results = [
                        (d, None, err) if f else (d, r, x)
                        for (d, r, x), (_, _, f, _) in zip(results, batch, strict=True)
                    ]
            self.batches += 1
            self.jobs += len(batch)
            self.max_batch = max(self.max_batch, len(batch))
            if results:
                self._token.run_sync_soon(_deliver, results)
        try:
            eng.close()
        except Exception:
            log.exception("closing the engine failed")

    def _idle(self) -> None:
        try:
            self.engine.idle()
        except Exception:
            log.exception("background commit failed")


def _deliver(results: list[tuple[Done, Any, BaseException | None]]) -> None:
    for done, res, exc in results:
        try:
            done(res, exc)
        except Exception:
            log.exception("completion callback failed")
