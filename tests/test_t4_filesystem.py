"""Level 4: real filesystems on attached volumes: mkfs, mount, fsck, restarts."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from pstoraged.engine.devices import dev_dir

from .daemon_util import Daemon

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="attaching block devices needs root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
    pytest.mark.skipif(not (shutil.which("nbdfuse") and shutil.which("mkfs.ext4")),
                       reason="nbdfuse / e2fsprogs not installed (run scripts/setup)"),
]


def attach(d: Daemon, name: str) -> str:
    dev = d.cli("attach", name).stdout.strip()
    assert dev.startswith("/dev/"), dev
    # the stable name points at it
    assert os.path.realpath(os.path.join(dev_dir(), name)) == os.path.realpath(dev)
    return dev


def new_fs(d: Daemon, name: str, size: str) -> tuple[str, str]:
    """Create a volume, attach it, mkfs.ext4 it and mount it: (device, mount point)."""
    d.cli("volume", "create", name, "--size", size)
    dev = attach(d, name)
    subprocess.run(["mkfs.ext4", "-q", dev], check=True)
    return dev, mount(d, dev)


def mount(d: Daemon, dev: str) -> str:
    mnt = tempfile.mkdtemp(prefix="pstmnt")
    subprocess.run(["mount", dev, mnt], check=True)
    d.__dict__.setdefault("mounts", []).append(mnt)
    return mnt


def umount(mnt: str) -> None:
    subprocess.run(["umount", mnt], check=True)
    os.rmdir(mnt)


def write_tree(root: str, seed: int, files: int = 60) -> dict[str, str]:
    """Files of mixed kinds (text, random, zeros, duplicates); returns name -> sha256."""
    rng = random.Random(seed)
    sums = {}
    dup = rng.randbytes(256 << 10)
    for i in range(files):
        sub = os.path.join(root, f"d{i % 5}")
        os.makedirs(sub, exist_ok=True)
        kind = i % 4
        if kind == 0:
            data = (f"line {i} of a compressible text file\n" * rng.randint(10, 3000)).encode()
        elif kind == 1:
            data = rng.randbytes(rng.randint(1, 512) << 10)
        elif kind == 2:
            data = bytes(rng.randint(1, 256) << 10)
        else:
            data = dup
        path = os.path.join(sub, f"f{i}")
        with open(path, "wb") as f:
            f.write(data)
        sums[os.path.relpath(path, root)] = hashlib.sha256(data).hexdigest()
    return sums


def check_tree(root: str, sums: dict[str, str]) -> None:
    for rel, digest in sums.items():
        with open(os.path.join(root, rel), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, rel


def fsck(dev: str) -> None:
    p = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_mkfs_mount_restart_fsck(fs_daemon):
    fs_daemon.cli("volume", "create", "fs", "--size", "1G")
    dev = attach(fs_daemon, "fs")
    assert Path(f"/sys/block/{os.path.basename(dev)}/loop/dio").read_text().strip() == "1"
    subprocess.run(["mkfs.ext4", "-q", dev], check=True)
    mnt = mount(fs_daemon, dev)
    sums = write_tree(mnt, 1)
    subprocess.run(["sync"], check=True)
    umount(mnt)
    fs_daemon.cli("detach", "fs")
    stats = fs_daemon.client.get("/api/v1/metrics/reduction")["volumes"]["fs"]
    ingest = stats["ingest"]
    assert ingest["dedupe_bytes"] > 0 and ingest["zero_bytes"] > 0
    assert ingest["new_chunk_stored_bytes"] < ingest["written_bytes"]
    assert stats["stored_bytes"] <= stats["logical_bytes"]
    fs_daemon.stop()
    fs_daemon.start()
    dev = attach(fs_daemon, "fs")
    fsck(dev)
    mnt = mount(fs_daemon, dev)
    check_tree(mnt, sums)
    umount(mnt)
    fs_daemon.cli("detach", "fs")


def test_detach_refused_while_mounted(fs_daemon):
    dev, mnt = new_fs(fs_daemon, "m", "256M")
    p = fs_daemon.cli("detach", "m", check=False)
    assert p.returncode != 0 and "mounted" in p.stderr
    p = fs_daemon.cli("volume", "delete", "m", check=False)
    assert p.returncode != 0 and "--force" in p.stderr
    umount(mnt)
    fs_daemon.cli("detach", "m")
    assert not os.path.lexists(os.path.join(dev_dir(), "m"))


def test_mounted_volume_survives_daemon_restart_under_writes(fs_daemon):
    dev, mnt = new_fs(fs_daemon, "live", "1G")
    errors: list[BaseException] = []
    written: dict[str, str] = {}
    stop = threading.Event()

    def writer() -> None:
        i = 0
        try:
            while not stop.is_set():
                data = os.urandom(64 << 10) + f"{i}".encode()
                path = os.path.join(mnt, f"w{i}")
                with open(path, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                written[path] = hashlib.sha256(data).hexdigest()
                i += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(1.5)
    before = len(written)
    fs_daemon.stop()
    time.sleep(1.0)  # writes stall while the daemon is away
    fs_daemon.start()
    time.sleep(2.0)
    stop.set()
    t.join(timeout=120)
    assert not errors, errors
    assert len(written) > before + 5  # writes resumed after the restart
    for path, digest in written.items():
        with open(path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest
    umount(mnt)
    fs_daemon.cli("detach", "live")
    dev = attach(fs_daemon, "live")
    fsck(dev)
    fs_daemon.cli("detach", "live")
    assert "fsck" not in fs_daemon.log()  # nothing strange logged


def test_demo_main_job_runs_end_to_end():
    """scripts/demo.py (the main job) with --no-wait: pool, volume, ext4, data, figures, clean stop."""
    import sys

    base = tempfile.mkdtemp(prefix="pstdemo", dir="/tmp")  # short socket paths
    try:
        p = subprocess.run(
            [sys.executable, "scripts/demo.py", "--no-wait", "--pool-dir", f"{base}/pool",
             "--run-dir", f"{base}/run", "--mount", f"{base}/mnt", "--pool-size", "4G",
             "--volume-size", "1G"],
            cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
            timeout=600)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "data reduction" in p.stdout and "stopped cleanly" in p.stdout
        assert "/dev/loop" in p.stdout
        assert not os.path.ismount(f"{base}/mnt")
        assert "pstoraged stopped cleanly" in Path(f"{base}/pool/pstoraged.log").read_text()
    finally:
        subprocess.run(["umount", "-l", f"{base}/mnt"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def test_attach_through_the_daemons_fuse_front_end(tmp_path):
    """[fuse] enabled: volumes are files in the daemon's own FUSE mount, and
    attach puts a direct-I/O loop device on them (no nbdkit, no nbdfuse)."""
    from .daemon_util import new_daemon, remove

    d = new_daemon(size=2 << 30)
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    try:
        conf = tmp_path / "pstoraged.toml"
        conf.write_text(f'[fuse]\nenabled = true\nmountpoint = "{d.run_dir}/dev"\n')
        d.args = ["--config", str(conf)]
        d.start()
        d.cli("volume", "create", "ff", "--size", "256M")
        assert os.path.getsize(f"{d.run_dir}/dev/ff") == 256 << 20
        dev = attach(d, "ff")
        loop = os.path.basename(dev)
        with open(f"/sys/block/{loop}/loop/backing_file") as f:
            assert f.read().strip() == f"{d.run_dir}/dev/ff"
        with open(f"/sys/block/{loop}/loop/dio") as f:
            assert f.read().strip() == "1"
        subprocess.run(["mkfs.ext4", "-q", dev], check=True)
        subprocess.run(["mount", dev, mnt], check=True)
        try:
            data = os.urandom(3 << 20)
            with open(f"{mnt}/file", "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            subprocess.run(["fstrim", mnt], check=True)
        finally:
            subprocess.run(["umount", mnt], check=True)
        assert subprocess.run(["e2fsck", "-fn", dev], capture_output=True).returncode == 0
        info = d.client.get("/api/v1/volumes/ff")
        assert info["device"] == dev and info["uri"] is None  # no nbdkit behind it
        d.cli("detach", "ff")
        dev = attach(d, "ff")
        subprocess.run(["mount", "-o", "ro", dev, mnt], check=True)
        try:
            with open(f"{mnt}/file", "rb") as f:
                assert f.read() == data
        finally:
            subprocess.run(["umount", mnt], check=True)
        d.cli("detach", "ff")
        assert d.stop() == 0
        assert not os.path.ismount(f"{d.run_dir}/dev")  # unmounted on a clean stop
    finally:
        subprocess.run(["umount", "-l", mnt], capture_output=True)
        remove(d)


def _devices_cli(*args: str) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run([sys.executable, "-m", "pstoraged.control.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_attached_volumes_are_never_offered_as_backing_devices(daemon, tmp_path, monkeypatch):
    """A volume's own loop device (over nbdfuse, or over the daemon's FUSE file)
    is PStorage itself: `pstorage devices` says so, `pool create` refuses it even
    with --force; so are the FUSE file and a running daemon's pool file."""
    import json

    from pstoraged.engine import devices

    from .daemon_util import new_daemon, remove

    fused = new_daemon(size=2 << 30)
    plain_img = tmp_path / "plain.img"
    with open(plain_img, "wb") as f:
        f.truncate(64 << 20)
    plain = subprocess.run(["losetup", "-f", "--show", str(plain_img)], capture_output=True,
                           text=True, check=True).stdout.strip()
    try:
        conf = tmp_path / "pstoraged.toml"
        conf.write_text(f'[fuse]\nenabled = true\nmountpoint = "{fused.run_dir}/dev"\n')
        fused.args = ["--config", str(conf)]
        fused.start()
        daemon.cli("volume", "create", "nb", "--size", "64M")
        fused.cli("volume", "create", "ff", "--size", "64M")
        ours = {attach(daemon, "nb"): "nb", attach(fused, "ff"): "ff"}  # nbdfuse+loop, fuse+loop

        listed = {d["path"]: d for d in json.loads(_devices_cli("devices", "--json").stdout)}
        table = _devices_cli("devices").stdout.splitlines()
        for dev, name in ours.items():
            assert listed[dev]["pstorage_volume"] == name, listed[dev]
            assert f"PStorage volume {name}" in listed[dev]["in_use"]
            line = next(ln for ln in table if ln.startswith(dev + " "))
            assert f"in use: PStorage volume {name}" in line, line
            p = _devices_cli("pool", "create", "--dir", str(tmp_path / f"p-{name}"),
                             "--device", dev, "--force")
            assert p.returncode != 0 and f"PStorage volume {name} itself" in p.stderr, p.stderr
        assert listed[plain]["in_use"] == [] and listed[plain]["pstorage_volume"] is None
        assert not os.path.exists(tmp_path / "p-nb" / "pool.json")

        # found from the loop device's backing file, not from the stable names
        monkeypatch.setenv("PSTORAGE_DEV_DIR", str(tmp_path / "no-links"))
        for dev, name in ours.items():
            assert devices.describe(dev).pstorage_volume == name
        # the volume's file in the FUSE mount, and a running daemon's pool file
        info = devices.describe(f"{fused.run_dir}/dev/ff")
        assert info.pstorage_volume == "ff"
        with pytest.raises(devices.DeviceInUse, match="PStorage volume ff itself"):
            devices.vet(info, force=True)
        info = devices.describe(os.path.join(daemon.pool_dir, "dev.img"))
        assert info.busy == (f"the pool device of pstoraged (pid {daemon.proc.pid})",), info
        with pytest.raises(devices.DeviceInUse, match="the pool device of pstoraged"):
            devices.vet(info, force=True)
        daemon.cli("detach", "nb")
        fused.cli("detach", "ff")
    finally:
        subprocess.run(["losetup", "-d", plain], capture_output=True)
        remove(fused)
