"""pstoraged: one trio process that owns a pool and serves its volumes."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import trio

from . import logsetup
from .analytics import DEFAULT_SAMPLE_INTERVAL, Analytics
from .cleaner import SegmentCleaner
from .control import ControlServer
from .dataplane import DataPlane
from .engine import Engine
from .errors import PStorageError
from .exports import ExportManager
from .format import DEFAULT_SEGMENT_SIZE
from .pool import create_pool, open_pool
from .rest import Context, build_app
from .snapshots import Eradicator
from .temperature import Thresholds
from .units import parse_size

log = logging.getLogger("pstoraged")

DEFAULT_POOL_DIR = "/var/lib/pstorage"
DEFAULT_RUN_DIR = "/run/pstorage"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pstoraged", description=__doc__)
    p.add_argument("--pool-dir", default=os.environ.get("PSTORAGE_POOL_DIR", DEFAULT_POOL_DIR),
                   help="pool directory: metadata and pool.json (default %(default)s)")
    p.add_argument("--run-dir", default=os.environ.get("PSTORAGE_RUN_DIR", DEFAULT_RUN_DIR),
                   help="sockets and export state (default %(default)s)")
    p.add_argument("--init", action="store_true", help="create the pool first if there is none")
    p.add_argument("--device", help="with --init: backing block device or file")
    p.add_argument("--size", help="with --init: create the backing file with this size (e.g. 20G)")
    p.add_argument("--segment-size", default=str(DEFAULT_SEGMENT_SIZE), help="with --init")
    p.add_argument("--force", action="store_true", help="with --init: overwrite signatures")
    p.add_argument("--log-level", default=os.environ.get("PSTORAGE_LOG_LEVEL", "INFO"))
    p.add_argument("--sample-interval", type=float, default=DEFAULT_SAMPLE_INTERVAL,
                   help="seconds between capacity samples (default %(default)s)")
    p.add_argument("--temperature-days", default="1,7,30", metavar="HOT,WARM,COLD",
                   help="data temperature limits in days (default %(default)s)")
    p.add_argument("--destroy-grace-hours", type=float, default=24.0,
                   help="deleted volumes and snapshots stay recoverable this long (default %(default)s)")
    p.add_argument("--api-listen", metavar="ADDR:PORT",
                   help="also serve the REST API on TCP (off by default; needs --api-token-file)")
    p.add_argument("--api-token-file", metavar="FILE",
                   help="bearer token for the TCP API listener (a file of mode 0600)")
    return p.parse_args(argv)


async def serve(engine: Engine, args: argparse.Namespace) -> None:
    run_dir = args.run_dir
    data_sock = os.path.join(run_dir, "data.sock")
    dataplane = DataPlane(engine, data_sock)
    dataplane.start()
    try:
        exports = await trio.to_thread.run_sync(ExportManager, run_dir, data_sock)
        ctx = Context(dataplane, exports)
        ctx.analytics = Analytics(dataplane, sample_interval=args.sample_interval,
                                  thresholds=Thresholds.parse(args.temperature_days))
        ctx.catalog.grace_s = args.destroy_grace_hours * 3600
        # garbage collection and static wear leveling run between client batches
        await dataplane.call(lambda: engine.services.append(SegmentCleaner(engine)))
        dataplane.resolve = ctx.catalog.view  # VOL@SNAP exports
        eradicator = Eradicator(ctx.catalog, dataplane.call)
        control = ControlServer(build_app(ctx), os.path.join(run_dir, "control.sock"),
                                tcp=args.api_listen, token_file=args.api_token_file)
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve)
            nursery.start_soon(ctx.analytics.run, name="capacity sampler")
            nursery.start_soon(eradicator.run, name="eradicator")
            ctx.ready = True
            log.info("pstoraged ready: pool %s, %d volumes, sockets in %s",
                     engine.pool.sb.uuid.hex(), len(engine.volumes), run_dir)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    break
            ctx.ready = False
            ctx.analytics.stop()
            eradicator.stop()
            control.stop()
    finally:
        with trio.CancelScope(shield=True):
            await dataplane.stop()  # drains queued I/O, commits, marks the pool clean
        log.info("pstoraged stopped cleanly")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logsetup.setup(args.log_level)
    try:
        if args.init and not os.path.exists(os.path.join(args.pool_dir, "pool.json")):
            if not args.device:
                raise PStorageError("--init needs --device", "e.g. --device /var/lib/pstorage/pool.img --size 20G")
            create_pool(args.pool_dir, args.device,
                        file_size=parse_size(args.size) if args.size else None,
                        segment_size=parse_size(args.segment_size), force=args.force)
            log.info("created pool in %s on %s", args.pool_dir, args.device)
        engine = Engine(open_pool(args.pool_dir))
    except PStorageError as e:
        print(f"pstoraged: {e}", file=sys.stderr)
        return e.exit_code
    os.makedirs(args.run_dir, exist_ok=True)
    try:
        trio.run(serve, engine, args)
    except PStorageError as e:
        print(f"pstoraged: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
