"""Level 3: the daemon and the plugin through real nbdkit and libnbd tools."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess

import pytest

from pstoraged.errors import Conflict, InvalidArgument, NotFound
from pstoraged.frontends import protocol as P

from .daemon_util import Daemon, new_daemon, remove

pytestmark = pytest.mark.skipif(
    not (shutil.which("nbdkit") and shutil.which("nbdsh") and shutil.which("nbdinfo")),
    reason="nbdkit / libnbd tools not installed (run scripts/setup)",
)


# nbdsh is Debian's python3 with the libnbd bindings, whatever python3 is first on PATH
NBDSH = ["/usr/bin/python3", "-m", "nbd", "--base-allocation"]


def export(d: Daemon, name: str, size: str = "64M", **kw) -> str:
    d.cli("volume", "create", name, "--size", size, *kw.get("extra", ()))
    return d.cli("export", name).stdout.strip()


def nbdsh(uri: str, script: str) -> str:
    p = subprocess.run(NBDSH + ["-u", uri, "-c", script], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_nbdinfo_shows_capabilities(daemon):
    uri = export(daemon, "v1")
    info = json.loads(subprocess.run(["nbdinfo", "--json", uri], capture_output=True,
                                     text=True, check=True).stdout)
    e = info["exports"][0]
    assert e["export-name"] == "v1"
    assert e["export-size"] == 64 << 20
    for cap in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_multi_conn"):
        assert e[cap] is True, cap
    assert e["is_rotational"] is False and e["is_read_only"] is False
    assert e["block_size_minimum"] == 512 and e["block_size_preferred"] == 4096
    assert e["block_size_maximum"] == 32 << 20
    listed = subprocess.run(["nbdinfo", "--list", uri], capture_output=True, text=True, check=True)
    assert 'export="v1"' in listed.stdout  # list_exports
    default = uri.replace("/v1?", "/?")  # no export name: default_export
    assert "67108864" in subprocess.run(["nbdinfo", "--size", default], capture_output=True,
                                        text=True, check=True).stdout


def test_all_callbacks_through_nbdsh(daemon):
    uri = export(daemon, "v1")
    out = nbdsh(uri, r"""
import os
B = 4096
data = os.urandom(8 * B)
h.pwrite(data, 0)
assert h.pread(8 * B, 0) == data
h.pwrite(b"x" * 512, 512 + 3 * B)                     # sub-block write
assert h.pread(B, 3 * B) == data[3*B:3*B+512] + b"x" * 512 + data[3*B+1024:4*B]
h.pwrite(b"y" * B, 20 * B, nbd.CMD_FLAG_FUA)          # FUA
h.flush()
h.trim(2 * B, 0)
assert h.pread(2 * B, 0) == bytes(2 * B)
h.zero(B, 5 * B, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(B, 5 * B) == bytes(B)
ext = []
h.block_status(64 * B, 0, lambda meta, off, e, err: ext.extend(e) or 0)
print("EXTENTS", ext)
try:
    h.pread(B, 64 << 20)
except nbd.Error as e:
    print("OOR", e.errno)
print("SIZE", h.get_size())
""")
    assert "SIZE 67108864" in out
    assert "OOR" in out
    ext = eval(out.split("EXTENTS ")[1].splitlines()[0])
    runs = list(zip(ext[0::2], ext[1::2], strict=True))
    # blocks 0-1 trimmed (hole), 2-4 data, 5 zeroed (hole), 6-7 data, then holes but block 20
    assert runs[0] == (2 * 4096, 3)
    assert runs[1] == (3 * 4096, 0)
    assert runs[2] == (4096, 3)
    assert runs[3] == (2 * 4096, 0)
    assert sum(n for n, _ in runs) == 64 * 4096


def test_nbdcopy_and_qemu_img_round_trip(daemon, tmp_path):
    if not shutil.which("qemu-img"):
        pytest.skip("qemu-img not installed")
    uri = export(daemon, "img", "32M")
    src = tmp_path / "src.raw"
    text = (b"The quick brown fox jumps over the lazy dog. " * 30000)[: 1 << 20]
    with open(src, "wb") as f:
        for i in range(32):
            if i % 3 == 0:  # random, then zeros
                f.write(os.urandom(1 << 18) + bytes(3 << 18))
            else:  # compressible, and repeated (deduped)
                f.write(text)
    assert src.stat().st_size == 32 << 20
    subprocess.run(["nbdcopy", str(src), uri], check=True)
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri], check=True)
    back = tmp_path / "back.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", uri, str(back)], check=True)
    subprocess.run(["qemu-img", "compare", "-F", "raw", str(back), str(src)], check=True)
    stats = daemon.client.get("/api/v1/metrics/reduction")["volumes"]["img"]
    assert stats["ingest"]["zero_bytes"] > 0 or stats["logical_bytes"] < 32 << 20
    assert stats["stored_bytes"] < stats["logical_bytes"]  # the text compressed


class Raw:
    """A hand-driven data-socket connection for sending malformed frames."""

    def __init__(self, d: Daemon) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(10)
        self.s.connect(os.path.join(d.run_dir, "data.sock"))

    def send(self, op, flags=0, handle=1, offset=0, length=0, payload=b"", magic=P.REQ_MAGIC,
             plen=None):
        self.s.sendall(P.REQ.pack(magic, op, flags, handle, offset, length,
                                  len(payload) if plen is None else plen) + payload)

    def recv(self):
        hdr = self._exact(P.REP.size)
        if not hdr:
            return None
        magic, err, handle, plen, _ = P.REP.unpack(hdr)
        assert magic == P.REP_MAGIC
        return err, handle, self._exact(plen)

    def _exact(self, n):
        buf = b""
        while len(buf) < n:
            d = self.s.recv(n - len(buf))
            if not d:
                return buf or None
            buf += d
        return buf


@pytest.fixture
def raw(daemon):
    conns: list[Raw] = []

    def connect() -> Raw:
        conns.append(Raw(daemon))
        return conns[-1]

    yield connect
    for c in conns:
        c.s.close()


def test_bad_frames_get_errors_and_the_daemon_lives(daemon, raw):
    daemon.cli("volume", "create", "v", "--size", "1M")
    c = raw()
    c.send(P.OP_READ, length=4096)
    assert c.recv()[0] == errno.EINVAL  # before OPEN
    c.send(P.OP_OPEN, payload=b"nope")
    assert c.recv()[0] == errno.ENOENT
    c.send(P.OP_OPEN, handle=2, payload=b"v")
    err, h, body = c.recv()
    assert (err, h) == (0, 2)
    size, flags, bs, inst, prev, clean = P.OPEN_REPLY.unpack(body[: P.OPEN_REPLY.size])
    assert size == 1 << 20 and bs == 4096
    c.send(99, handle=3)
    assert c.recv()[:2] == (errno.EINVAL, 3)  # unknown op
    c.send(P.OP_READ, handle=4, offset=100, length=4096)
    assert c.recv()[:2] == (errno.EINVAL, 4)  # misaligned
    c.send(P.OP_READ, handle=5, offset=1 << 20, length=4096)
    assert c.recv()[:2] == (errno.EINVAL, 5)  # out of range
    c.send(P.OP_WRITE, handle=6, offset=1 << 20, length=512, payload=b"x" * 512)
    assert c.recv()[:2] == (errno.ENOSPC, 6)  # write past the end
    c.send(P.OP_READ, flags=0x80, handle=7, length=512)
    assert c.recv()[:2] == (errno.EINVAL, 7)  # unknown flag
    c.send(P.OP_READ, handle=8, length=64 << 20)
    assert c.recv()[:2] == (errno.EINVAL, 8)  # oversize
    c.send(P.OP_WRITE, handle=9, length=512, payload=b"z" * 512)
    assert c.recv() == (0, 9, b"")
    c.send(P.OP_READ, handle=10, length=512)
    assert c.recv() == (0, 10, b"z" * 512)
    c.send(P.OP_WRITE, handle=11, length=512, plen=64 << 20)  # oversize payload: closed
    assert c.recv()[:2] == (errno.EINVAL, 11)
    assert c.recv() is None
    c2 = raw()
    c2.send(P.OP_LIST, magic=0xDEADBEEF)
    assert c2.recv()[0] == errno.EPROTO
    assert c2.recv() is None  # bad magic: closed
    c3 = raw()
    c3.send(P.OP_OPEN, payload=b"v")
    c3.recv()
    # pipelining: several requests in flight on one connection
    for i in range(20):
        c3.send(P.OP_WRITE, handle=100 + i, offset=i * 4096, length=4096, payload=bytes([i]) * 4096)
    for i in range(20):
        c3.send(P.OP_READ, handle=200 + i, offset=i * 4096, length=4096)
    c3.send(P.OP_FLUSH, handle=300)
    replies = {c3.recv()[1]: None for _ in range(41)}
    assert set(replies) == {*range(100, 120), *range(200, 220), 300}
    assert daemon.client.get("/healthz")["status"] == "ok"
    assert "refused request" in daemon.log()


def test_read_only_volume_refuses_writes(daemon, raw):
    daemon.cli("volume", "create", "ro", "--size", "1M")
    daemon.client.request("PATCH", "/api/v1/volumes/ro", {"readonly": True})
    c = raw()
    c.send(P.OP_OPEN, payload=b"ro")
    _, _, body = c.recv()
    assert P.OPEN_REPLY.unpack(body[: P.OPEN_REPLY.size])[1] & P.OPEN_READONLY
    for op in (P.OP_WRITE, P.OP_TRIM, P.OP_ZERO):
        c.send(op, handle=op, length=512, payload=b"a" * 512 if op == P.OP_WRITE else b"")
        assert c.recv()[:2] == (errno.EROFS, op)


def test_full_pool_returns_enospc_over_nbd(tmp_path):
    d = new_daemon(size=48 << 20, segment_size=1 << 20)
    try:
        d.start()
        uri = export(d, "big", "256M")
        out = nbdsh(uri, r"""
import os
keep = os.urandom(4096)
h.pwrite(keep, 0, nbd.CMD_FLAG_FUA)
err = None
for i in range(1, 20000):
    try:
        h.pwrite(os.urandom(65536), i * 65536)
    except nbd.Error as e:
        err = e.errno
        break
print("ERR", err, i)
assert h.pread(4096, 0) == keep
h.trim(200 << 20, 1 << 20)
h.flush()
h.pwrite(os.urandom(65536), 65536)
print("RECOVERED")
""")
        assert ("ERR ENOSPC" in out or f"ERR {errno.ENOSPC}" in out) and "RECOVERED" in out
    finally:
        remove(d)


def test_volume_cli_errors_and_delete_protection(daemon):
    p = daemon.cli("volume", "create", "Bad/Name", "--size", "1G", check=False)
    assert p.returncode == InvalidArgument.exit_code and "invalid volume name" in p.stderr
    p = daemon.cli("volume", "create", "v", "--size", "12345", check=False)
    assert p.returncode == InvalidArgument.exit_code and "multiple of 4096" in p.stderr
    daemon.cli("volume", "create", "v", "--size", "1G")
    p = daemon.cli("volume", "create", "v", "--size", "1G", check=False)
    assert p.returncode == Conflict.exit_code
    daemon.cli("export", "v")
    p = daemon.cli("volume", "delete", "v", check=False)
    assert p.returncode == Conflict.exit_code and "--force" in p.stderr
    lst = json.loads(daemon.cli("--json", "volume", "list").stdout)
    assert [v["name"] for v in lst] == ["v"] and lst[0]["uri"].startswith("nbd+unix:///v?socket=")
    out = daemon.cli("volume", "list").stdout
    assert "NAME" in out and "STATE" in out and " ready " in out
    assert "CTRL + C" not in daemon.log()  # hypercorn's banner is dropped
    p = daemon.cli("volume", "resize", "v", "512M", check=False)
    assert p.returncode == Conflict.exit_code and "--shrink" in p.stderr  # 409: for this size
    daemon.cli("volume", "resize", "v", "2G")
    assert json.loads(daemon.cli("--json", "volume", "show", "v").stdout)["size"] == 2 << 30
    daemon.cli("volume", "delete", "v", "--force")
    p = daemon.cli("volume", "show", "v", check=False)
    assert p.returncode == NotFound.exit_code
    assert "pool" in daemon.cli("stats").stdout


def test_plugin_survives_daemon_restart(daemon):
    uri = export(daemon, "r")
    # a long-lived client keeps its NBD connection while the daemon restarts
    proc = subprocess.Popen(NBDSH + ["-u", uri, "-c", r"""
import sys
h.pwrite(b"a" * 4096, 0)
h.flush()
print("READY", flush=True)
sys.stdin.readline()
h.pwrite(b"b" * 4096, 4096)
h.flush()
assert h.pread(8192, 0) == b"a" * 4096 + b"b" * 4096
print("OK", flush=True)
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "READY"
    daemon.stop()
    daemon.start()
    out, err = proc.communicate("\n", timeout=120)
    assert "OK" in out, err


def test_tcp_export(daemon):
    daemon.cli("volume", "create", "t", "--size", "8M")
    with socket.socket() as s:  # a free loopback port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = daemon.cli("export", "t", "--tcp", f"127.0.0.1:{port}").stdout
    assert f"nbd://127.0.0.1:{port}/t" in out
    nbdsh(f"nbd://127.0.0.1:{port}/t", "h.pwrite(b'q' * 4096, 0); assert h.pread(4096, 0) == b'q' * 4096")
    daemon.cli("unexport", "t")


def test_flush_on_one_connection_covers_writes_on_another(daemon):
    """can_multi_conn: a flush on any connection makes every completed write durable."""
    uri = export(daemon, "mc")
    proc = subprocess.Popen(NBDSH + ["-u", uri, "-c", r"""
import sys
h.pwrite(b"A" * 4096, 0)      # written on this connection, never flushed here
print("WROTE", flush=True)
sys.stdin.readline()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WROTE"
        nbdsh(uri, "h.flush()")     # another connection flushes
        daemon.kill9()
        daemon.start()
    finally:
        proc.communicate("\n", timeout=120)
    assert "AAAA" in nbdsh(uri, "print(h.pread(4096, 0)[:4].decode())")


def test_lost_writes_make_every_later_flush_and_write_fail(daemon):
    """After a crash lost acknowledged writes, the export fails flushes and writes until reopened."""
    uri = export(daemon, "lw")
    proc = subprocess.Popen(NBDSH + ["-u", uri, "-c", r"""
import sys
h.pwrite(b"L" * 4096, 0)          # acknowledged, never flushed
print("WROTE", flush=True)
sys.stdin.readline()
results = []
for op in ("flush", "flush", "write", "flush"):
    try:
        h.flush() if op == "flush" else h.pwrite(b"M" * 4096, 4096)
        results.append(op + ":ok")
    except nbd.Error as e:
        results.append(op + ":" + str(e.errno))
print("RESULTS", " ".join(results), flush=True)
assert h.pread(4096, 8192) == bytes(4096)  # reads still work
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WROTE"
        daemon.kill9()
        daemon.start()
    finally:
        out, err = proc.communicate("\n", timeout=180)
    line = [x for x in out.splitlines() if x.startswith("RESULTS")][0]
    assert all(r.endswith(("EIO", ":5")) for r in line.split()[1:]), line
    daemon.cli("unexport", "lw")
    uri = daemon.cli("export", "lw").stdout.strip()  # a new nbdkit: works again
    nbdsh(uri, "h.pwrite(b'N' * 4096, 0); h.flush(); assert h.pread(4096, 0) == b'N' * 4096")
