"""Scrub: read every live chunk, verify its record (header checksum, payload
checksum, decompression) and report what was found, with progress.

Runs as an engine background job in bounded slices (chunk-id order, resumed
with a cursor position), so clients keep being served. A bad chunk is
counted and logged by the engine (checksum_errors) and listed in the job's
report with its location; scrub never changes data.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import CorruptData, DeviceIOError
from .engine import Engine
from .format import CHUNK_KEY, CHUNK_META
from .jobs import JobRecord, fraction

log = logging.getLogger(__name__)

MAX_LISTED = 100  # bad chunks listed in the report


@dataclass
class ScrubJob(JobRecord):
    kind: str = "scrub"
    volume: str = "(pool)"
    chunks_total: int = 0
    chunks_checked: int = 0
    bytes_checked: int = 0
    bad_chunks: int = 0
    bad: list[dict[str, Any]] = field(default_factory=list)

    def progress(self) -> float:
        return fraction(self.chunks_checked, self.chunks_total, self.state)


class ScrubRun:
    def __init__(self, engine: Engine, job: ScrubJob) -> None:
        self.engine = engine
        self.job = job
        self.next_key = b""
        job.chunks_total = engine.chunks.live_chunks

    def step(self, budget: int) -> int:
        job, eng = self.job, self.engine
        if job.state != "running":
            return 0
        todo: list[tuple[int, int, int, int]] = []
        cur = eng.meta.txn.cursor(db=eng.meta.chunks)
        ok = cur.set_range(self.next_key) if self.next_key else cur.first()
        while ok and len(todo) < max(1, budget // 8):
            _rc, s, off, slen, *_ = CHUNK_META.unpack(cur.value())
            todo.append((CHUNK_KEY.unpack(cur.key())[0], s, off, slen))
            ok = cur.next()
        self.next_key = bytes(cur.key()) if ok else b""
        for cid, s, off, slen in todo:
            try:
                eng.chunks.read_chunk(cid)
            except (CorruptData, DeviceIOError) as e:
                # a device read error is this chunk's problem, not the scrub's:
                # counted and listed like a bad record, and the scrub goes on
                # (raised, it would skip the rest of this batch on retry)
                job.bad_chunks += 1
                if len(job.bad) < MAX_LISTED:
                    job.bad.append({"chunk": cid, "segment": s, "offset": off, "problem": e.message})
            job.chunks_checked += 1
            job.bytes_checked += slen
        if not ok:
            job.state, job.finished = "done", time.time()
            log.info("scrub %d done: %d chunks (%d bytes) checked, %d bad", job.id,
                     job.chunks_checked, job.bytes_checked, job.bad_chunks)
            return max(len(todo), 1)
        return len(todo)


