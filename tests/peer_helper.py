"""Run inside a network namespace by test_t4_peers.py: a hostile or foreign
client of a replication listener. Prints one JSON line saying what happened.

    python -m tests.peer_helper MODE HOST:PORT [CERT KEY PEER_ID]
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import struct
import sys
import tempfile
import uuid

from pstoraged.replication import wire
from pstoraged.replication.peers import generate_identity
from pstoraged.replication.wire import Frame, FrameDecoder


def tls(addr: str, cert: str | None, key: str | None) -> ssl.SSLSocket:
    host, _, port = addr.rpartition(":")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert and key:
        ctx.load_cert_chain(cert, key)
    s = socket.create_connection((host, int(port)), timeout=10)
    return ctx.wrap_socket(s, server_hostname="peer.pstorage")


def answer(s: ssl.SSLSocket) -> str:
    """What the server did: 'closed', 'error: MESSAGE' or 'answered'."""
    dec = FrameDecoder()
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return "closed"
            dec.feed(data)
            f = dec.next_frame()
            if f is not None:
                return f"error: {f.body.get('message')}" if f.kind == wire.ERROR else "answered"
    except (ssl.SSLError, OSError) as e:
        return f"closed: {e}"


def hello(peer_id: str) -> bytes:
    return Frame(wire.REQUEST, wire.TYPES["hello"], 1,
                 {"mode": "peer", "version": 1, "id": peer_id, "name": "x", "listen": ""}
                 ).to_bytes()


def main() -> None:
    mode, addr = sys.argv[1], sys.argv[2]
    out: dict = {"mode": mode}
    if mode == "stranger":  # a daemon never paired: its own certificate
        with tempfile.TemporaryDirectory() as d:
            ident = generate_identity(uuid.uuid4().hex)
            c, k = ident.write_files(d)
            try:
                s = tls(addr, c, k)
                s.sendall(hello(ident.id))
                out["result"] = answer(s)
            except (ssl.SSLError, OSError) as e:
                out["result"] = f"closed: {e}"
    elif mode == "impostor":  # claims a paired peer's id with another certificate
        with tempfile.TemporaryDirectory() as d:
            c, k = generate_identity(sys.argv[3]).write_files(d)
            try:
                s = tls(addr, c, k)
                s.sendall(hello(sys.argv[3]))
                out["result"] = answer(s)
            except (ssl.SSLError, OSError) as e:
                out["result"] = f"closed: {e}"
    elif mode == "garbage":  # malformed input at every stage
        cert, key, peer_id = sys.argv[3:6]
        results = []
        host, _, port = addr.rpartition(":")
        for junk in (os.urandom(5000), b"GET / HTTP/1.0\r\n\r\n", b""):  # not even TLS
            s = socket.create_connection((host, int(port)), timeout=10)
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            try:
                results.append(len(s.recv(100)) >= 0)
            except OSError:
                results.append(True)
            s.close()
        head = struct.Struct(">2sBBHHQII")

        def huge(kind: int = wire.REQUEST) -> bytes:
            h = head.pack(b"PR", 1, kind, 1, 0, 1, 0xFFFFFFFF, 0xFFFFFFFF)
            import zlib
            return h + struct.pack(">I", zlib.crc32(h))
        frames = [os.urandom(3000), huge(), hello(peer_id)[:20], b"PR\x09" + b"\0" * 40,
                  Frame(wire.REQUEST, 1, 1, {}, b"").to_bytes()[:-1] + b"\x00\x00\x00"]
        # connections that say nothing hold no one up
        idle = [socket.create_connection((host, int(port)), timeout=10), tls(addr, None, None)]
        for creds in ((None, None), (cert, key)):  # at hello, pairing-style and as a peer
            for junk in frames:
                s = tls(addr, *creds)
                s.sendall(junk)
                socket.socket.shutdown(s, socket.SHUT_WR)  # a truncated frame ends here
                results.append(answer(s))
                s.close()
        # authenticated, then garbage after a good hello
        for junk in (os.urandom(4096), huge(), Frame(wire.DATA, 3, 9, {}, b"x").to_bytes(),
                     Frame(wire.REQUEST, 3, 4, {}, b"").to_bytes(),  # the server's id parity
                     Frame(wire.REQUEST, 3, 5, {"t": 1}).to_bytes()[:30]):
            s = tls(addr, cert, key)
            s.sendall(hello(peer_id))
            results.append(answer(s))
            s.sendall(junk)
            socket.socket.shutdown(s, socket.SHUT_WR)  # (SSLSocket's own drops TLS)
            results.append(answer(s))
            s.close()
        for s in idle:
            s.close()
        out["result"] = results
    print(json.dumps(out))


if __name__ == "__main__":
    main()
