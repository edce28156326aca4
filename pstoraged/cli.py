"""pstorage: the command-line client of pstoraged."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from typing import Any

from .client import Client
from .errors import PStorageError
from .units import human_bytes, parse_size


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*map(str, r)).rstrip() for r in [header, *rows])


def _ratio(x: float | None) -> str:
    return f"{x:.2f}:1" if x else "-"


def _emit(args: argparse.Namespace, data: Any, human: str) -> None:
    print(json.dumps(data, indent=2) if args.json else human)


def _vol_rows(vols: list[dict]) -> list[list[str]]:
    return [[
        v["name"], human_bytes(v["size"]), human_bytes(v["logical_bytes"]), v["compression"],
        v["device"] or ("exported" if v["uri"] else "-"),
        datetime.fromtimestamp(v["created"]).strftime("%Y-%m-%d %H:%M"),
    ] for v in vols]


VOL_HEADER = ["NAME", "SIZE", "USED", "COMPRESSION", "ATTACHED", "CREATED"]


def cmd_pool_create(args: argparse.Namespace) -> None:
    from .devices import describe
    from .pool import create_pool

    sb = create_pool(args.dir, args.device, file_size=parse_size(args.size) if args.size else None,
                     segment_size=parse_size(args.segment_size), force=args.force)
    dev = describe(args.device)
    data = {"uuid": sb.uuid.hex(), "device": args.device, "segments": sb.segment_count,
            "segment_size": sb.segment_size, "capacity": sb.segment_count * sb.segment_size,
            "kind": dev.kind, "model": dev.model, "rotational": dev.rotational,
            "logical_block_size": dev.logical_block_size,
            "physical_block_size": dev.physical_block_size}
    what = dev.kind if dev.kind == "file" else (
        f"{dev.model or 'block device'}, {'rotational' if dev.rotational else 'non-rotational'}, "
        f"{dev.logical_block_size}/{dev.physical_block_size} B sectors, O_DIRECT")
    _emit(args, data, f"created pool {sb.uuid.hex()} on {args.device} ({what}): "
          f"{sb.segment_count} segments of {human_bytes(sb.segment_size)} "
          f"({human_bytes(data['capacity'])})")


def cmd_pool_show(args: argparse.Namespace, c: Client) -> None:
    p = c.get("/api/v1/pool")
    s = p["statistics"]
    rows = [
        ["uuid", p["uuid"]], ["device", p["device"]], ["directory", p["directory"]],
        ["capacity", human_bytes(s["capacity_bytes"])], ["allocated", human_bytes(s["allocated_bytes"])],
        ["free", human_bytes(s["free_bytes"])], ["volumes", s["volumes"]],
        ["segments", f"{p['segments']['total']} x {human_bytes(p['segment_size'])}"],
        ["checksum errors", s["checksum_errors"]],
    ]
    _emit(args, p, table(rows, ["POOL", ""]))


def cmd_volume_create(args: argparse.Namespace, c: Client) -> None:
    v = c.post("/api/v1/volumes", {"name": args.name, "size": parse_size(args.size),
                                   "compression": args.compression})
    _emit(args, v, f"created volume {v['name']} ({human_bytes(v['size'])}, {v['compression']})")


def cmd_volume_list(args: argparse.Namespace, c: Client) -> None:
    vols = c.get("/api/v1/volumes")["volumes"]
    _emit(args, vols, table(_vol_rows(vols), VOL_HEADER) if vols else "no volumes")


def cmd_volume_show(args: argparse.Namespace, c: Client) -> None:
    v = c.get(f"/api/v1/volumes/{args.name}")
    rows = [[k, v[k]] for k in ("name", "size", "compression", "readonly", "uri", "tcp", "device")]
    rows += [[k, x] for k, x in v["stats"].items()]
    _emit(args, v, table(rows, ["VOLUME", v["name"]]))


def cmd_volume_resize(args: argparse.Namespace, c: Client) -> None:
    v = c.request("PATCH", f"/api/v1/volumes/{args.name}",
                  {"size": parse_size(args.size), "shrink": args.shrink, "force": args.force})
    _emit(args, v, f"volume {v['name']} is now {human_bytes(v['size'])}")


def cmd_volume_delete(args: argparse.Namespace, c: Client) -> None:
    q = "?force=1" if args.force else ""
    out = c.request("DELETE", f"/api/v1/volumes/{args.name}{q}")
    _emit(args, out, f"deleted volume {args.name}")


def cmd_export(args: argparse.Namespace, c: Client) -> None:
    v = c.post(f"/api/v1/volumes/{args.name}/export", {"tcp": args.tcp, "readonly": args.readonly})
    text = v["uri"] + (f"\nnbd://{v['tcp']}/{args.name}" if v["tcp"] else "")
    _emit(args, v, text)


def cmd_unexport(args: argparse.Namespace, c: Client) -> None:
    out = c.request("DELETE", f"/api/v1/volumes/{args.name}/export" + ("?force=1" if args.force else ""))
    _emit(args, out, f"stopped exporting {args.name}")


def cmd_attach(args: argparse.Namespace, c: Client) -> None:
    v = c.post(f"/api/v1/volumes/{args.name}/attach")
    _emit(args, v, v["device"])


def cmd_detach(args: argparse.Namespace, c: Client) -> None:
    out = c.request("DELETE", f"/api/v1/volumes/{args.name}/attach" + ("?force=1" if args.force else ""))
    _emit(args, out, f"detached {args.name}")


def cmd_stats(args: argparse.Namespace, c: Client) -> None:
    r = c.get("/api/v1/metrics/reduction")
    p = r["pool"]
    rows = [[
        "(pool)", human_bytes(p["written_bytes"]), human_bytes(p["logical_bytes"]),
        human_bytes(p["zero_removed_bytes"]), human_bytes(p["dedupe_removed_bytes"]),
        human_bytes(p["stored_bytes"]), _ratio(p["dedupe_ratio"]), _ratio(p["compression_ratio"]),
        _ratio(p["data_reduction_ratio"]),
    ]]
    for name, v in r["volumes"].items():
        rows.append([
            name, human_bytes(v["written_bytes"]), human_bytes(v["logical_bytes"]),
            human_bytes(v["zero_removed_bytes"]), human_bytes(v["dedupe_removed_bytes"]),
            human_bytes(v["stored_bytes"]), _ratio(v["dedupe_ratio"]),
            _ratio(v["compression_ratio"]), _ratio(v["ingest_reduction_ratio"]),
        ])
    human = table(rows, ["VOLUME", "WRITTEN", "LOGICAL", "ZEROS", "DEDUPED", "STORED",
                         "DEDUPE", "COMPRESS", "REDUCTION"])
    human += (f"\n\npool: {human_bytes(p['logical_bytes'])} logical in "
              f"{human_bytes(p['stored_bytes'])} stored, data reduction "
              f"{_ratio(p['data_reduction_ratio'])}, total efficiency {_ratio(p['total_efficiency'])}"
              f" (with thin provisioning of {human_bytes(p['provisioned_bytes'])})")
    _emit(args, r, human)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pstorage", description="Manage a PStorage pool and its volumes.")
    p.add_argument("--socket", help="control socket (default $PSTORAGE_CONTROL or /run/pstorage/control.sock)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="cmd", required=True)

    pool = sub.add_parser("pool", help="create or inspect the pool").add_subparsers(dest="sub", required=True)
    pc = pool.add_parser("create", help="format a device or file as a pool (daemon not running)")
    pc.add_argument("--dir", default="/var/lib/pstorage", help="pool directory (metadata)")
    pc.add_argument("--device", required=True, help="block device (/dev/nvme0n1) or file")
    pc.add_argument("--size", help="create the file with this size, e.g. 20G")
    pc.add_argument("--segment-size", default="4M")
    pc.add_argument("--force", action="store_true", help="overwrite existing signatures")
    pc.set_defaults(local=cmd_pool_create)
    pool.add_parser("show", help="pool capacity and state").set_defaults(fn=cmd_pool_show)

    vol = sub.add_parser("volume", help="volumes").add_subparsers(dest="sub", required=True)
    c = vol.add_parser("create")
    c.add_argument("name")
    c.add_argument("--size", required=True, help="e.g. 10G, 512M or bytes; a multiple of 4096")
    c.add_argument("--compression", default="lz4", choices=["lz4", "zstd", "none"])
    c.set_defaults(fn=cmd_volume_create)
    vol.add_parser("list").set_defaults(fn=cmd_volume_list)
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

    e = sub.add_parser("export", help="serve a volume over NBD; prints its URI")
    e.add_argument("name")
    e.add_argument("--tcp", help="also serve on TCP ADDR:PORT")
    e.add_argument("--readonly", action="store_true")
    e.set_defaults(fn=cmd_export)
    u = sub.add_parser("unexport", help="stop serving a volume")
    u.add_argument("name")
    u.add_argument("--force", action="store_true")
    u.set_defaults(fn=cmd_unexport)
    a = sub.add_parser("attach", help="make a volume a local block device; prints its path")
    a.add_argument("name")
    a.set_defaults(fn=cmd_attach)
    dt = sub.add_parser("detach", help="remove a volume's block device")
    dt.add_argument("name")
    dt.add_argument("--force", action="store_true", help="even if mounted (lazy)")
    dt.set_defaults(fn=cmd_detach)
    sub.add_parser("stats", help="data reduction per volume and pool").set_defaults(fn=cmd_stats)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "local"):
            args.local(args)
        else:
            args.fn(args, Client(args.socket))
    except PStorageError as e:
        print(f"pstorage: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
