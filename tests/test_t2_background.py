"""Failures the daemon serves through: device read errors and failing background services.

Both must show in health, /healthz and /metrics; a failing service must back off, log its
traceback once, let the other services go on, and count as healthy again once it works.
"""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import pytest

from pstoraged.analytics.health import assess, device_health
from pstoraged.analytics.sampler import engine_health_counters
from pstoraged.engine import background
from pstoraged.engine.cleaner import SegmentCleaner
from pstoraged.errors import DeviceIOError
from pstoraged.frontends.dataplane import DataPlaneStatistics
from pstoraged.frontends.metrics import IoStats, render


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _health(engine):
    return assess(device_health(engine.pool.backing.path),
                  engine_health_counters(engine, None))


def _metrics(engine) -> dict[str, float]:
    stats = DataPlaneStatistics(connections=0, batches=0, requests=0, max_batch=0,
                                protocol_errors=0, commits=0)
    ctx = SimpleNamespace(engine=engine, dataplane=SimpleNamespace(
        io=IoStats(), statistics=lambda: stats))
    out = {}
    for line in render(ctx, engine.statistics()).decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _errors(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_failing_cleaner_backs_off_shows_everywhere_and_recovers(engine, caplog, monkeypatch):
    caplog.allowed_errors = True
    caplog.set_level(logging.INFO)
    clock = Clock()
    engine.supervisor.clock = clock
    cleaner = SegmentCleaner(engine)
    engine.services.append(cleaner)
    calls = []

    def broken(budget, busy):
        calls.append(budget)
        raise RuntimeError("victim table out of step")

    monkeypatch.setattr(cleaner, "wanted", lambda busy: True)
    monkeypatch.setattr(cleaner, "step", broken)

    assert engine.background.step(100, busy=False) == 0
    assert len(calls) == 1
    errors = _errors(caplog)
    assert len(errors) == 1 and errors[0].exc_info is not None  # the traceback, once
    assert "background service cleaner failed" in errors[0].getMessage()

    # backing off: not retried at once, and the data plane is not kept spinning
    for _ in range(50):
        engine.background.step(100, busy=False)
    assert len(calls) == 1
    assert not engine.background.has_work()
    assert engine.supervisor.next_due_in() == pytest.approx(0.1)

    report = _health(engine)
    assert report.status == "degraded"
    reason = next(r for r in report.reasons if "cleaner" in r)
    assert "background service cleaner is failing: RuntimeError: victim table out of step" in reason
    m = _metrics(engine)
    assert m['pstorage_background_failures_total{service="cleaner"}'] == 1
    assert m["pstorage_background_failing_services"] == 1

    # the pause doubles up to the cap; repeats are one short warning line each
    pauses = []
    for _ in range(14):
        wait = engine.supervisor.next_due_in()
        assert wait is not None
        pauses.append(round(wait, 3))
        clock.now += wait
        engine.background.step(100, busy=False)
    assert len(calls) == 15
    assert pauses[:4] == [0.1, 0.2, 0.4, 0.8] and max(pauses) == pauses[-1] == 60.0
    assert len(_errors(caplog)) == 1
    repeats = [r.getMessage() for r in caplog.records if "still failing" in r.getMessage()]
    assert len(repeats) == 14 and repeats[-1].startswith("cleaner still failing (15 times)")
    assert _metrics(engine)['pstorage_background_failures_total{service="cleaner"}'] == 15

    # fixed: the next try succeeds and everything says healthy again
    monkeypatch.undo()
    assert not cleaner.wanted(False)  # nothing to clean: only the retry makes it run
    clock.now += 60
    assert engine.background.has_work()  # the data plane calls background.step only then
    engine.background.step(100, busy=False)
    assert engine.supervisor.failing() == ()
    assert _health(engine).status == "healthy"
    assert _metrics(engine)["pstorage_background_failing_services"] == 0
    assert any("cleaner works again after 15 failures" in r.getMessage() for r in caplog.records)


def test_a_failing_reclaim_does_not_stop_the_cleaner(engine, caplog, monkeypatch):
    """Before, the first background task that raised ended every step: GC stopped too."""
    caplog.allowed_errors = True
    vol = engine.create_volume("v", 4 << 20)
    engine.write(vol, 0, os.urandom(1 << 20))
    engine.delete_volume("v")  # queues a reclaim, which comes before the services

    def broken(budget=0):
        raise RuntimeError("reclaim bug")

    monkeypatch.setattr(engine, "reclaim_step", broken)

    class Service:
        name = "probe"
        steps = 0

        def wanted(self, busy):
            return True

        def step(self, budget, busy):
            self.steps += 1
            return 1

    svc = Service()
    engine.services.append(svc)
    for _ in range(5):
        engine.background.step(100, busy=False)
    assert svc.steps == 5
    assert [f.service for f in engine.supervisor.failing()] == ["reclaim"]


def test_a_service_whose_wanted_raises_does_not_crash_the_caller(engine, caplog):
    caplog.allowed_errors = True

    class Broken:
        def wanted(self, busy):
            raise ValueError("no")

        def step(self, budget, busy):
            return 1

    engine.services.append(Broken())
    assert not engine.background.has_work()  # the data plane's loop calls this unguarded
    assert engine.supervisor.failing()[0].service == "Broken"


def test_trio_tasks_report_with_their_own_retry_interval(caplog):
    caplog.allowed_errors = True
    sup = background.Supervisor(clock=Clock())
    sup.failed("capacity sampler", OSError("disk full"), retry_in=300)
    (f,) = sup.failing()
    assert f.service == "capacity sampler" and f.retry_in == 300 and f.error == "OSError: disk full"
    sup.succeeded("capacity sampler")
    assert sup.failing() == () and sup.statistics().failures_total == {"capacity sampler": 1}


def test_device_read_errors_are_counted_and_make_health_degraded(engine):
    vol = engine.create_volume("v", 4 << 20)
    engine.write(vol, 0, os.urandom(1 << 20))  # many 64 KiB segments: the first are sealed
    engine.flush()
    backing = engine.pool.backing
    saved = os.dup(backing.fd)
    wronly = os.open(backing.path, os.O_WRONLY)
    os.dup2(wronly, backing.fd)  # reads now fail in the kernel (EBADF); writes still work
    os.close(wronly)
    try:
        for _ in range(3):
            with pytest.raises(DeviceIOError):
                engine.read(vol, 0, 4096)
    finally:
        os.dup2(saved, backing.fd)
        os.close(saved)
    assert engine.read(vol, 0, 4096)  # reads work again; the count stays
    assert engine.statistics().read_errors == 3
    assert engine.chunks.checksum_errors == 0  # a failed read is not a checksum failure
    report = _health(engine)
    assert report.status == "degraded"
    reason = next(r for r in report.reasons if "read errors" in r)
    assert reason.startswith("3 read errors from the backing device since start; last: EBADF "
                             "at offset ")
    assert report.engine.to_dict()["read_errors"] == 3
    assert _metrics(engine)["pstorage_read_errors_total"] == 3
