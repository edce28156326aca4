"""The volume catalog: volume records, their counters, names and ids.

A volume is a name, a size, a codec, its live map generation and the
generations its snapshots froze (generations.py). The catalog loads them
from the `vols` table, hands them out by name or id, persists changes into
the open transaction, and forgets deleted ones (their map entries are given
back in the background: maps.Reclaimer). The engine owns one catalog
(`Engine.catalog`; `Engine.volumes` and `Engine.by_id` are its dicts);
snapshots.py and the front ends read volumes through the engine.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import Conflict, NotFound
from . import codecs
from .metadata import MetaStore
from .units import validate_name, validate_volume_size

# A volume's first generation: no older (frozen) map entries can exist below it,
# so map lookups are exact gets. Snapshots move a volume past it.
FIRST_GEN = 1


@dataclass(slots=True)
class VolumeStats:
    """Per-volume counters. `*_bytes` ingest counters are cumulative."""

    written_bytes: int = 0  # bytes of blocks written (after read-modify-write)
    zero_bytes: int = 0  # of those, all-zero blocks: stored as nothing
    dedupe_bytes: int = 0  # of those, blocks already in the pool
    unique_bytes: int = 0  # of those, new unique blocks
    stored_bytes: int = 0  # what the new unique blocks took in segments
    mapped_blocks: int = 0  # current: blocks that hold data (not zero, not hole)
    reads: int = 0
    writes: int = 0
    read_bytes: int = 0


@dataclass(slots=True)
class Volume:
    id: int
    name: str
    size: int
    compression: str = "lz4"
    gen: int = 1  # the live map generation (snapshots freeze older ones); 1 = FIRST_GEN
    created_ns: int = 0
    readonly: bool = False
    frozen: list[int] = field(default_factory=list)  # generations snapshots hold, ascending
    destroyed_ns: int = 0  # deleted, recoverable until eradicated (SafeMode grace period)
    stats: VolumeStats = field(default_factory=VolumeStats)
    base: Volume | None = None  # a read-only view of a snapshot: the volume it belongs to

    def record(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("stats")
        d.pop("base")
        return d


class VolumeCatalog:
    """The pool's volumes by name and by id (the dicts are shared, never replaced)."""

    def __init__(self, meta: MetaStore, next_volume: int) -> None:
        self.meta = meta
        self.next_volume = next_volume
        self.volumes: dict[str, Volume] = {}
        self.by_id: dict[int, Volume] = {}
        for _name, v in meta.txn.cursor(db=meta.vols):
            vol = Volume(**json.loads(bytes(v)))
            vol.stats = VolumeStats(**meta.get_json(f"vstats:{vol.id}", {}))
            self.volumes[vol.name] = vol
            self.by_id[vol.id] = vol

    def persist(self, vol: Volume) -> None:
        """Write the volume's record into the open transaction."""
        self.meta.txn.put(vol.name.encode(), json.dumps(vol.record()).encode(), db=self.meta.vols)

    def get(self, name: str) -> Volume:
        """The volume named `name`; NotFound if there is none or it is destroyed."""
        vol = self.volumes.get(name)
        if vol is None:
            raise NotFound(f"no volume named {name!r}", "see 'pstorage volume list'")
        if vol.destroyed_ns:
            raise NotFound(f"volume {name!r} is destroyed",
                           f"recover it: pstorage volume recover {name}")
        return vol

    def add(self, name: str, size: int, compression: str) -> Volume:
        """A new, empty volume (validated, registered and persisted)."""
        validate_name(name)
        validate_volume_size(size)
        codecs.codec_id(compression)
        if name in self.volumes:
            raise Conflict(f"volume {name!r} already exists", "choose another name")
        vol = Volume(self.next_volume, name, size, compression, created_ns=time.time_ns())
        self.next_volume += 1
        self.volumes[name] = vol
        self.by_id[vol.id] = vol
        self.persist(vol)
        return vol

    def remove(self, vol: Volume) -> None:
        """Forget a volume (its record and counters); its map entries stay for the reclaim."""
        self.meta.txn.delete(vol.name.encode(), db=self.meta.vols)
        self.meta.delete(f"vstats:{vol.id}")
        del self.volumes[vol.name]
        del self.by_id[vol.id]
