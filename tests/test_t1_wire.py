"""Level 1: the replication wire format (replication/wire.py). Frames round
trip; random bytes and mutated valid frames raise ProtocolError and nothing
else; a claimed length is checked before anything is buffered."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pstoraged.errors import ProtocolError
from pstoraged.replication import wire
from pstoraged.replication.wire import Frame, FrameDecoder, Header

frames = st.builds(
    Frame,
    kind=st.sampled_from([wire.REQUEST, wire.RESPONSE, wire.ERROR]),
    type=st.integers(0, 0xFFFF),
    rid=st.integers(0, 2**64 - 1),
    body=st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=20), max_size=4),
    payload=st.binary(max_size=300),
    flags=st.sampled_from([0, wire.MORE]),
)


def decode_all(data: bytes, step: int = 7) -> list[Frame]:
    dec = FrameDecoder()
    out = []
    for i in range(0, len(data), step):
        dec.feed(data[i:i + step])
        while (f := dec.next_frame()) is not None:
            out.append(f)
    return out


@given(st.lists(frames, max_size=5), st.integers(1, 64))
def test_frames_round_trip_in_any_pieces(fs, step):
    data = b"".join(f.to_bytes() for f in fs)
    assert decode_all(data, step) == fs


def test_header_layout_matches_the_docs():
    raw = Frame(wire.REQUEST, 3, 7, {}, b"xy").to_bytes()
    assert Header.SIZE == 28
    assert raw[:2] == b"PR" and raw[2] == 1 and raw[3] == wire.REQUEST
    assert struct.unpack(">HHQII", raw[4:24]) == (3, 0, 7, 2, 2)
    assert struct.unpack(">I", raw[24:28])[0] == zlib.crc32(raw[:24])
    assert raw[28:] == b"{}xy"


def _header(kind=wire.REQUEST, jlen=0, plen=0, flags=0, version=1, magic=b"PR") -> bytes:
    head = Header.STRUCT.pack(magic, version, kind, 3, flags, 1, jlen, plen)
    return head + struct.pack(">I", zlib.crc32(head))


@pytest.mark.parametrize("head, words", [
    (_header(plen=wire.MAX_PAYLOAD + 1), "over the limit"),
    (_header(jlen=wire.MAX_JSON + 1), "over the limit"),
    (_header(plen=2**32 - 1, jlen=2**32 - 1), "over the limit"),
    (_header(version=9), "version 9"),
    (_header(magic=b"GE"), "magic"),
    (_header(kind=77), "kind 77"),
    (_header(flags=0x80), "flags"),
    (_header(kind=wire.DATA, jlen=2), "no control part"),
    (_header()[:-1] + b"\0", "checksum"),
])
def test_bad_headers_are_refused_before_the_body(head, words):
    dec = FrameDecoder()
    dec.feed(head)  # the header alone: no body bytes needed to refuse it
    with pytest.raises(ProtocolError, match=words):
        dec.next_frame()
    with pytest.raises(ProtocolError):  # and it stays failed
        dec.feed(b"x")


@pytest.mark.parametrize("body", [b"[1]", b"\xff\xfe", b"{", b"[" * 100000 + b"]" * 100000])
def test_bad_control_parts(body):
    dec = FrameDecoder()
    dec.feed(_header(jlen=len(body)) + body)
    with pytest.raises(ProtocolError, match="JSON"):
        dec.next_frame()


def test_truncated_frame_waits_and_says_what_it_needs():
    raw = Frame(wire.REQUEST, 3, 1, {"a": 1}, b"z" * 100).to_bytes()
    dec = FrameDecoder()
    dec.feed(raw[:50])
    assert dec.next_frame() is None and dec.wanted == len(raw) - 50
    assert not dec.at_boundary()


@settings(max_examples=400)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_protocol_errors(data):
    try:
        decode_all(data, 13)
    except ProtocolError:
        pass


@settings(max_examples=400)
@given(st.lists(frames, min_size=1, max_size=3),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(0, 10_000))
def test_mutated_frames_raise_only_protocol_errors(fs, flips, cut):
    data = bytearray(b"".join(f.to_bytes() for f in fs))
    for pos, val in flips:
        data[pos % len(data)] = val
    del data[len(data) - cut % len(data):]
    try:
        decode_all(bytes(data), 5)
    except ProtocolError:
        pass


@given(st.lists(frames, min_size=1, max_size=3), st.integers(4, 27), st.integers(0, 255))
def test_mutated_header_fields_are_caught_by_the_checksum(fs, pos, val):
    data = bytearray(fs[0].to_bytes())
    if data[pos] == val:
        return
    data[pos] = val
    with pytest.raises(ProtocolError):
        decode_all(bytes(data))
