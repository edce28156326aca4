"""Level 3: what serves a volume or snapshot, as the API and the CLI say it;
resizing an NBD export; unexporting and eradicating snapshots from the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from pstoraged.errors import Conflict, NotFound

from .daemon_util import Daemon, nbd_size, nbd_write

pytestmark = pytest.mark.skipif(
    not (shutil.which("nbdkit") and shutil.which("nbdinfo")),
    reason="nbdkit / libnbd tools not installed (run scripts/setup)",
)

MiB = 1 << 20


def show(d: Daemon, name: str) -> dict:
    return json.loads(d.cli("volume", "show", name, "--json").stdout)


def listed(d: Daemon, name: str) -> dict:
    return next(v for v in json.loads(d.cli("volume", "list", "--json").stdout)
                if v["name"] == name)


def test_grown_nbd_export_shows_the_new_size_to_new_connections(daemon):
    d = daemon
    d.cli("volume", "create", "g", "--size", "64M")
    uri = d.cli("export", "g").stdout.strip()
    assert nbd_size(uri) == 64 * MiB
    p = d.cli("volume", "resize", "g", "128M")
    assert "connected now keep the old size" in p.stderr  # said, not hidden
    assert nbd_size(uri) == 128 * MiB  # a new connection
    nbd_write(uri, 100 * MiB, b"x" * 4096)  # past the old end
    v = json.loads(d.cli("volume", "resize", "g", "256M", "--json").stdout)
    assert v["size"] == 256 * MiB and any("NBD clients" in n for n in v["notices"])
    # shrinking under an export still needs --force
    p = d.cli("volume", "resize", "g", "64M", "--shrink", check=False)
    assert p.returncode == Conflict.exit_code and "exported" in p.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse")
                    or not shutil.which("nbdfuse"), reason="attaching needs root and nbdfuse")
def test_json_says_exported_and_attached_like_the_table(daemon):
    d = daemon
    d.cli("volume", "create", "a", "--size", "64M")
    d.cli("volume", "create", "e", "--size", "64M")
    d.cli("volume", "create", "n", "--size", "64M")
    dev = d.cli("attach", "a").stdout.strip()
    d.cli("export", "e")
    try:
        table = d.cli("volume", "list").stdout.splitlines()
        row = {line.split()[0]: line.split()[-3] for line in table[1:]}  # before CREATED
        assert row == {"a": dev, "e": "exported", "n": "-"}
        for v in (show(d, "a"), listed(d, "a")):
            # attached by hand: nbdkit serves it, nbdfuse + loop make the device
            assert v["attached"] is True and v["device"] == dev
            assert v["exported"] is True and v["uri"]
            assert v["device_size"] == 64 * MiB and v["attach_method"] == "nbdfuse+loop"
        for v in (show(d, "e"), listed(d, "e")):
            assert (v["exported"], v["attached"], v["device"]) == (True, False, None)
        for v in (show(d, "n"), listed(d, "n")):
            assert (v["exported"], v["attached"], v["uri"]) == (False, False, None)
        human = d.cli("volume", "show", "a").stdout
        assert "attached" in human and dev in human
    finally:
        d.cli("detach", "a")
    v = show(d, "a")
    assert (v["exported"], v["attached"], v["device"]) == (False, False, None)


def test_unexport_a_snapshot_from_the_cli(daemon):
    d = daemon
    d.cli("volume", "create", "db", "--size", "16M")
    d.cli("snapshot", "create", "db", "monday")
    suri = d.cli("snapshot", "export", "db@monday").stdout.strip()
    assert nbd_size(suri) == 16 * MiB
    snap = json.loads(d.cli("snapshot", "list", "db", "--json").stdout)[0]
    assert snap["exported"] is True and snap["device"] is None
    d.cli("unexport", "db@monday")
    snap = json.loads(d.cli("snapshot", "list", "db", "--json").stdout)[0]
    assert snap["exported"] is False and snap["uri"] is None
    assert subprocess.run(["nbdinfo", "--size", suri], capture_output=True).returncode != 0
    p = d.cli("unexport", "db@monday", check=False)
    assert p.returncode == NotFound.exit_code and "not exported" in p.stderr
    p = d.cli("unexport", "db@", check=False)
    assert p.returncode != 0 and "VOLUME@SNAPSHOT" in p.stderr


def test_eradicate_a_destroyed_snapshot_but_never_a_locked_one(daemon):
    d = daemon
    d.cli("volume", "create", "v", "--size", "32M")
    uri = d.cli("export", "v").stdout.strip()
    nbd_write(uri, 0, os.urandom(8 * MiB))
    d.cli("snapshot", "create", "v", "old")
    d.cli("snapshot", "create", "v", "keep", "--lock-until", "30d")
    nbd_write(uri, 0, os.urandom(8 * MiB))  # "old" and "keep" alone hold the first data
    # locked: refused, saying until when; never destroyed, so never eradicated
    p = d.cli("snapshot", "eradicate", "v@keep", check=False)
    assert p.returncode == Conflict.exit_code and "locked until 20" in p.stderr, p.stderr
    # not destroyed: delete first
    p = d.cli("snapshot", "eradicate", "v@old", check=False)
    assert p.returncode == Conflict.exit_code and "delete it first" in p.stderr
    d.cli("snapshot", "delete", "v@old")
    assert "v@old" in d.cli("snapshot", "list", "--destroyed").stdout
    d.cli("snapshot", "eradicate", "v", "old")
    assert "v@old" not in d.cli("snapshot", "list", "--destroyed").stdout
    p = d.cli("snapshot", "recover", "v@old", check=False)
    assert p.returncode == NotFound.exit_code
    # the data only "keep" and "old" held stays: "keep" still needs it
    space = json.loads(d.cli("volume", "space", "v", "--json").stdout)
    assert set(space["snapshots"]) == {"keep"}
    assert space["snapshots"]["keep"]["unique_bytes"] > 0


def test_eradicating_a_snapshot_gives_its_space_back(daemon):
    d = daemon
    d.cli("volume", "create", "w", "--size", "32M", "--compression", "none")
    uri = d.cli("export", "w").stdout.strip()
    nbd_write(uri, 0, os.urandom(8 * MiB))
    d.cli("snapshot", "create", "w", "s")
    nbd_write(uri, 0, os.urandom(8 * MiB))  # the snapshot alone holds 8 MiB now

    def stored() -> int:
        return d.client.get("/api/v1/pool")["statistics"]["stored_bytes"]

    before = stored()
    assert before >= 16 * MiB
    d.cli("snapshot", "delete", "w@s")
    d.cli("snapshot", "eradicate", "w@s")
    deadline = time.monotonic() + 30  # released in the background
    while stored() > before - 8 * MiB and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stored() <= before - 8 * MiB


def test_an_export_made_after_attach_outlives_detach_across_a_restart(daemon):
    """Exporting an attached volume makes the export the user's: detach, even by
    a later daemon that read the export state back, leaves it serving."""
    d = daemon
    d.cli("volume", "create", "x", "--size", "64M")
    d.cli("attach", "x")
    uri = d.cli("export", "x").stdout.strip()
    d.stop()
    d.start()
    d.cli("detach", "x")
    v = show(d, "x")
    assert (v["exported"], v["attached"]) == (True, False)
    assert nbd_size(uri) == 64 * MiB
    d.cli("unexport", "x")
