"""Tiering recommendations and the recompression job.

Rules, each explainable and each with an estimate computed from the pool's
own data:

* recompress-cold: a volume holds cold or frozen data that is not stored
  with Zstd at RECOMPRESS_LEVEL. The saving is estimated by recompressing a
  sample of up to SAMPLE_CHUNKS of those chunks and scaling by the cold
  data's stored size. Applying it runs a background job (in engine slices)
  that rewrites the chunks that get smaller and reports the space gained.
* capacity-tier: frozen data could move to a capacity tier, only when one is
  configured (none can be yet: the report says so and how much is frozen).
* overprovisioned: provisioned size far beyond use (thin provisioning makes
  this free, but it is a promise the pool may not be able to keep).
* no-reduction: a volume whose data does not compress or dedupe; turning
  compression off saves the CPU it spends for little. It costs the little
  compression still saved: its estimated saving is negative. Applying sets
  compression "none".

Everything here that reads the pool runs on the engine thread (via
DataPlane.call); jobs run as engine background steps.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import zstandard

from ..engine.codecs import CODEC_NONE, CODEC_ZSTD, NAMES
from ..engine.engine import Engine, Volume
from ..engine.format import BLOCK_SIZE, record_size
from ..engine.jobs import JobRecord, JobRegistry, fraction
from ..engine.units import human_bytes
from ..errors import Conflict, InvalidArgument, NotFound
from .temperature import EXTENT_SIZE, HeatMap, Thresholds

log = logging.getLogger(__name__)

RECOMPRESS_LEVEL = 15  # zstd level for cold data: ~4x slower to write than 3, decodes as fast
SAMPLE_CHUNKS = 64  # chunks recompressed per volume to estimate the saving
MIN_COLD_BYTES = 1 << 20  # less cold data than this is not worth a job
OVERPROVISION_FACTOR = 4  # provisioned >= 4x logical ...
OVERPROVISION_MIN = 10 << 30  # ... and at least 10 GiB unused
NO_REDUCTION_RATIO = 1.1  # written / stored below this: data does not reduce
NO_REDUCTION_MIN = 64 << 20  # judged only after this much was written
JOB_CHUNKS_BUSY = 8  # chunks per background step while clients are busy
JOB_CHUNKS_IDLE = 256


@dataclass
class Recommendation:
    id: str
    kind: str
    volume: str
    summary: str
    reason: str
    estimated_savings_bytes: int
    estimate: str  # how the estimate was computed
    action: str  # what apply does
    applicable: bool = True
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Job(JobRecord):
    """A recompression job."""

    extents_total: int = 0
    extents_done: int = 0
    chunks_examined: int = 0
    chunks_rewritten: int = 0
    bytes_before: int = 0  # stored size of the rewritten chunks before ...
    bytes_after: int = 0  # ... and after

    def progress(self) -> float:
        return fraction(self.extents_done, self.extents_total, self.state)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["saved_bytes"] = self.bytes_before - self.bytes_after
        return d


def _cold_extents(engine: Engine, vol: Volume, th: Thresholds, now: float) -> list[int]:
    """Extents of the volume that hold data and were last accessed cold or frozen."""
    end = -(-vol.size // EXTENT_SIZE)
    return [e for e, last, mapped in HeatMap.of(engine).extents(vol.id, end)
            if mapped and last and th.classify(now - last) >= 2]


def _sample_cids(engine: Engine, vol: Volume, extents: list[int], n: int) -> list[int]:
    """Up to n chunk ids spread over the given extents."""
    if not extents:
        return []
    stride = max(1, len(extents) // n)
    per = max(1, n // len(extents[::stride]))
    out: list[int] = []
    bpe = EXTENT_SIZE // BLOCK_SIZE
    for e in extents[::stride]:
        for _lba, cid in itertools.islice(engine.maps.data_blocks(vol, e * bpe, (e + 1) * bpe), per):
            out.append(cid)
        if len(out) >= n:
            break
    return out[:n]


class Tiering:
    """Builds recommendations and runs apply jobs; lives in the daemon."""

    def __init__(self, engine: Engine, thresholds: Thresholds | None = None,
                 registry: JobRegistry | None = None) -> None:
        self.engine = engine
        self.thresholds = thresholds or Thresholds()
        self.registry = registry or JobRegistry()
        self.jobs = self.registry.jobs
        self._zc = zstandard.ZstdCompressor(level=RECOMPRESS_LEVEL, write_content_size=False)

    def compress_cold(self, data: bytes) -> bytes:
        """`data` compressed as recompression stores cold chunks (zstd, RECOMPRESS_LEVEL)."""
        return self._zc.compress(data)

    # ------------------------------------------------------------ recommendations
    def recommendations(self, now: float | None = None) -> dict[str, Any]:
        """Engine thread. Every rule, evaluated for every volume."""
        eng = self.engine
        now = eng.clock() if now is None else now
        recs: list[Recommendation] = []
        frozen_total = 0
        for vol in sorted(eng.volumes.values(), key=lambda v: v.name):
            temp = HeatMap.of(eng).classify(vol.id, vol.name, vol.size,
                                            vol.stats.mapped_blocks * BLOCK_SIZE,
                                            self.thresholds, now)
            frozen_total += temp.classes["frozen"]["bytes"]
            rec = self._recompress_rec(vol, temp.classes, now)
            if rec:
                recs.append(rec)
            recs.extend(self._volume_rules(vol))
        notes = []
        if frozen_total:
            notes.append(f"{human_bytes(frozen_total)} of data is frozen (not accessed for "
                         f"{self.thresholds.cold_days:g}+ days); no capacity tier is configured "
                         f"to move them to, so no capacity-tier recommendation is made")
        return {"recommendations": [asdict(r) for r in recs], "notes": notes,
                "capacity_tier": None, "thresholds_days": asdict(self.thresholds),
                "generated": now}

    def _recompress_rec(self, vol: Volume, classes: dict[str, dict[str, int]],
                        now: float) -> Recommendation | None:
        cold = classes["cold"]["bytes"] + classes["frozen"]["bytes"]
        if cold < MIN_COLD_BYTES:
            return None
        extents = _cold_extents(self.engine, vol, self.thresholds, now)
        old_sum = new_sum = 0
        n = 0
        for cid in _sample_cids(self.engine, vol, extents, SAMPLE_CHUNKS):
            old, new = self._trial(cid)
            old_sum += old
            new_sum += new
            n += 1
        if not n or new_sum >= old_sum:
            return None
        stored_per_byte = old_sum / (n * BLOCK_SIZE)
        est = int(cold * stored_per_byte * (1 - new_sum / old_sum))
        if est < BLOCK_SIZE:
            return None
        return Recommendation(
            id=f"recompress-cold:{vol.name}", kind="recompress-cold", volume=vol.name,
            summary=f"recompress {human_bytes(cold)} of cold/frozen data in {vol.name} "
                    f"with zstd-{RECOMPRESS_LEVEL}",
            reason=f"{human_bytes(classes['cold']['bytes'])} cold (not accessed for "
                   f"{self.thresholds.warm_days:g}+ days) and {human_bytes(classes['frozen']['bytes'])} "
                   f"frozen ({self.thresholds.cold_days:g}+ days) are stored with faster, weaker "
                   f"compression",
            estimated_savings_bytes=est,
            estimate=f"recompressed a sample of {n} chunks: {old_sum} -> {new_sum} stored bytes "
                     f"({100 * (1 - new_sum / old_sum):.1f}% smaller), scaled to the cold data",
            action=f"a background job rewrites the cold chunks with zstd-{RECOMPRESS_LEVEL} "
                   f"where that makes them smaller",
            details={"cold_bytes": cold, "sampled_chunks": n, "extents": len(extents)})

    def _trial(self, cid: int) -> tuple[int, int]:
        """(current record size, record size at the recompression level) of a chunk."""
        _codec, slen = self.engine.chunks.chunk_codec(cid)
        out = self.compress_cold(self.engine.chunks.read_chunk(cid))
        return record_size(slen), min(record_size(slen), record_size(len(out)))

    def _volume_rules(self, vol: Volume) -> list[Recommendation]:
        out = []
        logical = vol.stats.mapped_blocks * BLOCK_SIZE
        if vol.size >= OVERPROVISION_FACTOR * max(logical, 1) and vol.size - logical >= OVERPROVISION_MIN:
            out.append(Recommendation(
                id=f"overprovisioned:{vol.name}", kind="overprovisioned", volume=vol.name,
                summary=f"{vol.name} is provisioned {human_bytes(vol.size)} but holds "
                        f"{human_bytes(logical)}",
                reason=f"provisioned size is {vol.size / max(logical, 1):.0f}x the data it holds; "
                       "thin provisioning costs nothing now, but the pool has promised space it "
                       "may not have",
                estimated_savings_bytes=vol.size - logical,
                estimate="provisioned minus logical bytes (promised, not physical, space)",
                action="none automatic: shrink with 'pstorage volume resize NAME SIZE --shrink' "
                       "after checking the filesystem on it",
                applicable=False))
        st = vol.stats
        if st.written_bytes >= NO_REDUCTION_MIN and vol.compression != NAMES[CODEC_NONE]:
            ratio = st.written_bytes / max(st.stored_bytes, 1)
            new_chunks = st.unique_bytes // BLOCK_SIZE
            cost = max(0, new_chunks * record_size(BLOCK_SIZE) - st.stored_bytes)
            if ratio < NO_REDUCTION_RATIO:
                out.append(Recommendation(
                    id=f"no-reduction:{vol.name}", kind="no-reduction", volume=vol.name,
                    summary=f"{vol.name}'s data does not reduce ({ratio:.2f}:1)",
                    reason=f"{human_bytes(st.written_bytes)} written took "
                           f"{human_bytes(st.stored_bytes)}: "
                           f"compression ({vol.compression}) and dedupe save under "
                           f"{100 * (NO_REDUCTION_RATIO - 1):.0f}%",
                    # a cost, not a saving: uncompressed, the same chunks take more space
                    estimated_savings_bytes=-cost,
                    estimate=f"negative: a cost. Compression saved {human_bytes(cost)} on the "
                             f"{new_chunks} new chunks written so far (stored uncompressed they "
                             f"would take {human_bytes(new_chunks * record_size(BLOCK_SIZE))}); "
                             "new writes would lose about as much",
                    action=f"set the volume's compression to none: saves the CPU it spends, "
                           f"costs ~{human_bytes(cost)} of space; dedupe stays"))
        return out

    # ------------------------------------------------------------ apply
    def apply(self, rec_id: str) -> dict[str, Any]:
        """Engine thread. Start (or do) what a recommendation proposes."""
        kind, _, name = rec_id.partition(":")
        if kind not in ("recompress-cold", "no-reduction", "overprovisioned") or not name:
            raise NotFound(f"no recommendation {rec_id!r}", "list them: pstorage tiering list")
        vol = self.engine.volume(name)
        current = {r["id"] for r in self.recommendations()["recommendations"]}
        if rec_id not in current:
            raise NotFound(f"recommendation {rec_id!r} does not apply now",
                           "list the current ones: pstorage tiering list")
        if kind == "overprovisioned":
            raise InvalidArgument(f"{rec_id} needs an operator's decision",
                                  "shrink the volume with 'pstorage volume resize --shrink'")
        if kind == "no-reduction":
            self.engine.set_compression(name, NAMES[CODEC_NONE])
            return {"applied": rec_id, "compression": "none"}
        if any(j.kind == "recompress-cold" and j.volume == name and j.state == "running"
               for j in self.jobs.values()):
            raise Conflict(f"a recompression job for {name} is already running",
                           "follow it: pstorage jobs")
        job = self.registry.add(lambda i: Job(i, "recompress-cold", name))
        self.engine.background.start_job(RecompressRun(self, job, vol).step, name=f"recompression job {job.id}")
        log.info("job %d: recompressing cold data of %s", job.id, name)
        return {"applied": rec_id, "job": job.to_dict()}


class RecompressRun:
    """The recompression job's state between background steps."""

    def __init__(self, tiering: Tiering, job: Job, vol: Volume) -> None:
        self.t = tiering
        self.job = job
        self.vol = vol
        eng = tiering.engine
        self.extents = _cold_extents(eng, vol, tiering.thresholds, eng.clock())
        job.extents_total = len(self.extents)
        self.next_lba: int | None = None  # resume point inside the current extent

    def step(self, budget: int) -> int:
        job, eng = self.job, self.t.engine
        if job.state != "running":
            return 0
        try:
            return self._step(max(1, budget // 8), eng)
        except Exception as e:  # a job failure must not stop the engine's other work
            job.state, job.error, job.finished = "failed", str(e), time.time()
            log.error("job %d failed: %s", job.id, e)
            return 0

    def _step(self, chunks: int, eng: Engine) -> int:
        job = self.job
        if eng.by_id.get(self.vol.id) is not self.vol:
            raise NotFound(f"volume {self.vol.name} was deleted")
        bpe = EXTENT_SIZE // BLOCK_SIZE
        work = 0
        while job.extents_done < len(self.extents) and work < chunks:
            e = self.extents[job.extents_done]
            start = self.next_lba if self.next_lba is not None else e * bpe
            room = chunks - work
            todo = list(itertools.islice(eng.maps.data_blocks(self.vol, start, (e + 1) * bpe), room + 1))
            for lba, cid in todo[:room]:
                self._recompress(cid)
                self.next_lba = lba + 1
            work += min(len(todo), room)
            if len(todo) <= room:  # the extent is finished
                job.extents_done += 1
                self.next_lba = None
                work += not todo  # an empty extent still counts as a step
        eng.dirty = True
        eng.commit_if_due()
        if job.extents_done >= len(self.extents):
            job.state, job.finished = "done", time.time()
            log.info("job %d done: %d of %d chunks rewritten, %d bytes saved", job.id,
                     job.chunks_rewritten, job.chunks_examined, job.bytes_before - job.bytes_after)
            return max(work, 1)
        return work

    def _recompress(self, cid: int) -> None:
        eng, job = self.t.engine, self.job
        job.chunks_examined += 1
        codec, slen = eng.chunks.chunk_codec(cid)
        data = eng.chunks.read_chunk(cid)
        out = self.t.compress_cold(data)
        if record_size(len(out)) >= record_size(slen) or len(out) >= BLOCK_SIZE:
            return
        old, new = eng.chunks.rewrite_chunk(cid, CODEC_ZSTD, out)
        job.chunks_rewritten += 1
        job.bytes_before += old
        job.bytes_after += new

