"""Peers: this daemon's identity, the peers it paired with, connection keys.

Everything here lives in the pool's metadata (the LMDB `meta` table on the
pool's device), so a pool keeps its identity and its peers when its disk
moves to another host:

- `repl:identity`: this pool's self-signed certificate and private key (PEM),
  made once with the openssl tool;
- `repl:peers`: {peer id: record} — the peer's pool UUID, the name we call it,
  its replication address, the SHA-256 fingerprint of its certificate (and
  the certificate itself, the TLS trust anchor), created, bandwidth limit;
- `repl:keys`: one-time connection keys, stored as a one-way derivation (the
  key text never is) with an expiry.

Metadata is the engine thread's: PeerStore reads and writes through `call`
(DataPlane.call, flush=True so a pairing is durable before it is reported).
Pure helpers (proof(), TokenBucket) serve channel.py and service.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import ssl
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import trio

from ..errors import Conflict, InvalidArgument, NotFound, PeerRefused, ToolFailed

KEY_PREFIX = "pst1-"
DEFAULT_KEY_TTL = 3600.0
EXPIRED_KEPT = 86400.0  # an expired key is remembered this long, to say "expired" not "wrong"


def fingerprint(cert_pem: str) -> str:
    """SHA-256 of the certificate's DER form, hex (what `openssl x509 -fingerprint
    -sha256` shows, without colons)."""
    try:
        der = ssl.PEM_cert_to_DER_cert(cert_pem)
    except (ValueError, TypeError) as e:
        raise PeerRefused(f"not a PEM certificate ({e})") from None
    return hashlib.sha256(der).hexdigest()


def der_fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True, slots=True)
class Identity:
    """This pool as its peers know it."""

    id: str  # the pool's UUID, hex
    cert: str  # PEM
    key: str  # PEM, the private key (stays in the pool's metadata and a 0600 runtime file)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)

    def write_files(self, directory: str) -> tuple[str, str]:
        """The certificate and key as files for ssl.SSLContext.load_cert_chain (it
        takes paths only): in the runtime directory, owner-only."""
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        paths = []
        for name, text in (("identity.crt", self.cert), ("identity.key", self.key)):
            path = os.path.join(directory, name)
            fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)
            paths.append(path)
        return paths[0], paths[1]


def generate_identity(pool_id: str) -> Identity:
    """A new self-signed P-256 certificate for this pool (blocking: openssl)."""
    with tempfile.TemporaryDirectory(prefix="pstorage-id-") as d:
        key, crt = os.path.join(d, "k.pem"), os.path.join(d, "c.pem")
        try:
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                 "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", crt,
                 "-days", "36500", "-subj", f"/CN=pstorage-{pool_id}",
                 "-addext", "basicConstraints=critical,CA:FALSE"],
                check=True, capture_output=True, timeout=60)
        except FileNotFoundError:
            raise ToolFailed("the openssl tool is missing (it makes the replication "
                             "certificate)", "apt-get install openssl") from None
        except subprocess.CalledProcessError as e:
            raise ToolFailed(f"openssl could not make a certificate: "
                             f"{e.stderr.decode(errors='replace').strip()}") from None
        with open(crt) as f, open(key) as g:
            return Identity(pool_id, f.read(), g.read())


@dataclass(frozen=True, slots=True)
class Peer:
    """A paired daemon (a record in `repl:peers`)."""

    id: str  # its pool's UUID
    name: str  # what this side calls it (unique here)
    address: str  # HOST:PORT of its replication listener; "" if it has none
    fingerprint: str  # SHA-256 of its certificate: the only one accepted from it
    cert: str  # that certificate (PEM): the TLS trust anchor
    created: float
    bandwidth: int = 0  # bytes/s we send to it at most; 0: no limit

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        del d["cert"]
        return d


def key_secret(key: str) -> bytes:
    """What both sides derive from a connection key: the HMAC key of the pairing
    proof, and what the target stores (the key text itself is never stored)."""
    return hashlib.sha256(b"pstorage pairing v1\0" + key.strip().encode()).digest()


def new_key_text() -> str:
    raw = base64.b32encode(secrets.token_bytes(20)).decode().lower()  # 160 bits
    return KEY_PREFIX + "-".join(raw[i:i + 8] for i in range(0, 32, 8))


def check_key_text(key: str) -> str:
    key = key.strip()
    if not key.startswith(KEY_PREFIX) or len(key) != len(KEY_PREFIX) + 35:
        raise InvalidArgument("that is not a connection key",
                              "run 'pstorage peer key' on the target daemon and copy the "
                              f"key it prints ({KEY_PREFIX}...)")
    return key


def proof(secret: bytes, role: str, client_nonce: bytes, server_nonce: bytes,
          client_fp: str, server_fp: str, client_id: str, server_id: str) -> str:
    """HMAC-SHA256 over both nonces and both certificates' fingerprints: only a
    holder of the key computes it, and a man in the middle (who shows each side
    a certificate of its own) changes a fingerprint one side puts in."""
    msg = b"\0".join([role.encode(), client_nonce, server_nonce, client_fp.encode(),
                      server_fp.encode(), client_id.encode(), server_id.encode()])
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


class TokenBucket:
    """A per-peer send rate limit (bytes/s). `take(n)` sleeps as long as the
    bytes already sent are ahead of the rate; bursts up to a quarter second."""

    __slots__ = ("rate", "_tokens", "_at")

    def __init__(self, rate: int = 0) -> None:
        self.rate = rate
        self._tokens = 0.0
        self._at = time.monotonic()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        burst = self.rate / 4
        self._tokens = min(burst, self._tokens + (now - self._at) * self.rate) - n
        self._at = now
        if self._tokens < 0:
            await trio.sleep(-self._tokens / self.rate)


Call = Callable[..., Awaitable[Any]]


class PeerStore:
    """The peer records and connection keys, kept in memory and written through
    to the pool's metadata on the engine thread."""

    def __init__(self, meta: Any, call: Call) -> None:
        self.meta = meta
        self.call = call  # DataPlane.call: runs fn on the engine thread
        self.peers: dict[str, Peer] = {}
        self.identity: Identity | None = None

    async def load(self, pool_id: str) -> Identity:
        """Read the peers; make this pool's identity on first use."""
        raw = await self.call(lambda: self.meta.get_json("repl:peers", {}))
        self.peers = {k: Peer(**v) for k, v in raw.items()}
        ident = await self.call(lambda: self.meta.get_json("repl:identity"))
        if ident is None:
            new = await trio.to_thread.run_sync(generate_identity, pool_id)
            await self.call(lambda: self.meta.put_json("repl:identity", asdict(new)), flush=True)
            ident = asdict(new)
        self.identity = Identity(**ident)
        return self.identity

    async def _save(self) -> None:
        data = {k: asdict(v) for k, v in self.peers.items()}
        await self.call(lambda: self.meta.put_json("repl:peers", data), flush=True)

    def by_name(self, name: str) -> Peer:
        for p in self.peers.values():
            if p.name == name or p.id == name:
                return p
        raise NotFound(f"no peer named {name!r}", "'pstorage peer list' shows the peers")

    def free_name(self, name: str, pid: str) -> str:
        """`name`, or name-<id prefix> when another peer has it already."""
        taken = {p.name for p in self.peers.values() if p.id != pid}
        return name if name not in taken else f"{name}-{pid[:8]}"

    async def put(self, peer: Peer) -> Peer:
        if any(p.name == peer.name and p.id != peer.id for p in self.peers.values()):
            raise Conflict(f"a peer named {peer.name!r} exists already",
                           "choose another name with --name, or disconnect that one")
        self.peers[peer.id] = peer
        await self._save()
        return peer

    async def update(self, peer_id: str, **changes: Any) -> Peer:
        p = replace(self.peers[peer_id], **changes)
        self.peers[peer_id] = p
        await self._save()
        return p

    async def remove(self, peer_id: str) -> None:
        if self.peers.pop(peer_id, None) is not None:
            await self._save()

    # ---------------------------------------------------------------- keys
    async def new_key(self, ttl: float = DEFAULT_KEY_TTL) -> tuple[str, float]:
        if not 0 < ttl <= 7 * 86400:
            raise InvalidArgument(f"a connection key lives 1 second to 7 days, not {ttl:g} s")
        key = new_key_text()
        expires = time.time() + ttl

        def add() -> None:
            now = time.time()
            keys = [k for k in self.meta.get_json("repl:keys", [])
                    if k["expires"] + EXPIRED_KEPT > now]
            keys.append({"secret": key_secret(key).hex(), "expires": expires})
            self.meta.put_json("repl:keys", keys)
        await self.call(add, flush=True)
        return key, expires

    async def match_key(self, check: Callable[[bytes], bool]) -> bytes:
        """The secret of the outstanding key for which check(secret) holds; it
        is used up. PeerRefused for no key or an expired one."""
        keys = await self.call(lambda: self.meta.get_json("repl:keys", []))
        now = time.time()
        for k in keys:
            secret = bytes.fromhex(k["secret"])
            if check(secret):
                if k["expires"] < now:
                    raise PeerRefused("the connection key has expired",
                                      "run 'pstorage peer key' on the target for a new one")

                def use(used: str = k["secret"]) -> None:
                    left = [x for x in self.meta.get_json("repl:keys", [])
                            if x["secret"] != used]
                    self.meta.put_json("repl:keys", left)
                await self.call(use, flush=True)
                return secret
        raise PeerRefused("wrong connection key (or one that was used already)",
                          "run 'pstorage peer key' on the target and use the key it prints")
