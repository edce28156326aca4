"""The registry of background jobs (tiering recompression, scrub): ids,
progress reports for the API. The work itself runs as engine background
steps (Engine.start_job); jobs live in memory and a restart forgets them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar


class Job(Protocol):
    id: int
    state: str  # running | done | failed

    def to_dict(self) -> dict[str, Any]: ...


J = TypeVar("J", bound=Job)


class JobRegistry:
    def __init__(self) -> None:
        self.jobs: dict[int, Any] = {}
        self._next = 1

    def add(self, make: Callable[[int], J]) -> J:
        job = make(self._next)
        self._next += 1
        self.jobs[job.id] = job
        return job
