"""Level 4: replication peers between real daemons in separate network
namespaces joined by a veth pair. Pairing with a connection key, ping and
list; wrong and expired keys, a daemon never paired, a certificate that is
not the pinned one and malformed frames are refused without harm; a link
cut with `ip link set down` shows as unreachable and recovers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from pstoraged.errors import PeerRefused

from . import netns_util
from .daemon_util import Daemon, remove

pytestmark = pytest.mark.skipif(bool(netns_util.available()), reason=netns_util.available()
                                or "n/a")
PORT = 8471
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_in(link: netns_util.Link, side: int, port: int = PORT) -> Daemon:
    return netns_util.start_daemon_in(link, side, port)


def peers(d: Daemon) -> dict[str, dict]:
    return {p["name"]: p for p in d.client.get("/api/v1/peers")["peers"]}


def name(d: Daemon) -> str:
    return d.client.get("/api/v1/peers")["self"]["name"]


def wait_for(what, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        v = what()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(0.2)


def helper(link: netns_util.Link, side: int, *args: str) -> dict:
    p = subprocess.run([*link.exec(side), sys.executable, "-m", "tests.peer_helper", *args],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def net():
    with netns_util.veth_pair() as link:
        a = b = None
        try:
            a = start_in(link, 0)
            b = start_in(link, 1)
            key = b.cli("peer", "key").stdout.split()[0]
            out = a.cli("peer", "connect", f"{link.addr[1]}:{PORT}", "--key", key).stdout
            assert "paired with" in out
            yield link, a, b
        finally:
            for d in (a, b):
                if d is not None:
                    remove(d)


def test_paired_daemons_see_each_other(net):
    link, a, b = net
    na, nb = name(a), name(b)
    pa = peers(a)[nb]
    assert pa["address"] == f"{link.addr[1]}:{PORT}" and pa["state"] == "reachable"
    assert pa["fingerprint"] == b.client.get("/api/v1/peers")["self"]["fingerprint"]
    # b learnt a's listener from its hello, and pings it in turn
    pb = wait_for(lambda: peers(b)[na]["last_seen"] and peers(b)[na])
    assert pb["address"] == f"{link.addr[0]}:{PORT}" and pb["state"] == "reachable"
    assert float(b.cli("peer", "ping", na, "--json").stdout and
                 json.loads(b.cli("peer", "ping", na, "--json").stdout)["rtt_ms"]) > 0
    table = a.cli("peer", "list").stdout
    assert nb in table and "reachable" in table and f"{link.addr[1]}:{PORT}" in table
    # the private key's runtime copy (ssl loads files only) is the owner's alone
    key = os.path.join(a.run_dir, "replication", "identity.key")
    assert os.stat(key).st_mode & 0o077 == 0
    a.cli("peer", "set", nb, "--bandwidth", "50M")
    assert peers(a)[nb]["bandwidth"] == 50 << 20


def test_wrong_and_expired_keys_are_refused(net):
    link, a, b = net
    c = start_in(link, 0, PORT + 1)  # a third daemon
    try:
        p = c.cli("peer", "connect", f"{link.addr[1]}:{PORT}", "--key",
                  "pst1-aaaaaaaa-bbbbbbbb-cccccccc-dddddddd", check=False)
        assert p.returncode == PeerRefused.exit_code and "wrong connection key" in p.stderr
        key = b.client.post("/api/v1/peers/key", {"ttl": 1})["key"]
        time.sleep(1.5)
        p = c.cli("peer", "connect", f"{link.addr[1]}:{PORT}", "--key", key, check=False)
        assert p.returncode == PeerRefused.exit_code and "expired" in p.stderr, p.stderr
        p = c.cli("peer", "connect", f"{link.addr[1]}:{PORT}", "--key", "nonsense", check=False)
        assert p.returncode == 2  # not even the form of a key
        assert name(c) not in peers(b)
        assert "refused pairing" in b.log()
    finally:
        remove(c)


def test_stranger_and_impostor_are_refused(net):
    link, a, b = net
    r = helper(link, 0, "stranger", f"{link.addr[1]}:{PORT}")
    assert r["result"].startswith(("closed", "error: unknown peer")), r
    a_id = a.client.get("/api/v1/peers")["self"]["id"]
    r = helper(link, 0, "impostor", f"{link.addr[1]}:{PORT}", a_id)
    assert r["result"].startswith(("closed", "error: unknown peer")), r
    assert "its certificate is not a paired peer's" in b.log() or "unknown peer" in b.log()
    assert peers(a)[name(b)]["state"] == "reachable"
    a.cli("peer", "ping", name(b))


def test_changed_certificate_is_refused(net):
    """A paired peer's pool is recreated at the same address: a new
    certificate, not the pinned one."""
    link, a, b = net
    c = start_in(link, 0, PORT + 2)
    key = b.client.post("/api/v1/peers/key", {"ttl": 60})["key"]
    c.cli("peer", "connect", f"{link.addr[1]}:{PORT}", "--key", key)
    nc = name(c)
    wait_for(lambda: peers(b)[nc]["last_seen"])
    remove(c)
    d = start_in(link, 0, PORT + 2)  # another pool at c's address
    try:
        p = b.cli("peer", "ping", nc, check=False)
        assert p.returncode == PeerRefused.exit_code and "not the one pinned" in p.stderr
        assert wait_for(lambda: peers(b)[nc]["state"] == "unreachable")
        b.cli("peer", "disconnect", nc)
    finally:
        remove(d)


def test_malformed_frames_cannot_crash_or_wedge(net):
    link, a, b = net
    ident = os.path.join(a.run_dir, "replication")
    a_id = a.client.get("/api/v1/peers")["self"]["id"]
    r = helper(link, 0, "garbage", f"{link.addr[1]}:{PORT}", os.path.join(ident, "identity.crt"),
               os.path.join(ident, "identity.key"), a_id)["result"]
    assert all(x is True or x == "answered" or x.startswith(("closed", "error")) for x in r), r
    assert b.proc.poll() is None
    b.cli("peer", "ping", name(a))  # still serves the paired peer
    a.cli("peer", "ping", name(b))
    log = b.log()
    assert "Traceback" not in log
    for words in ("over the limit", "ended inside a frame", "not a PStorage replication frame",
                  "version 9", "request id 4 is not the peer's", "data frame for no streamed"):
        assert words in log, words  # each was parsed and refused, not just dropped


def test_link_down_shows_unreachable_and_recovers(net):
    link, a, b = net
    nb = name(b)
    link.set(0, "down")
    try:
        assert wait_for(lambda: peers(a)[nb]["state"] == "unreachable", 20)
        out = a.cli("peer", "list").stdout
        assert "unreachable" in out
        assert a.cli("peer", "ping", nb, check=False).returncode != 0
    finally:
        link.set(0, "up")
    assert wait_for(lambda: peers(a)[nb]["state"] == "reachable", 20)
    a.cli("peer", "ping", nb)
