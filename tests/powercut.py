"""A power cut for engine tests: a backing whose unsynced writes are lost.

Today's kill -9 tests keep every write the engine issued (the page cache
survives a process's death), so a missing `fdatasync` before a commit would
pass them. `ForgetfulBacking` wraps the pool's real `Backing` and keeps every
write (and discard) since the last `sync()` in a volatile list, like a
drive's write-back cache; reads see it. `PowerSwitch` counts the device's
durability events (each write, each sync, each metadata commit) and, once
armed, cuts the power at the N-th one (of one kind, or of any) by raising `PowerCut` out of the engine.
At the cut the volatile list is judged: each pending write is dropped, kept,
or torn (only a 512-byte-multiple prefix of it reaches the medium); what is
kept goes to the real file, the rest is gone. The metadata store's commits
are durable when they return (LMDB syncs its own files), so a cut before a
commit means that commit never happened; the caller then abandons the engine
with its open transaction (conftest.crash) and opens the pool again.

Used by tests/test_t2_powercut.py.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable
from typing import Any

from pstoraged.engine.backing import Backing
from pstoraged.engine.pool import Pool

SECTOR = 512  # the unit a torn write keeps or loses


class PowerCut(BaseException):
    """The power went off. A BaseException: nothing in the engine may catch it
    (the background supervisor catches Exception), as nothing survives one."""


EVENTS = ("write", "sync", "commit")


class PowerSwitch:
    """Counts durability events; when armed, the chosen one cuts the power."""

    def __init__(self) -> None:
        self.events = dict.fromkeys(EVENTS, 0)  # since the pool was opened
        self.left: int | None = None  # matching events until the cut, or None: not armed
        self.kind: str | None = None  # the kind of event that counts (None: any)
        self.on_cut: Callable[[], None] = lambda: None  # judges the volatile writes

    def arm(self, after: int, kind: str | None = None) -> None:
        """Cut the power at the event of `kind` (any kind if None) after `after`
        more of them (0: the very next one)."""
        self.left, self.kind = after, kind

    def disarm(self) -> None:
        self.left = None

    def tick(self, kind: str) -> None:
        """An event of `kind` is about to happen; it does not if the power goes now."""
        self.events[kind] += 1
        if self.left is None or self.kind not in (None, kind):
            return
        if self.left == 0:
            self.left = None
            self.on_cut()
            raise PowerCut
        self.left -= 1


class ForgetfulBacking:
    """A Backing whose writes since the last sync live in a volatile cache.

    The interface is Backing's (pread, pwrite, sync, discard, start_writeback,
    close and its attributes); the inner Backing holds what is durable.
    """

    def __init__(self, inner: Backing, switch: PowerSwitch) -> None:
        self.inner = inner
        self.switch = switch
        # (offset, data) writes and (offset, length) discards, in issue order;
        # the discard thread appends too, hence the lock
        self.pending: list[tuple[int, bytes | int]] = []
        self.lock = threading.Lock()
        self.dead = False  # after a cut: the device answers nothing more
        self.syncs = 0
        self.cut_seed = 0  # set by whoever arms the switch: how the cut judges writes
        self.cut_mode = "subset"
        self.lost = self.torn = self.kept = 0  # what the cut did, for the test's events

    def __getattr__(self, name: str) -> Any:  # path, size, fd, read_errors, ...
        return getattr(self.inner, name)

    def pread(self, offset: int, length: int) -> bytes:
        if self.dead:
            raise PowerCut
        data = bytearray(self.inner.pread(offset, length))
        end = offset + length
        with self.lock:
            for off, what in self.pending:  # newer writes over older ones
                size = what if isinstance(what, int) else len(what)
                lo, hi = max(off, offset), min(off + size, end)
                if lo < hi:
                    data[lo - offset : hi - offset] = (
                        bytes(hi - lo) if isinstance(what, int) else what[lo - off : hi - off])
        return bytes(data)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.dead:
            raise PowerCut
        if offset % 4096 or len(data) % 4096:
            raise ValueError(f"unaligned device write {offset}+{len(data)}")
        with self.lock:  # issued: in the cache, torn or lost if the power goes now
            self.pending.append((offset, bytes(data)))
        self.switch.tick("write")

    def start_writeback(self, offset: int, length: int) -> None:
        """Only a hint: it starts writeback, it does not wait for it."""

    def sync(self) -> None:
        if self.dead:
            raise PowerCut
        self.switch.tick("sync")  # a cut before the sync: nothing of it happened
        with self.lock:
            pending, self.pending = self.pending, []
        for off, what in pending:
            self._apply(off, what)
        self.inner.sync()
        self.syncs += 1

    def discard(self, offset: int, length: int) -> None:
        # called on the segment log's discard thread: after a cut it just stops
        if self.dead:
            return
        with self.lock:
            self.pending.append((offset, length))

    def _apply(self, offset: int, what: bytes | int) -> None:
        if isinstance(what, int):
            self.inner.discard(offset, what)
        else:
            # os.pwrite, not Backing.pwrite: a torn write ends on a 512-byte boundary
            done = 0
            while done < len(what):
                done += os.pwrite(self.inner.fd, what[done:], offset + done)

    def cut(self) -> None:
        """The power goes: each volatile write is lost, kept or torn, by cut_mode:
        "none" keeps nothing, "prefix" keeps the writes up to a random point and
        tears the last of them, "subset" decides for each write on its own (a
        drive's cache writes back in any order). Discards are kept or not, each
        by its own coin (none is ordered against another write to its range:
        a segment is not handed out again until its discard finished)."""
        with self.lock:
            self.dead = True
            pending, self.pending = self.pending, []
        rng = random.Random(self.cut_seed)
        writes = [(off, w) for off, w in pending if not isinstance(w, int)]
        if self.cut_mode == "none":
            keep = [0] * len(writes)
        elif self.cut_mode == "prefix":
            n = rng.randint(0, len(writes))
            keep = [1] * n + [0] * (len(writes) - n)
            if n:
                keep[n - 1] = 2
        else:
            keep = [rng.choice((0, 1, 1, 2)) for _ in writes]
        verdicts = iter(keep)
        for off, what in pending:
            if isinstance(what, int):
                if random.Random(f"{self.cut_seed}:{off}").random() < 0.5:
                    self._apply(off, what)
                continue
            verdict = next(verdicts)
            if verdict == 0:
                self.lost += 1
                continue
            if verdict == 2:  # torn: a prefix of whole sectors, maybe none
                what = what[: rng.randint(0, len(what) // SECTOR) * SECTOR]
                self.torn += 1
            else:
                self.kept += 1
            self._apply(off, what)

    def close(self) -> None:
        """Closing without a sync is a power cut of what was not synced."""
        if not self.dead:
            self.cut_mode = "none"
            self.cut()
        self.inner.close()


def unplug(pool: Pool, switch: PowerSwitch, on_commit: Callable[[], None]) -> ForgetfulBacking:
    """Put `pool` behind a forgetful device and the switch; `on_commit` runs after
    each metadata commit returned (the moment its state becomes durable).

    Call before Engine(pool): the engine takes pool.backing and pool.meta then.
    """
    fb = ForgetfulBacking(pool.backing, switch)
    switch.on_cut = fb.cut
    pool.backing = fb  # type: ignore[assignment]  # duck-typed Backing
    meta = pool.meta
    real_commit = meta.commit

    def commit() -> None:
        if meta._txn is None:  # nothing to commit: not an event
            return
        if fb.dead:
            raise PowerCut
        switch.tick("commit")  # a cut here: this commit never happened
        real_commit()
        on_commit()

    meta.commit = commit  # type: ignore[method-assign]
    return fb
