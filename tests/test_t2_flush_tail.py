"""Flush-heavy writes: the open segment's partial last block goes into the
metadata commit instead of being padded on the device at every flush
(segments.py, docs/format.md "Segment").
"""

from __future__ import annotations

import os
import random

from pstoraged.engine.engine import Engine
from pstoraged.engine.format import ALIGN, BLOCK_SIZE
from pstoraged.engine.pool import open_pool
from pstoraged.engine.segments import USER

from .conftest import crash


def compressible(rng: random.Random) -> bytes:
    """A 4 KiB block that LZ4 stores in about a quarter of its size, unique."""
    words = [b"alpha ", b"beta ", b"gamma ", b"delta ", rng.randbytes(6)]
    out = bytearray(rng.randbytes(16))
    while len(out) < BLOCK_SIZE:
        out += rng.choice(words)
    return bytes(out[:BLOCK_SIZE])


def test_a_flush_after_every_write_keeps_compression(engine):
    rng = random.Random(1)
    vol = engine.create_volume("v", 64 * BLOCK_SIZE)
    engine.flush()
    segs = engine.segs
    s = segs.open_segment(USER)
    start = segs.write_ptr_of(s) if s >= 0 else 0
    for i in range(8):
        engine.write(vol, i * BLOCK_SIZE, compressible(rng))
        engine.flush()  # as a FUA write does
    s2 = segs.open_segment(USER)
    assert s2 == s or s < 0
    used = segs.write_ptr_of(s2) - (start if s2 == s else ALIGN)  # (after the header)
    # padding at each flush made this 8 * 4096
    assert used <= 8 * BLOCK_SIZE // 2, used


def test_flushed_tails_survive_crashes_and_garbage_past_the_commit(pool_dir):
    rng = random.Random(2)
    eng = Engine(open_pool(pool_dir))
    vol = eng.create_volume("v", 256 * BLOCK_SIZE)
    model = bytearray(256 * BLOCK_SIZE)
    for round_ in range(3):
        for _ in range(5):
            lba = rng.randrange(256)
            data = compressible(rng)
            eng.write(vol, lba * BLOCK_SIZE, data)
            model[lba * BLOCK_SIZE : (lba + 1) * BLOCK_SIZE] = data
            eng.flush()
        eng.write(vol, 0, compressible(rng))  # acknowledged, never flushed: may be lost
        # the device block that holds the committed tail was never written: a
        # torn write there (or any garbage) must not matter
        segs = eng.segs
        s = segs.open_segment(USER)
        wp = segs.write_ptr_of(s)
        assert wp % ALIGN, "the test wants a partial last block"
        with open(eng.pool.backing.path, "r+b") as f:
            f.seek(segs.offset(s) + wp // ALIGN * ALIGN)
            f.write(os.urandom(ALIGN))
        crash(eng)
        eng = Engine(open_pool(pool_dir))
        vol = eng.volume("v")
        got = eng.read(vol, BLOCK_SIZE, len(model) - BLOCK_SIZE)
        assert got == bytes(model[BLOCK_SIZE:]), f"round {round_}"
        model[:BLOCK_SIZE] = eng.read(vol, 0, BLOCK_SIZE)
    # and the records reach the device intact once their segment is sealed
    for lba in range(256):
        data = os.urandom(BLOCK_SIZE)
        eng.write(vol, lba * BLOCK_SIZE, data)
        model[lba * BLOCK_SIZE : (lba + 1) * BLOCK_SIZE] = data
    eng.close()
    eng = Engine(open_pool(pool_dir))
    assert eng.read(eng.volume("v"), 0, len(model)) == bytes(model)
    eng.close()
