"""Capacity history: periodic samples of pool and per-volume capacity, kept
durably in the `hist` table and compacted as they age.

Tiers (key `>BQ`: tier, unix seconds):
  0 raw samples (every --sample-interval, default 5 min), kept RAW_KEEP;
  1 hourly averages, kept HOURLY_KEEP;
  2 daily averages, kept forever (one row a day: 3,650 rows in ten years).
A compaction folds raw rows older than RAW_KEEP into their hour's row and
hourly rows older than HOURLY_KEEP into their day's row, averaging every
figure weighted by how many samples each row stands for. So the history
stays small while the forecast still sees years of trend.

All functions run on the engine thread (they use the open write transaction).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

from ..engine.metadata import MetaStore

HIST_KEY = struct.Struct(">BQ")
RAW, HOURLY, DAILY = 0, 1, 2
HOUR, DAY = 3600, 86400
RAW_KEEP = 2 * DAY
HOURLY_KEEP = 90 * DAY
_BUCKET = {RAW: 1, HOURLY: HOUR, DAILY: DAY}
# meta_capacity/meta_used: the metadata region (0 for a format-1 pool, whose
# metadata is on the host); samples older than them read as missing
POOL_FIELDS = ("capacity", "allocated", "stored", "logical", "unique", "provisioned",
               "meta_capacity", "meta_used")
VOLUME_FIELDS = ("provisioned", "logical", "written", "stored")


def snapshot(engine: Any) -> dict[str, Any]:
    """One sample of the figures the forecast and capacity reports use."""
    st = engine.statistics()
    mu = engine.meta.usage()
    return {
        "pool": {"capacity": st.capacity_bytes, "allocated": st.allocated_bytes,
                 "stored": st.stored_bytes, "logical": st.logical_bytes,
                 "unique": st.unique_bytes, "provisioned": st.provisioned_bytes,
                 "meta_capacity": mu["size"], "meta_used": mu["used"]},
        "volumes": {v.name: {"provisioned": v.size, "logical": v.stats.mapped_blocks * 4096,
                             "written": v.stats.written_bytes, "stored": v.stats.stored_bytes}
                    for v in engine.volumes.values()},
    }


class CapacityHistory:
    def __init__(self, meta: MetaStore) -> None:
        self.meta = meta

    def _put(self, tier: int, t: int, row: dict[str, Any]) -> None:
        self.meta.txn.put(HIST_KEY.pack(tier, t), json.dumps(row, separators=(",", ":")).encode(),
                          db=self.meta.hist)
        self.meta.pending_ops += 1

    def record(self, t: float, sample: dict[str, Any]) -> None:
        self._put(RAW, int(t), {**sample, "n": 1})

    def rows(self, tier: int) -> Iterator[tuple[int, dict[str, Any]]]:
        cur = self.meta.txn.cursor(db=self.meta.hist)
        ok = cur.set_range(HIST_KEY.pack(tier, 0))
        while ok:
            k_tier, t = HIST_KEY.unpack(cur.key())
            if k_tier != tier:
                return
            yield t, json.loads(bytes(cur.value()))
            ok = cur.next()

    def series(self) -> list[tuple[int, dict[str, Any]]]:
        """Every row, oldest first, coarse tiers before the finer ones that follow them."""
        out: list[tuple[int, dict[str, Any]]] = []
        for tier in (DAILY, HOURLY, RAW):
            rows = list(self.rows(tier))
            if out and rows:  # a finer tier starts where the coarser one ends
                rows = [r for r in rows if r[0] > out[-1][0]]
            out.extend(rows)
        out.sort(key=lambda r: r[0])
        return out

    def compact(self, now: float) -> int:
        """Fold aged rows into coarser ones; returns the rows folded."""
        return (self._fold(RAW, HOURLY, now - RAW_KEEP)
                + self._fold(HOURLY, DAILY, now - HOURLY_KEEP))

    def _fold(self, src: int, dst: int, before: float) -> int:
        old = [(t, r) for t, r in self.rows(src) if t < before]
        if not old:
            return 0
        width = _BUCKET[dst]
        groups: dict[int, list[dict[str, Any]]] = {}
        for t, r in old:
            groups.setdefault(t // width * width, []).append(r)
        txn, db = self.meta.txn, self.meta.hist
        for start, rows in groups.items():
            existing = txn.get(HIST_KEY.pack(dst, start), db=db)
            if existing is not None:
                rows.append(json.loads(bytes(existing)))
            self._put(dst, start, _average(rows))
        for t, _ in old:
            txn.delete(HIST_KEY.pack(src, t), db=db)
        self.meta.pending_ops += len(old)
        return len(old)


def _average(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = sum(r.get("n", 1) for r in rows)

    def avg(get: Any) -> int:
        vals = [(get(r), r.get("n", 1)) for r in rows]
        vals = [(v, w) for v, w in vals if v is not None]
        wsum = sum(w for _, w in vals)
        return round(sum(v * w for v, w in vals) / wsum) if wsum else 0

    pool = {f: avg(lambda r, f=f: r.get("pool", {}).get(f)) for f in POOL_FIELDS}
    names = set().union(*(r.get("volumes", {}).keys() for r in rows))
    vols = {name: {f: avg(lambda r, name=name, f=f: r.get("volumes", {}).get(name, {}).get(f))
                   for f in VOLUME_FIELDS} for name in sorted(names)}
    return {"pool": pool, "volumes": vols, "n": n}
