"""TCP gate for NBD exports with a client allow-list.

Listens on ADDR:PORT; for each connection from an allowed address it starts
`nbdkit -s ...` (nbdkit serving exactly that one client on its stdin/stdout,
TLS included) with the accepted socket as stdin and stdout, and closes its
own copy. Connections from other addresses are closed at once, before a byte
of NBD is spoken. No data passes through this process.

Why not nbdkit's ip filter: in Debian 12's nbdkit 1.32.5 it cannot parse any
address (`allow=127.0.0.1` -> "don't know how to parse rule"). Like nbdkit
itself this gate is a separate process that outlives daemon restarts.

    python3 -m pstoraged.frontends.tcp_gate --listen 0.0.0.0:10809 --allow 10.0.0.0/8 \\
        --pidfile FILE -- nbdkit -s [--tls=require ...] python plugin.py ...

Standard library only.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import subprocess
import sys


def parse_allow(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(a.strip(), strict=False) for a in text.split(",") if a.strip()]


def allowed(peer: str, nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    addr = ipaddress.ip_address(peer.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped  # ::ffff:10.0.0.5 on a dual-stack socket
    return any(addr.version == n.version and addr in n for n in nets)


def serve(listen: str, nets: list, cmd: list[str], pidfile: str | None = None) -> None:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, int(port)))
    srv.listen(64)
    if pidfile:  # written once listening: the daemon waits for it
        with open(pidfile + ".tmp", "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(pidfile + ".tmp", pidfile)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reap themselves
    while True:
        conn, peer = srv.accept()
        try:
            if not allowed(peer[0], nets):
                print(f"tcp_gate: refused {peer[0]} (not in the allow-list)", file=sys.stderr)
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            subprocess.Popen(cmd, stdin=conn.fileno(), stdout=conn.fileno(),
                             start_new_session=True, close_fds=True)
        except OSError as e:
            print(f"tcp_gate: {peer[0]}: {e}", file=sys.stderr)
        finally:
            conn.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tcp_gate")
    p.add_argument("--listen", required=True)
    p.add_argument("--allow", required=True)
    p.add_argument("--pidfile")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        p.error("the nbdkit command line is missing after --")
    serve(a.listen, parse_allow(a.allow), cmd, a.pidfile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
