"""One benchmark run (scripts/bench without --space): start the targets,
the memory check, prefill and run the fio jobs per data kind, report, and
clean up whatever happens. Driven by cli.py."""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import tempfile
import time

from .fio import DATA, JOB_BY_KEY, JOBS, RUN_ORDER, Endpoint, run_fio
from .memory import memory_check
from .report import (
    Progress,
    Results,
    fmt_cpu,
    fmt_metric,
    fmt_us,
    pool_figures,
    pool_ratios,
    report,
)
from .system import (
    GiB,
    MiB,
    find_tool,
    fmt_size,
    loadavg,
    log,
    machine_info,
    mounts_under,
    rss_anon,
)
from .targets import FuseAttachment, Nbdkit, PStorage

BASELINES = ["file", "passthrough"]
ALL_TARGETS = ["pstorage", *BASELINES]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = ""
        self.res = Results()
        self.ps: PStorage | None = None
        self.nbdkits: list[Nbdkit] = []
        self.fuse_attachments: list[FuseAttachment] = []  # our own nbdfuse+loop (baselines)
        self.progress = Progress()
        if "pstorage" in args.targets:  # a missing tool stops the run before it starts
            find_tool("pstoraged"), find_tool("pstorage")

    @property
    def problems(self) -> list[str]:
        return self.res.problems

    @property
    def daemon_log(self) -> str:
        return self.ps.log_path if self.ps else ""

    def log_tail(self) -> str:
        return self.ps.log_tail() if self.ps else ""

    def _daemon_config(self) -> str:
        """[fuse] enabled with --fuse (attach through the daemon's FUSE front
        end instead of nbdfuse), else the defaults."""
        return f'[fuse]\nenabled = true\nmountpoint = "{self.tmp}/run/dev"\n' if self.args.fuse else ""

    def daemon_ok(self) -> bool:
        return self.ps is not None and self.ps.ok()

    # ------------------------------------------------------------- the run
    def paths(self) -> list[tuple[str, str]]:
        """(target, path): "nbd" for every target, "dev" where it is attached."""
        out = []
        for t in self.args.targets:
            out.append((t, "nbd"))
            if (t == "pstorage" and not self.args.no_attach) or (t != "pstorage" and self.args.baseline_attach):
                out.append((t, "dev"))
        return out

    def plan(self) -> list[tuple[str, str, str]]:
        """(data, target, path) in run order; each target is one store, which
        its paths share (prefilled once per data kind)."""
        return [(d, t, k) for d in DATA for t, k in self.paths()]

    def setup_targets(self, size: int) -> dict[tuple[str, str], Endpoint]:
        where: dict[tuple[str, str], Endpoint] = {}
        if self.ps is not None:
            ps = self.ps
            ps.cli("volume", "create", "bench", "--size", str(max(16 * GiB, size)))
            where[("pstorage", "nbd")] = Endpoint(uri=ps.export("bench"))
            kpid = ps.state_pid("bench")
            where[("pstorage", "nbd")].watch = {"pstoraged": ps.pid, "nbdkit": kpid}
            if not self.args.no_attach:
                dev = ps.attach("bench")
                where[("pstorage", "dev")] = Endpoint(device=dev, watch={
                    "pstoraged": ps.pid, "nbdkit": kpid,
                    "nbdfuse": ps.state_pid("bench", "fuse_pid")})
        for t in BASELINES:
            if t not in self.args.targets:
                continue
            k = Nbdkit(self.tmp, t)
            self.nbdkits.append(k)
            uri = k.start(size)
            where[(t, "nbd")] = Endpoint(uri=uri, watch={"nbdkit": k.pid})
            if self.args.baseline_attach:
                fa = FuseAttachment(self.tmp, t)
                self.fuse_attachments.append(fa)
                dev = fa.start(uri)
                where[(t, "dev")] = Endpoint(device=dev, watch={"nbdkit": k.pid, "nbdfuse": fa.pid})
        for (t, k_), w in where.items():
            log(f"  {t:<12} {k_:<4} {w.address}")
        return where

    def main(self) -> int:
        a = self.args
        size = a.size
        self.tmp = tempfile.mkdtemp(prefix="pstorage-bench.", dir=a.tmpdir)
        info = machine_info()
        log(f"machine: {info.get('cpus')} CPUs ({info.get('cpu', '?')}), {info.get('memory', '?')}"
            f" RAM, {info.get('os', '?')}, kernel {info['kernel']}")
        log(f"tools:   {info['fio']}, {info['nbdkit']}, {info['nbdfuse']}, python {info['python']}; "
            f"pstorage {info['revision'] or '?'}")
        log(f"run:     {a.runtime} s per job, region {fmt_size(size)}, targets {','.join(a.targets)}"
            f"{', no attach' if a.no_attach else ''}, temp {self.tmp}")
        load = loadavg()
        log(f"load:    {' '.join(load)} (1/5/15 min)" + (
            "  -- the machine is busy: other processes will skew the numbers"
            if float(load[0]) > 0.7 else ""))
        self.res.meta = {"machine": info, "loadavg_start": load, "runtime_s": a.runtime,
                         "region_bytes": size,
                         "targets": a.targets, "attach": not a.no_attach,
                         "mem_gib": a.mem_gib, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        plan = self.plan()
        prefill_needed = {(d, t) for d, t, _ in plan}
        self.progress.total = len(plan) * len(JOBS) + len(prefill_needed)
        if "pstorage" in a.targets and a.mem_gib > 0:
            self.progress.total += 1
        t_start = time.monotonic()

        if "pstorage" in a.targets:
            self.ps = PStorage(self.tmp, a.pool_size, config=self._daemon_config(),
                               problems=self.problems)
            self.ps.start()
            log(f"pstoraged pid {self.ps.pid or '?'}, log {self.ps.log_path}")
            if a.mem_gib > 0:
                memory_check(self.ps, a.mem_gib, self.progress, self.problems, self.res.memory)
        where = self.setup_targets(size)
        self.run_jobs(plan, where, size)

        if self.ps is not None and self.daemon_ok():
            try:
                self.res.stats = self.ps.cli("stats")
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                log(f"stats failed: {e}")
            self.res.meta["rss_anon_end"] = rss_anon(self.ps.pid)
        self.res.meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
        self.res.meta["loadavg_end"] = loadavg()
        if self.ps is not None:
            self.res.daemon_log = self.ps.read_log()
        report(self.res, *self.columns())
        return 1 if self.problems else 0

    def run_jobs(self, plan: list[tuple[str, str, str]], where: dict[tuple[str, str], Endpoint],
                 size: int) -> None:
        """Per data kind and path: prefill its store once, then the jobs in
        RUN_ORDER; the pool's data reduction after the last pstorage path."""
        a = self.args
        filled: dict[str, str] = {}  # store -> the data kind it holds
        last_ps = {d: i for i, (d, t, _) in enumerate(plan) if t == "pstorage"}
        for i, (data, t, kind) in enumerate(plan):
            if i > 0 and last_ps.get(plan[i - 1][0]) == i - 1:
                self.phase_stats(plan[i - 1][0])
            w = where[(t, kind)]
            label = f"{t} {kind}"
            if t == "pstorage" and not self.daemon_ok():
                self.progress.skip(len(JOBS) + (filled.get(t) != data))
                continue
            if filled.get(t) != data:
                self.progress.step(f"{label} prefill {fmt_size(size)} {data} (1M seq write)")
                r = run_fio(self.tmp, "prefill", w, "write", "1M", 8, data, size, None)
                self.res.prefills.append({"target": t, "path": kind, "data": data, **r})
                log(f"FAILED: {r['error']}" if r["error"] else
                    f"{r['bw_bytes'] / MiB:.0f} MiB/s ({r['elapsed_s']:.0f} s; "
                    f"CPU {fmt_cpu(r['cpu'])})")
                filled[t] = data
            for key in RUN_ORDER:
                job = JOB_BY_KEY[key]
                self.progress.step(f"{label} {job.label} {data}")
                r = run_fio(self.tmp, key, w, job.rw, job.bs, job.qd, data, size, a.runtime)
                self.res.results.append({"target": t, "path": kind, "job": key, "data": data, **r})
                if r["error"]:
                    log(f"FAILED: {r['error']}")
                    self.problems.append(f"{label} {job.label} {data}: {r['error']}")
                else:
                    log(f"{fmt_metric(job.metric, r)}  (p99 {fmt_us(r['clat_p99_us'])}; "
                        f"CPU {fmt_cpu(r['cpu'])})")
                if t == "pstorage" and not self.daemon_ok():
                    break
        if plan and last_ps.get(plan[-1][0]) == len(plan) - 1:
            self.phase_stats(plan[-1][0])

    def phase_stats(self, data: str) -> None:
        """Data reduction of the pool once the runs on `data` are done."""
        if self.ps is None or not self.daemon_ok():
            return
        time.sleep(2)  # an idle commit frees the segments that died
        try:
            st = self.ps.cli("stats")
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            log(f"    stats failed: {e}")
            return
        self.res.phase[data] = st
        p = st["pool"]
        log(f"    pool after the {data} runs: {pool_figures(p)}: {pool_ratios(p)}")

    def columns(self) -> tuple[list[tuple[str, str]], list[str], bool]:
        """The table's (target, path) columns, the baselines of the ratio
        columns, and whether the goals column is shown."""
        ps = "pstorage" in self.args.targets
        ratios = [b for b in BASELINES if b in self.args.targets and ps]
        return self.paths(), ratios, ps

    # ------------------------------------------------------------ cleanup
    def cleanup(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if not self.tmp:
            return
        log("\ncleaning up ...")
        if self.ps is not None:
            self.ps.stop()
        for fa in self.fuse_attachments:
            fa.stop()
        for k in self.nbdkits:
            k.stop()
        if self.ps is not None:
            self.res.daemon_log = self.ps.read_log()  # the log goes with the directory
        for m in mounts_under(self.tmp):
            subprocess.run(["fusermount3", "-u", "-z", m], capture_output=True)
        if mounts_under(self.tmp):
            log(f"  leaving {self.tmp}: still mounted there: {', '.join(mounts_under(self.tmp))}")
        elif self.args.keep:
            log(f"  kept {self.tmp} (--keep)")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        log("  done")
