"""Health of the pool's backing device, and a verdict that adds the engine's own counters.

`device_health()` reads identity from udev/sysfs (through `devices.describe`) and the health
figures from the drive's own log: `nvme smart-log -o json` (nvme-cli) for NVMe,
`smartctl --json -a` (smartmontools) for ATA/SCSI. `assess()` combines those with the
engine's counters into "healthy" | "degraded" | "failing" plus one plain sentence per problem.

A health figure is either a value a tool reported or a key in `unavailable` saying why it is
missing; we never fill a gap with a guess. Both tools may block (subprocesses, bounded by
`timeout`), so callers run `device_health()` in a worker thread.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from ..engine.devices import DeviceError, describe

try:
    import pyudev
except ImportError:  # sysfs has the same attributes
    pyudev = None

log = logging.getLogger(__name__)

Kind = Literal["nvme", "ata/scsi", "loop", "file", "other block"]
SmartSource = Literal["nvme smart-log", "smartctl"]
Status = Literal["healthy", "degraded", "failing"]

# ---- Rules applied by assess(). Each reason sentence names the figure and its threshold. ----

PERCENT_USED_DEGRADED = 90  # drive-reported share of rated endurance used (may exceed 100)
PERCENT_USED_FAILING = 100  # rated endurance exhausted: the vendor no longer promises retention
TEMP_DEGRADED_C = 70  # SSDs start throttling around 70-80 °C
TEMP_DEGRADED_ROTATIONAL_C = 60  # hard disks are typically rated up to 60 °C
WEAR_SPREAD_CYCLES = 50  # erase-count spread (max - min) is uneven only when it exceeds both
WEAR_SPREAD_FRACTION = 0.20  # ... this many cycles and this share of the mean erase count
FREE_DEGRADED = 0.10  # below 10% free the segment cleaner works hard to find space
FREE_FAILING = 0.02  # below 2% free, writes are about to fail with ENOSPC
# Any of these sectors > 0 means the drive has already lost or remapped media: degraded.
SECTOR_FIGURES = ("reallocated_sectors", "pending_sectors", "offline_uncorrectable")
# Also: smart_passed false (the drive's own verdict, or smartctl exit bit 3) is failing;
# smartctl exit bit 4 (a pre-failure attribute at or below its threshold now) is degraded;
# media_errors, checksum_errors, io_errors and read_errors above 0 are degraded; pool_failed is
# failing; a background service that keeps failing (background.py) is degraded.
# Without a history we cannot tell whether a counter is growing, so any nonzero count counts.

# NVMe SMART/Health log byte 0. (bit, name, meaning, severity when set)
CRITICAL_WARNING_BITS: tuple[tuple[int, str, str, Status], ...] = (
    (0x01, "spare_below_threshold", "available spare capacity is below its threshold", "failing"),
    (0x02, "temperature", "a temperature is outside the drive's limits", "degraded"),
    (0x04, "reliability_degraded", "NVM subsystem reliability is degraded by media errors",
     "failing"),
    (0x08, "read_only", "the media has been placed in read-only mode", "failing"),
    (0x10, "volatile_backup_failed", "the volatile memory backup device has failed",
     "degraded"),
    (0x20, "persistent_memory_read_only", "the persistent memory region is read-only",
     "degraded"),
)

# smartctl's exit status is a bit mask (smartctl(8) "RETURN VALUES"); bits 0-1 mean no data.
SMARTCTL_EXIT_BITS = (
    "command_line_error", "device_open_failed", "smart_command_failed", "disk_failing",
    "prefail_at_threshold", "attribute_was_at_threshold", "error_log_has_errors",
    "self_test_log_has_errors",
)

# ---- Figures and units. ----

FIGURES: tuple[str, ...] = (
    "smart_passed", "critical_warning", "percentage_used", "available_spare",
    "available_spare_threshold", "media_errors", "reallocated_sectors", "pending_sectors",
    "offline_uncorrectable", "temperature_c", "power_on_hours", "unsafe_shutdowns",
    "data_written_bytes",
)
NVME_DATA_UNIT = 512_000  # NVMe counts data units of 1000 blocks of 512 bytes
KELVIN_OFFSET = 273  # both nvme-cli and smartctl print Kelvin - 273
# ATA attributes whose normalized value counts remaining life down from 100 (smartctl
# drivedb names; ids are reused by other vendors for other things, so match by name).
WEAR_ATTRIBUTES = ("Media_Wearout_Indicator", "SSD_Life_Left", "Percent_Lifetime_Remain",
                   "Wear_Leveling_Count")
_PACKAGE = {"nvme": "nvme-cli", "smartctl": "smartmontools (smartctl)"}
_NVME_ONLY = ("critical_warning", "available_spare", "available_spare_threshold")
_OTHER = {"dm-": "device-mapper", "md": "md RAID", "vd": "virtio", "xvd": "Xen virtual",
          "nbd": "network block device", "rbd": "Ceph RBD", "zram": "compressed RAM",
          "mmcblk": "MMC/SD", "pmem": "persistent memory"}

Run = Callable[..., "subprocess.CompletedProcess[str]"]


@dataclass(frozen=True, slots=True)
class DeviceHealth:
    """Identity plus health figures; each figure None is explained in `unavailable`.

    `unavailable` may also hold "identity" when the device could not be read for
    `devices.describe` (identity then comes from sysfs alone).
    """

    path: str
    kind: Kind
    model: str | None
    serial: str | None
    firmware: str | None
    size_bytes: int | None
    logical_block_size: int | None
    physical_block_size: int | None
    rotational: bool | None
    backing_file: str | None  # loop devices: the file behind them
    host_device: str | None  # files and loop devices: the block device holding the file
    smart: SmartSource | None  # which tool the figures below came from
    smart_passed: bool | None  # smartctl's overall verdict
    critical_warning: int | None  # NVMe bit mask, see CRITICAL_WARNING_BITS
    percentage_used: int | None
    wear_source: str | None  # where percentage_used came from, when it was derived
    available_spare: int | None  # percent
    available_spare_threshold: int | None  # percent
    media_errors: int | None
    reallocated_sectors: int | None
    pending_sectors: int | None
    offline_uncorrectable: int | None
    temperature_c: int | None
    power_on_hours: int | None
    unsafe_shutdowns: int | None
    data_written_bytes: int | None
    smartctl_flags: tuple[str, ...] = ()  # names of the set bits of smartctl's exit status
    unavailable: Mapping[str, str] = field(default_factory=dict)  # figure -> why it is missing

    @property
    def critical_warnings(self) -> tuple[str, ...]:
        cw = self.critical_warning or 0
        return tuple(name for bit, name, _, _ in CRITICAL_WARNING_BITS if cw & bit)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["smartctl_flags"] = list(self.smartctl_flags)
        out["critical_warnings"] = (None if self.critical_warning is None
                                    else list(self.critical_warnings))
        out["unavailable"] = dict(self.unavailable)
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineHealthCounters:
    """What the engine knows about its own health; the REST layer fills this in."""

    free_fraction: float  # free / usable capacity, 0.0 .. 1.0
    checksum_errors: int = 0  # reads that failed verification (over the pool's life)
    io_errors: int = 0  # writes/syncs the backing device failed (over the pool's life)
    read_errors: int = 0  # reads the backing device failed, since the daemon started
    last_read_error: str | None = None  # e.g. "EIO at offset 4096"
    # one sentence per background service whose last run failed (ServiceFailure.reason)
    background_failures: tuple[str, ...] = ()
    pool_failed: str | None = None  # why the engine refuses writes, None while it accepts them
    erase_count_min: int | None = None  # over all segments; None while there are none
    erase_count_max: int | None = None
    erase_count_mean: float | None = None
    gc_write_amplification: float | None = None  # None: no data written yet (or no cleaner)

    @classmethod
    def from_erase_counts(cls, erase_counts: Iterable[int], **kw: Any) -> EngineHealthCounters:
        counts = [int(c) for c in erase_counts]  # also takes a numpy array
        if not counts:
            return cls(**kw)
        return cls(erase_count_min=min(counts), erase_count_max=max(counts),
                   erase_count_mean=sum(counts) / len(counts), **kw)

    @property
    def wear_spread(self) -> int | None:
        if self.erase_count_min is None or self.erase_count_max is None:
            return None
        return self.erase_count_max - self.erase_count_min

    def unavailable(self) -> dict[str, str]:
        out = {}
        if self.wear_spread is None:
            out["wear_spread"] = "the pool has no segments yet"
        if self.gc_write_amplification is None:
            out["gc_write_amplification"] = ("no data written yet: it is (user + moved) / user "
                                              "record bytes")
        return out

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["wear_spread"] = self.wear_spread
        out["background_failures"] = list(self.background_failures)
        return out


@dataclass(frozen=True, slots=True)
class HealthReport:
    status: Status
    reasons: tuple[str, ...]
    checked: int  # how many figures the rules could look at
    device: DeviceHealth
    engine: EngineHealthCounters
    unavailable: Mapping[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "reasons": list(self.reasons), "checked": self.checked,
                "device": self.device.to_dict(), "engine": self.engine.to_dict(),
                "unavailable": dict(self.unavailable)}


# ---- Reading the device. ----

def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


@dataclass(frozen=True, slots=True)
class _Block:
    name: str  # the node's sysfs name: sda1
    disk: str  # its whole disk: sda
    sysdir: str
    diskdir: str
    subsystem: str | None  # bus of the disk's parent device: nvme, scsi, virtio, ...


def _block(st: os.stat_result) -> _Block | None:
    sysdir = os.path.realpath(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
    if not os.path.isdir(sysdir):
        return None
    diskdir = os.path.dirname(sysdir) if os.path.exists(f"{sysdir}/partition") else sysdir
    sub = f"{diskdir}/device/subsystem"
    return _Block(os.path.basename(sysdir), os.path.basename(diskdir), sysdir, diskdir,
                  os.path.basename(os.path.realpath(sub)) if os.path.exists(sub) else None)


def classify(disk: str, subsystem: str | None) -> Kind:
    """Kind of a whole disk from its sysfs name and the bus its parent device sits on."""
    if disk.startswith("loop"):
        return "loop"
    # "nvme" for a controller, "nvme-subsystem" for a native-multipath namespace head
    if (subsystem or "").startswith("nvme") or re.fullmatch(r"nvme\d+(c\d+)?n\d+", disk):
        return "nvme"
    if subsystem == "scsi" or (subsystem is None and re.fullmatch(r"(sd|hd)[a-z]+", disk)):
        return "ata/scsi"  # SATA, SAS, USB and virtio-scsi disks all sit on the SCSI bus
    return "other block"


def _host_device(path: str) -> str | None:
    """The block device holding a file; None on btrfs/overlay/tmpfs (anonymous st_dev)."""
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return None
    if os.major(dev) == 0:
        return None
    sysdir = os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    return f"/dev/{os.path.basename(sysdir)}" if os.path.isdir(sysdir) else None


def _identity(path: str, st: os.stat_result, blk: _Block | None) -> tuple[dict[str, Any],
                                                                          str | None]:
    try:
        info = describe(path)
        ident: dict[str, Any] = {
            "model": info.model, "serial": info.serial, "size_bytes": info.size_bytes,
            "logical_block_size": info.logical_block_size,
            "physical_block_size": info.physical_block_size, "rotational": info.rotational}
        problem = None
    except DeviceError as e:
        # describe() reads the first blocks; on a dying disk that is exactly what fails, and
        # that is when the SMART figures matter most, so fall back to sysfs and go on.
        log.debug("describe(%s) failed: %s", path, e)
        problem = str(e)
        ident = {"model": None, "serial": None, "size_bytes": None,
                 "logical_block_size": None, "physical_block_size": None, "rotational": None}
        if blk is None:
            ident["size_bytes"] = st.st_size
        else:
            sectors = _read(f"{blk.sysdir}/size")
            ident["size_bytes"] = int(sectors) * 512 if sectors and sectors.isdigit() else None
            for key in ("logical_block_size", "physical_block_size"):
                v = _read(f"{blk.diskdir}/queue/{key}")
                ident[key] = int(v) if v and v.isdigit() else None
            rot = _read(f"{blk.diskdir}/queue/rotational")
            ident["rotational"] = None if rot is None else rot == "1"
            ident["model"] = _read(f"{blk.diskdir}/device/model")
            ident["serial"] = _read(f"{blk.diskdir}/serial") or _read(
                f"{blk.diskdir}/device/serial")
    ident["firmware"] = _firmware(path, blk)
    return ident, problem


def _firmware(path: str, blk: _Block | None) -> str | None:
    if blk is None:
        return None
    if pyudev is not None:
        try:
            props = pyudev.Devices.from_device_file(pyudev.Context(), path).properties
            if props.get("ID_REVISION"):  # set only when udevd ran
                return str(props["ID_REVISION"]).strip() or None
        except Exception as e:  # no libudev or an odd sysfs: the sysfs reads below still work
            log.debug("pyudev failed on %s: %s", path, e)
    # NVMe controllers name it firmware_rev, SCSI devices rev
    return _read(f"{blk.diskdir}/device/firmware_rev") or _read(f"{blk.diskdir}/device/rev")


def _count(v: object) -> int | None:
    """A non-negative integer from a JSON number or a numeric string ("1,234", "12.000000")."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v if v >= 0 else None
    if isinstance(v, float):
        return int(v) if math.isfinite(v) and v >= 0 and v == int(v) else None
    if isinstance(v, str):
        try:
            d = Decimal(v.strip().replace(",", ""))
        except InvalidOperation:
            return None
        return int(d) if d.is_finite() and d >= 0 and d == d.to_integral_value() else None
    return None


def _dig(doc: object, *keys: str) -> object:
    for k in keys:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(k)
    return doc


def _first_line(text: str | None) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    line = lines[0] if lines else "no message"
    return line if len(line) <= 200 else line[:197] + "..."


class _Figures:
    """Collects figure values, and for each missing one the reason."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.unavailable: dict[str, str] = {}
        self.source: SmartSource | None = None
        self.wear_source: str | None = None
        self.flags: tuple[str, ...] = ()
        self.identity: dict[str, Any] = {}  # what the tool says about model/serial/firmware

    def count(self, name: str, raw: object, scale: int = 1) -> None:
        if raw is None or name in self.values:
            return  # absent: finish() explains it
        n = _count(raw)
        if n is None:
            self.gap(name, f"{self.source} reported {raw!r}, which is not a count")
        else:
            self.values[name] = n * scale

    def gap(self, name: str, why: str) -> None:
        if name not in self.values:
            self.unavailable.setdefault(name, why)

    def gaps(self, names: Iterable[str], why: str) -> None:
        for n in names:
            self.gap(n, why)

    def finish(self, note: str = "") -> None:
        self.gaps(FIGURES, f"{self.source or 'the device'} did not report it{note}")


def _call(argv: list[str], label: str, run: Run, timeout: float
          ) -> tuple[subprocess.CompletedProcess[str] | None, str | None, bool]:
    """(result, reason it could not run, tool missing)."""
    try:
        r = run(argv, capture_output=True, text=True, errors="replace", timeout=timeout,
                check=False)
    except FileNotFoundError:
        return None, f"{_PACKAGE.get(argv[0], argv[0])} is not installed", True
    except subprocess.TimeoutExpired:
        return None, f"{label} timed out after {timeout:g} s", False
    except OSError as e:
        return None, f"cannot run {argv[0]}: {e.strerror or e}", False
    return r, None, False


def _json(text: str | None) -> dict[str, Any] | None:
    try:
        doc = json.loads(text or "")
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _nvme(node: str, run: Run, timeout: float, figs: _Figures) -> None:
    r, why, missing = _call(["nvme", "smart-log", node, "-o", "json"], "nvme smart-log", run,
                            timeout)
    if missing:
        # smartctl reads the same log page, so use it when only smartmontools is installed
        r2, why2, missing2 = _call(["smartctl", "--json", "-a", node], "smartctl", run, timeout)
        if r2 is not None:
            _smartctl_result(node, r2, figs)
            return
        why = f"{why}, and {why2}" if missing2 else f"{why}; smartctl: {why2}"
    if r is None:
        figs.gaps(FIGURES, str(why))
        return
    if r.returncode != 0:
        figs.gaps(FIGURES, f"nvme smart-log failed (exit status {r.returncode}): "
                           f"{_first_line(r.stderr or r.stdout)}")
        return
    doc = _json(r.stdout)
    if doc is None:
        figs.gaps(FIGURES, f"nvme smart-log printed no JSON object: {_first_line(r.stdout)!r}")
        return
    figs.source = "nvme smart-log"
    _from_nvme_log(doc, figs, kelvin=True)
    figs.gap("smart_passed", "nvme smart-log gives no overall verdict; critical_warning is the "
                             "drive's own alarm")
    figs.finish()


def _from_nvme_log(doc: dict[str, Any], figs: _Figures, *, kelvin: bool) -> None:
    """The NVMe SMART/Health log as nvme-cli 1.x/2.x or smartctl print it."""
    cw = doc.get("critical_warning")
    if isinstance(cw, dict):  # nvme-cli 2.x --verbose decodes the bits into an object
        cw = cw.get("value")
    figs.count("critical_warning", cw)
    # nvme-cli: percent_used/avail_spare/spare_thresh; smartctl: percentage_used/available_*
    for name, keys in (("percentage_used", ("percent_used", "percentage_used")),
                       ("available_spare", ("avail_spare", "available_spare")),
                       ("available_spare_threshold", ("spare_thresh",
                                                      "available_spare_threshold"))):
        figs.count(name, next((doc[k] for k in keys if k in doc), None))
    temp = _count(doc.get("temperature"))
    if temp == 0:
        figs.gap("temperature_c", f"{figs.source} reported a temperature of 0, i.e. no sensor")
    elif temp is not None:
        figs.values["temperature_c"] = temp - KELVIN_OFFSET if kelvin else temp
    else:
        figs.count("temperature_c", doc.get("temperature"))  # records why it is unreadable
    for name in ("media_errors", "power_on_hours", "unsafe_shutdowns"):
        figs.count(name, doc.get(name))
    figs.count("data_written_bytes", doc.get("data_units_written"), NVME_DATA_UNIT)
    figs.gaps(SECTOR_FIGURES, "NVMe drives report spare capacity (available_spare) instead of "
                              "sector counts")


def _smartctl(node: str, run: Run, timeout: float, figs: _Figures) -> None:
    r, why, _ = _call(["smartctl", "--json", "-a", node], "smartctl", run, timeout)
    if r is None:
        figs.gaps(FIGURES, str(why))
    else:
        _smartctl_result(node, r, figs)


def _smartctl_result(node: str, r: subprocess.CompletedProcess[str], figs: _Figures) -> None:
    doc = _json(r.stdout)
    if r.returncode < 0:
        figs.gaps(FIGURES, f"smartctl was killed by signal {-r.returncode}")
        return
    rc = r.returncode
    bits = tuple(name for i, name in enumerate(SMARTCTL_EXIT_BITS) if rc & (1 << i))
    msgs = _dig(doc, "smartctl", "messages")
    messages = "; ".join(str(m.get("string", "")).strip() for m in msgs
                         if isinstance(m, dict)) if isinstance(msgs, list) else ""
    if rc & 0b11 or doc is None:  # bits 0-1: smartctl got no data from the drive at all
        detail = messages or _first_line(r.stderr or r.stdout)
        why = (f"smartctl could not read {node} (exit status {rc}: {', '.join(bits)}): {detail}"
               if rc & 0b11 else f"smartctl printed no JSON object: {detail!r}")
        figs.gaps(FIGURES, why)
        return
    figs.source = "smartctl"
    figs.flags = bits
    _from_smartctl(doc, rc, figs)
    # bit 2: some commands failed but others worked; say so next to whatever is missing
    figs.finish(f" (some SMART commands failed: {messages or 'no message'})" if rc & 4 else "")


def _from_smartctl(doc: dict[str, Any], rc: int, figs: _Figures) -> None:
    figs.identity = {
        "model": doc.get("model_name") or doc.get("scsi_model_name"),
        "serial": doc.get("serial_number"),
        "firmware": (doc.get("firmware_version") or doc.get("scsi_revision")
                     or doc.get("revision")),
        "rotational": (None if _count(doc.get("rotation_rate")) is None
                       else doc["rotation_rate"] > 0)}
    passed = _dig(doc, "smart_status", "passed")
    if isinstance(passed, bool):
        figs.values["smart_passed"] = passed
    elif rc & 8:  # exit bit 3 is smartctl's own "DISK FAILING" verdict
        figs.values["smart_passed"] = False
    figs.count("temperature_c", _dig(doc, "temperature", "current"))
    figs.count("power_on_hours", _dig(doc, "power_on_time", "hours"))
    protocol = str(_dig(doc, "device", "protocol") or "")
    nvme_log = doc.get("nvme_smart_health_information_log")
    if isinstance(nvme_log, dict):
        _from_nvme_log(nvme_log, figs, kelvin=False)
        return
    figs.gaps(_NVME_ONLY, "an NVMe figure; ATA/SCSI drives do not report it")
    figs.gap("unsafe_shutdowns", "no standard ATA/SCSI figure (vendor-specific attributes)")
    if protocol == "SCSI" or "scsi_grown_defect_list" in doc:
        # the grown defect list is SCSI's count of sectors remapped since leaving the factory
        figs.count("reallocated_sectors", doc.get("scsi_grown_defect_list"))
        counters = doc.get("scsi_error_counter_log")
        if isinstance(counters, dict):
            unc = [_count(_dig(counters, op, "total_uncorrected_errors"))
                   for op in ("read", "write", "verify") if isinstance(counters.get(op), dict)]
            if unc and None not in unc:
                figs.values["media_errors"] = sum(u for u in unc if u is not None)
        figs.count("percentage_used", doc.get("scsi_percentage_used_endurance_indicator"))
        figs.gaps(("pending_sectors", "offline_uncorrectable"),
                  "SCSI drives have no such count; see reallocated_sectors (grown defect list)")
        figs.gap("data_written_bytes", "smartctl -a gives no byte count for SCSI drives")
        return
    table = _dig(doc, "ata_smart_attributes", "table")
    rows = table if isinstance(table, list) else []
    attrs = {a.get("id"): a for a in rows if isinstance(a, dict)}
    for attr_id, name in ((5, "reallocated_sectors"), (197, "pending_sectors"),
                          (198, "offline_uncorrectable")):
        if attr_id in attrs:
            figs.count(name, _dig(attrs[attr_id], "raw", "value"))
    figs.gap("media_errors", "ATA drives count bad sectors instead (reallocated_sectors, "
                             "pending_sectors, offline_uncorrectable)")
    figs.gap("data_written_bytes", "ATA attribute 241 (Total_LBAs_Written) has vendor-specific "
                                   "units")
    by_name = {a.get("name"): a for a in attrs.values()}
    for name in WEAR_ATTRIBUTES:
        value = _count(_dig(by_name.get(name), "value"))
        if value is not None and value <= 100 and "percentage_used" not in figs.values:
            figs.values["percentage_used"] = 100 - value
            figs.wear_source = f"ATA attribute {name}: 100 - normalized value {value}"
            break
    if "percentage_used" not in figs.values and "percentage_used" not in figs.unavailable:
        figs.gap("percentage_used", "the drive reports no wear attribute smartctl knows")


def _no_smart(kind: Kind, path: str, blk: _Block | None, backing: str | None,
              host: str | None) -> str:
    check = f"; check {host} instead" if host else ""
    if kind == "file":
        return f"a regular file has no SMART data{check}"
    if kind == "loop":
        return (f"{path} is a loop device backed by the file {backing or '(unknown)'}; "
                f"a file has no SMART data{check}")
    disk = blk.disk if blk else path
    what = next((v for k, v in _OTHER.items() if disk.startswith(k)),
                blk.subsystem if blk and blk.subsystem else "virtual")
    below = sorted(os.listdir(f"{blk.diskdir}/slaves")) if blk and os.path.isdir(
        f"{blk.diskdir}/slaves") else []
    built = f"; it is built on {', '.join(below)}: check those" if below else ""
    return (f"{disk} is a {what} device, not an NVMe or ATA/SCSI disk, so it has no SMART "
            f"data{built}")


def device_health(path: str, *, kind: Kind | None = None, run: Run = subprocess.run,
                  timeout: float = 10.0) -> DeviceHealth:
    """Identity and SMART health of the pool's backing device or file.

    `kind` overrides the detected kind (for tests, or a disk we misclassify); `run` replaces
    subprocess.run. Raises DeviceError when the path does not exist or is not a block device
    or regular file; every other problem ends up in `unavailable`.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise DeviceError(f"cannot check the health of {path}: {e.strerror}") from None
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise DeviceError(f"{path} is neither a block device nor a regular file")
    blk = _block(st) if stat.S_ISBLK(st.st_mode) else None
    detected: Kind = "file" if blk is None else classify(blk.disk, blk.subsystem)
    kind = kind or detected
    ident, problem = _identity(path, st, blk)
    backing = _read(f"{blk.diskdir}/loop/backing_file") if blk and detected == "loop" else None
    host = _host_device(path) if detected == "file" else (
        _host_device(backing.removesuffix(" (deleted)")) if backing else None)

    figs = _Figures()
    node = f"/dev/{blk.disk}" if blk else path  # SMART is per disk, not per partition
    if kind == "nvme":
        _nvme(node, run, timeout, figs)
    elif kind == "ata/scsi":
        _smartctl(node, run, timeout, figs)
    else:
        figs.gaps(FIGURES, _no_smart(kind, path, blk, backing, host))
    if problem:
        figs.unavailable["identity"] = problem
    for key, value in figs.identity.items():  # fill only what udev/sysfs did not know
        if ident.get(key) is None and value is not None:
            ident[key] = str(value).strip() if key != "rotational" else value

    v = figs.values
    return DeviceHealth(
        path=path, kind=kind, backing_file=backing, host_device=host, smart=figs.source,
        wear_source=figs.wear_source, smartctl_flags=figs.flags,
        unavailable=dict(figs.unavailable), **ident, **{n: v.get(n) for n in FIGURES})


# ---- Verdict. ----

_RANK: dict[Status, int] = {"healthy": 0, "degraded": 1, "failing": 2}


def assess(dev: DeviceHealth, engine: EngineHealthCounters) -> HealthReport:
    """Apply the rules at the top of this module; the worst finding sets the status."""
    found: list[tuple[Status, str]] = []
    checked = 0

    def look(value: object) -> bool:
        nonlocal checked
        checked += value is not None
        return value is not None

    cw = dev.critical_warning
    if look(cw) and cw is not None:
        for bit, name, meaning, sev in CRITICAL_WARNING_BITS:
            if cw & bit:
                found.append((sev, f"critical_warning has the {name} bit (0x{bit:02x}) set: "
                                   f"{meaning}; any set bit counts as {sev}."))
    if look(dev.smart_passed) and dev.smart_passed is False:
        found.append(("failing", "smart_passed is false: the drive's overall SMART self-assessment "
                                 "failed."))
    if dev.smart == "smartctl":
        checked += 1
        if "prefail_at_threshold" in dev.smartctl_flags:
            found.append(("degraded", "smartctl reports a pre-failure attribute at or below its "
                                      "threshold (exit status bit 4)."))
    pu = dev.percentage_used
    if look(pu) and pu is not None:
        if pu >= PERCENT_USED_FAILING:
            found.append(("failing", f"percentage_used is {pu}%, at or above the failing "
                                     f"threshold of {PERCENT_USED_FAILING}%: the drive has used "
                                     f"up its rated endurance."))
        elif pu >= PERCENT_USED_DEGRADED:
            found.append(("degraded", f"percentage_used is {pu}%, at or above the degraded "
                                      f"threshold of {PERCENT_USED_DEGRADED}%."))
    spare, thresh = dev.available_spare, dev.available_spare_threshold
    if spare is not None and thresh is not None:
        checked += 1
        if spare < thresh:
            found.append(("failing", f"available_spare is {spare}%, below the drive's own "
                                     f"threshold of {thresh}% (available_spare_threshold)."))
    if look(dev.media_errors) and dev.media_errors:
        found.append(("degraded", f"media_errors is {dev.media_errors}, above 0: the drive has "
                                  f"met unrecoverable data errors."))
    for name in SECTOR_FIGURES:
        n = getattr(dev, name)
        if look(n) and n:
            found.append(("degraded", f"{name} is {n}, above 0: the drive has lost or remapped "
                                      f"sectors."))
    t = dev.temperature_c
    if look(t) and t is not None:
        limit, what = ((TEMP_DEGRADED_ROTATIONAL_C, "a hard disk") if dev.rotational
                       else (TEMP_DEGRADED_C, "an SSD"))
        if t > limit:
            found.append(("degraded", f"temperature_c is {t} °C, above the degraded threshold of "
                                      f"{limit} °C for {what}."))

    checked += 6  # the six engine figures below are always known
    if engine.pool_failed:
        found.append(("failing", f"pool_failed is set: the engine refuses writes because "
                                 f"{engine.pool_failed}."))
    if engine.checksum_errors > 0:
        found.append(("degraded", f"checksum_errors is {engine.checksum_errors}, above 0: reads "
                                  f"returned data that failed verification."))
    if engine.io_errors > 0:
        found.append(("degraded", f"io_errors is {engine.io_errors}, above 0: the backing device "
                                  f"failed writes or syncs."))
    if engine.read_errors > 0:
        last = f"; last: {engine.last_read_error}" if engine.last_read_error else ""
        found.append(("degraded", f"{engine.read_errors} read errors from the backing device "
                                  f"since start{last}."))
    found.extend(("degraded", f"{r}.") for r in engine.background_failures)
    free = engine.free_fraction
    if free < FREE_FAILING:
        found.append(("failing", f"free_fraction is {free:.1%}, below the failing threshold of "
                                 f"{FREE_FAILING:.0%}."))
    elif free < FREE_DEGRADED:
        found.append(("degraded", f"free_fraction is {free:.1%}, below the degraded threshold of "
                                  f"{FREE_DEGRADED:.0%}."))
    spread, mean = engine.wear_spread, engine.erase_count_mean
    if look(spread) and spread is not None and mean is not None:
        if spread > WEAR_SPREAD_CYCLES and spread > WEAR_SPREAD_FRACTION * mean:
            found.append(("degraded", f"wear_spread is {spread} erase cycles (mean {mean:.1f}), "
                                      f"above both {WEAR_SPREAD_CYCLES} cycles and "
                                      f"{WEAR_SPREAD_FRACTION:.0%} of the mean: wear leveling is "
                                      f"falling behind."))

    status: Status = max((s for s, _ in found), key=_RANK.__getitem__, default="healthy")
    reasons = tuple(r for _, r in sorted(found, key=lambda f: -_RANK[f[0]])) or (
        f"no problems found in {checked} figures checked",)
    return HealthReport(status, reasons, checked, dev, engine,
                        {**dev.unavailable, **engine.unavailable()})
