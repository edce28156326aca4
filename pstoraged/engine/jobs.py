"""The registry of background jobs (tiering recompression, scrub): ids,
progress reports for the API. The work itself runs as engine background
steps (engine.background.start_job); jobs live in memory and a restart forgets them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeVar


class Job(Protocol):
    id: int
    state: str  # running | done | failed

    def to_dict(self) -> dict[str, Any]: ...


J = TypeVar("J", bound=Job)


@dataclass
class JobRecord:
    """What every job reports; subclasses add their own counters."""

    id: int
    kind: str = ""
    volume: str = ""
    state: str = "running"  # running | done | failed
    started: float = field(default_factory=time.time)
    finished: float | None = None
    error: str | None = None

    def progress(self) -> float:
        return 1.0 if self.state == "done" else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["progress"] = round(self.progress(), 4)
        return d


def fraction(done: int, total: int, state: str) -> float:
    """Progress of `done` out of `total`; a job with nothing to do is done when it says so."""
    if total:
        return min(1.0, done / total)
    return 1.0 if state == "done" else 0.0


class JobRegistry:
    def __init__(self) -> None:
        self.jobs: dict[int, Any] = {}
        self._next = 1

    def add(self, make: Callable[[int], J]) -> J:
        job = make(self._next)
        self._next += 1
        self.jobs[job.id] = job
        return job
