"""Level 2: two replication services in one trio run, over TCP on localhost:
pairing, calls, streamed bodies in both directions, the bandwidth limit,
timeouts and cancellation, errors from handlers. The pool metadata is a
dict here (PeerStore only needs get_json/put_json and a `call`)."""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any

import pytest
import trio

from pstoraged.errors import NotFound, PeerRefused, PeerUnreachable
from pstoraged.replication import wire
from pstoraged.replication.channel import Message, Reply
from pstoraged.replication.peers import Peer, PeerStore
from pstoraged.replication.service import Replication


class DictMeta:
    def __init__(self) -> None:
        self.d: dict[str, Any] = {}

    def get_json(self, key: str, default: Any = None) -> Any:
        return self.d.get(key, default)

    def put_json(self, key: str, value: Any) -> None:
        self.d[key] = value


async def run_fn(fn, *args, flush: bool = False):
    return fn(*args)


@pytest.fixture
def two(tmp_path, monkeypatch):
    # test-only message types in the ranges the features will use
    monkeypatch.setitem(wire.TYPES, "test.echo", 0x01F0)
    monkeypatch.setitem(wire.TYPES, "test.slow", 0x01F1)
    monkeypatch.setitem(wire.TYPES, "test.fail", 0x01F2)
    monkeypatch.setitem(wire.NAMES, 0x01F0, "test.echo")
    monkeypatch.setitem(wire.NAMES, 0x01F1, "test.slow")
    monkeypatch.setitem(wire.NAMES, 0x01F2, "test.fail")

    def make(name: str) -> Replication:
        return Replication(PeerStore(DictMeta(), run_fn), uuid.uuid4().hex, name,
                           str(tmp_path / name), listen="127.0.0.1:0", ping_interval=0.5)
    return make("a"), make("b")


async def started(nursery: trio.Nursery, *reps: Replication) -> None:
    for r in reps:
        await nursery.start(r.run)


async def paired(a: Replication, b: Replication) -> Peer:
    key, _ = await b.new_key(60)
    return await a.pair(b.bound[0], key)


def test_pair_call_stream_and_limit(two):
    a, b = two
    cancelled = trio.Event()

    async def echo(peer: Peer, msg: Message) -> Reply:
        data = msg.payload + b"".join([p async for p in msg.parts()])

        async def back():
            for i in range(0, len(data), 3 << 20):
                yield data[i:i + (3 << 20)]
        return Reply({"from": peer.name, "n": len(data)}, b"head", back())

    async def slow(peer: Peer, msg: Message) -> dict:
        try:
            await trio.sleep(30)
        finally:
            cancelled.set()
        return {}

    async def fail(peer: Peer, msg: Message) -> dict:
        raise NotFound("no such thing", "try another")

    for r in (a, b):
        r.register("test.echo", echo)
        r.register("test.slow", slow)
        r.register("test.fail", fail)

    async def main():
        async with trio.open_nursery() as n:
            await started(n, a, b)
            peer = await paired(a, b)
            assert peer.name == "b" and a.store.peers[b.id].fingerprint == \
                b.store.identity.fingerprint
            assert b.store.peers[a.id].fingerprint == a.store.identity.fingerprint
            # a used key is gone
            key, _ = await b.new_key(60)
            await a.pair(b.bound[0], key)
            with pytest.raises(PeerRefused, match="wrong connection key"):
                await a.pair(b.bound[0], key)
            # ping both ways (b dials a's announced address)
            assert await a.ping("b") > 0 and await b.ping("a") > 0
            # a streamed request (20 MiB, over MAX_PAYLOAD) and a streamed response
            blob = bytes(range(256)) * (80 << 10)

            async def parts():
                for i in range(0, len(blob), 5 << 20):
                    yield blob[i:i + (5 << 20)]
            msg = await a.call("b", "test.echo", {}, b"x", parts())
            back = msg.payload + b"".join([p async for p in msg.parts()])
            assert msg.body == {"from": "a", "n": len(blob) + 1}
            assert hashlib.sha256(back).digest() == hashlib.sha256(b"head" + b"x" + blob).digest()
            # errors travel as their class; unknown types are refused, not fatal
            with pytest.raises(NotFound, match="no such thing"):
                await b.call("a", "test.fail")
            # a timeout cancels the handler on the other side
            with pytest.raises(PeerUnreachable, match="did not answer"):
                await a.call("b", "test.slow", within=0.3)
            with trio.fail_after(5):
                await cancelled.wait()
            # the connection still works
            assert (await a.call("b", "ping", {"t": 1})).body["t"] == 1
            # bandwidth: 4 MiB at 2 MiB/s takes about 2 s (burst: a quarter second)
            await a.set_bandwidth("b", 2 << 20)
            t0 = time.monotonic()
            r = await a.call("b", "ping", {}, b"z" * (4 << 20))
            took = time.monotonic() - t0
            assert r.body["bytes"] == 4 << 20
            assert 1.6 < took < 4, took
            await a.set_bandwidth("b", 0)
            # disconnect: both sides forget
            assert await a.disconnect("b") is True
            assert not a.store.peers and not b.store.peers
            a.stop()
            b.stop()
    trio.run(main)


def test_peer_that_was_forgotten_is_refused(two):
    a, b = two

    async def main():
        async with trio.open_nursery() as n:
            await started(n, a, b)
            await paired(a, b)
            await a.ping("b")
            await b._forget(b.store.peers[a.id])  # b forgets a without telling it
            with pytest.raises((PeerRefused, PeerUnreachable)):
                await a.ping("b")
            with pytest.raises(PeerRefused, match="refused this daemon's certificate|not paired"):
                await a.ping("b")
            a.stop()
            b.stop()
    trio.run(main)
