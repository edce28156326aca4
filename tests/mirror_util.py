"""A source engine driven as the data plane drives it (an engine thread that
runs executor batches), mirrored to a LocalPeer: for the sync replication
tests (test_t2_mirror.py) and the mirror benchmark."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from time import monotonic_ns
from typing import Any

from pstoraged.engine.engine import Engine, Volume
from pstoraged.engine.pool import open_pool
from pstoraged.errors import DeviceIOError
from pstoraged.frontends import executor as X
from pstoraged.frontends.metrics import IoStats
from pstoraged.frontends.mirror import IN_SYNC, LocalPeer, Mirror


class Loop:
    """The data plane's engine thread, without the socket: runs what is submitted."""

    def __init__(self, engine: Engine, reducer: bool = True) -> None:
        self.engine = engine
        self._wake = threading.Event()
        self.ex = X.Executor(engine, IoStats(), self._wake.set)
        if reducer:
            self.ex.start()
        self._stopping = False
        self._final: Callable[[Engine], Any] | None = None
        self.thread = threading.Thread(target=self._run, name="test-engine", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(0.05)
            self._wake.clear()
            batch: list[X.Request] = []
            self.ex.take_submitted(batch)
            if batch:
                self.ex.run(batch)
        if self._final is not None:
            self._final(self.engine)
        if self.ex.reducer is not None:
            self.ex.reducer.stop()

    def submit(self, op: int, vol: Volume, offset: int, length: int = 0,
               data: bytes | None = None, durable: bool = False
               ) -> tuple[X.Request, threading.Event]:
        done = threading.Event()

        def reply(_: X.Request) -> None:
            done.set()

        if op == X.WRITE:
            assert data is not None
            req = self.ex.write(vol, offset, data, durable, reply, None, 0, monotonic_ns())
        else:
            req = X.Request(op, vol, offset, length, None, durable, reply, None, 0,
                            monotonic_ns())
        self.ex.submit([req])
        return req, done

    def do(self, op: int, vol: Volume, offset: int = 0, length: int = 0,
           data: bytes | None = None, durable: bool = False, timeout: float = 20) -> Any:
        req, done = self.submit(op, vol, offset, length, data, durable)
        assert done.wait(timeout), "no reply"
        if req.error is not None:
            raise req.error
        return req.result

    def write(self, vol: Volume, offset: int, data: bytes, fua: bool = False) -> None:
        self.do(X.WRITE, vol, offset, len(data), data, fua)

    def flush(self, vol: Volume) -> None:
        self.do(X.FLUSH, vol, durable=True)

    def read(self, vol: Volume, offset: int, length: int) -> bytes:
        return self.do(X.READ, vol, offset, length)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        done = threading.Event()
        req = X.call(fn, args, False, lambda _: done.set())
        self.ex.submit([req])
        assert done.wait(20), "no reply"
        if req.error is not None:
            raise req.error
        return req.result

    def stop(self, final: Callable[[Engine], Any] | None = None) -> None:
        """End the thread after final(engine) on it (close, or conftest.crash)."""
        self._final = final
        self._stopping = True
        self._wake.set()
        self.thread.join()


class Pair:
    """Volume `v` of pool a, mirrored to volume `v` of pool b (same size)."""

    def __init__(self, dir_a: str, dir_b: str, size: int, policy: str = "degrade",
                 delay: float = 0.0, create: bool = True, reducer: bool = True) -> None:
        self.dir_a, self.dir_b, self.size, self.policy = dir_a, dir_b, size, policy
        src = Engine(open_pool(dir_a))
        dst = Engine(open_pool(dir_b))
        if create:
            src.create_volume("v", size)
            dst.create_volume("v", size)
        self.peer = LocalPeer(dst, "v", delay=delay)
        self.reducer = reducer
        self.start(src)

    def start(self, src: Engine) -> None:
        self.src = src
        self.vol = src.volume("v")
        self.loop = Loop(src, self.reducer)
        self.mirror: Mirror = self.loop.call(
            lambda: Mirror(src, self.vol, self.peer, self.loop.ex, self.policy, retry=0.02))
        self.loop.call(self.loop.ex.add_mirror, self.mirror)
        self.mirror.start()

    def stop_source(self, final: Callable[[Engine], Any] | None) -> None:
        self.mirror.stop()
        self.loop.stop(final)

    def restart_source(self, final: Callable[[Engine], Any] | None) -> None:
        self.stop_source(final)
        self.start(Engine(open_pool(self.dir_a)))

    def wait_state(self, state: str = IN_SYNC, timeout: float = 20) -> None:
        end = time.monotonic() + timeout
        while self.mirror.statistics().state != state:
            assert time.monotonic() < end, f"still {self.mirror.statistics()}"
            time.sleep(0.01)

    def wait_in_sync(self, timeout: float = 20) -> None:
        """In sync with nothing owed (the peer has confirmed every change)."""
        end = time.monotonic() + timeout
        while True:
            st = self.mirror.statistics()
            if st.state == IN_SYNC and not st.out_of_sync_bytes and not st.lag_bytes:
                return
            assert time.monotonic() < end, f"not in sync: {st}"
            try:  # a flush makes the peer confirm what it has
                self.loop.flush(self.vol)
            except DeviceIOError:  # strict, not reconnected yet
                pass
            time.sleep(0.01)

    def peer_read(self, offset: int, length: int) -> bytes:
        eng = self.peer.engine
        return self.peer.run(lambda: eng.read(eng.volume("v"), offset, length))

    def close(self) -> None:
        if self.loop.thread.is_alive():
            self.stop_source(lambda e: e.close())
        if self.src.pool.backing.fd >= 0:
            self.src.close()
        self.peer.shutdown(lambda e: e.close() if e.pool.backing.fd >= 0 else None)


def pattern(seed: int, n: int) -> bytes:
    """Compressible but unique data."""
    return (seed.to_bytes(8, "little") + os.urandom(8) + bytes(48)) * (n // 64)
