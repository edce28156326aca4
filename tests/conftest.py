"""Shared fixtures: tiny pools so that segment rollover happens in small tests."""

from __future__ import annotations

import logging
import os

import pytest

from pstoraged.engine import Engine
from pstoraged.pool import create_pool, open_pool

SMALL_SEGMENT = 64 << 10


def make_pool(directory: str, size: int = 16 << 20, segment_size: int = SMALL_SEGMENT) -> str:
    create_pool(directory, os.path.join(directory, "dev.img"), file_size=size,
                segment_size=segment_size)
    return directory


def crash(engine: Engine) -> None:
    """What kill -9 leaves: the open transaction and unwritten buffers vanish."""
    engine.meta.abort()
    engine.meta.env.close()
    engine.segs.close()
    engine.pool.backing.close()
    os.close(engine.pool.lock_fd)


@pytest.fixture
def pool_dir(tmp_path):
    return make_pool(str(tmp_path))


@pytest.fixture
def engine(pool_dir):
    eng = Engine(open_pool(pool_dir))
    yield eng
    if eng.pool.backing.fd >= 0:
        eng.close()


@pytest.fixture
def daemon():
    """A running daemon on a 4 GiB sparse pool (1 MiB segments)."""
    from .daemon_util import new_daemon, remove

    d = new_daemon()
    d.start()
    yield d
    remove(d)


@pytest.fixture
def fs_daemon():
    """A running daemon on a 6 GiB sparse pool, for tests that mount filesystems."""
    import subprocess

    from .daemon_util import new_daemon, remove

    d = new_daemon(size=6 << 30, segment_size=1 << 20)
    d.start()
    yield d
    for mnt in getattr(d, "mounts", []):
        subprocess.run(["umount", "-l", mnt], capture_output=True)
    remove(d)


@pytest.fixture(autouse=True)
def _fail_on_error_logs(caplog):
    """Fail on noise: an unexpected ERROR log in a test is a failure."""
    yield
    allowed = getattr(caplog, "allowed_errors", False)
    errors = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    if errors and not allowed:
        pytest.fail("unexpected error log: " + "; ".join(r.getMessage() for r in errors))
