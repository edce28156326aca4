"""What the benchmarks run against, each with start and stop.

PStorage: a private pstoraged on a sparse pool file in the run's temporary
directory, driven through the `pstorage` CLI (volumes, exports, attach).
Nbdkit: a baseline nbdkit on a unix socket (the C file plugin, or the
pass-through Python plugin scripts/bench_passthrough.py). FuseAttachment:
nbdfuse + a loop device with direct I/O on an NBD URI, as `pstorage attach`
builds it, for the baselines. Used by bench.py, memory.py and space.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from pstoraged.frontends.processes import alive, terminate

from .system import cmdline_mentions, find_tool, log, run, wait_path

PASSTHROUGH = Path(__file__).resolve().parent.parent / "scripts" / "bench_passthrough.py"


class PStorage:
    """A pstoraged of this run. Problems it shows (died, no clean stop) are
    appended to `problems`; `cli_timeout` is the default for CLI calls."""

    def __init__(self, tmp: str, pool_size: str, *, segment_size: str = "4M",
                 config: str | None = None, problems: list[str] | None = None,
                 cli_timeout: float = 120) -> None:
        self.tmp = tmp
        self.pool_size, self.segment_size, self.config = pool_size, segment_size, config
        self.problems = problems if problems is not None else []
        self.cli_timeout = cli_timeout
        self.pstoraged, self.pstorage = find_tool("pstoraged"), find_tool("pstorage")
        self.pool_dir, self.run_dir = os.path.join(tmp, "pool"), os.path.join(tmp, "run")
        self.env = dict(os.environ, PSTORAGE_CONTROL=os.path.join(self.run_dir, "control.sock"))
        self.proc: subprocess.Popen | None = None
        self.log_path = ""  # set once the daemon is started
        self.exported: list[str] = []
        self.attached: list[str] = []
        self.dead = False

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    # ------------------------------------------------------------- start, CLI
    def start(self) -> None:
        """Create the pool and start the daemon; return once its API answers."""
        os.makedirs(self.tmp, exist_ok=True)
        run([self.pstorage, "pool", "create", "--dir", self.pool_dir, "--device",
             os.path.join(self.pool_dir, "pool.img"), "--size", self.pool_size,
             "--segment-size", self.segment_size], timeout=300)
        self.log_path = os.path.join(self.tmp, "pstoraged.log")
        cmd = [self.pstoraged, "--pool-dir", self.pool_dir, "--run-dir", self.run_dir]
        if self.config is not None:
            path = os.path.join(self.tmp, "pstoraged.toml")
            Path(path).write_text(self.config)
            cmd += ["--config", path]
        with open(self.log_path, "ab") as lf:
            # own session: Ctrl-C reaches the bench, which then detaches and
            # stops the daemon in order
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf,
                                         start_new_session=True)
        wait_path(self.env["PSTORAGE_CONTROL"], 30, self.proc)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.cli("volume", "list", timeout=10)
                break
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("pstoraged did not come up:\n" + self.log_tail()) from None
                time.sleep(0.2)

    def cli(self, *argv: str, timeout: float | None = None) -> dict:
        out = run([self.pstorage, "--json", *argv], timeout=timeout or self.cli_timeout,
                  env=self.env)
        return json.loads(out) if out.strip() else {}

    def export(self, name: str) -> str:
        """Export `name` on a unix socket; its NBD URI."""
        uri = self.cli("export", name)["uri"]
        self.exported.append(name)
        return uri

    def unexport(self, name: str) -> None:
        self.cli("unexport", name)
        self.exported.remove(name)

    def attach(self, name: str) -> str:
        """Attach `name` as a block device; its path."""
        dev = self.cli("attach", name, timeout=120)["device"]
        self.attached.append(name)
        return dev

    def state_pid(self, name: str, key: str = "pid") -> int:
        """A pid the daemon recorded for export `name` (nbdkit, or fuse_pid for nbdfuse)."""
        try:
            return int(json.loads(Path(self.run_dir, "exports", name, "state.json")
                                  .read_text())[key])
        except (OSError, ValueError, KeyError):
            return 0

    # ---------------------------------------------------------------- health
    def ok(self) -> bool:
        """Still running; the first time it is found dead, say so."""
        if self.proc is None or self.dead:
            return False
        if self.proc.poll() is not None:
            self.dead = True
            msg = f"pstoraged exited with status {self.proc.returncode} during the run"
            self.problems.append(msg)
            log(f"!! {msg}; last log lines:\n{self.log_tail()}")
            return False
        return True

    def read_log(self) -> list[str]:
        if not self.log_path:
            return []
        try:
            return Path(self.log_path).read_text(errors="replace").splitlines()
        except OSError:
            return []

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no daemon log)"

    # ------------------------------------------------------------------ stop
    def unexport_all(self) -> None:
        """Unexport every volume, whoever exported it."""
        for v in self.cli("volume", "list"):
            try:
                self.cli("unexport", v["name"], "--force")
            except RuntimeError:
                pass

    def stop(self) -> None:
        """Detach and unexport what this run set up, stop the daemon with
        SIGTERM (a problem if it does not log a clean stop), then clear what
        its exports left behind if it could not."""
        up = self.proc is not None and self.proc.poll() is None
        for name in list(self.attached):
            try:
                if up:
                    self.cli("detach", name, "--force", timeout=60)
                self.attached.remove(name)
            except Exception as e:  # noqa: BLE001 - keep cleaning
                log(f"  detach {name}: {e}")
        for name in list(self.exported):
            try:
                if up:
                    self.cli("unexport", name, "--force", timeout=60)
                self.exported.remove(name)
            except Exception as e:  # noqa: BLE001
                log(f"  unexport {name}: {e}")
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                msg = "pstoraged did not stop within 120 s of SIGTERM; killed"
                self.problems.append(msg)
                log(f"  {msg}")
                self.proc.kill()
                self.proc.wait()
            if "stopped cleanly" not in self.log_tail(5):
                msg = f"pstoraged did not log a clean stop (exit status {self.proc.returncode})"
                self.problems.append(msg)
                log(f"  {msg}:\n{self.log_tail(10)}")
        self._clear_export_leftovers()

    def _clear_export_leftovers(self) -> None:
        """Whatever the daemon's exports left behind (daemon crashed or was stuck)."""
        edir = Path(self.run_dir, "exports")
        if not edir.is_dir():
            return
        for sf in edir.glob("*/state.json"):
            try:
                st = json.loads(sf.read_text())
            except (OSError, ValueError):
                continue
            if st.get("device") and st.get("method") == "nbdfuse+loop":
                subprocess.run(["losetup", "-d", st["device"]], capture_output=True)
            if st.get("fuse_dir"):
                subprocess.run(["fusermount3", "-u", "-z", st["fuse_dir"]], capture_output=True)
            for key in ("fuse_pid", "pid", "tcp_pid"):
                pid = int(st.get(key) or 0)
                # only processes of this run: their command lines name our directory
                if alive(pid) and cmdline_mentions(pid, self.tmp):
                    terminate(pid, 5)
            log(f"  cleaned up export leftovers of {sf.parent.name}")


class Nbdkit:
    """A baseline nbdkit on a unix socket: the C `file` plugin or the
    pass-through Python plugin, on a sparse file of `size` bytes."""

    def __init__(self, tmp: str, name: str) -> None:
        self.tmp, self.name = tmp, name
        self.proc: subprocess.Popen | None = None
        self.uri = ""

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def start(self, size: int) -> str:
        img = os.path.join(self.tmp, f"{self.name}.img")
        with open(img, "wb") as f:
            f.truncate(size)  # sparse
        plugin = (["file", img] if self.name == "file"
                  else ["python", str(PASSTHROUGH), f"file={img}"])
        sock = os.path.join(self.tmp, f"{self.name}.sock")
        with open(os.path.join(self.tmp, f"nbdkit-{self.name}.log"), "ab") as logf:
            self.proc = subprocess.Popen(["nbdkit", "-f", "-U", sock, *plugin],
                                         stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                         start_new_session=True)
        wait_path(sock, 30, self.proc)
        self.uri = f"nbd+unix:///?socket={sock}"
        return self.uri

    def stop(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class FuseAttachment:
    """nbdfuse + loop with direct I/O on an NBD URI, as `pstorage attach` does it."""

    def __init__(self, tmp: str, name: str) -> None:
        self.tmp, self.name = tmp, name
        self.dir = os.path.join(tmp, f"fuse-{name}")
        self.proc: subprocess.Popen | None = None
        self.device: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def start(self, uri: str) -> str:
        os.makedirs(self.dir, exist_ok=True)
        pidfile = os.path.join(self.tmp, f"nbdfuse-{self.name}.pid")
        with open(os.path.join(self.tmp, f"nbdfuse-{self.name}.log"), "ab") as logf:
            self.proc = subprocess.Popen(
                ["nbdfuse", "-P", pidfile, "-C", "4", os.path.join(self.dir, self.name), uri],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
        wait_path(pidfile, 15, self.proc)
        self.device = run(["losetup", "--direct-io=on", "--sector-size", "4096", "--show", "-f",
                           os.path.join(self.dir, self.name)]).strip()
        return self.device

    def stop(self) -> None:
        if self.device:
            subprocess.run(["losetup", "-d", self.device], capture_output=True)
        subprocess.run(["fusermount3", "-u", "-z", self.dir], capture_output=True)
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
