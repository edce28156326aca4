"""Level 4: asynchronous replication between two real daemons in separate
network namespaces (a veth pair): `replication create` and `sync` ship a
volume's snapshot delta; the replica snapshot on the target reads exactly as
the source's; a second volume with the same data sends almost no chunk
bytes; a sync cut by `ip link set down` resumes where it stopped."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest

from . import netns_util
from .daemon_util import Daemon, nbd_read, nbd_write, remove

pytestmark = pytest.mark.skipif(bool(netns_util.available()), reason=netns_util.available()
                                or "n/a")
PORT = 8472
MiB = 1 << 20


def start_in(link: netns_util.Link, side: int) -> Daemon:
    return netns_util.start_daemon_in(link, side, PORT, size=256 << 20)


@pytest.fixture(scope="module")
def net():
    with netns_util.veth_pair() as link:
        a = b = None
        try:
            a = start_in(link, 0)
            b = start_in(link, 1)
            key = b.cli("peer", "key").stdout.split()[0]
            a.cli("peer", "connect", f"{link.addr[1]}:{PORT}", "--key", key, "--name", "dr")
            yield link, a, b
        finally:
            for d in (a, b):
                if d is not None:
                    remove(d)


def status(d: Daemon) -> dict[tuple[str, str], dict]:
    pairs = json.loads(d.cli("replication", "status", "--json").stdout)["pairs"]
    return {(p["volume"], p["role"]): p for p in pairs}


def digest(d: Daemon, export: str, size: int) -> str:
    uri = d.cli("snapshot", "export", export).stdout.strip() if "@" in export else \
        d.cli("export", export).stdout.strip()
    h = hashlib.sha256()
    for off in range(0, size, 4 * MiB):
        h.update(nbd_read(uri, off, min(4 * MiB, size - off)))
    return h.hexdigest()


def mixed(n: int) -> bytes:
    """Incompressible and compressible 4 KiB blocks, some of these repeated."""
    return b"".join(bytes([1 + i % 61]) * 4096 if i % 4 == 0 else os.urandom(4096)
                    for i in range(n // 4096))


def write(d: Daemon, volume: str, data: bytes, offset: int = 0) -> None:
    uri = d.cli("export", volume).stdout.strip()
    for off in range(0, len(data), 4 * MiB):
        nbd_write(uri, offset + off, data[off:off + 4 * MiB])
    d.cli("unexport", volume)


def test_sync_replica_dedupe_and_status(net):
    link, a, b = net
    a.cli("volume", "create", "db", "--size", "32M")
    data = mixed(8 * MiB)
    write(a, "db", data, MiB)
    out = a.cli("replication", "create", "db", "--peer", "dr", "--keep", "2").stdout
    assert "replicates to dr" in out
    r = json.loads(a.cli("replication", "sync", "db", "--wait", "--json").stdout)
    last = r["last_sync"]
    assert last["blocks"] == 8 * MiB // 4096 and last["logical_bytes"] == 8 * MiB
    # repeated blocks travel once: a quarter of the blocks are 1 in 4 patterns
    assert 0 < last["chunks_sent"] < 8 * MiB // 4096
    src = status(a)[("db", "source")]
    tgt = status(b)[("db", "target")]
    point = tgt["last_consistent_point"]
    assert src["last_consistent_point"] == point and point.startswith("repl-")
    assert src["state"] == "idle" and tgt["state"] == "idle" and src["lag_seconds"] >= 0
    assert digest(b, f"db@{point}", 32 * MiB) == digest(a, f"db@{point}", 32 * MiB)
    # the replica volume is read-only to clients
    vols = {v["name"]: v for v in b.client.get("/api/v1/volumes")["volumes"]}
    assert vols["db"]["readonly"] is True
    table = a.cli("replication", "status").stdout
    assert "db" in table and "source" in table and point in table
    # a second volume with the same data: the target has every chunk already
    a.cli("volume", "create", "copy", "--size", "32M")
    write(a, "copy", data, MiB)
    a.cli("replication", "create", "copy", "--peer", "dr")
    r = json.loads(a.cli("replication", "sync", "copy", "--wait", "--json").stdout)["last_sync"]
    assert r["blocks"] == 8 * MiB // 4096 and r["chunks_sent"] == 0 and r["payload_bytes"] == 0
    assert r["wire_bytes"] < 8 * MiB // 40  # fingerprints only: ~1% of the logical bytes
    cpoint = status(b)[("copy", "target")]["last_consistent_point"]
    assert digest(b, f"copy@{cpoint}", 32 * MiB) == digest(a, f"db@{point}", 32 * MiB)
    # an incremental sync ships only the change
    write(a, "db", os.urandom(64 * 1024), 20 * MiB)
    r = json.loads(a.cli("replication", "sync", "db", "--wait", "--json").stdout)["last_sync"]
    assert r["blocks"] == 16 and r["chunks_sent"] == 16
    point2 = status(b)[("db", "target")]["last_consistent_point"]
    assert point2 != point
    assert digest(b, f"db@{point2}", 32 * MiB) == digest(a, f"db@{point2}", 32 * MiB)


def test_interrupted_sync_resumes(net):
    link, a, b = net
    a.cli("volume", "create", "big", "--size", "32M")
    write(a, "big", os.urandom(12 * MiB))
    a.cli("replication", "create", "big", "--peer", "dr")
    a.cli("peer", "set", "dr", "--bandwidth", "2M")  # 12 MiB: about 6 s on the wire
    try:
        a.cli("replication", "sync", "big")  # in the background
        deadline = time.monotonic() + 30
        while True:
            cur = status(a)[("big", "source")]
            if cur["progress"] > 0.05:
                break
            assert time.monotonic() < deadline, cur
            time.sleep(0.2)
        link.set(0, "down")
        deadline = time.monotonic() + 90
        while status(a)[("big", "source")]["state"] != "error":
            assert time.monotonic() < deadline
            time.sleep(0.5)
        cut = status(a)[("big", "source")]
        assert cut["progress"] < 1 and cut["last_error"]
        assert status(b)[("big", "target")]["state"] == "syncing"
    finally:
        link.set(0, "up")
    a.cli("peer", "set", "dr", "--bandwidth", "0")
    r = json.loads(a.cli("replication", "sync", "big", "--wait", "--json").stdout)["last_sync"]
    assert r["resumed_at"] > 0  # not from the start
    assert r["blocks"] < 12 * MiB // 4096
    tgt = status(b)[("big", "target")]
    point = tgt["last_consistent_point"]
    assert tgt["state"] == "idle"
    assert digest(b, f"big@{point}", 32 * MiB) == digest(a, f"big@{point}", 32 * MiB)


def test_sync_resumes_after_the_target_restarts_and_schedules_run(net):
    link, a, b = net
    a.cli("volume", "create", "logs", "--size", "16M")
    data = os.urandom(8 * MiB)
    write(a, "logs", data)
    a.cli("replication", "create", "logs", "--peer", "dr")
    a.cli("peer", "set", "dr", "--bandwidth", "1M")
    try:
        a.cli("replication", "sync", "logs")
        deadline = time.monotonic() + 30
        while status(a)[("logs", "source")]["progress"] < 0.1:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        b.kill9()  # the target dies mid-transfer
        deadline = time.monotonic() + 90
        while status(a)[("logs", "source")]["state"] != "error":
            assert time.monotonic() < deadline
            time.sleep(0.5)
    finally:
        if b.proc is None:
            b.start()
    assert status(b)[("logs", "target")]["state"] == "syncing"  # its progress survived
    a.cli("peer", "set", "dr", "--bandwidth", "0")
    r = json.loads(a.cli("replication", "sync", "logs", "--wait", "--json").stdout)["last_sync"]
    assert 0 < r["resumed_at"] and r["blocks"] < 8 * MiB // 4096
    point = status(b)[("logs", "target")]["last_consistent_point"]
    assert digest(b, f"logs@{point}", 16 * MiB) == digest(a, f"logs@{point}", 16 * MiB)
    # a schedule: the next point comes by itself
    write(a, "logs", os.urandom(4096), 12 * MiB)
    a.cli("replication", "delete", "logs")
    out = a.cli("replication", "create", "logs", "--peer", "dr", "--every", "1s").stdout
    assert "every 1s" in out
    deadline = time.monotonic() + 30
    while status(b)[("logs", "target")]["last_consistent_point"] == point:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    a.cli("replication", "delete", "logs")
    later = status(b)[("logs", "target")]["last_consistent_point"]
    assert digest(b, f"logs@{later}", 16 * MiB) == digest(a, f"logs@{later}", 16 * MiB)
