"""A Debian kernel and a busybox initramfs for booting a throwaway VM in tests.

What is downloaded, from where, and where it is kept:

- the kernel package that `linux-image-amd64` depends on (linux-image-<abi>-amd64,
  about 70 MB), fetched with `apt-get download` from the Debian mirror in the host's
  apt sources. It is not installed: `dpkg-deb -x` unpacks it into a scratch directory,
  and only vmlinuz and the few modules the guest needs are kept;
- busybox-static (about 1 MB), the same way, only when the host's /bin/busybox is
  not a static binary (Debian's `busybox` package is dynamic).

Both .debs and the extracted files stay in /var/cache/pstorage-test/vm (or
$PSTORAGE_TEST_CACHE/vm) and are reused: once that is filled no network is needed.
A cached kernel is used as it is, even after Debian moves on; delete the directory
to fetch the current one.
"""

from __future__ import annotations

import fcntl
import gzip
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("PSTORAGE_TEST_CACHE", "/var/cache/pstorage-test")) / "vm"

# What a guest needs to mount an ext4 virtio disk. crc32c_generic is listed because
# ext4 and jbd2 get crc32c through the crypto API (a softdep that modules.dep does
# not record and that nothing would resolve without modprobe in the initramfs).
GUEST_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")


class Unavailable(Exception):
    """Nothing cached and no way to fetch it (no network, not Debian): skip, don't fail."""


@dataclass
class Kernel:
    version: str
    vmlinuz: Path
    modules: list[Path]  # in load order, dependencies first


@contextmanager
def _locked() -> Iterator[None]:
    """Serialise cache fills between concurrent test runs on one machine."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _has_default_route() -> bool:
    for path, default in (("/proc/net/route", "00000000"),
                          ("/proc/net/ipv6_route", "0" * 32 + " 00")):
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if path.endswith("ipv6_route"):
                if line.startswith(default) and fields[-1] != "lo":
                    return True
            elif len(fields) > 1 and fields[1] == default:
                return True
    return False


def _fetch_failed(what: str, detail: str) -> Exception:
    if not _has_default_route():
        return Unavailable(f"no network (no default route) and {what} is not cached in {CACHE}")
    return RuntimeError(
        f"could not fetch {what} from the Debian mirror (is it reachable? are the apt "
        f"lists current? try `apt-get update`); cache: {CACHE}\n{detail.strip()}")


def _apt_download(package: str) -> Path:
    """The package's .deb, from the cache or `apt-get download` (no install)."""
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    cached = sorted(debs.glob(f"{package}_*.deb"))
    if cached:
        return cached[-1]
    if shutil.which("apt-get") is None:
        raise Unavailable(f"no apt-get (not Debian): cannot fetch {package}")
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        # the sandbox user _apt cannot write to root's cache directory
        p = subprocess.run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
                            package], cwd=tmp, capture_output=True, text=True, timeout=900)
        got = list(Path(tmp).glob("*.deb"))
        if p.returncode or len(got) != 1:
            raise _fetch_failed(package, p.stderr + p.stdout)
        return got[0].rename(debs / got[0].name)  # whole or not at all


def _kernel_package() -> str:
    if shutil.which("apt-cache") is None:
        raise Unavailable("no apt-cache (not Debian): cannot find a Debian kernel")
    p = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True,
                       text=True, timeout=60)
    names = re.findall(r"Depends: (linux-image-[0-9][^\s<>]*-amd64)\s", p.stdout)
    if p.returncode or not names:
        raise _fetch_failed("the name of the current kernel package (linux-image-amd64)",
                            p.stderr or "apt-cache knows no linux-image-amd64")
    return names[0]


def _module_name(path: str) -> str:
    base = os.path.basename(path).split(".ko")[0]
    return base.replace("-", "_")


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        import zstandard  # a dependency of pstorage itself

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def _load_order(moddir: Path, wanted: tuple[str, ...]) -> list[Path]:
    """The modules to insmod for `wanted`, dependencies first, from modules.dep."""
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {_module_name(m): m for m in deps}
    builtin = {_module_name(m) for m in (moddir / "modules.builtin").read_text().split()}
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        for dep in deps[mod]:
            visit(dep)
        order.append(mod)

    for name in wanted:
        if name in by_name:
            visit(by_name[name])
        elif name not in builtin:
            raise RuntimeError(f"kernel in {moddir} has no module or built-in {name}")
    return [moddir / m for m in order]


def kernel() -> Kernel:
    """A Debian kernel and its virtio/ext4 modules, from the cache or fetched once."""
    with _locked():
        ready = sorted(CACHE.glob("kernel-*/load-order"), key=lambda p: p.stat().st_mtime)
        if not ready:
            _build_kernel_cache()
            ready = sorted(CACHE.glob("kernel-*/load-order"))
        kdir = ready[-1].parent
        names = ready[-1].read_text().split()
        return Kernel(kdir.name.removeprefix("kernel-"), kdir / "vmlinuz",
                      [kdir / "modules" / n for n in names])


def _build_kernel_cache() -> None:
    deb = _apt_download(_kernel_package())
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="extract-") as tmp:
        root = Path(tmp) / "root"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, timeout=300)
        (version,) = [d.name for d in (root / "lib/modules").iterdir()]
        # the package ships no modules.dep (its postinst runs depmod): make one
        subprocess.run(["depmod", "-b", str(root), version], check=True, timeout=120)
        moddir = root / "lib/modules" / version
        out = Path(tmp) / "kernel"
        (out / "modules").mkdir(parents=True)
        shutil.copyfile(root / "boot" / f"vmlinuz-{version}", out / "vmlinuz")
        names = []
        for ko in _load_order(moddir, GUEST_MODULES):
            names.append(_module_name(ko.name) + ".ko")
            (out / "modules" / names[-1]).write_bytes(_read_module(ko))
        (out / "load-order").write_text("\n".join(names) + "\n")
        final = CACHE / f"kernel-{version}"
        shutil.rmtree(final, ignore_errors=True)
        out.rename(final)


def _is_static_elf(path: Path) -> bool:
    """An ELF executable without a PT_INTERP program header needs no shared libraries."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:  # 64-bit little-endian
            return False
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def busybox() -> Path:
    """A static busybox: the host's (busybox-static) or one fetched into the cache."""
    host = Path("/bin/busybox")
    if host.exists() and _is_static_elf(host):
        return host
    cached = CACHE / "busybox"
    with _locked():
        if not cached.exists():
            deb = _apt_download("busybox-static")
            with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
                subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True, timeout=120)
                shutil.copyfile(Path(tmp) / "bin/busybox", Path(tmp) / "bb")
                os.chmod(Path(tmp) / "bb", 0o755)
                os.rename(Path(tmp) / "bb", cached)
    return cached


# initramfs -----------------------------------------------------------------------

S_IFDIR, S_IFREG, S_IFLNK, S_IFCHR = 0o040000, 0o100000, 0o120000, 0o020000


def cpio_newc(entries: list[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """An archive in the kernel's initramfs format ("newc"): (name, mode, data, rdev)."""
    out = bytearray()

    def pad() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data, (rmaj, rmin)) in enumerate(
            [*entries, ("TRAILER!!!", 0, b"", (0, 0))], start=1):
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rmaj, rmin, len(name) + 1, 0)
        out += b"070701" + b"".join(b"%08X" % v for v in fields) + name.encode() + b"\0"
        pad()
        out += data
        pad()
    return bytes(out)


def initramfs(init: str, kern: Kernel, busybox_path: Path) -> bytes:
    """A gzipped initramfs: busybox as /bin/sh, `init` as /init, the modules and
    /lib/modules/load-order (their insmod order)."""
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = [
        (d, S_IFDIR | 0o755, b"", (0, 0))
        for d in ("bin", "dev", "proc", "sys", "mnt", "lib", "lib/modules")
    ]
    # the kernel opens /dev/console for /init before anything could mount devtmpfs
    entries.append(("dev/console", S_IFCHR | 0o600, b"", (5, 1)))
    entries.append(("bin/busybox", S_IFREG | 0o755, busybox_path.read_bytes(), (0, 0)))
    entries.append(("bin/sh", S_IFLNK | 0o777, b"busybox", (0, 0)))
    entries.append(("init", S_IFREG | 0o755, init.encode(), (0, 0)))
    for ko in kern.modules:
        entries.append((f"lib/modules/{ko.name}", S_IFREG | 0o644, ko.read_bytes(), (0, 0)))
    order = "".join(ko.name + "\n" for ko in kern.modules).encode()
    entries.append(("lib/modules/load-order", S_IFREG | 0o644, order, (0, 0)))
    return gzip.compress(cpio_newc(entries), compresslevel=1)
