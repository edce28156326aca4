"""The data-socket wire format (docs/protocol.md), daemon side.

Used by the data plane (dataplane.py) and the tests. The nbdkit plugin
(plugins/pstorage.py) cannot import it and keeps a copy of the structs and
constants under the same names; tests/test_t1_protocol.py holds them equal.
"""

from __future__ import annotations

import struct

VERSION = 1
REQ = struct.Struct("<IHHQQII")  # magic, op, flags, handle, offset, length, payload_len
REP = struct.Struct("<IIQII")  # magic, error, handle, payload_len, reserved
REQ_MAGIC = 0x31515350  # b"PSQ1"
REP_MAGIC = 0x31525350  # b"PSR1"
# size, flags, block_size, instance, prev_instance, prev_clean: 49 bytes; the
# last byte is 1 if the previous run closed the pool cleanly (the plugin keeps
# writes it acknowledged only then); clients ignore bytes after it
OPEN_REPLY = struct.Struct("<QII16s16sB")
EXTENT = struct.Struct("<QII")  # length, type, pad
EXTENT_HOLE, EXTENT_ZERO = 1, 2  # EXTENT type bits

OP_OPEN, OP_READ, OP_WRITE, OP_FLUSH, OP_TRIM, OP_ZERO, OP_EXTENTS, OP_LIST, OP_SIZE = range(1, 10)
OP_NAMES = {
    OP_OPEN: "open", OP_READ: "read", OP_WRITE: "write", OP_FLUSH: "flush", OP_TRIM: "trim",
    OP_ZERO: "zero", OP_EXTENTS: "extents", OP_LIST: "list_exports", OP_SIZE: "size",
}

FLAG_FUA = 1
FLAG_MAY_TRIM = 2
FLAG_FAST_ZERO = 4
KNOWN_FLAGS = FLAG_FUA | FLAG_MAY_TRIM | FLAG_FAST_ZERO

OPEN_READONLY = 1

MAX_REQUEST = 32 << 20  # largest READ/WRITE/TRIM/ZERO length and payload
MAX_NAME = 256  # largest OPEN payload
SECTOR = 512  # offsets and lengths must be multiples of this


def reply(handle: int, error: int = 0, payload: bytes = b"") -> bytes:
    return REP.pack(REP_MAGIC, error, handle, len(payload), 0) + payload
