"""The channel between two daemons: TLS 1.3 with pinned certificates, frames
(wire.py) over it, and a request/response layer with streamed bodies.

Two kinds of connection share the replication listener, whose TLS asks for
a client certificate but does not require one:

- pairing: the client shows no certificate in TLS; it sends its certificate
  in `hello`, and both prove they know the connection key with an HMAC over
  both nonces and both certificates' fingerprints as each side sees them
  (peers.proof): a man in the middle with a certificate of its own makes the
  proofs disagree.
- peer connections: mutual TLS. The server accepts only certificates of
  paired peers (the pinned ones are its trust anchors: any other is refused
  in the handshake), then checks that the `hello` names the peer whose
  fingerprint it is; the client checks the server's certificate against the
  fingerprint it pinned for that peer.

After the handshake a Connection is symmetric: either side may send requests
(the dialer uses odd request ids, the acceptor even ones, so an id names one
exchange on the connection). A request or response is a head frame and,
with MORE set, DATA frames after it (a streamed body: `Message.parts()`).
Who calls: service.py (the listener, dialing, the pinger).
"""

from __future__ import annotations

import logging
import math
import secrets
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from ..errors import PeerRefused, PeerUnreachable, ProtocolError, PStorageError
from . import wire
from .peers import Peer, TokenBucket, der_fingerprint
from .wire import Frame, FrameDecoder

log = logging.getLogger(__name__)

SNI = "peer.pstorage"  # certificates name pools, not hosts: a fixed name
HANDSHAKE_TIMEOUT = 10.0
READ_SIZE = 256 << 10
STREAM_BUFFER = 8  # DATA frames a receiver may hold unread before the sender waits


# ---------------------------------------------------------------- TLS contexts
def server_context(cert_file: str, key_file: str, pinned: list[str]) -> ssl.SSLContext:
    """The listener's context: a client certificate is optional (a pairing
    client has none yet) but one that is shown must be a pinned peer's (the
    pinned certificates are the trust anchors). Rebuilt when peers change."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert_file, key_file)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    if pinned:
        ctx.load_verify_locations(cadata="".join(pinned))
    return ctx


def client_context(cert_file: str | None, key_file: str | None) -> ssl.SSLContext:
    """A dialer's context: with this daemon's certificate for peer connections,
    without one for pairing. The server's certificate is checked against the
    pinned fingerprint after the handshake (a clearer refusal than a TLS alert,
    same strength); when pairing, the key's proof covers it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert_file and key_file:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


# ---------------------------------------------------------------- framed stream
class FramedStream:
    """Frames over a byte stream: send() whole frames, receive() the next one
    (None at a clean end of stream). Counts bytes both ways."""

    def __init__(self, stream: trio.abc.Stream, bucket: TokenBucket | None = None) -> None:
        self.stream = stream
        self.bucket = bucket or TokenBucket()
        self.decoder = FrameDecoder()
        self._send_lock = trio.Lock()
        self.bytes_sent = 0
        self.bytes_received = 0

    async def send(self, frame: Frame) -> None:
        data = frame.to_bytes()
        async with self._send_lock:  # frames never interleave
            await self.bucket.take(len(data))
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise PeerUnreachable(f"the connection broke while sending ({e})") from None
            self.bytes_sent += len(data)

    async def receive(self) -> Frame | None:
        while True:
            frame = self.decoder.next_frame()
            if frame is not None:
                return frame
            try:
                data = await self.stream.receive_some(min(READ_SIZE, max(self.decoder.wanted,
                                                                         4096)))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise PeerUnreachable(f"the connection broke ({_why(e)})") from None
            if not data:
                if self.decoder.at_boundary():
                    return None
                raise ProtocolError("the connection ended inside a frame")
            self.bytes_received += len(data)
            self.decoder.feed(data)

    async def aclose(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass


def _why(e: BaseException) -> str:
    cause = e.__cause__ or e.__context__
    return str(cause or e) or type(cause or e).__name__


def error_frame(rid: int, tid: int, e: PStorageError) -> Frame:
    return Frame(wire.ERROR, tid, rid, {"error": e.code, "message": e.message, "hint": e.hint})


def raise_error(frame: Frame) -> None:
    """An ERROR frame as the exception it names (PeerRefused, NotFound, ...)."""
    from .. import errors
    body = frame.body
    code = str(body.get("error", ""))
    cls: type[PStorageError] = PStorageError
    for c in vars(errors).values():
        if isinstance(c, type) and issubclass(c, PStorageError) and c.code == code:
            cls = c
            break
    raise cls(f"peer: {str(body.get('message', 'request failed'))[:500]}",
              str(body.get("hint", ""))[:500])


# ---------------------------------------------------------------- handshake
async def expect(fs: FramedStream, kind: int, tid: int, rid: int) -> Frame:
    frame = await fs.receive()
    if frame is None:
        raise PeerUnreachable("the peer closed the connection during the handshake")
    if frame.kind == wire.ERROR:  # a refusal, whichever step it answers
        raise_error(frame)
    if frame.kind != kind or frame.type != tid or frame.rid != rid or frame.more:
        raise ProtocolError(f"unexpected {wire.KINDS.get(frame.kind)} "
                            f"{wire.type_name(frame.type)} during the handshake")
    return frame


def text(body: dict[str, Any], key: str, limit: int = 256) -> str:
    """A string field of a peer's message, or ProtocolError."""
    v = body.get(key)
    if not isinstance(v, str) or len(v) > limit:
        raise ProtocolError(f"field {key!r} missing or not a string of at most {limit} bytes")
    return v


def server_fingerprint(stream: trio.SSLStream) -> str:
    der = stream.getpeercert(binary_form=True)
    if not der:
        raise PeerRefused("the peer presented no certificate")
    return der_fingerprint(der)


async def open_tls(address: str, ctx: ssl.SSLContext,
                   within: float = HANDSHAKE_TIMEOUT) -> trio.SSLStream:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    with trio.move_on_after(within) as scope:
        try:
            tcp = await trio.open_tcp_stream(host, int(port))
        except (OSError, ValueError) as e:  # (ValueError: a name IDNA cannot encode)
            raise PeerUnreachable(f"cannot reach {address}: {getattr(e, 'strerror', '') or e}",
                                  "is the peer's replication listener on, and the "
                                  "network up?") from None
        tls = trio.SSLStream(tcp, ctx, server_hostname=SNI)
        try:
            await tls.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError) as e:
            await tcp.aclose()
            raise PeerRefused(f"TLS handshake with {address} failed ({_why(e)})") from None
        return tls
    assert scope.cancelled_caught
    raise PeerUnreachable(f"no answer from {address} in {within:g} s",
                          "is the peer's replication listener on, and the network up?")


# ---------------------------------------------------------------- messages
@dataclass(slots=True)
class Message:
    """A request as a handler receives it, or a response as call() returns it."""

    type: str
    body: dict[str, Any]
    payload: bytes = b""
    # the streamed rest of the body (DATA frames), when the head had MORE
    stream: trio.MemoryReceiveChannel[bytes] | None = None

    async def parts(self) -> AsyncIterator[bytes]:
        """The streamed body, part by part (nothing when it was not streamed)."""
        if self.stream is None:
            return
        async with self.stream:
            async for part in self.stream:
                yield part


@dataclass(slots=True)
class Reply:
    """What a handler returns: the response's control part, raw bytes, and
    optionally more bytes to stream after them."""

    body: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""
    parts: AsyncIterable[bytes] | None = None


Handler = Callable[[Peer, Message], Awaitable[Reply | dict[str, Any] | None]]


class _Pending:
    __slots__ = ("done", "head", "error", "send", "receive")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.head: Frame | None = None
        self.error: BaseException | None = None
        self.send: trio.MemorySendChannel[bytes] | None = None
        self.receive: trio.MemoryReceiveChannel[bytes] | None = None


class Connection:
    """An authenticated channel to one peer; `run()` reads frames and serves
    requests until the connection ends (then every pending call fails with
    PeerUnreachable)."""

    def __init__(self, fs: FramedStream, peer: Peer, handlers: dict[int, Handler],
                 dialer: bool, first_rid: int = 0) -> None:
        self.fs = fs
        self.peer = peer
        self.handlers = handlers
        # the handshake used the dialer's first ids (hello 1, auth 3)
        self._next_rid = first_rid or (1 if dialer else 2)
        self._parity = 1 if dialer else 0  # of our request ids
        self._pending: dict[int, _Pending] = {}
        self._streams: dict[int, trio.MemorySendChannel[bytes] | None] = {}  # DATA destinations
        self._serving: dict[int, trio.CancelScope] = {}
        self.closed = trio.Event()
        self.close_reason = ""
        self._closing = False  # aclose() was called: the read loop's end is expected

    # ------------------------------------------------------------ calling
    async def call(self, type: str, body: dict[str, Any] | None = None, payload: bytes = b"",
                   parts: AsyncIterable[bytes] | None = None,
                   within: float = 60.0) -> Message:
        """Send a request, wait for its response. PeerUnreachable after `within` seconds or
        a broken connection; the peer's error as its PStorageError class."""
        if self.closed.is_set():
            raise PeerUnreachable(f"connection to {self.peer.name} is closed "
                                  f"({self.close_reason})")
        tid = wire.type_id(type)
        rid = self._next_rid
        self._next_rid += 2
        p = self._pending[rid] = _Pending()
        try:
            with trio.move_on_after(within) as scope:
                await self._send_message(wire.REQUEST, tid, rid, body or {}, payload, parts)
                await p.done.wait()
            if scope.cancelled_caught:
                with trio.move_on_after(1):
                    try:
                        await self.fs.send(Frame(wire.CANCEL, tid, rid))
                    except PeerUnreachable:
                        pass
                raise PeerUnreachable(f"{self.peer.name} did not answer {type} in {within:g} s")
        finally:
            del self._pending[rid]
            if p.head is None or not p.head.more:
                self._streams.pop(rid, None)
        if p.error is not None:
            raise p.error
        assert p.head is not None
        if p.head.kind == wire.ERROR:
            raise_error(p.head)
        # a streamed response: read msg.parts() to its end (or close msg.stream),
        # else the connection stalls once STREAM_BUFFER parts wait
        return Message(type, p.head.body, p.head.payload, p.receive)

    async def _send_message(self, kind: int, tid: int, rid: int, body: dict[str, Any],
                            payload: bytes, parts: AsyncIterable[bytes] | None) -> None:
        more = wire.MORE if parts is not None else 0
        await self.fs.send(Frame(kind, tid, rid, body, payload, more))
        if parts is None:
            return
        async for part in parts:
            for i in range(0, max(len(part), 1), wire.MAX_PAYLOAD):
                await self.fs.send(Frame(wire.DATA, tid, rid, {}, part[i:i + wire.MAX_PAYLOAD],
                                         wire.MORE))
        await self.fs.send(Frame(wire.DATA, tid, rid, {}, b"", 0))

    # ------------------------------------------------------------ serving
    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await self._read_loop(nursery)
                except (ProtocolError, PeerUnreachable) as e:
                    if not self._closing:
                        self.close_reason = e.message
                        log.warning("replication: connection with %s closed: %s",
                                    self.peer.name, e.message)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self.closed.set()
            self.close_reason = self.close_reason or "closed"
            err = PeerUnreachable(f"the connection to {self.peer.name} ended "
                                  f"({self.close_reason})")
            for p in self._pending.values():
                if not p.done.is_set():
                    p.error = err
                    p.done.set()
            for ch in self._streams.values():
                if ch is not None:
                    ch.close()
            await self.fs.aclose()

    async def aclose(self, reason: str = "closed") -> None:
        self._closing = True
        self.close_reason = reason
        await self.fs.aclose()  # the read loop ends, run() cleans up

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        while True:
            frame = await self.fs.receive()
            if frame is None:
                self.close_reason = "the peer closed it"
                return
            rid = frame.rid
            ours = rid % 2 == self._parity
            if frame.kind == wire.REQUEST:
                if ours or rid in self._serving:
                    raise ProtocolError(f"request id {rid} is not the peer's to use")
                stream = None
                if frame.more:
                    send, stream = trio.open_memory_channel[bytes](STREAM_BUFFER)
                    self._streams[rid] = send
                scope = self._serving[rid] = trio.CancelScope()
                msg = Message(wire.type_name(frame.type), frame.body, frame.payload, stream)
                nursery.start_soon(self._serve, frame.type, rid, msg, scope)
            elif frame.kind in (wire.RESPONSE, wire.ERROR):
                p = self._pending.get(rid) if ours else None
                if p is None or p.done.is_set():
                    if frame.more:
                        self._streams[rid] = None  # a late answer: drop its stream
                    continue
                p.head = frame
                if frame.more:  # the caller reads the rest from p.receive
                    p.send, p.receive = trio.open_memory_channel[bytes](STREAM_BUFFER)
                    self._streams[rid] = p.send
                p.done.set()
            elif frame.kind == wire.DATA:
                if rid not in self._streams:
                    raise ProtocolError(f"data frame for no streamed message (id {rid})")
                await self._deliver(rid, frame)
            elif frame.kind == wire.CANCEL:
                s = self._serving.get(rid)
                if s is not None:
                    s.cancel()

    async def _deliver(self, rid: int, frame: Frame) -> None:
        ch = self._streams.get(rid)
        if ch is not None and frame.payload:
            try:
                await ch.send(frame.payload)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._streams[rid] = None  # the receiver stopped reading: drop the rest
        if not frame.more:
            ch = self._streams.pop(rid, None)
            if ch is not None:
                ch.close()

    async def _serve(self, tid: int, rid: int, msg: Message, scope: trio.CancelScope) -> None:
        try:
            with scope:
                handler = self.handlers.get(tid)
                try:
                    if handler is None:
                        raise ProtocolError(f"this daemon has no handler for "
                                            f"{wire.type_name(tid)}", "upgrade it")
                    out = await handler(self.peer, msg)
                    reply = out if isinstance(out, Reply) else Reply(out or {})
                except PStorageError as e:
                    await self.fs.send(error_frame(rid, tid, e))
                    return
                finally:
                    if msg.stream is not None:
                        await msg.stream.aclose()
                await self._send_message(wire.RESPONSE, tid, rid, reply.body, reply.payload,
                                         reply.parts)
        except PeerUnreachable:
            pass  # the connection broke: run() reports it
        except Exception:
            log.exception("replication: handler for %s from %s failed", msg.type,
                          self.peer.name)
            try:
                await self.fs.send(error_frame(rid, tid, PStorageError(
                    f"{msg.type} failed on the peer (a bug: its log has the traceback)")))
            except PeerUnreachable:
                pass
        finally:
            self._serving.pop(rid, None)


def nonce() -> str:
    return secrets.token_hex(32)


def finite(x: Any) -> float:
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else 0.0
