"""The backing store: a block device (O_DIRECT, aligned I/O) or a regular file.

Everything above this module speaks in byte offsets; this module owns the
alignment rules, the exclusive lock and the translation of OSError into
DeviceIOError.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import stat
import struct

from ..errors import DeviceIOError, InvalidArgument, PoolLocked
from .format import ALIGN, align_down, align_up

BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_uint]
SYNC_FILE_RANGE_WRITE = 2


class Backing:
    """One open backing device or file, locked for the pool's sole owner."""

    def __init__(self, path: str, *, writable: bool = True, lock: bool = True) -> None:
        self.path = path
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise InvalidArgument(f"{path}: no such device or file") from None
        self.is_block = stat.S_ISBLK(st.st_mode)
        if not (self.is_block or stat.S_ISREG(st.st_mode)):
            raise InvalidArgument(f"{path}: neither a block device nor a regular file")
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        # Block devices bypass the page cache: the pool's own caches decide
        # what stays in memory, and fdatasync then has little to write back.
        self.direct = self.is_block
        if self.direct:
            flags |= os.O_DIRECT
        try:
            self.fd = os.open(path, flags)
        except OSError as e:
            raise DeviceIOError(f"{path}: cannot open: {e.strerror}") from e
        if lock:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self.fd)
                raise PoolLocked(
                    f"{path} is in use by another pstoraged",
                    "stop the other daemon first (systemctl stop pstoraged)",
                ) from None
        if self.is_block:
            buf = fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8)
            self.size = struct.unpack("<Q", buf)[0]
        else:
            self.size = st.st_size
        self._scratch = mmap.mmap(-1, 1 << 20)
        # Failed reads since open: a write error fails the pool (the engine
        # counts those), a read error only fails its request, so without this
        # count a dying device would look healthy (health.py reads it).
        self.read_errors = 0
        self.last_read_error: str | None = None  # e.g. "EIO at offset 4096"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self._scratch.close()

    def _buffer(self, n: int) -> mmap.mmap:
        if n > len(self._scratch):
            self._scratch.close()
            self._scratch = mmap.mmap(-1, align_up(n, 1 << 20))
        return self._scratch

    def pread(self, offset: int, length: int) -> bytes:
        """Read any byte range; aligned under the hood when O_DIRECT is on."""
        try:
            if not self.direct:
                data = os.pread(self.fd, length, offset)
            else:
                start = align_down(offset)
                end = align_up(offset + length)
                buf = self._buffer(end - start)
                n = os.preadv(self.fd, [memoryview(buf)[: end - start]], start)
                data = buf[offset - start : min(n, offset - start + length)]
        except OSError as e:
            self._read_failed(f"{errno.errorcode.get(e.errno or 0, e.errno)} at offset {offset}")
            raise DeviceIOError(f"{self.path}: read at {offset} failed: {e.strerror}") from e
        if len(data) != length:
            self._read_failed(f"short read at offset {offset} ({len(data)} of {length} bytes)")
            raise DeviceIOError(f"{self.path}: short read at {offset} ({len(data)}/{length})")
        return data

    def _read_failed(self, what: str) -> None:
        self.read_errors += 1
        self.last_read_error = what

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write an aligned range (offset and length multiples of ALIGN)."""
        if offset % ALIGN or len(data) % ALIGN:
            raise ValueError(f"unaligned device write {offset}+{len(data)}")
        try:
            # O_DIRECT needs an aligned buffer: mmap memory is page aligned.
            if self.direct and not isinstance(getattr(data, "obj", data), mmap.mmap):
                buf = self._buffer(len(data))
                buf[: len(data)] = data
                data = memoryview(buf)[: len(data)]
            mv = memoryview(data)
            done = 0
            while done < len(mv):
                done += os.pwrite(self.fd, mv[done:], offset + done)
        except OSError as e:
            raise DeviceIOError(f"{self.path}: write at {offset} failed: {e.strerror}") from e

    def start_writeback(self, offset: int, length: int) -> None:
        """Start writing a range back now, without waiting (files only).

        Otherwise the kernel lets gigabytes of dirty pages pile up and the
        next flush's fdatasync writes them all while the engine waits.
        """
        if not self.direct:
            _libc.sync_file_range(self.fd, offset, length, SYNC_FILE_RANGE_WRITE)

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise DeviceIOError(f"{self.path}: fdatasync failed: {e.strerror}") from e

    def discard(self, offset: int, length: int) -> None:
        """Tell the device a range is free (BLKDISCARD / punch hole); best effort."""
        if self.is_block:
            try:
                fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("<QQ", offset, length))
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                    raise DeviceIOError(f"{self.path}: discard failed: {e.strerror}") from e
        else:
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            if _libc.fallocate(self.fd, mode, offset, length) != 0:
                err = ctypes.get_errno()
                if err != errno.EOPNOTSUPP:
                    raise DeviceIOError(f"{self.path}: punch hole failed: {os.strerror(err)}")
