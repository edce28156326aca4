"""Level 1: the async replication message bodies (replication/async_repl.py):
block lists and chunk lists round-trip, and malformed ones from a peer raise
ProtocolError (only that), never allocate beyond the message."""

from __future__ import annotations

import os
import struct

import pytest

from pstoraged.engine.replica import HOLE, ChunkPayload
from pstoraged.errors import ProtocolError
from pstoraged.replication import wire
from pstoraged.replication.async_repl import (
    decode_blocks,
    decode_chunks,
    encode_blocks,
    encode_chunks,
)


def test_round_trip():
    blocks = [(0, os.urandom(32)), (7, HOLE), (1 << 40, os.urandom(32))]
    assert decode_blocks(encode_blocks(blocks), 10) == blocks
    chunks = [ChunkPayload(os.urandom(32), 1, 4096, os.urandom(n), 5) for n in (1, 4096, 300)]
    assert decode_chunks(encode_chunks(chunks)) == chunks
    assert decode_chunks(b"") == []
    assert {wire.type_name(wire.TYPES[t]) for t in ("snap.offer", "snap.blocks", "snap.chunks",
                                                    "snap.commit")} == {
        "snap.offer", "snap.blocks", "snap.chunks", "snap.commit"}
    assert all(0x0100 <= wire.TYPES[t] <= 0x01ff for t in wire.TYPES if t.startswith("snap."))


@pytest.mark.parametrize("data", [
    b"x" * 40,  # not a whole entry
    struct.pack(">QB32s", 1, 2, bytes(32)),  # unknown kind
    struct.pack(">QB32s", 1, 1, bytes(32)) * 11,  # more than the limit
])
def test_bad_block_lists(data):
    with pytest.raises(ProtocolError):
        decode_blocks(data, 10)


@pytest.mark.parametrize("data", [
    b"\x01" * 20,  # a truncated header
    struct.pack(">32sBIII", bytes(32), 1, 4096, 0, 4097) + bytes(4097),  # over a block
    struct.pack(">32sBIII", bytes(32), 1, 4096, 0, 100) + bytes(50),  # claims more than sent
    struct.pack(">32sBIII", bytes(32), 1, 4096, 0, 0xFFFFFFFF),  # a huge claim
])
def test_bad_chunk_lists(data):
    with pytest.raises(ProtocolError):
        decode_chunks(data)
