"""FUSE front end: every volume as a regular file under /run/pstorage/dev.

    /run/pstorage/dev/            (root:root 0755, fuse.pstorage)
        vol1                      size = volume size, 0600 (0400 if read-only)
    losetup --direct-io=on --sector-size 4096 --find --show /run/pstorage/dev/vol1

The daemon speaks the kernel's FUSE protocol (include/uapi/linux/fuse.h, a
stable ABI) on /dev/fuse itself, from its trio loop; no libfuse. pyfuse3
(3.5, the latest) has no fallocate handler: libfuse answers ENOSYS and the
kernel then turns fallocate off for the whole mount, so a loop device's
discards (fstrim, mkfs) could never reach Engine.trim. Speaking the protocol
also gives us FOPEN_PARALLEL_DIRECT_WRITES, SEEK_DATA/SEEK_HOLE and batching.

Request flow, per wake-up of the trio loop:

    read every ready request from /dev/fuse (non-blocking)
      -> metadata (lookup, getattr, readdir, open, ...) answered at once from
         engine.volumes (dict reads, atomic under the GIL; see docs/design.md)
      -> data (read, write, fsync, fallocate, lseek, statfs) collected into one
         batch of executor Requests -> submitted to the executor, which runs
         them on the engine thread in order (with the data socket's requests),
         fsyncs answered after one commit
      -> once all are answered, the replies are written back from the trio loop

Memory stays bounded: at most MAX_INFLIGHT bytes of data requests are
accepted before the reader waits for batches to finish (the kernel itself
keeps at most max_background asynchronous requests outstanding).

Loop over FUSE and memory pressure (docs/fuse.md): writeback of a loop
device's dirty pages needs this daemon, and this daemon may need memory to
make progress, whose reclaim may wait on that writeback. We avoid the cycle
by keeping dirty pages out of the chain (files opened with FOPEN_DIRECT_IO,
loop devices with --direct-io=on), bounding the daemon's own memory, and
setting PR_SET_IO_FLUSHER on its threads so that their allocations never
recurse into I/O reclaim and they are not throttled for other devices'
dirty pages. mlockall() is deliberately not used (see docs/fuse.md).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import stat
import struct
import time
from dataclasses import dataclass
from typing import Any

import trio

from ..engine.engine import Volume
from ..engine.format import BLOCK_SIZE
from ..errors import Conflict, PStorageError
from . import executor as X
from .dataplane import DataPlane
from .executor import Request
from .loopdev import loop_devices_on

log = logging.getLogger(__name__)

DEFAULT_MOUNTPOINT = "/run/pstorage/dev"
ROOT_ID = 1
INO_OFFSET = 1000  # inode of a volume = its id + this (ids are never reused)
ENTRY_TTL = 1.0  # seconds the kernel may cache names and attributes; resizes
ATTR_TTL = 1.0  # show up at once when the daemon calls invalidate()
MAX_WRITE = 1 << 20  # largest READ/WRITE the kernel sends (256 pages)
MAX_BACKGROUND = 64  # async requests (loop devices' AIO) the kernel keeps in flight
MAX_INFLIGHT = 64 << 20  # bytes of data requests accepted before reading waits
MAX_BATCH_BYTES = 4 << 20  # per engine job: it holds up data-socket clients meanwhile
MAX_BATCH = 128
SEEK_WINDOW = 64 << 20  # lseek(SEEK_DATA/HOLE) walks the map this much per step ...
SEEK_BUDGET = 16  # ... for at most this many steps, then answers conservatively

# opcodes (the ones we answer with more than ENOSYS)
LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK = 6, 8, 9, 10, 11, 12, 13
OPEN, READ, WRITE, STATFS, RELEASE, FSYNC = 14, 15, 16, 17, 18, 20
FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR, FSYNCDIR = 25, 26, 27, 28, 29, 30
CREATE, INTERRUPT, DESTROY, BATCH_FORGET, FALLOCATE = 35, 36, 38, 42, 43
RENAME2, LSEEK, TMPFILE = 45, 46, 51
_REFUSED = frozenset((SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, CREATE,
                      RENAME2, TMPFILE))  # volumes are created and deleted by the API
_NO_REPLY = frozenset((FORGET, BATCH_FORGET, INTERRUPT))

# INIT flags
ASYNC_READ, BIG_WRITES, ASYNC_DIO, MAX_PAGES = 1 << 0, 1 << 5, 1 << 15, 1 << 22
# open reply flags
FOPEN_DIRECT_IO, FOPEN_NOFLUSH, FOPEN_PARALLEL_DIRECT_WRITES = 1 << 0, 1 << 5, 1 << 6
# SETATTR valid bits
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1 << 0, 1 << 1, 1 << 2, 1 << 3
# fallocate modes
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
SEEK_DATA, SEEK_HOLE = 3, 4
NOTIFY_INVAL_INODE, NOTIFY_RESEND = 2, 7  # RESEND: Linux 6.9+

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ENTRY_OUT = struct.Struct("<QQQQII")  # + ATTR
ATTR_OUT = struct.Struct("<QII")  # + ATTR
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
OPEN_IN = struct.Struct("<II")
OPEN_OUT = struct.Struct("<QII")
IO_IN = struct.Struct("<QQIIQII")  # read_in and write_in: fh offset size flags owner flags pad
WRITE_OUT = struct.Struct("<II")
FSYNC_IN = struct.Struct("<QII")
FALLOCATE_IN = struct.Struct("<QQQII")
LSEEK_IN = struct.Struct("<QQII")
LSEEK_OUT = struct.Struct("<Q")
FH_IN = struct.Struct("<Q")  # the file handle that starts release_in, flush_in, ...
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
DIRENT = struct.Struct("<QQII")
INVAL_INODE_OUT = struct.Struct("<Qqq")
BUF_SIZE = MAX_WRITE + 4096  # the kernel refuses reads into less than max_write + headers
DT_DIR, DT_REG = 4, 8

MS_NOSUID, MS_NODEV, MS_NOEXEC, MNT_DETACH = 2, 4, 8, 2
PR_SET_IO_FLUSHER = 57  # Linux 5.6+, needs CAP_SYS_RESOURCE


class _Refuse(PStorageError):
    """Answer this request with an errno (internal to the front end; a PStorageError
    so that the executor passes it back when an lseek raises it)."""

    def __init__(self, err: int) -> None:
        super().__init__(errno.errorcode.get(err, str(err)))
        self.errno = err


@dataclass(frozen=True, slots=True)
class FuseStatistics:
    mounted: bool
    requests: int
    batches: int
    max_batch: int
    io_errors: int  # data requests (read, write, fsync, ...) that failed
    inflight_bytes: int


class FuseFrontEnd:
    """Background service: the FUSE mount, served on the daemon's trio loop."""

    def __init__(self, dataplane: DataPlane, mountpoint: str = DEFAULT_MOUNTPOINT, *,
                 fd: int | None = None, io_flusher: bool = True) -> None:
        """`fd`: adopt the /dev/fuse connection of a mount that an earlier daemon
        left with stop(keep_mount=True) (or that survived its crash in a holder
        such as systemd's fd store) instead of mounting anew."""
        self._dp = dataplane
        self._executor = dataplane.executor
        self._engine = dataplane.engine
        self.mountpoint = os.path.abspath(mountpoint)
        self._io_flusher = io_flusher
        self._fd = -1 if fd is None else fd
        self.handover_fd: int | None = None  # set by run() after stop(keep_mount=True)
        # File handles are volume ids, so a successor process can serve handles
        # it never issued; only readdir keeps per-handle state (rebuilt if unknown).
        self._dirs: dict[int, list[tuple[bytes, int, int]]] = {}
        self._next_fh = 1
        self._mounted_ns = time.time_ns()
        self._inflight = 0
        self._room: trio.Event | None = None
        self._reader: trio.CancelScope | None = None
        self._stopping = False
        self._keep_mount = False
        # Adopted after an unclean stop: writes the old daemon acknowledged but never
        # flushed may be gone, so each volume's next fsync fails once (EIO) and the
        # file system above learns of it, as NBD clients do (docs/protocol.md).
        self._suspect: set[int] | None = None  # volumes whose fsync already failed
        self._nursery: trio.Nursery | None = None
        self.requests = self.batches = self.max_batch = self.io_errors = 0

    # ------------------------------------------------------------ service
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        """Mount, then serve until stop(), an external unmount or an error."""
        if self._io_flusher:
            set_io_flusher()  # this (trio) thread
            await self._dp.call(set_io_flusher)  # and the engine's
        if self._fd < 0:
            self._fd = await trio.to_thread.run_sync(mount_fuse, self.mountpoint)
            log.info("FUSE front end mounted on %s", self.mountpoint)
        else:
            os.set_blocking(self._fd, False)
            if not self._engine.prev_clean:
                self._suspect = set()
            self._resend()
            log.info("FUSE front end took over the mount on %s", self.mountpoint)
        self._mounted_ns = time.time_ns()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                with trio.CancelScope() as self._reader:
                    task_status.started()
                    if not self._stopping:
                        await self._serve()
                # in-flight batches finish (and are answered) before the nursery exits
        finally:
            self._nursery = None
            fd, self._fd = self._fd, -1
            if self._keep_mount:
                # requests not read yet wait in the kernel for the next daemon
                self.handover_fd = fd
                log.info("FUSE front end stopped; %s stays mounted for the next daemon",
                         self.mountpoint)
            else:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(unmount, self.mountpoint)
                    trio.lowlevel.notify_closing(fd)
                    os.close(fd)
                log.info("FUSE front end on %s stopped", self.mountpoint)

    def stop(self, *, keep_mount: bool = False) -> None:
        """Stop serving. run() then unmounts (lazily, if a loop device still uses a
        file: its I/O fails from then on), or with keep_mount leaves the mount and
        its /dev/fuse fd (handover_fd) for a successor: FuseFrontEnd(..., fd=...)."""
        self._stopping = True
        self._keep_mount = keep_mount
        if self._reader is not None:
            self._reader.cancel()

    @property
    def connection_fd(self) -> int:
        """The /dev/fuse descriptor of the mount (-1 when not mounted): what a
        holder such as systemd's fd store keeps to carry the mount across a
        restart or crash."""
        return self._fd

    def statistics(self) -> FuseStatistics:
        return FuseStatistics(self._fd >= 0, self.requests, self.batches, self.max_batch,
                              self.io_errors, self._inflight)

    def invalidate(self, vol_id: int) -> None:
        """Drop the kernel's cached attributes of a volume (call after a resize).

        Safe on the serving thread: attribute-only invalidation takes no lock a
        pending request could hold (NOTIFY_INVAL_ENTRY would: names just expire
        after ENTRY_TTL)."""
        if self._fd < 0:
            return
        try:  # offset -1: attributes only (there is no page cache to drop)
            self._notify(NOTIFY_INVAL_INODE, INVAL_INODE_OUT.pack(vol_id + INO_OFFSET, -1, 0))
        except OSError as e:  # ENOENT: the kernel has no such inode cached
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                raise

    def _notify(self, code: int, body: bytes) -> None:
        os.write(self._fd, OUT_HEADER.pack(OUT_HEADER.size + len(body), code, 0) + body)

    def _resend(self) -> None:
        """Have the kernel queue again the requests an earlier process read but never
        answered (it crashed, or was killed mid-batch); they would hang otherwise."""
        try:
            self._notify(NOTIFY_RESEND, b"")
        except OSError as e:
            log.warning("FUSE_NOTIFY_RESEND failed (%s; Linux 6.9+): requests the previous "
                        "daemon left unanswered stay stuck", e.strerror)

    # ------------------------------------------------------------ the reader
    async def _serve(self) -> None:
        fd = self._fd
        buf = bytearray(BUF_SIZE)
        mv = memoryview(buf)
        while True:
            while self._inflight >= MAX_INFLIGHT:
                self._room = trio.Event()
                await self._room.wait()
            await trio.lowlevel.wait_readable(fd)
            batch: list[Request] = []
            nbytes = 0
            # No await from here until the batch is handed over: a cancel cannot
            # strand requests that were read but not answered.
            while len(batch) < MAX_BATCH and nbytes < MAX_BATCH_BYTES and (
                    self._inflight + nbytes < MAX_INFLIGHT):
                try:
                    n = os.readv(fd, [buf])
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno in (errno.ENOENT, errno.EINTR):  # interrupted before we read it
                        continue
                    if e.errno == errno.ENODEV:  # unmounted (umount, fusectl abort)
                        log.info("FUSE mount %s went away", self.mountpoint)
                        self._start(batch, nbytes)
                        return
                    log.exception("reading /dev/fuse failed; the FUSE front end stops")
                    self._start(batch, nbytes)
                    return
                nbytes += self._handle(mv[:n], batch)
                if self._stopping:
                    break
            self._start(batch, nbytes)
            if self._stopping:
                return

    def _start(self, batch: list[Request], nbytes: int) -> None:
        if batch:
            assert self._nursery is not None
            self._inflight += nbytes
            self._nursery.start_soon(self._run_batch, batch, nbytes)

    async def _run_batch(self, batch: list[Request], nbytes: int) -> None:
        try:
            await self._executor.run_from_trio(batch)
        finally:
            self._inflight -= nbytes
            if self._room is not None:
                self._room.set()
        self.batches += 1
        self.max_batch = max(self.max_batch, len(batch))
        for req in batch:
            if req.error is not None:
                self.io_errors += 1
                self._reply(req.tag, req.error.errno)
            elif req.op == X.WRITE:
                self._reply(req.tag, 0, WRITE_OUT.pack(req.length, 0))
            else:
                res = req.result
                self._reply(req.tag, 0, res if isinstance(res, bytes) else b"")

    def _reply(self, unique: int, err: int = 0, payload: bytes = b"") -> None:
        if err:
            payload = b""
        try:
            os.writev(self._fd, [OUT_HEADER.pack(OUT_HEADER.size + len(payload), -err, unique),
                                 payload])
        except OSError as e:
            # ENOENT: the request was interrupted and is gone; ENODEV: the connection is
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                log.exception("FUSE reply to request %#x refused", unique)  # a bug of ours

    def _handle(self, req: memoryview, batch: list[Request]) -> int:
        """Answer a metadata request now or add a data request to the batch: its bytes."""
        _, opcode, unique, nodeid, _uid, _gid, _pid, _ext, _ = IN_HEADER.unpack_from(req)
        body = req[IN_HEADER.size:]
        self.requests += 1
        t0 = time.monotonic_ns()
        try:
            if opcode == READ:
                fh, off, size = IO_IN.unpack_from(body)[:3]
                vol = self._file(fh)
                size = max(0, min(size, vol.size - off))
                if not size:  # at or past the end
                    self._reply(unique)
                    return 0
                batch.append(Request(X.READ, vol, off, size, None, False, X.unanswered, None,
                                     unique, t0))
                return size
            if opcode == WRITE:
                fh, off, size = IO_IN.unpack_from(body)[:3]
                vol = self._file(fh)
                size = min(size, vol.size - off)  # a short write at the end, like a disk
                if size <= 0:
                    raise _Refuse(errno.ENOSPC)
                data = bytes(body[IO_IN.size : IO_IN.size + size])
                batch.append(self._executor.write(vol, off, data, False, X.unanswered, None,
                                                  unique, t0))
                return size
            if opcode == FSYNC:
                vol = self._file(FSYNC_IN.unpack_from(body)[0])
                if self._suspect is not None and vol.id not in self._suspect:
                    self._suspect.add(vol.id)
                    log.warning("volume %s: the previous daemon stopped uncleanly; writes it "
                                "acknowledged after its last flush may be lost: failing this "
                                "fsync", vol.name)
                    self.io_errors += 1
                    raise _Refuse(errno.EIO)
                batch.append(Request(X.FLUSH, vol, 0, 0, None, True, X.unanswered, None,
                                     unique, t0))
                return 0
            if opcode == FALLOCATE:
                batch.append(self._fallocate(unique, body, t0))
                return 0
            if opcode == LSEEK:
                fh, off, whence, _ = LSEEK_IN.unpack_from(body)
                if whence not in (SEEK_DATA, SEEK_HOLE):  # the kernel does the others
                    raise _Refuse(errno.EINVAL)
                batch.append(X.call(self._seek, (self._file(fh), off, whence), False,
                                    X.unanswered, None, unique))
                return 0
            if opcode == STATFS:
                batch.append(X.call(self._statfs, (), False, X.unanswered, None, unique))
                return 0
            if opcode in _NO_REPLY:
                return 0
            payload = self._metadata(opcode, nodeid, body)
            if opcode == DESTROY:
                self._stopping = True
        except (_Refuse, PStorageError) as e:
            log.debug("FUSE op %d on node %d: %s", opcode, nodeid, e)
            self._reply(unique, e.errno)
            return 0
        except Exception:
            log.exception("FUSE op %d on node %d failed", opcode, nodeid)
            self._reply(unique, errno.EIO)
            return 0
        self._reply(unique, 0, payload)
        return 0

    # ------------------------------------------------------------ metadata (trio thread)
    def _metadata(self, opcode: int, nodeid: int, body: memoryview) -> bytes:
        if opcode == INIT:
            return self._init(body)
        if opcode == LOOKUP:
            if nodeid != ROOT_ID:
                raise _Refuse(errno.ENOTDIR)
            name = bytes(body).split(b"\0", 1)[0].decode("utf-8", "replace")
            vol = self._engine.volumes.get(name)
            if vol is None or vol.destroyed_ns:
                raise _Refuse(errno.ENOENT)
            ino = vol.id + INO_OFFSET
            (es, ens), (asec, ans) = _ttl(ENTRY_TTL), _ttl(ATTR_TTL)
            return ENTRY_OUT.pack(ino, 0, es, asec, ens, ans) + self._attr(ino)
        if opcode == GETATTR:
            return ATTR_OUT.pack(*_ttl(ATTR_TTL), 0) + self._attr(nodeid)
        if opcode == SETATTR:
            return self._setattr(nodeid, body)
        if opcode == OPEN:
            flags = OPEN_IN.unpack_from(body)[0]
            vol = self._volume(nodeid)
            if vol.readonly and flags & os.O_ACCMODE != os.O_RDONLY:
                raise _Refuse(errno.EROFS)
            fh = vol.id
            # direct I/O: no page cache copy of volume data, nothing dirty to write back
            return OPEN_OUT.pack(fh, FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES
                                 | FOPEN_NOFLUSH, 0)
        if opcode == RELEASE:
            return b""
        if opcode == OPENDIR:
            if nodeid != ROOT_ID:
                raise _Refuse(errno.ENOTDIR)
            self._next_fh += 1
            self._dirs[self._next_fh] = self._listing()
            return OPEN_OUT.pack(self._next_fh, 0, 0)
        if opcode == READDIR:
            fh, off, size = IO_IN.unpack_from(body)[:3]
            entries = self._dirs.get(fh)
            if entries is None:  # opened under an earlier daemon
                entries = self._dirs[fh] = self._listing()
            return _dirents(entries, off, size)
        if opcode == RELEASEDIR:
            self._dirs.pop(FH_IN.unpack_from(body)[0], None)
            return b""
        if opcode in (FLUSH, FSYNCDIR, DESTROY):
            # close() promises no durability for a file either; fsync() does (FSYNC)
            return b""
        if opcode in _REFUSED:
            raise _Refuse(errno.EPERM)
        raise _Refuse(errno.ENOSYS)  # xattrs, locks, ioctl, ...: the kernel stops asking

    def _init(self, body: memoryview) -> bytes:
        major, minor, readahead, flags = INIT_IN.unpack_from(body)
        if major != 7:
            raise _Refuse(errno.EPROTO)
        want = ASYNC_READ | BIG_WRITES | ASYNC_DIO | MAX_PAGES
        max_write = MAX_WRITE if flags & MAX_PAGES else 32 * 4096
        log.debug("FUSE INIT: kernel protocol 7.%d, flags %#x", minor, flags)
        return INIT_OUT.pack(7, 38, readahead, flags & want, MAX_BACKGROUND,
                             MAX_BACKGROUND * 3 // 4, max_write, 1, MAX_WRITE // 4096, 0, 0)

    def _setattr(self, nodeid: int, body: memoryview) -> bytes:
        f = SETATTR_IN.unpack_from(body)
        valid, size = f[0], f[3]
        if nodeid == ROOT_ID or valid & (FATTR_MODE | FATTR_UID | FATTR_GID):
            raise _Refuse(errno.EPERM)
        vol = self._volume(nodeid)
        if valid & FATTR_SIZE and size != vol.size:
            raise _Refuse(errno.EPERM)  # resize through the API (pstorage volume resize)
        # times: accepted and not kept (a volume's times are its creation time)
        return ATTR_OUT.pack(*_ttl(ATTR_TTL), 0) + self._attr(nodeid)

    def _attr(self, nodeid: int) -> bytes:
        if nodeid == ROOT_ID:
            sec, ns = divmod(self._mounted_ns, 10**9)
            return ATTR.pack(ROOT_ID, 0, 0, sec, sec, sec, ns, ns, ns,
                             stat.S_IFDIR | 0o755, 2, 0, 0, 0, BLOCK_SIZE, 0)
        vol = self._volume(nodeid)
        sec, ns = divmod(vol.created_ns, 10**9)
        mode = stat.S_IFREG | (0o400 if vol.readonly else 0o600)
        blocks = vol.stats.mapped_blocks * (BLOCK_SIZE // 512)  # du shows the data held
        return ATTR.pack(nodeid, vol.size, blocks, sec, sec, sec, ns, ns, ns,
                         mode, 1, 0, 0, 0, BLOCK_SIZE, 0)

    def _volume(self, nodeid: int) -> Volume:
        vol = self._engine.by_id.get(nodeid - INO_OFFSET) if nodeid > INO_OFFSET else None
        if vol is None or vol.destroyed_ns:
            raise _Refuse(errno.ENOENT)
        return vol

    def _file(self, fh: int) -> Volume:
        vol = self._engine.by_id.get(fh)
        if vol is None or vol.destroyed_ns:
            raise _Refuse(errno.ENOENT)  # deleted while open
        return vol

    def _listing(self) -> list[tuple[bytes, int, int]]:
        # copy(): one C-level call, so a volume created meanwhile cannot break it
        vols = sorted((v.name, v.id) for v in self._engine.volumes.copy().values()
                      if not v.destroyed_ns)
        return [(b".", ROOT_ID, DT_DIR), (b"..", ROOT_ID, DT_DIR)] + [
            (name.encode(), vid + INO_OFFSET, DT_REG) for name, vid in vols]

    def _fallocate(self, unique: int, body: memoryview, t0: int) -> Request:
        fh, off, length, mode, _ = FALLOCATE_IN.unpack_from(body)
        vol = self._file(fh)
        end = off + length
        if mode & FALLOC_FL_PUNCH_HOLE or mode & FALLOC_FL_ZERO_RANGE:
            if end > vol.size and not mode & FALLOC_FL_KEEP_SIZE:
                raise _Refuse(errno.EFBIG)  # the kernel would grow the file
            end = min(end, vol.size)
            if end > off and mode & FALLOC_FL_PUNCH_HOLE:
                return Request(X.TRIM, vol, off, end - off, None, False, X.unanswered, None,
                               unique, t0)
            if end > off:
                return Request(X.ZERO, vol, off, end - off, None, False, X.unanswered, None,
                               unique, t0)
        elif mode & ~FALLOC_FL_KEEP_SIZE:
            raise _Refuse(errno.EOPNOTSUPP)
        elif end > vol.size and not mode & FALLOC_FL_KEEP_SIZE:
            raise _Refuse(errno.EFBIG)
        # preallocation, or a range past the end: a thin volume has nothing to do
        return X.call(_noop, (), False, X.unanswered, None, unique)

    # ------------------------------------------------------------ engine thread
    def _seek(self, vol: Volume, offset: int, whence: int) -> bytes:
        """SEEK_DATA / SEEK_HOLE from the volume's map. After SEEK_BUDGET windows the
        answer is conservative (data where there may be a hole), which lseek allows."""
        if offset >= vol.size:
            raise _Refuse(errno.ENXIO)
        pos = offset
        for _ in range(SEEK_BUDGET):
            if pos >= vol.size:
                break
            window = min(SEEK_WINDOW, vol.size - pos)
            for n, typ in self._engine.extents(vol, pos, window):
                if (typ == 0) == (whence == SEEK_DATA):
                    return LSEEK_OUT.pack(pos)
                pos += n
        else:
            return LSEEK_OUT.pack(pos if whence == SEEK_DATA else vol.size)
        if whence == SEEK_HOLE:
            return LSEEK_OUT.pack(vol.size)  # the end of a file counts as a hole
        raise _Refuse(errno.ENXIO)

    def _statfs(self) -> bytes:
        st = self._engine.statistics()
        blocks, free = st.capacity_bytes // BLOCK_SIZE, st.free_bytes // BLOCK_SIZE
        files = sum(1 for v in self._engine.volumes.values() if not v.destroyed_ns)
        return STATFS_OUT.pack(blocks, free, free, files, 0, BLOCK_SIZE, 63, BLOCK_SIZE, 0)


def _noop(*_: Any) -> None:
    return None


def _ttl(seconds: float) -> tuple[int, int]:
    sec = int(seconds)
    return sec, int((seconds - sec) * 1e9)


def _dirents(entries: list[tuple[bytes, int, int]], offset: int, size: int) -> bytes:
    out = bytearray()
    for i in range(offset, len(entries)):
        name, ino, typ = entries[i]
        rec = DIRENT.pack(ino, i + 1, len(name), typ) + name
        rec += bytes(-len(rec) % 8)
        if len(out) + len(rec) > size:
            break
        out += rec
    return bytes(out)


# ---------------------------------------------------------------- mounting
_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(res: int, what: str) -> None:
    if res != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


_io_flusher_warned = False


def set_io_flusher() -> bool:
    """PR_SET_IO_FLUSHER on the calling thread; threads it creates later inherit it.

    The thread's allocations then never start I/O to reclaim memory
    (PF_MEMALLOC_NOIO) and it is throttled only for its own dirty pages
    (PF_LOCAL_THROTTLE): the daemon serves the I/O that reclaim would wait for.
    Call it early in main(), before any thread starts.
    """
    global _io_flusher_warned
    one, zero = ctypes.c_ulong(1), ctypes.c_ulong(0)  # prctl is variadic: pass longs
    if _c().prctl(PR_SET_IO_FLUSHER, one, zero, zero, zero) == 0:
        return True
    if not _io_flusher_warned:
        _io_flusher_warned = True
        log.warning("PR_SET_IO_FLUSHER refused (%s): needs Linux 5.6+ and CAP_SYS_RESOURCE; "
                    "a loop device over the FUSE mount is less safe under memory pressure",
                    os.strerror(ctypes.get_errno()))
    return False


def _mountinfo_has(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # the kernel writes space, tab, newline and backslash as \ooo
            mnt = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if mnt == path:
                return True
    return False


def recover_stale(path: str) -> bool:
    """Lazily unmount a dead FUSE mount at `path` (left by a killed daemon)."""
    recovered = False
    while _mountinfo_has(path):
        try:
            os.stat(path)
        except OSError as e:
            if e.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
                raise
        else:
            raise Conflict(f"{path} is already a mount point",
                           "is another pstoraged serving it? unmount it first")
        log.warning("%s: stale FUSE mount (Transport endpoint is not connected); unmounting it",
                    path)
        stuck = loop_devices_on(path)  # before: their paths change once it is detached
        if stuck:
            log.warning("loop devices %s still use the dead mount: unmount what is on them, "
                        "detach them (losetup -d) and attach again", ", ".join(stuck))
        _check(_c().umount2(path.encode(), MNT_DETACH), f"umount -l {path}")
        recovered = True
    return recovered


def mount_fuse(path: str) -> int:
    """Mount an empty FUSE file system at `path` (recovering a stale one): the /dev/fuse fd.

    Blocking; needs CAP_SYS_ADMIN (the daemon runs as root for losetup anyway).
    """
    recover_stale(path)
    os.makedirs(path, mode=0o755, exist_ok=True)
    # CLOEXEC: a child (losetup, mkfs) holding the fd would keep the connection alive
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    # allow_other + default_permissions: the kernel applies the files' modes
    # (root 0600) to every user, instead of FUSE's "the mounting user only"
    opts = (f"fd={fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()},"
            "default_permissions,allow_other")
    try:
        _check(_c().mount(b"pstorage", path.encode(), b"fuse.pstorage",
                          ctypes.c_ulong(MS_NOSUID | MS_NODEV | MS_NOEXEC), opts.encode()),
               f"mounting the FUSE front end on {path}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def unmount(path: str) -> None:
    """Unmount; if loop devices or open files still use it, detach it lazily."""
    if _c().umount2(path.encode(), 0) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EINVAL:  # not mounted (any more)
        return
    if err != errno.EBUSY:
        raise OSError(err, f"umount {path}: {os.strerror(err)}")
    users = loop_devices_on(path)
    log.warning("%s is busy (%s): detaching it lazily; its users get I/O errors from now on",
                path, ", ".join(users) or "open files")
    _check(_c().umount2(path.encode(), MNT_DETACH), f"umount -l {path}")
