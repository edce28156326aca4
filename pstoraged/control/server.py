"""The control socket: the REST API (api/) served by hypercorn on the
daemon's trio loop.

The unix socket (default /run/pstorage/control.sock) is mode 0660 and owned
by the `pstorage` group when that group exists: filesystem permissions are
its authentication. An optional TCP listener is off by default and requires
`Authorization: Bearer <token>` with the token read from a file that only
its owner may read.
"""

from __future__ import annotations

import grp
import hmac
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from ..errors import InvalidArgument
from ..frontends.sockets import bind_unix_sync

log = logging.getLogger(__name__)


class _NoBanner(logging.Filter):
    """Drops hypercorn's "Running on http://unix:... (CTRL + C to quit)": wrong
    under systemd, and the daemon logs its sockets itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Running on ")

CONTROL_GROUP = "pstorage"

ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


def read_token(path: str) -> str:
    """The bearer token for the TCP listener; refuse a file others can read."""
    try:
        st = os.stat(path)
        with open(path) as f:
            token = f.read().strip()
    except OSError as e:
        raise InvalidArgument(f"cannot read the API token file {path}: {e.strerror}",
                              "create it: umask 077; head -c 32 /dev/urandom | base64 > FILE") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InvalidArgument(f"API token file {path} is readable by others "
                              f"(mode {stat.S_IMODE(st.st_mode):04o})", f"chmod 600 {path}")
    if len(token) < 16:
        raise InvalidArgument(f"API token in {path} is shorter than 16 characters",
                              "use a long random token: head -c 32 /dev/urandom | base64")
    return token


def require_token(app: ASGIApp, token: str) -> ASGIApp:
    """Wrap the app: requests that came over TCP must carry the bearer token.

    Unix-socket requests pass (their peer passed the socket's permissions).
    """
    expected = f"Bearer {token}".encode()

    async def guarded(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and _is_tcp(scope):
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(auth, expected):
                body = (b'{"error": "unauthorized", "message": "missing or wrong bearer token", '
                        b'"hint": "send Authorization: Bearer <token from the token file>"}')
                await send({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"),
                    (b"www-authenticate", b"Bearer"),
                    (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return guarded


def _is_tcp(scope: dict) -> bool:
    server = scope.get("server") or (None, None)
    return isinstance(server[1], int)


def _tcp_socket(addr: str) -> socket.socket:
    host, _, port = addr.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port_n = int(port)
    except ValueError:
        raise InvalidArgument(f"invalid API listen address {addr!r}", "use ADDR:PORT") from None
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        s.bind((host, port_n))
    except OSError as e:
        s.close()
        raise InvalidArgument(f"cannot listen on {addr}: {e.strerror}") from None
    return s


class ControlServer:
    """Serves the API on the unix socket and, if asked, on TCP with a token."""

    def __init__(self, app: Any, path: str, *, tcp: str | None = None,
                 token_file: str | None = None) -> None:
        self.app = app
        self.path = path
        self.tcp = tcp
        self.token: str | None = None
        if tcp:
            if not token_file:
                raise InvalidArgument("the TCP API listener needs a token file",
                                      "pass --api-token-file FILE (mode 0600)")
            self.token = read_token(token_file)
        self._shutdown = trio.Event()

    def _unix_socket(self) -> socket.socket:
        s = bind_unix_sync(self.path)
        try:
            gid = grp.getgrnam(CONTROL_GROUP).gr_gid
        except KeyError:
            gid = -1  # no such group: root only
        os.chown(self.path, -1, gid)
        os.chmod(self.path, 0o660)
        return s

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        config = Config()
        config.accesslog = None
        config.errorlog = logging.getLogger("pstoraged.http")
        if not any(isinstance(f, _NoBanner) for f in config.errorlog.filters):
            config.errorlog.addFilter(_NoBanner())
        config.graceful_timeout = 5
        config.include_server_header = False
        socks = [self._unix_socket()]
        if self.tcp:
            socks.append(_tcp_socket(self.tcp))
        for s in socks:
            s.setblocking(False)
            s.listen(128)
        asgi: Any = require_token(self.app, self.token) if self.token else self.app
        app = wrap_app(asgi, config.wsgi_max_body_size, "asgi")
        await worker_serve(app, config, sockets=Sockets([], socks, []),
                           shutdown_trigger=self._shutdown.wait, task_status=task_status)

    def stop(self) -> None:
        self._shutdown.set()
