"""Describe and vet a backing block device or file before a pool is formatted on it.

Everything here works without udevd (containers): pyudev reads sysfs directly, and
every udev property we use has a sysfs fallback. Signatures come from `blkid -p`
(a low-level probe that ignores the udev database) or, without it, our own magic
checks.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import mmap
import os
import re
import shutil
import stat
import struct
import subprocess
from dataclasses import dataclass

from ..errors import Conflict, InvalidArgument
from .format import META_OFFSET

try:
    import pyudev
except ImportError:  # the sysfs fallbacks below cover everything we need
    pyudev = None

log = logging.getLogger(__name__)

DEFAULT_DEV_DIR = "/dev/pstorage"


def dev_dir() -> str:
    """Where attached volumes get their stable names, /dev/pstorage/NAME."""
    return os.environ.get("PSTORAGE_DEV_DIR", DEFAULT_DEV_DIR)

BLKGETSIZE64 = 0x80081272
POOL_MAGIC = b"PSTPOOL\0"
SYS_BLOCK = "/sys/class/block"
SWAP_MARK = "[swap]"  # entry in mounted_at for an active swap area, as lsblk shows it
_PROBE_LEN = 68 * 1024  # covers every magic we check (btrfs at 64 KiB + 64)


class DeviceError(InvalidArgument):
    """The device cannot be used as it is (not found, unreadable, wrong type)."""


class DeviceInUse(DeviceError, Conflict):
    """Something uses the device right now; --force never overrides this."""

    exit_code = Conflict.exit_code
    status = Conflict.status
    code = "device_in_use"


class DeviceHasData(DeviceError):
    """Formatting would destroy existing data; --force overrides this."""

    code = "device_has_data"


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    path: str
    kind: str  # "block" | "file"
    size_bytes: int
    logical_block_size: int
    physical_block_size: int
    rotational: bool | None
    model: str | None
    serial: str | None
    is_nvme: bool
    is_loop: bool
    signatures: tuple[str, ...]  # blkid names: "ext4", "gpt", "dos", "swap", "pstorage", ...
    mounted_at: tuple[str, ...]  # mount points of it, its partitions and holders; SWAP_MARK
    holders: tuple[str, ...]  # dm/md/... on it or its partitions; for a file: its loop devices
    partitions: tuple[str, ...]
    pstorage_volume: str | None = None  # it is this PStorage volume (attached by pstoraged)
    busy: tuple[str, ...] = ()  # open by others: a pool's lock, an exclusive open
    in_use: tuple[str, ...] = ()  # every reason above, as `pstorage devices` shows them; () = free


def _read(path: str, default: str | None = None) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def _ls(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _unescape(s: str) -> str:  # mountinfo and /proc/swaps octal-escape spaces etc.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), s)


def fstype(path: str) -> str:
    """The file system type of the mount holding `path` (by name: works on a dead FUSE mount)."""
    best, fstype = "", ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mnt = _unescape(left.split()[4])
            inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best):
                best, fstype = mnt, (right.split() or [""])[0]
    return fstype


def _volume_behind(path: str) -> str | None:
    """The PStorage volume a file is, if it is one: a file in the daemon's FUSE
    mount, or nbdfuse's RUN/exports/NAME/fuse/NAME (exports.py)."""
    if fstype(path) == "fuse.pstorage":
        return os.path.basename(path)
    m = re.fullmatch(r"(.*/exports/([^/]+))/fuse/\2", path)
    if m and os.path.exists(os.path.join(m[1], "state.json")):
        return m[2]
    return None


def _pstorage_volume(name: str | None, real: str) -> str | None:
    """Is this one of PStorage's own devices (an attached volume)? Its name if so."""
    if name is None:  # a regular file
        return _volume_behind(real)
    backing = _read(f"{SYS_BLOCK}/{name}/loop/backing_file")
    if backing:  # decided by the backing file: a stale /dev/pstorage link must not count
        return _volume_behind(backing.removesuffix(" (deleted)"))
    if not name.startswith("nbd"):
        return None
    # a connected nbd device: nbd-client (ioctl mode: its pid) on one of our export sockets
    pid = _read(f"{SYS_BLOCK}/{name}/pid")
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        argv = []
    if any(re.search(r"/exports/[^/]+/nbd\.sock$", a) for a in argv) and "-N" in argv[:-1]:
        return argv[argv.index("-N") + 1]
    try:  # or (netlink mode: no process) the stable name attach gave it
        for link in os.listdir(dev_dir()):
            if os.path.realpath(os.path.join(dev_dir(), link)) == real:
                return link
    except OSError:
        pass
    return None


def _lockers(st: os.stat_result) -> list[str]:
    """Processes holding a flock() write lock on this inode (/proc/locks; a
    running pstoraged holds one on its pool device)."""
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    out = []
    for line in (_read("/proc/locks") or "").splitlines():
        f = line.split()
        if len(f) < 6 or f[1] != "FLOCK" or f[3] != "WRITE":
            continue
        try:
            major, minor, ino = f[5].split(":")
            if (int(major, 16), int(minor, 16), int(ino)) != want:
                continue
        except ValueError:
            continue
        cmd = (_read(f"/proc/{f[4]}/cmdline") or "").replace("\0", " ")
        out.append(f"the pool device of pstoraged (pid {f[4]})" if "pstoraged" in cmd
                   else f"locked by pid {f[4]} ({_read(f'/proc/{f[4]}/comm') or '?'})")
    return out


def _open_exclusively(path: str) -> bool:
    """Has another program the block device open with O_EXCL (mkfs, LVM, a
    kernel user)? Our own O_EXCL open fails with EBUSY then."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC | os.O_NONBLOCK))
    except OSError as e:
        return e.errno == errno.EBUSY
    return False


def _reasons(info: DeviceInfo) -> tuple[str, ...]:
    out = []
    if info.pstorage_volume:
        out.append(f"PStorage volume {info.pstorage_volume}")
    if SWAP_MARK in info.mounted_at:
        out.append("active swap")
    mounts = [m for m in info.mounted_at if m != SWAP_MARK]
    if mounts:
        out.append("mounted at " + ",".join(mounts))
    if info.holders:
        out.append(("backing file of " if info.kind == "file" else "held by ")
                   + ",".join(info.holders))
    return (*out, *info.busy)


def _stacked(names: list[str]) -> list[str]:
    """Every block device built on top of `names` (dm on md on partition ...)."""
    out: list[str] = []
    todo = list(names)
    while todo:
        for h in _ls(f"{SYS_BLOCK}/{todo.pop()}/holders"):
            if h not in out:
                out.append(h)
                todo.append(h)
    return out


def _mounted(nodes: set[str], names: list[str]) -> tuple[str, ...]:
    # Match by major:minor, and by source path because btrfs mounts show an anonymous dev.
    nums = {_read(f"{SYS_BLOCK}/{n}/dev") for n in names} - {None}
    nodes = nodes | {f"/dev/{n}" for n in names}
    found: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, src = left.split(), (right.split() + ["", ""])[1]
            if fields[2] in nums or (src.startswith("/") and os.path.realpath(_unescape(src)) in nodes):
                found.append(_unescape(fields[4]))
    for line in (_read("/proc/swaps") or "").splitlines()[1:]:  # absent without CONFIG_SWAP
        if line.split() and os.path.realpath(_unescape(line.split()[0])) in nodes:
            found.append(SWAP_MARK)
    return tuple(dict.fromkeys(found))


def _probe_magic(buf: bytes) -> list[str]:
    def at(off: int, magic: bytes) -> bool:
        return buf[off : off + len(magic)] == magic

    sigs = []
    if at(0, POOL_MAGIC):
        sigs.append("pstorage")
    if at(0, b"LUKS\xba\xbe"):
        sigs.append("crypto_LUKS")
    if at(0, b"XFSB"):
        sigs.append("xfs")
    if at(1080, b"\x53\xef") and len(buf) >= 1128:
        compat, incompat, _ = struct.unpack_from("<III", buf, 1024 + 0x5C)
        # extents, 64bit or flex_bg mean ext4; a journal alone means ext3
        sigs.append("ext4" if incompat & 0x2C0 else "ext3" if compat & 0x4 else "ext2")
    if at(65600, b"_BHRfS_M"):
        sigs.append("btrfs")
    pages = {mmap.PAGESIZE, 4096, 16384, 65536}  # the swap header may come from another arch
    if any(at(p - 10, m) for p in pages for m in (b"SWAPSPACE2", b"SWAP-SPACE")):
        sigs.append("swap")
    if at(512, b"EFI PART"):
        sigs.append("gpt")
    elif at(510, b"\x55\xaa") and len(buf) >= 512 and any(buf[446 + 16 * i + 4] for i in range(4)):
        sigs.append("dos")  # boot signature plus a used partition slot
    return sigs


def _signatures(path: str) -> tuple[str, ...]:
    try:
        with open(path, "rb", buffering=0) as f:
            own = _probe_magic(f.read(_PROBE_LEN))
    except OSError as e:  # fail closed: we cannot promise the device is empty
        raise DeviceError(f"cannot read {path}: {e.strerror}") from None
    blkid = shutil.which("blkid")
    if blkid is None:
        return tuple(own)
    r = subprocess.run([blkid, "-p", "-o", "export", path], capture_output=True, text=True)
    if r.returncode not in (0, 2):  # 8: ambivalent (several signatures); trust our probe
        return tuple(own) or ("unknown",)
    pairs = (line.partition("=") for line in r.stdout.splitlines())
    sigs = [v for k, _, v in pairs if k in ("TYPE", "PTTYPE") and v]
    return tuple(dict.fromkeys(sigs + [s for s in own if s == "pstorage"]))  # blkid can't know ours


def _lenient_signatures(path: str) -> tuple[str, ...]:
    try:
        return _signatures(path)
    except DeviceError:
        return ("unreadable",)


def _size(path: str, sysdir: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, bytes(8)))[0]
        finally:
            os.close(fd)
    except OSError:
        return int(_read(f"{sysdir}/size", "0") or 0) * 512  # sysfs counts 512-byte sectors


def _identity(path: str, diskdir: str) -> tuple[str | None, str | None]:
    props: dict[str, str] = {}
    if pyudev is not None:
        try:
            props = dict(pyudev.Devices.from_device_file(pyudev.Context(), path).properties)
        except Exception as e:  # no libudev or an odd sysfs: plain sysfs reads still work
            log.debug("pyudev failed on %s: %s", path, e)
    # ID_* exist only when udevd ran; sysfs has the same model/serial for most disks
    model = props.get("ID_MODEL") or _read(f"{diskdir}/device/model")
    serial = (props.get("ID_SERIAL_SHORT") or _read(f"{diskdir}/serial")
              or _read(f"{diskdir}/device/serial"))
    return model or None, serial or None


def describe(path: str, *, lenient: bool = False) -> DeviceInfo:
    """What `path` is. lenient: a device that cannot be read (no permission,
    I/O error) is described with signatures ("unreadable",) instead of
    refused; listing uses it, creating a pool never does."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise DeviceError(f"cannot use {path}: {e.strerror}") from None
    real = os.path.realpath(path)
    if stat.S_ISREG(st.st_mode):
        # a loop device backed by this file is using it just like a mount would
        loops = [n for n in _ls(SYS_BLOCK)
                 if (_read(f"{SYS_BLOCK}/{n}/loop/backing_file") or "").removesuffix(" (deleted)") == real]
        sigs = _signatures(path)
        busy = _lockers(st)
        # the loop device a running pool keeps over its own metadata region is
        # the pool's business: its lock (above) says who uses the file
        region = [n for n in loops if "pstorage" in sigs
                  and _read(f"{SYS_BLOCK}/{n}/loop/offset") == str(META_OFFSET)]
        loops = [n for n in loops if n not in region]
        if region and not busy:
            busy.append(f"the metadata region of a PStorage pool ({','.join(region)})")
        info = DeviceInfo(path, "file", st.st_size, 4096, st.st_blksize or 4096, None, None, None,
                          False, False, sigs,
                          _mounted({real}, loops + _stacked(loops)), tuple(loops), (),
                          _pstorage_volume(None, real), tuple(busy))
        return dataclasses.replace(info, in_use=_reasons(info))
    if not stat.S_ISBLK(st.st_mode):
        raise DeviceError(f"{path} is neither a block device nor a regular file")
    sysdir = os.path.realpath(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
    name = os.path.basename(sysdir)
    # a partition's queue/ and device/ live in its parent disk's directory
    diskdir = os.path.dirname(sysdir) if os.path.exists(f"{sysdir}/partition") else sysdir
    parts = tuple(p for p in _ls(sysdir) if os.path.exists(f"{sysdir}/{p}/partition"))
    holders = tuple(dict.fromkeys(h for n in (name, *parts) for h in _ls(f"{SYS_BLOCK}/{n}/holders")))
    model, serial = _identity(path, diskdir)
    rot = _read(f"{diskdir}/queue/rotational")
    mounted_at = _mounted({real}, [name, *parts, *_stacked([name, *parts])])
    busy = _lockers(st)
    if not (mounted_at or holders or busy) and _open_exclusively(path):  # those hold it O_EXCL too
        busy.append("open exclusively by another program")
    info = DeviceInfo(
        path=path, kind="block", size_bytes=_size(path, sysdir),
        logical_block_size=int(_read(f"{diskdir}/queue/logical_block_size", "512") or 512),
        physical_block_size=int(_read(f"{diskdir}/queue/physical_block_size", "512") or 512),
        rotational=None if rot is None else rot == "1", model=model, serial=serial,
        is_nvme=name.startswith("nvme"), is_loop=name.startswith("loop"),
        signatures=_lenient_signatures(path) if lenient else _signatures(path),
        mounted_at=mounted_at, holders=holders, partitions=parts,
        pstorage_volume=_pstorage_volume(name, real), busy=tuple(busy))
    return dataclasses.replace(info, in_use=_reasons(info))


_WHAT = {"gpt": "a GPT partition table", "dos": "an MBR partition table", "swap": "a swap area",
         "pstorage": "a PStorage pool", "crypto_LUKS": "a LUKS encrypted volume",
         "LVM2_member": "an LVM physical volume", "linux_raid_member": "an md RAID member",
         "unknown": "conflicting signatures (see `wipefs PATH`)"}


def vet(info: DeviceInfo, force: bool) -> None:
    """Refuse a device in use (always) or holding data (unless force)."""
    p = info.path
    if info.pstorage_volume:
        raise DeviceInUse(f"{p} is PStorage volume {info.pstorage_volume} itself: a pool on it "
                          "would store PStorage inside PStorage (--force does not override this)")
    if SWAP_MARK in info.mounted_at:
        raise DeviceInUse(f"{p} (or a device on it) is active swap; run swapoff first "
                          "(--force does not override this)")
    if info.mounted_at:
        raise DeviceInUse(f"{p} is mounted at {', '.join(info.mounted_at)}; unmount it first "
                          "(--force does not override this)")
    if info.holders and info.kind == "file":
        raise DeviceInUse(f"{p} is the backing file of {', '.join(info.holders)}; detach it with "
                          "`losetup -d` first (--force does not override this)")
    if info.holders:
        raise DeviceInUse(f"{p} is in use by {', '.join(info.holders)} (device-mapper, md RAID, ...); "
                          "remove those first (--force does not override this)")
    if info.busy:
        raise DeviceInUse(f"{p} is in use: {'; '.join(info.busy)}; stop that first "
                          "(--force does not override this)")
    if force:
        return
    if info.signatures:
        what = " and ".join(_WHAT.get(s, f"a {s} filesystem") for s in info.signatures)
        raise DeviceHasData(f"{p} holds {what}; pass --force to overwrite it")
    if info.partitions:
        raise DeviceHasData(f"{p} has partitions {', '.join(info.partitions)}; "
                            "pass --force to overwrite them")


def list_candidates() -> list[DeviceInfo]:
    """Whole disks, loop devices and NVMe namespaces that could hold a pool."""
    try:
        ctx = pyudev.Context()  # type: ignore[union-attr]
        found = [(d.sys_name, d.device_node) for d in ctx.list_devices(subsystem="block", DEVTYPE="disk")]
    except Exception as e:  # no libudev: sysfs lists the same devices
        log.debug("pyudev enumeration failed: %s", e)
        found = [(n, f"/dev/{n}") for n in _ls(SYS_BLOCK) if not os.path.exists(f"{SYS_BLOCK}/{n}/partition")]
    out = []
    for name, node in found:
        # ram/zram are volatile, unbound loops are empty, hidden nvmeXcYnZ are multipath legs
        if (not node or name.startswith(("ram", "zram")) or _read(f"{SYS_BLOCK}/{name}/size", "0") == "0"
                or _read(f"{SYS_BLOCK}/{name}/hidden") == "1"):
            continue
        try:
            out.append(describe(node, lenient=True))
        except DeviceError as e:  # e.g. no device node inside a container
            log.debug("skipping %s: %s", node, e)
    return out
