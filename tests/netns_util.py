"""Network namespaces joined by a veth pair, for tests with real daemons on a
real (virtual) network. Names are unique per run; everything is removed on
exit, also after a failure."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class Link:
    ns: tuple[str, str]
    veth: tuple[str, str]
    addr: tuple[str, str]

    def exec(self, side: int) -> list[str]:
        return ["ip", "netns", "exec", self.ns[side]]

    def set(self, side: int, state: str) -> None:
        ip("-n", self.ns[side], "link", "set", self.veth[side], state)


def available() -> str:
    """'' when namespaces and veth work here, else why not."""
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    probe = f"pstp{secrets.token_hex(3)}"
    try:
        ip("netns", "add", probe)
        ip("netns", "del", probe)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        return f"ip netns does not work here: {e}"
    return ""


@contextmanager
def veth_pair() -> Iterator[Link]:
    tag = secrets.token_hex(3)
    ns = (f"pst{tag}a", f"pst{tag}b")
    veth = (f"pv{tag}a", f"pv{tag}b")
    net = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
    addr = (f"{net}.1", f"{net}.2")
    made: list[str] = []
    try:
        for n in ns:
            ip("netns", "add", n)
            made.append(n)
            ip("-n", n, "link", "set", "lo", "up")
        ip("link", "add", veth[0], "netns", ns[0], "type", "veth", "peer", "name", veth[1],
           "netns", ns[1])
        for n, v, a in zip(ns, veth, addr, strict=True):
            ip("-n", n, "addr", "add", f"{a}/24", "dev", v)
            ip("-n", n, "link", "set", v, "up")
        yield Link(ns, veth, addr)
    finally:
        for n in made:  # deleting a namespace deletes its veth end (and so the pair)
            subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=30)


def start_daemon_in(link: Link, side: int, port: int, size: int = 64 << 20):  # type: ignore[no-untyped-def]
    """A daemon in namespace `side` of `link` with its replication listener on
    that side's address (pings every second)."""
    from .daemon_util import new_daemon, remove

    d = new_daemon(size=size)
    cfg = os.path.join(d.pool_dir, "pstoraged.toml")
    with open(cfg, "w") as f:
        f.write(f'[replication]\nlisten = "{link.addr[side]}:{port}"\nping_interval = 1\n')
    d.args = ["--config", cfg]
    d.wrap = link.exec(side)
    try:
        d.start()
    except BaseException:
        remove(d)
        raise
    return d
