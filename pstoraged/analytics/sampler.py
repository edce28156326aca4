"""Analytics services of the daemon: the capacity sampler (a background
service with run/stop), and the reports the REST API serves: forecast,
health, temperature and tiering. Engine reads go through DataPlane.call;
numerical work and device tools run in worker threads so the trio loop and
the data plane never wait for them."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import trio

from ..engine.cleaner import SegmentCleaner
from ..engine.engine import Engine
from ..engine.jobs import JobRegistry
from ..frontends.dataplane import DataPlane
from . import forecast as fc
from . import health
from .history import HOUR, CapacityHistory, snapshot
from .temperature import EXTENT_SIZE, HeatMap, Thresholds
from .tiering import Tiering

log = logging.getLogger(__name__)

DEFAULT_SAMPLE_INTERVAL = 300.0


class Analytics:
    def __init__(self, dataplane: DataPlane, *, sample_interval: float = DEFAULT_SAMPLE_INTERVAL,
                 thresholds: Thresholds | None = None) -> None:
        self.dataplane = dataplane
        self.engine: Engine = dataplane.engine
        self.history = CapacityHistory(self.engine.meta)
        self.thresholds = thresholds or Thresholds()
        self.jobs = JobRegistry()  # tiering and scrub jobs
        self.tiering = Tiering(self.engine, self.thresholds, self.jobs)
        self.sample_interval = sample_interval
        self._stop = trio.Event()
        self._last_compact = 0.0

    # ------------------------------------------------------------ the sampler
    async def run(self) -> None:
        """Sample capacity now and every sample_interval until stop()."""
        while not self._stop.is_set():
            try:
                await self.dataplane.call(self._sample)
            except Exception as e:  # a failed pool must not stop the daemon's sampler
                self.engine.supervisor.failed("capacity sampler", e, retry_in=self.sample_interval)
            else:
                self.engine.supervisor.succeeded("capacity sampler")
            with trio.move_on_after(self.sample_interval):
                await self._stop.wait()

    def stop(self) -> None:
        self._stop.set()

    def _sample(self) -> None:
        now = self.engine.clock()
        self.history.record(now, snapshot(self.engine))
        if now - self._last_compact >= HOUR:
            self.history.compact(now)
            self._last_compact = now
        self.engine.dirty = True  # committed by the next idle commit

    def start_scrub(self) -> dict[str, Any]:
        """Engine thread: queue a scrub of every live chunk."""
        from ..engine.scrub import ScrubJob, ScrubRun

        if any(j.kind == "scrub" and j.state == "running" for j in self.jobs.jobs.values()):
            from ..errors import Conflict

            raise Conflict("a scrub is already running", "follow it: pstorage jobs")
        job = self.jobs.add(lambda i: ScrubJob(i))
        self.engine.background.start_job(ScrubRun(self.engine, job).step, name=f"scrub job {job.id}")
        return job.to_dict()

    # ------------------------------------------------------------ reports
    async def capacity_history(self) -> list[tuple[int, dict[str, Any]]]:
        return await self.dataplane.call(self.history.series)

    async def forecast(self, horizons: list[float], include_history: bool) -> dict[str, Any]:
        series = await self.capacity_history()
        times = [float(t) for t, _ in series]
        used = [float(r["pool"]["allocated"]) for _, r in series]
        capacity = float(series[-1][1]["pool"]["capacity"]) if series else float(
            self.engine.segs.count * self.engine.segs.size)
        result = await trio.to_thread.run_sync(
            lambda: fc.forecast(times, used, capacity, horizons_days=horizons))
        out = {"metric": "pool physical used (allocated segments)", **result.to_dict(),
               "samples": len(series), "sample_interval_s": self.sample_interval}
        if include_history:
            out["history"] = [[t, u] for t, u in zip(times, used, strict=True)]
        out["metadata"] = await self._metadata_forecast(series, horizons, include_history)
        return out

    async def _metadata_forecast(self, series: list[tuple[int, dict[str, Any]]],
                                 horizons: list[float], include_history: bool,
                                 ) -> dict[str, Any] | None:
        """The metadata region fills on its own schedule (maps grow with logical
        data, snapshots and clones, not with stored bytes): forecast it too."""
        size = self.engine.meta.usage()["size"]
        if not size:
            return None  # format 1: metadata on the host, no region to fill
        rows = [(float(t), r["pool"]) for t, r in series if r["pool"].get("meta_capacity")]
        times = [t for t, _ in rows]
        used = [float(p["meta_used"]) for _, p in rows]
        result = await trio.to_thread.run_sync(
            lambda: fc.forecast(times, used, float(size), horizons_days=horizons))
        out = {"metric": "metadata region used (LMDB pages)", **result.to_dict(),
               "samples": len(rows)}
        if include_history:
            out["history"] = [[t, u] for t, u in zip(times, used, strict=True)]
        return out

    async def health(self) -> dict[str, Any]:
        eng = self.engine
        ss = eng.segs.statistics()
        cleaner = SegmentCleaner.of(eng)
        wa = (await self.dataplane.call(cleaner.statistics)).write_amplification \
            if cleaner is not None else None
        counters = engine_health_counters(eng, wa)
        path = eng.pool.backing.path
        dev = await trio.to_thread.run_sync(health.device_health, path)
        report = health.assess(dev, counters)
        out = report.to_dict()
        out["segments"] = {"total": ss.total, "free": ss.free, "erase_min": ss.min_erase,
                           "erase_max": ss.max_erase, "wear_spread": ss.max_erase - ss.min_erase}
        return out

    async def temperature(self, th: Thresholds) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            eng = self.engine
            now = eng.clock()
            heat = HeatMap.of(eng)
            vols = [heat.classify(v.id, v.name, v.size, v.stats.mapped_blocks * 4096, th, now)
                    .to_dict() for v in sorted(eng.volumes.values(), key=lambda v: v.name)]
            pool: dict[str, int] = {}
            for v in vols:
                for c, d in v["classes"].items():
                    pool[c] = pool.get(c, 0) + d["bytes"]
            pool["untracked"] = sum(v["untracked_bytes"] for v in vols)
            return {"thresholds_days": asdict(th), "extent_size": EXTENT_SIZE, "now": now,
                    "pool_bytes": pool, "volumes": vols,
                    "explanation": "each 1 MiB extent is classed by the age of its last read or "
                                   "write; bytes are the data blocks it holds. 'untracked' is data "
                                   "written before access tracking existed"}

        return await self.dataplane.call(run)


def engine_health_counters(eng: Engine, gc_write_amplification: float | None
                           ) -> health.EngineHealthCounters:
    """What the engine knows about its own health (health.assess adds the device's)."""
    used = eng.segs.erase_counts()
    ss = eng.segs.statistics()
    backing = eng.pool.backing
    # free = what is not live data: the cleaner keeps only a few segments
    # free on purpose and turns dead space into free segments on demand
    usable = ss.total * (ss.segment_size - 4096)
    return health.EngineHealthCounters(
        free_fraction=max(0.0, 1 - eng.chunks.live_stored / usable) if usable else 0.0,
        checksum_errors=eng.chunks.checksum_errors, io_errors=eng.io_errors,
        read_errors=backing.read_errors, last_read_error=backing.last_read_error,
        background_failures=tuple(f.reason() for f in eng.supervisor.failing()),
        pool_failed=eng.failed,
        erase_count_min=min(used) if used else None,
        erase_count_max=max(used) if used else None,
        erase_count_mean=sum(used) / len(used) if used else None,
        gc_write_amplification=gc_write_amplification,
    )
