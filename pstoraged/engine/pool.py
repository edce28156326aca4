"""Creating, opening, importing and exporting a pool.

A pool lives entirely on its backing device (format 2): two superblocks, the
metadata region (an LMDB environment: maps, refcounts, chunk locations,
volumes, snapshots, segment states, history) and the segment log. The host
keeps only a pool directory of runtime state: `pool.json`, a cache of which
device held the pool when it was last opened (like zpool.cache: rebuilt by
`pool import`), the lock, and LMDB's lock file. Deleting that directory loses
nothing.

Format-1 pools (metadata in `DIR/meta/` on the host) are still opened as
they are.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import socket
import stat
import time
import uuid as uuidlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import (
    Conflict,
    CorruptData,
    FormatError,
    InsecurePermissions,
    InvalidArgument,
    NotFound,
    PoolLocked,
)
from . import discovery
from .backing import Backing
from .format import (
    DEFAULT_SEGMENT_SIZE,
    FORMAT_VERSION,
    META_OFFSET,
    METADATA_VERSION,
    REGION_ALIGN,
    SEG_FREE,
    SEG_KEY,
    SEG_META,
    SUPERBLOCK_OFFSETS,
    SUPPORTED_METADATA_VERSIONS,
    Superblock,
    align_up,
)
from .metadata import MetaStore
from .region import RegionDevice, empty_store_image

log = logging.getLogger(__name__)

MIN_SEGMENTS = 8
POOL_FILE = "pool.json"
# Metadata region size when none is given: a share of the device, from the
# measured metadata bytes per TiB (docs/format.md), within these bounds.
META_SHARE = 0.10
META_MIN = 4 << 20
META_LOCK = "meta.mdb-lock"


def default_meta_size(device_size: int) -> int:
    return align_up(max(META_MIN, int(device_size * META_SHARE)), REGION_ALIGN)


@dataclass(slots=True)
class Pool:
    directory: str
    backing: Backing
    sb: Superblock
    meta: MetaStore
    lock_fd: int
    region: RegionDevice | None = None  # format 2: the metadata region's loop device

    def close(self) -> None:
        self.meta.close()
        if self.region is not None:
            self.region.close()
            try:  # LMDB's reader table: rebuilt at the next open, nothing to keep
                os.unlink(os.path.join(self.directory, META_LOCK))
            except FileNotFoundError:
                pass
        self.backing.close()
        os.close(self.lock_fd)

    def metadata_location(self) -> dict[str, object]:
        if self.region is None:
            return {"where": "host", "path": os.path.join(self.directory, "meta")}
        return {"where": "device", "path": self.backing.path, "offset": self.sb.meta_offset,
                "size": self.sb.meta_size}


def host_identity() -> dict[str, str]:
    """Who opens a pool: machine id (stable, unique) and host name (for people)."""
    try:
        with open("/etc/machine-id") as f:
            machine = f.read().strip()
    except OSError:
        machine = ""
    return {"machine_id": machine or socket.gethostname(), "host": socket.gethostname()}


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


def _write_cache(directory: str, sb: Superblock, device: str) -> None:
    """Remember where the pool was seen (a hint: opening checks the UUID)."""
    info = {"uuid": sb.uuid.hex(), "device": os.path.abspath(device), "label": sb.label,
            "created_ns": sb.created_ns}
    tmp = os.path.join(directory, POOL_FILE + ".tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "w") as f:
        json.dump(info, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, POOL_FILE))
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _read_cache(directory: str) -> dict | None:
    try:
        with open(os.path.join(directory, POOL_FILE)) as f:
            info = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable %s: %s", os.path.join(directory, POOL_FILE), e)
        return None
    return info if isinstance(info, dict) and "uuid" in info else None


def serves(directory: str, name: str) -> bool:
    """Whether `directory` last served pool `name` (UUID, prefix or label)."""
    info = _read_cache(directory)
    return info is not None and discovery.name_matches(info["uuid"], info.get("label", ""), name)


def create_pool(
    directory: str,
    device: str,
    *,
    file_size: int | None = None,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    force: bool = False,
    label: str = "",
    meta_size: int | None = None,
) -> Superblock:
    """Format `device` (creating a sparse file of `file_size` if asked) as a new
    pool whose metadata lives in a region of the device; `directory` becomes
    its runtime directory."""
    if segment_size % (1 << 16) or segment_size < (1 << 16) or segment_size > (1 << 30):
        raise InvalidArgument(
            f"segment size {segment_size} must be a multiple of 64 KiB between 64 KiB and 1 GiB"
        )
    if len(label.encode()) > 32:
        raise InvalidArgument(f"label {label!r} is longer than 32 bytes")
    made_dir = not os.path.exists(directory)
    made_file = file_size is not None and not os.path.exists(device)
    try:
        return _create(directory, device, file_size=file_size, segment_size=segment_size,
                       force=force, label=label, meta_size=meta_size)
    except BaseException:
        # a refused create leaves nothing behind that it made
        if made_file:
            try:
                os.unlink(device)
            except FileNotFoundError:
                pass
        if made_dir and os.path.isdir(directory):
            for name in os.listdir(directory):
                os.unlink(os.path.join(directory, name))
            os.rmdir(directory)
        raise


def _create(directory: str, device: str, *, file_size: int | None, segment_size: int,
            force: bool, label: str, meta_size: int | None) -> Superblock:
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
            msize = align_up(meta_size, REGION_ALIGN) if meta_size else default_meta_size(backing.size)
            data_offset = META_OFFSET + msize
            count = (backing.size - data_offset) // segment_size
            if count < MIN_SEGMENTS:
                raise InvalidArgument(
                    f"{device} holds only {max(count, 0)} segments of {segment_size} bytes "
                    f"after a metadata region of {msize >> 20} MiB",
                    f"use a device of at least {data_offset + MIN_SEGMENTS * segment_size} bytes",
                )
            sb = Superblock(
                uuidlib.uuid4().bytes, time.time_ns(), backing.size, segment_size, count,
                data_offset, label, META_OFFSET, msize,
            )
            # an empty metadata store first, then the superblocks that point at it
            backing.pwrite(META_OFFSET, empty_store_image(msize))
            backing.sync()
            meta, region = _open_region(directory, backing, sb)
            try:
                meta.put_json("format_version", METADATA_VERSION)
                meta.put_json("pool_uuid", sb.uuid.hex())
                meta.put_json("pool_state", {"state": "active", **host_identity(),
                                             "since_ns": time.time_ns()})
                meta.commit()
            finally:
                meta.close()
                region.close()
            raw = sb.to_bytes()
            for off in SUPERBLOCK_OFFSETS:
                backing.pwrite(off, raw)
            backing.sync()
        finally:
            backing.close()
        _clear_legacy(directory)
        _write_cache(directory, sb, device)
        return sb
    finally:
        os.close(lock_fd)


def _clear_legacy(directory: str) -> None:
    """A format-1 metadata directory left by a pool this one replaces."""
    meta_dir = os.path.join(directory, "meta")
    if os.path.isdir(meta_dir):
        for name in os.listdir(meta_dir):
            os.unlink(os.path.join(meta_dir, name))
        os.rmdir(meta_dir)


def _open_region(directory: str, backing: Backing, sb: Superblock,
                 ) -> tuple[MetaStore, RegionDevice]:
    if backing.size < sb.meta_offset + sb.meta_size:
        raise FormatError(f"{backing.path} is smaller than the pool's metadata region")
    region = RegionDevice(backing.path, sb.meta_offset, sb.meta_size, node_dir=directory)
    try:
        link = region.link(directory)
        try:  # a lock file of an earlier run: LMDB rebuilds its reader table
            os.unlink(os.path.join(directory, META_LOCK))
        except FileNotFoundError:
            pass
        return MetaStore(link, map_size=sb.meta_size, subdir=False), region
    except BaseException:
        region.close()
        raise


def _open_store(directory: str, backing: Backing, sb: Superblock,
                ) -> tuple[MetaStore, RegionDevice | None]:
    """The pool's metadata store: its region on the device (format 2), or
    DIR/meta on the host (format 1)."""
    if sb.has_region:
        return _open_region(directory, backing, sb)
    return MetaStore(os.path.join(directory, "meta")), None


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


def _locate(directory: str, info: dict, search: list[str] | None) -> str:
    """The device holding the cached pool: where it was last seen, or found by UUID."""
    dev = info.get("device", "")
    sb = discovery.probe(dev) if dev else None
    if sb is not None and sb.uuid.hex() == info["uuid"]:
        return str(dev)
    try:
        found = discovery.find(info["uuid"], search)
    except NotFound:
        if dev and os.path.exists(dev):
            return str(dev)  # opening it says precisely what is wrong with it
        raise NotFound(f"the device of pool {info['uuid']} ({dev or '?'}) is gone and no "
                       "other device holds the pool",
                       "attach its device, or run 'pstorage pool import --device PATH'") from None
    log.info("pool %s moved from %s to %s", info["uuid"], dev or "?", found.path)
    return found.path


def open_pool(directory: str, *, search: list[str] | None = None, force: bool = False) -> Pool:
    """Open the pool that `directory` (its runtime directory) last served.

    The device is taken from the cache if it still holds the pool, else
    found by UUID (on `search`, or every block device). `force` opens a pool
    that another host had open and did not export."""
    info = _read_cache(directory)
    if info is None:
        raise InvalidArgument(
            f"no pool in {directory}",
            "create one with 'pstorage pool create', or find one with 'pstorage pool import'")
    check_private(directory)
    lock_fd = _lock_dir(directory)
    try:
        device = _locate(directory, info, search)
        check_private(device)
        pool = _open_device(directory, device, lock_fd, expect=info["uuid"], force=force)
        if device != info.get("device"):
            _write_cache(directory, pool.sb, device)
        return pool
    except BaseException:
        os.close(lock_fd)
        raise


def _open_device(directory: str, device: str, lock_fd: int, *, expect: str | None,
                 force: bool) -> Pool:
    backing = Backing(device)
    region = None
    try:
        sb = read_superblock(backing)
        uid = sb.uuid.hex()
        if expect is not None and uid != expect:
            raise FormatError(
                f"{device} holds pool {uid}, not {expect}",
                "the device was reformatted or swapped; run 'pstorage pool import'",
            )
        if backing.size < sb.data_offset + sb.segment_count * sb.segment_size:
            raise FormatError(f"{device} is smaller than the pool it holds")
        meta, region = _open_store(directory, backing, sb)
        try:
            _check_metadata(meta, uid, force)
        except BaseException:
            meta.close()
            raise
    except BaseException:
        if region is not None:
            region.close()
        backing.close()
        raise
    return Pool(directory, backing, sb, meta, lock_fd, region)


def _check_metadata(meta: MetaStore, uid: str, force: bool) -> None:
    version = meta.get_json("format_version")
    if version not in SUPPORTED_METADATA_VERSIONS:
        raise FormatError(f"metadata format version {version} is not supported "
                          f"(this build reads {SUPPORTED_METADATA_VERSIONS})", "upgrade pstorage")
    if meta.get_json("pool_uuid") != uid:
        raise FormatError("metadata belongs to another pool")
    if version != METADATA_VERSION:
        log.info("upgrading metadata of pool %s from version %s to %s",
                 uid, version, METADATA_VERSION)
        meta.put_json("format_version", METADATA_VERSION)
    me = host_identity()
    state = meta.get_json("pool_state") or {}
    if (state.get("state") == "active" and state.get("machine_id") not in (None, me["machine_id"])
            and not force):
        raise Conflict(
            f"pool {uid} is in use by host {state.get('host', '?')} (opened there and "
            "never exported)",
            "export it there with 'pstorage pool export'; if that host is gone for good, "
            "import it here with 'pstorage pool import --force'")
    meta.put_json("pool_state", {"state": "active", **me, "since_ns": time.time_ns()})
    meta.commit()


def pool_state(found: discovery.Found) -> str:
    """How a found pool was left, for listings: "exported", "active on HOST", "in use"
    (open here now), or "format 1" (its metadata is on some host's directory)."""
    if not found.sb.has_region:
        return "format 1 (metadata on its host)"
    try:
        backing = Backing(found.path, writable=False)
    except PoolLocked:
        return "in use here"
    try:
        region = RegionDevice(found.path, found.sb.meta_offset, found.sb.meta_size, readonly=True)
        try:
            import lmdb

            env = lmdb.open(region.path, subdir=False, readonly=True, lock=False, max_dbs=16,
                            map_size=found.sb.meta_size)
            try:
                with env.begin() as txn:
                    raw = txn.get(b"pool_state", db=env.open_db(b"meta", txn=txn, create=False))
            finally:
                env.close()
        finally:
            region.close()
    except Exception as e:  # a listing shows what it can
        log.debug("cannot read the state of pool %s: %s", found.uuid, e)
        return "unreadable metadata"
    finally:
        backing.close()
    st = json.loads(bytes(raw)) if raw else {}
    if st.get("state") == "exported":
        return "exported"
    if st.get("machine_id") == host_identity()["machine_id"]:
        return "active on this host"
    return f"active on {st.get('host', '?')}"


def import_pool(directory: str, name: str, *, search: list[str] | None = None,
                force: bool = False) -> Pool:
    """Find pool `name` (UUID, prefix or label) by its superblock and open it
    with `directory` as its runtime directory, whatever path it has now."""
    _private_dir(directory)
    found = discovery.find(name, search)
    cached = _read_cache(directory)
    if cached is not None and cached["uuid"] != found.uuid:
        raise Conflict(f"{directory} already serves pool {cached['uuid']}",
                       "export that pool first, or import into another --dir")
    check_private(found.path)
    if not found.sb.has_region:
        raise FormatError(f"pool {found.uuid} on {found.path} is a format-1 pool: its "
                          "metadata is in the pool directory it was created with",
                          "open it with that directory (--pool-dir)")
    lock_fd = _lock_dir(directory)
    try:
        pool = _open_device(directory, found.path, lock_fd, expect=None, force=force)
    except BaseException:
        os.close(lock_fd)
        raise
    _write_cache(directory, pool.sb, found.path)
    return pool


def export_pool(pool: Pool) -> None:
    """Mark the pool cleanly exported (any host may import it without --force),
    close it and forget it on this host. The caller has closed the engine's
    use of it: everything is committed."""
    if pool.region is None:
        raise FormatError("a format-1 pool cannot be exported: its metadata is on this host")
    pool.meta.put_json("pool_state", {"state": "exported", **host_identity(),
                                      "since_ns": time.time_ns()})
    pool.meta.commit()
    directory = pool.directory
    pool.close()
    for name in (POOL_FILE, "meta.mdb", META_LOCK, "lock"):
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass


@contextmanager
def raw_metadata(directory: str) -> Iterator[MetaStore]:
    """The metadata store of a closed pool as it is, no version or owner
    checks: for check/repair tools and tests that edit it on purpose."""
    info = _read_cache(directory)
    if info is None:
        raise InvalidArgument(f"no pool in {directory}")
    lock_fd = _lock_dir(directory)
    try:
        backing = Backing(_locate(directory, info, None))
        try:
            sb = read_superblock(backing)
            meta, region = _open_store(directory, backing, sb)
            try:
                yield meta
            finally:
                meta.close()
                if region is not None:
                    region.close()
        finally:
            backing.close()
    finally:
        os.close(lock_fd)


def upgrade_pool(directory: str, *, meta_size: int | None = None) -> Superblock:
    """Move a format-1 pool's metadata from `directory/meta` onto its device.

    The region goes behind the last segment when the device has room there (a
    grown device), else it is carved from the last segments, which must be
    free (segment 0 stays where it is; the superblock's meta_offset names the
    region wherever it lies). Crash-safe: the compacted copy is
    written and synced into the region first; the version-2 superblocks that
    point at it are the commit; only then is the host's copy removed. A crash
    before the superblocks leaves the format-1 pool as it was."""
    pool = open_pool(directory)
    try:
        sb = pool.sb
        if pool.region is not None:
            raise InvalidArgument(f"pool {sb.uuid.hex()} already keeps its metadata on its device")
        used = pool.meta.usage()["used"]
        want = meta_size or default_meta_size(sb.device_size)
        want = align_up(max(want, 2 * used, META_MIN), REGION_ALIGN)
        end = sb.data_offset + sb.segment_count * sb.segment_size
        if pool.backing.size - align_up(end, REGION_ALIGN) >= want:
            # room behind the last segment (a grown device): the segments stay
            new = dataclasses.replace(sb, meta_offset=align_up(end, REGION_ALIGN), meta_size=want,
                                      version=FORMAT_VERSION)
        else:
            want = align_up(want, sb.segment_size)
            first = sb.segment_count - want // sb.segment_size
            if first < MIN_SEGMENTS:
                raise InvalidArgument(f"the device has no room for a {want >> 20} MiB "
                                      "metadata region")
            busy = [s for key, val in pool.meta.txn.cursor(db=pool.meta.segs)
                    if (s := SEG_KEY.unpack(key)[0]) >= first
                    and SEG_META.unpack(val)[0] != SEG_FREE]
            if busy:
                raise Conflict(
                    f"the last {sb.segment_count - first} segments, which a {want >> 20} MiB "
                    f"metadata region needs, hold data ({len(busy)} in use)",
                    f"grow the device by {want >> 20} MiB (the region then goes behind the "
                    "segments), or pass a smaller --meta-size")
            for seg in range(first, sb.segment_count):  # they leave the segment log
                pool.meta.txn.delete(SEG_KEY.pack(seg), db=pool.meta.segs)
            pool.meta.commit()
            new = dataclasses.replace(sb, segment_count=first, meta_size=want,
                                      version=FORMAT_VERSION,
                                      meta_offset=sb.data_offset + first * sb.segment_size)
        region = RegionDevice(pool.backing.path, new.meta_offset, new.meta_size,
                              node_dir=directory)
        try:
            fd = os.open(region.path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                pool.meta.env.copyfd(fd, compact=True)
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            region.close()
        raw = new.to_bytes()
        for off in SUPERBLOCK_OFFSETS:
            pool.backing.pwrite(off, raw)
        pool.backing.sync()
    finally:
        pool.close()
    _clear_legacy(directory)
    _write_cache(directory, new, pool.backing.path)
    return new
