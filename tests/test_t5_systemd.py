"""Level 5: pstoraged.service under a real systemd as PID 1.

The container is this machine's own root filesystem seen through an overlay
(writes go to a temporary upper layer), booted by systemd-nspawn to a small
target; the unit file is the one we ship, installed where scripts/install
puts it, with a test drop-in only for paths and shorter timeouts. Checked:
Type=notify start (active only once READY=1 came), restart on a crash (kill -9)
with the data kept, the export unit, the FUSE mount kept across the crash in
systemd's fd store, the watchdog killing a hung daemon, reload (SIGHUP), a
clean stop, and journald keeping our priorities.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("systemd-nspawn") is None and not os.environ.get("CI"),
                       reason="systemd-nspawn (Debian package systemd-container) is missing"),
]

TARGET = """[Unit]
Description=PStorage test boot: basic system only
Requires=basic.target
After=basic.target
AllowIsolate=yes
"""

DROPIN = f"""[Service]
ExecStart=
ExecStart={VENV}/bin/pstoraged --config /etc/pstorage/pstoraged.toml
Environment=PSTORAGE_PLUGIN={ROOT}/plugins/pstorage.py
WatchdogSec=4
TimeoutAbortSec=3
RestartSec=1
# the container's /dev is not a devtmpfs: the daemon makes the node of its
# metadata region's loop device itself (systemd/README.md, "Containers")
CapabilityBoundingSet=CAP_MKNOD
"""

CONFIG = """pool = "pst-systemd"
pool_dir = "/var/lib/pstorage"
run_dir = "/run/pstorage"
sample_interval = 3600
[fuse]
enabled = true
"""


# This machine's own PStorage state, which the overlay would otherwise show
# (a pool from scripts/demo, an installed config, an administrator's drop-ins):
# the container must start from none of it, and never reach the real files.
ABSENT = ("var/lib/pstorage", "run/pstorage")  # whiteouts: as on a fresh machine
EMPTY = ("etc/pstorage", "etc/systemd/system/pstoraged.service.d",  # opaque: the test fills them
         "etc/systemd/system/pstorage-nbd@.service.d")


def _upper_parents(up: Path, rel: str) -> None:
    """Create rel's parents in the upper layer with the host's modes (a merged
    directory takes its attributes from the upper one)."""
    for i in range(1, len(Path(rel).parts)):
        part = Path(*Path(rel).parts[:i])
        if not (up / part).exists():
            st = os.stat(Path("/") / part)
            (up / part).mkdir()
            os.chmod(up / part, st.st_mode & 0o7777)
            os.chown(up / part, st.st_uid, st.st_gid)


def hide_host_state(up: Path) -> None:
    for rel in ABSENT:
        _upper_parents(up, rel)
        os.mknod(up / rel, 0o600 | stat.S_IFCHR, os.makedev(0, 0))  # overlayfs whiteout
    for rel in EMPTY:
        _upper_parents(up, rel)
        (up / rel).mkdir()
        os.setxattr(up / rel, "trusted.overlay.opaque", b"y")


class Container:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "root"
        up = base / "up"
        for d in (self.root, up, base / "work"):
            d.mkdir()
        hide_host_state(up)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir=/,upperdir={up},workdir={base / 'work'}", str(self.root)],
                       check=True)
        self.mounted = True
        self.proc: subprocess.Popen | None = None
        self.pid = 0
        units = self.root / "usr/local/lib/systemd/system"
        units.mkdir(parents=True, exist_ok=True)
        for unit in ("pstoraged.service", "pstorage-nbd@.service"):
            shutil.copy(ROOT / "systemd" / unit, units / unit)
        bindir = self.root / "usr/local/bin"  # where scripts/install puts the CLI
        bindir.mkdir(parents=True, exist_ok=True)
        (bindir / "pstorage").unlink(missing_ok=True)
        (bindir / "pstorage").symlink_to(VENV / "bin/pstorage")
        etc = self.root / "etc"
        (etc / "systemd/system/pstoraged.service.d").mkdir(parents=True, exist_ok=True)
        (etc / "systemd/system/pstoraged.service.d/test.conf").write_text(DROPIN)
        (etc / "systemd/system/pstorage-test.target").write_text(TARGET)
        # The export unit's DynamicUser= implies PrivateTmp=: a checkout under
        # /tmp (where the CLI symlink points) must be bound in. An installed
        # system has the CLI in /usr/local.
        (etc / "systemd/system/pstorage-nbd@.service.d").mkdir(parents=True, exist_ok=True)
        (etc / "systemd/system/pstorage-nbd@.service.d/test.conf").write_text(
            f"[Service]\nBindReadOnlyPaths={ROOT}\n")
        (etc / "sysusers.d").mkdir(exist_ok=True)
        (etc / "sysusers.d/pstorage.conf").write_text("g pstorage -\n")
        (etc / "pstorage").mkdir(exist_ok=True)
        (etc / "pstorage/pstoraged.toml").write_text(CONFIG)

    def boot(self, timeout: float = 90) -> None:
        self.log = open(self.base / "boot.log", "wb")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "--directory", str(self.root), "--register=no", "--keep-unit",
             "--link-journal=no", "--machine=pstorage-test", "--quiet",
             "--bind=/dev/fuse",
             # the pool's metadata region is a loop device (engine/region.py)
             "--bind=/dev/loop-control",
             # the checkout may be under /tmp, which nspawn gives its own tmpfs
             f"--bind-ro={ROOT}", "-b",
             "systemd.unit=pstorage-test.target"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("the container exited: " + self.boot_log())
            if not self.pid:
                self.pid = _child_pid(self.proc.pid)
            if self.pid and self.run("systemctl", "is-active", "pstorage-test.target",
                                     check=False).stdout.strip() == "active":
                return
            time.sleep(0.5)
        raise AssertionError("the container did not boot: " + self.boot_log())

    def boot_log(self) -> str:
        return (self.base / "boot.log").read_text(errors="replace")[-3000:]

    def run(self, *cmd: str, check: bool = True, timeout: float = 120
            ) -> subprocess.CompletedProcess:
        # a login-like environment: the container's PATH, not this test's
        r = subprocess.run(["nsenter", "-t", str(self.pid), "-m", "-u", "-i", "-p", "--",
                            "env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                            "LANG=C.UTF-8", *cmd],
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode:
            raise AssertionError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stdout}{r.stderr}")
        return r

    def show(self, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", "pstoraged.service",
                       *[f"--property={p}" for p in props]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def cli(self, *args: str) -> Any:
        return json.loads(self.run(str(VENV / "bin/pstorage"), "--json", *args).stdout or "{}")

    def wait(self, pred, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what}: {self.show('ActiveState', 'SubState', 'Result', 'NRestarts')}\n"
                             + self.run("journalctl", "-u", "pstoraged", "--no-pager", "-n", "40",
                                        check=False).stdout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nspawn: orderly shutdown of the container
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.proc is not None:
            self.log.close()
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.root)], check=False)
            self.mounted = False


def _child_pid(parent: int) -> int:
    """The container's PID 1, as the host sees it: nspawn's child running systemd."""
    try:
        kids = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return 0
    for k in kids:
        try:
            if "systemd" in Path(f"/proc/{k}/cmdline").read_bytes().split(b"\0")[0].decode():
                return int(k)
        except OSError:
            continue
    return 0


@pytest.fixture
def container(tmp_path_factory):
    tempfile_dir = tmp_path_factory.mktemp("nspawn")
    base = Path(tempfile_dir)
    c = Container(base)
    try:
        c.boot()
        yield c
    finally:
        c.close()
        shutil.rmtree(tempfile_dir, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting an overlay needs root")
def test_the_container_sees_none_of_the_hosts_pstorage_state(tmp_path):
    """What the container's overlay does to a host with PStorage installed and a
    pool (here a decoy lower layer): hidden, and the host's files untouched."""
    lower, up, work, merged = (tmp_path / n for n in ("lower", "up", "work", "merged"))
    decoys = ["var/lib/pstorage/pool.json", "run/pstorage/control.sock",
              "etc/pstorage/pstoraged.toml", "etc/pstorage/exports/keep.env",
              "etc/systemd/system/pstoraged.service.d/admin.conf",
              "etc/systemd/system/pstorage-nbd@.service.d/admin.conf"]
    for rel in [*decoys, "etc/hostname", "var/lib/other/state"]:
        (lower / rel).parent.mkdir(parents=True, exist_ok=True)
        (lower / rel).write_text("host\n")
    for d in (up, work, merged):
        d.mkdir()
    hide_host_state(up)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={up},workdir={work}", str(merged)], check=True)
    try:
        assert not (merged / "var/lib/pstorage").exists()
        assert not (merged / "run/pstorage").exists()
        for rel in EMPTY:
            assert list((merged / rel).iterdir()) == [], rel
        assert (merged / "etc/hostname").read_text() == "host\n"  # the rest is still the host's
        assert (merged / "var/lib/other/state").exists()
        (merged / "var/lib/pstorage").mkdir()  # what the test in the container then does
        (merged / "var/lib/pstorage/pool.json").write_text("container\n")
    finally:
        subprocess.run(["umount", str(merged)], check=True)
    for rel in decoys:
        assert (lower / rel).read_text() == "host\n", rel


def test_the_unit_under_systemd(container):
    c = container
    c.run(str(VENV / "bin/pstorage"), "pool", "create", "--dir", "/var/lib/pstorage",
          "--device", "/var/lib/pstorage/pool.img", "--size", "256M", "--label", "pst-systemd")

    # Type=notify: 'systemctl start' returns once READY=1 came, and not before
    c.run("systemctl", "start", "pstoraged.service", timeout=120)
    st = c.show("ActiveState", "SubState", "MainPID", "NRestarts", "StatusText")
    assert (st["ActiveState"], st["SubState"]) == ("active", "running"), st
    first_pid = int(st["MainPID"])
    assert c.cli("volume", "create", "keep", "--size", "64M")["name"] == "keep"
    # the runtime directory is the group's, the state directory root's alone
    mode = c.run("stat", "-c", "%a %G", "/run/pstorage", "/var/lib/pstorage").stdout.split("\n")
    assert mode[0] == "750 pstorage" and mode[1].startswith("700 "), mode

    # journald keeps our priorities: an info line at 6
    lines = [json.loads(x) for x in c.run("journalctl", "-u", "pstoraged", "-o", "json",
                                          "--no-pager").stdout.splitlines() if x.strip()]
    assert any(x.get("PRIORITY") == "6" and "ready" in x.get("MESSAGE", "").lower()
               for x in lines), [x.get("MESSAGE") for x in lines][-10:]

    # SIGHUP reload: RELOADING=1 ... READY=1, same process
    c.run("systemctl", "reload", "pstoraged.service")
    st = c.show("ActiveState", "MainPID")
    assert st["ActiveState"] == "active" and int(st["MainPID"]) == first_pid

    # the export unit (DynamicUser, in group pstorage) serves the volume
    c.run("systemctl", "start", "pstorage-nbd@keep.service")
    uri = "nbd+unix:///keep?socket=/run/pstorage/exports/keep/nbd.sock"
    nbdkit_pid = c.run("cat", "/run/pstorage/exports/keep/nbdkit.pid").stdout.strip()
    c.run("nbdsh", "-u", uri, "-c", "h.pwrite(b'systemd!' * 8192, 65536); h.flush()")

    # the FUSE front end's file of the volume: written and fsynced
    fuse_file = "/run/pstorage/dev/keep"
    c.run("python3", "-c", f"import os; fd = os.open('{fuse_file}', os.O_WRONLY); "
          "os.pwrite(fd, b'fusefuse' * 512, 1 << 20); os.fsync(fd)")

    # a crash: Restart=on-failure brings it back; KillMode=process left the
    # export running, and it serves the flushed data from the new daemon; the
    # FUSE mount was kept in the fd store and the new daemon serves it
    os.kill(_host_pid(c, first_pid), signal.SIGKILL)
    c.wait(lambda: c.show("NRestarts")["NRestarts"] == "1"
           and c.show("ActiveState")["ActiveState"] == "active", "restart after kill -9")
    second_pid = int(c.show("MainPID")["MainPID"])
    assert second_pid != first_pid
    assert [v["name"] for v in c.cli("volume", "list")] == ["keep"]
    assert c.run("cat", "/run/pstorage/exports/keep/nbdkit.pid").stdout.strip() == nbdkit_pid
    c.run("nbdsh", "-u", uri, "-c", "assert h.pread(65536, 65536) == b'systemd!' * 8192")
    c.run("python3", "-c", f"import os; fd = os.open('{fuse_file}', os.O_RDONLY); "
          "assert os.pread(fd, 4096, 1 << 20) == b'fusefuse' * 512")
    journal = c.run("journalctl", "-u", "pstoraged", "--no-pager").stdout
    assert "took over the mount on /run/pstorage/dev" in journal, journal[-2000:]

    # a hung daemon: the watchdog (4 s in the drop-in) aborts and restarts it
    os.kill(_host_pid(c, second_pid), signal.SIGSTOP)
    c.wait(lambda: c.show("NRestarts")["NRestarts"] == "2"
           and c.show("ActiveState")["ActiveState"] == "active", "watchdog restart", 60)
    journal = c.run("journalctl", "-u", "pstoraged", "--no-pager").stdout
    assert "Watchdog timeout" in journal, journal[-2000:]

    c.run("systemctl", "stop", "pstorage-nbd@keep.service")  # unexports

    # a clean stop: STOPPING=1, exit 0, and the pool is marked clean
    c.run("systemctl", "stop", "pstoraged.service", timeout=150)
    st = c.show("ActiveState", "Result", "ExecMainStatus")
    assert st["ActiveState"] == "inactive" and st["ExecMainStatus"] == "0", st
    journal = c.run("journalctl", "-u", "pstoraged", "--no-pager", "-n", "30").stdout
    assert "pstoraged stopped cleanly" in journal, journal[-2000:]


def _host_pid(c: Container, pid_in_container: int) -> int:
    """Container PIDs differ from the host's: map through NSpid."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            status = (p / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("NSpid:"):
                ids = line.split()[1:]
                if len(ids) >= 2 and int(ids[-1]) == pid_in_container and _in_container(c, p.name):
                    return int(p.name)
    raise AssertionError(f"no host pid for container pid {pid_in_container}")


def _in_container(c: Container, pid: str) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid") == os.readlink(f"/proc/{c.pid}/ns/pid")
    except OSError:
        return False
