"""Control-socket client used by the CLI (and tests)."""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from . import errors

DEFAULT_CONTROL = "/run/pstorage/control.sock"

_BY_CODE = {
    cls.code: cls for cls in (
        errors.InvalidArgument, errors.NotFound, errors.Conflict, errors.ReadOnly,
        errors.PoolFull, errors.CorruptData, errors.DeviceIOError, errors.FormatError,
        errors.PoolLocked,
    )
}


class Client:
    def __init__(self, path: str | None = None, timeout: float = 300) -> None:
        self.path = path or os.environ.get("PSTORAGE_CONTROL", DEFAULT_CONTROL)
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None) -> Any:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            try:
                s.connect(self.path)
            except (FileNotFoundError, ConnectionRefusedError):
                raise errors.DaemonUnavailable(
                    f"pstoraged is not running (no {self.path})",
                    "start it: systemctl start pstoraged, or pstoraged --pool-dir DIR",
                ) from None
            s.sendall(json.dumps({"method": method, "path": path, "body": body}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                data = s.recv(1 << 20)
                if not data:
                    raise errors.DaemonUnavailable("pstoraged closed the connection")
                buf += data
        finally:
            s.close()
        rep = json.loads(buf)
        status, out = rep["status"], rep["body"]
        if status >= 400:
            cls = _BY_CODE.get(out.get("error"), errors.PStorageError)
            err = cls(out.get("message", "error"), out.get("hint", ""))
            err.status = status
            raise err
        return out

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body)
