"""systemd service notifications (sd_notify(3)) without libsystemd.

With `Type=notify` systemd passes $NOTIFY_SOCKET, an AF_UNIX datagram socket
(a path, or '@name' in the abstract namespace); each datagram is a few
newline-separated VAR=VALUE assignments. With `WatchdogSec=` it also passes
$WATCHDOG_USEC (and $WATCHDOG_PID): the service must send WATCHDOG=1 more
often than that or it is killed and, with `Restart=on-failure`, restarted.

With `FileDescriptorStoreMax=` systemd also keeps file descriptors for the
service (FDSTORE=1, the descriptors attached as SCM_RIGHTS) and hands them
back to the next instance after a restart or a crash ($LISTEN_FDS): the FUSE
front end's /dev/fuse connection survives that way.

Outside systemd (no $NOTIFY_SOCKET) every call is a no-op returning False, so
the daemon calls these unconditionally. Sending never raises: a daemon must
not fail because its supervisor went away.

    sdnotify.ready(status="serving 3 volumes")
    sdnotify.reloading(); ...; sdnotify.ready()
    sdnotify.stopping()
    async with trio.open_nursery() as n:
        n.start_soon(Watchdog(engine_alive).run, name="watchdog")
    sdnotify.store_fds([fuse_fd], "fuse"); ...; sdnotify.listen_fds().get("fuse")
"""

from __future__ import annotations

import array
import inspect
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

log = logging.getLogger(__name__)

# Never stall the event loop for long on a full systemd queue (a wedged PID 1).
SEND_TIMEOUT = 1.0
LISTEN_FDS_START = 3  # sd_listen_fds(3): passed descriptors start here


def _address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if addr.startswith("@"):
        return "\0" + addr[1:]  # abstract namespace
    if addr.startswith("/"):
        return addr
    return None  # unset, or a transport we do not speak (vsock:...)


def notify(state: str, fds: Sequence[int] = ()) -> bool:
    """Send `state` ("READY=1", "STATUS=...", several joined by newlines),
    with `fds` attached (for FDSTORE=1).

    True when the datagram was sent; False outside systemd or on an error
    (logged, never raised)."""
    addr = _address()
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(SEND_TIMEOUT)
            # (socket.send_fds ignores its address argument in Python 3.11)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))
                      ] if fds else []
            s.sendmsg([state.encode()], rights, 0, addr)
    except OSError as e:
        log.warning("sd_notify %r to %s failed: %s", state.split("\n", 1)[0],
                    os.environ.get("NOTIFY_SOCKET"), e.strerror or e)
        return False
    return True


def _with_status(first: str, status: str | None) -> str:
    return first if status is None else f"{first}\n{_status_line(status)}"


def _status_line(text: str) -> str:
    # a newline would end the assignment and start a bogus one
    return "STATUS=" + " ".join(text.splitlines())


def ready(status: str | None = None) -> bool:
    """Startup (or a reload) is complete: `systemctl start` returns, After= units start."""
    return notify(_with_status("READY=1", status))


def stopping(status: str | None = None) -> bool:
    """Shutdown has begun (draining, committing); TimeoutStopSec= runs from here."""
    return notify(_with_status("STOPPING=1", status))


def reloading(status: str | None = None) -> bool:
    """A reload has begun; send ready() when it is done.

    MONOTONIC_USEC (CLOCK_MONOTONIC, as systemd >= 253 requires for
    Type=notify-reload) lets systemd tell this reload from an older one;
    earlier versions ignore it."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(_with_status(f"RELOADING=1\nMONOTONIC_USEC={usec}", status))


def status(text: str) -> bool:
    """Free-form status shown by `systemctl status`."""
    return notify(_status_line(text))


def watchdog() -> bool:
    """Keep-alive ping for WatchdogSec=."""
    return notify("WATCHDOG=1")


def extend_timeout(seconds: float) -> bool:
    """Ask for `seconds` more before the start/stop timeout fires (a long pool recovery)."""
    return notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


def _fdname(name: str) -> str:
    # sd_pid_notify_with_fds(3): at most 255 printable characters, no ':'
    if not 0 < len(name) <= 255 or ":" in name or not name.isprintable():
        raise ValueError(f"invalid file descriptor name {name!r}")
    return name


def store_fds(fds: Sequence[int], name: str) -> bool:
    """Have systemd keep `fds` (duplicates; ours stay open) under `name` and
    pass them to the next instance after a restart or crash. Needs
    FileDescriptorStoreMax= in the unit; systemd drops a stored descriptor
    that reports POLLHUP/POLLERR, and all of them when the unit fully stops."""
    return notify(f"FDSTORE=1\nFDNAME={_fdname(name)}", fds)


def remove_fds(name: str) -> bool:
    """Drop the descriptors stored under `name` (e.g. after a clean unmount)."""
    return notify(f"FDSTOREREMOVE=1\nFDNAME={_fdname(name)}")


def listen_fds(unset_environment: bool = True) -> dict[str, list[int]]:
    """Descriptors systemd passed to this process at start, by name
    ("unknown" when unnamed): the fd store's contents, or sockets.

    Empty unless $LISTEN_PID is this process. The descriptors get FD_CLOEXEC,
    and the variables are removed so that children (nbdkit also speaks this
    protocol) do not take them for theirs."""
    try:
        pid = int(os.environ.get("LISTEN_PID", ""))
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return {}
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    if unset_environment:
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
    if pid != os.getpid() or count <= 0:
        return {}
    if len(names) != count:
        names = ["unknown"] * count
    out: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        fd = LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        out.setdefault(name, []).append(fd)
    return out


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of WatchdogSec=), or None without a watchdog.

    None too when $WATCHDOG_PID names another process: the variables were
    inherited from a parent that systemd watches, not meant for us."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if usec <= 0 or (pid is not None and pid.strip() != str(os.getpid())):
        return None
    return usec / 2 / 1_000_000


HealthCheck = Callable[[], bool | Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class WatchdogStatistics:
    interval: float | None  # seconds between checks; None: no watchdog configured
    pings: int  # checks that passed (and pinged)
    missed: int  # checks that failed or timed out


class Watchdog:
    """Background service: ping systemd's watchdog while `healthy()` says so.

    `healthy` may be a plain function or a coroutine function; an async check
    gets `interval` seconds to answer, and no answer counts as unhealthy. So
    a round trip through the engine thread (`await dataplane.call(...)`)
    stops the pings when the engine wedges, and systemd restarts the daemon.
    A wedged trio loop stops them by itself. A check that raises counts as
    unhealthy (logged), it never takes the daemon down.
    Without a watchdog configured (`interval` None) run() returns at once."""

    def __init__(self, healthy: HealthCheck | None = None, interval: float | None = None,
                 ) -> None:
        self.healthy = healthy
        self.interval = watchdog_interval() if interval is None else interval
        self.pings = 0
        self.missed = 0
        self._cancel = trio.CancelScope()

    async def _check(self) -> bool:
        if self.healthy is None:
            return True
        assert self.interval is not None
        try:
            with trio.move_on_after(self.interval):
                res = self.healthy()
                if inspect.isawaitable(res):
                    res = await res
                return bool(res)
        except Exception as e:
            log.warning("watchdog: health check failed: %s", e)
            return False
        return False  # the async check did not answer in time

    async def run(self) -> None:
        if self.interval is None:
            return
        ok = True
        with self._cancel:
            while True:
                start = trio.current_time()
                healthy = await self._check()
                if healthy:
                    watchdog()
                    self.pings += 1
                else:
                    self.missed += 1
                if healthy and not ok:
                    log.info("watchdog: healthy again, pinging")
                elif ok and not healthy:
                    log.warning("watchdog: health check failed, not pinging "
                                "(systemd restarts the daemon if this lasts)")
                ok = healthy
                # a slow check eats into the period, so the pings stay `interval` apart
                await trio.sleep_until(start + self.interval)

    def stop(self) -> None:
        self._cancel.cancel()

    def statistics(self) -> WatchdogStatistics:
        return WatchdogStatistics(self.interval, self.pings, self.missed)
