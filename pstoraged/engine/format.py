"""The on-disk format, in one place.

Every record written to the backing device and every key/value layout in the
metadata store is defined here; `docs/format.md` mirrors it byte by byte.
Records carry magic, version and CRC32 so that a pool can be verified and, in
the worst case, rebuilt from the data alone.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import ClassVar, NewType

from ..errors import CorruptData, FormatError

# Version of the device format. 2 (issue 13): the superblock names the
# metadata region (meta_offset, meta_size) that holds the pool's metadata on
# its own device, and a chunk record names the allocation sequence number of
# the segment it was written into, so that a record left from an earlier use
# of a reused segment is never taken for a live one (ChunkHeader). Version-1
# pools (metadata in the host's pool directory, version-1 records) still open.
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
# Version of the metadata store's layout and rules (meta key `format_version`).
# 2: the `fp` index is a hint (entries of freed chunks stay until pruned), and
#    the `heat` and `hist` tables exist. A version-1 store is upgraded on open
#    (it has no stale entries); a daemon that only knows 1 refuses a 2.
# 3: new `fp` entries wait in memory, merged in the background (`fp_upto`).
# 4: restores and clone fills run in the background (`restoring`, `filling`);
#    a daemon that only knows 3 would serve a half-copied volume, so it refuses.
# 5: changed-block tracking (`cbt` table, meta `cbt_since`, changes.py); a
#    daemon that only knows 4 would change maps without marking them, and later
#    diffs would miss those changes, so it refuses.
METADATA_VERSION = 5
SUPPORTED_METADATA_VERSIONS = (1, 2, 3, 4, 5)

BLOCK_SIZE = 4096  # logical block of every volume
ALIGN = 4096  # device I/O alignment (O_DIRECT, and padding at each flush)
RECORD_ALIGN = 16  # chunk records start on 16-byte boundaries inside a segment
SUPERBLOCK_OFFSETS = (0, 65536)  # primary and backup copy
META_OFFSET = 1 << 20  # the metadata region starts at 1 MiB (format 2)
REGION_ALIGN = 1 << 20  # the region's size and the first segment are 1 MiB aligned
DATA_OFFSET = 1 << 20  # format 1: the first segment at 1 MiB, no metadata region
DEFAULT_SEGMENT_SIZE = 4 << 20
ZERO_BLOCK = bytes(BLOCK_SIZE)

LBA = NewType("LBA", int)
ChunkId = NewType("ChunkId", int)
SegmentNo = NewType("SegmentNo", int)
VolumeId = NewType("VolumeId", int)

NO_CHUNK = ChunkId(0)  # an L2P value meaning "reads as zeros" (a tombstone)


def crc32(*parts: bytes | memoryview) -> int:
    c = 0
    for p in parts:
        c = zlib.crc32(p, c)
    return c


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def align_down(n: int, a: int = ALIGN) -> int:
    return n // a * a


class _Record:
    """A fixed-size binary record: `STRUCT`, magic, version and a trailing CRC32."""

    STRUCT: ClassVar[struct.Struct]
    MAGIC: ClassVar[bytes]

    @classmethod
    def _check(cls, buf: bytes | memoryview, what: str) -> tuple:
        if len(buf) < cls.STRUCT.size:
            raise CorruptData(f"{what}: short record ({len(buf)} bytes)")
        body = bytes(buf[: cls.STRUCT.size])
        fields = cls.STRUCT.unpack(body)
        if fields[0] != cls.MAGIC:
            raise CorruptData(f"{what}: bad magic {fields[0]!r}")
        if fields[1] not in SUPPORTED_VERSIONS:
            raise FormatError(
                f"{what}: format version {fields[1]} is not supported "
                f"(this build reads {SUPPORTED_VERSIONS})",
                "upgrade pstorage",
            )
        if crc32(body[:-4]) != fields[-1]:
            raise CorruptData(f"{what}: header checksum mismatch")
        return fields


@dataclass(frozen=True, slots=True)
class Superblock(_Record):
    """Pool identity and geometry; at offsets 0 and 64 KiB of the backing device."""

    uuid: bytes  # 16 bytes
    created_ns: int
    device_size: int
    segment_size: int
    segment_count: int
    data_offset: int
    label: str
    meta_offset: int = 0  # the metadata region (format 2); 0, 0: metadata on the host (format 1)
    meta_size: int = 0
    version: int = FORMAT_VERSION

    # magic, version, flags, block_size, uuid, created, device_size,
    # segment_size, segment_count, data_offset, label, meta_offset, meta_size,
    # reserved, crc
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<8sHHI16sQQIIQ32sQQ16sI")
    MAGIC: ClassVar[bytes] = b"PSTPOOL\0"

    @property
    def has_region(self) -> bool:
        return self.meta_size > 0

    def to_bytes(self) -> bytes:
        body = self.STRUCT.pack(
            self.MAGIC, self.version, 0, BLOCK_SIZE, self.uuid, self.created_ns,
            self.device_size, self.segment_size, self.segment_count, self.data_offset,
            self.label.encode()[:32], self.meta_offset, self.meta_size, b"", 0,
        )
        raw = body[:-4] + struct.pack("<I", crc32(body[:-4]))
        return raw.ljust(ALIGN, b"\0")

    @classmethod
    def from_buffer(cls, buf: bytes | memoryview) -> Superblock:
        f = cls._check(buf, "superblock")
        if f[3] != BLOCK_SIZE:
            raise FormatError(f"superblock: block size {f[3]} unsupported")
        meta_offset, meta_size = (f[11], f[12]) if f[1] >= 2 else (0, 0)
        return cls(f[4], f[5], f[6], f[7], f[8], f[9], f[10].rstrip(b"\0").decode(),
                   meta_offset, meta_size, f[1])


@dataclass(frozen=True, slots=True)
class SegmentHeader(_Record):
    """First 4 KiB of every segment: which pool, which segment, written when."""

    segment: int
    seq: int  # pool-wide allocation sequence: orders segments in time
    pool_uuid: bytes
    created_ns: int

    # magic, version, flags, segment, seq, pool_uuid, created, reserved, crc
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<4sHHIQ16sQ16sI")
    MAGIC: ClassVar[bytes] = b"PSEG"
    SIZE: ClassVar[int] = ALIGN  # the header occupies a whole aligned block

    def to_bytes(self) -> bytes:
        body = self.STRUCT.pack(
            self.MAGIC, FORMAT_VERSION, 0, self.segment, self.seq, self.pool_uuid,
            self.created_ns, b"", 0,
        )
        raw = body[:-4] + struct.pack("<I", crc32(body[:-4]))
        return raw.ljust(self.SIZE, b"\0")

    @classmethod
    def from_buffer(cls, buf: bytes | memoryview) -> SegmentHeader:
        f = cls._check(buf, "segment header")
        return cls(f[3], f[4], f[5], f[6])


# Record kinds: a single chunk, or (reserved for background deep reduction) a
# multi-chunk frame whose payload starts with a table of its chunks.
KIND_CHUNK = 1
KIND_FRAME = 2


@dataclass(frozen=True, slots=True)
class ChunkHeader(_Record):
    """Header of a chunk record inside a segment; the payload follows it.

    Version 2 gives two fields of version 1 new meanings, within the same 64
    bytes: byte 7 (reserved, 0) holds raw_len in 4 KiB blocks, and bytes 16-19
    (raw_len, always 4096 for a chunk) hold `seq`, the low 32 bits of the
    allocation sequence number of the segment the record was written into. A
    record whose seq differs from its segment's is left from an earlier use of
    that segment: stale, never live. Version-1 records read with seq 0 (not
    recorded).
    """

    kind: int
    codec: int
    chunk_id: int
    raw_len: int
    stored_len: int
    fingerprint: bytes  # SHA-256 of the raw data
    payload_crc: int
    seq: int = 0  # low 32 bits of the segment's seq (0: a version-1 record)

    # magic, version, kind, codec, raw blocks (v1: reserved), chunk_id,
    # seq (v1: raw_len), stored_len, fingerprint, payload_crc, header_crc
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<4sBBBBQII32sII")
    MAGIC: ClassVar[bytes] = b"PCHK"
    SIZE: ClassVar[int] = 64

    def to_bytes(self) -> bytes:
        if self.raw_len % BLOCK_SIZE or not 0 < self.raw_len // BLOCK_SIZE < 256:
            raise ValueError(f"raw_len {self.raw_len}: not 1-255 blocks")
        return pack_chunk_header(
            self.kind, self.codec, self.chunk_id, self.raw_len, self.stored_len,
            self.fingerprint, self.payload_crc, self.seq,
        )

    @classmethod
    def from_buffer(cls, buf: bytes | memoryview) -> ChunkHeader:
        f = cls._check(buf, "chunk record")
        if f[1] == 1:
            return cls(f[2], f[3], f[5], f[6], f[7], f[8], f[9], 0)
        return cls(f[2], f[3], f[5], f[4] * BLOCK_SIZE, f[7], f[8], f[9], f[6])


assert ChunkHeader.STRUCT.size == ChunkHeader.SIZE
SEQ_MASK = 0xFFFFFFFF  # a chunk record holds the low 32 bits of its segment's seq


def stale_message(segment: int, offset: int, record_seq: int, segment_seq: int) -> str:
    """What a record left from an earlier use of a reused segment is called."""
    return (f"segment {segment} offset {offset} holds a stale record, left from an earlier "
            f"use of the segment (record seq {record_seq}, segment seq {segment_seq})")


def pack_chunk_header(
    kind: int, codec: int, chunk_id: int, raw_len: int, stored_len: int,
    fingerprint: bytes, payload_crc: int, seq: int,
) -> bytes:
    """Hot path: build a (version 2) chunk header without creating a dataclass;
    `seq` is the sequence number of the segment it goes into."""
    body = ChunkHeader.STRUCT.pack(
        ChunkHeader.MAGIC, FORMAT_VERSION, kind, codec, raw_len >> 12, chunk_id,
        seq & SEQ_MASK, stored_len, fingerprint, payload_crc, 0,
    )
    return body[:-4] + struct.pack("<I", zlib.crc32(body[:-4]))


def unpack_chunk_header(
    buf: bytes | memoryview,
) -> tuple[int, int, int, int, int, bytes, int, int]:
    """Hot path: (kind, codec, chunk_id, raw_len, stored_len, fingerprint,
    payload_crc, seq) of a chunk header, checked like ChunkHeader.from_buffer
    but without creating a dataclass (seq 0: a version-1 record). A header
    that fails a check goes through ChunkHeader.from_buffer, which raises with
    the reason."""
    body = bytes(buf[:_CHUNK_SIZE])
    if len(body) == _CHUNK_SIZE:
        f = _unpack_chunk_header(body)
        if f[0] == _CHUNK_MAGIC and zlib.crc32(body[:-4]) == f[10]:
            if f[1] == 2:
                return f[2], f[3], f[5], f[4] << 12, f[7], f[8], f[9], f[6]
            if f[1] == 1:
                return f[2], f[3], f[5], f[6], f[7], f[8], f[9], 0
    h = ChunkHeader.from_buffer(buf)  # raises CorruptData or FormatError
    raise AssertionError(f"chunk header {h} passed the full check but not the fast one")


_CHUNK_SIZE = ChunkHeader.SIZE
_CHUNK_MAGIC = ChunkHeader.MAGIC
_unpack_chunk_header = ChunkHeader.STRUCT.unpack


def record_size(stored_len: int) -> int:
    """Bytes a chunk record occupies in a segment, padding included."""
    return align_up(ChunkHeader.SIZE + stored_len, RECORD_ALIGN)


# ---------------------------------------------------------------------------
# Metadata store (LMDB) layouts. Keys are big-endian so that byte order is
# numeric order: one cursor seek finds a block's newest generation.

# l2p: (volume u32, lba u64, ~generation u32) -> chunk_id u64
L2P_KEY = struct.Struct(">IQI")
GEN_MAX = 0xFFFFFFFF
U64 = struct.Struct("<Q")


def l2p_key(vol: int, lba: int, gen: int) -> bytes:
    return L2P_KEY.pack(vol, lba, GEN_MAX - gen)


def l2p_unpack(key: bytes | memoryview) -> tuple[int, int, int]:
    vol, lba, inv = L2P_KEY.unpack(key)
    return vol, lba, GEN_MAX - inv


# chunks: chunk_id u64 (big-endian) -> ChunkMeta
CHUNK_KEY = struct.Struct(">Q")
# refcount, segment, record offset, stored_len, codec, slot, reserved, fingerprint
CHUNK_META = struct.Struct("<IIIIBBH32s")

# fp: fingerprint (32 bytes) -> chunk_id u64

# segs: segment u32 (big-endian) -> SegmentMeta
SEG_KEY = struct.Struct(">I")
# state, reserved, seq, write_ptr, live_bytes, erase_count, sealed_ns
SEG_META = struct.Struct("<BBHQIIIQ")
SEG_FREE, SEG_OPEN, SEG_SEALED = 0, 1, 2

# meta: b"seg_tail:<stream>" -> the open segment's unflushed tail, committed
# with the metadata instead of padding the segment at every flush (segments.py):
# segment u32 (0xFFFFFFFF: none), seq u64, start u32 (4 KiB aligned), then the
# bytes [start, write_ptr) of the segment
SEG_TAIL = struct.Struct("<IQI")
SEG_TAIL_NONE = 0xFFFFFFFF

# vols: name (utf-8) -> JSON volume record
# meta: ascii key -> value (format version, pool uuid, counters as JSON)
