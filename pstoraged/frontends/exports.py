"""Exports and attachments: nbdkit servers and the block devices on them.

`export` starts nbdkit with plugins/pstorage.py on a unix socket (and, on
request, a second one on TCP). `attach` turns an export into a block device:
the kernel nbd driver when the kernel has one, otherwise nbdfuse (an NBD
client presenting the export as a FUSE file) plus a loop device with direct
I/O. These processes are deliberately *not* children that die with the
daemon: a mounted device must survive a daemon restart, the plugin
reconnecting meanwhile. Their state is kept in RUN_DIR/exports/NAME/.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..engine.devices import dev_dir
from ..errors import Conflict, InvalidArgument, NotFound, PStorageError, ToolFailed
from .loopdev import attach_loop, device_size, wait_for, wait_for_block_device
from .processes import alive, terminate, wait_exit

log = logging.getLogger(__name__)

# the checkout (or install) that holds the pstoraged package
REPO = Path(__file__).resolve().parent.parent.parent
DEFAULT_PLUGIN = REPO / "plugins" / "pstorage.py"
INSTALLED_PLUGIN = Path("/usr/local/lib/pstorage/plugins/pstorage.py")  # scripts/install


def plugin_path() -> str:
    env = os.environ.get("PSTORAGE_PLUGIN")
    for p in (Path(env) if env else None, DEFAULT_PLUGIN, INSTALLED_PLUGIN):
        if p is not None and p.is_file():
            return str(p)
    raise ToolFailed("the nbdkit plugin pstorage.py was not found", "set PSTORAGE_PLUGIN")


@dataclass(slots=True)
class ExportState:
    name: str
    socket: str
    uri: str
    pid: int
    readonly: bool = False
    tcp: str | None = None  # "ADDR:PORT" when also served on TCP
    tcp_pid: int = 0
    tls: str | None = None  # "psk" | "certificates": the TCP server requires TLS
    allow: list[str] = field(default_factory=list)  # client addresses the TCP server accepts
    by_attach: bool = False  # started by attach: stopped again by detach
    device: str | None = None  # /dev/loopN or /dev/nbdN when attached
    link: str | None = None  # its stable name, /dev/pstorage/NAME
    method: str | None = None  # "nbdfuse+loop" | "nbd"
    fuse_pid: int = 0
    fuse_dir: str | None = None
    extra: dict = field(default_factory=dict)


def _run(cmd: list[str], timeout: float = 60) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise ToolFailed(f"{cmd[0]} is not installed", "run scripts/setup") from None
    if p.returncode != 0:
        raise ToolFailed(f"{' '.join(cmd)} failed: {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout


def _read_pid(path: str) -> int:
    try:
        return int(Path(path).read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def kernel_has_nbd() -> bool:
    if os.path.isdir("/sys/module/nbd"):
        return True
    if shutil.which("modprobe") is None:
        return False
    return subprocess.run(["modprobe", "-q", "nbd"], capture_output=True).returncode == 0 and (
        os.path.isdir("/sys/module/nbd")
    )


def _tls_options(psk: str | None, certificates: str | None) -> list[str]:
    if psk and certificates:
        raise InvalidArgument("give a TLS PSK file or a certificates directory, not both")
    if psk:
        if not os.path.isfile(psk):
            raise InvalidArgument(f"TLS PSK file {psk} does not exist",
                                  "create it: psktool -u USER -p FILE (lines of user:hexkey)")
        if os.stat(psk).st_mode & 0o077:
            raise InvalidArgument(f"TLS PSK file {psk} is readable by others", f"chmod 600 {psk}")
        return ["--tls=require", f"--tls-psk={psk}"]
    if certificates:
        if not os.path.isfile(os.path.join(certificates, "server-cert.pem")):
            raise InvalidArgument(f"{certificates} has no server-cert.pem",
                                  "it needs ca-cert.pem, server-cert.pem and server-key.pem")
        return ["--tls=require", f"--tls-certificates={certificates}"]
    return []


def _allow_list(allow: list[str] | None) -> list[str]:
    import ipaddress

    out = []
    for a in allow or []:
        try:
            out.append(str(ipaddress.ip_network(a.strip(), strict=False)))
        except ValueError:
            raise InvalidArgument(f"invalid client address {a!r} in the allow-list",
                                  "use addresses or CIDR blocks: 10.0.0.5, 10.0.0.0/24, ::1") from None
    return out


def _check_port_free(tcp: str, addr: str, port: int) -> None:
    """A port something else holds (another export, another program) is a
    conflict for the caller to resolve, not a failure of nbdkit to report as 500."""
    import socket

    try:
        infos = socket.getaddrinfo(addr or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError):
        return  # nbdkit says what is wrong with the address
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as nbdkit does
            try:
                s.bind(sockaddr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise Conflict(f"TCP {tcp} is in use", "choose another port, or unexport "
                                   "the volume served there") from None


class ExportManager:
    """Owns RUN_DIR/exports; every method is blocking (run it in a thread)."""

    def __init__(self, run_dir: str, data_socket: str, fuse_dir: str | None = None) -> None:
        self.dir = os.path.join(run_dir, "exports")
        self.data_socket = data_socket
        # the daemon's own FUSE mount of the volumes: attach puts loop devices
        # on its files instead of starting nbdkit + nbdfuse
        self.fuse_dir = fuse_dir
        os.makedirs(self.dir, exist_ok=True)
        self.states: dict[str, ExportState] = {}
        for name in sorted(os.listdir(self.dir)):
            st = self._load(name)
            if st is not None:
                self.states[name] = st

    # state files -------------------------------------------------------------
    def _vdir(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _load(self, name: str) -> ExportState | None:
        try:
            st = ExportState(**json.loads(Path(self._vdir(name), "state.json").read_text()))
        except (OSError, ValueError, TypeError):
            shutil.rmtree(self._vdir(name), ignore_errors=True)
            return None
        if self._dead(st):
            log.warning("export %s: nbdkit (pid %d) is gone; forgetting it", name, st.pid)
            self._cleanup_attach(st, force=True)
            shutil.rmtree(self._vdir(name), ignore_errors=True)
            return None
        return st

    def _save(self, st: ExportState) -> None:
        p = Path(self._vdir(st.name), "state.json")
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(st)))
        os.replace(tmp, p)

    @staticmethod
    def _dead(st: ExportState) -> bool:
        if st.method == "fuse+loop" and not st.pid:  # no nbdkit: the loop device is the state
            return not (st.device and os.path.exists(f"/sys/block/{os.path.basename(st.device)}/loop"))
        return not alive(st.pid)

    # exports -----------------------------------------------------------------
    def get(self, name: str) -> ExportState | None:
        return self.states.get(name)

    def _forget_if_dead(self, name: str) -> None:
        """nbdkit died under an export (killed, crashed): clear what is left of it."""
        st = self.states.get(name)
        if st is not None and self._dead(st):
            log.warning("export %s: nbdkit (pid %d) died; cleaning up", name, st.pid)
            self._cleanup_attach(st, force=True)
            terminate(st.tcp_pid)
            shutil.rmtree(self._vdir(name), ignore_errors=True)
            del self.states[name]

    def export(self, name: str, *, readonly: bool = False, tcp: str | None = None,
               by_attach: bool = False, tls_psk: str | None = None,
               tls_certificates: str | None = None, allow: list[str] | None = None
               ) -> ExportState:
        """Serve a volume on a unix socket, and on TCP when `tcp` is given.

        TCP can require TLS (a PSK file of 'user:hexkey' lines, or a
        certificates directory: nbdkit --tls=require) and accept only clients
        from `allow` (addresses or CIDR blocks: nbdkit's ip filter, the rest
        denied).
        """
        tls_opts = _tls_options(tls_psk, tls_certificates)
        allow = _allow_list(allow)
        if (tls_opts or allow) and not tcp:
            raise InvalidArgument("TLS and allow-lists apply to TCP exports", "add --tcp ADDR:PORT")
        self._forget_if_dead(name)
        st = self.states.get(name)
        if st is not None:
            if tcp and not st.tcp:
                self._start_tcp(st, tcp, tls_opts, allow)
                self._save(st)
            elif tcp and (tcp != st.tcp or allow != st.allow or bool(tls_opts) != bool(st.tls)):
                raise Conflict(f"{name} is already served on TCP {st.tcp} with other settings",
                               "unexport it first")
            if st.by_attach and not by_attach:
                # explicitly exported now: detach leaves it running, also after a restart
                st.by_attach = False
                self._save(st)
            return st
        vdir = self._vdir(name)
        os.makedirs(vdir, exist_ok=True)
        sock = os.path.join(vdir, "nbd.sock")
        pidfile = os.path.join(vdir, "nbdkit.pid")
        for p in (sock, pidfile):
            if os.path.exists(p):
                os.unlink(p)
        cmd = ["nbdkit", "--unix", sock, "--pidfile", pidfile, *(["-r"] if readonly else []),
               "python", plugin_path(), f"socket={self.data_socket}", f"export={name}"]
        # nbdkit forks into the background once it listens; its parent exits.
        _run(cmd)
        wait_for(lambda: _read_pid(pidfile) > 0 and os.path.exists(sock), 10, "nbdkit")
        st = ExportState(name, sock, f"nbd+unix:///{name}?socket={sock}", _read_pid(pidfile),
                         readonly=readonly, by_attach=by_attach)
        if tcp:
            try:
                self._start_tcp(st, tcp, tls_opts, allow)
            except PStorageError:
                terminate(st.pid)
                shutil.rmtree(vdir, ignore_errors=True)
                raise
        self.states[name] = st
        self._save(st)
        log.info("export %s: nbdkit pid %d serving %s", name, st.pid, st.uri)
        return st

    def _start_tcp(self, st: ExportState, tcp: str, tls_opts: list[str] | None = None,
                   allow: list[str] | None = None) -> None:
        addr, _, port = tcp.rpartition(":")
        if not port.isdigit():
            raise InvalidArgument(f"bad TCP address {tcp!r}", "write it as ADDR:PORT, e.g. 127.0.0.1:10809")
        _check_port_free(tcp, addr.strip("[]"), int(port))
        pidfile = os.path.join(self._vdir(st.name), "nbdkit-tcp.pid")
        serve = [*(["-r"] if st.readonly else []), *(tls_opts or []),
                 "python", plugin_path(), f"socket={self.data_socket}", f"export={st.name}"]
        if allow:
            # our gate accepts, checks the address, and hands the socket to an
            # `nbdkit -s` per client (tcp_gate.py says why not nbdkit's ip filter)
            logf = os.path.join(self._vdir(st.name), "tcp_gate.log")
            with open(logf, "ab") as lf:
                gate = subprocess.Popen(
                    [sys.executable, "-m", "pstoraged.frontends.tcp_gate", "--listen", tcp,
                     "--allow", ",".join(allow), "--pidfile", pidfile, "--", "nbdkit", "-s",
                     *serve],
                    stdin=subprocess.DEVNULL, stdout=lf, stderr=lf, start_new_session=True,
                    cwd="/", env={**os.environ, "PYTHONPATH": str(REPO)})
            try:
                wait_for(lambda: _read_pid(pidfile) > 0 or gate.poll() is not None, 10,
                          "the TCP gate")
            finally:
                if gate.poll() is not None:
                    raise ToolFailed(f"cannot serve {st.name} on {tcp}: "
                                     + Path(logf).read_text(errors="replace").strip()[-400:])
        else:
            cmd = ["nbdkit", "--port", port, *(["--ipaddr", addr.strip("[]")] if addr else []),
                   "--pidfile", pidfile, *serve]
            _run(cmd)
            wait_for(lambda: _read_pid(pidfile) > 0, 10, "nbdkit (tcp)")
        st.tcp, st.tcp_pid = tcp, _read_pid(pidfile)
        st.tls = None if not tls_opts else ("psk" if any("psk" in o for o in tls_opts)
                                            else "certificates")
        st.allow = list(allow or [])
        if not tls_opts:
            log.warning("export %s: TCP %s without TLS: anyone who reaches it can read%s the volume",
                        st.name, tcp, "" if st.readonly else " and write")

    def unexport(self, name: str, *, force: bool = False) -> None:
        st = self.states.get(name)
        if st is None:
            raise NotFound(f"{_what(name)} {name!r} is not exported")
        if st.device and not force:
            raise Conflict(f"{_what(name)} {name!r} is attached as {st.device}", "detach it first")
        self._cleanup_attach(st, force=force)
        for pid in (st.pid, st.tcp_pid):
            terminate(pid)
        shutil.rmtree(self._vdir(name), ignore_errors=True)
        del self.states[name]
        log.info("export %s: stopped", name)

    # attach ------------------------------------------------------------------
    def attach(self, name: str, *, readonly: bool = False) -> ExportState:
        """A block device for a volume, or a read-only one for a snapshot ('VOL@SNAP')."""
        readonly = readonly or "@" in name
        self._forget_if_dead(name)
        st = self.states.get(name)
        if st is not None and st.device:
            return st
        # the daemon's FUSE mount holds volumes only: a snapshot goes through
        # nbdkit + nbdfuse, which also outlive a daemon restart
        if self.fuse_dir and "@" not in name:
            return self._attach_fuse(name, st)
        if st is None:
            st = self.export(name, readonly=readonly, by_attach=True)
        try:
            if kernel_has_nbd() and shutil.which("nbd-client"):
                self._attach_nbd(st)
            else:
                self._attach_fuse_loop(st)
        except BaseException:
            self._cleanup_attach(st, force=True)
            if st.by_attach:
                self.unexport(name, force=True)
            raise
        st.link = _link(name, st.device)
        self._save(st)
        log.info("attach %s: %s via %s, %s", name, st.device, st.method, st.link)
        return st

    def _attach_nbd(self, st: ExportState) -> None:
        # Kernel NBD client. Not exercised on machines without the nbd module.
        for i in range(64):
            dev = f"/dev/nbd{i}"
            if os.path.exists(dev) and not os.path.exists(f"/sys/block/nbd{i}/pid"):
                _run(["nbd-client", "-unix", st.socket, "-N", st.name, "-b", "4096",
                      "-C", "4", *(["-readonly"] if st.readonly else []), dev])
                st.device, st.method = dev, "nbd"
                wait_for_block_device(dev)
                return
        raise ToolFailed("no free /dev/nbdN device")

    def _attach_fuse_loop(self, st: ExportState) -> None:
        for tool in ("nbdfuse", "losetup", "fusermount3"):
            if shutil.which(tool) is None:
                raise ToolFailed(f"{tool} is not installed", "run scripts/setup")
        fdir = os.path.join(self._vdir(st.name), "fuse")
        os.makedirs(fdir, exist_ok=True)
        pidfile = os.path.join(self._vdir(st.name), "nbdfuse.pid")
        if os.path.exists(pidfile):
            os.unlink(pidfile)
        log_path = os.path.join(self._vdir(st.name), "nbdfuse.log")
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(
                ["nbdfuse", "-P", pidfile, "-C", "4", *(["-r"] if st.readonly else []),
                 os.path.join(fdir, st.name), st.uri],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True,
            )
        st.fuse_dir = fdir
        try:
            wait_for(lambda: _read_pid(pidfile) > 0 or proc.poll() is not None, 15, "nbdfuse")
        finally:
            st.fuse_pid = proc.pid
        if proc.poll() is not None:
            raise ToolFailed(f"nbdfuse exited: {Path(log_path).read_text()[-500:]}")
        dev = _run(["losetup", "--direct-io=on", "--sector-size", "4096", "--show", "-f",
                    *(["-r"] if st.readonly else []), os.path.join(fdir, st.name)]).strip()
        st.device, st.method = dev, "nbdfuse+loop"
        wait_for_block_device(dev)
        dio = Path(f"/sys/block/{os.path.basename(dev)}/loop/dio")
        if dio.exists() and dio.read_text().strip() != "1":
            log.warning("attach %s: %s runs without direct I/O (page cache doubled)", st.name, dev)

    def detach(self, name: str, *, force: bool = False) -> None:
        st = self.states.get(name)
        if st is None or not st.device:
            raise NotFound(f"{_what(name)} {name!r} is not attached")
        holders = mounted_on(st.device)
        if holders and not force:
            raise Conflict(f"{st.device} is mounted on {', '.join(holders)}", "unmount it first")
        self._cleanup_attach(st, force=force)
        if st.by_attach:
            self.unexport(name, force=True)
        else:
            self._save(st)

    def _attach_fuse(self, name: str, st: ExportState | None) -> ExportState:
        """A loop device (direct I/O) on the daemon's FUSE file of the volume."""
        assert self.fuse_dir is not None
        dev = attach_loop(self.fuse_dir, name)
        if st is None:  # attached only: no nbdkit behind it
            st = ExportState(name, "", "", 0, by_attach=True)
            os.makedirs(self._vdir(name), exist_ok=True)
            self.states[name] = st
        st.device, st.method = dev, "fuse+loop"
        st.link = _link(name, dev)
        self._save(st)
        log.info("attach %s: %s via the FUSE front end, %s", name, dev, st.link)
        return st

    def grow_device(self, name: str, size: int) -> str | None:
        """After the volume grew: make its attached device `size` bytes long.

        None when it is (or nothing is attached); else why not and what to do.
        The daemon's FUSE file has the new size once the kernel's cached
        attributes are dropped (FuseFrontEnd.invalidate, done by the caller);
        LOOP_SET_CAPACITY (losetup -c) then has the loop device read it again.
        nbdfuse reads an export's size once, when it connects (and the NBD
        protocol has no resize notice), so its device keeps the old size.
        """
        st = self.states.get(name)
        if st is None or not st.device:
            return None
        dev = st.device
        why = f"{'nbdfuse' if st.method == 'nbdfuse+loop' else 'the kernel nbd client'} " \
              "learns an export's size only when it connects"
        if st.method == "fuse+loop" and self.fuse_dir:
            try:
                os.stat(os.path.join(self.fuse_dir, name))  # the kernel fetches the new size
                _run(["losetup", "-c", dev])
            except (OSError, ToolFailed) as e:
                log.warning("attach %s: cannot grow %s: %s", name, dev, e)
                why = f"growing it failed ({e})"
            else:
                if device_size(dev) == size:
                    log.info("attach %s: %s grown to %d bytes", name, dev, size)
                    return None
                why = "the loop device did not take the new size"
        return (f"{dev} keeps its old size ({device_size(dev)} bytes): {why}. To use the new "
                f"size: unmount it, 'pstorage detach {name}', 'pstorage attach {name}', mount it "
                "again, then grow the file system (xfs_growfs MOUNTPOINT, resize2fs DEVICE)")

    def _cleanup_attach(self, st: ExportState, *, force: bool) -> None:
        _unlink(st.link, st.device)
        st.link = None
        if st.device and st.method == "fuse+loop":
            subprocess.run(["losetup", "-d", st.device], capture_output=True)
        if st.device and st.method == "nbdfuse+loop":
            subprocess.run(["losetup", "-d", st.device], capture_output=True)
        elif st.device and st.method == "nbd":
            subprocess.run(["nbd-client", "-d", st.device], capture_output=True)
        if st.fuse_dir:
            subprocess.run(["fusermount3", "-u", *(["-z"] if force else []), st.fuse_dir],
                           capture_output=True)
            wait_exit(st.fuse_pid, 10)
        st.device = st.method = st.fuse_dir = None
        st.fuse_pid = 0


def _what(name: str) -> str:
    return "snapshot" if "@" in name else "volume"


def _link(name: str, device: str | None) -> str | None:
    """/dev/pstorage/NAME -> the device. udev's rule (systemd/99-pstorage.rules)
    makes the same link where udevd runs; we make it ourselves so that it
    exists at once and also where udevd does not run (containers)."""
    if not device:
        return None
    link = os.path.join(dev_dir(), name)
    try:
        os.makedirs(dev_dir(), exist_ok=True)
        tmp = f"{link}.tmp{os.getpid()}"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(device, tmp)
        os.replace(tmp, link)
    except OSError as e:
        log.warning("cannot create %s: %s", link, e)
        return None
    return link


def _unlink(link: str | None, device: str | None) -> None:
    if not link:
        return
    try:
        if os.readlink(link) == device:  # not one udev or a later attach made
            os.unlink(link)
    except OSError:
        pass


def mounted_on(dev: str) -> list[str]:
    """Mount points of `dev` (by device number, as /proc/self/mountinfo has it)."""
    try:
        rdev = os.stat(dev).st_rdev
    except OSError:
        return []
    want = f"{os.major(rdev)}:{os.minor(rdev)}"
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if parts[2] == want:
                out.append(parts[4])
    return out
