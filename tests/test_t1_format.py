"""Level 1: on-disk records and codecs round-trip; damage is always detected."""

from __future__ import annotations

import os
import random
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pstoraged.engine import codecs
from pstoraged.engine.format import (
    KIND_CHUNK,
    ChunkHeader,
    SegmentHeader,
    Superblock,
    crc32,
    l2p_key,
    l2p_unpack,
    record_size,
    unpack_chunk_header,
)
from pstoraged.engine.units import parse_size, validate_name, validate_volume_size
from pstoraged.errors import CorruptData, FormatError, InvalidArgument


def test_superblock_round_trip_and_damage():
    sb = Superblock(os.urandom(16), 123, 1 << 30, 1 << 22, 255, 1 << 20, "lab")
    raw = sb.to_bytes()
    assert len(raw) == 4096
    assert Superblock.from_buffer(raw) == sb
    for pos in (0, 9, 20, 60, Superblock.STRUCT.size - 1):
        bad = bytearray(raw)
        bad[pos] ^= 0x40
        with pytest.raises((CorruptData, FormatError)):
            Superblock.from_buffer(bytes(bad))


def test_unknown_version_is_refused_with_advice():
    sb = Superblock(os.urandom(16), 1, 1 << 30, 1 << 22, 255, 1 << 20, "")
    raw = bytearray(sb.to_bytes())
    raw[8] = 99  # version field
    body = bytes(raw[: Superblock.STRUCT.size - 4])
    raw[Superblock.STRUCT.size - 4 : Superblock.STRUCT.size] = crc32(body).to_bytes(4, "little")
    with pytest.raises(FormatError, match="version 99"):
        Superblock.from_buffer(bytes(raw))


def test_segment_header_round_trip():
    h = SegmentHeader(7, 42, os.urandom(16), 99)
    raw = h.to_bytes()
    assert len(raw) == SegmentHeader.SIZE
    assert SegmentHeader.from_buffer(raw) == h
    with pytest.raises(CorruptData):
        SegmentHeader.from_buffer(raw[:10])


@given(st.binary(min_size=32, max_size=32), st.integers(1, 2**63), st.integers(0, 4096))
def test_chunk_header_round_trip(fp, cid, stored):
    h = ChunkHeader(KIND_CHUNK, codecs.CODEC_LZ4, cid, 4096, stored, fp, 0xDEADBEEF)
    raw = h.to_bytes()
    assert len(raw) == ChunkHeader.SIZE
    assert ChunkHeader.from_buffer(raw) == h
    bad = bytearray(raw)
    bad[20] ^= 1
    with pytest.raises(CorruptData):
        ChunkHeader.from_buffer(bytes(bad))
    assert record_size(stored) % 16 == 0 and record_size(stored) >= 64 + stored


@given(st.binary(min_size=32, max_size=32), st.integers(1, 2**63), st.integers(0, 4096),
       st.integers(0, 63), st.integers(0, 7))
def test_the_fast_chunk_header_check_is_the_full_one(fp, cid, stored, byte, bit):
    """unpack_chunk_header (the read path's) accepts and refuses exactly what
    ChunkHeader.from_buffer does, with the same error."""
    h = ChunkHeader(KIND_CHUNK, codecs.CODEC_LZ4, cid, 4096, stored, fp, 0xDEADBEEF)
    raw = h.to_bytes()
    assert unpack_chunk_header(raw + b"payload") == (
        h.kind, h.codec, h.chunk_id, h.raw_len, h.stored_len, h.fingerprint, h.payload_crc,
        h.seq)
    bad = bytearray(raw)
    bad[byte] ^= 1 << bit  # any single flipped bit: magic, version, a field or the CRC
    for damaged in (bytes(bad), raw[:40]):
        with pytest.raises((CorruptData, FormatError)) as full:
            ChunkHeader.from_buffer(damaged)
        with pytest.raises(full.type, match=re.escape(str(full.value))):
            unpack_chunk_header(damaged)


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**63), st.integers(0, 2**32 - 1))
def test_l2p_key_order(vol, lba, gen):
    assert l2p_unpack(l2p_key(vol, lba, gen)) == (vol, lba, gen)
    # newer generations sort first, so one seek finds the newest <= a generation
    if gen:
        assert l2p_key(vol, lba, gen) < l2p_key(vol, lba, gen - 1)
    assert l2p_key(vol, lba, 0) < l2p_key(vol, lba + 1, 2**32 - 1)


@pytest.mark.parametrize("codec", [codecs.CODEC_NONE, codecs.CODEC_LZ4, codecs.CODEC_ZSTD])
@given(data=st.one_of(st.integers(0, 2**32).map(lambda s: random.Random(s).randbytes(4096)),
                      st.binary(min_size=1, max_size=64).map(lambda b: (b * 4096)[:4096])))
def test_codec_round_trip(codec, data):
    c = codecs.Compressor()
    used, payload = c.compress(codec, data)
    assert used in (codec, codecs.CODEC_NONE)
    if used != codecs.CODEC_NONE:
        assert len(payload) <= 4096 - 512  # early abort keeps only real savings
    assert c.decompress(used, payload, 4096) == data


def test_codec_compresses_and_rejects_garbage():
    c = codecs.Compressor()
    text = (b"the quick brown fox jumps over the lazy dog " * 100)[:4096]
    for codec in (codecs.CODEC_LZ4, codecs.CODEC_ZSTD):
        used, payload = c.compress(codec, text)
        assert used == codec and len(payload) < 400
        with pytest.raises(CorruptData):
            c.decompress(codec, b"\xff" * 50, 4096)
        with pytest.raises(CorruptData):
            c.decompress(codec, payload[:-5], 4096)
    used, payload = c.compress(codecs.CODEC_LZ4, os.urandom(4096))
    assert used == codecs.CODEC_NONE
    with pytest.raises(InvalidArgument):
        codecs.codec_id("gzip")


def test_names_and_sizes():
    assert parse_size("10G") == 10 << 30
    assert parse_size("512M") == 512 << 20
    assert parse_size("4096") == 4096
    assert parse_size(8192) == 8192
    assert parse_size("1GiB") == 1 << 30
    for bad in ("", "ten", "-1G", "1.5G", "10X"):
        with pytest.raises(InvalidArgument):
            parse_size(bad)
    for good in ("a", "vol-1", "db_2.data", "x" * 63):
        assert validate_name(good) == good
    for bad in ("", "A", "-x", ".", "..", "a/b", "../etc", "x" * 64, "a b", "é"):
        with pytest.raises(InvalidArgument):
            validate_name(bad)
    with pytest.raises(InvalidArgument):
        validate_volume_size(1000)
    with pytest.raises(InvalidArgument):
        validate_volume_size(0)


@given(st.binary(min_size=32, max_size=32), st.integers(1, 2**63), st.integers(0, 4096),
       st.integers(1, 2**32 - 1))
def test_chunk_record_v2_carries_its_segments_seq(fp, cid, stored, seq):
    h = ChunkHeader(KIND_CHUNK, codecs.CODEC_LZ4, cid, 4096, stored, fp, 0xDEADBEEF, seq)
    raw = h.to_bytes()
    assert raw[4] == 2 and ChunkHeader.from_buffer(raw) == h
    assert unpack_chunk_header(raw)[7] == seq


def test_version_1_chunk_records_are_still_read():
    """A pool written before issue 13: byte 7 reserved (0), bytes 16-19 raw_len."""
    fp = os.urandom(32)
    body = ChunkHeader.STRUCT.pack(ChunkHeader.MAGIC, 1, KIND_CHUNK, codecs.CODEC_LZ4, 0, 77,
                                   4096, 1000, fp, 1234, 0)
    raw = body[:-4] + crc32(body[:-4]).to_bytes(4, "little")
    assert unpack_chunk_header(raw) == (KIND_CHUNK, codecs.CODEC_LZ4, 77, 4096, 1000, fp, 1234, 0)
    assert ChunkHeader.from_buffer(raw) == ChunkHeader(
        KIND_CHUNK, codecs.CODEC_LZ4, 77, 4096, 1000, fp, 1234, 0)
