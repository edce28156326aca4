"""Prometheus metrics: per-volume I/O counters and latency histograms kept by
the data plane, plus pool capacity, reduction and error figures.

The hot path only bumps integers in preallocated lists (no prometheus_client
objects, no locks: one writer thread, readers tolerate a torn snapshot);
`render()` turns them into the exposition format at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST
OPS = ("read", "write", "zero", "trim", "flush", "extents")
# request latency bucket bounds, in seconds (Prometheus `le` labels)
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
           0.5, 1.0, 2.5)
_BOUNDS_NS = [int(b * 1e9) for b in BUCKETS]


class VolumeIo:
    """I/O counters of one volume, per op kind."""

    __slots__ = ("ops", "bytes", "errors", "buckets", "lat_sum_ns")

    def __init__(self) -> None:
        n = len(OPS)
        self.ops = [0] * n
        self.bytes = [0] * n
        self.errors = [0] * n
        self.buckets = [[0] * (len(BUCKETS) + 1) for _ in range(n)]  # last: +Inf
        self.lat_sum_ns = [0] * n


class IoStats:
    """Per-volume I/O statistics, written by the data plane thread only."""

    def __init__(self) -> None:
        self.volumes: dict[str, VolumeIo] = {}

    def record(self, volume: str, op: int, nbytes: int, latency_ns: int, failed: bool) -> None:
        v = self.volumes.get(volume)
        if v is None:
            v = self.volumes[volume] = VolumeIo()
        v.ops[op] += 1
        v.bytes[op] += nbytes
        if failed:
            v.errors[op] += 1
        v.buckets[op][bisect_left(_BOUNDS_NS, latency_ns)] += 1
        v.lat_sum_ns[op] += latency_ns

    def forget(self, volume: str) -> None:
        self.volumes.pop(volume, None)


class _Collector(Collector):
    def __init__(self, ctx: Any, st: Any) -> None:
        self.ctx = ctx
        self.st = st

    def collect(self) -> Iterator[Any]:
        ctx, st = self.ctx, self.st
        eng = ctx.engine
        io: IoStats = ctx.dataplane.io
        names = sorted(eng.volumes)

        ops = CounterMetricFamily("pstorage_volume_requests", "requests served, by op",
                                  labels=["volume", "op"])
        nbytes = CounterMetricFamily("pstorage_volume_bytes", "bytes read/written/zeroed, by op",
                                     labels=["volume", "op"])
        errs = CounterMetricFamily("pstorage_volume_errors", "requests that failed, by op",
                                   labels=["volume", "op"])
        lat = HistogramMetricFamily("pstorage_volume_request_latency_seconds",
                                    "time from request parsed to reply queued (commit included)",
                                    labels=["volume", "op"])
        for name in names:
            v = io.volumes.get(name)
            if v is None:
                continue
            for i, op in enumerate(OPS):
                if not v.ops[i]:
                    continue
                ops.add_metric([name, op], v.ops[i])
                nbytes.add_metric([name, op], v.bytes[i])
                errs.add_metric([name, op], v.errors[i])
                acc, cum = [], 0
                for b, c in zip((*map(str, BUCKETS), "+Inf"), v.buckets[i], strict=True):
                    cum += c
                    acc.append((b, cum))
                lat.add_metric([name, op], acc, v.lat_sum_ns[i] / 1e9)
        yield from (ops, nbytes, errs, lat)

        logical = GaugeMetricFamily("pstorage_volume_logical_bytes", "mapped non-zero data",
                                    labels=["volume"])
        prov = GaugeMetricFamily("pstorage_volume_provisioned_bytes", "volume size",
                                 labels=["volume"])
        # ingest counters: what was written since the volume was created (never go down)
        written = CounterMetricFamily("pstorage_volume_ingest_written_bytes",
                                      "blocks written, zeros and overwrites included",
                                      labels=["volume"])
        new_stored = CounterMetricFamily("pstorage_volume_ingest_new_chunk_stored_bytes",
                                         "segment bytes the volume's new chunks took when written",
                                         labels=["volume"])
        ingest_ratio = GaugeMetricFamily("pstorage_volume_ingest_reduction_ratio",
                                         "ingest: bytes written / bytes its new chunks took",
                                         labels=["volume"])
        # current figures from the last walk of the maps (`pstorage stats` makes
        # one; a scrape never does): the volume's share of the pool's figures
        share = GaugeMetricFamily("pstorage_volume_stored_share_bytes",
                                  "its share of the pool's stored bytes (last stats walk)",
                                  labels=["volume"])
        ratio = GaugeMetricFamily("pstorage_volume_data_reduction_ratio",
                                  "logical / its share of stored (last stats walk)", labels=["volume"])
        walks = ctx.usage.last() if getattr(ctx, "usage", None) is not None else {}
        for name in names:
            vol = eng.volumes.get(name)
            if vol is None:
                continue
            s = vol.stats
            logical.add_metric([name], s.mapped_blocks * 4096)
            prov.add_metric([name], vol.size)
            written.add_metric([name], s.written_bytes)
            new_stored.add_metric([name], s.stored_bytes)
            if s.stored_bytes:
                ingest_ratio.add_metric([name], s.written_bytes / s.stored_bytes)
            w = walks.get(vol.id)
            if w is not None:
                share.add_metric([name], round(w.stored_share))
                if w.stored_share:
                    ratio.add_metric([name], w.logical_bytes / round(w.stored_share))
        yield from (logical, prov, written, new_stored, ingest_ratio, share, ratio)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield gauge("pstorage_pool_capacity_bytes", "usable segment space", st.capacity_bytes)
        yield gauge("pstorage_pool_allocated_bytes", "segments in use", st.allocated_bytes)
        yield gauge("pstorage_pool_free_bytes", "free segments", st.free_bytes)
        yield gauge("pstorage_pool_stored_bytes", "live chunk records", st.stored_bytes)
        yield gauge("pstorage_pool_logical_bytes", "data held by volumes", st.logical_bytes)
        yield gauge("pstorage_pool_unique_bytes", "logical after dedupe", st.unique_bytes)
        yield gauge("pstorage_pool_provisioned_bytes", "sum of volume sizes", st.provisioned_bytes)
        if st.stored_bytes:
            yield gauge("pstorage_pool_data_reduction_ratio", "logical / stored",
                        st.logical_bytes / st.stored_bytes)
            yield gauge("pstorage_pool_total_efficiency", "provisioned / stored",
                        st.provisioned_bytes / st.stored_bytes)
        if st.unique_bytes:
            yield gauge("pstorage_pool_dedupe_ratio", "logical / unique",
                        st.logical_bytes / st.unique_bytes)
        if st.stored_bytes:
            yield gauge("pstorage_pool_compression_ratio", "unique / stored",
                        st.unique_bytes / st.stored_bytes)
        yield gauge("pstorage_volumes", "volumes", st.volumes)
        yield CounterMetricFamily("pstorage_checksum_errors", "chunk checksum mismatches on read",
                                  value=st.checksum_errors)
        yield CounterMetricFamily("pstorage_io_errors",
                                  "backing device write and sync errors (the pool fails on one)",
                                  value=st.io_errors)
        yield CounterMetricFamily("pstorage_read_errors",
                                  "backing device reads that failed, since start",
                                  value=st.read_errors)
        sup = eng.supervisor.statistics()
        bg = CounterMetricFamily("pstorage_background_failures",
                                 "background service runs that raised, since start",
                                 labels=["service"])
        for service, n in sorted(sup.failures_total.items()):
            bg.add_metric([service], n)
        yield bg
        yield gauge("pstorage_background_failing_services",
                    "background services whose last run failed (backing off)", len(sup.failing))
        yield gauge("pstorage_pool_failed", "1 when the pool refuses writes after a device error",
                    1 if eng.failed else 0)
        yield CounterMetricFamily("pstorage_commits", "metadata commits", value=st.commits)
        dps = ctx.dataplane.statistics()
        yield CounterMetricFamily("pstorage_protocol_errors", "malformed or refused data frames",
                                  value=dps.protocol_errors)
        yield gauge("pstorage_data_connections", "open data-socket connections", dps.connections)
        mu = eng.meta.usage()
        if mu["size"]:  # format 2: the metadata region on the pool's device
            yield gauge("pstorage_metadata_region_bytes", "size of the metadata region", mu["size"])
            yield gauge("pstorage_metadata_used_bytes", "metadata pages in use in the region",
                        mu["used"])
            yield gauge("pstorage_metadata_full",
                        "1 when the metadata region is full and new data is refused",
                        1 if eng.meta_full else 0)
        fs = eng.fps.filter_statistics()
        yield gauge("pstorage_dedupe_index_memory_bytes", "dedupe filter memory", fs["bytes"])
        yield gauge("pstorage_dedupe_index_quota_bytes", "dedupe index memory quota", fs["quota"])
        yield gauge("pstorage_dedupe_index_sample_rate",
                    "share of fingerprints the index holds (1: all; below: sparse mode)",
                    fs["sample_rate"])
        if fs["false_maybe_rate"] is not None:
            yield gauge("pstorage_dedupe_index_false_maybe_rate",
                        "expected share of new blocks that cost a metadata lookup",
                        fs["false_maybe_rate"])


def render(ctx: Any, st: Any) -> bytes:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(ctx, st))
    return generate_latest(reg)
