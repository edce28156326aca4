"""Level 5: with the FUSE front end, an attached and mounted volume survives
a daemon restart and a kill -9, the mount carried across by systemd's fd
store (played here by the test: it receives FDSTORE=1 with the /dev/fuse
descriptor over NOTIFY_SOCKET and hands it to the next run as LISTEN_FDS)."""

from __future__ import annotations

import array
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pstoraged.frontends.loopdev import loop_devices_on

from .daemon_util import new_daemon, remove

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                reason="needs /dev/fuse and root")

# starts the daemon with the stored descriptor at 3 and LISTEN_PID = its own pid
LAUNCH = ("import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); os.close(fd); "
          "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='fuse'); "
          "os.execv(sys.executable, [sys.executable, '-m', 'pstoraged.control.daemon', *sys.argv[2:]])")


class FakeSystemd:
    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.store: dict[str, int] = {}
        self.messages: list[str] = []

    def pump(self, until: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(until in m for m in self.messages):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {until!r} from the daemon; got {self.messages}")
            try:
                msg, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
            except TimeoutError:
                continue
            text = msg.decode()
            self.messages.append(text)
            fds = array.array("i")
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
            if fields.get("FDSTORE") == "1" and fds:
                old = self.store.pop(fields.get("FDNAME", "stored"), None)
                if old is not None:
                    os.close(old)
                self.store[fields.get("FDNAME", "stored")] = fds[0]
            if fields.get("FDSTOREREMOVE") == "1":
                old = self.store.pop(fields.get("FDNAME", ""), None)
                if old is not None:
                    os.close(old)

    def close(self) -> None:
        for fd in self.store.values():
            os.close(fd)
        self.sock.close()


def test_mounted_volume_survives_restart_and_kill9(tmp_path):
    d = new_daemon(size=2 << 30)
    sysd = FakeSystemd(str(tmp_path / "notify"))
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    conf = tmp_path / "pstoraged.toml"
    conf.write_text(f'[fuse]\nenabled = true\nmountpoint = "{d.run_dir}/dev"\n')
    args = ["--pool-dir", d.pool_dir, "--run-dir", d.run_dir, "--config", str(conf)]
    env = dict(os.environ, NOTIFY_SOCKET=sysd.path)
    log = open(d.log_path, "ab")  # noqa: SIM115
    procs: list[subprocess.Popen] = []

    def start(handover: bool) -> None:
        sysd.messages.clear()
        if handover:
            fd = sysd.store["fuse"]
            cmd = [sys.executable, "-c", LAUNCH, str(fd), *args]
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=log, pass_fds=[fd]))
        else:
            cmd = [sys.executable, "-m", "pstoraged.control.daemon", *args]
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=log))
        sysd.pump("READY=1")
        assert "fuse" in sysd.store

    try:
        start(handover=False)
        d.cli("volume", "create", "vm", "--size", "256M")
        dev = d.cli("attach", "vm").stdout.strip()
        subprocess.run(["mkfs.ext4", "-q", dev], check=True)
        subprocess.run(["mount", dev, mnt], check=True)
        before = os.urandom(1 << 20)
        with open(f"{mnt}/before", "wb") as f:
            f.write(before)
            os.fsync(f.fileno())
        # a restart (SIGTERM): the mount stays, the next run takes it over
        procs[-1].send_signal(signal.SIGTERM)
        assert procs[-1].wait(60) == 0
        start(handover=True)
        after = os.urandom(1 << 20)
        with open(f"{mnt}/after", "wb") as f:  # no error: the restart was clean
            f.write(after)
            os.fsync(f.fileno())
        # a crash (kill -9): same, and the next fsync says that writes may be lost
        procs[-1].kill()
        procs[-1].wait()
        start(handover=True)
        with open(f"{mnt}/before", "rb") as f:
            assert f.read() == before
        # after a crash the first flush fails once (writes acknowledged but not
        # flushed may be gone), so ext4 stops its journal: the recovery is the
        # one the README gives for NBD - unmount, mount again (journal replay), fsck
        subprocess.run(["umount", mnt], check=True)
        subprocess.run(["mount", dev, mnt], check=True)
        try:
            with open(f"{mnt}/after", "rb") as f:
                assert f.read() == after  # fsynced before the crash: intact
            with open(f"{mnt}/before", "rb") as f:
                assert f.read() == before
        finally:
            subprocess.run(["umount", mnt], check=True)
        fsck = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout
        d.cli("detach", "vm")
        procs[-1].send_signal(signal.SIGTERM)
        assert procs[-1].wait(60) == 0
        sysd.pump("FDSTOREREMOVE=1", timeout=5)
        assert "fuse" not in sysd.store  # nothing attached: unmounted and forgotten
        assert not os.path.ismount(f"{d.run_dir}/dev")
    finally:
        subprocess.run(["umount", "-l", mnt], capture_output=True)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        # a failure may leave the loop device and the FUSE mount behind
        for loop in loop_devices_on(f"{d.run_dir}/dev"):
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        subprocess.run(["umount", "-l", f"{d.run_dir}/dev"], capture_output=True)
        log.close()
        sysd.close()
        remove(d)
