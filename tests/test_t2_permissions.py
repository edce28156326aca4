"""Pool files and directories are the owner's alone, whatever the umask.

The pool file holds every volume's data and meta/ maps it: another local user
who can read either reads the volumes. Checked as a real unprivileged user.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid

import pytest

from pstoraged.engine.pool import create_pool, open_pool
from pstoraged.errors import InsecurePermissions

from .daemon_util import Daemon

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("useradd"),
                                reason="creating a test user needs root and useradd")


@pytest.fixture
def stranger():
    """A throwaway local user with no groups: (name, uid, gid); removed afterwards."""
    name = f"pst{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--user-group",
                    "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True)
    try:
        uid = int(subprocess.run(["id", "-u", name], check=True, capture_output=True,
                                 text=True).stdout)
        gid = int(subprocess.run(["id", "-g", name], check=True, capture_output=True,
                                 text=True).stdout)
        yield name, uid, gid
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def open_base():
    """A 0755 directory under /tmp: the stranger may look inside (tmp_path is 0700,
    which would hide everything from other users and prove nothing)."""
    base = tempfile.mkdtemp(prefix="pstperm", dir="/tmp")
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def can_read(user: tuple[str, int, int], path: str) -> bool:
    _, uid, gid = user
    r = subprocess.run(["head", "-c", "1", path], user=uid, group=gid, extra_groups=[],
                       capture_output=True)
    return r.returncode == 0


def tree(path: str) -> list[str]:
    out = [path]
    for root, dirs, files in os.walk(path):
        out += [os.path.join(root, n) for n in dirs + files]
    return out


def assert_private(paths: list[str]) -> None:
    loose = {p: f"{stat.S_IMODE(os.stat(p).st_mode):04o}" for p in paths
             if os.stat(p).st_mode & 0o077}
    assert not loose, f"open to other users: {loose}"


def test_pool_create_makes_everything_owner_only(stranger, umask022, open_base):
    # the control: under this umask a plain file here is readable by the stranger
    probe = os.path.join(open_base, "probe")
    with open(probe, "w") as f:
        f.write("x")
    assert can_read(stranger, probe)

    pool_dir, img = os.path.join(open_base, "pool"), os.path.join(open_base, "pool.img")
    subprocess.run([sys.executable, "-m", "pstoraged.control.cli", "pool", "create", "--dir", pool_dir,
                    "--device", img, "--size", "64M", "--segment-size", "1M"],
                   check=True, capture_output=True)
    assert stat.S_IMODE(os.stat(pool_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(img).st_mode) == 0o600
    # the metadata is inside the pool file (format 2): nothing of it on the host
    assert not os.path.exists(os.path.join(pool_dir, "meta"))
    assert_private([img, *tree(pool_dir)])
    for p in [img, os.path.join(pool_dir, "pool.json")]:
        assert not can_read(stranger, p), p

    # a file made beforehand (truncate -s under umask 022) is tightened when formatted
    pre = os.path.join(open_base, "pre.img")
    with open(pre, "wb") as f:
        f.truncate(64 << 20)
    assert can_read(stranger, pre)
    create_pool(os.path.join(open_base, "pool2"), pre, segment_size=1 << 20)
    assert not can_read(stranger, pre)


def test_daemon_init_makes_everything_owner_only(stranger, umask022, open_base):
    pool_dir, img = os.path.join(open_base, "pool"), os.path.join(open_base, "pool.img")
    d = Daemon(pool_dir, os.path.join(open_base, "run"))
    d.log_path = os.path.join(open_base, "daemon.log")  # not in the pool dir: it does not exist yet
    d.args = ["--init", "--device", img, "--size", "64M", "--segment-size", "1M"]
    d.start()
    try:
        # while it runs: LMDB's lock file, and its store through the region's loop device
        assert os.path.exists(os.path.join(pool_dir, "meta.mdb-lock"))
        assert_private([img, *(p for p in tree(pool_dir) if not os.path.islink(p))])
        region = os.path.realpath(os.path.join(pool_dir, "meta.mdb"))
        assert region.startswith("/dev/loop")
        for p in [img, region, os.path.join(pool_dir, "meta.mdb-lock")]:
            assert not can_read(stranger, p), p
    finally:
        d.cleanup()


def test_a_pool_open_to_other_users_is_refused_with_the_fix(open_base, umask022):
    pool_dir, img = os.path.join(open_base, "pool"), os.path.join(open_base, "pool.img")
    create_pool(pool_dir, img, file_size=64 << 20, segment_size=1 << 20)
    open_pool(pool_dir).close()

    os.chmod(img, 0o644)
    with pytest.raises(InsecurePermissions, match=f"chmod 600 {img}"):
        open_pool(pool_dir)
    # the daemon says so and exits
    r = subprocess.run([sys.executable, "-m", "pstoraged.control.daemon", "--pool-dir", pool_dir,
                        "--run-dir", os.path.join(open_base, "run"), "--config", "/dev/null"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and f"chmod 600 {img}" in r.stderr, r.stderr
    os.chmod(img, 0o600)

    os.chmod(pool_dir, 0o755)
    with pytest.raises(InsecurePermissions, match=f"chmod 700 {pool_dir}"):
        open_pool(pool_dir)
    # nor is a pool created in a directory that already holds files and is open
    with pytest.raises(InsecurePermissions, match=f"chmod 700 {pool_dir}"):
        create_pool(pool_dir, img, force=True, segment_size=1 << 20)
    os.chmod(pool_dir, 0o700)
    open_pool(pool_dir).close()
