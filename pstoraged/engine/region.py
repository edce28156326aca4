"""The metadata region: a window of the pool's own device that holds the
metadata store.

LMDB reads and writes a file from byte 0 and cannot be told to start at an
offset, so the region is presented to it as a block device of its own: a loop
device over the backing (file or block device) with the region's offset and
size, set up with one LOOP_CONFIGURE ioctl. The loop device is created with
autoclear, so the kernel removes it when the last user closes it, also after
kill -9; nothing about it outlives the process. LMDB opens it through a
symlink in the pool's runtime directory, which is also where LMDB's lock file
(reader table, rebuilt on open) lives.

Durability: LMDB's fdatasync on the loop device flushes the loop's writes and
then the backing file or device (REQ_PREFLUSH becomes an fsync of the
backing), so a metadata commit is on stable storage when it returns, exactly
as on a file system.

Called by pool.py (create/open); nothing else needs to know the loop device.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
import tempfile
import time

from ..errors import DeviceIOError

log = logging.getLogger(__name__)

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LOOP_CLR_FD = 0x4C01
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_DIRECT_IO = 16
# struct loop_config { u32 fd; u32 block_size; struct loop_info64 info; u64 reserved[8]; }
# loop_info64: device, inode, rdevice, offset, sizelimit (u64); number, encrypt_type,
# encrypt_key_size, flags (u32); file_name[64], crypt_name[64], encrypt_key[32]; init[2] (u64)
_LOOP_CONFIG = struct.Struct("<II" "QQQQQ" "IIII" "64s64s32s" "QQ" "64x")
assert _LOOP_CONFIG.size == 304

LINK_NAME = "meta.mdb"  # in the runtime directory; LMDB's lock file is meta.mdb-lock


class RegionDevice:
    """A loop device over [offset, offset + size) of `backing_path`, held open."""

    def __init__(self, backing_path: str, offset: int, size: int, *, readonly: bool = False,
                 node_dir: str = "/run") -> None:
        self.backing_path = backing_path
        self.node_dir = node_dir  # where to make the loop node if /dev has none (containers)
        self.offset = offset
        self.size = size
        self.fd = -1
        self.path = ""
        self.link_path = ""
        self.own_node = ""  # a node we made (no devtmpfs node in a container's /dev)
        src = os.open(backing_path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        try:
            # Direct I/O over a block device (the pool's own caches and the
            # loop's page cache are enough); buffered over a pool file, so the
            # file's page cache keeps the metadata warm across opens (each
            # open is a new loop device, whose own cache starts cold)
            dio = LO_FLAGS_DIRECT_IO if stat.S_ISBLK(os.fstat(src).st_mode) else 0
            flags = LO_FLAGS_AUTOCLEAR | dio | (LO_FLAGS_READ_ONLY if readonly else 0)
            name = os.path.basename(backing_path).encode()[:63]
            cfg = _LOOP_CONFIG.pack(src, 0, 0, 0, 0, offset, size, 0, 0, 0, flags, name, b"", b"",
                                    0, 0)
            self._attach(cfg, readonly)
        finally:
            os.close(src)  # the loop device holds its own reference to the backing

    def _attach(self, cfg: bytes, readonly: bool) -> None:
        try:
            ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise DeviceIOError(f"cannot open /dev/loop-control for the metadata region: "
                                f"{e.strerror}", "load the loop module (modprobe loop)") from e
        try:
            for _ in range(64):  # another process may take the free device first
                n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
                path = f"/dev/loop{n}"
                fd, path = self._open_node(path, readonly)
                try:
                    fcntl.ioctl(fd, LOOP_CONFIGURE, cfg)
                except OSError as e:
                    os.close(fd)
                    if e.errno == errno.EBUSY:
                        continue
                    raise DeviceIOError(f"cannot set up the metadata region on {path}: "
                                        f"{e.strerror}") from e
                self.fd, self.path = fd, path
                return
            raise DeviceIOError("no free loop device for the metadata region",
                                "detach unused loop devices (losetup -D)")
        finally:
            os.close(ctl)

    def _open_node(self, path: str, readonly: bool) -> tuple[int, str]:
        """Open the loop device's node; where /dev is a container's own and
        the kernel's new node never shows up in it, make one of our own."""
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        deadline = time.monotonic() + 2
        while True:  # devtmpfs creates the node right after GET_FREE
            try:
                return os.open(path, flags), path
            except FileNotFoundError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
        name = os.path.basename(path)
        try:
            with open(f"/sys/class/block/{name}/dev") as f:
                major, minor = (int(x) for x in f.read().split(":"))
        except (OSError, ValueError):
            raise DeviceIOError(f"{path} did not appear", "is /dev a devtmpfs?") from None
        own = os.path.join(self.node_dir, name)
        try:
            os.unlink(own)
        except FileNotFoundError:
            pass
        try:
            os.mknod(own, 0o600 | stat.S_IFBLK, os.makedev(major, minor))
            self.own_node = own
            return os.open(own, flags), own
        except OSError as e:
            raise DeviceIOError(f"{path} did not appear and {own} cannot be made: {e.strerror}",
                                "give the daemon loop devices (/dev/loop-control and block-loop)"
                                ) from e

    def link(self, runtime_dir: str) -> str:
        """Point `runtime_dir/meta.mdb` at the loop device; LMDB opens that path."""
        link = os.path.join(runtime_dir, LINK_NAME)
        tmp = link + ".new"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.symlink(self.path, tmp)
        os.replace(tmp, link)
        self.link_path = link
        return link

    def close(self) -> None:
        """Drop our hold; autoclear detaches the device once LMDB has closed it too."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.link_path:  # it would name a loop device that is gone or someone else's
            try:
                os.unlink(self.link_path)
            except FileNotFoundError:
                pass
            self.link_path = ""
        if self.own_node:
            try:
                os.unlink(self.own_node)
            except FileNotFoundError:
                pass
            self.own_node = ""


def empty_store_image(map_size: int) -> bytes:
    """The first pages of a new, empty LMDB environment.

    LMDB treats a file that reads back zeros as corrupt rather than new (only
    an empty file is new), so a fresh region is given the two meta pages of
    an empty environment, made in a scratch file."""
    import lmdb

    with tempfile.TemporaryDirectory(prefix="pstorage-meta-") as d:
        path = os.path.join(d, "empty.mdb")
        env = lmdb.open(path, subdir=False, map_size=map_size, max_dbs=16, lock=False)
        env.close()
        with open(path, "rb") as f:
            return f.read()
