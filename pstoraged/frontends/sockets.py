"""Listening sockets shared by the daemon's servers.

The data plane (dataplane.py, the data socket) and the control server
(control/server.py, the REST socket) both bind unix sockets the same way;
this module is the one home of that, at the lowest layer that uses it.
"""

from __future__ import annotations

import errno
import os
import socket


def bind_unix_sync(path: str, mode: int = 0o660) -> socket.socket:
    """Listen on a unix socket, refusing to steal one a live process still serves."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except FileNotFoundError:
        pass
    except OSError:
        os.unlink(path)  # stale socket of an earlier run
    else:
        raise OSError(errno.EADDRINUSE, f"{path} is served by another process")
    finally:
        probe.close()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, mode)
    sock.listen(128)
    return sock
