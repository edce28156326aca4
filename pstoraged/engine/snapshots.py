"""Snapshots, clones and SafeMode: the catalog on top of the engine's frozen
map generations.

A snapshot is a name for a frozen generation of one volume (Generations.freeze:
O(1), the map is never copied). Restores and clones work through the map
(references only, no data copied), in the background: the volume refuses I/O
until its copy is done (Generations.start_restore, Engine.start_clone).

SafeMode: a snapshot may carry a retention lock (`lock_until`); until then
nothing alters or deletes it (not even --force), and the volume it belongs
to cannot be deleted either; a lock can be extended, never shortened. Deleting a volume or snapshot first *destroys* it: it
disappears from listings and exports but stays recoverable for the grace
period (default 24 h), after which `eradicate_due` really frees it.

Records live in the `snaps` table (docs/format.md). Everything here runs on
the engine thread (DataPlane.call), except the read-only walks (`diff`,
`space`), which take their own read transaction on committed state.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import lmdb
import trio

from ..errors import Conflict, InvalidArgument, NotFound
from .changes import changed_blocks
from .engine import Engine, Volume
from .format import BLOCK_SIZE
from .units import validate_name
from .usage import walk_volume

log = logging.getLogger(__name__)

SNAP_KEY = struct.Struct(">I")  # volume id, then the snapshot name (UTF-8)
DEFAULT_GRACE_S = 24 * 3600
MAX_DIFF_RANGES = 100_000


@dataclass
class Snapshot:
    name: str
    volume: str
    vol_id: int
    gen: int
    size: int
    created_ns: int
    lock_until: float = 0.0  # unix seconds; 0 = not locked
    destroyed_ns: int = 0

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        d = asdict(self)
        d["created"] = self.created_ns / 1e9
        d["locked"] = bool(self.lock_until and (now or time.time()) < self.lock_until)
        d["destroyed"] = bool(self.destroyed_ns)
        return d


MAX_DURATION_S = 100_000 * 7 * 86400  # the REST schema allows 5 digits of weeks; beyond, dates overflow


def iso_utc(ts: float) -> str:
    """Unix seconds as ISO 8601 UTC, for messages: 2027-01-31T12:00:00Z."""
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    except (OverflowError, ValueError, OSError):  # past year 9999 (a date-time west of UTC)
        return f"{ts:.0f} (unix time)"


def parse_until(text: str, now: float) -> float:
    """'2027-01-31', '2027-01-31T12:00:00Z', '7d', '12h', '90m' -> unix seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if m:
        mult = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}[m.group(2)]
        if float(m.group(1)) * mult >= MAX_DURATION_S:
            raise InvalidArgument(f"duration {text!r} is too long", "give less than 100000 weeks")
        return now + float(m.group(1)) * mult
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return dt.timestamp()
    except (ValueError, OverflowError):  # OverflowError: 0001-01-01 east of UTC
        raise InvalidArgument(f"invalid time {text!r}",
                              "give a date (2027-01-31), a time (2027-01-31T12:00Z) or a "
                              "duration (7d, 12h)") from None


class Catalog:
    def __init__(self, engine: Engine, grace_s: float = DEFAULT_GRACE_S) -> None:
        self.engine = engine
        self.meta = engine.meta
        self.grace_s = grace_s

    # ------------------------------------------------------------ records
    def _key(self, vol_id: int, name: str) -> bytes:
        return SNAP_KEY.pack(vol_id) + name.encode()

    def _put(self, s: Snapshot) -> None:
        self.meta.txn.put(self._key(s.vol_id, s.name), json.dumps(asdict(s)).encode(),
                          db=self.meta.snaps)
        self.engine.dirty = True

    def _all(self, vol_id: int | None = None) -> list[Snapshot]:
        cur = self.meta.txn.cursor(db=self.meta.snaps)
        ok = cur.set_range(SNAP_KEY.pack(vol_id) if vol_id is not None else b"")
        out = []
        while ok:
            k = bytes(cur.key())
            if vol_id is not None and SNAP_KEY.unpack(k[:4])[0] != vol_id:
                break
            out.append(Snapshot(**json.loads(bytes(cur.value()))))
            ok = cur.next()
        return out

    def volume(self, name: str, destroyed: bool = False) -> Volume:
        """The volume named `name` (a destroyed one too if `destroyed`); NotFound if none."""
        validate_name(name)
        vol = self.engine.volumes.get(name)
        if vol is None or (vol.destroyed_ns and not destroyed):
            raise NotFound(f"no volume named {name!r}", "see 'pstorage volume list'")
        return vol

    def get(self, vol_name: str, snap: str, destroyed: bool = False) -> Snapshot:
        vol = self.volume(vol_name, destroyed)
        validate_name(snap, "snapshot")
        raw = self.meta.txn.get(self._key(vol.id, snap), db=self.meta.snaps)
        if raw is None:
            raise NotFound(f"volume {vol_name!r} has no snapshot {snap!r}",
                           f"see 'pstorage snapshot list {vol_name}'")
        s = Snapshot(**json.loads(bytes(raw)))
        if s.destroyed_ns and not destroyed:
            raise NotFound(f"snapshot {vol_name}@{snap} is destroyed",
                           f"recover it: pstorage snapshot recover {vol_name} {snap}")
        return s

    def _locked(self, s: Snapshot) -> bool:
        return bool(s.lock_until) and self.engine.clock() < s.lock_until

    # ------------------------------------------------------------ snapshots
    def create(self, vol_name: str, snap: str | None = None,
               lock_until: float | None = None) -> Snapshot:
        vol = self.volume(vol_name)
        name = snap or f"snap-{vol.gen}"
        validate_name(name, "snapshot")
        if self.meta.txn.get(self._key(vol.id, name), db=self.meta.snaps) is not None:
            raise Conflict(f"volume {vol_name!r} already has a snapshot {name!r}",
                           "choose another name (destroyed snapshots keep theirs until eradicated)")
        now = self.engine.clock()
        if lock_until is not None and lock_until <= now:  # 409: well-formed, but past by our clock
            raise Conflict(f"the retention lock must end in the future (it is now {iso_utc(now)})",
                           "give a later time or a duration (7d)")
        gen = self.engine.generations.freeze(vol)
        s = Snapshot(name, vol.name, vol.id, gen, vol.size, int(now * 1e9),
                     float(lock_until or 0.0))
        self._put(s)
        self.engine.flush()
        log.info("snapshot %s@%s created (generation %d)%s", vol.name, name, gen,
                 f", locked until {iso_utc(lock_until)}" if lock_until else "")
        return s

    def list(self, vol_name: str | None = None, destroyed: bool = False) -> list[Snapshot]:
        if vol_name is not None:
            snaps = self._all(self.volume(vol_name, destroyed).id)
        else:
            snaps = self._all()
        return [s for s in snaps if destroyed or not s.destroyed_ns]

    def lock(self, vol_name: str, snap: str, until: float) -> Snapshot:
        s = self.get(vol_name, snap)
        if until <= max(s.lock_until, self.engine.clock()):  # 409: refused by the lock already set
            held = f"locked until {iso_utc(s.lock_until)}" if self._locked(s) else "not locked"
            limit = iso_utc(max(s.lock_until, self.engine.clock()))
            raise Conflict(f"a retention lock can only be extended: {vol_name}@{snap} is {held}, "
                           f"and {iso_utc(until)} is not after {limit}", "give a later time")
        s.lock_until = until
        self._put(s)
        self.engine.flush()
        return s

    def delete(self, vol_name: str, snap: str) -> Snapshot:
        s = self.get(vol_name, snap)
        self.engine.generations.check_not_copied_from(self.volume(vol_name), s.gen)
        if self._locked(s):
            raise Conflict(f"snapshot {vol_name}@{snap} is locked until "
                           f"{iso_utc(s.lock_until)}",
                           "a retention lock cannot be removed or overridden, not even with --force")
        s.destroyed_ns = int(self.engine.clock() * 1e9)
        self._put(s)
        if self.grace_s <= 0:
            self._eradicate_snapshot(s)
        self.engine.flush()
        return s

    def recover(self, vol_name: str, snap: str) -> Snapshot:
        s = self.get(vol_name, snap, destroyed=True)
        if not s.destroyed_ns:
            raise Conflict(f"snapshot {vol_name}@{snap} is not destroyed")
        s.destroyed_ns = 0
        self._put(s)
        self.engine.flush()
        return s

    def eradicate(self, vol_name: str, snap: str) -> None:
        """Free a destroyed snapshot now (an operator's choice, not after the grace
        period). A locked snapshot cannot have been destroyed; it is refused first,
        saying until when, so that the answer is the lock and not "delete it first"."""
        s = self.get(vol_name, snap, destroyed=True)
        if self._locked(s):
            raise Conflict(f"snapshot {vol_name}@{snap} is locked until "
                           f"{datetime.fromtimestamp(s.lock_until, UTC).isoformat()}",
                           "a retention lock cannot be removed or overridden, not even with --force")
        if not s.destroyed_ns:
            raise Conflict(f"snapshot {vol_name}@{snap} is not destroyed",
                           f"delete it first: pstorage snapshot delete {vol_name}@{snap}")
        self._eradicate_snapshot(s)
        self.engine.flush()

    def _eradicate_snapshot(self, s: Snapshot) -> None:
        vol = self.engine.by_id.get(s.vol_id)
        if vol is not None:  # checked before anything changes
            self.engine.generations.check_not_copied_from(vol, s.gen)
        self.meta.txn.delete(self._key(s.vol_id, s.name), db=self.meta.snaps)
        if vol is not None and s.gen in vol.frozen:
            self.engine.generations.release(vol, s.gen)
        log.info("snapshot %s@%s eradicated", s.volume, s.name)

    # ------------------------------------------------------------ volumes
    def check_destroyable(self, name: str) -> Volume:
        """Conflict if the volume may not be deleted (a locked snapshot, or a clone
        still being filled from it); callers check before undoing anything."""
        vol = self.volume(name)
        self.engine.generations.check_not_copied_from(vol)
        locked = [s for s in self._all(vol.id) if self._locked(s)]
        if locked:
            s = locked[0]
            raise Conflict(f"volume {name!r} has snapshot {s.name!r} locked until "
                           f"{iso_utc(s.lock_until)}",
                           "a volume with locked snapshots cannot be deleted")
        return vol

    def destroy_volume(self, name: str) -> Volume:
        vol = self.check_destroyable(name)
        vol.destroyed_ns = int(self.engine.clock() * 1e9)
        self.engine.catalog.persist(vol)
        if self.grace_s <= 0:
            self._eradicate_volume(vol)
        self.engine.flush()
        return vol

    def recover_volume(self, name: str) -> Volume:
        vol = self.volume(name, destroyed=True)
        if not vol.destroyed_ns:
            raise Conflict(f"volume {name!r} is not destroyed")
        vol.destroyed_ns = 0
        self.engine.catalog.persist(vol)
        self.engine.flush()
        return vol

    def eradicate_volume(self, name: str) -> None:
        """Free a destroyed volume now (an operator's choice, not after the grace period)."""
        vol = self.volume(name, destroyed=True)
        if not vol.destroyed_ns:
            raise Conflict(f"volume {name!r} is not destroyed", "delete it first")
        self._eradicate_volume(vol)
        self.engine.flush()

    def _eradicate_volume(self, vol: Volume) -> None:
        self.engine.generations.check_not_copied_from(vol)  # before anything changes
        for s in self._all(vol.id):
            self.meta.txn.delete(self._key(vol.id, s.name), db=self.meta.snaps)
        self.engine.delete_volume(vol.name)
        log.info("volume %s eradicated", vol.name)

    def eradicate_due(self) -> int:
        """Eradicate what has been destroyed for longer than the grace period."""
        limit_ns = (self.engine.clock() - self.grace_s) * 1e9
        n = 0
        for vol in list(self.engine.volumes.values()):
            if vol.destroyed_ns and vol.destroyed_ns <= limit_ns:
                self._eradicate_volume(vol)
                n += 1
        for s in self._all():
            if s.destroyed_ns and s.destroyed_ns <= limit_ns:
                self._eradicate_snapshot(s)
                n += 1
        if n:
            self.engine.flush()
        return n

    # ------------------------------------------------------------ restore, clone, views
    def restore(self, vol_name: str, snap: str, wait: bool = True) -> dict[str, Any]:
        """Roll the volume back to the snapshot. The map walk runs in the background
        (the volume refuses I/O meanwhile); wait=True runs it to the end here."""
        vol = self.volume(vol_name)
        s = self.get(vol_name, snap)
        self.engine.generations.start_restore(vol, s.gen, s.size)
        self.engine.flush()
        log.info("volume %s: restore from snapshot %s started", vol_name, snap)
        if wait:
            self.engine.finish_copy(vol)
        return self.restore_result(vol_name, snap)

    def restore_result(self, vol_name: str, snap: str) -> dict[str, Any]:
        """Where the volume's restore is: its state, progress and blocks changed so far."""
        vol = self.volume(vol_name)
        state, done, blocks = self.engine.generations.copy_state(vol)
        if state == "ready":
            blocks = self.engine.finished_copies.get(vol.id, {}).get("blocks_changed", 0)
        return {"volume": vol_name, "snapshot": snap, "state": state,
                "progress": round(done, 4), "blocks_changed": blocks}

    def clone(self, vol_name: str, snap: str, new_name: str, wait: bool = True) -> Volume:
        """A new volume sharing every block of the snapshot, filled in the background
        (it refuses I/O until then); wait=True runs the fill to the end here."""
        s = self.get(vol_name, snap)
        src = self.volume(vol_name)
        dst = self.engine.start_clone(src, s.gen, s.size, new_name)
        log.info("volume %s: clone from %s@%s started", new_name, vol_name, snap)
        if wait:
            self.engine.finish_copy(dst)
        return dst

    def view(self, export_name: str) -> Volume:
        """'VOL@SNAP' -> a read-only volume object for the data plane."""
        vol_name, _, snap = export_name.partition("@")
        s = self.get(vol_name, snap)
        return self.engine.generations.view(self.volume(vol_name), s.gen, export_name, s.size)

    def generations(self, vol_name: str, a: str | None, b: str | None) -> tuple[Volume, int, int]:
        """Resolve two snapshot names (None = the live volume) to generations."""
        vol = self.volume(vol_name)
        ga = self.get(vol_name, a).gen if a else vol.gen
        gb = self.get(vol_name, b).gen if b else vol.gen
        return vol, ga, gb


class Eradicator:
    """Background service: eradicates what outlived its grace period."""

    INTERVAL = 60.0

    def __init__(self, catalog: Catalog, call: Any) -> None:
        self.catalog = catalog
        self.call = call  # DataPlane.call: run on the engine thread
        self._stop = trio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            sup = self.catalog.engine.supervisor
            try:
                await self.call(self.catalog.eradicate_due)
            except Exception as e:  # a failed pool must not stop the daemon
                sup.failed("eradicator", e, retry_in=self.INTERVAL)
            else:
                sup.succeeded("eradicator")
            with trio.move_on_after(self.INTERVAL):
                await self._stop.wait()

    def stop(self) -> None:
        self._stop.set()


# ---------------------------------------------------------------- read-only walks
def diff(txn: lmdb.Transaction, meta: Any, vid: int, ga: int, gb: int, *, tracked: bool,
         limit: int = MAX_DIFF_RANGES) -> dict[str, Any]:
    """Block ranges whose content differs between generations ga and gb.

    Compares map entries only (chunk ids: equal ids are equal data, and a
    rewrite with the same data dedupes to the same chunk), never reads data.
    Visits only the extents changed in between (changes.py); `tracked`:
    Engine.tracker.tracked(vid, min(ga, gb)), else the whole map is walked.
    """
    ranges: list[list[int]] = []
    changed = 0
    truncated = False
    lo, hi = min(ga, gb), max(ga, gb)
    blocks = changed_blocks(txn, meta.l2p, meta.cbt, vid, lo, hi, tracked=tracked) if lo < hi else ()
    for lba, _cid in blocks:
        changed += 1
        if ranges and ranges[-1][0] + ranges[-1][1] == lba:
            ranges[-1][1] += 1
        elif len(ranges) < limit:
            ranges.append([lba, 1])
        else:
            truncated = True
    return {"block_size": BLOCK_SIZE, "changed_blocks": changed, "changed_bytes": changed * BLOCK_SIZE,
            "ranges": [{"offset": a * BLOCK_SIZE, "length": n * BLOCK_SIZE} for a, n in ranges],
            "truncated": truncated}


def space(txn: lmdb.Transaction, meta: Any, vid: int, gens: list[int]) -> dict[int, dict[str, int]]:
    """Per generation (snapshots' and the live one, the newest): logical bytes it
    sees, physical bytes only it holds (freed if it went), and shared physical
    bytes. (usage.walk_volume, which also finds the volume's figures.)"""
    return walk_volume(txn, meta, vid, max(gens), gens).gens
