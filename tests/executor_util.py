"""An engine's I/O sent as the front ends send it: through an executor, which
records the accesses for the heat map (as in the daemon). For tests that
check data temperature without a data plane."""

from __future__ import annotations

from pstoraged.analytics.temperature import HeatMap
from pstoraged.engine.engine import Engine, Volume
from pstoraged.frontends import executor as X
from pstoraged.frontends.metrics import IoStats


def _ignore(req: X.Request) -> None:
    return None


class Front:
    """read/write/trim/zero of one engine through an Executor (run inline: no
    reducer thread, no commit policy at the engine's safe points)."""

    def __init__(self, engine: Engine) -> None:
        self.executor = X.Executor(engine, IoStats(), lambda: None)
        HeatMap.attach(engine).listen(self.executor)

    def run(self, op: int, vol: Volume, offset: int, length: int, data: bytes | None = None):
        req = X.Request(op, vol, offset, length, data, False, _ignore, None, 0, 0)
        self.executor.run([req])
        if req.error is not None:
            raise req.error
        return req.result

    def write(self, vol: Volume, offset: int, data: bytes) -> None:
        self.run(X.WRITE, vol, offset, len(data), bytes(data))

    def read(self, vol: Volume, offset: int, length: int) -> bytes:
        return self.run(X.READ, vol, offset, length)

    def trim(self, vol: Volume, offset: int, length: int) -> None:
        self.run(X.TRIM, vol, offset, length)

    def zero(self, vol: Volume, offset: int, length: int) -> None:
        self.run(X.ZERO, vol, offset, length)
