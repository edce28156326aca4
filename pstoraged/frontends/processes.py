"""Is a process still running, wait for it to end, stop it.

Used by exports.py for the nbdkit and nbdfuse processes it starts (which are
not its children once they have forked into the background), and by the
benchmarks (benchmarks/) for what they start and what a daemon left behind.
A zombie counts as gone: where PID 1 does not reap (containers, this project's
VMs), a dead nbdkit stays a zombie indefinitely.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def alive(pid: int) -> bool:
    """Is `pid` a running process? A zombie is not (PID 1 may not reap it soon)."""
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_exit(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` s for `pid` to end (reaping it if it is our child)."""
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() >= deadline:
            return False
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    return True


def terminate(pid: int, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if `pid` has not ended within `timeout` s."""
    if not alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    if not wait_exit(pid, timeout):
        os.kill(pid, signal.SIGKILL)
