"""Every error PStorage reports, in one place.

Each class carries an errno (for the data socket / NBD), an HTTP-style status
(for the control API) and a CLI exit code. Translation happens only at the
edges: the engine raises these, front ends map them.
"""

from __future__ import annotations

import errno as _errno


class PStorageError(Exception):
    """Base class: a one-line message for the user, plus what to do."""

    errno: int = _errno.EIO
    status: int = 500
    exit_code: int = 1
    code: str = "internal"

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class InvalidArgument(PStorageError):
    errno = _errno.EINVAL
    status = 400
    exit_code = 2
    code = "invalid_argument"


class NotFound(PStorageError):
    errno = _errno.ENOENT
    status = 404
    exit_code = 3
    code = "not_found"


class Conflict(PStorageError):
    errno = _errno.EBUSY
    status = 409
    exit_code = 4
    code = "conflict"


class ReadOnly(PStorageError):
    errno = _errno.EROFS
    status = 409
    exit_code = 4
    code = "read_only"


class PoolFull(PStorageError):
    errno = _errno.ENOSPC
    status = 507
    exit_code = 5
    code = "pool_full"


class CorruptData(PStorageError):
    """A checksum or record check failed: the read gets EIO, never wrong data."""

    errno = _errno.EIO
    status = 500
    exit_code = 6
    code = "corrupt_data"


class DeviceIOError(PStorageError):
    errno = _errno.EIO
    status = 503  # the pool's state, not a server bug: the request may work after a restart
    exit_code = 6
    code = "device_io_error"


class FormatError(PStorageError):
    """The pool's on-disk format is unknown, damaged or not ours."""

    errno = _errno.EIO
    status = 500
    exit_code = 7
    code = "format_error"


class PoolLocked(PStorageError):
    errno = _errno.EBUSY
    status = 409
    exit_code = 8
    code = "pool_locked"


class DaemonUnavailable(PStorageError):
    errno = _errno.ECONNREFUSED
    status = 503
    exit_code = 9
    code = "daemon_unavailable"


class TooLarge(InvalidArgument):
    """A size or request beyond what the pool or format allows."""

    errno = _errno.EFBIG
    status = 413
    code = "too_large"


class ValidationFailed(InvalidArgument):
    """A request body or query that does not match the API's schema."""

    status = 422
    code = "validation_error"


class Unauthorized(PStorageError):
    errno = _errno.EACCES
    status = 401
    exit_code = 10
    code = "unauthorized"


class InsecurePermissions(InvalidArgument):
    """A pool file or directory that other users could read (or write)."""

    code = "insecure_permissions"


class ToolFailed(PStorageError):
    """An external tool (nbdkit, nbdfuse, losetup, ...) failed or is missing."""

    status = 500
    exit_code = 10
    code = "tool_failed"


class CheckProblems(PStorageError):
    """`pstorage pool check` found problems that remain (its report lists them)."""

    status = 500
    exit_code = 11
    code = "check_problems"


class ProtocolError(PStorageError):
    """A replication peer sent bytes that are not a valid frame or message
    (replication/wire.py): the connection is closed, nothing else happens."""

    errno = _errno.EPROTO
    status = 502
    exit_code = 12
    code = "protocol_error"


class PeerUnreachable(PStorageError):
    """A replication peer did not answer (link down, daemon stopped, timeout)."""

    errno = _errno.EHOSTUNREACH
    status = 503
    exit_code = 12
    code = "peer_unreachable"


class PeerRefused(PStorageError):
    """Pairing or a peer connection was refused: a wrong or expired connection
    key, an unknown peer, or a certificate that is not the pinned one."""

    errno = _errno.EACCES
    status = 403
    exit_code = 10
    code = "peer_refused"
