"""PStorage demo: a real, data-reducing block device with a filesystem on it.

With no arguments: start pstoraged on a pool backed by a sparse file in
/var/lib/pstorage, create volume "demo", attach it as a block device,
mkfs.ext4 and mount it, write sample data (text, duplicates, zeros, random),
print the data-reduction figures, and keep serving until Ctrl-C; then
unmount, detach and stop cleanly. Running it again reuses pool and volume.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time

from pstoraged.control.client import Client
from pstoraged.errors import DaemonUnavailable, NotFound

VENV_BIN = os.path.dirname(sys.executable)


def run(*cmd: str, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess:
    if not quiet:
        print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=check, text=True, capture_output=quiet)


def pstorage(args: argparse.Namespace, *cmd: str) -> str:
    p = subprocess.run([os.path.join(VENV_BIN, "pstorage"), "--socket", args.control, *cmd],
                       text=True, capture_output=True)
    if p.returncode:
        raise SystemExit(f"pstorage {' '.join(cmd)} failed: {p.stderr.strip()}")
    return p.stdout


def sample_data(root: str) -> None:
    """Realistic mix: documentation text, a duplicated tree, zeros, random data."""
    docs = os.path.join(root, "docs")
    for old in (docs, os.path.join(root, "docs-copy")):  # an earlier run's: copytree
        shutil.rmtree(old, ignore_errors=True)            # cannot copy over its symlinks
    if os.path.isdir("/usr/share/doc"):
        shutil.copytree("/usr/share/doc", docs, symlinks=True, dirs_exist_ok=True,
                        ignore_dangling_symlinks=True)
        shutil.copytree(docs, os.path.join(root, "docs-copy"), symlinks=True, dirs_exist_ok=True)
    with open(os.path.join(root, "zeros.img"), "wb") as f:
        f.write(bytes(64 << 20))
    rng = random.Random(42)
    with open(os.path.join(root, "random.bin"), "wb") as f:
        f.write(rng.randbytes(32 << 20))
    with open(os.path.join(root, "app.log"), "w") as f:
        for i in range(200000):
            f.write(f"2026-11-29T10:{i % 60:02d}:00Z INFO request id={i} status=200 bytes={i * 7 % 9000}\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool-dir", default="/var/lib/pstorage")
    ap.add_argument("--run-dir", default="/run/pstorage")
    ap.add_argument("--pool-size", default="20G")
    ap.add_argument("--volume", default="demo")
    ap.add_argument("--volume-size", default="10G")
    ap.add_argument("--mount", default="/mnt/pstorage-demo")
    ap.add_argument("--no-wait", action="store_true", help="clean up right after printing stats")
    args = ap.parse_args()
    args.control = os.path.join(args.run_dir, "control.sock")
    if os.geteuid() != 0:
        raise SystemExit("demo: run as root (it attaches a block device and mounts it)")

    os.makedirs(args.pool_dir, mode=0o700, exist_ok=True)
    # the demo's own (maybe made by an older version): pstoraged refuses them open to others
    os.chmod(args.pool_dir, 0o700)
    if os.path.exists(os.path.join(args.pool_dir, "pool.img")):
        os.chmod(os.path.join(args.pool_dir, "pool.img"), 0o600)
    made_run_dir = not os.path.exists(args.run_dir)
    log_path = os.path.join(args.pool_dir, "pstoraged.log")
    print(f"starting pstoraged (pool in {args.pool_dir}, log {log_path})")
    with open(log_path, "ab") as logf:
        daemon = subprocess.Popen(
            [os.path.join(VENV_BIN, "pstoraged"), "--pool-dir", args.pool_dir,
             "--run-dir", args.run_dir, "--init", "--device", os.path.join(args.pool_dir, "pool.img"),
             "--size", args.pool_size],
            stdout=logf, stderr=logf, start_new_session=True)  # Ctrl-C is ours to handle
    mounted = made_mount = False
    # Ctrl-C (and a plain kill) ends the wait below and runs the cleanup, also
    # when a shell started us in the background with SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # Everything from here on is undone in `finally`, whenever Ctrl-C comes.
    try:
        client = Client(args.control)
        for _ in range(600):
            try:
                status, _, body = client.raw("GET", "/healthz")
                if status == 200:
                    break
                # 503 "starting" (e.g. a reopened pool's dedupe index loading): wait
                if b'"starting"' not in body:
                    raise SystemExit(f"pstoraged is not healthy: {body.decode(errors='replace')}"
                                     f"; see {log_path}")
            except DaemonUnavailable:
                pass
            if daemon.poll() is not None:
                raise SystemExit(f"pstoraged exited; see {log_path}") from None
            time.sleep(0.1)
        try:
            client.get(f"/api/v1/volumes/{args.volume}")
        except NotFound:
            print(pstorage(args, "volume", "create", args.volume, "--size", args.volume_size).strip())
        uri = pstorage(args, "export", args.volume).strip()
        dev = pstorage(args, "attach", args.volume).strip()
        print(f"volume {args.volume}: NBD {uri}\n                block device {dev}")
        if run("blkid", "-p", dev, check=False, quiet=True).returncode != 0:
            run("mkfs.ext4", "-q", "-L", args.volume, dev)
        if not os.path.isdir(args.mount):
            os.makedirs(args.mount)
            made_mount = True
        run("mount", dev, args.mount)
        mounted = True
        print("writing sample data ...", flush=True)
        t = time.monotonic()
        sample_data(args.mount)
        run("sync")
        print(f"  done in {time.monotonic() - t:.1f} s")
        run("df", "-h", args.mount)
        print()
        print(pstorage(args, "stats"))
        if not args.no_wait:
            print(f"\nserving {dev} mounted on {args.mount}; NBD clients can use {uri}")
            print("press Ctrl-C to unmount, detach and stop")
            signal.pause()
    except KeyboardInterrupt:
        print()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # finish cleaning up
        print("cleaning up ...", flush=True)
        if mounted:
            run("umount", args.mount, check=False)
        if made_mount:
            try:
                os.rmdir(args.mount)
            except OSError:
                pass
        subprocess.run([os.path.join(VENV_BIN, "pstorage"), "--socket", args.control,
                        "unexport", args.volume, "--force"], capture_output=True)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=120)
        exports = os.path.join(args.run_dir, "exports")
        if made_run_dir and not (os.path.isdir(exports) and os.listdir(exports)):
            shutil.rmtree(args.run_dir, ignore_errors=True)  # only stale sockets are left
        print(f"unmounted, detached, pstoraged stopped cleanly; the pool stays in {args.pool_dir}"
              " for the next run (remove that directory to start afresh)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
