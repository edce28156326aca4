"""Processes and /proc figures for the benchmarks: running tools, CPU and
memory of the measured processes, mounts, the machine's description."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pstoraged.engine.units import human_bytes as fmt_size

REPO = Path(__file__).resolve().parent.parent
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")

__all__ = ["REPO", "KiB", "MiB", "GiB", "fmt_size", "log", "find_tool", "run", "wait_path",
           "rss_anon", "cpu_snapshot", "cpu_usage", "cmdline_mentions", "mounts_under",
           "machine_info", "loadavg"]


def log(msg: str = "") -> None:
    print(msg, flush=True)


def find_tool(name: str) -> str:
    """`name` next to this interpreter, then in the repo's .venv, then on PATH."""
    for d in (Path(sys.executable).parent, REPO / ".venv" / "bin"):
        p = d / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    p2 = shutil.which(name)
    if p2:
        return p2
    sys.exit(f"bench: {name} not found next to {sys.executable}, in {REPO}/.venv/bin or on "
             f"PATH (run scripts/setup)")


def run(cmd: list[str], timeout: float = 120, env: dict | None = None) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): "
                           f"{(p.stderr or p.stdout).strip()[-800:]}")
    return p.stdout


def wait_path(path: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{Path(str(proc.args[0])).name} exited with {proc.returncode} "  # type: ignore[index]
                               f"before creating {path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {path}")
        time.sleep(0.05)


def rss_anon(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * KiB
    except OSError:
        return None
    return None


def _ticks(stat_path: str) -> int:
    """utime + stime of one process or thread, in clock ticks."""
    fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def cpu_snapshot(pid: int) -> tuple[int, dict[str, int]] | None:
    """(process ticks, ticks per thread) of a process, or None if it is gone."""
    try:
        threads = {}
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                threads[t] = _ticks(f"/proc/{pid}/task/{t}/stat")
            except OSError:
                pass
        return _ticks(f"/proc/{pid}/stat"), threads
    except OSError:
        return None


def cpu_usage(before: dict, after: dict, seconds: float) -> dict:
    """CPU use in % of one core per watched process, plus its busiest thread."""
    out: dict = {}
    for name, b in before.items():
        a = after.get(name)
        if not (a and b) or seconds <= 0:
            continue
        out[name] = round(100 * (a[0] - b[0]) / CLK_TCK / seconds, 1)
        busiest = max((a[1][t] - b[1].get(t, 0) for t in a[1]), default=0)
        if name == "pstoraged":  # long-lived threads: the busiest one is the engine's
            out[name + "_busiest_thread"] = round(100 * busiest / CLK_TCK / seconds, 1)
    return out


def cmdline_mentions(pid: int, text: str) -> bool:
    try:
        return text in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False


def mounts_under(path: str) -> list[str]:
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4]
                if mp == path or mp.startswith(path.rstrip("/") + "/"):
                    out.append(mp)
    except OSError:
        pass
    return out


def loadavg() -> list[str]:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg writes them."""
    return Path("/proc/loadavg").read_text().split()[:3]


def machine_info() -> dict:
    info: dict = {"cpus": os.cpu_count(), "kernel": platform.release()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory"] = fmt_size(int(line.split()[1]) * KiB)
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                info["os"] = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    for tool, args in (("fio", ["--version"]), ("nbdkit", ["--version"]), ("nbdfuse", ["--version"])):
        try:
            info[tool] = run([tool, *args], timeout=10).splitlines()[0].strip()
        except (OSError, RuntimeError, subprocess.TimeoutExpired, IndexError):
            info[tool] = None
    info["python"] = platform.python_version()
    try:  # which daemon code was measured
        rev = run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], timeout=10).strip()
        dirty = run(["git", "-C", str(REPO), "status", "--porcelain", "--", "pstoraged", "plugins"],
                    timeout=10).strip()
        info["revision"] = rev + ("+uncommitted changes" if dirty else "")
    except (OSError, RuntimeError, subprocess.TimeoutExpired):
        info["revision"] = None
    return info
