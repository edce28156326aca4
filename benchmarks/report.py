"""What the benchmarks print and write: progress lines, the results table,
the memory and data-reduction lines, the JSON document. Used by bench.py
and memory.py."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .fio import DATA, JOBS
from .system import MiB, fmt_size, log

# Targets printed next to the results (PStorage through NBD):
# (job, data kind or None for both) -> (figure, goal, text)
GOALS = {
    ("randwrite-4k-qd32", None): ("iops", 10_000, ">= 10k IOPS"),
    ("randread-4k-qd32", None): ("iops", 15_000, ">= 15k IOPS"),
    ("write-128k", "mixed"): ("bw", 300 * MiB, ">= 300 MiB/s"),
}
RSS_GOAL = 256 * MiB


class Progress:
    """`[step/total] text ... ` lines; the caller ends each with its result."""

    def __init__(self, total: int = 0) -> None:
        self.done, self.total = 0, total

    def step(self, text: str) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total}] {text} ... ", end="", flush=True)

    def skip(self, n: int) -> None:
        self.done += n


def fmt_metric(metric: str, r: dict | None) -> str:
    if r is None:
        return "-"
    if r.get("error"):
        return "FAILED"
    if metric == "iops":
        v = r["iops"]
        return f"{v / 1000:.1f}k IOPS" if v >= 1000 else f"{v:.0f} IOPS"
    return f"{r['bw_bytes'] / MiB:.0f} MiB/s"


def cell(metric: str, r: dict | None) -> str:
    if r is None:
        return "-"
    if r.get("error"):
        return "FAILED"
    return f"{r['iops']:,.0f}" if metric == "iops" else f"{r['bw_bytes'] / MiB:,.0f}"


def fmt_us(us: float) -> str:
    return f"{us / 1000:.1f} ms" if us >= 1000 else f"{us:.0f} us"


def fmt_cpu(cpu: dict) -> str:
    parts = []
    for k, v in cpu.items():
        if k.endswith("_busiest_thread"):
            continue
        t = cpu.get(k + "_busiest_thread")
        parts.append(f"{k} {v:.0f}%" + (f" [1 thread {t:.0f}%]" if t is not None else ""))
    return ", ".join(parts)


def pool_figures(p: dict) -> str:
    """A pool's sizes from `pstorage --json stats`."""
    return (f"logical {fmt_size(p['logical_bytes'])}, unique {fmt_size(p['unique_bytes'])}, "
            f"stored {fmt_size(p['stored_bytes'])}, allocated {fmt_size(p['allocated_bytes'])}")


def pool_ratios(p: dict) -> str:
    return (f"dedupe {p['dedupe_ratio']}, compression {p['compression_ratio']}, "
            f"data reduction {p['data_reduction_ratio']}")


@dataclass
class Results:
    """Everything a run measured and found; the JSON document (write_json)."""
    meta: dict = field(default_factory=dict)
    results: list[dict] = field(default_factory=list)  # one per job, target, path and data
    prefills: list[dict] = field(default_factory=list)
    memory: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)  # pstorage --json stats at the end
    phase: dict[str, dict] = field(default_factory=dict)  # data kind -> stats after its runs
    problems: list[str] = field(default_factory=list)
    daemon_log: list[str] = field(default_factory=list)  # pstoraged's log lines

    def result(self, target: str, path: str, job: str, data: str) -> dict | None:
        for r in self.results:
            if (r["target"], r["path"], r["job"], r["data"]) == (target, path, job, data):
                return r
        return None

    def daemon_warnings(self) -> list[str]:
        return [ln for ln in self.daemon_log
                if " WARNING " in ln or " ERROR " in ln or "Traceback" in ln]

    def write_json(self, path: str) -> None:
        doc = {"meta": self.meta, "results": self.results, "prefill": self.prefills,
               "memory": self.memory, "stats": self.stats, "stats_after": self.phase,
               "problems": self.problems,
               "daemon_warnings": self.daemon_warnings()}
        Path(path).write_text(json.dumps(doc, indent=2) + "\n")
        log(f"wrote {path}")
        if self.problems and self.daemon_log:
            Path(path + ".pstoraged.log").write_text("\n".join(self.daemon_log) + "\n")
            log(f"wrote {path}.pstoraged.log (the daemon's log)")


def table(res: Results, cols: list[tuple[str, str]], ratios: list[str],
          with_goals: bool) -> tuple[list[str], list[list[str]]]:
    """Header and rows: a job and data kind per row, a (target, path) per
    column, then pstorage nbd / baseline nbd ratios and the goals."""
    header = ["job", "data", "unit", *[f"{t} {k}" for t, k in cols],
              *[f"ps/{b}" for b in ratios]]
    if with_goals:
        header.append("target (pstorage nbd)")
    rows = []
    for job in JOBS:
        metric = job.metric
        for data in DATA:
            row = [job.label, data, "IOPS" if metric == "iops" else "MiB/s"]
            row += [cell(metric, res.result(t, k, job.key, data)) for t, k in cols]
            ps = res.result("pstorage", "nbd", job.key, data)
            for b in ratios:
                base = res.result(b, "nbd", job.key, data)
                if ps and base and not ps["error"] and not base["error"]:
                    f = "iops" if metric == "iops" else "bw_bytes"
                    row.append(f"{ps[f] / base[f]:.2f}" if base[f] else "-")
                else:
                    row.append("-")
            goal = GOALS.get((job.key, None)) or GOALS.get((job.key, data))
            if not with_goals:
                pass
            elif goal and ps and not ps["error"]:
                f = "iops" if goal[0] == "iops" else "bw_bytes"
                row.append(f"{goal[2]}: {'yes' if ps[f] >= goal[1] else 'NO'}")
            else:
                row.append("")
            rows.append(row)
    return header, rows


def report(res: Results, cols: list[tuple[str, str]], ratios: list[str], with_goals: bool) -> None:
    """The end of a run: the table, prefills, memory, data reduction, warnings, problems."""
    header, rows = table(res, cols, ratios, with_goals)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    right = set(range(3, 3 + len(cols) + len(ratios)))

    def line(r: list[str]) -> str:
        return "  ".join(str(x).rjust(w) if i in right else str(x).ljust(w)
                         for i, (x, w) in enumerate(zip(r, widths, strict=True))).rstrip()

    log("\nresults (nbd = fio nbd engine on the unix socket; dev = the attached block "
        "device, libaio direct=1" + (";\nps/X = pstorage nbd / X nbd)\n" if ratios else ")\n"))
    log(line(header))
    log(line(["-" * w for w in widths]))
    for r in rows:
        log(line(r))
    if res.prefills:
        log("\nprefill (1M seq write QD8 over the region): " + ", ".join(
            f"{p['target']} {p['path']} {p['data']} "
            + ("FAILED" if p["error"] else f"{p['bw_bytes'] / MiB:.0f} MiB/s")
            for p in res.prefills))
    m = res.memory
    if m:
        rb, ra = m.get("rss_anon_before"), m.get("rss_anon_after")
        log(f"\nmemory: pstoraged RssAnon {fmt_size(rb or 0)} before, {fmt_size(ra or 0)} after "
            f"writing {fmt_size(m['written_bytes'])} of unique data "
            f"(target < {fmt_size(RSS_GOAL)}: {'yes' if ra and ra < RSS_GOAL else 'NO'})")
        if m.get("nbdkit_plugin_rss_anon"):
            log(f"        nbdkit (pstorage plugin) RssAnon {fmt_size(m['nbdkit_plugin_rss_anon'])}")
    for data, st in res.phase.items():
        p = st["pool"]
        log(f"\npool after the {data} runs (pstorage --json stats): {pool_figures(p)}; "
            f"{pool_ratios(p)}")
    if res.stats and not res.phase:
        p = res.stats["pool"]
        log(f"\nreduction at the end (pstorage --json stats): pool {pool_figures(p)}; "
            f"{pool_ratios(p)}")
    if res.meta.get("rss_anon_end"):
        log(f"pstoraged RssAnon at the end of the run: {fmt_size(res.meta['rss_anon_end'])}")
    log(f"\nelapsed {res.meta['elapsed_s'] / 60:.1f} min")
    warn = res.daemon_warnings()
    if warn:
        log(f"\npstoraged logged {len(warn)} warnings/errors; the last ones:")
        for w in warn[-10:]:
            log("  " + w)
    if res.problems:
        log("\nproblems:")
        for pr in res.problems:
            log("  - " + pr)
