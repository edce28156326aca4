"""Shared fixtures: tiny pools so that segment rollover happens in small tests."""

from __future__ import annotations

import logging
import os

import pytest

from pstoraged.engine.engine import Engine
from pstoraged.engine.pool import create_pool, default_meta_size, open_pool

SMALL_SEGMENT = 64 << 10


def make_pool(directory: str, size: int = 16 << 20, segment_size: int = SMALL_SEGMENT) -> str:
    """A pool whose segment area is what `size` gave before format 2: the
    metadata region comes on top, so tests that count segments still hold."""
    meta = default_meta_size(size)
    create_pool(directory, os.path.join(directory, "dev.img"), file_size=size + meta,
                segment_size=segment_size, meta_size=meta)
    return directory


def crash(engine: Engine) -> None:
    """What kill -9 leaves: the open transaction and unwritten buffers vanish."""
    engine.meta.abort()
    engine.meta.env.close()
    engine.segs.close()
    if engine.pool.region is not None:
        engine.pool.region.close()
    engine.pool.backing.close()
    os.close(engine.pool.lock_fd)


# A real installation's state: tests make their own directories and none may
# touch these. (/dev/pstorage is not watched: any pstoraged on the machine may
# change it; the run points PSTORAGE_DEV_DIR at a directory of its own.)
HOST_STATE = ("/var/lib/pstorage", "/run/pstorage", "/etc/pstorage")


def _host_state() -> dict[str, object]:
    """Cheap fingerprint: each path's and its entries' mtimes (a write, create,
    delete or rename inside changes one)."""
    out: dict[str, object] = {}
    for path in HOST_STATE:
        try:
            names = sorted(os.listdir(path))
            out[path] = (os.stat(path).st_mtime_ns,
                         [(n, os.lstat(os.path.join(path, n)).st_mtime_ns) for n in names])
        except FileNotFoundError:
            out[path] = None
        except OSError as e:
            out[path] = str(e)
    return out


@pytest.fixture(scope="session", autouse=True)
def _hermetic(tmp_path_factory):
    """Attached volumes get their stable names in a directory of the run's own, and
    the run fails if anything touched the host's pool, run or config directories."""
    before = _host_state()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PSTORAGE_DEV_DIR", str(tmp_path_factory.mktemp("devlinks")))
        mp.delenv("PSTORAGE_CONTROL", raising=False)  # a stray one would reach a real daemon
        yield
    after = _host_state()
    changed = [p for p in HOST_STATE if before[p] != after[p]]
    if changed:
        pytest.fail(f"the test run changed {', '.join(changed)}: tests must use their own "
                    "directories (or did a pstoraged on this machine change it meanwhile?)"
                    f"\nbefore: {[before[p] for p in changed]}\n"
                    f"after: {[after[p] for p in changed]}", pytrace=False)


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
def fuse_daemon(tmp_path):
    """A daemon whose attach uses its own FUSE front end ([fuse] enabled)."""
    import subprocess

    from .daemon_util import new_daemon, remove

    d = new_daemon(size=4 << 30)
    conf = tmp_path / "pstoraged.toml"
    conf.write_text(f'[fuse]\nenabled = true\nmountpoint = "{d.run_dir}/dev"\n')
    d.args = ["--config", str(conf)]
    try:
        d.start()
        yield d
    finally:
        for mnt in getattr(d, "mounts", []):
            subprocess.run(["umount", "-l", mnt], capture_output=True)
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
