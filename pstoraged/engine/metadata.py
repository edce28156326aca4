"""The metadata store: LMDB with one long-lived write transaction.

The engine thread is the only writer. It keeps a write transaction open and
applies every map, refcount and index change to it; `commit()` makes the
whole group durable at once (group commit). A crash loses the open
transaction and nothing else: LMDB's copy-on-write pages keep the last
committed state intact.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import lmdb

from ..errors import DeviceIOError, PoolFull

DEFAULT_MAP_SIZE = 1 << 40  # format-1 host directory: address space only, the file grows
PAGE = 4096
# Keep this share of a metadata region (at least FULL_RESERVE_MIN bytes, at
# most half the region) free: past it, writes that add mappings are refused
# with ENOSPC while the region still has room for trims, deletes and commits.
FULL_RESERVE_SHARE = 0.05
FULL_RESERVE_MIN = 1 << 20
# A transaction copies every page it changes (copy-on-write) and frees the
# old ones only when it commits: an update can take a leaf and its branch
# path, so a transaction of N updates may need 4 N new pages. Near the end of
# a region, group commits come sooner to stay within what is free.
PAGES_PER_UPDATE = 4
MIN_OP_BUDGET = 256


class MetaStore:
    """`path` is a directory (format 1: metadata on the host) or, with
    `subdir=False`, the metadata region's device (format 2), whose size is
    the whole address space LMDB may use."""

    def __init__(self, path: str, map_size: int = DEFAULT_MAP_SIZE, *, subdir: bool = True) -> None:
        if subdir:
            os.makedirs(path, mode=0o700, exist_ok=True)
        # sync and metasync stay on: a commit returns only once its pages and
        # its meta page are on stable storage.
        self.env = lmdb.open(
            path, map_size=map_size, max_dbs=16, subdir=subdir, sync=True,
            metasync=True, writemap=False, readahead=False, meminit=False,
            mode=0o600,  # the maps and fingerprints: the owner's alone, whatever the umask
        )
        self.map_size = map_size
        self.bounded = not subdir  # a region: running full is a real limit
        reserve = max(FULL_RESERVE_MIN, int(map_size * FULL_RESERVE_SHARE))
        self.full_at = map_size - min(reserve, map_size // 2)
        self.full = False  # past full_at: new data is refused (refresh())
        self.op_budget = 1 << 62  # updates the open transaction may take (refresh())
        self.l2p = self.env.open_db(b"l2p")
        self.chunks = self.env.open_db(b"chunks")
        self.fp = self.env.open_db(b"fp")
        self.segs = self.env.open_db(b"segs")
        self.vols = self.env.open_db(b"vols")
        self.meta = self.env.open_db(b"meta")
        self.heat = self.env.open_db(b"heat")  # temperature.py: per-extent access and mapping
        self.hist = self.env.open_db(b"hist")  # history.py: capacity samples
        self.snaps = self.env.open_db(b"snaps")  # snapshots.py: the snapshot catalog
        self.cbt = self.env.open_db(b"cbt")  # changes.py: changed extents per generation
        self._txn: lmdb.Transaction | None = None
        self._owner = 0  # thread that began the open transaction
        self.pending_ops = 0  # updates in the open transaction
        self.refresh()

    @property
    def txn(self) -> lmdb.Transaction:
        if self._txn is None:
            self._txn = self.env.begin(write=True)
            self._owner = threading.get_ident()
        return self._txn

    def commit(self) -> None:
        if self._txn is None:
            return
        # LMDB's writer lock is a robust mutex owned by the thread that began
        # the transaction: committing from another thread leaves it locked and
        # the next begin deadlocks. Engines hand over between threads only
        # with no transaction open (Engine.__init__ ends with a commit).
        if self._owner != threading.get_ident():
            raise RuntimeError("metadata transaction committed by a thread that did not begin it")
        txn, self._txn = self._txn, None
        self.pending_ops = 0
        try:
            txn.commit()
        except lmdb.MapFullError as e:
            raise PoolFull(f"the metadata region is full ({self.map_size >> 20} MiB): {e}",
                           "delete snapshots or volumes, or move the pool to a device "
                           "formatted with a larger --meta-size") from e
        except lmdb.Error as e:
            raise DeviceIOError(f"metadata commit failed: {e}") from e

    def usage(self) -> dict[str, int]:
        """Bytes of metadata in use (pages of every table, from LMDB's own counts)
        and the high-water mark of the region; cheap, no table walk."""
        with self.env.begin(write=False) as txn:
            pages = 2  # the two meta pages
            st = txn.stat()
            pages += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
            for db in self.tables():
                st = txn.stat(db)
                pages += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        info = self.env.info()
        return {"size": self.map_size if self.bounded else 0, "used": pages * PAGE,
                "high_water": (info["last_pgno"] + 1) * PAGE}

    def tables(self) -> list[Any]:
        return [self.l2p, self.chunks, self.fp, self.segs, self.vols, self.meta, self.heat,
                self.hist, self.snaps, self.cbt]

    def refresh(self) -> None:
        """After a commit: is the region full, and how many updates may the next
        transaction take before it must commit (see PAGES_PER_UPDATE)."""
        if not self.bounded:
            return
        used = self.usage()["used"]
        self.full = used >= self.full_at
        self.op_budget = max(MIN_OP_BUDGET, (self.map_size - used) // PAGE // PAGES_PER_UPDATE)

    def abort(self) -> None:
        if self._txn is not None:
            self._txn.abort()
            self._txn = None
            self.pending_ops = 0

    def close(self) -> None:
        self.abort()
        self.env.close()

    # small JSON values in the meta table -----------------------------------
    def get_json(self, key: str, default: Any = None) -> Any:
        raw = self.txn.get(key.encode(), db=self.meta)
        return default if raw is None else json.loads(bytes(raw))

    def put_json(self, key: str, value: Any) -> None:
        self.txn.put(key.encode(), json.dumps(value, sort_keys=True).encode(), db=self.meta)

    def delete(self, key: str) -> None:
        self.txn.delete(key.encode(), db=self.meta)
