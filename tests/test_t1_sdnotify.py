"""sd_notify against a real AF_UNIX datagram socket, the way systemd listens."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from pstoraged.control import sdnotify
from pstoraged.control.sdnotify import Watchdog

from .conftest import make_pool

ROOT = Path(__file__).resolve().parent.parent


def drain(sock: socket.socket, wait: float = 0.0) -> list[str]:
    """Every datagram queued on `sock`, waiting up to `wait` s for the first."""
    out = []
    sock.settimeout(wait)  # 0: non-blocking
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except (BlockingIOError, TimeoutError):
            return out
        sock.settimeout(0)


@pytest.fixture
def notify_socket(monkeypatch) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound in a short temp dir (socket paths max 107 bytes)."""
    d = tempfile.mkdtemp(prefix="sdn", dir="/tmp")
    path = os.path.join(d, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock, path
    sock.close()
    shutil.rmtree(d)


def test_unset_socket_is_a_noop(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready(status="x") is False
    assert sdnotify.watchdog() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sdnotify.stopping() is False


def test_messages_arrive_exactly(notify_socket):
    sock, _ = notify_socket
    assert sdnotify.ready()
    assert sdnotify.ready(status="serving 2 volumes")
    assert sdnotify.status("line one\nline two")  # a newline must not start a new variable
    assert sdnotify.watchdog()
    assert sdnotify.stopping(status="draining")
    assert sdnotify.extend_timeout(2.5)
    assert drain(sock) == [
        "READY=1",
        "READY=1\nSTATUS=serving 2 volumes",
        "STATUS=line one line two",
        "WATCHDOG=1",
        "STOPPING=1\nSTATUS=draining",
        "EXTEND_TIMEOUT_USEC=2500000",
    ]


def test_reloading_carries_monotonic_usec(notify_socket):
    sock, _ = notify_socket
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading(status="reloading configuration")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    [msg] = drain(sock)
    m = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)\nSTATUS=reloading configuration", msg)
    assert m, msg
    assert before <= int(m.group(1)) <= after


def test_abstract_namespace_socket(monkeypatch):
    name = f"pstorage-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready(status="abstract")
        assert drain(sock) == ["READY=1\nSTATUS=abstract"]


def test_unreachable_socket_returns_false(notify_socket, monkeypatch, caplog):
    _, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path + ".gone")
    assert sdnotify.ready() is False  # logged, never raised
    assert "sd_notify 'READY=1'" in caplog.text
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")  # a transport we do not speak
    assert sdnotify.ready() is False


def test_store_fds_passes_the_descriptors(notify_socket, tmp_path):
    sock, _ = notify_socket
    f = tmp_path / "state"
    f.write_text("kept across restarts")
    fd = os.open(f, os.O_RDONLY)
    try:
        assert sdnotify.store_fds([fd], "fuse")
        msg, fds, _, _ = socket.recv_fds(sock, 4096, 4)
        assert msg == b"FDSTORE=1\nFDNAME=fuse" and len(fds) == 1
        assert os.fstat(fds[0]).st_ino == os.fstat(fd).st_ino  # the same open file
        assert os.pread(fds[0], 100, 0) == b"kept across restarts"
        os.close(fds[0])
    finally:
        os.close(fd)
    assert sdnotify.remove_fds("fuse")
    assert drain(sock) == ["FDSTOREREMOVE=1\nFDNAME=fuse"]
    for bad in ("", "a:b", "x\ny", "n" * 256):
        with pytest.raises(ValueError):
            sdnotify.store_fds([0], bad)


LISTEN_CHILD = """
import json, os, sys
from pstoraged.control import sdnotify
got = sdnotify.listen_fds()
print(json.dumps({
    "fds": got,
    "data": {n: [os.pread(fd, 100, 0).decode() for fd in fds] for n, fds in got.items()},
    "cloexec": all(not os.get_inheritable(fd) for fds in got.values() for fd in fds),
    "env": [v for v in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if v in os.environ],
}))
"""


@pytest.mark.parametrize("pid, names, expect", [
    ("$$", "fuse:extra", {"fuse": [3], "extra": [4]}),
    ("$$", "fuse:fuse", {"fuse": [3, 4]}),
    ("$$", "", {"unknown": [3, 4]}),          # no names: sd_listen_fds calls them unknown
    ("1", "fuse:extra", {}),                  # meant for another process
])
def test_listen_fds(tmp_path, pid, names, expect):
    """As systemd starts the next instance: descriptors from 3 and LISTEN_* naming them."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("A")
    b.write_text("B")
    # sh keeps its pid through exec, so $$ is the pid python will have
    script = (f'exec 3<"$1" 4<"$2"; LISTEN_PID={pid} LISTEN_FDS=2 '
              f'LISTEN_FDNAMES="{names}" exec "$3" -c "$4"')
    p = subprocess.run(["sh", "-c", script, "sh", str(a), str(b), sys.executable, LISTEN_CHILD],
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["fds"] == expect
    assert out["data"] == {n: [{3: "A", 4: "B"}[fd] for fd in fds] for n, fds in expect.items()}
    assert out["cloexec"] and out["env"] == []  # children do not inherit them


@pytest.mark.parametrize("usec, pid, expect", [
    (None, None, None),
    ("30000000", None, 15.0),        # half the timeout
    ("30000000", "self", 15.0),
    ("30000000", "1", None),         # inherited from a watched parent: not for us
    ("500000", "self", 0.25),
    ("0", None, None),
    ("garbage", None, None),
])
def test_watchdog_interval(monkeypatch, usec, pid, expect):
    for var, value in (("WATCHDOG_USEC", usec),
                       ("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)
    assert sdnotify.watchdog_interval() == expect


def run_mock(fn) -> None:
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


def test_watchdog_pings_only_while_healthy(notify_socket, caplog):
    caplog.set_level("INFO", logger="pstoraged.control.sdnotify")
    sock, _ = notify_socket
    state = {"ok": True}
    checked: list[float] = []

    def healthy() -> bool:
        checked.append(trio.current_time())
        return state["ok"]

    async def main() -> None:
        wd = Watchdog(healthy, interval=10)
        async with trio.open_nursery() as n:
            n.start_soon(wd.run)
            t0 = trio.current_time()
            await trio.sleep(35)   # pings at 0, 10, 20, 30
            state["ok"] = False
            await trio.sleep(30)   # checks at 40, 50, 60: no pings
            state["ok"] = True
            await trio.sleep(20)   # pings at 70, 80
            wd.stop()
        assert wd.statistics() == sdnotify.WatchdogStatistics(10, 6, 3)
        assert [t - t0 for t in checked] == [0, 10, 20, 30, 40, 50, 60, 70, 80]

    run_mock(main)
    assert drain(sock) == ["WATCHDOG=1"] * 6
    assert "health check failed" in caplog.text and "healthy again" in caplog.text


def test_watchdog_async_check_that_hangs_counts_as_unhealthy(notify_socket):
    sock, _ = notify_socket
    state = {"wedged": False}

    async def engine_alive() -> bool:
        if state["wedged"]:
            await trio.sleep_forever()  # an engine thread that never answers
        return True

    async def main() -> None:
        wd = Watchdog(engine_alive, interval=5)
        async with trio.open_nursery() as n:
            n.start_soon(wd.run)
            await trio.sleep(12)   # pings at 0, 5, 10
            state["wedged"] = True
            await trio.sleep(20)   # checks from 15, 20, 25 time out; the one from 30 is cut
            wd.stop()
        assert (wd.pings, wd.missed) == (3, 3)

    run_mock(main)
    assert drain(sock) == ["WATCHDOG=1"] * 3


def test_watchdog_check_that_raises_does_not_ping(notify_socket, caplog):
    sock, _ = notify_socket

    def broken() -> bool:
        raise RuntimeError("pool gone")

    async def main() -> None:
        wd = Watchdog(broken, interval=1)
        async with trio.open_nursery() as n:
            n.start_soon(wd.run)
            await trio.sleep(2.5)
            wd.stop()
        assert (wd.pings, wd.missed) == (0, 3)

    run_mock(main)
    assert drain(sock) == []
    assert "pool gone" in caplog.text


def test_watchdog_without_watchdog_usec_returns(notify_socket, monkeypatch):
    sock, _ = notify_socket
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    wd = Watchdog(lambda: True)
    assert wd.interval is None
    run_mock(wd.run)  # returns at once instead of looping
    assert drain(sock) == []


def test_watchdog_takes_interval_from_environment(notify_socket, monkeypatch):
    sock, _ = notify_socket
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))

    async def main() -> None:
        wd = Watchdog()
        assert wd.interval == 2.0
        async with trio.open_nursery() as n:
            n.start_soon(wd.run)
            await trio.sleep(5)  # pings at 0, 2, 4
            wd.stop()

    run_mock(main)
    assert drain(sock) == ["WATCHDOG=1"] * 3


# ---------------------------------------------------------------- the real daemon


def _accepts(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def test_daemon_notifies_ready_and_stopping(notify_socket):
    """pstoraged started as the unit's ExecStart does, with NOTIFY_SOCKET set."""
    sock, path = notify_socket
    base = tempfile.mkdtemp(prefix="pst", dir="/tmp")
    pool, run = os.path.join(base, "pool"), os.path.join(base, "run")
    os.makedirs(pool)
    make_pool(pool, size=32 << 20)
    control, data = os.path.join(run, "control.sock"), os.path.join(run, "data.sock")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHDOG_")}
    env["NOTIFY_SOCKET"] = path
    with open(os.path.join(base, "daemon.log"), "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "pstoraged.control.daemon", "--pool-dir", pool,
                                 "--run-dir", run, "--config", "/dev/null"],  # not the host's
                                env=env, stdout=logf, stderr=logf)
    try:
        before: list[str] = []
        ready_seen = None  # (control accepts, data socket exists) when READY=1 arrived
        deadline, up_since = time.monotonic() + 30, None
        while ready_seen is None:
            for msg in drain(sock, wait=0.05):
                before.append(msg)
                if "READY=1" in msg.split("\n") and ready_seen is None:
                    ready_seen = (_accepts(control),
                                  os.path.exists(data) and stat.S_ISSOCK(os.stat(data).st_mode))
            if ready_seen is not None:
                break
            assert proc.poll() is None, "pstoraged exited during startup"
            assert time.monotonic() < deadline, "pstoraged did not start"
            # serving without READY=1 for a while: it never sends it
            if up_since is None and _accepts(control):
                up_since = time.monotonic()
            assert up_since is None or time.monotonic() - up_since < 3, \
                f"serving but no READY=1; got {before}"
        assert ready_seen == (True, True), "READY=1 before the sockets were up"
        assert any(line.startswith("STATUS=") for m in before for line in m.split("\n"))

        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        after = drain(sock)
        assert rc == 0
        lines = [m.split("\n") for m in after]
        stop = next((i for i, m in enumerate(lines) if "STOPPING=1" in m), None)
        assert stop is not None, f"no STOPPING=1; got {after}"
        assert not any("READY=1" in m for m in lines[stop:]), after
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------- units and install

UNITS = ("pstoraged.service", "pstorage-nbd@.service")
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed")


def staged_units(tmp_path: Path) -> Path:
    """The units with /usr/local/bin paths pointed at programs that exist here."""
    d = tmp_path / "units"
    d.mkdir()
    venv_bin = Path(sys.executable).parent
    for unit in UNITS:
        text = (ROOT / "systemd" / unit).read_text()
        for cmd in ("pstoraged", "pstorage"):
            real = venv_bin / cmd if (venv_bin / cmd).exists() else Path("/bin/true")
            text = text.replace(f"/usr/local/bin/{cmd} ", f"{real} ")
        assert "/usr/local/bin/" not in text  # every ExecStart/ExecStop rewritten
        (d / unit).write_text(text)
    (d / "pstorage-nbd@demo.service").symlink_to("pstorage-nbd@.service")
    return d


def analyze(d: Path, debug: bool = False) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SYSTEMD_LOG_LEVEL="debug" if debug else "info")
    return subprocess.run(["systemd-analyze", "verify", "--man=no", "pstoraged.service",
                           "pstorage-nbd@demo.service"], cwd=d, env=env,
                          capture_output=True, text=True, timeout=60)


@needs_analyze
def test_units_verify_cleanly(tmp_path):
    d = staged_units(tmp_path)
    p = analyze(d)
    out = (p.stdout + p.stderr).splitlines()
    # complaints about our units (unknown keys, bad values, missing programs)
    ours = [line for line in out if "pstorage" in line or str(d) in line]
    assert p.returncode == 0 and not ours, "\n".join(out)


def unit_dump(text: str, unit: str) -> dict[str, list[str]]:
    """Settings of `unit` as systemd parsed them (its debug dump): key -> values."""
    block = text.split(f"-> Unit {unit}:\n", 1)[1].split("\n\t-> Unit ", 1)[0]
    out: dict[str, list[str]] = {}
    last = ""
    for line in block.splitlines():
        m = re.match(r"\t\t\t?(?:-> )?([A-Za-z ]+):\s*(.*)$", line)
        if m:
            key = m.group(1)
            if key == "Command Line":  # belongs to the -> ExecStart: line above it
                key = f"{last} Command Line"
            out.setdefault(key, []).append(m.group(2))
            last = m.group(1)
    return out


@needs_analyze
def test_units_parse_as_intended(tmp_path):
    """Typos in capability or device names are dropped silently: check what systemd read."""
    p = analyze(staged_units(tmp_path), debug=True)
    daemon = unit_dump(p.stderr + p.stdout, "pstoraged.service")
    one = {k: v[0] for k, v in daemon.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["KillMode"] == "process"  # exports outlive the daemon
    assert one["Restart"] == "on-failure" and one["WatchdogSec"] == "1min 30s"
    assert one["Group"] == "pstorage" and one["RuntimeDirectory"] == "pstorage"
    assert one["RuntimeDirectoryPreserve"] == "yes" and one["StateDirectory"] == "pstorage"
    assert set(one["CapabilityBoundingSet"].split()) == {"cap_sys_admin", "cap_sys_rawio",
                                                         "cap_sys_resource"}
    assert one["File Descriptor Store Max"] == "4"
    assert one["DevicePolicy"] == "closed"
    assert set(daemon["DeviceAllow"]) == {"block-* rw", "/dev/fuse rw", "/dev/loop-control rw"}
    assert one["LockPersonality"] == one["RestrictRealtime"] == one["RestrictSUIDSGID"] == "yes"
    # no mount namespace (FUSE mounts must reach the host and the next daemon)
    assert one["ProtectSystem"] == "no" and one["PrivateTmp"] == "no"
    assert one["ProtectHome"] == "no" and one["PrivateDevices"] == "no"
    assert "PSTORAGE_PLUGIN=/usr/local/lib/pstorage/plugins/pstorage.py" in \
        one["Environment"].split()
    assert one["ExecStart Command Line"].endswith(" --config /etc/pstorage/pstoraged.toml")
    assert one["ExecReload Command Line"].startswith("/bin/kill -HUP")

    export = unit_dump(p.stderr + p.stdout, "pstorage-nbd@demo.service")
    one = {k: v[0] for k, v in export.items()}
    assert one["Type"] == "oneshot" and one["RemainAfterExit"] == "yes"
    assert "pstoraged.service (origin-file)" in export["Wants"]
    assert "pstoraged.service (origin-file)" in export["After"]
    for dep in ("BindsTo", "PartOf", "Requires"):  # would unexport on daemon restarts
        assert not any("pstoraged" in v for v in export.get(dep, [])), dep
    assert one["DynamicUser"] == "yes" and one["SupplementaryGroups"] == "pstorage"
    assert re.fullmatch(r"\S+/pstorage export \S*PSTORAGE_EXPORT_ARGS\S* demo",
                        one["ExecStart Command Line"])
    assert re.fullmatch(r"\S+/pstorage unexport demo", one["ExecStop Command Line"])


def run_script(name: str, dest: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DESTDIR=str(dest), PSTORAGE_VENV="no")
    return subprocess.run([str(ROOT / "scripts" / name), *args], env=env,
                          capture_output=True, text=True, timeout=60)


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def test_install_and_uninstall_staged(tmp_path):
    dest = tmp_path / "root"
    p = run_script("install", dest)
    assert p.returncode == 0, p.stderr
    src = {
        "usr/local/lib/systemd/system/pstoraged.service": "systemd/pstoraged.service",
        "usr/local/lib/systemd/system/pstorage-nbd@.service": "systemd/pstorage-nbd@.service",
        "etc/modules-load.d/pstorage.conf": "systemd/modules-load.conf",
        "etc/pstorage/pstoraged.toml": "etc/pstoraged.toml",
        "usr/local/lib/pstorage/plugins/pstorage.py": "plugins/pstorage.py",
        "usr/local/share/doc/pstorage/README.md": "README.md",
        "usr/local/share/doc/pstorage/systemd.md": "systemd/README.md",
        "usr/local/share/doc/pstorage/config.md": "docs/config.md",
    }
    links = {"usr/local/bin/pstoraged": "/opt/pstorage/bin/pstoraged",
             "usr/local/bin/pstorage": "/opt/pstorage/bin/pstorage"}
    assert files_under(dest) == set(src) | set(links)
    for path, origin in src.items():
        assert (dest / path).read_bytes() == (ROOT / origin).read_bytes(), path
        assert stat.S_IMODE((dest / path).stat().st_mode) == 0o644, path
    for path, target in links.items():
        assert os.readlink(dest / path) == target
    # the unit starts what install links, and points the daemon at the installed plugin
    unit = (dest / "usr/local/lib/systemd/system/pstoraged.service").read_text()
    exe, plugin = (re.findall(rf"^{key}=(\S+)", unit, re.M)[0]
                   for key in ("ExecStart", "Environment=PSTORAGE_PLUGIN"))
    assert (dest / exe.lstrip("/")).is_symlink() and (dest / plugin.lstrip("/")).is_file()

    # idempotent, and an administrator's config is never overwritten
    conf = dest / "etc/pstorage/pstoraged.toml"
    conf.write_text('log_level = "DEBUG"\n')
    p = run_script("install", dest)
    assert p.returncode == 0, p.stderr
    assert conf.read_text() == 'log_level = "DEBUG"\n' and "keeping" in p.stdout
    assert files_under(dest) == set(src) | set(links)

    # what `systemctl enable pstoraged pstorage-nbd@db` would have added
    wants = dest / "etc/systemd/system"
    for link, target in (("multi-user.target.wants/pstoraged.service", "pstoraged.service"),
                         ("pstoraged.service.wants/pstorage-nbd@db.service",
                          "pstorage-nbd@.service")):
        (wants / link).parent.mkdir(parents=True, exist_ok=True)
        (wants / link).symlink_to(f"/usr/local/lib/systemd/system/{target}")
    (dest / "var/lib/pstorage").mkdir(parents=True)
    (dest / "var/lib/pstorage/pool.json").write_text("{}")

    p = run_script("uninstall", dest)
    assert p.returncode == 0, p.stderr
    # configuration and pools stay
    assert files_under(dest) == {"etc/pstorage/pstoraged.toml", "var/lib/pstorage/pool.json"}
    p = run_script("uninstall", dest, "--purge")
    assert p.returncode == 0, p.stderr
    assert files_under(dest) == set()
    assert run_script("uninstall", dest, "--bogus").returncode == 2
