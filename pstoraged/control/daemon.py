"""pstoraged: one trio process that owns a pool and serves its volumes."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys

import trio

from ..analytics.sampler import Analytics
from ..analytics.temperature import HeatMap, Thresholds
from ..engine import discovery
from ..engine.cleaner import SegmentCleaner
from ..engine.engine import Engine
from ..engine.format import DEFAULT_SEGMENT_SIZE
from ..engine.pool import Pool, create_pool, import_pool, open_pool, serves
from ..engine.snapshots import Eradicator
from ..engine.units import parse_size
from ..errors import DeviceIOError, PStorageError
from ..frontends import fusefs
from ..frontends.dataplane import DataPlane
from ..frontends.exports import ExportManager
from ..frontends.fusefs import FuseFrontEnd
from ..frontends.loopdev import loop_devices_on
from ..replication.async_repl import AsyncReplication
from ..replication.peers import PeerStore
from ..replication.service import Replication
from . import config, logsetup, sdnotify
from .api import Context, build_app
from .server import ControlServer

log = logging.getLogger("pstoraged")

DEFAULT_POOL_DIR = config.DEFAULT_POOL_DIR
DEFAULT_RUN_DIR = config.DEFAULT_RUN_DIR


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # Flags backed by the config file default to None: config.merge() applies
    # only the flags that were given (then $PSTORAGE_*, then the file).
    p = argparse.ArgumentParser(prog="pstoraged", description=__doc__)
    p.add_argument("--config", metavar="FILE",
                   help=f"configuration file (default {config.DEFAULT_PATH}, if it exists)")
    p.add_argument("--pool", help="the pool to open: its UUID or label (found by its superblock "
                   "on any block device); default: the one --pool-dir last served")
    p.add_argument("--pool-dir", help="the pool's runtime directory on this host: where it was "
                   f"last seen, locks (default {config.DEFAULT_POOL_DIR})")
    p.add_argument("--run-dir", help=f"sockets and export state (default {config.DEFAULT_RUN_DIR})")
    p.add_argument("--init", action="store_true", help="create the pool first if there is none (a --device that already holds a pool is imported)")
    p.add_argument("--device", help="with --init: backing block device or file")
    p.add_argument("--size", help="with --init: create the backing file with this size (e.g. 20G)")
    p.add_argument("--segment-size", default=str(DEFAULT_SEGMENT_SIZE), help="with --init")
    p.add_argument("--force", action="store_true", help="with --init: overwrite signatures")
    p.add_argument("--log-level")
    p.add_argument("--sample-interval", type=float,
                   help="seconds between capacity samples (default 300)")
    p.add_argument("--temperature-days", metavar="HOT,WARM,COLD",
                   help="data temperature limits in days (default 1,7,30)")
    p.add_argument("--destroy-grace-hours", type=float,
                   help="deleted volumes and snapshots stay recoverable this long (default 24)")
    p.add_argument("--api-listen", metavar="ADDR:PORT",
                   help="also serve the REST API on TCP (off by default; needs --api-token-file)")
    p.add_argument("--api-token-file", metavar="FILE",
                   help="bearer token for the TCP API listener (a file of mode 0600)")
    return p.parse_args(argv)


async def serve(engine: Engine, args: argparse.Namespace, cfg: config.Config,
                stored_fuse_fd: int | None = None) -> None:
    run_dir = cfg.run_dir
    data_sock = os.path.join(run_dir, "data.sock")
    dataplane = DataPlane(engine, data_sock)
    # data temperature: the heat map observes the engine's map changes (attached
    # in main) and takes the accesses of every front end's requests
    HeatMap.of(engine).listen(dataplane.executor)
    dataplane.start()
    try:
        fuse_dir = cfg.fuse.path(run_dir) if cfg.fuse.active() else None
        exports = await trio.to_thread.run_sync(ExportManager, run_dir, data_sock, fuse_dir)
        # a mount an earlier run left in systemd's fd store: take it over
        fuse = FuseFrontEnd(dataplane, fuse_dir, fd=stored_fuse_fd) if fuse_dir else None
        ctx = Context(dataplane, exports)
        ctx.fuse = fuse  # a resize drops the kernel's cached size of the volume's file
        ctx.analytics = Analytics(dataplane, sample_interval=cfg.sample_interval,
                                  thresholds=Thresholds(*cfg.temperature_days))
        ctx.catalog.grace_s = cfg.destroy_grace_hours * 3600
        # garbage collection and static wear leveling run between client batches
        # (built on the engine thread: it reads its counters from the metadata)
        await dataplane.call(lambda: engine.background.add_service(SegmentCleaner(engine)))
        dataplane.resolve = ctx.catalog.view  # VOL@SNAP exports
        eradicator = Eradicator(ctx.catalog, dataplane.call)
        sb = engine.pool.sb
        rc = cfg.replication
        ctx.replication = Replication(
            PeerStore(engine.meta, dataplane.call), sb.uuid.hex(),
            rc.name or sb.label or f"pool-{sb.uuid.hex()[:8]}", run_dir,
            listen=rc.listen, advertise=rc.advertise, ping_interval=rc.ping_interval)
        ctx.async_replication = AsyncReplication(ctx.replication, dataplane.call, ctx.catalog)
        control = ControlServer(build_app(ctx), os.path.join(run_dir, "control.sock"),
                                tcp=cfg.api_listen, token_file=cfg.api_token_file)

        async def engine_alive() -> bool:
            await dataplane.call(lambda: None)  # a round trip through the engine thread
            return True

        watchdog = sdnotify.Watchdog(engine_alive)

        def status() -> str:
            return f"pool {engine.pool.sb.uuid.hex()}, {len(engine.volumes)} volumes"

        def reload() -> None:
            nonlocal cfg
            sdnotify.reloading()
            try:
                new = config.merge(config.load(args.config), args)
            except PStorageError as e:
                log.error("reload failed, keeping the running settings: %s", e)
            else:
                now, later = config.reload_plan(cfg, new)
                logging.getLogger().setLevel(new.log_level)
                ctx.analytics.sample_interval = new.sample_interval
                th = Thresholds(*new.temperature_days)
                ctx.analytics.thresholds = ctx.analytics.tiering.thresholds = th
                ctx.catalog.grace_s = new.destroy_grace_hours * 3600
                # the running settings: what a later reload compares with
                cfg = dataclasses.replace(cfg, **{k: getattr(new, k) for k in now})
                log.info("reloaded: %s; needs restart: %s", ", ".join(now) or "nothing",
                         ", ".join(later) or "nothing")
            sdnotify.ready(status=status())
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve)
            if fuse is not None:  # volumes as files, before anyone may attach
                await nursery.start(fuse.run)
                # systemd keeps a duplicate, so the mount (and the loop devices on
                # it) outlive a restart or a crash: requests wait for the next run
                sdnotify.store_fds([fuse.connection_fd], "fuse")
            nursery.start_soon(ctx.analytics.run, name="capacity sampler")
            nursery.start_soon(eradicator.run, name="eradicator")
            await nursery.start(ctx.replication.run)  # peers; the listener if configured
            await nursery.start(ctx.async_replication.run)  # pairs and their schedules
            nursery.start_soon(watchdog.run, name="watchdog")
            ctx.ready = True
            log.info("pstoraged ready: pool %s, %d volumes, sockets in %s",
                     engine.pool.sb.uuid.hex(), len(engine.volumes), run_dir)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT,
                                           signal.SIGHUP) as signals:
                # only now: systemd may send SIGTERM (or SIGHUP) right after READY=1
                sdnotify.ready(status=status())
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        reload()
                        continue
                    log.info("%s: stopping", signal.Signals(signum).name)
                    break
            sdnotify.stopping(status="draining and committing")
            watchdog.stop()
            ctx.ready = False
            ctx.analytics.stop()
            eradicator.stop()
            ctx.async_replication.stop()
            ctx.replication.stop()
            control.stop()
            if fuse is not None:
                # with devices attached and an fd store to hold the mount, leave it
                # for the next run (a restart); else unmount and forget it
                keep = bool(loop_devices_on(fuse.mountpoint)) and "NOTIFY_SOCKET" in os.environ
                fuse.stop(keep_mount=keep)
                if not keep:
                    sdnotify.remove_fds("fuse")
    finally:
        sdnotify.stopping()  # also when serve() fails; a repeat is harmless
        with trio.CancelScope(shield=True):
            await dataplane.stop()  # drains queued I/O, commits, marks the pool clean
        if engine.closed_clean:
            log.info("pstoraged stopped cleanly")
        else:
            why = (engine.failed or dataplane.close_error
                   or "the data plane ended before it could close the pool")
            log.error("pstoraged stopped; the pool was not closed cleanly: %s", why)


def open_named_pool(cfg: config.Config) -> Pool:
    """The configured pool: by name (imported into pool_dir on the first
    start on this host, or after its device moved), else pool_dir's."""
    if cfg.pool:
        if not serves(cfg.pool_dir, cfg.pool):
            log.info("importing pool %s into %s", cfg.pool, cfg.pool_dir)
            return import_pool(cfg.pool_dir, cfg.pool)
    return open_pool(cfg.pool_dir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = config.merge(config.load(args.config), args)
    except PStorageError as e:
        print(f"pstoraged: {e}", file=sys.stderr)
        return e.exit_code
    logsetup.setup(cfg.log_level)
    stored = sdnotify.listen_fds()  # systemd's fd store, handed back after a restart
    fuse_fds = stored.get("fuse", []) if cfg.fuse.active() else []
    stored_fuse_fd = fuse_fds[0] if fuse_fds else None
    if cfg.fuse.active():  # before any thread starts: the flag is inherited per thread
        fusefs.set_io_flusher()
    try:
        if args.init and not os.path.exists(os.path.join(cfg.pool_dir, "pool.json")):
            if not args.device:
                raise PStorageError("--init needs --device", "e.g. --device /var/lib/pstorage/pool.img --size 20G")
            found = discovery.probe(args.device) if os.path.exists(args.device) else None
            if found is not None and found.has_region:
                # the device is the pool: a host that lost (or never had) the
                # pool directory imports it rather than refusing or formatting
                import_pool(cfg.pool_dir, found.uuid.hex(), search=[args.device]).close()
                log.info("imported pool %s from %s into %s", found.uuid.hex(), args.device,
                         cfg.pool_dir)
            else:
                create_pool(cfg.pool_dir, args.device,
                            file_size=parse_size(args.size) if args.size else None,
                            segment_size=parse_size(args.segment_size), force=args.force)
                log.info("created pool in %s on %s", cfg.pool_dir, args.device)
        engine = Engine(open_named_pool(cfg), index_memory=cfg.dedupe.index_memory)
        HeatMap.attach(engine)  # data temperature: an observer of the engine's maps
    except PStorageError as e:
        print(f"pstoraged: {e}", file=sys.stderr)
        return e.exit_code
    os.makedirs(cfg.run_dir, exist_ok=True)
    try:
        trio.run(serve, engine, args, cfg, stored_fuse_fd)
    except PStorageError as e:
        print(f"pstoraged: {e}", file=sys.stderr)
        return e.exit_code
    if not engine.closed_clean:  # logged by serve(); the next start replays from the last commit
        return DeviceIOError.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
