#!/usr/sbin/nbdkit python
"""Minimal pass-through nbdkit Python plugin: the baseline for scripts/bench.

It serves one regular file with plain positioned reads and writes and nothing
else (no protocol, no daemon, no data reduction), so it measures what nbdkit's
embedded Python interpreter costs per request: the ceiling for any plugin
written in Python, such as plugins/pstorage.py.

Run:
    nbdkit -U /tmp/pt.sock python scripts/bench_passthrough.py file=/var/tmp/disk.img

Standard library only: this runs in nbdkit's embedded interpreter.
"""
import ctypes
import ctypes.util
import errno
import os

import nbdkit

API_VERSION = 2

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

path = None
ZEROS = bytes(1 << 20)


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    global path
    if key != "file":
        raise RuntimeError(f"unknown parameter {key!r} (expected file=PATH)")
    path = os.path.abspath(value)


def config_complete():
    if path is None:
        raise RuntimeError("file=PATH is required")


def open(readonly):
    return os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)


def close(fd):
    os.close(fd)


def get_size(fd):
    return os.fstat(fd).st_size


def can_multi_conn(fd):
    return True


def can_flush(fd):
    return True


def can_trim(fd):
    return True


def can_zero(fd):
    return True


def can_fua(fd):
    return nbdkit.FUA_EMULATE  # nbdkit calls flush after a FUA request


def pread(fd, buf, offset, flags):
    # preadv fills nbdkit's buffer directly (os.pread would return a copy)
    n = os.preadv(fd, [buf], offset)
    if n < len(buf):  # past EOF of a regular file cannot happen within get_size
        buf[n:] = bytes(len(buf) - n)


def pwrite(fd, buf, offset, flags):
    view = memoryview(buf)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def flush(fd, flags):
    os.fdatasync(fd)


def _punch(fd, offset, count):
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, offset, count) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def trim(fd, count, offset, flags):
    try:
        _punch(fd, offset, count)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise


def zero(fd, count, offset, flags):
    try:
        _punch(fd, offset, count)  # holes read as zeros
        return
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    while count:
        n = min(count, len(ZEROS))
        pwrite(fd, memoryview(ZEROS)[:n], offset, 0)
        offset, count = offset + n, count - n
