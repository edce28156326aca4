"""Pools: creation, vetting, locking, versions, and the O_DIRECT block-device path."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess

import pytest

from pstoraged.engine.devices import DeviceHasData
from pstoraged.engine.engine import Engine
from pstoraged.engine.format import METADATA_VERSION, SUPERBLOCK_OFFSETS
from pstoraged.engine.pool import create_pool, open_pool, raw_metadata
from pstoraged.errors import FormatError, InvalidArgument, PoolLocked

from .conftest import make_pool


def test_refuses_a_file_holding_a_filesystem(tmp_path):
    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
    with pytest.raises(DeviceHasData, match="ext4"):
        create_pool(str(tmp_path / "p"), str(img))
    create_pool(str(tmp_path / "p"), str(img), force=True, segment_size=1 << 20)
    # and a pool is itself a signature another pool create refuses
    with pytest.raises((DeviceHasData, InvalidArgument)):
        create_pool(str(tmp_path / "q"), str(img))


def test_too_small_and_bad_geometry(tmp_path):
    with pytest.raises(InvalidArgument, match="segments"):
        create_pool(str(tmp_path), str(tmp_path / "d"), file_size=2 << 20)
    # a refused create leaves nothing it made: neither the directory nor the file
    with pytest.raises(InvalidArgument, match="segments"):
        create_pool(str(tmp_path / "new"), str(tmp_path / "new.img"), file_size=2 << 20)
    assert not os.path.exists(tmp_path / "new") and not os.path.exists(tmp_path / "new.img")
    with pytest.raises(InvalidArgument, match="segment size"):
        create_pool(str(tmp_path), str(tmp_path / "e"), file_size=64 << 20, segment_size=5000)


def test_second_open_is_refused_while_locked(pool_dir):
    pool = open_pool(pool_dir)
    try:
        with pytest.raises(PoolLocked, match="another pstoraged"):
            open_pool(pool_dir)
    finally:
        pool.close()
    open_pool(pool_dir).close()


def test_unknown_versions_and_foreign_devices_are_refused(tmp_path):
    a = make_pool(str(tmp_path / "a"))
    with raw_metadata(a) as meta:
        meta.put_json("format_version", 99)
        meta.commit()
    with pytest.raises(FormatError, match="version 99"):
        open_pool(a)
    # version 1 metadata (an exact dedupe index, no heat/hist tables) is upgraded on open
    with raw_metadata(a) as meta:
        meta.put_json("format_version", 1)
        meta.commit()
    open_pool(a).close()
    with raw_metadata(a) as meta:
        assert meta.get_json("format_version") == METADATA_VERSION == 5
    b = make_pool(str(tmp_path / "b"))
    c = make_pool(str(tmp_path / "c"))
    with open(os.path.join(b, "pool.json")) as f:
        info = json.load(f)
    info["device"] = os.path.join(c, "dev.img")  # b's metadata, c's device
    with open(os.path.join(b, "pool.json"), "w") as f:
        json.dump(info, f)
    with pytest.raises(FormatError, match="holds pool"):
        open_pool(b)


def test_backup_superblock_is_used_when_the_primary_is_damaged(pool_dir):
    dev = os.path.join(pool_dir, "dev.img")
    with open(dev, "r+b") as f:
        f.seek(SUPERBLOCK_OFFSETS[0] + 20)
        f.write(b"garbage")
    open_pool(pool_dir).close()
    with open(dev, "r+b") as f:
        f.seek(SUPERBLOCK_OFFSETS[1] + 20)
        f.write(b"garbage")
    with pytest.raises(FormatError, match="no valid PStorage superblock"):
        open_pool(pool_dir)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("losetup"), reason="needs root and losetup")
def test_block_device_with_o_direct(tmp_path):
    img = tmp_path / "blk.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    dev = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        create_pool(str(tmp_path / "p"), dev, segment_size=256 << 10)
        eng = Engine(open_pool(str(tmp_path / "p")))
        assert eng.pool.backing.is_block and eng.pool.backing.direct
        vol = eng.create_volume("v", 16 << 20)
        blobs = [os.urandom(4096 * n) for n in (1, 3, 100)]
        offsets = [0, 4096 * 7, 1 << 20]
        for off, b in zip(offsets, blobs, strict=True):
            eng.write(vol, off, b)
        eng.write(vol, 12345 * 512, b"tail" * 300)  # unaligned: read-modify-write
        eng.flush()
        eng.close()
        eng = Engine(open_pool(str(tmp_path / "p")))
        vol = eng.volume("v")
        for off, b in zip(offsets, blobs, strict=True):
            assert eng.read(vol, off, len(b)) == b
        assert eng.read(vol, 12345 * 512, 1200) == b"tail" * 300
        eng.close()
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_a_full_metadata_region_refuses_new_data_and_keeps_the_old(tmp_path):
    """A 4 MiB region fills long before the 256 MiB of segments: writes get
    ENOSPC naming the metadata region, trims still work, nothing acknowledged
    before is lost, and the pool reopens."""
    from pstoraged.errors import PoolFull

    d = str(tmp_path / "p")
    create_pool(d, str(tmp_path / "dev.img"), file_size=(256 << 20) + (5 << 20),
                segment_size=1 << 20, meta_size=4 << 20)
    eng = Engine(open_pool(d))
    v = eng.create_volume("v", 1 << 30)
    seed = 0
    written = 0
    with pytest.raises(PoolFull, match="metadata region is full") as e:
        while True:
            eng.write(v, written * 4096, seed.to_bytes(8, "little") * 512)
            written += 1
            seed += 1
            if written % 256 == 0:
                eng.flush()
    assert e.value.errno == errno.ENOSPC
    assert eng.failed is None  # refused before the region ran out: no transaction lost
    assert written > 1000 and eng.segs.free_count() > 0  # the segments still had room
    eng.flush()
    usage = eng.meta.usage()
    assert usage["used"] < usage["size"]
    eng.trim(v, 0, 256 * 4096)  # trims make room and are not refused
    eng.flush()
    eng.close()
    eng = Engine(open_pool(d))
    try:
        v = eng.volume("v")
        assert eng.read(v, 0, 4096) == bytes(4096)
        for i in (256, written // 2, written - 1):
            assert eng.read(v, i * 4096, 4096) == i.to_bytes(8, "little") * 512
    finally:
        eng.close()


def make_format_1_pool(d: str, dev: str, segments: int = 64, segment_size: int = 64 << 10) -> None:
    """A pool as releases before format 2 made it: a version-1 superblock with
    no metadata region, the LMDB store in d/meta."""
    import time
    import uuid as uuidlib

    from pstoraged.engine.backing import Backing
    from pstoraged.engine.format import DATA_OFFSET, Superblock
    from pstoraged.engine.metadata import MetaStore

    os.makedirs(d, mode=0o700)
    with open(os.open(dev, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
        f.truncate(DATA_OFFSET + segments * segment_size)
    sb = Superblock(uuidlib.uuid4().bytes, time.time_ns(), os.path.getsize(dev), segment_size,
                    segments, DATA_OFFSET, "", version=1)
    b = Backing(dev)
    for off in SUPERBLOCK_OFFSETS:
        b.pwrite(off, sb.to_bytes())
    b.sync()
    b.close()
    meta = MetaStore(os.path.join(d, "meta"))
    meta.put_json("format_version", 4)
    meta.put_json("pool_uuid", sb.uuid.hex())
    meta.commit()
    meta.close()
    with open(os.path.join(d, "pool.json"), "w") as f:
        json.dump({"uuid": sb.uuid.hex(), "device": dev, "created_ns": sb.created_ns}, f)
    os.chmod(os.path.join(d, "pool.json"), 0o600)


def test_a_format_1_pool_with_its_metadata_on_the_host_still_opens(tmp_path):
    """Pools made before format 2 keep their LMDB store in DIR/meta/ and a
    version-1 superblock with no metadata region: they open and work as before."""
    d, dev = str(tmp_path / "old"), str(tmp_path / "old.img")
    make_format_1_pool(d, dev)
    eng = Engine(open_pool(d))
    assert eng.pool.region is None and eng.pool.sb.version == 1
    assert eng.pool.metadata_location()["where"] == "host"
    v = eng.create_volume("v", 1 << 20)
    data = os.urandom(64 << 10)
    eng.write(v, 0, data)
    eng.close()
    eng = Engine(open_pool(d))
    try:
        assert eng.read(eng.volume("v"), 0, len(data)) == data
    finally:
        eng.close()


def test_a_format_1_pool_is_upgraded_onto_its_device(tmp_path):
    """pool upgrade moves DIR/meta into a region carved from free tail
    segments, or behind the segments on a grown device; refused (nothing
    changed) while the tail segments hold data."""
    from pstoraged.engine.pool import upgrade_pool
    from pstoraged.errors import Conflict

    d, dev = str(tmp_path / "old"), str(tmp_path / "old.img")
    make_format_1_pool(d, dev, segments=40, segment_size=1 << 20)
    eng = Engine(open_pool(d))
    v = eng.create_volume("v", 64 << 20)
    blocks = {i: os.urandom(4096) for i in range(0, 36 * 256, 7)}  # ~5 MiB spread out
    for i, data in blocks.items():
        eng.write(v, i * 4096, data)
    eng.generations.freeze(v)
    eng.write(v, 0, b"new!" * 1024)
    eng.close()
    # a 4 MiB region needs the last 4 segments free: they are
    sb = upgrade_pool(d, meta_size=4 << 20)
    assert sb.version == 2 and sb.segment_count == 36 and sb.meta_size == 4 << 20
    assert sb.meta_offset == sb.data_offset + 36 * (1 << 20)
    assert not os.path.exists(os.path.join(d, "meta"))
    eng = Engine(open_pool(d))
    try:
        assert eng.pool.region is not None
        v = eng.volume("v")
        assert eng.read(v, 0, 4096) == b"new!" * 1024
        for i, data in list(blocks.items())[1:]:
            assert eng.read(v, i * 4096, 4096) == data
    finally:
        eng.close()
    from pstoraged.engine.check import check_offline

    assert check_offline(d).counts == {}

    # a pool whose tail segments hold data: refused and left as it was
    d2, dev2 = str(tmp_path / "full"), str(tmp_path / "full.img")
    make_format_1_pool(d2, dev2, segments=12, segment_size=1 << 20)
    eng = Engine(open_pool(d2))
    v = eng.create_volume("v", 64 << 20)
    for i in range(0, 9 * 256):
        eng.write(v, i * 4096, os.urandom(4096))
    eng.close()
    with pytest.raises(Conflict, match="grow the device by 4 MiB"):
        upgrade_pool(d2, meta_size=4 << 20)
    assert os.path.isdir(os.path.join(d2, "meta"))
    # grown by the region's size: the region goes behind the segments
    with open(dev2, "r+b") as f:
        f.truncate(os.path.getsize(dev2) + (4 << 20))
    sb = upgrade_pool(d2, meta_size=4 << 20)
    assert sb.segment_count == 12 and sb.meta_offset >= sb.data_offset + 12 * (1 << 20)
    eng = Engine(open_pool(d2))
    try:
        assert eng.pool.region is not None and len(eng.read(eng.volume("v"), 0, 8192)) == 8192
    finally:
        eng.close()
    assert check_offline(d2).counts == {}
