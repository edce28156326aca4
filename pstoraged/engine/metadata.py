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

from ..errors import DeviceIOError

DEFAULT_MAP_SIZE = 1 << 40  # address space only; the file grows as needed


class MetaStore:
    def __init__(self, path: str, map_size: int = DEFAULT_MAP_SIZE) -> None:
        os.makedirs(path, mode=0o700, exist_ok=True)
        # sync and metasync stay on: a commit returns only once its pages and
        # its meta page are on stable storage.
        self.env = lmdb.open(
            path, map_size=map_size, max_dbs=16, subdir=True, sync=True,
            metasync=True, writemap=False, readahead=False, meminit=False,
            mode=0o600,  # the maps and fingerprints: the owner's alone, whatever the umask
        )
        self.l2p = self.env.open_db(b"l2p")
        self.chunks = self.env.open_db(b"chunks")
        self.fp = self.env.open_db(b"fp")
        self.segs = self.env.open_db(b"segs")
        self.vols = self.env.open_db(b"vols")
        self.meta = self.env.open_db(b"meta")
        self.heat = self.env.open_db(b"heat")  # temperature.py: per-extent access and mapping
        self.hist = self.env.open_db(b"hist")  # history.py: capacity samples
        self.snaps = self.env.open_db(b"snaps")  # snapshots.py: the snapshot catalog
        self._txn: lmdb.Transaction | None = None
        self._owner = 0  # thread that began the open transaction
        self.pending_ops = 0  # updates in the open transaction

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
        except lmdb.Error as e:
            raise DeviceIOError(f"metadata commit failed: {e}") from e

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
