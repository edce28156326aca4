"""REST client of pstoraged used by the CLI (and tests): HTTP/1.1 over the
control unix socket, or over TCP with a bearer token. Standard library only,
so the CLI starts fast and needs nothing the daemon does not."""

from __future__ import annotations

import http.client
import json
import os
import socket
from typing import Any
from urllib.parse import quote

from .. import errors

DEFAULT_CONTROL = "/run/pstorage/control.sock"

_BY_CODE: dict[str, type[errors.PStorageError]] = {
    cls.code: cls for cls in (
        errors.InvalidArgument, errors.NotFound, errors.Conflict, errors.ReadOnly,
        errors.PoolFull, errors.CorruptData, errors.DeviceIOError, errors.FormatError,
        errors.PoolLocked, errors.TooLarge, errors.ValidationFailed, errors.Unauthorized,
        errors.ProtocolError, errors.PeerUnreachable, errors.PeerRefused,
    )
}


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("pstorage", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.unix_path)
        except OSError:
            s.close()
            raise
        self.sock = s


class Client:
    """`Client()` talks to $PSTORAGE_CONTROL or /run/pstorage/control.sock;
    `Client(url="http://host:port", token=...)` to a TCP listener."""

    def __init__(self, path: str | None = None, timeout: float = 300, *,
                 url: str | None = None, token: str | None = None) -> None:
        self.path = path or os.environ.get("PSTORAGE_CONTROL", DEFAULT_CONTROL)
        self.url = url
        self.token = token
        self.timeout = timeout

    def _connection(self) -> http.client.HTTPConnection:
        if self.url:
            hostport = self.url.split("://", 1)[-1].rstrip("/")
            return http.client.HTTPConnection(hostport, timeout=self.timeout)
        return _UnixHTTPConnection(self.path, self.timeout)

    def raw(self, method: str, path: str, body: Any = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """One request; returns (status, headers, body bytes). No error mapping."""
        conn = self._connection()
        hdrs = {"Accept": "application/json", **(headers or {})}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        where = self.url or self.path
        try:
            try:
                conn.request(method, quote(path, safe="/?=&%:@,+"), body=data, headers=hdrs)
            except (FileNotFoundError, ConnectionRefusedError):
                raise errors.DaemonUnavailable(
                    f"pstoraged is not running (no {where})",
                    "start it: systemctl start pstoraged, or pstoraged --pool-dir DIR",
                ) from None
            except PermissionError:
                raise errors.DaemonUnavailable(
                    f"no permission to use {where}",
                    "run as root or as a member of the 'pstorage' group",
                ) from None
            try:
                rep = conn.getresponse()
                return rep.status, {k.lower(): v for k, v in rep.getheaders()}, rep.read()
            except (http.client.HTTPException, ConnectionError) as e:
                raise errors.DaemonUnavailable(f"pstoraged closed the connection ({e})",
                                               "see the daemon log (journalctl -u pstoraged)") from None
        finally:
            conn.close()

    def request(self, method: str, path: str, body: Any = None) -> Any:
        status, headers, raw = self.raw(method, path, body)
        if "json" in headers.get("content-type", ""):
            out = json.loads(raw) if raw else None
        else:
            out = raw.decode(errors="replace")
        if status >= 400:
            if not isinstance(out, dict):
                out = {"message": str(out)}
            cls = _BY_CODE.get(str(out.get("error")), errors.PStorageError)
            err = cls(str(out.get("message", f"HTTP {status}")), str(out.get("hint") or ""))
            err.status = status
            raise err
        return out

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body)

    def patch(self, path: str, body: Any = None) -> Any:
        return self.request("PATCH", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)
