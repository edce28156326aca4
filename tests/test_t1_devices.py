"""Tests for pstoraged.engine.devices: describing and vetting backing devices and files."""

from __future__ import annotations

import dataclasses
import os
import shutil
import struct
import subprocess
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pstoraged.engine import devices
from pstoraged.engine.devices import DeviceError, DeviceHasData, DeviceInfo, DeviceInUse
from pstoraged.errors import Conflict, InvalidArgument, PStorageError

MiB = 1024 * 1024
IS_ROOT = os.geteuid() == 0
needs_loop = pytest.mark.skipif(
    not IS_ROOT or shutil.which("losetup") is None,
    reason="loop device tests need root and losetup (util-linux)",
)


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def write_gpt(path: Path, partition: bool = True) -> int:
    """Write a valid GPT (protective MBR, both headers); return the partition's size."""
    n = path.stat().st_size // 512
    entries = bytearray(128 * 128)
    if partition:  # one Linux-filesystem partition from LBA 2048 to the last usable LBA
        linux = uuid.UUID("0FC63DAF-8483-4772-8E79-3D69D8477DE4").bytes_le
        entries[:128] = struct.pack("<16s16sQQQ72s", linux, uuid.uuid4().bytes_le, 2048, n - 34,
                                    0, "data".encode("utf-16-le"))
    disk_guid = uuid.uuid4().bytes_le

    def header(my: int, alt: int, entries_lba: int) -> bytes:
        fields = [b"EFI PART", 0x10000, 92, 0, 0, my, alt, 34, n - 34, disk_guid, entries_lba,
                  128, 128, zlib.crc32(entries)]
        fields[3] = zlib.crc32(struct.pack("<8sIIIIQQQQ16sQIII", *fields))
        return struct.pack("<8sIIIIQQQQ16sQIII", *fields).ljust(512, b"\0")

    mbr = bytearray(512)
    mbr[446:462] = struct.pack("<B3sB3sII", 0, b"\0\2\0", 0xEE, b"\xff\xff\xff", 1,
                               min(n - 1, 0xFFFFFFFF))
    mbr[510:512] = b"\x55\xaa"
    with open(path, "r+b") as f:
        for lba, data in ((0, mbr), (1, header(1, n - 1, 2)), (2, entries),
                          (n - 33, entries), (n - 1, header(n - 1, 1, n - 33))):
            f.seek(lba * 512)
            f.write(data)
    return (n - 34 - 2048 + 1) * 512


@pytest.fixture
def loop_factory(tmp_path: Path) -> Iterator:
    """Attach loop devices over temp files; detach them all afterwards."""
    attached: list[str] = []

    def make(size: int = 64 * MiB, *extra: str, prepare=None) -> tuple[str, Path]:
        img = sparse(tmp_path / f"disk{len(attached)}.img", size)
        if prepare:
            prepare(img)
        dev = run("losetup", "-f", "--show", *extra, str(img))
        attached.append(dev)
        return dev, img

    try:
        yield make
    finally:
        for dev in attached:
            subprocess.run(["losetup", "-d", dev], check=False)


@pytest.fixture
def mount_dir(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        yield mnt
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["umount", str(mnt)], check=False)


# --- regular files --------------------------------------------------------------------------


def test_describe_sparse_file(tmp_path: Path) -> None:
    f = sparse(tmp_path / "pool.img", 100 * MiB)
    info = devices.describe(str(f))
    assert info.kind == "file" and info.path == str(f)
    assert info.size_bytes == 100 * MiB
    assert info.logical_block_size == 4096
    assert info.physical_block_size == os.stat(f).st_blksize
    assert info.rotational is None and info.model is None and info.serial is None
    assert not info.is_nvme and not info.is_loop
    assert info.signatures == info.mounted_at == info.holders == info.partitions == ()
    devices.vet(info, force=False)  # an empty file is fine without --force


def test_describe_rejects_missing_and_char_devices(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="cannot use"):
        devices.describe(str(tmp_path / "nope"))
    with pytest.raises(DeviceError, match="neither a block device nor a regular file"):
        devices.describe("/dev/null")
    assert DeviceError.exit_code == DeviceHasData.exit_code == InvalidArgument.exit_code
    assert DeviceInUse.exit_code == Conflict.exit_code
    assert issubclass(DeviceError, PStorageError)  # the CLI prints one line, no traceback


def test_ext4_file_detected_and_vetted(tmp_path: Path) -> None:
    f = sparse(tmp_path / "ext4.img", 32 * MiB)
    run("mkfs.ext4", "-q", "-F", str(f))
    info = devices.describe(str(f))
    assert info.signatures == ("ext4",)
    with pytest.raises(DeviceHasData, match=r"holds an? ext4 filesystem; pass --force"):
        devices.vet(info, force=False)
    devices.vet(info, force=True)


def test_gpt_file_detected(tmp_path: Path) -> None:
    f = sparse(tmp_path / "gpt.img", 16 * MiB)
    write_gpt(f)
    info = devices.describe(str(f))
    assert info.signatures == ("gpt",)
    with pytest.raises(DeviceHasData, match="GPT partition table; pass --force"):
        devices.vet(info, force=False)


def test_pstorage_pool_detected_alongside_blkid(tmp_path: Path) -> None:
    f = sparse(tmp_path / "pool.img", 4 * MiB)
    with open(f, "r+b") as fh:
        fh.write(b"PSTPOOL\0" + bytes(56))
    info = devices.describe(str(f))
    assert "pstorage" in info.signatures
    with pytest.raises(DeviceHasData, match="PStorage pool; pass --force"):
        devices.vet(info, force=False)


def _magic(buf: bytearray, off: int, data: bytes) -> None:
    buf[off : off + len(data)] = data


MAGICS = {
    "pstorage": [(0, b"PSTPOOL\0")],
    "crypto_LUKS": [(0, b"LUKS\xba\xbe")],
    "xfs": [(0, b"XFSB")],
    "ext2": [(1080, b"\x53\xef")],
    "ext3": [(1080, b"\x53\xef"), (1024 + 0x5C, struct.pack("<I", 0x4))],
    "ext4": [(1080, b"\x53\xef"), (1024 + 0x5C, struct.pack("<II", 0x4, 0x2C2))],
    "btrfs": [(65600, b"_BHRfS_M")],
    "swap": [(4096 - 10, b"SWAPSPACE2")],
    "gpt": [(446 + 4, b"\xee"), (510, b"\x55\xaa"), (512, b"EFI PART")],
    "dos": [(446 + 4, b"\x83"), (510, b"\x55\xaa")],
}


@pytest.mark.parametrize("expected", sorted(MAGICS))
def test_magic_fallback_without_blkid(tmp_path: Path, monkeypatch, expected: str) -> None:
    monkeypatch.setattr(devices.shutil, "which", lambda _name: None)
    buf = bytearray(128 * 1024)
    for off, data in MAGICS[expected]:
        _magic(buf, off, data)
    (tmp_path / "x.img").write_bytes(buf)
    assert devices.describe(str(tmp_path / "x.img")).signatures == (expected,)


def test_magic_fallback_ignores_empty_mbr(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(devices.shutil, "which", lambda _name: None)
    buf = bytearray(8192)
    _magic(buf, 510, b"\x55\xaa")  # boot signature but no used partition slot
    (tmp_path / "x.img").write_bytes(buf)
    assert devices.describe(str(tmp_path / "x.img")).signatures == ()


def test_vet_in_use_messages() -> None:
    base = DeviceInfo("/dev/sdz", "block", MiB, 512, 4096, True, None, None, False, False,
                      (), (), (), ())
    cases: list[tuple[dict[str, Any], str]] = [
        ({"mounted_at": ("[swap]",)}, "active swap; run swapoff"),
        ({"holders": ("dm-3",)}, "in use by dm-3"),
        ({"holders": ("loop4",), "kind": "file"}, "backing file of loop4; detach"),
        ({"mounted_at": ("/srv",)}, "mounted at /srv; unmount it first"),
    ]
    for change, msg in cases:
        info = dataclasses.replace(base, signatures=("ext4",), **change)
        for force in (False, True):
            with pytest.raises(DeviceInUse, match=msg):
                devices.vet(info, force=force)
    with pytest.raises(DeviceHasData, match="has partitions sdz1; pass --force"):
        devices.vet(dataclasses.replace(base, partitions=("sdz1",)), force=False)
    for change, msg in [({"pstorage_volume": "db"}, "PStorage volume db itself"),
                        ({"busy": ("open exclusively by another program",)},
                         "in use: open exclusively by another program; stop that first")]:
        for force in (False, True):
            with pytest.raises(DeviceInUse, match=msg):
                devices.vet(dataclasses.replace(base, **change), force=force)


# --- loop devices ---------------------------------------------------------------------------


@needs_loop
@pytest.mark.parametrize("sector", [512, 4096])
def test_describe_loop_device(loop_factory, sector: int) -> None:
    dev, _img = loop_factory(64 * MiB, "--sector-size", str(sector))
    info = devices.describe(dev)
    assert info.kind == "block" and info.path == dev
    assert info.size_bytes == 64 * MiB
    assert info.logical_block_size == sector
    assert info.physical_block_size >= sector
    assert info.is_loop and not info.is_nvme
    assert isinstance(info.rotational, bool)
    assert info.signatures == info.mounted_at == info.holders == info.partitions == ()
    devices.vet(info, force=False)


@needs_loop
def test_loop_ext4_needs_force(loop_factory) -> None:
    dev, img = loop_factory()
    run("mkfs.ext4", "-q", dev)
    info = devices.describe(dev)
    assert info.signatures == ("ext4",)
    with pytest.raises(DeviceHasData, match=f"{dev} holds an? ext4 filesystem; pass --force"):
        devices.vet(info, force=False)
    devices.vet(info, force=True)
    # the image file behind the loop device is in use while the loop device exists
    file_info = devices.describe(str(img))
    assert file_info.holders == (os.path.basename(dev),)
    with pytest.raises(DeviceInUse, match="backing file"):
        devices.vet(file_info, force=True)


@needs_loop
def test_mounted_loop_in_use_even_with_force(loop_factory, mount_dir: Path) -> None:
    dev, _img = loop_factory()
    run("mkfs.ext4", "-q", dev)
    run("mount", dev, str(mount_dir))
    info = devices.describe(dev)
    assert str(mount_dir) in info.mounted_at
    for force in (False, True):
        with pytest.raises(DeviceInUse, match=f"mounted at {mount_dir}; unmount it first"):
            devices.vet(info, force=force)


@needs_loop
def test_loop_partitions_found(loop_factory, mount_dir: Path) -> None:
    sizes: list[int] = []
    dev, _img = loop_factory(32 * MiB, "-P", prepare=lambda img: sizes.append(write_gpt(img)))
    name = os.path.basename(dev)
    if not os.path.exists(f"/sys/class/block/{name}/{name}p1"):
        run("partx", "-a", dev)  # kernels without GPT support (microVMs): add it from userspace
    info = devices.describe(dev)
    assert info.partitions == (f"{name}p1",)
    assert info.signatures == ("gpt",)
    with pytest.raises(DeviceHasData, match="GPT partition table"):
        devices.vet(info, force=False)
    devices.vet(info, force=True)
    part = devices.describe(f"{dev}p1")
    assert part.size_bytes == sizes[0] and part.logical_block_size == 512
    # mounting a partition makes the whole disk in use
    run("mkfs.ext4", "-q", f"{dev}p1")
    run("mount", f"{dev}p1", str(mount_dir))
    with pytest.raises(DeviceInUse, match=str(mount_dir)):
        devices.vet(devices.describe(dev), force=True)


@needs_loop
def test_list_candidates_includes_loop(loop_factory) -> None:
    dev, _img = loop_factory()
    found = {i.path: i for i in devices.list_candidates()}
    assert dev in found and found[dev].size_bytes == 64 * MiB
    assert not any(os.path.basename(p).startswith(("ram", "zram")) for p in found)
    assert all(i.size_bytes > 0 for i in found.values())


@needs_loop
def test_active_swap_in_use_even_with_force(loop_factory) -> None:
    dev, _img = loop_factory(16 * MiB)
    run("mkswap", "-q", dev)
    assert devices.describe(dev).signatures == ("swap",)
    run("swapon", dev)
    try:
        info = devices.describe(dev)
        assert info.mounted_at == ("[swap]",)
        with pytest.raises(DeviceInUse, match="active swap; run swapoff"):
            devices.vet(info, force=True)
    finally:
        subprocess.run(["swapoff", dev], check=False)


def test_devices_command_lists_status(loop_factory) -> None:
    import json
    import subprocess
    import sys

    free, _ = loop_factory()
    used, _ = loop_factory(prepare=lambda p: subprocess.run(["mkfs.ext4", "-q", "-F", str(p)],
                                                             check=True))
    out = subprocess.run([sys.executable, "-m", "pstoraged.control.cli", "devices", "--json"],
                         capture_output=True, text=True, check=True).stdout
    found = {d["path"]: d for d in json.loads(out)}
    assert found[free]["signatures"] == [] and found[free]["is_loop"]
    assert "ext4" in found[used]["signatures"]
    table = subprocess.run([sys.executable, "-m", "pstoraged.control.cli", "devices"],
                           capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in table.splitlines() if ln.startswith(used + " "))
    assert "has data: ext4" in line and "64.0 MiB" in line


@needs_loop
def test_a_plain_loop_device_is_free_until_someone_holds_it(loop_factory, tmp_path) -> None:
    """Free: offered, and no in-use reason. Then held with O_EXCL (as mkfs, LVM
    or a kernel user hold it), then as a pool's device: in use, with the reason."""
    from pstoraged.engine.pool import create_pool, open_pool

    dev, _img = loop_factory()
    info = devices.describe(dev)
    assert info.in_use == () and info.pstorage_volume is None and info.busy == ()
    fd = os.open(dev, os.O_RDONLY | os.O_EXCL)
    try:
        info = devices.describe(dev)
        assert info.in_use == ("open exclusively by another program",)
        with pytest.raises(DeviceInUse, match="open exclusively"):
            devices.vet(info, force=True)
    finally:
        os.close(fd)
    assert devices.describe(dev).in_use == ()

    create_pool(str(tmp_path / "pool"), dev, segment_size=1 << 20)
    pool = open_pool(str(tmp_path / "pool"))  # flock()s the device, as pstoraged does
    try:
        info = devices.describe(dev)
        assert info.busy == (f"locked by pid {os.getpid()} ({Path('/proc/self/comm').read_text().strip()})",)
        with pytest.raises(DeviceInUse, match=f"locked by pid {os.getpid()}"):
            devices.vet(info, force=True)
    finally:
        pool.close()
    assert devices.describe(dev).in_use == ()
