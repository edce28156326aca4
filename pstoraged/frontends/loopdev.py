"""Block devices the front ends make: loop devices over files (the daemon's
FUSE files, nbdfuse's export file), waiting for a device to appear, its size.

One home for these, so that the FUSE front end and the export manager both
use them without importing each other.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

from ..errors import NotFound, ToolFailed

log = logging.getLogger(__name__)


def wait_for(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise ToolFailed(f"timed out waiting for {what}")
        time.sleep(0.05)


def wait_for_block_device(dev: str, timeout: float = 15.0) -> None:
    """Wait until `dev` exists with a non-zero size, woken by udev/kernel events."""
    name = os.path.basename(dev)

    def ready() -> bool:
        try:
            return os.path.exists(dev) and int(Path(f"/sys/class/block/{name}/size").read_text()) > 0
        except (OSError, ValueError):
            return False

    if ready():
        return
    try:
        import pyudev

        ctx = pyudev.Context()
        # "kernel" events arrive even where udevd is not running (containers)
        mon = pyudev.Monitor.from_netlink(ctx, source="kernel")
        mon.filter_by("block")
        mon.start()
        deadline = time.monotonic() + timeout
        while not ready():
            left = deadline - time.monotonic()
            if left <= 0:
                raise ToolFailed(f"{dev} did not appear within {timeout:.0f} s")
            mon.poll(timeout=min(left, 0.2))  # an event, or re-check on the timeout
    except ImportError:
        wait_for(ready, timeout, dev)


def device_size(dev: str | None) -> int | None:
    """Size in bytes of a block device as the kernel sees it (sysfs counts 512-byte sectors)."""
    if not dev:
        return None
    try:
        return int(Path(f"/sys/class/block/{os.path.basename(dev)}/size").read_text()) * 512
    except (OSError, ValueError):
        return None


def loop_devices_on(path: str) -> list[str]:
    """Loop devices whose backing file lies under `path`."""
    out = []
    root = "/sys/block"
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        try:
            with open(f"{root}/{name}/loop/backing_file") as f:
                backing = f.read().strip()
        except OSError:
            continue
        if backing.startswith(path.rstrip("/") + "/"):
            out.append(f"/dev/{name}")
    return out


def loop_dio(dev: str) -> bool | None:
    """Does the loop device do direct I/O? None if the kernel does not say."""
    try:
        with open(f"/sys/block/{os.path.basename(dev)}/loop/dio") as f:
            return f.read().strip() == "1"
    except OSError:
        return None


def _tool(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise ToolFailed(f"{cmd[0]} is not installed", "run scripts/setup") from None
    if p.returncode:
        raise ToolFailed(f"{' '.join(cmd)} failed: {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout


def attach_loop(mountpoint: str, name: str, *, require_dio: bool = True) -> str:
    """A loop device with direct I/O over MOUNT/NAME: '/dev/loopN' (blocking).

    Without direct I/O the loop device's dirty pages are written back through
    FUSE (memory-pressure deadlock risk, data cached twice): refused unless
    require_dio is False.
    """
    path = os.path.join(mountpoint, name)
    if not os.path.isfile(path):
        raise NotFound(f"no volume named {name!r} under {mountpoint}",
                       "see 'pstorage volume list'")
    # a read-only volume refuses O_RDWR with EROFS; losetup then attaches it read-only
    dev = _tool(["losetup", "--find", "--show", "--direct-io=on", "--sector-size", "4096",
                 path]).strip()
    wait_for_block_device(dev)
    if loop_dio(dev) is False:
        if require_dio:
            detach_loop(dev)
            raise ToolFailed(f"{dev} would run without direct I/O",
                             "the kernel refused --direct-io=on for a FUSE file")
        log.warning("attach %s: %s runs without direct I/O", name, dev)
    return dev


def detach_loop(dev: str) -> None:
    """losetup -d (blocking). A device still in use is detached when last closed."""
    _tool(["losetup", "-d", dev])
