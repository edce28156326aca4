"""Level 3: the device is the pool. A pool whose host directory is deleted and
whose device moves is imported from the device alone; export/import between
hosts; the daemon finds its pool by UUID or label on any block device."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

import pytest

from pstoraged.engine import discovery
from pstoraged.engine.pool import create_pool, open_pool, raw_metadata
from pstoraged.errors import Conflict

from .conftest import make_pool
from .daemon_util import Daemon, nbd_read, nbd_write, new_daemon, remove


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "pstoraged.control.cli", *args],
                       capture_output=True, text=True, timeout=120)
    if check and p.returncode:
        raise AssertionError(f"pstorage {' '.join(args)} -> {p.returncode}: {p.stderr}")
    return p


def test_pool_survives_losing_its_host_directory_and_moving(tmp_path):
    """Delete the host's pool directory, move the pool file: `pool import`
    finds it by UUID and every volume, snapshot, clone and checksum is there."""
    d = new_daemon(size=512 << 20)
    moved: Daemon | None = None
    try:
        d.start()
        d.cli("volume", "create", "v", "--size", "32M")
        uri = d.cli("export", "v").stdout.strip()
        old = os.urandom(1 << 20)
        nbd_write(uri, 0, old + old[: 256 << 10])  # some of it dedupes
        d.cli("snapshot", "create", "v", "s1")
        new = os.urandom(512 << 10)
        nbd_write(uri, 0, new)
        d.cli("volume", "clone", "v@s1", "c")
        d.cli("volume", "create", "empty", "--size", "4M")
        live = nbd_read(uri, 0, 2 << 20)
        d.cli("unexport", "v")
        uid = json.loads(d.cli("pool", "show", "--json").stdout)["uuid"]
        assert d.stop() == 0

        # the host loses everything it had of the pool; the device moves
        base = os.path.dirname(d.pool_dir)
        newdev = os.path.join(base, "elsewhere", "renamed.img")
        os.makedirs(os.path.dirname(newdev))
        os.rename(os.path.join(d.pool_dir, "dev.img"), newdev)
        shutil.rmtree(d.pool_dir)

        listed = json.loads(cli("pool", "import", "-d", os.path.dirname(newdev), "--json").stdout)
        assert [(p["uuid"], p["device"], p["state"]) for p in listed] == [
            (uid, newdev, "active on this host")]
        newdir = os.path.join(base, "newpool")
        out = cli("pool", "import", uid[:12], "-d", os.path.dirname(newdev), "--dir", newdir).stdout
        assert f"imported pool {uid}" in out and newdev in out
        assert sorted(os.listdir(newdir)) == ["lock", "pool.json"]  # nothing but runtime state

        moved = Daemon(newdir, os.path.join(base, "run2"))
        moved.log_path = os.path.join(base, "moved.log")
        moved.start()
        vols = {v["name"]: v for v in json.loads(moved.cli("volume", "list", "--json").stdout)}
        assert sorted(vols) == ["c", "empty", "v"]
        snaps = json.loads(moved.cli("snapshot", "list", "v", "--json").stdout)
        assert [s["name"] for s in snaps] == ["s1"]
        uri = moved.cli("export", "v").stdout.strip()
        assert nbd_read(uri, 0, 2 << 20) == live
        curi = moved.cli("export", "c").stdout.strip()
        assert hashlib.sha256(nbd_read(curi, 0, 1 << 20)).digest() == hashlib.sha256(old).digest()
        show = json.loads(moved.cli("pool", "show", "--json").stdout)
        assert show["device"] == newdev and show["metadata"]["where"] == "device"
        assert "no problems found" in moved.cli("pool", "check", "--online").stdout
        moved.cli("unexport", "v")
        moved.cli("unexport", "c")
        assert moved.stop() == 0
        # every chunk's checksum verified offline too
        assert "no problems found" in cli("pool", "check", "--dir", newdir).stdout
    finally:
        if moved is not None:
            moved.cleanup()
        remove(d)


def _other_host(directory: str) -> None:
    with raw_metadata(directory) as meta:
        st = meta.get_json("pool_state")
        meta.put_json("pool_state", {**st, "machine_id": "another-machine", "host": "nodeB"})
        meta.commit()


def test_export_import_between_hosts(tmp_path):
    a = make_pool(str(tmp_path / "a"))
    dev = os.path.join(a, "dev.img")
    # a pool last opened by another host and never exported is refused ...
    _other_host(a)
    with pytest.raises(Conflict, match="in use by host nodeB"):
        open_pool(a)
    r = cli("pool", "import", dev, "--dir", str(tmp_path / "b"), "-d", dev, check=False)
    assert r.returncode != 0  # a path is not a pool name
    uid = discovery.probe(dev).uuid.hex()
    r = cli("pool", "import", uid, "-d", dev, "--dir", str(tmp_path / "b"), check=False)
    assert r.returncode != 0 and "in use by host nodeB" in r.stderr and "--force" in r.stderr
    listed = json.loads(cli("pool", "import", "-d", dev, "--json").stdout)
    assert listed[0]["state"] == "active on nodeB"
    # ... until forced (that host is gone) ...
    cli("pool", "import", uid, "-d", dev, "--dir", str(tmp_path / "b"), "--force")
    open_pool(str(tmp_path / "b")).close()
    # ... or exported there: then any host imports it without --force
    out = cli("pool", "export", "--dir", str(tmp_path / "b")).stdout
    assert f"exported pool {uid}" in out
    assert not os.path.exists(tmp_path / "b" / "pool.json")
    assert json.loads(cli("pool", "import", "-d", dev, "--json").stdout)[0]["state"] == "exported"
    cli("pool", "import", uid, "-d", dev, "--dir", str(tmp_path / "c"))
    pool = open_pool(str(tmp_path / "c"))
    try:  # not while a daemon has it open
        r = cli("pool", "export", "--dir", str(tmp_path / "c"), check=False)
        assert r.returncode != 0 and "is open in another pstoraged" in r.stderr, r.stderr
    finally:
        pool.close()


def test_daemon_opens_its_pool_by_label_on_any_block_device(tmp_path):
    """The pool sits on a loop device whose number changes: the daemon, given
    only the label, finds it among the host's block devices."""
    img = str(tmp_path / "disk.img")
    with open(img, "wb") as f:
        f.truncate(256 << 20)
    label = "t" + uuid.uuid4().hex[:12]

    def attach() -> str:
        return subprocess.run(["losetup", "-f", "--show", img], capture_output=True, text=True,
                              check=True).stdout.strip()

    first = attach()
    loops = [first]
    base = tempfile.mkdtemp(prefix="pst", dir="/tmp")
    d = Daemon(os.path.join(base, "pool"), os.path.join(base, "run"))
    d.log_path = os.path.join(base, "daemon.log")
    try:
        create_pool(os.path.join(base, "created"), first, segment_size=1 << 20, label=label)
        subprocess.run(["losetup", "-d", first], check=True)
        loops.append(attach())  # a placeholder, so the pool's new number differs
        second = attach()
        loops.append(second)
        subprocess.run(["losetup", "-d", loops[1]], check=True)
        assert second != first
        d.args = ["--pool", label]
        d.start()
        show = json.loads(d.cli("pool", "show", "--json").stdout)
        assert show["device"] == second and show["label"] == label
        d.cli("volume", "create", "v", "--size", "4M")
        assert d.stop() == 0
        with open(os.path.join(d.pool_dir, "pool.json")) as f:
            assert json.load(f)["device"] == second
    finally:
        d.cleanup()
        for dev in loops:
            subprocess.run(["losetup", "-d", dev], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)



def test_the_scan_never_reads_a_loop_device_over_a_fuse_file(fuse_daemon):
    """A volume attached through FUSE is a loop device over a file the daemon
    serves: a scan (pool import, or a daemon looking for its moved pool) must
    not read it, or a starting daemon could wait on itself forever. Here the
    volume even holds a pool's superblock, and the scan still skips it."""
    d = fuse_daemon
    d.cli("volume", "create", "f", "--size", "64M")
    dev = d.cli("attach", "f").stdout.strip()
    real = os.path.realpath(dev)
    assert os.path.basename(real).startswith("loop")
    # a superblock on it (pool create refuses a PStorage volume as a device)
    from pstoraged.engine.format import Superblock

    sb = Superblock(uuid.uuid4().bytes, 1, 64 << 20, 1 << 20, 40, 9 << 20, "inner",
                    1 << 20, 8 << 20)
    fd = os.open(real, os.O_WRONLY)
    try:
        os.pwrite(fd, sb.to_bytes(), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert discovery.probe(real) is not None  # a pool is there ...
    assert real not in [f.path for f in discovery.scan()]  # ... but the scan skips it
    assert discovery.scan([real])[0].sb.label == "inner"  # named, it is read
    d.cli("detach", "f")


def test_daemon_init_imports_a_device_that_already_holds_a_pool(tmp_path):
    """`pstoraged --init --device DEV` on a host with no pool directory: the
    device is the pool, so it is imported (volumes kept), not refused or formatted."""
    d = new_daemon(size=256 << 20)
    fresh: Daemon | None = None
    try:
        d.start()
        d.cli("volume", "create", "keep", "--size", "4M")
        uri = d.cli("export", "keep").stdout.strip()
        data = os.urandom(64 << 10)
        nbd_write(uri, 0, data)
        d.cli("unexport", "keep")
        assert d.stop() == 0
        base = os.path.dirname(d.pool_dir)
        dev = os.path.join(base, "disk.img")
        os.rename(os.path.join(d.pool_dir, "dev.img"), dev)
        shutil.rmtree(d.pool_dir)
        fresh = Daemon(os.path.join(base, "fresh"), os.path.join(base, "run3"))
        fresh.log_path = os.path.join(base, "fresh.log")
        fresh.args = ["--init", "--device", dev, "--size", "1G"]
        fresh.start()
        uri = fresh.cli("export", "keep").stdout.strip()
        assert nbd_read(uri, 0, len(data)) == data
        assert "imported pool" in fresh.log()
        fresh.cli("unexport", "keep")
    finally:
        if fresh is not None:
            fresh.cleanup()
        remove(d)
