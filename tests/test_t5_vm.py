"""Level 5: volumes as VM disks: qemu-img/qemu-io over NBD, and a real guest on KVM.

The VM test boots a Debian kernel (fetched once from the Debian mirror into
/var/cache/pstorage-test/vm, see tests/vm_util.py) with a busybox initramfs and
the volume as its virtio disk, straight from the volume's NBD export.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from . import vm_util
from .daemon_util import Daemon

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (shutil.which("nbdkit") and shutil.which("qemu-img")
                            and shutil.which("qemu-io")),
                       reason="nbdkit / qemu-utils not installed (run scripts/setup)"),
]

MiB = 1 << 20


def run(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} -> {p.returncode}\n{p.stdout}{p.stderr}"
    return p


def qemu_io(fmt: str, target: str, *commands: str) -> subprocess.CompletedProcess:
    """qemu-io with one -c per command; fails unless every command succeeded."""
    args = [a for c in commands for a in ("-c", c)]
    p = run("qemu-io", "-f", fmt, *args, target)
    # belt and braces: old qemu-io versions printed failures but exited 0
    assert "fail" not in p.stdout.lower() and "error" not in p.stdout.lower(), p.stdout
    return p


def test_qemu_img_and_qemu_io_on_a_volume(daemon, tmp_path):
    image = str(tmp_path / "disk.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", image, "48M")
    # known content: two patterns, an explicit zero range and holes
    writes = ["write -P 0xab 0 1M", "write -P 0xcd 8M 2M", "write -z 16M 1M",
              "write -P 0xef 47M 1M"]
    qemu_io("qcow2", image, *writes)

    # the volume is larger than the image: the tail must read as zeros
    daemon.cli("volume", "create", "vm", "--size", "64M")
    uri = daemon.cli("export", "vm").stdout.strip()
    assert uri.startswith("nbd+unix:///vm?socket="), uri
    info = run("qemu-img", "info", "-f", "raw", "--output=json", uri).stdout
    assert '"virtual-size": 67108864' in info, info

    # -n: write into the existing export instead of trying to create it
    run("qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", image, uri)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, uri)

    # pattern reads through a fresh NBD connection
    qemu_io("raw", uri, "read -P 0xab 0 1M", "read -P 0 1M 7M", "read -P 0xcd 8M 2M",
            "read -P 0 16M 1M", "read -P 0xef 47M 1M", "read -P 0 48M 16M")
    # the checker itself: a wrong pattern must be reported
    bad = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x00 0 4k", uri],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "Pattern verification failed" in bad.stdout, bad

    # writes: aligned, unaligned (read-modify-write by qemu), zeroing, past the image end
    more = ["write -P 0x5a 4M 1M", "write -P 0x11 1000 3000", "write -z 8704k 512k",
            "write -P 0x77 60M 4k"]
    qemu_io("raw", uri, *more, "read -P 0x5a 4M 1M")
    qemu_io("raw", uri, "read -P 0xab 0 1000", "read -P 0x11 1000 3000",
            "read -P 0xab 4000 1044576", "read -P 0x5a 4M 1M", "read -P 0xcd 8M 512k",
            "read -P 0 8704k 512k", "read -P 0xcd 9M 1M", "read -P 0x77 60M 4k",
            "read -P 0 61M 3M")
    # the image no longer matches the volume (exit 1: different, 2+: error)
    diff = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, uri],
                          capture_output=True, text=True, timeout=60)
    assert diff.returncode == 1, diff

    # the same writes applied to a local copy give what the volume should hold
    expected = str(tmp_path / "expected.raw")
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, expected)
    run("qemu-img", "resize", "-q", "-f", "raw", expected, "64M")
    qemu_io("raw", expected, *more)

    # out again, into a file of each format
    for fmt in ("qcow2", "raw"):
        back = str(tmp_path / f"back.{fmt}")
        run("qemu-img", "convert", "-f", "raw", "-O", fmt, uri, back)
        run("qemu-img", "compare", "-f", fmt, "-F", "raw", back, uri)
        run("qemu-img", "compare", "-f", fmt, "-F", "raw", back, expected)
    assert Path(expected).read_bytes() == Path(tmp_path / "back.raw").read_bytes()


# the VM ----------------------------------------------------------------------------

OK, FAIL = "PSTORAGE-GUEST-OK", "PSTORAGE-GUEST-FAIL"
SEQ_N = 300_000  # lines of `seq` the guest writes: ~2 MB of position-dependent text

# The guest's /init: load the modules, mount the volume (/dev/vda), check what the
# host left there, write files the host checks afterwards, unmount and power off.
INIT = r"""#!/bin/sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# if poweroff itself fails, /init exits: a panic, and panic=-1 -no-reboot ends qemu too
fail() { echo "@FAIL@: $*"; poweroff -f; exit 1; }
for m in $(cat /lib/modules/load-order); do
    insmod /lib/modules/$m || fail "insmod $m"
done
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1)); [ $i -gt 200 ] && fail "no /dev/vda"; sleep 0.05
done
echo "vda-sectors=$(cat /sys/block/vda/size)"
mount -t ext4 /dev/vda /mnt || fail "mount"
echo "host-token=$(cat /mnt/from-host.txt)"
echo "host-sha=$(sha256sum /mnt/from-host.bin)"
echo "hello from the guest, token @TOKEN@" > /mnt/from-guest.txt || fail "write txt"
seq 1 @SEQ_N@ > /mnt/seq.txt || fail "write seq"
dd if=/dev/zero bs=1M count=4 2>/dev/null | tr '\000' '\253' > /mnt/ab.bin || fail "write ab"
sync
umount /mnt || fail "umount"
echo "@OK@"
poweroff -f
"""


def guest_init(token: str) -> str:
    return (INIT.replace("@FAIL@", FAIL).replace("@OK@", OK).replace("@TOKEN@", token)
            .replace("@SEQ_N@", str(SEQ_N)))


def requests(d: Daemon, volume: str, op: str) -> float:
    """The daemon's count of `op` requests on `volume` (Prometheus /metrics)."""
    key = f'pstorage_volume_requests_total{{op="{op}",volume="{volume}"}} '
    lines = [ln for ln in d.client.get("/metrics").splitlines() if ln.startswith(key)]
    return float(lines[0].split()[-1]) if lines else 0.0


def accelerator() -> list[str]:
    """KVM, unless /dev/kvm is PVM (a software MMU mode of some cloud sandboxes): that only
    runs kernels built as PVM guests, and a stock Debian kernel hangs there. TCG
    (emulation) boots this guest in a few seconds."""
    if os.path.exists("/sys/module/kvm_pvm"):
        return ["-accel", "tcg"]
    # qemu's default CPU model is enough here and portable ("-cpu host" asks for MSRs,
    # 0x10a here, that some hosts refuse)
    return ["-accel", "kvm"]


def attach(d: Daemon, name: str) -> str:
    dev = d.cli("attach", name).stdout.strip()
    assert dev.startswith("/dev/"), dev
    return dev


def mount(d: Daemon, dev: str, *opts: str) -> str:
    mnt = tempfile.mkdtemp(prefix="pstvm")
    run("mount", *opts, dev, mnt)
    d.__dict__.setdefault("mounts", []).append(mnt)  # fs_daemon unmounts on failure
    return mnt


def umount(d: Daemon, mnt: str) -> None:
    run("umount", mnt)
    d.__dict__["mounts"].remove(mnt)
    os.rmdir(mnt)


@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm (KVM unavailable)")
@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"),
                    reason="qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
@pytest.mark.skipif(os.geteuid() != 0, reason="attaching block devices needs root")
@pytest.mark.skipif(not (os.path.exists("/dev/fuse") and shutil.which("nbdfuse")
                         and shutil.which("mkfs.ext4")),
                    reason="no /dev/fuse, nbdfuse or e2fsprogs (run scripts/setup)")
def test_vm_boots_with_the_volume_as_its_virtio_disk(fs_daemon, tmp_path):
    d = fs_daemon
    try:
        kern, busybox = vm_util.kernel(), vm_util.busybox()
    except vm_util.Unavailable as e:
        pytest.skip(str(e))
    token = secrets.token_hex(8)
    initrd = tmp_path / "initrd.gz"
    initrd.write_bytes(vm_util.initramfs(guest_init(token), kern, busybox))

    # the host makes the filesystem and leaves files for the guest to check
    d.cli("volume", "create", "vmdisk", "--size", "256M")
    dev = attach(d, "vmdisk")
    run("mkfs.ext4", "-q", "-F", dev)
    mnt = mount(d, dev)
    Path(mnt, "from-host.txt").write_text(token + "\n")
    host_bin = os.urandom(3 * MiB)
    Path(mnt, "from-host.bin").write_bytes(host_bin)
    umount(d, mnt)
    d.cli("detach", "vmdisk")

    uri = d.cli("export", "vmdisk").stdout.strip()
    cmd = ["qemu-system-x86_64", *accelerator(), "-m", "256", "-smp", "1",
           "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
           "-no-reboot", "-kernel", str(kern.vmlinuz), "-initrd", str(initrd),
           "-append", "console=ttyS0 panic=-1 quiet",
           # cache=none: no host page cache between the guest and the volume
           "-drive", f"file={uri},format=raw,if=virtio,cache=none"]
    before = {op: requests(d, "vmdisk", op) for op in ("read", "write", "flush")}
    t0 = time.monotonic()
    try:
        vm = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            errors="replace", timeout=60)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
        pytest.fail(f"the VM did not power off within 60 s; console:\n{out}")
    console = vm.stdout
    (tmp_path / "console.log").write_text(console + vm.stderr)
    where = f"qemu exit {vm.returncode}, {time.monotonic() - t0:.1f} s; console:\n{console}" \
            f"\nstderr:\n{vm.stderr}"
    assert vm.returncode == 0, where
    assert OK in console and FAIL not in console, where
    # the guest saw the whole volume and the host's files, byte for byte
    assert f"vda-sectors={(256 * MiB) // 512}" in console, where
    assert f"host-token={token}" in console, where
    assert f"host-sha={hashlib.sha256(host_bin).hexdigest()}" in console, where
    # the guest's reads, writes and flushes (sync, umount) reached the daemon
    for op, n in before.items():
        assert requests(d, "vmdisk", op) > n, (op, n)

    # back on the host: the guest's files, exactly; a clean filesystem
    dev = attach(d, "vmdisk")
    run("e2fsck", "-fn", dev)
    mnt = mount(d, dev, "-o", "ro")
    assert Path(mnt, "from-guest.txt").read_text() == f"hello from the guest, token {token}\n"
    seq = Path(mnt, "seq.txt").read_bytes()
    assert seq == "".join(f"{i}\n" for i in range(1, SEQ_N + 1)).encode()
    assert Path(mnt, "ab.bin").read_bytes() == b"\xab" * (4 * MiB)
    assert Path(mnt, "from-host.bin").read_bytes() == host_bin
    umount(d, mnt)
    d.cli("detach", "vmdisk")
