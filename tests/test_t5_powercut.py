"""Level 5: power cuts under a mounted ext4, end to end.

The pool's device is a file served by `nbdkit --filter=cache cache=writeback`:
nbdkit keeps every write in its cache and hands it to the file only when the
client flushes (an NBD flush, what an fdatasync of the device becomes). It is
made a file by nbdfuse and a block device by a direct-I/O loop device, the
pool lives on it. So SIGKILL of that nbdkit loses exactly what a disk with a
volatile write cache loses when the power goes: everything not flushed.

A volume of the pool is attached (nbdkit + plugin + nbdfuse + loop, as
`pstorage attach` does) and carries ext4. A writer writes files whose content
comes from a seed, fsyncs each and its directory, and records a file only
after its fsync returned. Then the power goes: the device's nbdkit, the
volume's nbdkit and pstoraged get SIGKILL together (the volume's nbdkit too,
so the old mount cannot reach the next daemon: nothing outlives a power cut).
Mounts, loop devices and nbdfuse are cleared, nbdkit restarts on the same
file, the device is attached again (maybe as another /dev/loopN: the pool was
created on a symlink that is pointed at it), the daemon restarts, and the
volume is attached again: after the journal replay `e2fsck -fn` must be clean
and every file recorded in any round must read back exactly. Rounds:
PSTORAGE_POWERCUT_ROUNDS (default 5).

That this can fail: `test_power_cut_catches_a_daemon_that_never_flushes` runs
the same rounds with a daemon whose device flushes were removed (injected by a
sitecustomize.py on its PYTHONPATH: no fdatasync of the data, LMDB opened
without sync; no hook in the daemon) and requires the check to fail. It does
at the first cut: the metadata (in the pool directory on the host today) maps
chunks that were still in nbdkit's cache, reads of them fail their checksum
("chunk record: bad magic"), and mount or e2fsck fail. Once the metadata moves
onto the device, the same injection loses it too, and the volume or the
recorded files are missing: that fails the check as well.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pstoraged.engine.pool import create_pool

from .daemon_util import Daemon
from .test_t4_filesystem import attach, fsck, umount
from .test_t4_filesystem import pytestmark as _fs_marks
from .test_t5_crash import FsyncWriter

pytestmark = [
    *_fs_marks,
    pytest.mark.skipif(not (shutil.which("nbdkit") and shutil.which("losetup")),
                       reason="needs nbdkit and losetup (run scripts/setup)"),
]

MiB = 1 << 20
ROUNDS = int(os.environ.get("PSTORAGE_POWERCUT_ROUNDS", "5"))
VOLUME = "pc"


def _wait_for(cond, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class CachedDevice:
    """IMG behind nbdkit's write-back cache, via nbdfuse and a direct-I/O loop
    device; `link` always names the current loop device."""

    base: Path
    img: Path = field(init=False)
    link: Path = field(init=False)  # what the pool is created on
    nbdkit_pid: int = 0
    fuse: subprocess.Popen | None = None
    loop: str = ""

    def __post_init__(self) -> None:
        self.img, self.link = self.base / "img", self.base / "pooldev"
        (self.base / "fuse").mkdir()
        (self.base / "cache").mkdir()

    def start(self) -> None:
        sock, pidfile = self.base / "nbd.sock", self.base / "nbdkit.pid"
        pidfile.unlink(missing_ok=True)
        sock.unlink(missing_ok=True)  # left by a killed nbdkit
        subprocess.run(["nbdkit", "-U", str(sock), "-P", str(pidfile), "--filter=cache",
                        "file", str(self.img), "cache=writeback"], check=True, timeout=30,
                       env=dict(os.environ, TMPDIR=str(self.base / "cache")))  # its cache file
        _wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), "nbdkit")
        self.nbdkit_pid = int(pidfile.read_text())
        dev = self.base / "fuse" / "dev"
        self.fuse = subprocess.Popen(["nbdfuse", str(dev), "--unix", str(sock)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(dev.exists, "nbdfuse")
        self.loop = subprocess.run(["losetup", "--direct-io=on", "-f", "--show", str(dev)],
                                   capture_output=True, text=True, check=True).stdout.strip()
        tmp = self.base / "pooldev.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(self.loop)
        tmp.replace(self.link)

    def power_off(self) -> None:
        """The disk and its cache lose power: what nbdkit did not flush is gone."""
        if self.nbdkit_pid and _alive(self.nbdkit_pid):
            os.kill(self.nbdkit_pid, signal.SIGKILL)

    def stop(self) -> None:
        """Clear the loop device, nbdfuse and nbdkit, whatever state they are in."""
        if self.loop:
            subprocess.run(["losetup", "-d", self.loop], capture_output=True)
            self.loop = ""
        subprocess.run(["fusermount3", "-uz", str(self.base / "fuse")], capture_output=True)
        if self.fuse is not None:
            if self.fuse.poll() is None:
                self.fuse.kill()
            self.fuse.wait(timeout=30)
            self.fuse = None
        if self.nbdkit_pid and _alive(self.nbdkit_pid):
            os.kill(self.nbdkit_pid, signal.SIGTERM)
            _wait_for(lambda: not _alive(self.nbdkit_pid), "nbdkit to exit")
        self.nbdkit_pid = 0


@dataclass
class Rig:
    device: CachedDevice
    daemon: Daemon
    mounts: list[str] = field(default_factory=list)


@pytest.fixture
def rig() -> Iterator[Rig]:
    base = Path(tempfile.mkdtemp(prefix="pstpc", dir="/tmp"))  # short: socket paths
    dev = CachedDevice(base)
    with open(dev.img, "wb") as f:
        f.truncate(768 * MiB)
    (base / "pool").mkdir()
    d = Daemon(str(base / "pool"), str(base / "run"))
    r = Rig(dev, d)
    try:
        dev.start()
        create_pool(str(base / "pool"), str(dev.link), segment_size=MiB)
        # the pool's metadata and superblock are on stable storage before the first cut
        yield r
    finally:
        for mnt in r.mounts:
            subprocess.run(["umount", "-l", mnt], capture_output=True)
            with contextlib.suppress(OSError):
                os.rmdir(mnt)
        if d.proc is not None and _alive(dev.nbdkit_pid):
            d.cleanup()  # detach and stop while the device answers
        elif d.proc is not None:
            d.kill9()
        d.cleanup()  # what is left of exports: nbdfuse, nbdkit
        _detach_loops(base)
        dev.stop()
        _detach_loops(base)
        shutil.rmtree(base, ignore_errors=True)


def _detach_loops(base: Path) -> None:
    """Detach every loop device whose backing file is under `base` (ours, and
    only ours: other tests and engineers use loop devices too)."""
    for bf in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if bf.read_text().strip().startswith(f"{base}/"):
                subprocess.run(["losetup", "-d", f"/dev/{bf.parent.parent.name}"],
                               capture_output=True)


def power_cut(r: Rig) -> None:
    """Every process of the storage stack dies at once."""
    d = r.daemon
    export_pid = int(Path(d.run_dir, "exports", VOLUME, "nbdkit.pid").read_text())
    r.device.power_off()
    os.kill(export_pid, signal.SIGKILL)
    assert d.proc is not None
    d.proc.kill()
    d.proc.wait()
    d.proc = None


def reboot(r: Rig, mnt: str) -> None:
    """Clear the dead stack, start it again: device, then daemon."""
    subprocess.run(["umount", "-l", mnt], capture_output=True)
    os.rmdir(mnt)  # (detached from the tree at once, even if still busy)
    r.mounts.remove(mnt)
    r.device.stop()
    r.device.start()
    r.daemon.start()  # finds the volume's export dead: clears its loop device and nbdfuse


def mount(r: Rig, dev: str) -> str:
    mnt = tempfile.mkdtemp(prefix="pstmnt")
    r.mounts.append(mnt)  # the fixture unmounts and removes it, whatever happens
    subprocess.run(["mount", dev, mnt], check=True)
    return mnt


def mount_checked(r: Rig, durable: dict[str, str]) -> str:
    """Attach the volume, replay the journal, e2fsck -fn, mount; every recorded
    file must read back as written. Returns the mount point."""
    d = r.daemon
    dev = attach(d, VOLUME)
    mnt = mount(r, dev)  # replays the journal
    umount(mnt)
    r.mounts.remove(mnt)
    fsck(dev)
    mnt = mount(r, dev)
    for rel, digest in durable.items():
        with open(os.path.join(mnt, rel), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, (
                f"{rel} was fsynced before a power cut but differs after it "
                f"({len(durable)} files checked)")
    return mnt


def write_until_cut(r: Rig, mnt: str, round_: int, rng: random.Random) -> dict[str, str]:
    """Write and fsync files in a directory of this round's until the power goes;
    returns those whose fsync returned before."""
    sub = os.path.join(mnt, f"r{round_}")
    os.mkdir(sub)
    fd = os.open(mnt, os.O_RDONLY)
    os.fsync(fd)  # the new directory's entry
    os.close(fd)
    w = FsyncWriter(sub, seed=rng.randrange(1 << 30))
    w.start()
    try:
        _wait_for(lambda: len(w.durable) >= 3 or not w.is_alive(), "the first fsyncs", 120)
        assert w.is_alive(), f"the writer stopped before the cut: {w.error}"
        time.sleep(rng.uniform(0, 1.5))
    finally:
        power_cut(r)  # (also when the writer failed: the stack must go down for cleanup)
        w.stop.set()
    durable = {f"r{round_}/{name}": digest for name, digest in list(w.durable.items())}
    # the writer's next fsync fails (EIO) or it is stopped; a dead device must not hang it
    reboot(r, mnt)
    w.join(timeout=120)
    assert not w.is_alive(), "the writer hung on the dead device"
    return durable


def run_rounds(r: Rig, rounds: int, seed: int) -> dict[str, str]:
    d = r.daemon
    d.start()
    d.cli("volume", "create", VOLUME, "--size", "256M")
    dev = attach(d, VOLUME)
    subprocess.run(["mkfs.ext4", "-q", dev], check=True)
    mnt = mount(r, dev)
    rng = random.Random(seed)
    durable: dict[str, str] = {}
    for i in range(rounds):
        durable.update(write_until_cut(r, mnt, i, rng))
        mnt = mount_checked(r, durable)
    return durable


def test_power_cuts_under_ext4_keep_every_fsynced_file(rig):
    durable = run_rounds(rig, ROUNDS, seed=13)
    assert len(durable) >= 3 * ROUNDS
    log = rig.daemon.log()  # all of the daemon's runs
    assert log.count("pstoraged stopped") == 0  # every run ended in a cut, none cleanly
    assert "checksum error" not in log, "a read after a power cut failed its checksum"


NO_FLUSH = '''
import os

if os.environ.get("PSTORAGE_TEST_NO_FLUSH"):  # this test's fault: the daemon never flushes
    import lmdb

    from pstoraged.engine.backing import Backing

    Backing.sync = lambda self: None  # no fdatasync of the device
    _open = lmdb.open

    def _open_nosync(*args, **kwargs):  # and no sync of the metadata
        kwargs.update(sync=False, metasync=False)
        return _open(*args, **kwargs)

    lmdb.open = _open_nosync
'''


def test_power_cut_catches_a_daemon_that_never_flushes(rig, tmp_path, monkeypatch):
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(NO_FLUSH)
    monkeypatch.setenv("PYTHONPATH", str(inject))
    monkeypatch.setenv("PSTORAGE_TEST_NO_FLUSH", "1")  # read by pstoraged when it starts
    with pytest.raises((AssertionError, OSError, subprocess.CalledProcessError)) as caught:
        run_rounds(rig, 2, seed=14)
    print(f"caught: {type(caught.value).__name__}: {str(caught.value)[:300]}")
