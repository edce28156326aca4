"""Run a real pstoraged in a subprocess for integration tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from pstoraged.control.client import Client
from pstoraged.errors import DaemonUnavailable, PStorageError

from .conftest import make_pool


class Starting(PStorageError):
    """/healthz said 503 "starting": the control socket is up, the rest not yet
    (e.g. the FUSE front end is being mounted)."""


class Daemon:
    def __init__(self, pool_dir: str, run_dir: str) -> None:
        self.pool_dir = pool_dir
        self.run_dir = run_dir
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(pool_dir, "daemon.log")
        self.client = Client(os.path.join(run_dir, "control.sock"), timeout=60)
        self.env = dict(os.environ, PSTORAGE_CONTROL=self.client.path)
        self.args: list[str] = []  # extra pstoraged arguments
        self.wrap: list[str] = []  # a command prefix, e.g. ip netns exec NS

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.wrap, sys.executable, "-m", "pstoraged.control.daemon", "--pool-dir", self.pool_dir,
             "--run-dir", self.run_dir, "--log-level", "DEBUG", "--config", "/dev/null",
             *self.args],
            stdout=log, stderr=log,
            # not under our runner's systemd, if any: that would switch FUSE attach on
            env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"},
        )
        log.close()
        deadline = time.monotonic() + 20
        while True:
            try:
                status, _, body = self.client.raw("GET", "/healthz")
                if status == 503 and b'"starting"' in body:
                    raise Starting("starting")
                if status != 200:
                    raise RuntimeError(f"pstoraged is unhealthy: {body!r}\n" + self.log())
                return
            except (DaemonUnavailable, Starting):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("pstoraged did not start:\n" + self.log()) from None
                time.sleep(0.05)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=60)
        self.proc = None
        return rc

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run([sys.executable, "-m", "pstoraged.control.cli", *args], env=self.env,
                           capture_output=True, text=True, timeout=120)
        if check and p.returncode:
            raise AssertionError(f"pstorage {' '.join(args)} -> {p.returncode}: {p.stderr}")
        return p

    def cleanup(self) -> None:
        """Detach everything and stop the daemon, whatever state a test left."""
        exports = os.path.join(self.run_dir, "exports")
        if self.proc is not None and self.proc.poll() is None:
            for name in os.listdir(exports) if os.path.isdir(exports) else []:
                try:
                    self.client.request("DELETE", f"/api/v1/volumes/{name}/export?force=1")
                except Exception:
                    pass
            self.stop()
        # anything still around (tests that killed processes)
        for name in os.listdir(exports) if os.path.isdir(exports) else []:
            fuse = os.path.join(exports, name, "fuse")
            out = subprocess.run(["losetup", "-j", os.path.join(fuse, name)],
                                 capture_output=True, text=True).stdout
            for line in out.splitlines():
                subprocess.run(["losetup", "-d", line.split(":")[0]], capture_output=True)
            subprocess.run(["fusermount3", "-uz", fuse], capture_output=True)
            for pidfile in ("nbdkit.pid", "nbdkit-tcp.pid"):
                try:
                    with open(os.path.join(exports, name, pidfile)) as f:
                        os.kill(int(f.read().strip()), signal.SIGKILL)
                except (OSError, ValueError):
                    pass


def new_daemon(size: int = 4 << 30, segment_size: int = 1 << 20) -> Daemon:
    # short paths: unix socket names are limited to 107 bytes
    base = tempfile.mkdtemp(prefix="pst", dir="/tmp")
    pool_dir = os.path.join(base, "pool")
    os.makedirs(pool_dir)
    make_pool(pool_dir, size=size, segment_size=segment_size)
    return Daemon(pool_dir, os.path.join(base, "run"))


def remove(d: Daemon) -> None:
    d.cleanup()
    shutil.rmtree(os.path.dirname(d.pool_dir), ignore_errors=True)


# nbdsh one-liners (libnbd's Python module under Debian's python3, as nbdkit uses)
NBDSH = ["/usr/bin/python3", "-m", "nbd"]


def nbd_write(uri: str, offset: int, data: bytes) -> None:
    subprocess.run(NBDSH + ["-u", uri, "-c",
                            f"import sys; h.pwrite(sys.stdin.buffer.read(), {offset}); h.flush()"],
                   input=data, check=True, timeout=60)


def nbd_read(uri: str, offset: int, length: int) -> bytes:
    return subprocess.run(NBDSH + ["-u", uri, "-c", f"import sys; sys.stdout.buffer.write("
                                   f"h.pread({length}, {offset}))"],
                          capture_output=True, check=True, timeout=60).stdout


def nbd_size(uri: str) -> int:
    return int(subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True,
                              check=True, timeout=60).stdout)
