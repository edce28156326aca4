"""Data temperature: when each 1 MiB extent of a volume was last accessed,
and how much data it holds, so data can be classed hot / warm / cold / frozen.

Per extent the `heat` table holds (last access time, mapped blocks). The
heat map observes the engine's map changes (Engine.observer, attached by
`HeatMap.attach`; the engine does not import analytics) and takes the
accesses the executor records for every front end, in batches (its access
sink, wired by `HeatMap.listen`; the daemon does both). Both collect in two
bounded dicts and are
written into the transaction of each commit (or when the dicts fill), so
memory stays bounded by MAX_PENDING however large the volumes are, and the
table is as durable as the data. Keeping the mapped-block count per extent
lets a classification say how many bytes of data are hot or cold by walking
one entry per MiB, not one per block.

Extents that hold data written before tracking existed have no record; the
report calls those bytes `untracked` rather than guessing their age.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..engine.engine import Engine
from ..engine.format import BLOCK_SIZE
from ..engine.metadata import MetaStore
from ..frontends.executor import Executor

EXTENT_SHIFT = 20  # 1 MiB extents
EXTENT_SIZE = 1 << EXTENT_SHIFT
BLOCKS_PER_EXTENT = EXTENT_SIZE // BLOCK_SIZE
_LBA_SHIFT = EXTENT_SHIFT - 12  # lba -> extent
HEAT_KEY = struct.Struct(">IQ")  # volume id, extent index
HEAT_VAL = struct.Struct("<IH")  # last access (unix seconds), mapped blocks in the extent
MAX_PENDING = 32768  # extents with unwritten updates before a forced write-out
_VID_SHIFT = 40  # pending-dict key: vid << 40 | extent

CLASSES = ("hot", "warm", "cold", "frozen")
DAY = 86400


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Age limits in days: hot < hot_days <= warm < warm_days <= cold < cold_days <= frozen.

    A limit equal to the one before it leaves its class empty (a REST query
    may set one limit alone); the configuration requires them to increase."""

    hot_days: float = 1
    warm_days: float = 7
    cold_days: float = 30

    def __post_init__(self) -> None:
        if not 0 < self.hot_days <= self.warm_days <= self.cold_days:
            from ..errors import InvalidArgument

            raise InvalidArgument(
                f"temperature thresholds must increase: hot {self.hot_days} < warm "
                f"{self.warm_days} < cold {self.cold_days} days")

    def classify(self, age_s: float) -> int:
        days = age_s / DAY
        if days < self.hot_days:
            return 0
        if days < self.warm_days:
            return 1
        if days < self.cold_days:
            return 2
        return 3

    @classmethod
    def parse(cls, text: str) -> Thresholds:
        """'1,7,30' -> Thresholds(1, 7, 30)."""
        try:
            h, w, c = (float(x) for x in text.split(","))
        except ValueError:
            from ..errors import InvalidArgument

            raise InvalidArgument(f"invalid temperature thresholds {text!r}",
                                  "give three increasing ages in days, e.g. 1,7,30") from None
        return cls(h, w, c)


@dataclass(slots=True)
class VolumeTemperature:
    volume: str
    logical_bytes: int
    classes: dict[str, dict[str, int]] = field(default_factory=dict)  # class -> extents, bytes
    untracked_bytes: int = 0
    extents_tracked: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"volume": self.volume, "logical_bytes": self.logical_bytes,
                "classes": self.classes, "untracked_bytes": self.untracked_bytes,
                "extents_tracked": self.extents_tracked}


class HeatMap:
    """Extent access times and mapped-block counts; used on the engine thread only."""

    def __init__(self, meta: MetaStore, clock: Callable[[], float] = time.time) -> None:
        self.meta = meta
        self.clock = clock
        self._last: dict[int, int] = {}  # key -> last access (unix s)
        self._delta: dict[int, int] = {}  # key -> change in mapped blocks
        # fetches the accesses not handed over yet (Executor.pass_accesses)
        self._pull: Callable[[], None] | None = None

    @classmethod
    def attach(cls, engine: Engine) -> HeatMap:
        """The engine's heat map: made and attached as its observer if it has none."""
        obs = engine.observer
        if isinstance(obs, HeatMap):
            return obs
        assert obs is None, f"the engine already has an observer: {obs!r}"
        heat = cls(engine.meta, engine.clock)
        engine.observer = heat
        return heat

    of = attach

    def listen(self, executor: Executor) -> None:
        """Take the accesses of the requests `executor` runs (every front end's)."""
        executor.set_access_sink(self)
        self._pull = executor.pass_accesses

    # ------------------------------------------------------------ observer and sink (engine thread)
    def accessed(self, touches: list[int], n: int) -> None:
        """A batch of accesses from the executor: (volume id, offset, length, unix time) each."""
        d = self._last
        for i in range(0, n, 4):
            base = touches[i] << _VID_SHIFT
            offset = touches[i + 1]
            first = offset >> EXTENT_SHIFT
            last = (offset + max(touches[i + 2], 1) - 1) >> EXTENT_SHIFT
            now = touches[i + 3]
            for e in range(first, last + 1):
                d[base | e] = now
        if len(d) > MAX_PENDING:
            self.write_out()

    def before_commit(self) -> None:
        if self._pull is not None:  # the accesses so far commit with the data
            self._pull()
        self.write_out()

    def touch(self, vid: int, offset: int, length: int) -> None:
        """One access now (the executor hands its accesses over in batches instead)."""
        self.accessed([vid, offset, length, int(self.clock())], 4)

    def mapped(self, vid: int, lba: int, delta: int) -> None:
        key = vid << _VID_SHIFT | lba >> _LBA_SHIFT
        d = self._delta
        d[key] = d.get(key, 0) + delta
        if len(d) > MAX_PENDING:
            self.write_out()

    # ------------------------------------------------------------ persistence
    def write_out(self) -> int:
        """Merge pending updates into the open transaction; returns extents written."""
        if not self._last and not self._delta:
            return 0
        txn, db = self.meta.txn, self.meta.heat
        keys = sorted(self._last.keys() | self._delta.keys())
        mask = (1 << _VID_SHIFT) - 1
        for key in keys:
            k = HEAT_KEY.pack(key >> _VID_SHIFT, key & mask)
            raw = txn.get(k, db=db)
            last, mapped = HEAT_VAL.unpack(raw) if raw is not None else (0, 0)
            last = max(last, self._last.get(key, 0))
            mapped = min(BLOCKS_PER_EXTENT, max(0, mapped + self._delta.get(key, 0)))
            txn.put(k, HEAT_VAL.pack(last, mapped), db=db)
        self._last.clear()
        self._delta.clear()
        self.meta.pending_ops += len(keys)
        return len(keys)

    def drop_volume(self, vid: int, budget: int) -> int:
        """Delete up to `budget` records of a deleted volume; returns how many."""
        self._last = {k: v for k, v in self._last.items() if k >> _VID_SHIFT != vid}
        self._delta = {k: v for k, v in self._delta.items() if k >> _VID_SHIFT != vid}
        txn, db = self.meta.txn, self.meta.heat
        cur = txn.cursor(db=db)
        keys: list[bytes] = []
        ok = cur.set_range(HEAT_KEY.pack(vid, 0))
        while ok and len(keys) < budget:
            k = bytes(cur.key())
            if HEAT_KEY.unpack(k)[0] != vid:
                break
            keys.append(k)
            ok = cur.next()
        for k in keys:
            txn.delete(k, db=db)
        self.meta.pending_ops += len(keys)
        return len(keys)

    # ------------------------------------------------------------ reading
    def extents(self, vid: int, end_extent: int | None = None) -> list[tuple[int, int, int]]:
        """(extent, last access, mapped blocks) of a volume, pending updates included."""
        if self._pull is not None:
            self._pull()
        self.write_out()
        out = []
        cur = self.meta.txn.cursor(db=self.meta.heat)
        ok = cur.set_range(HEAT_KEY.pack(vid, 0))
        while ok:
            v, e = HEAT_KEY.unpack(cur.key())
            if v != vid or (end_extent is not None and e >= end_extent):
                break
            last, mapped = HEAT_VAL.unpack(cur.value())
            out.append((e, last, mapped))
            ok = cur.next()
        return out

    def classify(self, vid: int, name: str, size: int, logical_bytes: int,
                 thresholds: Thresholds, now: float | None = None) -> VolumeTemperature:
        now = self.clock() if now is None else now
        end = -(-size // EXTENT_SIZE)
        classes = {c: {"extents": 0, "bytes": 0} for c in CLASSES}
        tracked_bytes = 0
        n = 0
        for _e, last, mapped in self.extents(vid, end):
            n += 1
            c = classes[CLASSES[thresholds.classify(now - last)]] if last else None
            if c is None:  # mapping known but never accessed since tracking began
                continue
            c["extents"] += 1
            c["bytes"] += mapped * BLOCK_SIZE
            tracked_bytes += mapped * BLOCK_SIZE
        return VolumeTemperature(name, logical_bytes, classes,
                                 max(0, logical_bytes - tracked_bytes), n)
