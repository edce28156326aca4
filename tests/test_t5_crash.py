"""Level 5: kill -9 of the daemon or of nbdkit under a mounted filesystem.

Whatever a successful fsync covered must survive, and the filesystem must
check clean after its journal is replayed.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from .daemon_util import Daemon
from .test_t4_filesystem import attach, fsck, mount, new_fs, umount
from .test_t4_filesystem import pytestmark as _fs_marks

pytestmark = _fs_marks

DURABLE_TIMEOUT = 180


class FsyncWriter(threading.Thread):
    """Writes files and fsyncs each; remembers those whose fsync succeeded."""

    def __init__(self, root: str, seed: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.rng = random.Random(seed)
        self.durable: dict[str, str] = {}
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        i = 0
        try:
            while not self.stop.is_set():
                size = self.rng.choice([4096, 20000, 128 << 10, 300 << 10])
                data = (self.rng.randbytes(size // 2) + f"file {i} ".encode() * (size // 16))[:size]
                path = os.path.join(self.root, f"s{i:05d}")
                with open(path, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                dfd = os.open(self.root, os.O_RDONLY)
                os.fsync(dfd)  # the directory entry too
                os.close(dfd)
                self.durable[os.path.basename(path)] = hashlib.sha256(data).hexdigest()
                i += 1
        except OSError as e:  # expected once writes were lost: EIO on fsync
            self.error = e


def recover_and_verify(d: Daemon, name: str, durable: dict[str, str]) -> None:
    """Every file in `durable` (fsynced before the crash) reads back as written."""
    assert durable, "no file was fsynced before the crash: the test would verify nothing"
    verified = 0
    dev = attach(d, name)
    mnt = mount(d, dev)  # replays the journal
    umount(mnt)
    fsck(dev)
    mnt = mount(d, dev)
    try:
        for fname, digest in durable.items():
            with open(os.path.join(mnt, fname), "rb") as f:
                assert hashlib.sha256(f.read()).hexdigest() == digest, (
                    f"{fname} was fsynced but differs after recovery ({len(durable)} files checked)")
            verified += 1
    finally:
        umount(mnt)
    d.cli("detach", name)
    assert verified == len(durable)


def abandon_mount(d: Daemon, mnt: str, name: str) -> None:
    subprocess.run(["umount", "-l", mnt], capture_output=True)
    d.cli("detach", name, "--force", check=False)


@pytest.mark.parametrize("delay", [0.3, 1.2, 2.5])
def test_kill9_daemon_during_fsync_stream(fs_daemon, delay):
    _, mnt = new_fs(fs_daemon, "c", "512M")
    w = FsyncWriter(mnt, seed=int(delay * 10))
    w.start()
    time.sleep(delay)
    fsynced_before_kill = len(w.durable)
    fs_daemon.kill9()
    fs_daemon.start()  # the plugin reconnects; lost writes surface as EIO on flush
    time.sleep(1.0)
    w.stop.set()
    w.join(timeout=DURABLE_TIMEOUT)
    assert not w.is_alive()
    assert fsynced_before_kill > 0, f"no file was fsynced before the kill (writer error: {w.error})"
    abandon_mount(fs_daemon, mnt, "c")
    recover_and_verify(fs_daemon, "c", dict(w.durable))


def test_kill9_nbdkit_under_mounted_fs(fs_daemon):
    _, mnt = new_fs(fs_daemon, "k", "512M")
    w = FsyncWriter(mnt, seed=7)
    w.start()
    time.sleep(1.5)
    pid = int(Path(fs_daemon.run_dir, "exports", "k", "nbdkit.pid").read_text())
    fsynced_before_kill = len(w.durable)
    os.kill(pid, signal.SIGKILL)
    w.join(timeout=DURABLE_TIMEOUT)  # the device fails under it: EIO
    w.stop.set()
    assert not w.is_alive()
    assert fsynced_before_kill > 0, f"no file was fsynced before the kill (writer error: {w.error})"
    if subprocess.run(["umount", mnt], capture_output=True).returncode:
        subprocess.run(["umount", "-l", mnt], capture_output=True)
    # attach again straight away: the daemon notices the dead nbdkit and starts afresh
    recover_and_verify(fs_daemon, "k", dict(w.durable))
