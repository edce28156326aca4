"""Level 3: secure NBD exports over TCP: TLS with pre-shared keys, client
allow-lists, read-only snapshot exports. A client without the key or from a
refused address gets nothing."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess

import pytest

from pstoraged.errors import InvalidArgument

pytestmark = pytest.mark.skipif(not shutil.which("nbdinfo"), reason="libnbd tools not installed")

NBDSH = ["/usr/bin/python3", "-m", "nbd"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nbd(uri: str, script: str) -> subprocess.CompletedProcess:
    # the PSK file is a local file named in the URI: libnbd wants that allowed explicitly
    pre = f"h.set_uri_allow_local_file(True); h.connect_uri({uri!r}); "
    return subprocess.run(NBDSH + ["-c", pre + script], capture_output=True, text=True,
                          timeout=60)


def psk_file(path, user: str = "alice") -> str:
    path.write_text(f"{user}:{secrets.token_hex(32)}\n")
    path.chmod(0o600)
    return str(path)


def test_tls_psk_export_refuses_clients_without_the_key(daemon, tmp_path):
    d = daemon
    d.cli("volume", "create", "sec", "--size", "8M")
    keys = psk_file(tmp_path / "keys.psk")
    other = psk_file(tmp_path / "other.psk")
    open_keys = tmp_path / "open.psk"
    open_keys.write_text("alice:" + "ab" * 32 + "\n")
    open_keys.chmod(0o644)
    p = d.cli("export", "sec", "--tcp", f"127.0.0.1:{free_port()}", "--tls-psk", str(open_keys),
              check=False)
    assert p.returncode == InvalidArgument.exit_code and "readable by others" in p.stderr
    port = free_port()
    out = d.cli("export", "sec", "--tcp", f"127.0.0.1:{port}", "--tls-psk", keys).stdout
    assert f"nbds://127.0.0.1:{port}/sec" in out
    good = f"nbds://alice@127.0.0.1:{port}/sec?tls-psk-file={keys}"
    r = nbd(good, "h.pwrite(b'secret!!' * 512, 0); h.flush(); print(h.pread(512, 0)[:8])")
    assert r.returncode == 0 and "secret!!" in r.stdout, r.stderr
    # no TLS at all, the wrong key, the wrong user: nothing
    for uri in (f"nbd://127.0.0.1:{port}/sec",
                f"nbds://alice@127.0.0.1:{port}/sec?tls-psk-file={other}",
                f"nbds://mallory@127.0.0.1:{port}/sec?tls-psk-file={keys}"):
        r = nbd(uri, "print(h.pread(512, 0)[:8])")
        assert r.returncode != 0 and "secret" not in r.stdout, uri
    info = d.client.get("/api/v1/volumes/sec")
    assert info["tls"] == "psk" and info["tcp"] == f"127.0.0.1:{port}"


def test_allow_list_refuses_other_addresses_and_snapshot_exports_are_read_only(daemon):
    d = daemon
    d.cli("volume", "create", "ip", "--size", "8M")
    refused = free_port()
    d.cli("export", "ip", "--tcp", f"127.0.0.1:{refused}", "--allow", "10.0.0.0/8,192.168.1.7")
    r = nbd(f"nbd://127.0.0.1:{refused}/ip", "print(h.get_size())")
    assert r.returncode != 0 and "8388608" not in r.stdout
    d.cli("unexport", "ip")
    allowed = free_port()
    d.cli("export", "ip", "--tcp", f"127.0.0.1:{allowed}", "--allow", "127.0.0.0/8")
    r = nbd(f"nbd://127.0.0.1:{allowed}/ip", "print(h.get_size())")
    assert r.returncode == 0 and "8388608" in r.stdout, r.stderr
    p = d.cli("export", "ip", "--tcp", f"127.0.0.1:{free_port()}", "--allow", "not-an-ip",
              check=False)
    assert p.returncode == InvalidArgument.exit_code and "allow-list" in p.stderr
    # snapshot exports are always read-only
    d.cli("snapshot", "create", "ip", "s")
    uri = d.cli("snapshot", "export", "ip@s").stdout.strip()
    r = nbd(uri, "h.pwrite(b'x' * 4096, 0)")
    assert r.returncode != 0 and "does not support write" in r.stderr
    assert os.path.exists(uri.split("socket=")[1])


def test_a_tcp_port_in_use_is_a_conflict_not_a_server_error(daemon):
    d = daemon
    d.cli("volume", "create", "a", "--size", "1M")
    d.cli("volume", "create", "b", "--size", "1M")
    port = free_port()
    d.cli("export", "a", "--tcp", f"127.0.0.1:{port}")
    st, _, raw = d.client.raw("POST", "/api/v1/volumes/b/export", {"tcp": f"127.0.0.1:{port}"})
    assert st == 409 and b"in use" in raw, raw
    with socket.socket() as other:  # another program's listener
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        st, _, raw = d.client.raw("POST", "/api/v1/volumes/b/export", {"tcp": f"127.0.0.1:{taken}"})
        assert st == 409 and b"in use" in raw, raw
    assert d.client.get("/api/v1/volumes/b")["exported"] is False
    # the port, once free, serves
    d.cli("unexport", "a")
    d.cli("export", "b", "--tcp", f"127.0.0.1:{port}")
    assert d.client.get("/api/v1/volumes/b")["tcp"] == f"127.0.0.1:{port}"
