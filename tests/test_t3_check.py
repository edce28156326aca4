"""Level 3: `pstorage pool check` through the CLI: read-only online through a
running daemon, refused offline while the daemon has the pool open, and
offline with --repair once it is stopped; exit codes say whether problems remain."""

from __future__ import annotations

import json
import os

from pstoraged.engine.format import CHUNK_KEY, CHUNK_META
from pstoraged.engine.pool import open_pool


def test_pool_check_online_offline_and_repair(daemon):
    d = daemon
    d.cli("volume", "create", "v", "--size", "8M")
    uri = d.cli("export", "v").stdout.strip()
    from .daemon_util import nbd_read, nbd_write

    data = os.urandom(256 << 10)
    nbd_write(uri, 0, data)

    online = json.loads(d.cli("pool", "check", "--online", "--json").stdout)
    assert online["mode"] == "online" and online["state"] == "done"
    assert online["counts"] == {} and online["checked"]["chunks"] == 64
    assert "no problems found" in d.cli("pool", "check", "--online").stdout
    refused = d.cli("pool", "check", "--dir", d.pool_dir, check=False)
    assert refused.returncode == 8 and "is open in another pstoraged" in refused.stderr
    assert "pstorage pool check --online" in refused.stderr
    no_repair = d.cli("pool", "check", "--online", "--repair", check=False)
    assert no_repair.returncode == 2 and "--repair needs the daemon stopped" in no_repair.stderr

    d.cli("unexport", "v")
    d.stop()
    pool = open_pool(d.pool_dir)  # break a refcount on purpose
    raw = CHUNK_META.unpack(pool.meta.txn.get(CHUNK_KEY.pack(7), db=pool.meta.chunks))
    pool.meta.txn.put(CHUNK_KEY.pack(7), CHUNK_META.pack(3, *raw[1:]), db=pool.meta.chunks)
    pool.meta.commit()
    pool.close()

    found = d.cli("pool", "check", "--dir", d.pool_dir, check=False)
    assert found.returncode == 11, found.stderr
    assert "1 chunks have a wrong reference count: chunk 7 says 3, 1 reference found" in found.stdout
    fixed = d.cli("pool", "check", "--dir", d.pool_dir, "--repair", "--json")
    assert json.loads(fixed.stdout)["fixed"] == {"refcount": 1}
    assert "no problems found" in d.cli("pool", "check", "--dir", d.pool_dir).stdout

    d.start()
    uri = d.cli("export", "v").stdout.strip()
    assert nbd_read(uri, 0, len(data)) == data
