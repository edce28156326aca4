"""Finding pools by their superblock: which devices and files hold which pool.

A pool is known by the UUID (and label) in its superblock, never by a device
path: NVMe and loop names change between boots and hosts. `pool import`, a
daemon started with `--pool UUID|LABEL`, and opening a pool whose device
moved all come here. Only superblocks are read (4 KiB at offset 0, then the
backup at 64 KiB), read-only; nothing is opened for writing.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass

from ..errors import CorruptData, FormatError, InvalidArgument, NotFound
from .format import SUPERBLOCK_OFFSETS, Superblock

log = logging.getLogger(__name__)

SYS_BLOCK = "/sys/class/block"


@dataclass(frozen=True, slots=True)
class Found:
    path: str
    sb: Superblock

    @property
    def uuid(self) -> str:
        return self.sb.uuid.hex()


def probe(path: str) -> Superblock | None:
    """The pool superblock on `path`, or None (no pool, unreadable, not a device or file)."""
    try:
        st = os.stat(path)
        if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        for off in SUPERBLOCK_OFFSETS:
            try:
                buf = os.pread(fd, Superblock.STRUCT.size, off)
                return Superblock.from_buffer(buf)
            except (CorruptData, FormatError, OSError):
                continue
        return None
    finally:
        os.close(fd)


def _block_devices() -> list[str]:
    """Every block device node with a size: disks, partitions, loops, NVMe namespaces."""
    out: list[str] = []
    try:
        names = sorted(os.listdir(SYS_BLOCK))
    except OSError:
        return out
    for name in names:
        try:
            with open(f"{SYS_BLOCK}/{name}/size") as f:
                if int(f.read().strip() or 0) == 0:
                    continue
        except (OSError, ValueError):
            continue
        if name.startswith(("ram", "zram", "nbd")) or _served_by_fuse(name):
            continue
        node = f"/dev/{name}"
        if os.path.exists(node):
            out.append(node)
    return out


def _served_by_fuse(name: str) -> bool:
    """A loop device over a file in a FUSE mount (a PStorage volume attached
    through the daemon's FUSE front end or nbdfuse). Reading it could wait
    forever: its server may be this very daemon, still starting. Such devices
    (and nbd devices, for the same reason) are never scanned; name one with
    --device to look at it anyway."""
    if not name.startswith("loop"):
        return False
    try:
        with open(f"{SYS_BLOCK}/{name}/loop/backing_file") as f:
            backing = f.read().strip().removesuffix(" (deleted)")
    except OSError:
        return False
    from .devices import fstype  # (devices.py imports pyudev: only loops need it)

    try:
        return fstype(backing).startswith("fuse")
    except OSError:
        return True


def _expand(search: list[str]) -> list[str]:
    out = []
    for p in search:
        if os.path.isdir(p):
            for n in sorted(os.listdir(p)):
                out.append(os.path.join(p, n))
        else:
            out.append(p)
    return out


def scan(search: list[str] | None = None) -> list[Found]:
    """Pools on the given devices, files or directories of them; without
    `search`, on every block device of this host."""
    paths = _expand(search) if search else _block_devices()
    found = []
    for p in paths:
        sb = probe(p)
        if sb is not None:
            found.append(Found(os.path.abspath(p), sb))
    return found


def name_matches(uuid_hex: str, label: str, name: str) -> bool:
    """`name` is the pool's UUID (with or without dashes), a unique prefix of
    at least 8 hex digits, or its label."""
    key = name.replace("-", "").lower()
    return (len(key) >= 8 and uuid_hex.startswith(key)) or (bool(label) and label == name)


def matches(f: Found, name: str) -> bool:
    return name_matches(f.uuid, f.sb.label, name)


def find(name: str, search: list[str] | None = None, *, prefer: str | None = None) -> Found:
    """The one device holding pool `name`. Several copies of one pool (a
    block-level copy, the same file through a loop device) are refused unless
    `prefer` is one of them: choosing silently could open a stale copy."""
    if prefer:
        sb = probe(prefer)
        if sb is not None and matches(Found(prefer, sb), name):
            return Found(os.path.abspath(prefer), sb)
    hits = [f for f in scan(search) if matches(f, name)]
    if not hits:
        where = ", ".join(search) if search else "this host's block devices"
        raise NotFound(f"no pool {name!r} on {where}",
                       "attach its device, or name the device or directory with --device")
    uuids = {f.uuid for f in hits}
    if len(uuids) > 1:
        raise InvalidArgument(f"{name!r} names several pools ({', '.join(sorted(uuids))})",
                              "use the full UUID")
    if len(hits) > 1:
        raise InvalidArgument(
            f"pool {hits[0].uuid} is on several devices: {', '.join(f.path for f in hits)}",
            "name the one to use with --device (the others are copies)")
    return hits[0]
