"""Level 2: synchronous replication's data path (frontends/mirror.py), in process.

A source engine runs executor batches on its own thread, as in the daemon;
its volume is mirrored to a second engine (LocalPeer) with injectable delay
and link loss. Checked: a flush or FUA reply means the peer has it durable
(through a crash of both sides), a slow peer delays flushes and not plain
writes, strict refuses while the peer is away, degrade tracks 1 MiB extents
(across a restart) and resyncs only those, and random interleavings end with
two identical volumes.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from pstoraged.engine import reducer
from pstoraged.engine.engine import Engine
from pstoraged.engine.format import BLOCK_SIZE
from pstoraged.engine.pool import open_pool
from pstoraged.errors import CorruptData, DeviceIOError, InvalidArgument
from pstoraged.frontends import executor as X
from pstoraged.frontends import mirror as M

from .conftest import crash, make_pool
from .mirror_util import Pair

SIZE = 8 << 20  # 8 extents of 1 MiB


@pytest.fixture
def dirs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    return make_pool(str(a), size=64 << 20), make_pool(str(b), size=64 << 20)


@pytest.fixture
def pair(dirs, request):
    opts = getattr(request, "param", {})
    p = Pair(*dirs, SIZE, **opts)
    p.wait_state()
    yield p
    p.close()


def _reopen_peer(p: Pair) -> Engine:
    """Kill -9 of the peer: what it has durable is what reopens."""
    p.peer.shutdown(crash)
    return Engine(open_pool(p.dir_b))


def test_flushed_and_fua_writes_survive_a_crash_of_both(pair):
    """Every write whose flush (or FUA) returned is on the peer after kill -9 of
    the source and of the peer; later writes may or may not be."""
    rng = random.Random(5)
    history: list[list[bytes]] = [[bytes(BLOCK_SIZE)] for _ in range(SIZE // BLOCK_SIZE)]
    durable = [0] * len(history)  # index into history of the last value a flush covered
    for step in range(300):
        nblk = rng.choice((1, 1, 1, 8))  # 8 blocks (32 KiB): the reducer thread's path
        blk = rng.randrange(len(history) - nblk)
        data = os.urandom(BLOCK_SIZE * nblk)
        fua = rng.random() < 0.05
        pair.loop.write(pair.vol, blk * BLOCK_SIZE, data, fua=fua)
        for i in range(nblk):
            history[blk + i].append(data[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE])
        if fua:  # a FUA write covers itself (and everything acknowledged before it)
            for i in range(nblk):
                durable[blk + i] = len(history[blk + i]) - 1
        if rng.random() < 0.1 or step == 299 - 7:
            pair.loop.flush(pair.vol)
            durable = [len(h) - 1 for h in history]
    pair.stop_source(crash)
    dst = _reopen_peer(pair)
    try:
        vol = dst.volume("v")
        for lba, h in enumerate(history):
            got = dst.read(vol, lba * BLOCK_SIZE, BLOCK_SIZE)
            assert got in h[durable[lba]:], f"block {lba}: a flushed write is missing"
    finally:
        dst.close()


@pytest.mark.parametrize("pair", [{"delay": 0.3}], indirect=True)
def test_slow_peer_delays_flushes_not_writes(pair):
    t = time.monotonic()
    pair.loop.write(pair.vol, 0, os.urandom(BLOCK_SIZE))
    write_s = time.monotonic() - t
    t = time.monotonic()
    pair.loop.flush(pair.vol)
    flush_s = time.monotonic() - t
    assert write_s < 0.2, write_s
    assert flush_s >= 0.3, flush_s  # at least the peer's flush round trip
    t = time.monotonic()
    pair.loop.write(pair.vol, BLOCK_SIZE, os.urandom(BLOCK_SIZE), fua=True)
    assert time.monotonic() - t >= 0.3


def _lose_link(p: Pair) -> None:
    """Take the link down; the mirror notices on its next send."""
    p.peer.down = True
    p.loop.write(p.vol, SIZE - BLOCK_SIZE, os.urandom(BLOCK_SIZE))  # the send that fails
    p.wait_state(M.STALLED if p.policy == "strict" else M.DEGRADED)


@pytest.mark.parametrize("pair", [{"policy": "strict"}], indirect=True)
def test_strict_refuses_while_the_peer_is_away(pair, caplog):
    pair.loop.write(pair.vol, 0, b"a" * BLOCK_SIZE)
    pair.loop.flush(pair.vol)
    # a write acknowledged before the loss, its flush after: the flush must fail
    pair.peer.down = True
    pair.loop.write(pair.vol, BLOCK_SIZE, b"b" * BLOCK_SIZE)
    with pytest.raises(DeviceIOError):
        pair.loop.flush(pair.vol)
    pair.wait_state(M.STALLED)
    with pytest.raises(DeviceIOError, match="strict"):
        pair.loop.write(pair.vol, 2 * BLOCK_SIZE, b"c" * BLOCK_SIZE)
    with pytest.raises(DeviceIOError):
        pair.loop.flush(pair.vol)
    # refused means not applied here either
    assert pair.loop.read(pair.vol, 2 * BLOCK_SIZE, BLOCK_SIZE) == bytes(BLOCK_SIZE)
    pair.peer.down = False
    pair.wait_state()
    pair.loop.write(pair.vol, 2 * BLOCK_SIZE, b"c" * BLOCK_SIZE)
    pair.loop.flush(pair.vol)
    pair.wait_in_sync()
    assert pair.peer_read(0, 3 * BLOCK_SIZE) == b"a" * BLOCK_SIZE + b"b" * BLOCK_SIZE + \
        b"c" * BLOCK_SIZE


def test_degrade_tracks_extents_and_resyncs_only_those(pair):
    base = os.urandom(SIZE)
    pair.loop.write(pair.vol, 0, base)
    pair.wait_in_sync()
    _lose_link(pair)
    for mib in (1, 3):  # two extents changed while alone, flushes still succeed
        pair.loop.write(pair.vol, mib * M.EXTENT + 8192, os.urandom(3 * BLOCK_SIZE))
        pair.loop.flush(pair.vol)
    st = pair.mirror.statistics()
    assert st.state == M.DEGRADED and not st.connected
    assert st.out_of_sync_bytes == 3 * M.EXTENT  # 1, 3 and the last one (_lose_link's write)
    before = pair.peer.received_bytes
    pair.peer.down = False
    pair.wait_in_sync()
    shipped = pair.peer.received_bytes - before
    assert 3 * M.EXTENT <= shipped < 3 * M.EXTENT + 64 << 10, shipped  # not the 8 MiB volume
    assert pair.mirror.statistics().resync_bytes == 3 * M.EXTENT
    assert pair.peer_read(0, SIZE) == pair.loop.read(pair.vol, 0, SIZE)


def test_writes_during_a_resync_reach_both(dirs):
    p = Pair(*dirs, SIZE)
    try:
        p.wait_state()
        _lose_link(p)
        for mib in range(8):
            p.loop.write(p.vol, mib * M.EXTENT, os.urandom(M.EXTENT))
        p.peer.delay = 0.01  # the resync takes a while; write into it
        p.peer.down = False
        for i in range(40):
            p.loop.write(p.vol, random.randrange(SIZE // BLOCK_SIZE) * BLOCK_SIZE,
                         os.urandom(BLOCK_SIZE), fua=i % 10 == 0)
        p.wait_in_sync()
        assert p.peer_read(0, SIZE) == p.loop.read(p.vol, 0, SIZE)
    finally:
        p.close()


@pytest.mark.parametrize("how", ["clean", "crash"])
def test_out_of_sync_extents_survive_a_restart(dirs, how):
    p = Pair(*dirs, SIZE)
    try:
        p.wait_state()
        _lose_link(p)
        p.loop.write(p.vol, 5 * M.EXTENT, os.urandom(2 * BLOCK_SIZE))
        p.loop.flush(p.vol)  # commits the data and its bit
        expect = p.loop.read(p.vol, 0, SIZE)
        p.restart_source(crash if how == "crash" else (lambda e: e.close()))
        st = p.mirror.statistics()
        assert st.out_of_sync_bytes == 2 * M.EXTENT, st  # extents 5 and 7
        assert st.state == M.DEGRADED
        before = p.peer.received_bytes
        p.peer.down = False
        p.wait_in_sync()
        assert p.peer.received_bytes - before < 2 * M.EXTENT + 64 << 10
        assert p.peer_read(0, SIZE) == expect
    finally:
        p.close()


def test_a_full_queue_falls_back_to_resync(dirs):
    p = Pair(*dirs, SIZE, delay=0.05)
    try:
        p.wait_state()
        p.mirror.max_queued = 64 << 10  # the peer is slow: most changes overflow
        data = os.urandom(SIZE)
        for off in range(0, SIZE, 128 << 10):
            p.loop.write(p.vol, off, data[off:off + (128 << 10)])
        p.wait_in_sync()
        assert p.peer_read(0, SIZE) == data
    finally:
        p.close()


def test_malformed_reduced_writes_are_refused(engine):
    vol = engine.create_volume("v", 1 << 20)
    good = reducer.reduce_now(os.urandom(8192), 1).wait()
    fps, kinds, payloads, crcs = good
    bad_fp = (bytes(32) + fps[32:], kinds, payloads, crcs)
    bad_payload = (fps, kinds, [payloads[1], payloads[0]], crcs)
    short = (fps[:32], kinds, payloads, crcs)
    for red, err in ((bad_fp, CorruptData), (bad_payload, CorruptData),
                     (short, InvalidArgument)):
        with pytest.raises(err):
            M.apply(engine, vol, [M.MirrorOp(1, 0, 8192, None, red)])
    with pytest.raises(InvalidArgument):
        M.apply(engine, vol, [M.MirrorOp(1, 1 << 20, 4096, b"x" * 4096, None)])
    with pytest.raises(InvalidArgument):
        M.apply(engine, vol, [M.MirrorOp(1, 0, 4096, b"x" * 10, None)])
    assert engine.read(vol, 0, 8192) == bytes(8192)  # nothing was stored
    M.apply(engine, vol, [M.MirrorOp(1, 0, 8192, None, good)])
    assert engine.read(vol, 0, 8192) != bytes(8192)


def test_unmirrored_volumes_are_not_touched(pair):
    other = pair.loop.call(pair.src.create_volume, "w", 1 << 20)
    before = pair.peer.received_ops
    pair.loop.write(other, 0, os.urandom(BLOCK_SIZE), fua=True)
    pair.loop.flush(other)
    assert pair.peer.received_ops == before


def test_bad_policy_is_refused(pair):
    with pytest.raises(InvalidArgument, match="policy"):
        M.Mirror(pair.src, pair.vol, pair.peer, pair.loop.ex, "sometimes")


class MirrorInterleavings(RuleBasedStateMachine):
    """Random writes, trims, flushes, link losses and returns. Degrade: flushes
    never fail. Strict: a refused change is applied nowhere. Either way, once
    the link is back the two volumes equal the model."""

    policy = "degrade"

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="mirror-model-")
        a, b = os.path.join(self.tmp, "a"), os.path.join(self.tmp, "b")
        os.mkdir(a)
        os.mkdir(b)
        make_pool(a, size=32 << 20)
        make_pool(b, size=32 << 20)
        self.p = Pair(a, b, 4 << 20, policy=self.policy)
        self.p.wait_state()
        self.model = bytearray(4 << 20)

    @rule(blk=st.integers(0, 1023), n=st.sampled_from([1, 2, 5]), fua=st.booleans())
    def write(self, blk, n, fua):
        n = min(n, 1024 - blk)
        data = os.urandom(n * BLOCK_SIZE)
        try:
            self.p.loop.write(self.p.vol, blk * BLOCK_SIZE, data, fua=fua)
        except DeviceIOError as e:
            assert self.policy == "strict"
            if "writes are refused" in str(e):  # refused: applied nowhere
                return
            assert fua  # applied here, its flush not confirmed by the peer
        self.model[blk * BLOCK_SIZE:(blk + n) * BLOCK_SIZE] = data

    @rule(blk=st.integers(0, 1023), n=st.integers(1, 300))
    def trim(self, blk, n):
        n = min(n, 1024 - blk)
        try:
            self.p.loop.do(X.TRIM, self.p.vol, blk * BLOCK_SIZE, n * BLOCK_SIZE)
        except DeviceIOError:
            assert self.policy == "strict"
            return
        self.model[blk * BLOCK_SIZE:(blk + n) * BLOCK_SIZE] = bytes(n * BLOCK_SIZE)

    @rule()
    def flush(self):
        try:
            self.p.loop.flush(self.p.vol)
        except DeviceIOError:  # the peer is away, or back and not reconnected yet
            assert self.policy == "strict"

    @precondition(lambda self: not self.p.peer.down)
    @rule()
    def link_down(self):
        self.p.peer.down = True

    @precondition(lambda self: self.p.peer.down)
    @rule()
    def link_up(self):
        self.p.peer.down = False

    def teardown(self):
        try:
            self.p.peer.down = False
            self.p.wait_in_sync()
            assert self.p.loop.read(self.p.vol, 0, len(self.model)) == self.model
            assert self.p.peer_read(0, len(self.model)) == self.model
        finally:
            self.p.close()
            shutil.rmtree(self.tmp, ignore_errors=True)


TestMirrorInterleavings = MirrorInterleavings.TestCase
TestMirrorInterleavings.settings = settings(
    max_examples=12, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])


def test_a_peer_that_refuses_a_change_is_a_lost_peer(pair, caplog):
    """An error from the peer's engine (not a network error) must not end the link
    thread: the pair degrades, and recovers once the peer accepts again."""
    caplog.allowed_errors = True
    real = pair.peer.apply

    def refuse(ops):
        raise CorruptData("peer says no")

    pair.peer.apply = refuse  # type: ignore[method-assign]
    pair.loop.write(pair.vol, 0, b"x" * BLOCK_SIZE)
    pair.loop.flush(pair.vol)  # degrade: durable here, the extent is owed
    pair.wait_state(M.DEGRADED)
    assert "peer says no" in pair.mirror.statistics().last_error
    assert any("refused a change" in r.getMessage() for r in caplog.records)
    pair.peer.apply = real  # type: ignore[method-assign]
    pair.wait_in_sync()
    assert pair.peer_read(0, BLOCK_SIZE) == b"x" * BLOCK_SIZE


def test_a_quiet_link_confirms_without_a_client_flush(pair):
    """Without a flush from the client the peer is still flushed once the link is
    quiet, so the bitmap and the lag go back to zero."""
    pair.mirror.idle_flush = 0.05
    pair.loop.write(pair.vol, 0, os.urandom(4 * BLOCK_SIZE))
    st = pair.mirror.statistics()
    assert st.out_of_sync_bytes == M.EXTENT and st.lag_bytes > 0
    end = time.monotonic() + 10
    while pair.mirror.statistics().out_of_sync_bytes or pair.mirror.statistics().lag_bytes:
        assert time.monotonic() < end, pair.mirror.statistics()
        time.sleep(0.01)
    assert pair.peer.flushes >= 1


def test_a_writer_that_never_flushes_is_confirmed_too(pair):
    """Under a steady stream of writes without flushes the link is never quiet;
    the peer is still flushed every idle_flush seconds, so the per-op records
    behind lag_bytes do not grow without bound."""
    pair.mirror.idle_flush = 0.05
    end = time.monotonic() + 1.0
    blk = 0
    while time.monotonic() < end:
        pair.loop.write(pair.vol, blk % (SIZE // BLOCK_SIZE) * BLOCK_SIZE,
                        os.urandom(BLOCK_SIZE))
        blk += 1
    assert pair.peer.flushes >= 3
    assert len(pair.mirror._totals) < blk / 2


def test_large_writes_ship_as_stored(pair):
    """A large write goes to the peer as the reducer left it: compressed payloads
    (and nothing for zero blocks), checked and stored as they are."""
    data = (b"pstorage replicates compressed chunks " * 2000)[:60 * 1024]
    data += bytes(4096)  # 15 compressible blocks and a zero one
    before = pair.mirror.statistics().sent_bytes
    pair.loop.write(pair.vol, 0, data)
    pair.loop.flush(pair.vol)
    sent = pair.mirror.statistics().sent_bytes - before
    assert sent < len(data) // 4, sent
    assert pair.peer_read(0, len(data)) == data


class StrictMirrorInterleavings(MirrorInterleavings):
    policy = "strict"


TestStrictMirrorInterleavings = StrictMirrorInterleavings.TestCase
TestStrictMirrorInterleavings.settings = TestMirrorInterleavings.settings
