"""Level 3: snapshots through the daemon, the CLI and real NBD clients."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from pstoraged.errors import Conflict

from .daemon_util import NBDSH, nbd_read, nbd_write

MiB = 1 << 20


def test_snapshot_export_clone_restore_diff_through_nbd(daemon):
    d = daemon
    d.cli("volume", "create", "db", "--size", "64M")
    uri = d.cli("export", "db").stdout.strip()
    v1 = os.urandom(4 * MiB)
    nbd_write(uri, 0, v1)
    t = time.monotonic()
    snap = json.loads(d.cli("snapshot", "create", "db", "monday", "--json").stdout)
    assert time.monotonic() - t < 5 and snap["name"] == "monday"
    v2 = os.urandom(MiB)
    nbd_write(uri, MiB, v2)
    nbd_write(uri, 32 * MiB, v2)
    # the snapshot, exported read-only, still holds the old data
    suri = d.cli("snapshot", "export", "db@monday").stdout.strip()
    assert "db@monday" in suri
    assert nbd_read(suri, 0, 4 * MiB) == v1
    p = subprocess.run(NBDSH + ["-u", suri, "-c", "h.pwrite(b'x' * 4096, 0)"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "does not support write" in p.stderr
    info = json.loads(subprocess.run(["nbdinfo", "--json", suri], capture_output=True, text=True,
                                     check=True).stdout)
    assert info["exports"][0]["is_read_only"] is True
    # diff lists exactly the changed ranges
    diff = json.loads(d.cli("snapshot", "diff", "db@monday", "--json").stdout)
    assert [(r["offset"], r["length"]) for r in diff["ranges"]] == [(MiB, MiB), (32 * MiB, MiB)]
    # the snapshot alone holds the overwritten megabyte
    lst = json.loads(d.cli("snapshot", "list", "db", "--json").stdout)
    assert lst[0]["name"] == "monday" and lst[0]["space"]["unique_bytes"] == 256 * (4096 + 64)
    # a clone shares everything and is independent
    d.cli("volume", "clone", "db@monday", "db-test")
    curi = d.cli("export", "db-test").stdout.strip()
    assert nbd_read(curi, 0, 4 * MiB) == v1
    nbd_write(curi, 0, b"\xff" * 4096)
    assert nbd_read(suri, 0, 4096) == v1[:4096]
    # --no-wait: the clone fills in the background; its state says how far
    bg = json.loads(d.cli("volume", "clone", "db@monday", "db-bg", "--no-wait", "--json").stdout)
    assert bg["state"] in ("filling", "ready")
    for _ in range(200):
        shown = json.loads(d.cli("volume", "show", "db-bg", "--json").stdout)
        if shown["state"] == "ready":
            break
        time.sleep(0.05)
    assert shown["state"] == "ready" and shown["logical_bytes"] == 4 * MiB
    assert "state" in d.cli("volume", "show", "db-bg").stdout
    d.cli("volume", "delete", "db-bg")
    # snapshot listing with space; per-volume space accounting
    lst = json.loads(d.cli("snapshot", "list", "db", "--json").stdout)
    assert lst[0]["space"]["unique_bytes"] == 0  # the clone shares those chunks now
    assert "db@monday" in d.cli("snapshot", "list").stdout
    space = json.loads(d.cli("volume", "space", "db", "--json").stdout)
    assert space["volume"]["logical_bytes"] == 5 * MiB
    # restore is refused while the volume is exported, then rolls it back
    p = d.cli("snapshot", "restore", "db@monday", check=False)
    assert p.returncode == Conflict.exit_code and "--force" in p.stderr
    d.cli("unexport", "db")
    out = json.loads(d.cli("snapshot", "restore", "db", "monday", "--json").stdout)
    assert out["blocks_changed"] == 512
    uri = d.cli("export", "db").stdout.strip()
    assert nbd_read(uri, 0, 4 * MiB) == v1 and nbd_read(uri, 32 * MiB, MiB) == bytes(MiB)
    # deleting the source keeps the clone intact
    d.cli("snapshot", "delete", "db@monday")
    d.cli("volume", "delete", "db", "--force")
    d.cli("volume", "eradicate", "db")
    assert nbd_read(curi, 4096, 4 * MiB - 4096) == v1[4096:]


def test_locked_snapshot_refuses_deletion_and_destroyed_ones_recover(daemon):
    d = daemon
    d.cli("volume", "create", "v", "--size", "16M")
    uri = d.cli("export", "v").stdout.strip()
    data = os.urandom(2 * MiB)
    nbd_write(uri, 0, data)
    d.cli("snapshot", "create", "v", "keep", "--lock-until", "30d")
    d.cli("snapshot", "create", "v", "tmp")
    for args in (["snapshot", "delete", "v@keep"], ["volume", "delete", "v", "--force"]):
        p = d.cli(*args, check=False)
        assert p.returncode == Conflict.exit_code and "locked" in p.stderr, args
    st, _, body = d.client.raw("DELETE", "/api/v1/volumes/v/snapshots/keep?force=true")
    assert st == 409
    p = d.cli("snapshot", "lock", "v@keep", "--until", "1d", check=False)
    assert p.returncode != 0 and "extended" in p.stderr
    d.cli("snapshot", "lock", "v@keep", "--until", "60d")
    # destroyed, then recovered: reads back intact
    d.cli("snapshot", "delete", "v", "tmp")
    assert "v@tmp" in d.cli("snapshot", "list", "--destroyed").stdout
    assert "v@tmp" not in d.cli("snapshot", "list").stdout
    d.cli("snapshot", "recover", "v@tmp")
    suri = d.cli("snapshot", "export", "v@tmp").stdout.strip()
    assert nbd_read(suri, 0, 2 * MiB) == data
    # a restart keeps locks and destroyed state
    d.stop()
    d.start()
    p = d.cli("snapshot", "delete", "v@keep", check=False)
    assert p.returncode == Conflict.exit_code


def test_destroyed_objects_show_the_space_they_keep(daemon):
    d = daemon
    d.cli("volume", "create", "a", "--size", "16M")
    d.cli("volume", "create", "b", "--size", "16M")
    ua, ub = d.cli("export", "a").stdout.strip(), d.cli("export", "b").stdout.strip()
    nbd_write(ua, 0, os.urandom(MiB))
    nbd_write(ub, 0, os.urandom(MiB // 2))
    d.cli("snapshot", "create", "a", "s")
    nbd_write(ua, 0, os.urandom(MiB // 4))  # the snapshot alone holds the old 256 KiB
    d.cli("snapshot", "delete", "a@s")
    rec = 4096 + 64
    # volume space marks the destroyed snapshot and says when it goes
    sp = json.loads(d.cli("volume", "space", "a", "--json").stdout)
    s = sp["snapshots"]["s"]
    assert s["state"] == "destroyed" and s["unique_bytes"] == 64 * rec
    assert s["eradicate_after"] == pytest.approx(s["destroyed_at"] + 24 * 3600)
    assert sp["volume"]["state"] == "live"
    assert sp["destroyed_snapshots"] == {"count": 1, "reclaimable_bytes": 64 * rec}
    out = d.cli("volume", "space", "a").stdout
    assert [ln for ln in out.splitlines() if ln.startswith("a@s ")][0].split()[-3] == "destroyed"
    # delete says what happens: destroyed, recoverable until a time, space kept until then
    d.cli("unexport", "b")
    msg = d.cli("volume", "delete", "b").stdout
    assert "recoverable for 24 h, until" in msg and "keeps its space" in msg
    assert "volume eradicate b" in msg and "instant" not in msg
    pool = d.client.get("/api/v1/pool")["destroyed"]
    assert [(x["name"], x["reclaimable_bytes"]) for x in pool["volumes"]] == [("b", 128 * rec)]
    assert [(x["volume"], x["name"], x["reclaimable_bytes"]) for x in pool["snapshots"]] == [
        ("a", "s", 64 * rec)]
    assert pool["reclaimable_bytes"] == 192 * rec
    shown = d.cli("pool", "show").stdout
    assert "1 volumes, 1 snapshots" in shown and "FREED ON ERADICATE" in shown
    assert json.loads(d.cli("volume", "space", "b", "--json").stdout)["volume"][
        "reclaimable_bytes"] == 128 * rec
    # eradicated: the pool no longer lists it, and the space comes back
    d.cli("volume", "eradicate", "b")
    assert d.client.get("/api/v1/pool")["destroyed"]["volumes"] == []
