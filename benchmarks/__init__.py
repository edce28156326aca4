"""fio benchmarks of PStorage against nbdkit baselines (docs/benchmarks.md).

Run by `scripts/bench`, which starts the repository's .venv python on
`benchmarks.cli`. Modules, from the bottom up:

  system   processes, /proc figures (CPU, RssAnon), machine description
  fio      the job definitions and one fio run, parsed
  targets  what fio runs against: a private pstoraged, baseline nbdkits,
           nbdfuse + loop devices; each with start and stop
  memory   the memory check (RssAnon before and after unique data)
  report   progress lines, the results table, the JSON document
  bench    the run: plan, prefills, jobs, cleanup
  space    `scripts/bench --space`: snapshot creation time, GC write amplification
  cli      options and the entry point
"""
