"""The memory check: pstoraged's RssAnon before and after writing unique
data to a volume of its own, which is then deleted, eradicated and checked
to give its space back. Run by bench.py first, on a fresh daemon."""

from __future__ import annotations

import subprocess
import time

from .fio import Endpoint, run_fio
from .report import RSS_GOAL, Progress, fmt_cpu
from .system import GiB, KiB, MiB, fmt_size, log, rss_anon
from .targets import PStorage


def memory_check(ps: PStorage, gib: float, progress: Progress, problems: list[str],
                 memory: dict) -> None:
    """Write `gib` GiB of unique data through NBD; the figures go into `memory`
    (the JSON's "memory"), as far as the check got."""
    size = int(gib * GiB) // (4 * KiB) * (4 * KiB)
    name = "memtest"
    ps.cli("volume", "create", name, "--size", str(size))
    uri = ps.export(name)
    pid = ps.pid
    time.sleep(1)
    before = rss_anon(pid)
    progress.step(f"pstorage nbd memory: write {fmt_size(size)} of unique data (1M seq)")
    watch = {"pstoraged": pid, "nbdkit": ps.state_pid(name)}
    r = run_fio(ps.tmp, "memtest", Endpoint(uri=uri, watch=watch), "write", "1M", 8,
                "incompressible", size, None)
    if r["error"]:
        log(f"FAILED: {r['error']}")
        problems.append(f"memory test write failed: {r['error']}")
    else:
        log(f"{r['bw_bytes'] / MiB:.0f} MiB/s ({r['elapsed_s']:.0f} s; CPU {fmt_cpu(r['cpu'])})")
    ps.ok()
    time.sleep(2)  # let the idle commit run
    after = rss_anon(pid)
    stats = ps.cli("stats")
    memory.update({
        "written_bytes": size, "rss_anon_before": before, "rss_anon_after": after,
        "write": r, "stats_volume": stats.get("volumes", {}).get(name),
        "stats_pool": stats.get("pool"),
    })
    st = ps.state_pid(name)
    if st:
        memory["nbdkit_plugin_rss_anon"] = rss_anon(st)
    log(f"    pstoraged RssAnon: before {fmt_size(before or 0)}, after {fmt_size(after or 0)} "
        f"(target < {fmt_size(RSS_GOAL)}: {'yes' if after and after < RSS_GOAL else 'NO'})")
    v = memory["stats_volume"] or {}
    if v:
        log(f"    reduction: written {fmt_size(v['ingest']['written_bytes'])}, logical "
            f"{fmt_size(v['logical_bytes'])}, unique {fmt_size(v['unique_bytes'])}, stored "
            f"{fmt_size(v['stored_bytes'])}, dedupe {v['dedupe_ratio']}, compression "
            f"{v['compression_ratio']}")
    # free the space again so the performance runs see an empty pool
    ps.unexport(name)
    try:
        _delete(ps, name, size, memory, problems)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        problems.append(f"deleting the {fmt_size(size)} memtest volume failed: {e}")
        log(f"    deleting the volume failed: {e}")


def _delete(ps: PStorage, name: str, size: int, memory: dict, problems: list[str]) -> None:
    """Delete and eradicate the volume, wait until its space is back and the
    background work after it is done; a problem if the space stays allocated."""
    t0 = time.monotonic()
    ps.cli("volume", "delete", name, timeout=600)
    # delete only destroys (recoverable for 24 h); eradicate frees the space now
    ps.cli("volume", "eradicate", name, timeout=600)
    memory["delete_seconds"] = round(time.monotonic() - t0, 1)
    memory["rss_anon_after_delete"] = rss_anon(ps.pid)
    # the daemon gives a deleted volume's space back in the background
    while ps.cli("pool", "show")["reclaiming_volumes"]:
        if time.monotonic() - t0 > 600:
            raise RuntimeError("space of the deleted volume not reclaimed in 600 s")
        time.sleep(0.5)
    memory["reclaim_seconds"] = round(time.monotonic() - t0, 1)
    # then the dedupe index sweeps out the deleted chunks' entries: the
    # jobs after this should measure a settled pool, not that sweep
    while _unsettled(ps.cli("pool", "show")):
        if time.monotonic() - t0 > 900:
            raise RuntimeError("background work after the delete still running after 900 s")
        time.sleep(0.5)
    memory["settled_seconds"] = round(time.monotonic() - t0, 1)
    time.sleep(2)  # an idle commit frees the dead segments
    alloc = ps.cli("stats")["pool"]["allocated_bytes"]
    memory["allocated_after_delete"] = alloc
    log(f"    deleted the volume in {memory['delete_seconds']} s, its space reclaimed "
        f"after {memory['reclaim_seconds']} s, background work done after "
        f"{memory['settled_seconds']} s; RssAnon now "
        f"{fmt_size(memory['rss_anon_after_delete'] or 0)}; pool allocated "
        f"{fmt_size(alloc)}")
    if alloc > 64 * MiB:
        msg = (f"after deleting the {fmt_size(size)} memtest volume the pool still has "
               f"{fmt_size(alloc)} allocated (dead segments not freed)")
        problems.append(msg)
        log(f"    !! {msg}")


def _unsettled(pool: dict) -> bool:
    """Deleted data still being released, or its dedupe entries still being swept."""
    idx = pool.get("dedupe_index") or {}
    return bool(pool.get("reclaiming_volumes") or idx.get("pruning") or idx.get("merging")
                or idx.get("stale", 0) > 65536)
