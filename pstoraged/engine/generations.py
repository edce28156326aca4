"""Snapshot generations of the maps: freeze, release, restore and clone fill.

A snapshot freezes the volume's live generation G (O(1): the live one
becomes G+1 and later writes add entries instead of replacing frozen
ones). Every map entry holds one reference and is visible to the
generations from its own up to (not including) the next newer entry of
its block; invariant: each entry is visible to at least one generation
that still exists (a snapshot's or the live one).

A restore (the live generation made to read as a frozen one) and a
clone's fill (a new volume given a snapshot's blocks) walk the whole
map: minutes on a large volume, which must not stall every volume's I/O.
Both run as background work, a slice at a time between client requests,
with their progress saved in the same transaction as each slice, so a
crash resumes them where the last commit left off. Until its copy is
done the volume refuses I/O and snapshots (Conflict): half a restore
or half a clone is never served. References only: no data is copied.

The engine owns one `Generations` (`engine.generations`): snapshots.py calls
`freeze`, `release`, `start_restore`, `view`, `copy_state` on it directly;
the background steps (`Engine.drop_step`, `restore_step`, `fill_step`) and
`Engine.start_clone` go through the engine, which offers a commit after each
slice. These methods change the open transaction only; the engine commits.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any

from ..errors import Conflict, NotFound
from .changes import ChangeTracker
from .chunks import ChunkStore
from .format import BLOCK_SIZE, NO_CHUNK, U64, l2p_key
from .maps import L2PMap
from .metadata import MetaStore
from .volumes import Volume, VolumeCatalog

log = logging.getLogger(__name__)


class Generations:
    """Frozen generations, their background release, and map copies (restore, fill).

    `map_block(vol, lba, cid)` points a block of the live generation at a
    chunk (the engine's `_map`); `heat_mapped(volume id, lba, delta)` tells
    the temperature map that blocks gained data; `mark_dirty()` tells the
    engine that the open transaction holds a change its idle commit must write.
    """

    def __init__(self, meta: MetaStore, catalog: VolumeCatalog, maps: L2PMap, chunks: ChunkStore,
                 *, map_block: Callable[[Volume, int, int], None],
                 heat_mapped: Callable[[int, int, int], None],
                 mark_dirty: Callable[[], None], tracker: ChangeTracker) -> None:
        self.meta = meta
        self.catalog = catalog
        self.maps = maps
        self.chunks = chunks
        self.map_block = map_block
        self.heat_mapped = heat_mapped
        self.mark_dirty = mark_dirty
        self.tracker = tracker  # changed-block marks (changes.py): a fill's, a release's
        # released snapshot generations whose entries are still being dropped:
        # [volume id, generation, next lba]
        self.dropping: list[list[int]] = meta.get_json("dropping", [])
        # map copies running in the background; the volume refuses I/O until
        # its copy is done:
        # restores: volume id -> [generation, size, next lba, blocks changed]
        self.restoring: dict[int, list[int]] = {
            int(k): v for k, v in meta.get_json("restoring", {}).items()}
        # clones being filled: new volume id -> [source id, generation, next lba, blocks shared]
        self.filling: dict[int, list[int]] = {
            int(k): v for k, v in meta.get_json("filling", {}).items()}
        self.finished_copies: dict[int, dict[str, Any]] = {}  # since start: id -> result

    # ------------------------------------------------------------------ generations
    def freeze(self, vol: Volume) -> int:
        """Freeze the live generation for a snapshot; returns it. O(1)."""
        self.check_ready(vol)
        g = vol.gen
        vol.frozen.append(g)
        vol.gen += 1
        self.catalog.persist(vol)
        self.mark_dirty()
        return g

    def view(self, vol: Volume, gen: int, name: str, size: int) -> Volume:
        """A read-only volume object reading `vol` as of frozen generation `gen`."""
        if gen not in vol.frozen:
            raise NotFound(f"generation {gen} of {vol.name!r} is not frozen")
        return Volume(vol.id, name, size, vol.compression, gen, vol.created_ns, True, base=vol)

    def release(self, vol: Volume, gen: int) -> None:
        """A snapshot is gone: drop (in the background) the entries only it could see."""
        self.check_not_copied_from(vol, gen)
        vol.frozen.remove(gen)
        # what was written in `gen` and survives is seen from the next generation
        self.tracker.release(vol.id, gen, min(x for x in [*vol.frozen, vol.gen] if x > gen))
        self.catalog.persist(vol)
        self.dropping.append([vol.id, gen, 0])
        self.meta.put_json("dropping", self.dropping)
        self.mark_dirty()

    def drop_step(self, budget: int) -> int:
        """Drop entries of a released generation that no remaining one sees."""
        vid, gen, first = self.dropping[0]
        vol = self.catalog.by_id.get(vid)
        if vol is None:  # the volume went: its reclaim releases everything
            self.dropping.pop(0)
            self.meta.put_json("dropping", self.dropping)
            return 1
        alive = sorted([*vol.frozen, vol.gen])
        prev = max((x for x in alive if x < gen), default=0)
        nxt = min(x for x in alive if x > gen)
        groups, resume = self.maps.block_entries(vid, first, budget)
        txn, db = self.meta.txn, self.meta.l2p
        for _lba, entries in groups:
            for i in range(1, len(entries)):
                g, cid, key = entries[i]
                # visible to the released generation and hidden from the next alive one
                if prev < g <= gen and entries[i - 1][0] <= nxt:
                    txn.delete(key, db=db)
                    if cid != NO_CHUNK:
                        self.chunks.decref(cid)
        done = sum(len(e) for _, e in groups)
        self.meta.pending_ops += done
        if resume is None:
            self.dropping.pop(0)
            log.info("volume %s: generation %d released", vol.name, gen)
        else:
            self.dropping[0][2] = resume
        self.meta.put_json("dropping", self.dropping)
        return max(done, 1)

    # ------------------------------------------------------------------ map copies
    def copy_state(self, vol: Volume) -> tuple[str, float, int]:
        """("restoring" | "filling" | "ready", fraction done, blocks so far)."""
        for state, copies in (("restoring", self.restoring), ("filling", self.filling)):
            job = copies.get(vol.id)
            if job is not None:
                blocks = max(1, vol.size // BLOCK_SIZE)
                return state, min(1.0, job[-2] / blocks), job[-1]
        return "ready", 1.0, 0

    def check_ready(self, vol: Volume) -> None:
        """Conflict while a restore or a clone's fill runs into the volume."""
        if not (self.restoring or self.filling) or vol.base is not None:
            return  # (a snapshot's view reads a frozen generation: copies never change it)
        state, done, _ = self.copy_state(vol)
        if state != "ready":
            what = "restored from a snapshot" if state == "restoring" else "filled from a snapshot"
            raise Conflict(f"volume {vol.name!r} is being {what} ({100 * done:.0f}% done)",
                           f"wait until 'pstorage volume show {vol.name}' says ready")

    def check_not_copied_from(self, vol: Volume, gen: int | None = None) -> None:
        """Refuse to release generation `gen` of a volume that it is being restored
        from, or to delete a volume (or release `gen`) that a clone is still being
        filled from."""
        job = self.restoring.get(vol.id)
        if gen is not None and job is not None and job[0] == gen:
            raise Conflict(f"volume {vol.name!r} is being restored from that snapshot",
                           f"wait until 'pstorage volume show {vol.name}' says ready")
        for dst_id, (src_id, g, _, _) in self.filling.items():
            if src_id == vol.id and gen in (None, g):
                dst = self.catalog.by_id.get(dst_id)
                raise Conflict(f"clone {dst.name if dst else dst_id!r} is still being filled "
                               f"from {vol.name!r}",
                               "wait until the clone is ready (or delete the clone)")

    def save_copies(self) -> None:
        """Persist the copies' progress into the open transaction."""
        self.meta.put_json("restoring", {str(k): v for k, v in self.restoring.items()})
        self.meta.put_json("filling", {str(k): v for k, v in self.filling.items()})

    def forget(self, vid: int) -> None:
        """The volume is being deleted: a copy into it stops."""
        for copies in (self.restoring, self.filling):
            copies.pop(vid, None)
        self.save_copies()

    def start_restore(self, vol: Volume, gen: int, size: int) -> None:
        """Make the live generation read as frozen generation `gen` (and the volume
        `size` bytes long): in the background, see restore_step."""
        if gen not in vol.frozen:
            raise NotFound(f"generation {gen} of {vol.name!r} is not frozen")
        self.check_ready(vol)
        self.restoring[vol.id] = [gen, size, 0, 0]
        self.save_copies()
        self.mark_dirty()

    def restore_step(self, budget: int, vid: int | None = None) -> int:
        """Restore up to ~budget map entries of a volume (the oldest, or `vid`);
        writes only where the two generations differ."""
        if vid is None:
            vid = min(self.restoring)
        gen, size, first, changed = self.restoring[vid]
        vol = self.catalog.by_id[vid]  # (delete_volume drops its restore)
        groups, resume = self.maps.block_entries(vid, first, budget)
        todo = []
        for lba, entries in groups:
            live = entries[0][1] if entries[0][0] <= vol.gen else NO_CHUNK
            old = next((c for g, c, _ in entries if g <= gen), NO_CHUNK)
            if live != old and not (lba * BLOCK_SIZE >= size and live == NO_CHUNK):
                todo.append((lba, old))
        for lba, cid in todo:
            if cid != NO_CHUNK:
                self.chunks.incref(cid)
            self.map_block(vol, lba, cid)
        changed += len(todo)
        if resume is None:
            del self.restoring[vid]
            vol.size = size
            self.catalog.persist(vol)
            self.finished_copies[vid] = {"kind": "restore", "blocks_changed": changed}
            log.info("volume %s: restore from generation %d done (%d blocks changed)",
                     vol.name, gen, changed)
        else:
            self.restoring[vid] = [gen, size, resume, changed]
        self.save_copies()
        return max(1, sum(len(e) for _, e in groups))

    def start_clone(self, src: Volume, gen: int, size: int, name: str) -> Volume:
        """A new volume of `size` bytes (the snapshot's: the source may have been
        resized since) that will read as `src` at frozen generation `gen`, filled
        in the background (fill_step). The caller commits at once, so that no
        crash leaves an empty clone that looks complete."""
        if gen not in src.frozen:
            raise NotFound(f"generation {gen} of {src.name!r} is not frozen")
        dst = self.catalog.add(name, size, src.compression)
        self.filling[dst.id] = [src.id, gen, 0, 0]
        self.save_copies()
        return dst

    def fill_step(self, budget: int, dst_id: int | None = None) -> int:
        """Give a clone being filled (the oldest, or `dst_id`) its next `budget`
        blocks: map entries and references."""
        if dst_id is None:
            dst_id = min(self.filling)
        src_id, gen, first, shared = self.filling[dst_id]
        by_id = self.catalog.by_id
        dst, src = by_id[dst_id], by_id[src_id]  # (both kept, see delete_volume)
        txn, db = self.meta.txn, self.meta.l2p
        # a slice first, then the writes: no cursor walks keys that are changing
        rows = list(itertools.islice(
            ((lba, cid) for lba, cid in self.maps.entries(src, first, dst.size // BLOCK_SIZE, gen)
             if cid != NO_CHUNK), budget))
        for lba, cid in rows:
            self.chunks.incref(cid)
            txn.put(l2p_key(dst.id, lba, dst.gen), U64.pack(cid), db=db)
            self.tracker.mark(dst.id, dst.gen, lba)
            self.heat_mapped(dst.id, lba, 1)
        dst.stats.mapped_blocks += len(rows)
        self.meta.pending_ops += len(rows)
        shared += len(rows)
        if len(rows) < budget:
            del self.filling[dst_id]
            self.finished_copies[dst_id] = {"kind": "fill", "blocks_shared": shared}
            log.info("clone %s filled from %s (%d blocks shared)", dst.name, src.name, shared)
        else:
            self.filling[dst_id] = [src_id, gen, rows[-1][0] + 1, shared]
        self.save_copies()
        return max(1, len(rows))
