"""Level 4: growing an attached, mounted volume (xfs_growfs), and attaching a
snapshot as a read-only device, through the CLI and real tools."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

import pytest

from pstoraged.engine.devices import dev_dir
from pstoraged.errors import Conflict

from .daemon_util import Daemon

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="attaching block devices needs root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
    pytest.mark.skipif(not (shutil.which("nbdfuse") and shutil.which("mkfs.xfs")),
                       reason="nbdfuse / xfsprogs not installed (run scripts/setup)"),
]

MiB = 1 << 20


def getsize(dev: str) -> int:
    return int(subprocess.run(["blockdev", "--getsize64", dev], capture_output=True, text=True,
                              check=True).stdout)


def mount(d: Daemon, dev: str, tmp: str, *opts: str) -> str:
    mnt = os.path.join(tmp, f"mnt{len(getattr(d, 'mounts', []))}")
    os.makedirs(mnt)
    subprocess.run(["mount", *(["-o", ",".join(opts)] if opts else []), dev, mnt], check=True)
    d.__dict__.setdefault("mounts", []).append(mnt)
    return mnt


def umount(mnt: str) -> None:
    subprocess.run(["umount", mnt], check=True)


def fs_size(mnt: str) -> int:
    st = os.statvfs(mnt)
    return st.f_blocks * st.f_frsize


def write_files(root: str, tag: str, n: int = 8) -> dict[str, str]:
    sums = {}
    for i in range(n):
        data = os.urandom((i + 1) * 256 << 10)
        with open(os.path.join(root, f"{tag}{i}"), "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        sums[f"{tag}{i}"] = hashlib.sha256(data).hexdigest()
    return sums


def check_files(root: str, sums: dict[str, str]) -> None:
    for name, digest in sums.items():
        with open(os.path.join(root, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, name


def new_xfs(d: Daemon, name: str, size: str, tmp: str) -> tuple[str, str]:
    d.cli("volume", "create", name, "--size", size)
    dev = d.cli("attach", name).stdout.strip()
    subprocess.run(["mkfs.xfs", "-q", dev], check=True)
    return dev, mount(d, dev, tmp)


def test_online_grow_through_the_fuse_front_end(fuse_daemon, tmp_path):
    d = fuse_daemon
    dev, mnt = new_xfs(d, "g", "512M", str(tmp_path))
    assert json.loads(d.cli("volume", "show", "g", "--json").stdout)["attach_method"] == "fuse+loop"
    sums = write_files(mnt, "before")
    small = fs_size(mnt)
    p = d.cli("volume", "resize", "g", "1G")
    assert f"{dev} too" in p.stdout and "xfs_growfs" in p.stdout and not p.stderr
    # the FUSE file, the loop device and the API agree at once
    assert os.path.getsize(f"{d.run_dir}/dev/g") == 1 << 30
    assert getsize(dev) == 1 << 30
    v = json.loads(d.cli("volume", "show", "g", "--json").stdout)
    assert v["size"] == v["device_size"] == 1 << 30
    subprocess.run(["xfs_growfs", mnt], check=True, capture_output=True)
    assert fs_size(mnt) > small + 400 * MiB  # df shows it
    check_files(mnt, sums)
    sums |= write_files(mnt, "after", n=12)  # ~20 MiB, some of it past the old end
    umount(mnt)
    # shrinking an attached volume is refused, --force or not
    p = d.cli("volume", "resize", "g", "512M", "--shrink", "--force", check=False)
    assert p.returncode == Conflict.exit_code and "attached" in p.stderr
    assert getsize(dev) == 1 << 30
    r = subprocess.run(["xfs_repair", "-n", dev], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    d.cli("detach", "g")
    dev = d.cli("attach", "g").stdout.strip()
    mnt = mount(d, dev, str(tmp_path))
    check_files(mnt, sums)
    umount(mnt)
    d.cli("detach", "g")


def test_grow_under_nbdfuse_says_to_detach_and_attach(fs_daemon, tmp_path):
    """Run by hand, attach is nbdfuse + loop: nbdfuse reads the export's size once,
    so the device cannot grow online. The resize says so and what to do; doing it
    gives the new size with the data intact."""
    d = fs_daemon
    dev, mnt = new_xfs(d, "h", "512M", str(tmp_path))
    sums = write_files(mnt, "before")
    p = d.cli("volume", "resize", "h", "1G", "--json")
    v = json.loads(p.stdout)
    assert v["size"] == 1 << 30 and v["device_size"] == 512 * MiB == getsize(dev)
    assert len(v["notices"]) == 1 and "pstorage detach h" in v["notices"][0]
    assert "keeps its old size" in p.stderr and "pstorage attach h" in p.stderr
    umount(mnt)
    d.cli("detach", "h")
    dev = d.cli("attach", "h").stdout.strip()
    assert getsize(dev) == 1 << 30
    mnt = mount(d, dev, str(tmp_path))
    small = fs_size(mnt)
    subprocess.run(["xfs_growfs", mnt], check=True, capture_output=True)
    assert fs_size(mnt) > small + 400 * MiB
    check_files(mnt, sums)
    umount(mnt)
    d.cli("detach", "h")


def test_snapshot_attached_read_only_keeps_its_data_while_the_volume_changes(fs_daemon,
                                                                            tmp_path):
    d = fs_daemon
    tmp = str(tmp_path)
    dev, mnt = new_xfs(d, "db", "512M", tmp)
    old = write_files(mnt, "f")
    # frozen, the file system's metadata is all in place (a clean log): a snapshot
    # of a live one would need its log replayed, which a read-only device cannot
    subprocess.run(["fsfreeze", "-f", mnt], check=True)
    try:
        d.cli("snapshot", "create", "db", "monday")
    finally:
        subprocess.run(["fsfreeze", "-u", mnt], check=True)
    new = write_files(mnt, "f")  # same names, new contents
    sdev = d.cli("attach", "db@monday").stdout.strip()
    assert sdev != dev and os.path.realpath(os.path.join(dev_dir(), "db@monday")) == os.path.realpath(sdev)
    ro = subprocess.run(["blockdev", "--getro", sdev], capture_output=True, text=True, check=True)
    assert ro.stdout.strip() == "1"
    fd = os.open(sdev, os.O_WRONLY)  # Linux lets a read-only device open, not write
    try:
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x" * 4096, 0)
    finally:
        os.close(fd)
    snap = json.loads(d.cli("snapshot", "list", "db", "--json").stdout)[0]
    assert snap["device"] == sdev
    assert sdev in d.cli("snapshot", "list", "db").stdout
    # xfs: no log replay on a read-only device (norecovery); the UUID is the
    # mounted volume's (nouuid)
    smnt = mount(d, sdev, tmp, "ro", "norecovery", "nouuid")
    check_files(smnt, old)
    more = write_files(mnt, "g")  # the volume changes on; the snapshot does not
    subprocess.run(["sync", "-f", mnt], check=True)
    check_files(smnt, old)
    assert not os.path.exists(os.path.join(smnt, "g0"))
    check_files(mnt, new | more)
    # busy: no detach, no delete; unexport needs --force while attached
    p = d.cli("detach", "db@monday", check=False)
    assert p.returncode == Conflict.exit_code and "mounted" in p.stderr
    p = d.cli("snapshot", "delete", "db@monday", check=False)
    assert p.returncode == Conflict.exit_code and "attached" in p.stderr
    p = d.cli("unexport", "db@monday", check=False)
    assert p.returncode == Conflict.exit_code and "detach it first" in p.stderr
    umount(mnt)
    d.cli("detach", "db")
    p = d.cli("volume", "delete", "db", check=False)  # the volume is free, its snapshot is not
    assert p.returncode == Conflict.exit_code and "db@monday" in p.stderr
    check_files(smnt, old)
    umount(smnt)
    d.cli("detach", "db@monday")
    assert not os.path.lexists(os.path.join(dev_dir(), "db@monday"))
    snap = json.loads(d.cli("snapshot", "list", "db", "--json").stdout)[0]
    assert snap["device"] is None and snap["exported"] is False
