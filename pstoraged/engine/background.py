"""Supervision of background work: failures counted, backed off, logged once, shown in health.

Every piece of background work (the engine's services and map walks between client
batches, the daemon's trio tasks) reports to one `Supervisor`. An exception is a failure
of that service: the first one logs its traceback, repeats log one short line; the
service is then skipped for a pause that doubles from BACKOFF_FIRST up to BACKOFF_MAX, so
that a bug neither floods the log nor spins the data plane, while the other services go
on. When it succeeds again it is back to normal (logged once). Health (`failing()`),
/healthz and /metrics (`statistics()`) read it.

The engine thread runs services and the trio thread reads the state and reports its own
tasks, hence the lock.

`BackgroundWork` is the engine's scheduler (`engine.background`; the data plane
calls its `step` between client batches): queued work
(reclaim, snapshot release, map copies, index prune), always-on services (index merge,
segment cleaner) and one-off jobs (tiering, scrub), each under the supervisor.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.1  # seconds before the first retry ...
BACKOFF_MAX = 60.0  # ... doubling per consecutive failure, up to this

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ServiceFailure:
    """A service whose last run failed."""

    service: str
    failures: int  # in a row, since it last succeeded
    since: float  # wall-clock time of the first of them
    error: str  # "ExceptionType: message" of the latest
    retry_in: float  # seconds until the next try (0: due now)

    def reason(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return (f"background service {self.service} is failing: {self.error} "
                f"({self.failures} failures in a row since {when}; next try in "
                f"{self.retry_in:.1f} s)")

    def to_dict(self) -> dict[str, Any]:
        return {"service": self.service, "failures": self.failures, "since": self.since,
                "error": self.error, "retry_in_s": round(self.retry_in, 1)}


@dataclass(frozen=True, slots=True)
class SupervisorStatistics:
    failures_total: dict[str, int]  # per service, since start (also recovered ones)
    failing: tuple[ServiceFailure, ...]


class _State:
    __slots__ = ("failures", "since", "error", "kind", "next_try")

    def __init__(self) -> None:
        self.failures = 0
        self.since = 0.0
        self.error = ""
        self.kind: type[BaseException] | None = None
        self.next_try = 0.0  # monotonic


class Supervisor:
    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.wall = wall
        self._lock = threading.Lock()
        self._failing: dict[str, _State] = {}
        self._totals: dict[str, int] = {}

    def due(self, name: str) -> bool:
        """False while `name` waits out its pause after a failure."""
        st = self._failing.get(name)
        return st is None or self.clock() >= st.next_try

    def is_failing(self, name: str) -> bool:
        return name in self._failing

    def run(self, name: str, fn: Callable[..., T], *args: Any, default: T) -> T:
        """fn(*args); a failure is recorded (and `default` returned), a success clears one."""
        try:
            res = fn(*args)
        except Exception as e:
            self.failed(name, e)
            return default
        if name in self._failing:
            self.succeeded(name)
        return res

    def failed(self, name: str, exc: BaseException, retry_in: float | None = None) -> None:
        """`name` failed with `exc`; next try after the backoff, or after `retry_in` seconds
        (a trio task that retries on its own schedule)."""
        now = self.clock()
        with self._lock:
            st = self._failing.get(name)
            new = st is None
            if st is None:
                st = self._failing[name] = _State()
                st.since = self.wall()
            st.failures += 1
            self._totals[name] = self._totals.get(name, 0) + 1
            pause = (retry_in if retry_in is not None
                     else min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(st.failures - 1, 32)))
            st.next_try = now + pause
            st.error = f"{type(exc).__name__}: {exc}"
            same = st.kind is type(exc)
            st.kind = type(exc)
            n = st.failures
        if new or not same:  # the traceback once per kind of failure, not per retry
            log.error("background service %s failed; retrying in %.1f s (backing off up to "
                      "%.0f s)", name, pause, BACKOFF_MAX, exc_info=exc)
        else:
            log.warning("%s still failing (%d times): %s; next try in %.1f s", name, n,
                        st.error, pause)

    def succeeded(self, name: str) -> None:
        with self._lock:
            st = self._failing.pop(name, None)
        if st is not None:
            log.info("background service %s works again after %d failures", name,
                        st.failures)

    def next_due_in(self) -> float | None:
        """Seconds until the next failed service may be tried again (None: none waits)."""
        now = self.clock()
        waits = [st.next_try - now for st in list(self._failing.values()) if st.next_try > now]
        return min(waits) if waits else None

    def failing(self) -> tuple[ServiceFailure, ...]:
        now = self.clock()
        with self._lock:
            return tuple(ServiceFailure(name, st.failures, st.since, st.error,
                                        max(0.0, st.next_try - now))
                         for name, st in sorted(self._failing.items()))

    def statistics(self) -> SupervisorStatistics:
        failing = self.failing()
        with self._lock:
            return SupervisorStatistics(dict(self._totals), failing)


class BackgroundService(Protocol):
    """Always-on engine background work (see BackgroundWork.step).

    A `name` attribute names it in logs, health and metrics (else its class name).
    """

    def wanted(self, busy: bool) -> bool: ...

    def step(self, budget: int, busy: bool) -> int: ...


def service_name(svc: BackgroundService) -> str:
    """The name a service is supervised and reported under."""
    return str(getattr(svc, "name", type(svc).__name__))


def _service_step(svc: BackgroundService, budget: int, busy: bool) -> int:
    return svc.step(budget, busy) if svc.wanted(busy) else 0


@dataclass(frozen=True, slots=True)
class QueuedWork:
    """Engine work that exists while something is queued (a deleted volume to reclaim ...).

    `pending(busy)` says whether it wants a step now; `step(budget)` does a bounded slice
    and returns the work done.
    """

    name: str
    pending: Callable[[bool], bool]
    step: Callable[[int], int]


class BackgroundWork:
    """The order in which the engine's background work gets its slices.

    `first` (reclaim, snapshot release), then the services, then `then` (map copies:
    minutes on a huge volume, which must not hold up the cleaner or the index merge),
    then the jobs, then `last` (index prune). A step runs the first that does something.
    A service is registered for good (`add_service`); a job is a callable taking the
    budget and returning the work it did, dropped once it returns 0 (`start_job`).
    """

    def __init__(self, supervisor: Supervisor, first: list[QueuedWork],
                 then: list[QueuedWork], last: list[QueuedWork]) -> None:
        self.supervisor = supervisor
        self.first, self.then, self.last = first, then, last
        self.services: list[BackgroundService] = []
        self.jobs: list[tuple[str, Callable[[int], int]]] = []  # (name, step)

    def add_service(self, svc: BackgroundService) -> None:
        """Register an always-on service; it is stepped from now on."""
        self.services.append(svc)

    def start_job(self, step: Callable[[int], int], name: str = "job") -> None:
        """Queue a job: `step(budget)` is called until it returns 0."""
        self.jobs.append((name, step))

    def pending_work(self) -> list[str]:
        """Names of the queued work and jobs (not the services) that want to run."""
        out = [w.name for w in (*self.first, *self.then, *self.last) if w.pending(False)]
        out += [name for name, _ in self.jobs]
        return out

    def has_work(self) -> bool:
        """Something is due that a step would run (the data plane steps only then)."""
        sup = self.supervisor
        # a failed service is tried again when due even if it wants nothing now:
        # that run is what shows it works again
        return (any(sup.due(name) for name in self.pending_work())
                or any(sup.due(service_name(svc))
                       and (sup.is_failing(service_name(svc)) or self._wanted(svc))
                       for svc in self.services))

    def _wanted(self, svc: BackgroundService) -> bool:
        try:
            return svc.wanted(False)
        except Exception as e:  # counts as a failure of the service (it backs off)
            self.supervisor.failed(service_name(svc), e)
            return False

    def _queued(self, works: list[QueuedWork], budget: int, busy: bool) -> int:
        sup = self.supervisor
        for w in works:
            if w.pending(busy) and sup.due(w.name):
                done = sup.run(w.name, w.step, budget, default=0)
                if done:
                    return done
        return 0

    def step(self, budget: int, busy: bool) -> int:
        """One bounded slice of background work; returns the work done (0: none).

        A service (the segment cleaner, wear leveling, the index merge) is
        always registered (`add_service`) and says itself whether it wants to
        run (`wanted(busy)`) and does a bounded step (`step(budget, busy)` ->
        work done). A job is a callable taking the budget and returning the
        work it did; it is dropped once it returns 0 (tiering recompression
        and scrub queue theirs with `start_job`). Each runs under the
        supervisor: one that raises is skipped for a growing pause while the
        others go on. Order: `first` (reclaim, snapshot release), services,
        `then` (restore, clone fill), jobs, `last` (index prune).
        """
        sup = self.supervisor
        done = self._queued(self.first, budget, busy)
        if done:
            return done
        for svc in self.services:
            name = service_name(svc)
            if sup.due(name):
                done = sup.run(name, _service_step, svc, budget, busy, default=0)
                if done:
                    return done
        done = self._queued(self.then, budget, busy)
        if done:
            return done
        for job in list(self.jobs):
            name, step = job
            if not sup.due(name):
                continue
            done = sup.run(name, step, budget, default=-1)
            if done > 0:
                return done
            if done == 0:
                self.jobs.remove(job)
        return self._queued(self.last, budget, busy)
