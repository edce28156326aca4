"""Level 5: the segment cleaner under real I/O: fio with verify=crc32c while
GC runs, and kill -9 of the daemon in the middle of a GC pass."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
import time

import pytest

from .daemon_util import new_daemon, remove

pytestmark = pytest.mark.skipif(not shutil.which("fio"), reason="fio not installed (scripts/setup)")

MiB = 1 << 20
VOL = 96 * MiB


def fio(uri: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    p = subprocess.run(["fio", "--name=gc", "--ioengine=nbd", f"--uri={uri}", "--bs=4k",
                        "--iodepth=16", f"--size={VOL}", "--refill_buffers", *args],
                       capture_output=True, text=True, timeout=timeout,
                       cwd=tempfile.gettempdir())  # fio leaves verify state files in its cwd
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    return p


def volume_hash(uri: str) -> str:
    out = subprocess.run(["nbdcopy", uri, "-"], capture_output=True, check=True, timeout=300).stdout
    assert len(out) == VOL
    return hashlib.sha256(out).hexdigest()


def cleaner(d) -> dict:
    return d.client.get("/api/v1/pool")["cleaner"]


def test_gc_under_fio_verify_and_kill9_mid_gc():
    # 144 MiB pool of 1 MiB segments, a 96 MiB volume: every overwrite pass
    # leaves garbage the cleaner must collect for the next one to fit
    d = new_daemon(size=144 * MiB, segment_size=MiB)
    try:
        d.start()
        d.cli("volume", "create", "v", "--size", str(VOL), "--compression", "none")
        uri = d.cli("export", "v").stdout.strip()
        # three passes of random 4k writes, each verified (crc32c) after it is written
        fio(uri, "--rw=randwrite", "--loops=3", "--verify=crc32c", "--do_verify=1",
            "--randseed=7")
        c = cleaner(d)
        assert c["segments_cleaned"] > 10 and c["chunks_moved"] > 1000, c
        # leave half-dead segments behind, then kill -9 while the cleaner moves them
        fio(uri, "--rw=randwrite", f"--io_size={VOL // 2}", "--end_fsync=1", "--randseed=8")
        before = volume_hash(uri)
        c0 = cleaner(d)
        moved0 = c0["chunks_moved"]
        d.client.post("/api/v1/gc")  # compact now: moves the live half of each segment
        deadline = time.monotonic() + 60
        while True:
            c = cleaner(d)
            if c["chunks_moved"] > moved0:  # moving: kill it before the pass ends
                assert c["requested"] or c["victim"] is not None, "the pass ended too soon"
                break
            assert time.monotonic() < deadline, f"the cleaner did not start: {c}"
            time.sleep(0.005)
        d.kill9()
        d.start()
        assert volume_hash(uri) == before  # everything flushed survived, nothing torn
        # the cleaner finishes after the restart (gc --wait returns only then; d.cli
        # bounds it) and the data is still the same
        c = json.loads(d.cli("gc", "--wait", "--json").stdout)["cleaner"]
        assert not c["requested"] and c["victim"] is None, c
        assert c["segments_cleaned"] > c0["segments_cleaned"], (c0, c)
        # a full compaction pass leaves little garbage (automatic cleaning stops
        # at the free-segment watermark, leaving about as much as before)
        assert c["dead_fraction"] < c0["dead_fraction"] / 4, (c0, c)
        assert volume_hash(uri) == before
        # a scrub finds every chunk intact
        scrub = d.cli("scrub", "--wait", "--json")
        assert '"bad_chunks": 0' in scrub.stdout
    finally:
        remove(d)
