"""Creating and opening a pool: superblock, pool directory, locks.

A pool is a backing device (or file) holding the segment log, plus a pool
directory holding the metadata store and `pool.json`, which names the device.
Both carry the pool UUID; a mismatch is refused.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import stat
import time
import uuid as uuidlib
from dataclasses import dataclass

from ..errors import CorruptData, FormatError, InsecurePermissions, InvalidArgument, PoolLocked
from .backing import Backing
from .format import (
    DATA_OFFSET,
    DEFAULT_SEGMENT_SIZE,
    METADATA_VERSION,
    SUPERBLOCK_OFFSETS,
    SUPPORTED_METADATA_VERSIONS,
    Superblock,
)
from .metadata import MetaStore

log = logging.getLogger(__name__)

MIN_SEGMENTS = 8
POOL_FILE = "pool.json"


@dataclass(slots=True)
class Pool:
    directory: str
    backing: Backing
    sb: Superblock
    meta: MetaStore
    lock_fd: int

    def close(self) -> None:
        self.meta.close()
        self.backing.close()
        os.close(self.lock_fd)


def check_private(path: str) -> None:
    """Refuse a pool directory or pool file that users other than its owner can
    use: the pool file holds every volume's data, the metadata maps them.
    Device nodes are left alone: 0660 root:disk is how udev makes them."""
    st = os.stat(path)
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)) or not st.st_mode & 0o077:
        return
    what, fix = ("pool directory", "700") if stat.S_ISDIR(st.st_mode) else ("pool file", "600")
    raise InsecurePermissions(
        f"{what} {path} is open to other users (mode {stat.S_IMODE(st.st_mode):04o}): "
        "they could read every volume's data", f"run `chmod {fix} {path}`")


def _private_dir(directory: str) -> None:
    """Create the pool directory owner-only, whatever the umask. An existing
    empty one is tightened; one that already holds files must be private."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if not os.listdir(directory):
        os.chmod(directory, 0o700)
    check_private(directory)


def _lock_dir(directory: str) -> int:
    fd = os.open(os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PoolLocked(
            f"pool {directory} is open in another pstoraged",
            "stop that daemon first, or use another --pool-dir",
        ) from None
    return fd


def create_pool(
    directory: str,
    device: str,
    *,
    file_size: int | None = None,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    force: bool = False,
    label: str = "",
) -> Superblock:
    """Format `device` (creating a sparse file of `file_size` if asked) as a new pool."""
    if segment_size % (1 << 16) or segment_size < (1 << 16) or segment_size > (1 << 30):
        raise InvalidArgument(
            f"segment size {segment_size} must be a multiple of 64 KiB between 64 KiB and 1 GiB"
        )
    _private_dir(directory)
    if os.path.exists(os.path.join(directory, POOL_FILE)) and not force:
        raise InvalidArgument(
            f"{directory} already holds a pool", "pass --force to replace it (its data is lost)"
        )
    lock_fd = _lock_dir(directory)
    try:
        if file_size is not None and not os.path.exists(device):
            fd = os.open(device, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, file_size)
            finally:
                os.close(fd)
        from .devices import describe, vet  # pyudev is only needed here

        vet(describe(device), force=force)
        if stat.S_ISREG(os.stat(device).st_mode):  # its old contents are gone from here on
            os.chmod(device, 0o600)
        backing = Backing(device)
        try:
            count = (backing.size - DATA_OFFSET) // segment_size
            if count < MIN_SEGMENTS:
                raise InvalidArgument(
                    f"{device} holds only {max(count, 0)} segments of {segment_size} bytes",
                    f"use a device of at least {DATA_OFFSET + MIN_SEGMENTS * segment_size} bytes",
                )
            sb = Superblock(
                uuidlib.uuid4().bytes, time.time_ns(), backing.size, segment_size, count,
                DATA_OFFSET, label,
            )
            raw = sb.to_bytes()
            for off in SUPERBLOCK_OFFSETS:
                backing.pwrite(off, raw)
            backing.sync()
            meta_dir = os.path.join(directory, "meta")
            if os.path.isdir(meta_dir):
                for name in os.listdir(meta_dir):
                    os.unlink(os.path.join(meta_dir, name))
            meta = MetaStore(meta_dir)
            meta.put_json("format_version", METADATA_VERSION)
            meta.put_json("pool_uuid", sb.uuid.hex())
            meta.commit()
            meta.close()
        finally:
            backing.close()
        info = {"uuid": sb.uuid.hex(), "device": os.path.abspath(device), "created_ns": sb.created_ns}
        tmp = os.path.join(directory, POOL_FILE + ".tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600),
                  "w") as f:
            json.dump(info, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(directory, POOL_FILE))
        dfd = os.open(directory, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
        return sb
    finally:
        os.close(lock_fd)


def read_superblock(backing: Backing) -> Superblock:
    errors = []
    for off in SUPERBLOCK_OFFSETS:
        try:
            return Superblock.from_buffer(backing.pread(off, Superblock.STRUCT.size))
        except CorruptData as e:
            errors.append(f"at {off}: {e}")
    raise FormatError(
        f"{backing.path} holds no valid PStorage superblock ({'; '.join(errors)})",
        "create a pool with 'pstorage pool create'",
    )


def open_pool(directory: str) -> Pool:
    path = os.path.join(directory, POOL_FILE)
    try:
        with open(path) as f:
            info = json.load(f)
    except FileNotFoundError:
        raise InvalidArgument(
            f"no pool in {directory}", "create one with 'pstorage pool create'"
        ) from None
    check_private(directory)
    if os.path.exists(info["device"]):  # a missing one: Backing says so
        check_private(info["device"])
    lock_fd = _lock_dir(directory)
    try:
        backing = Backing(info["device"])
        try:
            sb = read_superblock(backing)
            if sb.uuid.hex() != info["uuid"]:
                raise FormatError(
                    f"{info['device']} holds pool {sb.uuid.hex()}, not {info['uuid']}",
                    "the device was reformatted or swapped; point pool.json at the right one",
                )
            if backing.size < sb.data_offset + sb.segment_count * sb.segment_size:
                raise FormatError(f"{info['device']} is smaller than the pool it holds")
            meta = MetaStore(os.path.join(directory, "meta"))
            version = meta.get_json("format_version")
            if version not in SUPPORTED_METADATA_VERSIONS:
                meta.close()
                raise FormatError(f"metadata format version {version} is not supported "
                                  f"(this build reads {SUPPORTED_METADATA_VERSIONS})",
                                  "upgrade pstorage")
            if meta.get_json("pool_uuid") != info["uuid"]:
                meta.close()
                raise FormatError("metadata belongs to another pool")
            if version != METADATA_VERSION:
                log.info("upgrading metadata of pool %s from version %s to %s",
                         info["uuid"], version, METADATA_VERSION)
                meta.put_json("format_version", METADATA_VERSION)
                meta.commit()
            meta.abort()
        except BaseException:
            backing.close()
            raise
    except BaseException:
        os.close(lock_fd)
        raise
    return Pool(directory, backing, sb, meta, lock_fd)
