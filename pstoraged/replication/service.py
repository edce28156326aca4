"""The replication service: the TCP listener, pairing, connections to peers,
the RPC entry points the replication features use, and the pinger.

The daemon makes one Replication, starts `run` in its nursery and hands it to
the REST API (control/api/peers.py). Replication features register handlers
and call peers:

    repl.register("snap.offer", handler)        # async handler(peer, Message)
    reply = await repl.call("dr-site", "snap.offer", {"volume": "db"}, within=30)

A call reuses the live connection to the peer (either direction) or dials
its address; a broken link fails pending calls with PeerUnreachable and the
next call dials again. The listener is off unless [replication] listen is
set; the control socket never leaves the host.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import ssl
import time
from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import Any

import trio

from ..errors import (
    InvalidArgument,
    PeerRefused,
    PeerUnreachable,
    ProtocolError,
    PStorageError,
)
from . import wire
from .channel import (
    HANDSHAKE_TIMEOUT,
    Connection,
    FramedStream,
    Handler,
    Message,
    Reply,
    client_context,
    error_frame,
    expect,
    finite,
    nonce,
    open_tls,
    server_context,
    server_fingerprint,
    text,
)
from .peers import (
    Peer,
    PeerStore,
    TokenBucket,
    check_key_text,
    fingerprint,
    key_secret,
    proof,
)
from .wire import Frame

log = logging.getLogger("pstoraged.replication")

MAX_HANDSHAKES = 32  # connections not yet authenticated; more are closed at once
POOL_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(slots=True)
class PeerState:
    """What this daemon knows of a peer's liveness (runtime only)."""

    reachable: bool | None = None  # None: not checked yet
    last_seen: float = 0.0  # wall clock of the last frame exchange that worked
    rtt_ms: float | None = None
    last_error: str = ""
    bytes_sent: int = 0  # over closed connections; live ones are added in status()
    bytes_received: int = 0


class Replication:
    """Peers and the channel to them (a background service: run() / stop())."""

    def __init__(self, store: PeerStore, pool_id: str, name: str, run_dir: str, *,
                 listen: str | None = None, advertise: str | None = None,
                 ping_interval: float = 10.0) -> None:
        self.store = store
        self.id = pool_id
        self.name = name
        self.dir = os.path.join(run_dir, "replication")
        self.listen = listen
        self.advertise = advertise or listen or ""
        self.ping_interval = ping_interval
        self.handlers: dict[int, Handler] = {}
        self.conns: dict[str, Connection] = {}  # peer id -> its newest live connection
        self.state: dict[str, PeerState] = {}
        self.buckets: dict[str, TokenBucket] = {}
        self.bound: list[str] = []  # the listener's addresses, once it runs
        self._dialing: dict[str, trio.Lock] = {}
        self._handshakes = trio.Semaphore(MAX_HANDSHAKES)
        self._nursery: trio.Nursery | None = None
        self._stop = trio.Event()
        self.register("ping", self._on_ping)
        self.register("peer.forget", self._on_forget)

    # ---------------------------------------------------------------- API
    def register(self, type: str, handler: Handler) -> None:
        """Serve requests of `type` (a name in wire.TYPES) from paired peers."""
        tid = wire.type_id(type)
        if tid in (wire.TYPES["hello"], wire.TYPES["auth"]):
            raise ValueError(f"{type} belongs to the handshake")

        async def checked(peer: Peer, msg: Message) -> Reply | dict[str, Any] | None:
            if peer.id not in self.store.peers:  # forgotten while connected
                raise PeerRefused(f"{self.name} no longer knows this peer")
            return await handler(peer, msg)
        self.handlers[tid] = checked

    async def call(self, peer: str | Peer, type: str, body: dict[str, Any] | None = None,
                   payload: bytes = b"", parts: AsyncIterable[bytes] | None = None,
                   within: float = 60.0) -> Message:
        """One request to a peer (by name, id or record); the response. A
        streamed response (msg.stream) must be read to its end."""
        p = peer if isinstance(peer, Peer) else self.store.by_name(peer)
        conn = await self.connection(p, within=min(within, HANDSHAKE_TIMEOUT))
        msg = await conn.call(type, body, payload, parts, within=within)
        self._seen(p.id)
        return msg

    async def connection(self, peer: Peer, within: float = HANDSHAKE_TIMEOUT) -> Connection:
        """The live connection to `peer`, dialed if there is none."""
        lock = self._dialing.setdefault(peer.id, trio.Lock())
        async with lock:
            conn = self.conns.get(peer.id)
            if conn is not None and not conn.closed.is_set():
                return conn
            try:
                return await self._dial(peer, within)
            except PStorageError as e:
                st = self.state.setdefault(peer.id, PeerState())
                st.reachable, st.last_error = False, e.message
                raise

    async def new_key(self, ttl: float) -> tuple[str, float]:
        key, expires = await self.store.new_key(ttl)
        log.info("replication: new connection key, valid until %s",
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(expires)))
        return key, expires

    async def pair(self, address: str, key: str, name: str | None = None) -> Peer:
        """Pair with the daemon listening at `address` that made `key`."""
        key = check_key_text(key)
        return await self._pair_client(address, key, name)

    async def disconnect(self, name: str) -> bool:
        """Forget a peer; tell it to forget us too if it can be reached.
        Returns whether it was told."""
        p = self.store.by_name(name)
        told = False
        try:
            await self.call(p, "peer.forget", {}, within=5)
            told = True
        except PStorageError as e:
            log.warning("replication: %s not told of the disconnect: %s", p.name, e.message)
        await self._forget(p)
        return told

    async def set_bandwidth(self, name: str, bandwidth: int) -> Peer:
        if bandwidth < 0:
            raise InvalidArgument("a bandwidth limit is 0 (none) or more bytes/s")
        p = await self.store.update(self.store.by_name(name).id, bandwidth=bandwidth)
        self._bucket(p).rate = bandwidth
        return p

    async def ping(self, name: str, within: float = 10.0) -> float:
        """Round-trip time to a peer in milliseconds."""
        p = self.store.by_name(name)
        t0 = time.monotonic()
        try:
            await self.call(p, "ping", {"t": time.time()}, within=within)
        except PStorageError as e:
            self._unreachable(p.id, e.message)
            raise
        rtt = (time.monotonic() - t0) * 1000
        st = self.state.setdefault(p.id, PeerState())
        st.reachable, st.rtt_ms, st.last_error = True, rtt, ""
        return rtt

    def info(self) -> dict[str, Any]:
        ident = self.store.identity
        return {"id": self.id, "name": self.name,
                "fingerprint": ident.fingerprint if ident else None,
                "listen": self.listen, "bound": self.bound, "advertise": self.advertise or None}

    def status(self) -> list[dict[str, Any]]:
        out = []
        for p in sorted(self.store.peers.values(), key=lambda p: p.name):
            st = self.state.get(p.id, PeerState())
            conn = self.conns.get(p.id)
            live = conn is not None and not conn.closed.is_set()
            sent, received = st.bytes_sent, st.bytes_received
            if conn is not None:
                sent += conn.fs.bytes_sent
                received += conn.fs.bytes_received
            out.append({**p.public(),
                        "state": "unknown" if st.reachable is None else
                        ("reachable" if st.reachable else "unreachable"),
                        "connected": live, "last_seen": st.last_seen or None,
                        "rtt_ms": None if st.rtt_ms is None else round(st.rtt_ms, 3),
                        "last_error": st.last_error or None,
                        "bytes_sent": sent, "bytes_received": received})
        return out

    # ---------------------------------------------------------------- service
    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ident = await self.store.load(self.id)
        cert, key = await trio.to_thread.run_sync(ident.write_files, self.dir)
        self._cert_files = (cert, key)
        self._client_ctx = client_context(cert, key)
        self._pairing_ctx = client_context(None, None)
        self._rebuild_server_context()
        for p in self.store.peers.values():
            self._bucket(p)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.listen:
                host, _, port = self.listen.rpartition(":")
                host = host.strip("[]")
                try:
                    listeners = await trio.open_tcp_listeners(int(port), host=host or None)
                except OSError as e:
                    raise InvalidArgument(f"replication listener {self.listen}: "
                                          f"{e.strerror or e}",
                                          "fix [replication] listen in the config") from None
                self.bound = [_addr(ln.socket.getsockname()) for ln in listeners]
                nursery.start_soon(trio.serve_listeners, self._accept, listeners)
                log.info("replication: listening on %s (certificate %s)",
                         ", ".join(self.bound), ident.fingerprint)
            nursery.start_soon(self._pinger)
            task_status.started()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def stop(self) -> None:
        self._stop.set()

    # ---------------------------------------------------------------- internals
    def _bucket(self, p: Peer) -> TokenBucket:
        b = self.buckets.get(p.id)
        if b is None:
            b = self.buckets[p.id] = TokenBucket(p.bandwidth)
        return b

    def _rebuild_server_context(self) -> None:
        cert, key = self._cert_files
        self._server_ctx = server_context(cert, key, [p.cert for p in
                                                      self.store.peers.values()])

    def _seen(self, pid: str) -> None:
        st = self.state.setdefault(pid, PeerState())
        st.reachable, st.last_seen, st.last_error = True, time.time(), ""

    def _unreachable(self, pid: str, why: str) -> None:
        st = self.state.setdefault(pid, PeerState())
        if st.reachable is not False:
            name = self.store.peers[pid].name if pid in self.store.peers else pid
            log.warning("replication: peer %s unreachable: %s", name, why)
        st.reachable, st.last_error = False, why

    async def _forget(self, p: Peer, close_after: float = 0.0) -> None:
        await self.store.remove(p.id)
        self._rebuild_server_context()
        self.buckets.pop(p.id, None)
        self.state.pop(p.id, None)
        conn = self.conns.pop(p.id, None)
        log.info("replication: forgot peer %s (%s)", p.name, p.id)
        if conn is None:
            return

        async def close() -> None:
            await trio.sleep(close_after)
            await conn.aclose("the peer was disconnected")
        if close_after and self._nursery is not None:
            self._nursery.start_soon(close)  # after an answer on it went out
        else:
            await close()

    async def _adopt(self, conn: Connection) -> None:
        """Serve a connection until it ends; it is the peer's connection meanwhile."""
        pid = conn.peer.id
        self.conns[pid] = conn
        self._seen(pid)
        try:
            await conn.run()
        finally:
            st = self.state.setdefault(pid, PeerState())
            st.bytes_sent += conn.fs.bytes_sent
            st.bytes_received += conn.fs.bytes_received
            if self.conns.get(pid) is conn:
                del self.conns[pid]

    def _start_conn(self, conn: Connection) -> None:
        assert self._nursery is not None
        self.conns[conn.peer.id] = conn  # before the task starts: callers find it at once
        self._nursery.start_soon(self._adopt, conn)

    # ------------------------------------------------------------ dialing
    async def _dial(self, peer: Peer, within: float) -> Connection:
        if not peer.address:
            raise PeerUnreachable(f"no address is known for peer {peer.name} (its replication "
                                  "listener is off)", "it connects to this daemon instead")
        tls = await open_tls(peer.address, self._client_ctx, within)
        fs = FramedStream(tls, self._bucket(peer))
        try:
            seen = server_fingerprint(tls)
            if seen != peer.fingerprint:
                log.warning("replication: %s at %s presented certificate %s, not the pinned %s: "
                            "refused", peer.name, peer.address, seen, peer.fingerprint)
                raise PeerRefused(f"{peer.address} presented a certificate that is not the one "
                                  f"pinned for {peer.name}",
                                  "if that peer's pool was recreated, disconnect it and pair "
                                  "again with a new key")
            with trio.fail_after(within):
                await fs.send(Frame(wire.REQUEST, wire.TYPES["hello"], 1, self._hello("peer")))
                try:
                    r = await expect(fs, wire.RESPONSE, wire.TYPES["hello"], 1)
                except PeerUnreachable as e:
                    # TLS 1.3: the server checks our certificate after our side of
                    # the handshake is done; a refusal shows as an alert or an end
                    raise PeerRefused(f"{peer.name} refused this daemon's certificate "
                                      f"({e.message})", "it may have forgotten this daemon: "
                                      "disconnect and pair again") from None
            if r.body.get("id") != peer.id:
                raise PeerRefused(f"{peer.address} is not peer {peer.name} (another pool "
                                  "answers there)")
        except trio.TooSlowError:
            await fs.aclose()
            raise PeerUnreachable(f"{peer.name} did not answer in {within:g} s") from None
        except BaseException:
            await fs.aclose()
            raise
        conn = Connection(fs, peer, self.handlers, dialer=True, first_rid=3)
        self._start_conn(conn)
        log.debug("replication: connected to %s at %s", peer.name, peer.address)
        return conn

    def _hello(self, mode: str, **extra: Any) -> dict[str, Any]:
        return {"mode": mode, "version": wire.VERSION, "id": self.id, "name": self.name,
                "listen": self.advertise, **extra}

    async def _pair_client(self, address: str, key: str, name: str | None) -> Peer:
        ident = self.store.identity
        assert ident is not None
        tls = await open_tls(address, self._pairing_ctx)
        fs = FramedStream(tls)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                der = tls.getpeercert(binary_form=True)
                if not der:
                    raise PeerRefused(f"{address} presented no certificate")
                server_cert = ssl.DER_cert_to_PEM_cert(der)
                sfp, cfp = fingerprint(server_cert), ident.fingerprint
                cn = nonce()
                hello = wire.TYPES["hello"]
                await fs.send(Frame(wire.REQUEST, hello, 1,
                                    self._hello("pair", cert=ident.cert, nonce=cn)))
                r = await expect(fs, wire.RESPONSE, hello, 1)
                sid, sname, sn = text(r.body, "id", 64), text(r.body, "name", 64), \
                    text(r.body, "nonce", 64)
                if not POOL_ID.match(sid):
                    raise ProtocolError("the peer's id is not a pool UUID")
                secret = key_secret(key)
                mine = proof(secret, "client", cn.encode(), sn.encode(), cfp, sfp, self.id, sid)
                await fs.send(Frame(wire.REQUEST, wire.TYPES["auth"], 3, {"mac": mine}))
                r = await expect(fs, wire.RESPONSE, wire.TYPES["auth"], 3)
                want = proof(secret, "server", cn.encode(), sn.encode(), cfp, sfp, self.id, sid)
                if not hmac.compare_digest(str(r.body.get("mac", "")), want):
                    raise PeerRefused(f"{address} did not prove it knows the connection key",
                                      "a man in the middle? check the address and pair again")
        except trio.TooSlowError:
            raise PeerUnreachable(f"{address} did not finish pairing in "
                                  f"{HANDSHAKE_TIMEOUT:g} s") from None
        finally:
            await fs.aclose()
        old = self.store.peers.get(sid)
        peer = Peer(sid, name or (old.name if old else self.store.free_name(sname, sid)),
                    address, sfp, server_cert, time.time(), old.bandwidth if old else 0)
        await self.store.put(peer)
        self._rebuild_server_context()
        self._bucket(peer)
        log.info("replication: paired with %s (pool %s) at %s, certificate %s", peer.name,
                 sid, address, sfp)
        return peer

    # ------------------------------------------------------------ accepting
    async def _accept(self, tcp: trio.SocketStream) -> None:
        try:
            remote = _addr(tcp.socket.getpeername())
        except OSError:
            await tcp.aclose()
            return
        try:
            self._handshakes.acquire_nowait()
        except trio.WouldBlock:
            log.warning("replication: too many connections in handshake; closed one from %s",
                        remote)
            await tcp.aclose()
            return
        conn = None
        try:
            conn = await self._handshake(tcp, remote)
        except Exception:  # never the listener's end: it serves the other peers
            log.exception("replication: handshake with %s failed", remote)
        finally:
            self._handshakes.release()
        if conn is not None:
            await self._adopt(conn)

    async def _handshake(self, tcp: trio.SocketStream, remote: str) -> Connection | None:
        tls = trio.SSLStream(tcp, self._server_ctx, server_side=True)
        fs = FramedStream(tls)
        rid, tid = 0, wire.TYPES["hello"]
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                try:
                    await tls.do_handshake()
                except trio.BrokenResourceError as e:
                    why = str(e.__cause__ or e)
                    if "certificate" in why:
                        log.warning("replication: refused %s: its certificate is not a paired "
                                    "peer's (%s)", remote, why)
                    else:
                        log.warning("replication: TLS handshake with %s failed: %s", remote, why)
                    return None
                hello = await fs.receive()
                if hello is None:
                    return None
                rid = hello.rid
                if hello.kind != wire.REQUEST or hello.type != tid or hello.rid != 1 \
                        or hello.more:
                    raise ProtocolError("the first message must be hello")
                mode = text(hello.body, "mode", 8)
                if mode == "pair":
                    await self._pair_server(fs, tls, hello, remote)
                    return None
                if mode != "peer":
                    raise ProtocolError(f"unknown hello mode {mode!r}")
                pid = text(hello.body, "id", 64)
                der = tls.getpeercert(binary_form=True)
                peer = self.store.peers.get(pid)
                fp = hashlib.sha256(der).hexdigest() if der else ""
                if peer is None or not der or fp != peer.fingerprint:
                    log.warning("replication: refused %s: unknown peer %s (certificate %s)",
                                remote, pid, fp or "none")
                    raise PeerRefused("unknown peer: this daemon is not paired with yours",
                                      "pair first: 'pstorage peer key' here, then 'pstorage "
                                      "peer connect' there")
                await fs.send(Frame(wire.RESPONSE, tid, 1, self._hello("peer")))
                fs.bucket = self._bucket(peer)
                log.debug("replication: %s connected from %s", peer.name, remote)
                return Connection(fs, peer, self.handlers, dialer=False)
        except trio.TooSlowError:
            log.warning("replication: %s did not finish its handshake in %g s; closed",
                        remote, HANDSHAKE_TIMEOUT)
        except (PeerRefused, ProtocolError) as e:
            if isinstance(e, ProtocolError):
                log.warning("replication: bad handshake from %s: %s", remote, e.message)
            with trio.move_on_after(1):
                try:
                    await fs.send(error_frame(rid, tid, e))
                except PeerUnreachable:
                    pass
        except PeerUnreachable as e:
            log.info("replication: %s went away during the handshake: %s", remote, e.message)
        except trio.BrokenResourceError as e:
            log.info("replication: %s went away during the handshake: %s", remote, _why(e))
        await fs.aclose()
        return None

    async def _pair_server(self, fs: FramedStream, tls: trio.SSLStream, hello: Frame,
                           remote: str) -> None:
        ident = self.store.identity
        assert ident is not None
        b = hello.body
        cid, cname = text(b, "id", 64), text(b, "name", 64)
        cert, cn, listen = text(b, "cert", 8192), text(b, "nonce", 64), text(b, "listen", 300)
        if not POOL_ID.match(cid):
            raise ProtocolError("the peer's id is not a pool UUID")
        if cid == self.id:
            raise PeerRefused("a daemon cannot pair with itself")
        cfp, sfp = fingerprint(cert), ident.fingerprint
        sn = nonce()
        await fs.send(Frame(wire.RESPONSE, wire.TYPES["hello"], 1,
                            {"id": self.id, "name": self.name, "nonce": sn,
                             "version": wire.VERSION}))
        auth = await expect(fs, wire.REQUEST, wire.TYPES["auth"], 3)
        mac = text(auth.body, "mac", 64)

        def matches(secret: bytes) -> bool:
            want = proof(secret, "client", cn.encode(), sn.encode(), cfp, sfp, cid, self.id)
            return hmac.compare_digest(mac, want)
        try:
            secret = await self.store.match_key(matches)
        except PeerRefused as e:
            log.warning("replication: refused pairing from %s (%s): %s", remote, cname, e.message)
            raise
        old = self.store.peers.get(cid)
        peer = Peer(cid, old.name if old else self.store.free_name(cname, cid),
                    _dialable(listen, remote), cfp, cert, time.time(),
                    old.bandwidth if old else 0)
        await self.store.put(peer)
        self._rebuild_server_context()
        self._bucket(peer)
        await fs.send(Frame(wire.RESPONSE, wire.TYPES["auth"], 3, {"mac": proof(
            secret, "server", cn.encode(), sn.encode(), cfp, sfp, cid, self.id)}))
        log.info("replication: paired with %s (pool %s) from %s, certificate %s", peer.name,
                 cid, remote, cfp)

    # ------------------------------------------------------------ handlers
    async def _on_ping(self, peer: Peer, msg: Message) -> dict[str, Any]:
        h = hashlib.sha256(msg.payload)
        n = len(msg.payload)
        async for part in msg.parts():
            h.update(part)
            n += len(part)
        return {"t": finite(msg.body.get("t")), "id": self.id, "bytes": n,
                "sha256": h.hexdigest()}

    async def _on_forget(self, peer: Peer, msg: Message) -> dict[str, Any]:
        log.info("replication: peer %s disconnected from us", peer.name)
        await self._forget(peer, close_after=0.5)
        return {}

    async def _pinger(self) -> None:
        while True:
            async with trio.open_nursery() as n:
                for p in list(self.store.peers.values()):
                    n.start_soon(self._ping_one, p)
            await trio.sleep(self.ping_interval)

    async def _ping_one(self, p: Peer) -> None:
        if not p.address and p.id not in self.conns:
            return  # it dials us; its connection tells when it was last seen
        try:
            await self.ping(p.name, within=max(2.0, self.ping_interval))
        except PStorageError as e:
            conn = self.conns.get(p.id)
            if conn is not None:  # a dead link: the next call dials again
                await conn.aclose(e.message)
        except trio.Cancelled:
            raise


def _addr(sockname: Any) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _dialable(listen: str, remote: str) -> str:
    """The address to dial a peer at: what it announced, its wildcard host
    replaced by the address it connected from."""
    if not listen:
        return ""
    host, _, port = listen.rpartition(":")
    try:
        wildcard = not host or ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        wildcard = False
    if wildcard:
        return f"{remote.rpartition(':')[0]}:{port}"
    return listen


def _why(e: BaseException) -> str:
    return str(e.__cause__ or e)
