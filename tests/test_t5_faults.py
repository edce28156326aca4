"""Level 5: a real failing backing device, and a background service that keeps failing.

The device: a file served by nbdkit with its error filter (reads or writes fail with EIO
while a trigger file exists), made a file by nbdfuse and a block device by a direct-I/O
loop device, on which the pool lives (O_DIRECT, no page cache in between).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pstoraged.engine.pool import create_pool
from pstoraged.frontends import protocol as P

from .daemon_util import Daemon

pytestmark = pytest.mark.skipif(
    not (shutil.which("nbdkit") and shutil.which("nbdfuse") and os.path.exists("/dev/fuse")
         and shutil.which("losetup")),
    reason="needs nbdkit, nbdfuse, /dev/fuse and losetup (run scripts/setup)",
)

MiB = 1 << 20


@dataclass
class FailingDevice:
    base: Path
    path: str  # the loop device
    fail_reads: Path  # reads fail with EIO while this file exists
    fail_writes: Path  # writes fail with EIO while this file exists


def _wait_for(cond, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def failing_device() -> Iterator[FailingDevice]:
    base = Path(tempfile.mkdtemp(prefix="pstf", dir="/tmp"))  # short: socket paths
    img, sock, pidfile, mnt = base / "img", base / "nbd.sock", base / "nbdkit.pid", base / "fuse"
    fail_reads, fail_writes = base / "fail-reads", base / "fail-writes"
    with open(img, "wb") as f:
        f.truncate(96 * MiB)
    mnt.mkdir()
    fuse: subprocess.Popen | None = None
    loop = ""
    try:
        subprocess.run(["nbdkit", "-U", str(sock), "-P", str(pidfile), "--filter=error", "file",
                        str(img), "error-pread=EIO", "error-pread-rate=100%",
                        f"error-pread-file={fail_reads}", "error-pwrite=EIO",
                        "error-pwrite-rate=100%", f"error-pwrite-file={fail_writes}"],
                       check=True, timeout=30)
        fuse = subprocess.Popen(["nbdfuse", str(mnt / "dev"), "--unix", str(sock)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(lambda: (mnt / "dev").exists(), "nbdfuse")
        loop = subprocess.run(["losetup", "--direct-io=on", "-f", "--show", str(mnt / "dev")],
                              capture_output=True, text=True, check=True).stdout.strip()
        yield FailingDevice(base, loop, fail_reads, fail_writes)
    finally:
        fail_reads.unlink(missing_ok=True)
        fail_writes.unlink(missing_ok=True)
        if loop:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        if fuse is not None:
            fuse.terminate()
            fuse.wait(timeout=30)
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGTERM)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def device_daemon(failing_device: FailingDevice) -> Iterator[tuple[Daemon, FailingDevice]]:
    pool_dir = failing_device.base / "pool"
    pool_dir.mkdir()
    create_pool(str(pool_dir), failing_device.path, segment_size=MiB)
    d = Daemon(str(pool_dir), str(failing_device.base / "run"))
    try:
        yield d, failing_device
    finally:
        failing_device.fail_reads.unlink(missing_ok=True)
        failing_device.fail_writes.unlink(missing_ok=True)
        if d.proc is not None and d.proc.poll() is None:
            d.stop()


class DataConn:
    """The daemon's data socket, as the nbdkit plugin uses it."""

    def __init__(self, d: Daemon, volume: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(os.path.join(d.run_dir, "data.sock"))
        self.sock.settimeout(60)
        err, _ = self.request(P.OP_OPEN, payload=volume.encode())
        assert err == 0

    def request(self, op: int, offset: int = 0, length: int = 0,
                payload: bytes = b"") -> tuple[int, bytes]:
        self.sock.sendall(P.REQ.pack(P.REQ_MAGIC, op, 0, 1, offset, length, len(payload))
                          + payload)
        _, err, _, plen, _ = P.REP.unpack(self.sock.recv(P.REP.size, socket.MSG_WAITALL))
        return err, self.sock.recv(plen, socket.MSG_WAITALL) if plen else b""

    def close(self) -> None:
        self.sock.close()


def _written_volume(d: Daemon, size: int = 8 * MiB) -> tuple[DataConn, bytes]:
    d.client.post("/api/v1/volumes", {"name": "v", "size": 32 * MiB})
    conn = DataConn(d, "v")
    data = os.urandom(size)  # several 1 MiB segments: all but the last are on the device
    for off in range(0, size, MiB):
        assert conn.request(P.OP_WRITE, off, MiB, data[off : off + MiB])[0] == 0
    assert conn.request(P.OP_FLUSH)[0] == 0
    return conn, data


def _metrics(d: Daemon) -> dict[str, float]:
    text = d.client.get("/metrics")
    return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1])
            for ln in text.splitlines() if ln and not ln.startswith("#")}


def _healthz(d: Daemon) -> tuple[int, dict]:
    import json

    status, _, body = d.client.raw("GET", "/healthz")
    return status, json.loads(body)


def test_read_errors_of_the_backing_device_show_in_health(device_daemon):
    d, dev = device_daemon
    d.start()
    conn, data = _written_volume(d)
    try:
        before = d.client.get("/api/v1/analytics/health")["engine"]
        assert before["read_errors"] == 0
        assert before["gc_write_amplification"] >= 1.0  # available (docs/analytics.md)
        dev.fail_reads.touch()
        failed = sum(conn.request(P.OP_READ, off, 4096)[0] != 0 for off in range(0, 4 * MiB, MiB))
        assert failed == 4
        dev.fail_reads.unlink()
        err, got = conn.request(P.OP_READ, 0, 4096)
        assert err == 0 and got == data[:4096]  # the device works again; the count stays
    finally:
        conn.close()
    h = d.client.get("/api/v1/analytics/health")
    assert h["status"] == "degraded"
    assert h["engine"]["read_errors"] == 4 and h["engine"]["checksum_errors"] == 0
    reason = next(r for r in h["reasons"] if "read errors" in r)
    assert reason.startswith("4 read errors from the backing device since start; last: EIO at "
                             "offset ")
    status, body = _healthz(d)
    # degraded is not "not ready": the daemon still serves what the device can read
    assert status == 200 and body["status"] == "degraded" and body["ready"] is True
    assert body["problems"][0].startswith("4 read errors from the backing device")
    assert _metrics(d)["pstorage_read_errors_total"] == 4


def test_stop_after_a_device_failure_says_the_pool_was_not_closed_cleanly(device_daemon,
                                                                          tmp_path):
    d, dev = device_daemon
    d.start()
    conn, _ = _written_volume(d, size=MiB)
    try:
        dev.fail_writes.touch()
        assert conn.request(P.OP_WRITE, 0, 4096, os.urandom(4096))[0] == 0  # in memory
        assert conn.request(P.OP_FLUSH)[0] != 0  # the device refuses: the pool fails
    finally:
        conn.close()
    assert _healthz(d)[0] == 503
    rc = d.stop()
    log = d.log()
    assert "pstoraged stopped cleanly" not in log
    assert "pstoraged stopped; the pool was not closed cleanly: " in log
    assert rc == 6  # DeviceIOError's exit status
    # and a clean stop still says so
    dev.fail_writes.unlink()
    d.start()
    assert d.stop() == 0
    assert d.log().rstrip().endswith("pstoraged stopped cleanly")


SITECUSTOMIZE = '''
import os

_trigger = os.environ.get("PSTORAGE_TEST_FAIL_CLEANER")
if _trigger:  # this test's fault injection: the cleaner raises while the file exists
    from pstoraged.engine.cleaner import SegmentCleaner

    _step, _wanted = SegmentCleaner.step, SegmentCleaner.wanted

    def step(self, budget, busy):
        if os.path.exists(_trigger):
            raise RuntimeError("injected cleaner failure")
        return _step(self, budget, busy)

    def wanted(self, busy):
        return os.path.exists(_trigger) or _wanted(self, busy)

    SegmentCleaner.step, SegmentCleaner.wanted = step, wanted
'''


def test_a_failing_cleaner_in_the_daemon_backs_off_shows_and_recovers(tmp_path, monkeypatch):
    from .daemon_util import new_daemon, remove

    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SITECUSTOMIZE)
    trigger = tmp_path / "fail-cleaner"
    trigger.touch()
    d = new_daemon(size=256 * MiB)
    try:
        monkeypatch.setenv("PYTHONPATH", str(inject))
        monkeypatch.setenv("PSTORAGE_TEST_FAIL_CLEANER", str(trigger))
        d.start()  # (the environment is copied now; the rest of the test goes without it)
        monkeypatch.undo()
        time.sleep(3.5)  # retries after 0.1, 0.2, 0.4, 0.8 and 1.6 s: about 5 failures
        h = d.client.get("/api/v1/analytics/health")
        assert h["status"] == "degraded"
        reason = next(r for r in h["reasons"] if "cleaner" in r)
        assert "background service cleaner is failing: RuntimeError: injected cleaner failure" \
            in reason
        status, body = _healthz(d)
        assert status == 200 and body["status"] == "degraded"
        assert any("cleaner" in p for p in body["problems"])
        m = _metrics(d)
        failures = m['pstorage_background_failures_total{service="cleaner"}']
        assert 3 <= failures <= 8  # backing off, not every 0.1 s (that would be ~35)
        assert m["pstorage_background_failing_services"] == 1
        log = d.log()
        assert log.count("Traceback") == 1  # once, then one line per retry
        assert log.count("cleaner still failing") == failures - 1

        trigger.unlink()  # fixed: the next retry (within 3.2 s) succeeds
        _wait_for(lambda: _healthz(d)[1]["status"] == "ok", "the cleaner to recover", 10)
        assert d.client.get("/api/v1/analytics/health")["status"] == "healthy"
        assert _metrics(d)["pstorage_background_failing_services"] == 0
        assert "background service cleaner works again after" in d.log()
    finally:
        remove(d)
