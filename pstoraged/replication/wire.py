"""The replication wire format: versioned, length-prefixed frames.

Every message between two daemons (pairing, pings, and the replication
features' requests) travels as frames inside the peers' TLS connection
(channel.py). A frame is a fixed 28-byte header, then a JSON object (the
control part: small, structured) and raw bytes (the payload: chunk data,
sent as stored, never re-encoded). docs/replication.md ("Wire format") has
the byte table; this module is the one place that writes and parses it.

    data = Frame(REQUEST, type_id("ping"), rid, {"t": 1}).to_bytes()
    dec = FrameDecoder(); dec.feed(data); frame = dec.next_frame()

A peer is not trusted to be well-behaved: the decoder checks the header
(magic, version, kind, flags, lengths against hard limits, a CRC of the
header) before it buffers a single byte of the body, so a claimed length
never allocates anything, and every malformed input raises ProtocolError
(only that). Callers: channel.py (Connection), tests/test_t1_wire.py.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import ProtocolError

MAGIC = b"PR"
VERSION = 1
SUPPORTED_VERSIONS = (1,)

# frame kinds
REQUEST = 1  # a call: its id is the sender's; the answer carries the same id
RESPONSE = 2  # the answer to the sender's peer's request `rid`
ERROR = 3  # a failed request: JSON {"error", "message", "hint"}
DATA = 4  # more of the body of the request/response `rid` (streamed); payload only
CANCEL = 5  # the caller gave up on request `rid` (timeout): the handler is cancelled
KINDS = {REQUEST: "request", RESPONSE: "response", ERROR: "error", DATA: "data",
         CANCEL: "cancel"}

# flags
MORE = 0x0001  # DATA frames with the same rid follow; the last one has no MORE
FLAGS = MORE

# Hard limits: a frame beyond them is refused before anything is buffered.
MAX_JSON = 1 << 20  # the control part
MAX_PAYLOAD = 8 << 20  # one frame's raw bytes; larger bodies are streamed (DATA)
MAX_FRAME = 28 + MAX_JSON + MAX_PAYLOAD

# Message types: a u16 on the wire, a name in the code. The replication
# features take numbers in their ranges and add a row to docs/replication.md.
TYPES: dict[str, int] = {
    "hello": 0x0001,  # first message of every connection: who am I, which mode
    "auth": 0x0002,  # pairing: proof of the connection key (HMAC)
    "ping": 0x0003,  # liveness, round-trip time; echoes a digest of its payload
    "peer.forget": 0x0004,  # `peer disconnect`: the other side forgets us too
    "snap.offer": 0x0101,  # async: a delta base -> snap of a volume; answer: resume lba
    "snap.blocks": 0x0102,  # async: a batch of (lba, fingerprint); answer: missing ones
    "snap.chunks": 0x0103,  # async: the missing chunks as stored; the batch is applied
    "snap.commit": 0x0104,  # async: the whole delta is there: take the replica snapshot
    # 0x0100-0x01ff: asynchronous replication; 0x0200-0x02ff: synchronous
}
NAMES = {v: k for k, v in TYPES.items()}


def type_id(name: str) -> int:
    try:
        return TYPES[name]
    except KeyError:
        raise ValueError(f"unknown replication message type {name!r} (add it to wire.TYPES)") \
            from None


def type_name(tid: int) -> str:
    return NAMES.get(tid, f"0x{tid:04x}")


@dataclass(frozen=True, slots=True)
class Header:
    """The fixed part of every frame (big-endian)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct(">2sBBHHQII")  # + u32 CRC-32 of these 24
    SIZE: ClassVar[int] = STRUCT.size + 4  # 28

    kind: int
    type: int
    flags: int
    rid: int
    json_len: int
    payload_len: int
    version: int = VERSION

    def to_bytes(self) -> bytes:
        head = self.STRUCT.pack(MAGIC, self.version, self.kind, self.type, self.flags, self.rid,
                                self.json_len, self.payload_len)
        return head + struct.pack(">I", zlib.crc32(head))

    @classmethod
    def from_buffer(cls, buf: bytes | bytearray | memoryview) -> Header:
        """Parse and check a header; ProtocolError says what is wrong."""
        if len(buf) < cls.SIZE:
            raise ProtocolError(f"truncated frame header ({len(buf)} of {cls.SIZE} bytes)")
        raw = bytes(buf[:cls.SIZE])
        magic, version, kind, tid, flags, rid, jlen, plen = cls.STRUCT.unpack_from(raw)
        if magic != MAGIC:
            raise ProtocolError(f"not a PStorage replication frame (magic {magic!r})",
                                "is something else talking to the replication port?")
        if version not in SUPPORTED_VERSIONS:
            raise ProtocolError(f"unsupported wire format version {version} "
                                f"(this daemon speaks {', '.join(map(str, SUPPORTED_VERSIONS))})",
                                "upgrade the older daemon")
        (crc,) = struct.unpack_from(">I", raw, cls.STRUCT.size)
        if crc != zlib.crc32(raw[:cls.STRUCT.size]):
            raise ProtocolError("frame header checksum mismatch")
        if kind not in KINDS:
            raise ProtocolError(f"unknown frame kind {kind}")
        if flags & ~FLAGS:
            raise ProtocolError(f"unknown frame flags 0x{flags:04x}")
        if jlen > MAX_JSON:
            raise ProtocolError(f"frame control part of {jlen} bytes is over the limit "
                                f"({MAX_JSON})")
        if plen > MAX_PAYLOAD:
            raise ProtocolError(f"frame payload of {plen} bytes is over the limit ({MAX_PAYLOAD})")
        if kind in (DATA, CANCEL) and jlen:
            raise ProtocolError(f"a {KINDS[kind]} frame carries no control part")
        if kind == CANCEL and (plen or flags):
            raise ProtocolError("a cancel frame carries nothing")
        return cls(kind, tid, flags, rid, jlen, plen, version)


@dataclass(frozen=True, slots=True)
class Frame:
    kind: int
    type: int
    rid: int
    body: dict[str, Any] = field(default_factory=dict)  # the control part
    payload: bytes = b""
    flags: int = 0

    @property
    def more(self) -> bool:
        return bool(self.flags & MORE)

    def to_bytes(self) -> bytes:
        js = json.dumps(self.body, separators=(",", ":")).encode() \
            if self.body or self.kind in (REQUEST, RESPONSE, ERROR) else b""
        if len(js) > MAX_JSON or len(self.payload) > MAX_PAYLOAD:
            raise ValueError(f"frame too large ({len(js)} + {len(self.payload)} bytes): "
                             "stream the payload in DATA frames")
        head = Header(self.kind, self.type, self.flags, self.rid, len(js), len(self.payload))
        return head.to_bytes() + js + self.payload


def parse_body(raw: bytes | bytearray | memoryview) -> dict[str, Any]:
    """The control part: a JSON object, or ProtocolError."""
    if not raw:
        return {}
    try:
        body = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError(f"frame control part is not valid JSON ({type(e).__name__})") \
            from None
    if not isinstance(body, dict):
        raise ProtocolError(f"frame control part is a JSON {type(body).__name__}, not an object")
    return body


class FrameDecoder:
    """Sans-I/O frame parser: feed() received bytes, take frames with
    next_frame(). Holds at most one frame plus what was fed beyond it;
    `wanted` says how many more bytes the next frame needs (for readers that
    size their reads). After a ProtocolError the decoder stays failed: the
    stream has no way back to a frame boundary."""

    __slots__ = ("_buf", "_head", "_failed")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._head: Header | None = None
        self._failed: ProtocolError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._failed:
            raise self._failed
        self._buf += data

    @property
    def wanted(self) -> int:
        need = Header.SIZE if self._head is None else \
            Header.SIZE + self._head.json_len + self._head.payload_len
        return max(0, need - len(self._buf))

    def next_frame(self) -> Frame | None:
        if self._failed:
            raise self._failed
        try:
            return self._next()
        except ProtocolError as e:
            self._failed = e
            self._buf.clear()
            raise

    def _next(self) -> Frame | None:
        if self._head is None:
            if len(self._buf) < Header.SIZE:
                return None
            self._head = Header.from_buffer(self._buf)
        h = self._head
        end = Header.SIZE + h.json_len + h.payload_len
        if len(self._buf) < end:
            return None
        body = parse_body(self._buf[Header.SIZE:Header.SIZE + h.json_len])
        payload = bytes(self._buf[Header.SIZE + h.json_len:end])
        del self._buf[:end]
        self._head = None
        return Frame(h.kind, h.type, h.rid, body, payload, h.flags)

    def at_boundary(self) -> bool:
        """No partial frame is buffered (a clean end of stream is possible here)."""
        return not self._buf and self._head is None
