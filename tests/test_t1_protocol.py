"""Level 1: the nbdkit plugin and the daemon speak the same wire format.

plugins/pstorage.py runs in nbdkit's embedded interpreter, where pstoraged
is not importable, so it keeps its own copy of the structs and constants of
docs/protocol.md. These tests hold that copy equal to
pstoraged/frontends/protocol.py, and pass the open reply both ways.
"""

from __future__ import annotations

import importlib.util
import socket
import struct
import sys
import threading
import types
from pathlib import Path

import pytest

from pstoraged.frontends import protocol as P

PLUGIN = Path(__file__).resolve().parent.parent / "plugins" / "pstorage.py"
# the plugin's own settings, not part of the wire format
PLUGIN_ONLY = {"API_VERSION", "MAX_IDLE", "NOSIG"}


@pytest.fixture
def plugin(monkeypatch):
    """plugins/pstorage.py loaded from its file, with a stub `nbdkit` module."""
    stub = types.ModuleType("nbdkit")
    stub.debug = lambda msg: None  # type: ignore[attr-defined]
    stub.set_error = lambda err: None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nbdkit", stub)
    spec = importlib.util.spec_from_file_location("pstorage_plugin", PLUGIN)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def wire_names(plugin) -> dict[str, object]:
    """The plugin's wire structs and constants: upper-case module globals that
    are structs or integers, less its own settings."""
    return {k: v for k, v in vars(plugin).items()
            if k.isupper() and k not in PLUGIN_ONLY
            and (isinstance(v, struct.Struct) or type(v) is int)}


def test_the_plugin_has_the_daemons_structs_and_constants(plugin):
    names = wire_names(plugin)
    for name in ("REQ", "REP", "OPEN_REPLY", "EXTENT", "REQ_MAGIC", "REP_MAGIC", "OP_OPEN",
                 "OP_READ", "OP_WRITE", "OP_FLUSH", "OP_TRIM", "OP_ZERO", "OP_EXTENTS", "OP_LIST",
                 "OP_SIZE", "FLAG_FUA", "FLAG_MAY_TRIM", "FLAG_FAST_ZERO", "OPEN_READONLY",
                 "EXTENT_HOLE", "EXTENT_ZERO", "MAX_REQUEST", "SECTOR"):
        assert name in names, f"the plugin lost {name}"
    for name, value in names.items():
        assert hasattr(P, name), f"plugin constant {name} is not in protocol.py"
        theirs = getattr(P, name)
        if isinstance(value, struct.Struct):
            assert value.format == theirs.format, name
        else:
            assert value == theirs, name
    # every op code the daemon knows, and no flag the daemon would refuse
    assert {v for k, v in names.items() if k.startswith("OP_")} == set(P.OP_NAMES)
    assert P.FLAG_FUA | P.FLAG_MAY_TRIM | P.FLAG_FAST_ZERO == P.KNOWN_FLAGS


def test_sizes_are_those_of_docs_protocol_md(plugin):
    assert (plugin.REQ.size, plugin.REP.size, plugin.OPEN_REPLY.size, plugin.EXTENT.size) == \
        (32, 24, 49, 16)


@pytest.mark.parametrize("readonly, clean", [(False, True), (True, False)])
def test_open_reply_both_ways(plugin, readonly, clean):
    inst, prev = bytes(range(16)), bytes(range(16, 32))
    daemon = P.OPEN_REPLY.pack(1 << 30, P.OPEN_READONLY if readonly else 0, 4096, inst, prev,
                               1 if clean else 0)
    assert plugin.open_reply(daemon + b"later fields") == (readonly, inst, prev, clean)
    with pytest.raises(plugin.ProtocolError):
        plugin.open_reply(daemon[:-1])
    mine = plugin.OPEN_REPLY.pack(1 << 30, plugin.OPEN_READONLY if readonly else 0, 4096, inst,
                                  prev, 1 if clean else 0)
    size, flags, bs, i, p, c = P.OPEN_REPLY.unpack(mine)
    assert (size, bool(flags & P.OPEN_READONLY), bs, i, p, c) == \
        (1 << 30, readonly, 4096, inst, prev, int(clean))


def test_open_through_a_socket(plugin, tmp_path):
    """The plugin's OPEN against a stand-in daemon that answers with protocol.py."""
    path = str(tmp_path / "data.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    inst, prev = b"i" * 16, b"p" * 16
    seen = {}

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            hdr = conn.recv(P.REQ.size, socket.MSG_WAITALL)
            magic, op, flags, handle, offset, length, plen = P.REQ.unpack(hdr)
            seen.update(magic=magic, op=op, name=conn.recv(plen, socket.MSG_WAITALL))
            body = P.OPEN_REPLY.pack(4 << 20, P.OPEN_READONLY, 4096, inst, prev, 1)
            conn.sendall(P.reply(handle, 0, body))
            conn.recv(1)  # until the plugin closes it

    t = threading.Thread(target=serve)
    t.start()
    try:
        plugin.cfg["socket"] = path
        pool = plugin.Pool("vol")
        c = pool.get()
        c.sock.close()
    finally:
        t.join(10)
        srv.close()
    assert seen == {"magic": P.REQ_MAGIC, "op": P.OP_OPEN, "name": b"vol"}
    assert (pool.readonly, c.instance, c.prev, c.prev_clean) == (True, inst, prev, True)
