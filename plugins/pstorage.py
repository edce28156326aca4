#!/usr/sbin/nbdkit python
"""nbdkit plugin serving PStorage volumes (pstoraged) over NBD.

Run:
    nbdkit -U /tmp/s.sock python plugins/pstorage.py socket=/run/pstorage/data.sock

Parameters:
    socket=PATH    pstoraged data socket (default /run/pstorage/data.sock)
    retry=SECONDS  how long to keep reconnecting while the daemon is gone (default 120)
    readonly=BOOL  force every export read-only (default false)
    export=NAME    serve only this volume (pstorage export runs one nbdkit per volume)

Wire format: docs/protocol.md.  Each daemon connection carries one request at
a time; parallelism comes from a per-export pool of connections, which keeps
reply matching trivial and lets READ replies land straight in nbdkit's buffer.
Standard library only: this runs in nbdkit's embedded interpreter.
"""
import errno
import itertools
import math
import socket
import struct
import sys
import threading
import time

import nbdkit

API_VERSION = 2

# The wire format, as in pstoraged/frontends/protocol.py (which this cannot
# import); tests/test_t1_protocol.py keeps the two equal.
REQ = struct.Struct("<IHHQQII")    # magic, op, flags, handle, offset, length, payload_len
REP = struct.Struct("<IIQII")      # magic, error, handle, payload_len, reserved
# size, flags, block_size, instance, prev_instance, prev_clean (1: that run
# closed cleanly); a longer reply carries fields added later, ignored here
OPEN_REPLY = struct.Struct("<QII16s16sB")
EXTENT = struct.Struct("<QII")     # length, type, pad
REQ_MAGIC, REP_MAGIC = 0x31515350, 0x31525350
(OP_OPEN, OP_READ, OP_WRITE, OP_FLUSH, OP_TRIM, OP_ZERO,
 OP_EXTENTS, OP_LIST, OP_SIZE) = range(1, 10)
FLAG_FUA, FLAG_MAY_TRIM, FLAG_FAST_ZERO = 1, 2, 4
OPEN_READONLY = 1                  # OPEN_REPLY flags
EXTENT_HOLE, EXTENT_ZERO = 1, 2    # EXTENT type bits
MAX_REQUEST = 32 * 1024 * 1024     # daemon limit for length and payload
SECTOR = 512                       # offsets and lengths are multiples of this
MAX_IDLE = 64                      # idle daemon connections kept per export
NOSIG = socket.MSG_NOSIGNAL        # a dead daemon must give EPIPE, not SIGPIPE

cfg = {"socket": "/run/pstorage/data.sock", "retry": 120.0, "readonly": False, "export": None}


class DaemonError(RuntimeError):
    """Error reply from pstoraged (not an OSError: OSError(2, ..) would
    become FileNotFoundError and be mistaken for a missing socket)."""
    def __init__(self, err, msg):
        super().__init__(f"pstoraged: {errno.errorcode.get(err, err)}: {msg}")
        self.errno = err


class ProtocolError(RuntimeError):
    pass


# --- durability bookkeeping (see "Reconnection" in docs/protocol.md) -------
# _acked[(export, instance)] = sequence number of the last write, trim or zero
# without FUA acknowledged by that daemon run and not yet covered by a FLUSH.
# _lost holds exports that lost acknowledged writes: every later flush and
# write on them fails with EIO until nbdkit is restarted.
_state = threading.Lock()
_seq = itertools.count(1)
_acked = {}
_lost = set()


def _judge(instance, prev, prev_clean, before=math.inf):
    """A connection is talking to daemon run `instance`: acknowledged writes
    from any other run survive only if that run is `prev` and closed cleanly."""
    for key in [k for k, s in _acked.items() if k[1] != instance and s < before]:
        del _acked[key]
        if key[1] == prev and prev_clean:
            continue
        _lost.add(key[0])
        msg = (f"pstorage: export {key[0]!r}: writes acknowledged by daemon run "
               f"{key[1].hex()} may be lost (now {instance.hex()}); flushes and writes fail with EIO")
        nbdkit.debug(msg)
        print(msg, file=sys.stderr, flush=True)


def _mark(export, c, flags):
    if not flags & FLAG_FUA:       # FUA requests are already durable
        with _state:
            _acked[export, c.instance] = next(_seq)


# --- daemon connections ------------------------------------------------------
class Conn:
    __slots__ = ("sock", "handle", "hdr", "rhdr", "instance", "prev", "prev_clean")

    def __init__(self, sock):
        self.sock, self.handle = sock, 0
        self.hdr = bytearray(REQ.size)            # reused request header
        self.rhdr = memoryview(bytearray(REP.size))
        self.instance = self.prev = b""
        self.prev_clean = False


def open_reply(r):
    """(readonly, instance, prev_instance, prev_clean) from an OPEN reply."""
    if len(r) < OPEN_REPLY.size:
        raise ProtocolError(f"OpenReply too short ({len(r)} bytes)")
    _, fl, _, instance, prev, prev_clean = OPEN_REPLY.unpack_from(r)
    return bool(fl & OPEN_READONLY), instance, prev, prev_clean == 1


def _recv_exact(sock, mv):
    while mv:
        n = sock.recv_into(mv)
        if not n:
            raise ConnectionError("pstoraged closed the connection")
        mv = mv[n:]


def _roundtrip(c, op, flags, offset, length, data=None, into=None):
    """Send one request, return its reply payload (or None when it was read
    into `into`, a writable buffer of exactly the expected length)."""
    s = c.sock
    c.handle += 1
    plen = len(data) if data is not None else 0
    REQ.pack_into(c.hdr, 0, REQ_MAGIC, op, flags, c.handle, offset, length, plen)
    if data is None:
        s.sendall(c.hdr, NOSIG)
    else:                          # header + payload in one syscall, no concatenation
        n = s.sendmsg([c.hdr, data], (), NOSIG)
        if n < REQ.size:
            s.sendall(c.hdr[n:], NOSIG)
            n = REQ.size
        if n < REQ.size + plen:
            s.sendall(memoryview(data)[n - REQ.size:], NOSIG)
    rh = c.rhdr
    # For READ, scatter header and data straight into nbdkit's buffer.
    n = s.recvmsg_into([rh, into])[0] if into is not None else s.recv_into(rh)
    if not n:
        raise ConnectionError("pstoraged closed the connection")
    if n < REP.size:
        _recv_exact(s, rh[n:])
    magic, err, handle, plen, _ = REP.unpack_from(rh)
    if magic != REP_MAGIC:
        raise ProtocolError(f"bad reply magic {magic:#x}")
    got = max(0, n - REP.size)     # payload bytes already in `into`
    if got > plen or plen > MAX_REQUEST:
        raise ProtocolError(f"bad reply payload length {plen}")
    if err or into is None or plen != len(into):
        buf = bytearray(plen)      # error message, or a small op-specific reply
        buf[:got] = into[:got] if got else b""
        _recv_exact(s, memoryview(buf)[got:])
        if err:
            raise DaemonError(err, buf.decode("utf-8", "replace"))
        if into is not None:
            raise ProtocolError(f"READ reply has {plen} bytes, expected {len(into)}")
    else:
        buf = None
        _recv_exact(s, into[got:])
    if handle != c.handle:
        raise ProtocolError(f"reply handle {handle} != {c.handle}")
    return buf


class Pool:
    """Idle connections to one export (export None: unbound, for listing)."""
    def __init__(self, export):
        self.export, self.lock, self.idle = export, threading.Lock(), []
        self.readonly = False

    def get(self):
        with self.lock:
            if self.idle:
                return self.idle.pop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(cfg["socket"])
            c = Conn(sock)
            if self.export is not None:
                r = _roundtrip(c, OP_OPEN, 0, 0, 0, self.export.encode())
                self.readonly, c.instance, c.prev, c.prev_clean = open_reply(r)
                with _state:
                    _judge(c.instance, c.prev, c.prev_clean)
            return c
        except BaseException:
            sock.close()
            raise

    def put(self, c):
        with self.lock:
            if len(self.idle) < MAX_IDLE:
                self.idle.append(c)
                return
        c.sock.close()

    def reset(self):
        """The daemon went away: every idle connection is dead too."""
        with self.lock:
            idle, self.idle = self.idle, []
        for c in idle:
            c.sock.close()


_pools = {}
_pools_lock = threading.Lock()
_list_pool = Pool(None)


def _call(pool, op, flags=0, offset=0, length=0, data=None, into=None):
    """One request on a borrowed connection; returns (payload, conn).
    While the daemon is gone, reconnect (and re-OPEN) every 0.2 s for up to
    `retry` seconds and resend: every operation is idempotent."""
    deadline = None
    while True:
        c = None
        try:
            c = pool.get()
            reply = _roundtrip(c, op, flags, offset, length, data, into)
        except (ConnectionError, FileNotFoundError) as e:
            if c is not None:
                c.sock.close()
            pool.reset()
            now = time.monotonic()
            if deadline is None:   # first failure: retry at once (maybe just a stale idle conn)
                deadline = now + cfg["retry"]
                nbdkit.debug(f"pstorage: daemon connection lost ({e}), reconnecting")
                continue
            if now >= deadline:
                nbdkit.set_error(errno.EIO)
                raise RuntimeError(f"pstoraged unreachable for {cfg['retry']:g}s: {e}") from e
            time.sleep(0.2)
            continue
        except DaemonError as e:
            if c is not None:      # some refusals close the connection: start afresh
                c.sock.close()
            nbdkit.set_error(e.errno)
            raise
        except Exception:
            if c is not None:
                c.sock.close()
            nbdkit.set_error(errno.EIO)
            raise
        if deadline is not None:
            nbdkit.debug(f"pstorage: reconnected to {cfg['socket']}")
        pool.put(c)
        return reply, c


def _pieces(offset, count):
    """Split a range into daemon-sized requests (nbdkit allows up to 64 MiB
    reads/writes and 4 GiB trims/zeroes)."""
    end = offset + count
    while offset < end:
        n = min(MAX_REQUEST, end - offset)
        yield offset, n
        offset += n


def _flags(f):
    return ((FLAG_FUA if f & nbdkit.FLAG_FUA else 0)
            | (FLAG_MAY_TRIM if f & nbdkit.FLAG_MAY_TRIM else 0)
            | (FLAG_FAST_ZERO if f & nbdkit.FLAG_FAST_ZERO else 0))


# --- nbdkit callbacks --------------------------------------------------------
def thread_model(): return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    if key == "socket":
        cfg["socket"] = value
    elif key == "retry":
        cfg["retry"] = float(value)
    elif key == "readonly":
        v = value.strip().lower()
        if v not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ValueError(f"readonly={value!r}: expected a boolean")
        cfg["readonly"] = v in ("1", "true", "yes", "on")
    elif key == "export":
        cfg["export"] = value
    else:
        raise ValueError(f"unknown parameter {key!r} (expected socket, retry, readonly, export)")


def config_complete():
    if not cfg["socket"] or len(cfg["socket"].encode()) > 107:
        raise ValueError(f"socket={cfg['socket']!r}: empty or too long for a unix socket")
    if not math.isfinite(cfg["retry"]) or cfg["retry"] < 0:
        raise ValueError(f"retry={cfg['retry']}: expected seconds >= 0")


def cleanup():
    for pool in list(_pools.values()) + [_list_pool]:
        pool.reset()


def list_exports(readonly, is_tls):
    if cfg["export"] is not None:
        return [cfg["export"]]
    data, _ = _call(_list_pool, OP_LIST)
    return [n for n in data.decode("utf-8").split("\n") if n]


def default_export(readonly, is_tls):
    names = list_exports(readonly, is_tls)
    return names[0] if names else ""


class Handle:
    __slots__ = ("export", "pool", "readonly")


def open(readonly):
    h = Handle()
    h.export = nbdkit.export_name()
    if cfg["export"] is not None:
        if h.export not in ("", cfg["export"]):
            nbdkit.set_error(errno.ENOENT)
            raise RuntimeError(f"this server exports only {cfg['export']!r}")
        h.export = cfg["export"]
    with _pools_lock:
        h.pool = _pools.get(h.export) or Pool(h.export)
    _call(h.pool, OP_SIZE)         # connects and OPENs: unknown exports fail here
    with _pools_lock:              # remember only exports that exist
        h.pool = _pools.setdefault(h.export, h.pool)
    h.readonly = bool(readonly or cfg["readonly"] or h.pool.readonly)
    nbdkit.debug(f"pstorage: opened {h.export!r} readonly={h.readonly}")
    return h


def get_size(h):
    data, _ = _call(h.pool, OP_SIZE)
    return struct.unpack_from("<Q", data)[0]


# Capabilities.  FLUSH is pool-wide and writes are visible to every daemon
# connection (see "Durability"), which is what multi-conn requires.
def block_size(h): return (SECTOR, 4096, MAX_REQUEST)
def is_rotational(h): return False
def can_write(h): return not h.readonly
def can_flush(h): return True
def can_trim(h): return True
def can_zero(h): return True
def can_fast_zero(h): return True
def can_fua(h): return nbdkit.FUA_NATIVE
def can_multi_conn(h): return True
def can_extents(h): return True
def can_cache(h): return nbdkit.CACHE_NONE


def _part(buf, start, n):
    return buf if n == len(buf) else memoryview(buf)[start:start + n]


def pread(h, buf, offset, flags):
    for off, n in _pieces(offset, len(buf)):   # one piece unless > 32 MiB
        _call(h.pool, OP_READ, 0, off, n, into=_part(buf, off - offset, n))


def _modify(h, op, offset, count, flags, buf=None):
    _check_lost(h)
    f = _flags(flags)
    for off, n in _pieces(offset, count):
        data = None if buf is None else _part(buf, off - offset, n)
        _, c = _call(h.pool, op, f, off, n, data)
        _mark(h.export, c, f)


def pwrite(h, buf, offset, flags):
    _modify(h, OP_WRITE, offset, len(buf), flags, buf)


def trim(h, count, offset, flags):
    _modify(h, OP_TRIM, offset, count, flags)


def zero(h, count, offset, flags):
    _modify(h, OP_ZERO, offset, count, flags)


def flush(h, flags):
    with _state:
        start = next(_seq)         # acks numbered below this precede the FLUSH
    _, c = _call(h.pool, OP_FLUSH)
    with _state:
        _judge(c.instance, c.prev, c.prev_clean, start)  # acks that raced a reconnect
        for key in [k for k, s in _acked.items() if k[1] == c.instance and s < start]:
            del _acked[key]        # FLUSH is pool-wide: covers every export
    _check_lost(h)


def _check_lost(h):
    """Once acknowledged writes were lost, every later flush and write fails.

    The error must be sticky: a filesystem issues flushes from several
    places (journal commits, checkpoints, fsync of a file with nothing to
    commit); if only the first one failed, another could succeed and let
    the filesystem believe that the lost writes are on disk. The export
    works again once it is reopened (pstorage detach / attach).
    """
    if h.export in _lost:
        nbdkit.set_error(errno.EIO)
        raise RuntimeError(f"pstorage: acknowledged writes to {h.export!r} were lost in a "
                           "daemon crash; detach and attach the volume, then fsck it")


def extents(h, count, offset, flags):
    data, _ = _call(h.pool, OP_EXTENTS, 0, offset, min(count, MAX_REQUEST))
    if len(data) % EXTENT.size:
        nbdkit.set_error(errno.EIO)
        raise ProtocolError(f"EXTENTS reply of {len(data)} bytes")
    out, pos = [], offset
    for length, typ, _ in EXTENT.iter_unpack(data):
        if length:
            out.append((pos, length, (nbdkit.EXTENT_HOLE if typ & EXTENT_HOLE else 0)
                        | (nbdkit.EXTENT_ZERO if typ & EXTENT_ZERO else 0)))
            pos += length
            if flags & nbdkit.FLAG_REQ_ONE:
                break              # one extent is all the client asked for
    return out or [(offset, min(count, MAX_REQUEST), 0)]  # nothing known: plain data
