"""pstorage: the command-line client of pstoraged."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any

from ..engine.units import human_bytes, parse_size
from ..errors import CheckProblems, InvalidArgument, PoolLocked, PStorageError
from .client import Client


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*map(str, r)).rstrip() for r in [header, *rows])


def _ratio(x: float | None) -> str:
    return f"{x:.2f}:1" if x else "-"


def _emit(args: argparse.Namespace, data: Any, human: str) -> None:
    print(json.dumps(data, indent=2) if args.json else human)


def _state(v: dict) -> str:
    """ready, or the background copy running into it: "restoring 45%", "filling 3%"."""
    state = v.get("state", "ready")
    return state if state == "ready" else f"{state} {100 * v['progress']:.0f}%"


def _vol_rows(vols: list[dict]) -> list[list[str]]:
    return [[
        v["name"], human_bytes(v["size"]), human_bytes(v["logical_bytes"]), v["compression"],
        _state(v), v["device"] or ("exported" if v["uri"] else "-"),
        datetime.fromtimestamp(v["created"]).strftime("%Y-%m-%d %H:%M"),
    ] for v in vols]


VOL_HEADER = ["NAME", "SIZE", "USED", "COMPRESSION", "STATE", "ATTACHED", "CREATED"]


def cmd_pool_create(args: argparse.Namespace) -> None:
    from ..engine.devices import describe
    from ..engine.pool import create_pool

    sb = create_pool(args.dir, args.device, file_size=parse_size(args.size) if args.size else None,
                     segment_size=parse_size(args.segment_size), force=args.force,
                     label=args.label, meta_size=parse_size(args.meta_size) if args.meta_size else None)
    dev = describe(args.device)
    data = {"uuid": sb.uuid.hex(), "label": sb.label, "device": args.device,
            "metadata_bytes": sb.meta_size, "segments": sb.segment_count,
            "segment_size": sb.segment_size, "capacity": sb.segment_count * sb.segment_size,
            "kind": dev.kind, "model": dev.model, "rotational": dev.rotational,
            "logical_block_size": dev.logical_block_size,
            "physical_block_size": dev.physical_block_size}
    what = dev.kind if dev.kind == "file" else (
        f"{dev.model or 'block device'}, {'rotational' if dev.rotational else 'non-rotational'}, "
        f"{dev.logical_block_size}/{dev.physical_block_size} B sectors, O_DIRECT")
    _emit(args, data, f"created pool {sb.uuid.hex()}{f' ({sb.label})' if sb.label else ''} "
          f"on {args.device} ({what}): {sb.segment_count} segments of "
          f"{human_bytes(sb.segment_size)} ({human_bytes(data['capacity'])}) and a metadata "
          f"region of {human_bytes(sb.meta_size)}")


def _pool_row(f: Any, state: str) -> list[str]:
    return [f.uuid, f.sb.label or "-", f.path, human_bytes(f.sb.device_size),
            f"format {f.sb.version}", state]


def cmd_pool_import(args: argparse.Namespace) -> None:
    """Without a name: the pools on this host's devices (or --device paths).
    With one: open it here, whatever its device is called now."""
    from ..engine import discovery
    from ..engine.pool import import_pool, pool_state

    search = args.device or None
    if not args.name:
        found = discovery.scan(search)
        rows = [_pool_row(f, pool_state(f)) for f in found]
        _emit(args, [{"uuid": f.uuid, "label": f.sb.label, "device": f.path,
                      "device_size": f.sb.device_size, "format": f.sb.version,
                      "state": r[-1]} for f, r in zip(found, rows, strict=True)],
              table(rows, ["UUID", "LABEL", "DEVICE", "SIZE", "FORMAT", "STATE"]) if rows
              else "no pools found" + (f" on {', '.join(search)}" if search else
                                       " on this host's block devices (files: --device PATH)"))
        return
    pool = import_pool(args.dir, args.name, search=search, force=args.force)
    sb, dev = pool.sb, pool.backing.path
    pool.close()
    _emit(args, {"uuid": sb.uuid.hex(), "label": sb.label, "device": dev, "directory": args.dir},
          f"imported pool {sb.uuid.hex()}{f' ({sb.label})' if sb.label else ''} from {dev}; "
          f"start pstoraged with --pool-dir {args.dir} (or pool = \"{sb.uuid.hex()}\" in its "
          "config)")


def cmd_pool_upgrade(args: argparse.Namespace) -> None:
    """Move a format-1 pool's metadata from the host onto its device."""
    from ..engine.pool import upgrade_pool

    sb = upgrade_pool(args.dir, meta_size=parse_size(args.meta_size) if args.meta_size else None)
    _emit(args, {"uuid": sb.uuid.hex(), "format": sb.version, "metadata_offset": sb.meta_offset,
                 "metadata_bytes": sb.meta_size, "segments": sb.segment_count},
          f"pool {sb.uuid.hex()} keeps its metadata on its device now: a "
          f"{human_bytes(sb.meta_size)} region at byte {sb.meta_offset}; {sb.segment_count} "
          f"segments ({human_bytes(sb.segment_count * sb.segment_size)})")


def cmd_pool_export(args: argparse.Namespace) -> None:
    """Close the pool cleanly for moving its device to another host."""
    from ..engine.pool import export_pool, open_pool

    pool = open_pool(args.dir)
    uid, dev = pool.sb.uuid.hex(), pool.backing.path
    export_pool(pool)
    _emit(args, {"uuid": uid, "device": dev, "state": "exported"},
          f"exported pool {uid} on {dev}: it may be moved now and imported on any host "
          "('pstorage pool import')")


def cmd_devices(args: argparse.Namespace) -> None:
    """Candidate backing devices (local: works without the daemon)."""
    from dataclasses import asdict

    from ..engine.devices import list_candidates

    devs = list_candidates()

    def state(d) -> str:  # type: ignore[no-untyped-def]
        if d.in_use:  # 'pool create' refuses these, even with --force
            return "in use: " + "; ".join(d.in_use)
        if d.signatures:
            return "has data: " + ",".join(d.signatures)
        return "free"

    rows = [[d.path, human_bytes(d.size_bytes), "nvme" if d.is_nvme else ("loop" if d.is_loop
             else "disk"), d.model or "-",
             "-" if d.rotational is None else ("hdd" if d.rotational else "ssd"),
             f"{d.logical_block_size}/{d.physical_block_size}", state(d)] for d in devs]
    _emit(args, [asdict(d) for d in devs],
          table(rows, ["DEVICE", "SIZE", "TYPE", "MODEL", "MEDIA", "SECTORS", "STATUS"])
          if rows else "no block devices found")


def cmd_pool_show(args: argparse.Namespace, c: Client) -> None:
    p = c.get("/api/v1/pool")
    s = p["statistics"]
    rows = [
        ["uuid", p["uuid"]], ["label", p.get("label") or "-"], ["device", p["device"]],
        ["directory", p["directory"]], ["metadata", _metadata_line(p["metadata"])],
        ["capacity", human_bytes(s["capacity_bytes"])], ["allocated", human_bytes(s["allocated_bytes"])],
        ["free", human_bytes(s["free_bytes"])], ["volumes", s["volumes"]],
        ["segments", f"{p['segments']['total']} x {human_bytes(p['segment_size'])}"],
        ["checksum errors", s["checksum_errors"]],
    ]
    gone = p["destroyed"]
    objs = [[x["name"], "volume", human_bytes(x["reclaimable_bytes"]), _time(x["eradicate_after"])]
            for x in gone["volumes"]]
    objs += [[f"{x['volume']}@{x['name']}", "snapshot", human_bytes(x["reclaimable_bytes"]),
              _time(x["eradicate_after"])] for x in gone["snapshots"]]
    rows.append(["destroyed", f"{len(gone['volumes'])} volumes, {len(gone['snapshots'])} snapshots"
                 + (f", holding {human_bytes(gone['reclaimable_bytes'])} until eradicated"
                    if objs else "")])
    human = table(rows, ["POOL", ""])
    if objs:
        human += ("\n\n" + table(objs, ["DESTROYED", "KIND", "FREED ON ERADICATE", "ERADICATED AT"])
                  + "\n\nrecoverable until eradicated; 'pstorage volume eradicate NAME' frees a "
                  "volume now")
    _emit(args, p, human)


def _metadata_line(m: dict[str, Any]) -> str:
    if m["where"] == "host":
        return f"on this host in {m['path']} (format 1), {human_bytes(m['used_bytes'])} used"
    pct = 100 * m["used_bytes"] / m["size"] if m["size"] else 0
    return (f"on the device, {human_bytes(m['used_bytes'])} of {human_bytes(m['size'])} "
            f"used ({pct:.0f}%)" + (" FULL: new data is refused" if m["full"] else ""))


def cmd_volume_create(args: argparse.Namespace, c: Client) -> None:
    v = c.post("/api/v1/volumes", {"name": args.name, "size": parse_size(args.size),
                                   "compression": args.compression})
    _emit(args, v, f"created volume {v['name']} ({human_bytes(v['size'])}, {v['compression']})")


def cmd_volume_list(args: argparse.Namespace, c: Client) -> None:
    vols = c.get("/api/v1/volumes" + ("?destroyed=true" if args.destroyed else ""))["volumes"]
    _emit(args, vols, table(_vol_rows(vols), VOL_HEADER) if vols else "no volumes")


def cmd_volume_show(args: argparse.Namespace, c: Client) -> None:
    v = c.get(f"/api/v1/volumes/{args.name}")
    rows = [[k, v[k]] for k in ("name", "size", "compression", "readonly", "exported", "uri",
                                "tcp", "attached", "device", "device_size")]
    rows.append(["state", _state(v)])
    rows += [[k, x] for k, x in v["stats"].items()]
    _emit(args, v, table(rows, ["VOLUME", v["name"]]))


def cmd_volume_resize(args: argparse.Namespace, c: Client) -> None:
    v = c.request("PATCH", f"/api/v1/volumes/{args.name}",
                  {"size": parse_size(args.size), "shrink": args.shrink, "force": args.force})
    text = f"volume {v['name']} is now {human_bytes(v['size'])}"
    if v.get("device") and v.get("device_size") == v["size"]:
        text += (f"; {v['device']} too: grow its file system "
                 f"(xfs_growfs MOUNTPOINT, resize2fs {v['device']})")
    for note in v.get("notices", []):
        print(f"pstorage: note: {note}", file=sys.stderr)
    _emit(args, v, text)


def cmd_volume_delete(args: argparse.Namespace, c: Client) -> None:
    q = "?force=1" if args.force else ""
    out = c.request("DELETE", f"/api/v1/volumes/{args.name}{q}")
    when = out.get("eradicate_after")
    if when is None:  # no grace period configured
        human = (f"deleted volume {args.name}: eradicated at once, its space comes back in the "
                 "background")
    else:
        human = (f"destroyed volume {args.name}: recoverable for {out['recoverable_hours']:g} h, "
                 f"until {_time(when)} (pstorage volume recover {args.name}); it keeps its space "
                 f"until then, when it is eradicated (or now: pstorage volume eradicate {args.name})")
    _emit(args, out, human)


def _time(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M") if t else "-"


def cmd_volume_recover(args: argparse.Namespace, c: Client) -> None:
    v = c.post(f"/api/v1/volumes/{args.name}/recover")
    _emit(args, v, f"recovered volume {args.name}")


def cmd_volume_eradicate(args: argparse.Namespace, c: Client) -> None:
    _emit(args, c.post(f"/api/v1/volumes/{args.name}/eradicate"),
          f"eradicated volume {args.name}: its space comes back in the background")


def _snapref(ref: str, snap: str | None = None) -> tuple[str, str]:
    """'VOL@SNAP', or VOL and SNAP as two arguments."""
    if snap is None:
        vol, at, snap = ref.partition("@")
        if not at or not snap:
            raise InvalidArgument(f"{ref!r} does not name a snapshot", "write VOLUME@SNAPSHOT")
        return vol, snap
    return ref, snap


def _poll(args: argparse.Namespace, item: dict, fetch: Callable[[], dict],
          running: Callable[[dict], bool], line: Callable[[dict], str],
          last: Callable[[dict], str] = lambda _: "") -> dict:
    """Fetch `item` again every 0.5 s while running(item); on a tty, line(item)
    shows the progress on stderr and last(item) ends it."""
    import time

    tty = not args.json and sys.stderr.isatty()
    while running(item):
        if tty:
            print("\r" + line(item), end="", file=sys.stderr, flush=True)
        time.sleep(0.5)
        item = fetch()
    if tty:
        print(last(item), file=sys.stderr)
    return item


def _follow_copy(args: argparse.Namespace, c: Client, name: str, what: str) -> dict:
    """Poll a volume until its background restore or fill is done."""
    def fetch() -> dict:
        return c.get(f"/api/v1/volumes/{name}")

    return _poll(args, fetch(), fetch, lambda v: v["state"] != "ready",
                 lambda v: f"{what} {name}: {100 * v['progress']:.0f}%",
                 lambda v: f"\r{what} {name}: done")


def cmd_volume_clone(args: argparse.Namespace, c: Client) -> None:
    vol, snap = _snapref(args.snapshot)
    v = c.post(f"/api/v1/volumes/{vol}/snapshots/{snap}/clone?wait=false", {"name": args.new})
    if args.no_wait:
        _emit(args, v, f"creating volume {v['name']} from {vol}@{snap}: it is being filled "
              f"in the background; 'pstorage volume show {v['name']}' shows the progress")
        return
    v = _follow_copy(args, c, v["name"], "filling")
    _emit(args, v, f"created volume {v['name']} from {vol}@{snap} "
          f"({human_bytes(v['logical_bytes'])} shared, nothing copied)")


def cmd_volume_space(args: argparse.Namespace, c: Client) -> None:
    r = c.get(f"/api/v1/volumes/{args.name}/space")

    def row(name: str, x: dict) -> list[str]:
        return [name, *(human_bytes(x[k]) for k in ("logical_bytes", "unique_bytes", "shared_bytes")),
                x["state"], _time(x["eradicate_after"]) if x["eradicate_after"] else "-"]

    v = r["volume"]
    rows = [row(f"{args.name} ({'live' if v['state'] == 'live' else 'volume'})", v)]
    rows += [row(f"{args.name}@{n}", x) for n, x in sorted(r["snapshots"].items())]
    human = table(rows, ["", "LOGICAL", "UNIQUE", "SHARED", "STATE", "ERADICATED AT"])
    gone = r["destroyed_snapshots"]
    if v["state"] == "destroyed":
        human += (f"\n\n{args.name} is destroyed: eradicating it frees "
                  f"{human_bytes(v['reclaimable_bytes'])} (pstorage volume eradicate {args.name})")
    elif gone["count"]:
        human += (f"\n\ndestroyed snapshots: {gone['count']}; eradicating them frees "
                  f"{human_bytes(gone['reclaimable_bytes'])} (they are eradicated at the time shown)")
    human += "\nUNIQUE: physical bytes only it holds (freed if it went); SHARED: held with others"
    _emit(args, r, human)


def _snap_rows(snaps: list[dict]) -> list[list[str]]:
    return [[
        f"{x['volume']}@{x['name']}", human_bytes(x["size"]), _time(x["created"]),
        _time(x["lock_until"]) if x["locked"] else "-",
        human_bytes(x["space"]["unique_bytes"]) if x.get("space") else "-",
        "destroyed" if x["destroyed"] else (x.get("device") or ("exported" if x.get("uri")
                                                                 else "-")),
    ] for x in snaps]


def cmd_snapshot_create(args: argparse.Namespace, c: Client) -> None:
    body = {"name": args.snapshot, "lock_until": args.lock_until}
    x = c.post(f"/api/v1/volumes/{args.volume}/snapshots", body)
    _emit(args, x, f"created snapshot {x['volume']}@{x['name']}" + (
        f", locked until {_time(x['lock_until'])}" if x["locked"] else ""))


def cmd_snapshot_list(args: argparse.Namespace, c: Client) -> None:
    q = "?destroyed=true" if args.destroyed else ""
    if args.volume:
        snaps = c.get(f"/api/v1/volumes/{args.volume}/snapshots{q}")["snapshots"]
    else:
        snaps = c.get(f"/api/v1/snapshots{q}")["snapshots"]
    _emit(args, snaps, table(_snap_rows(snaps), ["SNAPSHOT", "SIZE", "CREATED", "LOCKED UNTIL",
                                                 "UNIQUE", "STATE"]) if snaps else "no snapshots")


def cmd_snapshot_delete(args: argparse.Namespace, c: Client) -> None:
    vol, snap = _snapref(args.ref, args.snap)
    x = c.delete(f"/api/v1/volumes/{vol}/snapshots/{snap}")
    _emit(args, x, f"destroyed snapshot {vol}@{snap}; recover it with "
          f"'pstorage snapshot recover {vol}@{snap}' until it is eradicated")


def cmd_snapshot_recover(args: argparse.Namespace, c: Client) -> None:
    vol, snap = _snapref(args.ref, args.snap)
    _emit(args, c.post(f"/api/v1/volumes/{vol}/snapshots/{snap}/recover"),
          f"recovered snapshot {vol}@{snap}")


def cmd_snapshot_restore(args: argparse.Namespace, c: Client) -> None:
    vol, snap = _snapref(args.ref, args.snap)
    q = "?wait=false" + ("&force=true" if args.force else "")
    r = c.post(f"/api/v1/volumes/{vol}/snapshots/{snap}/restore{q}")
    if args.no_wait:
        _emit(args, r, f"restoring {vol} from {vol}@{snap} in the background; "
              f"'pstorage volume show {vol}' shows the progress")
        return
    if r["state"] != "ready":
        _follow_copy(args, c, vol, "restoring")
        r = c.get(f"/api/v1/volumes/{vol}/snapshots/{snap}/restore")
    _emit(args, r, f"restored {vol} from {vol}@{snap} ({r['blocks_changed']} blocks changed)")


def cmd_snapshot_eradicate(args: argparse.Namespace, c: Client) -> None:
    vol, snap = _snapref(args.ref, args.snap)
    _emit(args, c.post(f"/api/v1/volumes/{vol}/snapshots/{snap}/eradicate"),
          f"eradicated snapshot {vol}@{snap}")


def cmd_snapshot_lock(args: argparse.Namespace, c: Client) -> None:
    vol, snap = _snapref(args.ref, args.snap)
    x = c.patch(f"/api/v1/volumes/{vol}/snapshots/{snap}", {"lock_until": args.until})
    _emit(args, x, f"{vol}@{snap} is locked until {_time(x['lock_until'])}")


def cmd_snapshot_export(args: argparse.Namespace, c: Client) -> None:
    vol, snap = _snapref(args.ref, args.snap)
    x = c.post(f"/api/v1/volumes/{vol}/snapshots/{snap}/export")
    _emit(args, x, x["uri"])


def cmd_snapshot_diff(args: argparse.Namespace, c: Client) -> None:
    vol, a = _snapref(args.a)
    q = f"?from={a}"
    if args.b:
        vol_b, b = _snapref(args.b)
        if vol_b != vol:
            raise InvalidArgument("a diff compares two snapshots of one volume")
        q += f"&to={b}"
    r = c.get(f"/api/v1/volumes/{vol}/diff{q}")
    rows = [[str(x["offset"]), str(x["length"])] for x in r["ranges"]]
    human = table(rows, ["OFFSET", "LENGTH"]) if rows else "no changes"
    human += f"\n\n{human_bytes(r['changed_bytes'])} changed in {len(rows)} ranges"
    _emit(args, r, human)


def cmd_export(args: argparse.Namespace, c: Client) -> None:
    body = {"tcp": args.tcp, "readonly": args.readonly,
            "tls_psk_file": os.path.abspath(args.tls_psk) if args.tls_psk else None,
            "tls_certificates": os.path.abspath(args.tls_certificates) if args.tls_certificates
            else None,
            "allow": args.allow.split(",") if args.allow else None}
    v = c.post(f"/api/v1/volumes/{args.name}/export", body)
    scheme = "nbds" if v.get("tls") else "nbd"
    text = v["uri"] + (f"\n{scheme}://{v['tcp']}/{args.name}" if v["tcp"] else "")
    if v["tcp"] and not v.get("tls"):
        print(f"pstorage: warning: {v['tcp']} serves {args.name} without TLS; anyone who can "
              "reach it can read and write it (use --tls-psk FILE)", file=sys.stderr)
    _emit(args, v, text)


def _target(name: str) -> str:
    """The API path of a volume, or of a snapshot given as VOL@SNAP."""
    if "@" in name:
        vol, snap = _snapref(name)
        return f"/api/v1/volumes/{vol}/snapshots/{snap}"
    return f"/api/v1/volumes/{name}"


def cmd_unexport(args: argparse.Namespace, c: Client) -> None:
    out = c.request("DELETE", f"{_target(args.name)}/export" + ("?force=1" if args.force else ""))
    _emit(args, out, f"stopped exporting {args.name}")


def cmd_attach(args: argparse.Namespace, c: Client) -> None:
    v = c.post(f"{_target(args.name)}/attach")
    _emit(args, v, v["device"])


def cmd_detach(args: argparse.Namespace, c: Client) -> None:
    out = c.request("DELETE", f"{_target(args.name)}/attach" + ("?force=1" if args.force else ""))
    _emit(args, out, f"detached {args.name}")


STATS_HELP = """\
Two tables. The first shows the data held now, with the same definitions
for the pool row and the volume rows (a volume's UNIQUE and STORED are its
share of the pool's: each chunk split evenly over the references to it, so
the rows below the pool add up to it):

  LOGICAL    data held: non-zero 4 KiB blocks the volumes (or the volume) read
  UNIQUE     LOGICAL after dedupe: one copy of each distinct block
  STORED     what UNIQUE takes in segments after compression (headers included)
  EXCLUSIVE  stored bytes only this volume's live data references (trimming it
             all frees them)
  SHARED     stored bytes of chunks it references that other volumes, clones or
             its snapshots reference too (each counted whole)
  DEDUPE     LOGICAL / UNIQUE
  COMPRESS   UNIQUE / STORED
  REDUCTION  LOGICAL / STORED (zeros are not data: they take no space at all)

  (snapshots)  stored bytes held only by snapshots (data since overwritten)
  (destroyed)  stored bytes of destroyed volumes, until they are eradicated
  (released)   map entries being released in the background (eradicated
               volumes, deleted snapshots)

The second table shows the ingest counters: what was written since each
volume was created. They only grow (overwrites, trims and restores do not
lower them):

  WRITTEN    bytes written (read-modify-write edges, zeros and overwrites included)
  ZEROS      all-zero blocks written: stored as nothing
  DEDUPED    blocks written that were already in the pool
  NEW        blocks written that became new chunks
  NEW STORED what the new chunks took in segments
  RATIO      WRITTEN / NEW STORED

The volume rows come from a walk of the volumes' maps (in the daemon, off
its I/O thread), reused for up to --max-age seconds while data changes.
docs/analytics.md explains every figure."""


def cmd_stats(args: argparse.Namespace, c: Client) -> None:
    r = c.get(f"/api/v1/metrics/reduction?max_age={args.max_age:g}")
    p = r["pool"]

    def row(name: str, x: dict) -> list[str]:
        return [name, *(human_bytes(x[k]) for k in ("logical_bytes", "unique_bytes", "stored_bytes")),
                *(human_bytes(x[k]) if k in x else "-" for k in ("exclusive_bytes", "shared_bytes")),
                _ratio(x["dedupe_ratio"]), _ratio(x["compression_ratio"]),
                _ratio(x["data_reduction_ratio"])]

    rows = [row("(pool)", p)] + [row(n, v) for n, v in r["volumes"].items()]
    for k in ("snapshots", "destroyed", "released"):
        held = p["stored_by"]["destroyed_volumes" if k == "destroyed" else k]
        if held:
            rows.append([f"({k})", "-", "-", human_bytes(held), "-", "-", "-", "-", "-"])
    human = table(rows, ["VOLUME", "LOGICAL", "UNIQUE", "STORED", "EXCLUSIVE", "SHARED",
                         "DEDUPE", "COMPRESS", "REDUCTION"])
    human += (f"\n\npool: {human_bytes(p['logical_bytes'])} logical in "
              f"{human_bytes(p['stored_bytes'])} stored, data reduction "
              f"{_ratio(p['data_reduction_ratio'])}, total efficiency {_ratio(p['total_efficiency'])}"
              f" (with thin provisioning of {human_bytes(p['provisioned_bytes'])})")
    ing = [[n, *(human_bytes(v["ingest"][k]) for k in ("written_bytes", "zero_bytes", "dedupe_bytes",
                                                        "new_chunk_bytes", "new_chunk_stored_bytes")),
            _ratio(v["ingest"]["reduction_ratio"])] for n, v in r["volumes"].items()]
    if ing:
        human += "\n\ningest since each volume was created (cumulative, never goes down):\n"
        human += table(ing, ["VOLUME", "WRITTEN", "ZEROS", "DEDUPED", "NEW", "NEW STORED", "RATIO"])
    human += (f"\n\nvolume rows as of {datetime.fromtimestamp(r['as_of']).strftime('%H:%M:%S')}"
              + ("" if r["exact"] else "; EXCLUSIVE is a lower bound (too many shared chunks "
                 "to count exactly)") + "; 'pstorage stats --help' explains each column")
    _emit(args, r, human)


def _days(x: float | None) -> str:
    return "-" if x is None else ("now" if x <= 0 else f"{x:.1f} d")


def cmd_forecast(args: argparse.Namespace, c: Client) -> None:
    r = c.get(f"/api/v1/analytics/capacity/forecast?horizons={args.horizons}&history=true")
    from ..analytics.charts import terminal_chart, write_png
    from ..analytics.forecast import Forecast

    fc = Forecast.from_dict(r)
    times = [h[0] for h in r.get("history", [])]
    used = [h[1] for h in r.get("history", [])]
    if args.png:
        write_png(args.png, times, used, r["capacity_bytes"], fc)
    if args.json:
        return _emit(args, r, "")
    import shutil

    width = min(120, max(60, shutil.get_terminal_size((80, 24)).columns - 1))
    lines = [terminal_chart(times, used, r["capacity_bytes"], fc, width=width), ""]
    if r["status"] != "ok":
        lines.append(r["message"])
    else:
        rows = [[f"{h['days']:g} d", human_bytes(h["used_bytes"]),
                 f"{human_bytes(h['lower_bytes'])} - {human_bytes(h['upper_bytes'])}",
                 f"{100 * h['used_fraction']:.1f}%"] for h in r["horizons"]]
        lines.append(table(rows, ["HORIZON", "USED", f"{r['interval']:.0%} INTERVAL", "FULL"]))
        du = r["days_until"]
        lines.append(f"\nfull to 80%: {_days(du.get('80'))}, 90%: {_days(du.get('90'))}, "
                     f"100%: {_days(du.get('100'))}")
        won = next((m for m in r["methods"] if m["chosen"]), None)
        lines.append(f"method: {r['method']}" + (
            f", backtest error {human_bytes(won['mae_bytes'])}" if won and won["mae_bytes"] else "")
            + f"\n  {r['reason']}")
    m = r.get("metadata")
    if m is not None:
        lines.append("\nmetadata region: " + _metadata_outlook(m))
    if args.png:
        lines.append(f"wrote {args.png}")
    print("\n".join(lines))


def _metadata_outlook(m: dict[str, Any]) -> str:
    used = m.get("current_used_bytes")
    head = (f"{human_bytes(used)} of {human_bytes(m['capacity_bytes'])} used"
            if used is not None else f"{human_bytes(m['capacity_bytes'])}")
    if m["status"] != "ok":
        return f"{head}; {m['message']}"
    du = m["days_until"]
    last = m["horizons"][-1] if m["horizons"] else None
    return (f"{head}; " + (f"{last['days']:g} d: {100 * last['used_fraction']:.1f}%, "
                           if last else "") + f"full: {_days(du.get('100'))}")


def cmd_health(args: argparse.Namespace, c: Client) -> None:
    r = c.get("/api/v1/analytics/health")
    d, e = r["device"], r["engine"]
    rows = [["status", r["status"].upper()], *[["reason", x] for x in r["reasons"]],
            ["device", f"{d['path']} ({d['kind']}{', ' + d['model'] if d.get('model') else ''})"]]
    for k in ("percentage_used", "media_errors", "critical_warning", "temperature_c",
              "available_spare", "power_on_hours"):
        rows.append([k, d[k] if d.get(k) is not None else "n/a"])
    rows += [["checksum errors", e["checksum_errors"]], ["I/O errors", e["io_errors"]],
             ["erase count min/max", f"{r['segments']['erase_min']}/{r['segments']['erase_max']}"],
             ["free", f"{100 * e['free_fraction']:.1f}%"]]
    human = table([[str(a), str(b)] for a, b in rows], ["HEALTH", ""])
    if r["unavailable"]:
        human += "\n\nunavailable: " + "; ".join(
            f"{k} ({v})" for k, v in sorted(r["unavailable"].items())[:6])
        if len(r["unavailable"]) > 6:
            human += f"; and {len(r['unavailable']) - 6} more (--json lists all)"
    _emit(args, r, human)


def cmd_temperature(args: argparse.Namespace, c: Client) -> None:
    q = ""
    if args.thresholds:
        h, w, cd = args.thresholds.split(",")
        q = f"?hot_days={h}&warm_days={w}&cold_days={cd}"
    r = c.get("/api/v1/analytics/temperature" + q)
    rows = [[v["volume"], human_bytes(v["logical_bytes"]),
             *[human_bytes(v["classes"][k]["bytes"]) for k in ("hot", "warm", "cold", "frozen")],
             human_bytes(v["untracked_bytes"])] for v in r["volumes"]]
    th = r["thresholds_days"]
    human = table(rows, ["VOLUME", "DATA", "HOT", "WARM", "COLD", "FROZEN", "UNTRACKED"]) \
        if rows else "no volumes"
    human += (f"\n\nhot: accessed within {th['hot_days']:g} d, warm: {th['warm_days']:g} d, "
              f"cold: {th['cold_days']:g} d, frozen: longer ago")
    _emit(args, r, human)


def cmd_tiering_list(args: argparse.Namespace, c: Client) -> None:
    r = c.get("/api/v1/analytics/tiering/recommendations")
    def saves(n: int) -> str:  # a negative saving is a cost (no-reduction)
        return human_bytes(n) if n >= 0 else f"costs ~{human_bytes(-n)}"

    rows = [[x["id"], saves(x["estimated_savings_bytes"]),
             "yes" if x["applicable"] else "no", x["summary"]] for x in r["recommendations"]]
    human = table(rows, ["ID", "SAVES", "APPLY", "WHAT"]) if rows else "no recommendations"
    for x in r["recommendations"]:
        human += f"\n\n{x['id']}:\n  why: {x['reason']}\n  estimate: {x['estimate']}\n  apply: {x['action']}"
    for n in r["notes"]:
        human += f"\n\nnote: {n}"
    _emit(args, r, human)


def _job_line(j: dict) -> str:
    if j["kind"] == "scrub":
        return (f"job {j['id']} scrub: {j['state']}, {100 * j['progress']:.0f}% "
                f"({j['chunks_checked']}/{j['chunks_total']} chunks, "
                f"{human_bytes(j['bytes_checked'])} checked, {j['bad_chunks']} bad)")
    return (f"job {j['id']} {j['kind']} {j['volume']}: {j['state']}, {100 * j['progress']:.0f}% "
            f"({j['extents_done']}/{j['extents_total']} extents, {j['chunks_rewritten']} chunks "
            f"rewritten, {human_bytes(j['saved_bytes'])} saved)")


def cmd_tiering_apply(args: argparse.Namespace, c: Client) -> None:

    r = c.post(f"/api/v1/analytics/tiering/recommendations/{args.id}/apply")
    job = r.get("job")
    if job and args.wait:
        job = r["job"] = _follow(args, c, job)
        if job["state"] == "failed":
            raise PStorageError(f"job {job['id']} failed: {job['error']}", "see the daemon log")
    _emit(args, r, _job_line(job) if job else f"applied {args.id}")


def _follow(args: argparse.Namespace, c: Client, job: dict) -> dict:
    return _poll(args, job, lambda: c.get(f"/api/v1/jobs/{job['id']}"),
                 lambda j: j["state"] == "running", _job_line)


def cmd_scrub(args: argparse.Namespace, c: Client) -> None:
    job = c.post("/api/v1/scrub")["job"]
    if args.wait:
        job = _follow(args, c, job)
    human = _job_line(job)
    for b in job.get("bad", []):
        human += f"\n  chunk {b['chunk']} at segment {b['segment']} offset {b['offset']}: {b['problem']}"
    _emit(args, job, human)
    if args.wait and job["bad_chunks"]:
        raise PStorageError(f"scrub found {job['bad_chunks']} bad chunks",
                            "the volumes using them return EIO for those blocks; restore them "
                            "from a snapshot, a replica or a backup")


GC_COUNTERS = ("segments_cleaned", "chunks_moved", "bytes_moved", "wear_segments_cleaned",
               "wear_chunks_moved", "wear_bytes_moved", "user_bytes")


def _gc_line(x: dict, before: dict | None = None) -> str:
    """The cleaner's state; with `before`, the work done since then rather than
    its lifetime totals (which the API reports)."""
    now = (f"{x['free_segments']} free segments, {100 * x['dead_fraction']:.0f}% of sealed "
           "space dead")
    if before is not None:
        d = {k: x[k] - before[k] for k in GC_COUNTERS}
        wear = (f", wear leveling {d['wear_segments_cleaned']} segments "
                f"({human_bytes(d['wear_bytes_moved'])})" if d["wear_segments_cleaned"] else "")
        return (f"cleaner, since this request: {d['segments_cleaned']} segments cleaned, "
                f"{human_bytes(d['bytes_moved'])} moved ({d['chunks_moved']} chunks){wear}; "
                f"now {now}" + (", pass pending" if x["requested"] else ""))
    wa = x["write_amplification"]
    return (f"cleaner (totals over the pool's life): {x['segments_cleaned']} segments cleaned, "
            f"{human_bytes(x['bytes_moved'])} moved, write amplification "
            f"{f'{wa:.2f}' if wa else '-'}; now {now}"
            + (", pass requested" if x["requested"] else ""))


def cmd_gc(args: argparse.Namespace, c: Client) -> None:
    x = c.post("/api/v1/gc")["cleaner"]
    if not args.wait:
        return _emit(args, x, _gc_line(x))
    before = x
    x = _poll(args, x, lambda: c.get("/api/v1/pool")["cleaner"],
              lambda x: x["requested"] or x["victim"] is not None, lambda x: _gc_line(x, before))
    run = {k: x[k] - before[k] for k in GC_COUNTERS}
    _emit(args, {"this_run": run, "cleaner": x}, _gc_line(x, before))


def cmd_jobs(args: argparse.Namespace, c: Client) -> None:
    if args.id is not None:
        j = c.get(f"/api/v1/jobs/{args.id}")
        return _emit(args, j, _job_line(j))
    jobs = c.get("/api/v1/jobs")["jobs"]
    _emit(args, jobs, "\n".join(_job_line(j) for j in jobs) or "no jobs")


# ---------------------------------------------------------------- peers
def _ago(t: float | None) -> str:
    if not t:
        return "never"
    s = max(0.0, datetime.now().timestamp() - t)
    return f"{s:.0f}s ago" if s < 120 else (f"{s / 60:.0f}m ago" if s < 7200
                                           else f"{s / 3600:.0f}h ago")


def _seconds(text: str) -> float:
    """"90", "30s", "15m", "1h", "2d" as seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise InvalidArgument(f"not a duration: {text!r}", "e.g. 600, 30m, 1h, 2d") from None


def cmd_peer_key(args: argparse.Namespace, c: Client) -> None:
    k = c.post("/api/v1/peers/key", {"ttl": _seconds(args.ttl)})
    where = ", ".join(k["listen"]) if k["listen"] else \
        "nowhere: set [replication] listen in the config and restart, or peers cannot dial this daemon"
    _emit(args, k, f"{k['key']}\n\none-time connection key, valid until "
          f"{datetime.fromtimestamp(k['expires']):%Y-%m-%d %H:%M:%S}; on the other daemon run:\n"
          f"  pstorage peer connect THIS-HOST:PORT --key {k['key']}\n"
          f"this daemon listens on {where}\n"
          f"certificate SHA-256 {k['fingerprint']}")


def _peer_rows(peers: list[dict]) -> list[list[str]]:
    return [[p["name"], p["address"] or "-", p["state"] + (" (connected)" if p["connected"] else ""),
             _ago(p["last_seen"]), "-" if p["rtt_ms"] is None else f"{p['rtt_ms']:.1f} ms",
             human_bytes(p["bandwidth"]) + "/s" if p["bandwidth"] else "unlimited",
             p["fingerprint"][:16]] for p in peers]


PEER_HEADER = ["NAME", "ADDRESS", "STATE", "LAST SEEN", "RTT", "BANDWIDTH", "CERTIFICATE"]


def cmd_peer_list(args: argparse.Namespace, c: Client) -> None:
    data = c.get("/api/v1/peers")
    me = data["self"]
    head = (f"this daemon: {me['name']} (pool {me['id']}), listening on "
            f"{', '.join(me['bound']) if me['bound'] else 'nothing (replication listener off)'}")
    rows = _peer_rows(data["peers"])
    errors = [f"{p['name']}: {p['last_error']}" for p in data["peers"]
              if p["last_error"] and p["state"] == "unreachable"]
    _emit(args, data, head + "\n" + (table(rows, PEER_HEADER) if rows else "no peers")
          + "".join("\n" + e for e in errors))


def cmd_peer_connect(args: argparse.Namespace, c: Client) -> None:
    body = {"address": args.address, "key": args.key}
    if args.name:
        body["name"] = args.name
    p = c.post("/api/v1/peers", body)
    _emit(args, p, f"paired with {p['name']} at {p['address']} (certificate SHA-256 "
          f"{p['fingerprint']}); round trip {p['rtt_ms']} ms")


def cmd_peer_disconnect(args: argparse.Namespace, c: Client) -> None:
    r = c.delete(f"/api/v1/peers/{args.name}")
    _emit(args, r, f"forgot peer {args.name}" + ("; it forgot this daemon too" if r["peer_told"]
          else "; it could not be told (it keeps its record of this daemon until it is "
          "disconnected there)"))


def cmd_peer_set(args: argparse.Namespace, c: Client) -> None:
    bw = 0 if args.bandwidth.strip() in ("0", "unlimited", "none") else parse_size(args.bandwidth)
    p = c.patch(f"/api/v1/peers/{args.name}", {"bandwidth": bw})
    _emit(args, p, f"peer {p['name']}: bandwidth " + (f"{human_bytes(bw)}/s" if bw else
                                                       "unlimited"))


def cmd_peer_ping(args: argparse.Namespace, c: Client) -> None:
    r = c.post(f"/api/v1/peers/{args.name}/ping")
    _emit(args, r, f"{args.name}: {r['rtt_ms']:.2f} ms")


def _peer_commands(sub: argparse._SubParsersAction[_Parser]) -> None:
    """peer key, connect, list, set, ping, disconnect"""
    pe = sub.add_parser("peer", help="replication peers: pair, list, limit, forget"
                        ).add_subparsers(dest="sub", required=True)
    x = pe.add_parser("key", help="a one-time connection key for pairing (run on the target)")
    x.add_argument("--ttl", default="1h", help="how long it is valid (default 1h)")
    x.set_defaults(fn=cmd_peer_key)
    x = pe.add_parser("connect", help="pair with the daemon at HOST:PORT (run on the source)")
    x.add_argument("address", metavar="HOST:PORT", help="the target's replication listener")
    x.add_argument("--key", required=True, help="the key 'pstorage peer key' printed there")
    x.add_argument("--name", help="what to call the peer here (default: its own name)")
    x.set_defaults(fn=cmd_peer_connect)
    pe.add_parser("list", help="paired peers, reachable or not, last seen"
                  ).set_defaults(fn=cmd_peer_list)
    x = pe.add_parser("set", help="change a peer's settings")
    x.add_argument("name")
    x.add_argument("--bandwidth", required=True, help="bytes/s sent to it at most (50M; 0: no limit)")
    x.set_defaults(fn=cmd_peer_set)
    x = pe.add_parser("ping", help="round-trip time to a peer")
    x.add_argument("name")
    x.set_defaults(fn=cmd_peer_ping)
    x = pe.add_parser("disconnect", help="forget a peer (and tell it, if it answers)")
    x.add_argument("name")
    x.set_defaults(fn=cmd_peer_disconnect)


# ---------------------------------------------------------------- replication
REPL_HEADER = ["VOLUME", "ROLE", "PEER", "STATE", "LAST POINT", "LAG", "LOGICAL", "WIRE"]


def _repl_state(p: dict) -> str:
    if p["state"] == "syncing" and p.get("progress") is not None:
        return f"syncing {100 * p['progress']:.0f}%"
    return p["state"]


def _repl_rows(pairs: list[dict]) -> list[list[str]]:
    rows = []
    for p in pairs:
        last = p.get("last_sync") or {}
        lag = p.get("lag_seconds")
        rows.append([p["volume"], p["role"], str(p["peer"]), _repl_state(p),
                     p.get("last_consistent_point") or "-",
                     "-" if lag is None else f"{lag:.0f}s",
                     human_bytes(last["logical_bytes"]) if last else "-",
                     human_bytes(last["wire_bytes"]) if last else "-"])
    return rows


def cmd_repl_create(args: argparse.Namespace, c: Client) -> None:
    p = c.post("/api/v1/replication", {"volume": args.volume, "peer": args.peer,
                                       "keep": args.keep, "every": _seconds(args.every)})
    _emit(args, p, f"volume {args.volume} replicates to {p['peer']}" +
          (f" every {args.every}" if p["every"] else " on demand (pstorage replication sync)"))


def cmd_repl_sync(args: argparse.Namespace, c: Client) -> None:
    wait = "true" if args.wait else "false"
    p = c.post(f"/api/v1/replication/{args.volume}/sync?wait={wait}")
    if not args.wait:
        _emit(args, p, f"sync of {args.volume} started; see pstorage replication status")
        return
    last = p["last_sync"]
    _emit(args, p, f"{args.volume} replicated to {p['peer']}: {last['blocks']} changed blocks "
          f"({human_bytes(last['logical_bytes'])}), {last['chunks_sent']} chunks sent, "
          f"{human_bytes(last['wire_bytes'])} on the wire")


def cmd_repl_status(args: argparse.Namespace, c: Client) -> None:
    data = c.get("/api/v1/replication")
    pairs = data["pairs"]
    errors = [f"{p['volume']}: {p['last_error']}" for p in pairs if p.get("last_error")]
    _emit(args, data, (table(_repl_rows(pairs), REPL_HEADER) if pairs else "no replication")
          + "".join(f"\n{e}" for e in errors))


def cmd_repl_delete(args: argparse.Namespace, c: Client) -> None:
    r = c.delete(f"/api/v1/replication/{args.volume}")
    _emit(args, r, f"volume {args.volume} no longer replicates (the replica stays on the peer)")


def _replication_commands(sub: argparse._SubParsersAction[_Parser]) -> None:
    """replication create, sync, status, delete"""
    rp = sub.add_parser("replication", help="asynchronous replication of volumes to peers"
                        ).add_subparsers(dest="sub", required=True)
    x = rp.add_parser("create", help="replicate VOLUME to a peer")
    x.add_argument("volume")
    x.add_argument("--peer", required=True, help="a peer name ('pstorage peer list')")
    x.add_argument("--keep", type=int, default=4, help="replica snapshots kept there (default 4)")
    x.add_argument("--every", default="0", help="sync on a schedule (15m, 1h; default: on demand)")
    x.set_defaults(fn=cmd_repl_create)
    x = rp.add_parser("sync", help="ship VOLUME's changes since its last replica point now")
    x.add_argument("volume")
    x.add_argument("--wait", action="store_true", help="return when the sync is done")
    x.set_defaults(fn=cmd_repl_sync)
    rp.add_parser("status", help="every pair: role, state, last consistent point, lag, bytes"
                  ).set_defaults(fn=cmd_repl_status)
    x = rp.add_parser("delete", help="stop replicating VOLUME (its replica stays on the peer)")
    x.add_argument("volume")
    x.set_defaults(fn=cmd_repl_delete)


class _Parser(argparse.ArgumentParser):
    """Every command and subcommand takes --json and --socket, before or after its name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--socket", default=argparse.SUPPRESS,
                          help="control socket (default $PSTORAGE_CONTROL or /run/pstorage/control.sock)")
        self.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                          help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pstorage", description="Manage a PStorage pool and its volumes.")
    sub = p.add_subparsers(dest="cmd", required=True)
    # in this order: --help lists the commands so
    for add in (_pool_commands, _volume_commands, _snapshot_commands, _serving_commands,
                _report_commands, _maintenance_commands, _peer_commands,
                _replication_commands):
        add(sub)
    return p


def _check_report(job: dict) -> str:
    """A check's report in plain words."""
    what = ("checked" if not job["repair"] else "checked and repaired")
    c = job["checked"]
    head = (f"pool {what} ({job['mode']}): {c.get('map_entries', 0)} map entries, "
            f"{c.get('chunks', 0)} chunks ({human_bytes(c.get('bytes_verified', 0))} of records "
            f"verified), {c.get('segments', 0)} segments in use")
    if job["state"] == "failed":
        return head + f"\nthe check failed: {job['error']}"
    if not job["counts"]:
        return head + "\nno problems found"
    lines = [head, *job["summary"]]
    for p in job["problems"]:
        mark = "repaired" if p["fixed"] else "REMAINS "
        lines.append(f"  {mark}  {p['message']}" + (f" -> {p['repair']}" if p.get("repair") else ""))
    listed = len(job["problems"])
    total = sum(job["counts"].values())
    if total > listed:
        lines.append(f"  ... and {total - listed} more (all counted above)")
    if job["remaining"] and not job["repair"]:
        lines.append("repair what can be repaired: stop pstoraged, then "
                     "'pstorage pool check --repair'")
    return "\n".join(lines)


def cmd_pool_check(args: argparse.Namespace) -> None:
    if args.online:
        if args.repair:
            raise InvalidArgument("--repair needs the daemon stopped",
                                  "stop pstoraged, then run 'pstorage pool check --repair'")
        c = Client(args.socket)
        job = c.post("/api/v1/pool/check")["job"]
        job = _poll(args, job, lambda: c.get(f"/api/v1/jobs/{job['id']}"),
                    lambda j: j["state"] == "running", _check_line, lambda _: "\n")
    else:
        from ..engine.check import check_offline

        tty = not args.json and sys.stderr.isatty()

        def progress(j: Any) -> None:
            if tty:
                print("\r" + _check_line(j.to_dict()), end="", file=sys.stderr, flush=True)

        try:
            job = check_offline(args.dir, repair=args.repair, progress=progress).to_dict()
        except PoolLocked as e:
            raise PoolLocked(e.message, "stop pstoraged for a check that can repair, or check "
                             "it read-only through the daemon: 'pstorage pool check --online'"
                             ) from None
        finally:
            if tty:
                print(file=sys.stderr)
    _emit(args, job, _check_report(job))
    if job["state"] == "failed" or job["remaining"]:
        raise CheckProblems(f"{job['remaining']} problems remain" if job["remaining"]
                            else "the check did not finish")


def _check_line(j: dict) -> str:
    return f"checking the pool: {j['phase']}, {100 * j['progress']:.0f}%"


def _pool_commands(sub: argparse._SubParsersAction[_Parser]) -> None:
    """pool create, show, import, export, upgrade, check"""
    pool = sub.add_parser("pool", help="create or inspect the pool").add_subparsers(dest="sub", required=True)
    pc = pool.add_parser("create", help="format a device or file as a pool (daemon not running)")
    pc.add_argument("--dir", default="/var/lib/pstorage",
                    help="runtime directory on this host (the pool itself is all on the device)")
    pc.add_argument("--label", default="", help="a name for the pool (up to 32 bytes), usable "
                    "instead of its UUID")
    pc.add_argument("--meta-size", help="metadata region size (default 10%% of the device, at "
                    "least 4M); see docs/format.md for bytes per TiB")
    pc.add_argument("--device", required=True, help="block device (/dev/nvme0n1) or file")
    pc.add_argument("--size", help="create the file with this size, e.g. 20G")
    pc.add_argument("--segment-size", default="4M")
    pc.add_argument("--force", action="store_true", help="overwrite existing signatures")
    pc.set_defaults(local=cmd_pool_create)
    pool.add_parser("show", help="pool capacity and state").set_defaults(fn=cmd_pool_show)
    pi = pool.add_parser(
        "import", help="list the pools on this host's devices, or open one here (daemon not running)",
        description="Find pools by the UUID in their superblocks. Without NAME: list them. "
        "With NAME (UUID, 8+ digit prefix, or label): make DIR serve it, whatever its device "
        "is called now; then start pstoraged.")
    pi.add_argument("name", nargs="?", help="pool UUID, UUID prefix or label")
    pi.add_argument("--device", "-d", action="append", metavar="PATH",
                    help="look only here (a device, a pool file, or a directory of them; "
                    "repeatable); default: every block device")
    pi.add_argument("--dir", default="/var/lib/pstorage", help="runtime directory to serve it from")
    pi.add_argument("--force", action="store_true",
                    help="import a pool another host opened and never exported (that host "
                    "must be down: two hosts writing one pool destroy it)")
    pi.set_defaults(local=cmd_pool_import)
    pu = pool.add_parser("upgrade", help="move a format-1 pool's metadata from the host onto its "
                         "device (daemon stopped)")
    pu.add_argument("--dir", default="/var/lib/pstorage", help="the pool directory holding meta/")
    pu.add_argument("--meta-size", help="metadata region size (default 10%% of the device)")
    pu.set_defaults(local=cmd_pool_upgrade)
    pe = pool.add_parser("export", help="close the pool cleanly to move its device (daemon stopped)")
    pe.add_argument("--dir", default="/var/lib/pstorage", help="runtime directory that serves it")
    pe.set_defaults(local=cmd_pool_export)
    ck = pool.add_parser("check", help="verify maps, refcounts, chunk records and segments "
                         "(daemon stopped; --online: read-only through the daemon)")
    ck.add_argument("--dir", default="/var/lib/pstorage", help="pool directory (metadata)")
    ck.add_argument("--repair", action="store_true",
                    help="fix what can be derived (refcounts, orphans, index, live bytes)")
    ck.add_argument("--online", action="store_true",
                    help="check the pool of the running daemon, read-only")
    ck.set_defaults(local=cmd_pool_check)


def _volume_commands(sub: argparse._SubParsersAction[_Parser]) -> None:
    """volume create, list, show, resize, delete, recover, eradicate, space, clone"""
    vol = sub.add_parser("volume", help="volumes").add_subparsers(dest="sub", required=True)
    c = vol.add_parser("create")
    c.add_argument("name")
    c.add_argument("--size", required=True, help="e.g. 10G, 512M or bytes; a multiple of 4096")
    c.add_argument("--compression", default="lz4", choices=["lz4", "zstd", "none"])
    c.set_defaults(fn=cmd_volume_create)
    x = vol.add_parser("list")
    x.add_argument("--destroyed", action="store_true", help="destroyed (recoverable) volumes")
    x.set_defaults(fn=cmd_volume_list)
    s = vol.add_parser("show")
    s.add_argument("name")
    s.set_defaults(fn=cmd_volume_show)
    r = vol.add_parser("resize")
    r.add_argument("name")
    r.add_argument("size")
    r.add_argument("--shrink", action="store_true", help="allow cutting the volume (data past the end is released)")
    r.add_argument("--force", action="store_true", help="shrink even while exported")
    r.set_defaults(fn=cmd_volume_resize)
    d = vol.add_parser("delete")
    d.add_argument("name")
    d.add_argument("--force", action="store_true", help="detach and unexport first")
    d.set_defaults(fn=cmd_volume_delete)
    for name, fn, what in (("recover", cmd_volume_recover, "bring back a destroyed volume"),
                           ("eradicate", cmd_volume_eradicate, "free a destroyed volume now"),
                           ("space", cmd_volume_space,
                            "logical, unique and shared space of a volume and its snapshots")):
        x = vol.add_parser(name, help=what)
        x.add_argument("name")
        x.set_defaults(fn=fn)
    cl = vol.add_parser("clone", help="a new volume from a snapshot, sharing all its data")
    cl.add_argument("snapshot", help="VOLUME@SNAPSHOT")
    cl.add_argument("new", help="name of the new volume")
    cl.add_argument("--no-wait", action="store_true",
                    help="return at once; the clone refuses I/O until it is filled")
    cl.set_defaults(fn=cmd_volume_clone)


def _snapshot_commands(sub: argparse._SubParsersAction[_Parser]) -> None:
    """snapshot create, list, delete, recover, eradicate, restore, export, lock, diff"""
    sn = sub.add_parser("snapshot", help="snapshots").add_subparsers(dest="sub", required=True)
    x = sn.add_parser("create", help="take an instant snapshot")
    x.add_argument("volume")
    x.add_argument("snapshot", nargs="?", help="name (default snap-N)")
    x.add_argument("--lock-until", help="retention lock: 2027-01-31, 7d, ...; cannot be undone")
    x.set_defaults(fn=cmd_snapshot_create)
    x = sn.add_parser("list", help="snapshots with the space only each holds")
    x.add_argument("volume", nargs="?")
    x.add_argument("--destroyed", action="store_true", help="destroyed (recoverable) ones")
    x.set_defaults(fn=cmd_snapshot_list)
    for name, fn, what in (("delete", cmd_snapshot_delete, "destroy (recoverable for the grace period)"),
                           ("recover", cmd_snapshot_recover, "bring back a destroyed snapshot"),
                           ("eradicate", cmd_snapshot_eradicate,
                            "free a destroyed snapshot now (never a locked one)"),
                           ("restore", cmd_snapshot_restore, "roll the volume back to the snapshot"),
                           ("export", cmd_snapshot_export, "serve it read-only over NBD"),
                           ("lock", cmd_snapshot_lock, "extend the retention lock")):
        x = sn.add_parser(name, help=what)
        x.add_argument("ref", help="VOLUME@SNAPSHOT, or VOLUME")
        x.add_argument("snap", nargs="?", help="SNAPSHOT when VOLUME is given alone")
        if name == "restore":
            x.add_argument("--force", action="store_true", help="even while exported/attached")
            x.add_argument("--no-wait", action="store_true",
                           help="return at once; the volume refuses I/O until it is restored")
        if name == "lock":
            x.add_argument("--until", required=True, help="2027-01-31, 30d, ...")
        x.set_defaults(fn=fn)
    x = sn.add_parser("diff", help="changed ranges between two snapshots (or one and the volume)")
    x.add_argument("a", help="VOLUME@OLDER")
    x.add_argument("b", nargs="?", help="VOLUME@NEWER (default: the live volume)")
    x.set_defaults(fn=cmd_snapshot_diff)


def _serving_commands(sub: argparse._SubParsersAction[_Parser]) -> None:
    """export, unexport, attach, detach (volumes and VOL@SNAP)"""
    e = sub.add_parser("export", help="serve a volume over NBD; prints its URI")
    e.add_argument("name")
    e.add_argument("--tcp", help="also serve on TCP ADDR:PORT")
    e.add_argument("--tls-psk", metavar="FILE", help="TCP requires TLS with these pre-shared keys")
    e.add_argument("--tls-certificates", metavar="DIR", help="TCP requires TLS with certificates")
    e.add_argument("--allow", metavar="ADDR[,CIDR...]", help="only these TCP clients")
    e.add_argument("--readonly", action="store_true")
    e.set_defaults(fn=cmd_export)
    u = sub.add_parser("unexport", help="stop serving a volume or VOLUME@SNAPSHOT")
    u.add_argument("name", help="VOLUME or VOLUME@SNAPSHOT")
    u.add_argument("--force", action="store_true", help="even while attached")
    u.set_defaults(fn=cmd_unexport)
    a = sub.add_parser("attach", help="make a volume a local block device (a snapshot: a "
                       "read-only one); prints its path")
    a.add_argument("name", help="VOLUME or VOLUME@SNAPSHOT")
    a.set_defaults(fn=cmd_attach)
    dt = sub.add_parser("detach", help="remove a volume's or snapshot's block device")
    dt.add_argument("name", help="VOLUME or VOLUME@SNAPSHOT")
    dt.add_argument("--force", action="store_true", help="even if mounted (lazy)")
    dt.set_defaults(fn=cmd_detach)


def _report_commands(sub: argparse._SubParsersAction[_Parser]) -> None:
    """stats, forecast, health, temperature, tiering"""
    x = sub.add_parser("stats", help="data reduction per volume and pool",
                       description="Data reduction of the pool and of each volume.",
                       epilog=STATS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    x.add_argument("--max-age", type=float, default=60.0, metavar="SECONDS",
                   help="reuse the daemon's last walk of the volumes' maps up to this old "
                        "(0: walk now; default 60)")
    x.set_defaults(fn=cmd_stats)

    f = sub.add_parser("forecast", help="capacity history and forecast, as a chart")
    f.add_argument("--horizons", default="7,30,90", help="days, comma-separated")
    f.add_argument("--png", metavar="FILE", help="also write the chart as a PNG image")
    f.set_defaults(fn=cmd_forecast)
    sub.add_parser("health", help="backing device and engine health").set_defaults(fn=cmd_health)
    t = sub.add_parser("temperature", help="hot / warm / cold / frozen data per volume")
    t.add_argument("--thresholds", metavar="HOT,WARM,COLD", help="ages in days, e.g. 1,7,30")
    t.set_defaults(fn=cmd_temperature)
    tier = sub.add_parser("tiering", help="tiering recommendations").add_subparsers(
        dest="sub", required=True)
    tier.add_parser("list", help="recommendations with estimated savings").set_defaults(
        fn=cmd_tiering_list)
    ta = tier.add_parser("apply", help="apply a recommendation by id")
    ta.add_argument("id")
    ta.add_argument("--wait", action="store_true", help="follow the job until it finishes")
    ta.set_defaults(fn=cmd_tiering_apply)


def _maintenance_commands(sub: argparse._SubParsersAction[_Parser]) -> None:
    """devices, gc, scrub, jobs"""
    x = sub.add_parser("devices", help="candidate backing devices: size, model, in use, data")
    x.set_defaults(local=cmd_devices)
    x = sub.add_parser("gc", help="compact the pool now (the cleaner also runs on its own)")
    x.add_argument("--wait", action="store_true", help="follow the pass until it ends")
    x.set_defaults(fn=cmd_gc)
    x = sub.add_parser("scrub", help="read and verify every live chunk")
    x.add_argument("--wait", action="store_true", help="follow it and report what it found")
    x.set_defaults(fn=cmd_scrub)
    j = sub.add_parser("jobs", help="background jobs and their progress")
    j.add_argument("id", nargs="?", type=int)
    j.set_defaults(fn=cmd_jobs)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.json = getattr(args, "json", False)
    args.socket = getattr(args, "socket", None)
    try:
        if hasattr(args, "local"):
            args.local(args)
        else:
            args.fn(args, Client(args.socket))
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
    except PStorageError as e:
        print(f"pstorage: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader left (`| head`): stop quietly as `cat` would, exit 128 + SIGPIPE.
        # Python would flush stdout again at exit and fail; point it at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE
    return 0


if __name__ == "__main__":
    sys.exit(main())
