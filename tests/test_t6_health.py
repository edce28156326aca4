"""Tests for pstoraged.analytics.health: device health figures from nvme-cli/smartctl, and assess().

The machine has no NVMe or SATA disk, so the tool output is fed through an injected `run`
with JSON documents shaped like nvme-cli 1.x/2.x and smartctl 7.x print them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pstoraged.analytics import health
from pstoraged.analytics.health import (
    FIGURES,
    DeviceHealth,
    EngineHealthCounters,
    assess,
    classify,
    device_health,
)
from pstoraged.engine.devices import DeviceError

MiB = 1024 * 1024
needs_loop = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("losetup") is None,
    reason="loop device tests need root and losetup (util-linux)",
)


class FakeRun:
    """Stands in for subprocess.run: per program, a (returncode, stdout, stderr) or an error."""

    def __init__(self, **programs: tuple[int, str, str] | BaseException) -> None:
        self.programs = programs
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        assert kw["timeout"] > 0 and kw["check"] is False and kw["text"] is True
        self.calls.append(argv)
        outcome = self.programs.get(argv[0])
        if outcome is None:
            raise FileNotFoundError(2, "No such file or directory", argv[0])
        if isinstance(outcome, BaseException):
            raise outcome
        rc, out, err = outcome
        return subprocess.CompletedProcess(argv, rc, out, err)


def never_run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    raise AssertionError(f"no tool should run for this device, ran {argv}")


def ok(doc: dict[str, Any], rc: int = 0) -> tuple[int, str, str]:
    return rc, json.dumps(doc, indent=2), ""


# --- documents as the tools print them ------------------------------------------------------

# nvme-cli 1.x (1.9 .. 1.16): plain numbers, temperature in Kelvin
NVME_CLI_1 = {
    "critical_warning": 0, "temperature": 310, "avail_spare": 100, "spare_thresh": 10,
    "percent_used": 3, "endurance_grp_critical_warning_summary": 0,
    "data_units_read": 28167888, "data_units_written": 19397424,
    "host_read_commands": 561183142, "host_write_commands": 171788833,
    "controller_busy_time": 1354, "power_cycles": 2385, "power_on_hours": 1363,
    "unsafe_shutdowns": 133, "media_errors": 0, "num_err_log_entries": 608,
    "warning_temp_time": 0, "critical_comp_time": 0, "temperature_sensor_1": 310,
    "temperature_sensor_2": 315, "thm_temp1_trans_count": 0, "thm_temp2_trans_count": 0,
    "thm_temp1_total_time": 0, "thm_temp2_total_time": 0,
}

# nvme-cli 2.0-2.3 printed the 128-bit counters as "%Lf" strings
NVME_CLI_2_STRINGS = {
    "critical_warning": 0, "temperature": 318, "avail_spare": 98, "spare_thresh": 5,
    "percent_used": 12, "endurance_grp_critical_warning_summary": 0,
    "data_units_read": "1234567.000000", "data_units_written": "7654321.000000",
    "host_read_commands": "99999.000000", "host_write_commands": "88888.000000",
    "controller_busy_time": "77.000000", "power_cycles": "66.000000",
    "power_on_hours": "5555.000000", "unsafe_shutdowns": "44.000000",
    "media_errors": "2.000000", "num_err_log_entries": "1.000000",
    "warning_temp_time": 0, "critical_comp_time": 0,
}

# nvme-cli 2.x with --verbose: critical_warning becomes an object with the decoded bits
NVME_CLI_2_VERBOSE = {
    "critical_warning": {"value": 12, "available_spare": 0, "temp_threshold": 0,
                         "reliability_degraded": 1, "ro": 1, "vmbu_failed": 0, "pmr_ro": 0},
    "temperature": 345, "avail_spare": 4, "spare_thresh": 10, "percent_used": 104,
    "endurance_grp_critical_warning_summary": 0, "data_units_read": 123,
    "data_units_written": 456, "host_read_commands": 1, "host_write_commands": 2,
    "controller_busy_time": 3, "power_cycles": 4, "power_on_hours": 43000,
    "unsafe_shutdowns": 9, "media_errors": 17, "num_err_log_entries": 31,
    "warning_temp_time": 12, "critical_comp_time": 0, "temperature_sensor_1": 345,
    "thm_temp1_trans_count": 0, "thm_temp2_trans_count": 0, "thm_temp1_total_time": 0,
    "thm_temp2_total_time": 0, "op_lifetime_energy_consumed": 0,
    "interval_power_measurement": 0,
}

SMARTCTL_HEAD = {"json_format_version": [1, 0]}


def smartctl_head(rc: int, *messages: str) -> dict[str, Any]:
    head: dict[str, Any] = {
        "version": [7, 3], "svn_revision": "5338",
        "platform_info": "x86_64-linux-6.1.0-18-amd64", "build_info": "(local build)",
        "argv": ["smartctl", "--json", "-a", "/dev/sda"], "exit_status": rc}
    if messages:
        head["messages"] = [{"string": m, "severity": "error"} for m in messages]
    return {**SMARTCTL_HEAD, "smartctl": head}


def attr(id_: int, name: str, value: int, raw: int, thresh: int = 0,
         prefail: bool = False) -> dict[str, Any]:
    return {"id": id_, "name": name, "value": value, "worst": value, "thresh": thresh,
            "when_failed": "", "flags": {"value": 51 if prefail else 50,
                                         "string": "PO--CK " if prefail else "-O--CK ",
                                         "prefailure": prefail, "updated_online": True,
                                         "performance": False, "error_rate": False,
                                         "event_count": False, "auto_keep": True},
            "raw": {"value": raw, "string": str(raw)}}


# smartctl 7.3 -a on a SATA SSD (Samsung 860 EVO)
SMARTCTL_ATA = {
    **smartctl_head(0),
    "device": {"name": "/dev/sda", "info_name": "/dev/sda [SAT]", "type": "sat",
               "protocol": "ATA"},
    "model_family": "Samsung based SSDs", "model_name": "Samsung SSD 860 EVO 500GB",
    "serial_number": "S3Z2NB0K123456A", "firmware_version": "RVT04B6Q",
    "user_capacity": {"blocks": 976773168, "bytes": 500107862016},
    "logical_block_size": 512, "physical_block_size": 512, "rotation_rate": 0,
    "smart_support": {"available": True, "enabled": True},
    "smart_status": {"passed": True},
    "ata_smart_attributes": {"revision": 1, "table": [
        attr(5, "Reallocated_Sector_Ct", 100, 0, 10, prefail=True),
        attr(9, "Power_On_Hours", 97, 12345),
        attr(12, "Power_Cycle_Count", 99, 1000),
        attr(177, "Wear_Leveling_Count", 95, 60, 0, prefail=True),
        attr(179, "Used_Rsvd_Blk_Cnt_Tot", 100, 0, 10, prefail=True),
        attr(190, "Airflow_Temperature_Cel", 67, 33),
        attr(197, "Current_Pending_Sector", 100, 0),
        attr(198, "Offline_Uncorrectable", 100, 0),
        attr(241, "Total_LBAs_Written", 99, 23456789012),
    ]},
    "power_on_time": {"hours": 12345}, "power_cycle_count": 1000,
    "temperature": {"current": 33},
}

# smartctl 7.2 -a on a SAS SSD
SMARTCTL_SCSI = {
    **smartctl_head(0),
    "device": {"name": "/dev/sdb", "info_name": "/dev/sdb", "type": "scsi", "protocol": "SCSI"},
    "vendor": "SEAGATE", "product": "XS800LE70004", "model_name": "SEAGATE XS800LE70004",
    "revision": "0004", "scsi_version": "SPC-5",
    "user_capacity": {"blocks": 1562824368, "bytes": 800166076416},
    "logical_block_size": 512, "rotation_rate": 0, "serial_number": "HLJ0ABCD",
    "smart_status": {"passed": True},
    "scsi_percentage_used_endurance_indicator": 7,
    "temperature": {"current": 34, "drive_trip": 70},
    "power_on_time": {"hours": 40123, "minutes": 12},
    "scsi_grown_defect_list": 3,
    "scsi_error_counter_log": {
        "read": {"errors_corrected_by_eccfast": 0, "errors_corrected_by_eccdelayed": 0,
                 "errors_corrected_by_rereads_rewrites": 0, "total_errors_corrected": 0,
                 "correction_algorithm_invocations": 0, "gigabytes_processed": "71234.567",
                 "total_uncorrected_errors": 0},
        "write": {"errors_corrected_by_eccfast": 0, "errors_corrected_by_eccdelayed": 0,
                  "errors_corrected_by_rereads_rewrites": 0, "total_errors_corrected": 0,
                  "correction_algorithm_invocations": 0, "gigabytes_processed": "81234.567",
                  "total_uncorrected_errors": 2},
    },
}

# smartctl 7.4 -a on an NVMe drive: same log page, temperature already in °C
SMARTCTL_NVME = {
    **smartctl_head(0),
    "device": {"name": "/dev/nvme0", "info_name": "/dev/nvme0", "type": "nvme",
               "protocol": "NVMe"},
    "model_name": "Samsung SSD 980 PRO 1TB", "serial_number": "S5GXNF0R123456",
    "firmware_version": "5B2QGXA7", "smart_support": {"available": True, "enabled": True},
    "smart_status": {"passed": True, "nvme": {"value": 0}},
    "nvme_smart_health_information_log": {
        "critical_warning": 0, "temperature": 41, "available_spare": 100,
        "available_spare_threshold": 10, "percentage_used": 2, "data_units_read": 1000,
        "data_units_written": 2000, "host_reads": 3, "host_writes": 4,
        "controller_busy_time": 5, "power_cycles": 6, "power_on_hours": 700,
        "unsafe_shutdowns": 8, "media_errors": 0, "num_err_log_entries": 0,
        "warning_temp_time": 0, "critical_comp_time": 0, "temperature_sensors": [41, 45]},
    "temperature": {"current": 41}, "power_cycle_count": 6, "power_on_time": {"hours": 700},
}


@pytest.fixture
def img(tmp_path: Path) -> Path:
    p = tmp_path / "dev.img"
    with open(p, "wb") as f:
        f.truncate(64 * MiB)
    return p


def nvme(img: Path, run: FakeRun) -> DeviceHealth:
    return device_health(str(img), kind="nvme", run=run)


def ata(img: Path, run: FakeRun) -> DeviceHealth:
    return device_health(str(img), kind="ata/scsi", run=run)


def only_gaps(dev: DeviceHealth) -> set[str]:
    return {n for n in FIGURES if n in dev.unavailable}


def assert_consistent(dev: DeviceHealth) -> None:
    """Every figure is a value or an explained gap, never both, and the dict is JSON."""
    for name in FIGURES:
        value = getattr(dev, name)
        assert (value is None) == (name in dev.unavailable), name
        if value is None:
            assert dev.unavailable[name].strip(), name
    json.dumps(dev.to_dict())


# --- regular files and loop devices -----------------------------------------------------------

def test_regular_file_has_no_smart_figures(img: Path) -> None:
    dev = device_health(str(img), run=never_run)
    assert dev.kind == "file" and dev.smart is None
    assert dev.size_bytes == 64 * MiB
    assert dev.backing_file is None
    assert_consistent(dev)
    assert all(getattr(dev, n) is None for n in FIGURES)
    assert only_gaps(dev) == set(FIGURES)
    assert all("a regular file has no SMART data" in dev.unavailable[n] for n in FIGURES)
    d = dev.to_dict()
    assert d["critical_warnings"] is None and d["smartctl_flags"] == []


def test_missing_path_and_wrong_type(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="cannot check the health"):
        device_health(str(tmp_path / "nope"), run=never_run)
    with pytest.raises(DeviceError, match="neither a block device nor a regular file"):
        device_health(str(tmp_path), run=never_run)


@pytest.fixture
def loop_dev(img: Path) -> Iterator[str]:
    dev = subprocess.run(["losetup", "-f", "--show", str(img)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@needs_loop
def test_loop_device_reports_its_backing_file(loop_dev: str, img: Path) -> None:
    dev = device_health(loop_dev, run=never_run)
    assert dev.kind == "loop" and dev.smart is None
    assert dev.backing_file == os.path.realpath(img)
    assert dev.size_bytes == 64 * MiB and dev.logical_block_size == 512
    assert_consistent(dev)
    assert only_gaps(dev) == set(FIGURES)
    reason = dev.unavailable["percentage_used"]
    assert f"{loop_dev} is a loop device backed by the file {os.path.realpath(img)}" in reason
    assert "no SMART data" in reason


@needs_loop
def test_loop_partition_uses_the_whole_disk(img: Path) -> None:
    # a partitioned loop device: the partition node must resolve to the loop disk.
    # One MBR entry: Linux (0x83) from LBA 2048 to the end.
    sectors = img.stat().st_size // 512
    with open(img, "r+b") as f:
        f.seek(446)
        f.write(struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", 2048, sectors - 2048))
        f.seek(510)
        f.write(b"\x55\xaa")
    dev = subprocess.run(["losetup", "-f", "--show", "-P", str(img)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        part = f"{dev}p1"
        if not os.path.exists(part):
            pytest.skip("the kernel did not scan partitions on the loop device (losetup -P)")
        h = device_health(part, run=never_run)
        assert h.kind == "loop" and h.backing_file == os.path.realpath(img)
        assert h.size_bytes == 64 * MiB - 2048 * 512
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.parametrize(("disk", "subsystem", "kind"), [
    ("nvme0n1", "nvme", "nvme"),
    ("nvme0n1", "nvme-subsystem", "nvme"),  # native multipath namespace head
    ("nvme1c2n1", None, "nvme"),
    ("sda", "scsi", "ata/scsi"),
    ("sdaa", None, "ata/scsi"),
    ("loop7", None, "loop"),
    ("vda", "virtio", "other block"),
    ("dm-0", None, "other block"),
    ("md127", None, "other block"),
    ("mmcblk0", "mmc", "other block"),
    ("sdx", "virtio", "other block"),  # the bus wins over the name
])
def test_classify(disk: str, subsystem: str | None, kind: str) -> None:
    assert classify(disk, subsystem) == kind


def test_real_other_block_device_says_why() -> None:
    for name in sorted(os.listdir("/sys/class/block")):
        sub = f"/sys/class/block/{name}/device/subsystem"
        bus = os.path.basename(os.path.realpath(sub)) if os.path.exists(sub) else None
        if (classify(name, bus) == "other block" and os.path.exists(f"/dev/{name}")
                and not os.path.exists(f"/sys/class/block/{name}/partition")
                and Path(f"/sys/class/block/{name}/size").read_text().strip() != "0"):
            break
    else:
        pytest.skip("no virtio/dm/md/... disk on this machine")
    dev = device_health(f"/dev/{name}", run=never_run)
    assert dev.kind == "other block"
    assert_consistent(dev)
    reason = dev.unavailable["media_errors"]
    assert "not an NVMe or ATA/SCSI disk, so it has no SMART data" in reason


# --- NVMe via nvme-cli --------------------------------------------------------------------------

def test_nvme_cli_1x(img: Path) -> None:
    run = FakeRun(nvme=ok(NVME_CLI_1))
    dev = nvme(img, run)
    assert run.calls == [["nvme", "smart-log", str(img), "-o", "json"]]
    assert dev.smart == "nvme smart-log"
    assert dev.temperature_c == 37  # 310 K
    assert dev.data_written_bytes == 19397424 * 512_000 == 9_931_481_088_000
    assert (dev.percentage_used, dev.available_spare, dev.available_spare_threshold) == (3, 100, 10)
    assert (dev.media_errors, dev.power_on_hours, dev.unsafe_shutdowns) == (0, 1363, 133)
    assert dev.critical_warning == 0 and dev.critical_warnings == ()
    assert_consistent(dev)
    # only figures NVMe does not have are missing, each with its own reason
    assert only_gaps(dev) == {"smart_passed", "reallocated_sectors", "pending_sectors",
                              "offline_uncorrectable"}
    assert "available_spare" in dev.unavailable["pending_sectors"]


def test_nvme_cli_2x_counters_as_strings(img: Path) -> None:
    dev = nvme(img, FakeRun(nvme=ok(NVME_CLI_2_STRINGS)))
    assert dev.temperature_c == 45
    assert dev.data_written_bytes == 7654321 * 512_000
    assert (dev.media_errors, dev.power_on_hours, dev.unsafe_shutdowns) == (2, 5555, 44)
    assert (dev.percentage_used, dev.available_spare, dev.available_spare_threshold) == (12, 98, 5)
    assert_consistent(dev)


def test_nvme_cli_2x_verbose_critical_warning_bits(img: Path) -> None:
    dev = nvme(img, FakeRun(nvme=ok(NVME_CLI_2_VERBOSE)))
    assert dev.critical_warning == 12
    assert dev.critical_warnings == ("reliability_degraded", "read_only")
    assert dev.to_dict()["critical_warnings"] == ["reliability_degraded", "read_only"]
    assert dev.temperature_c == 72 and dev.percentage_used == 104 and dev.media_errors == 17
    assert dev.data_written_bytes == 456 * 512_000
    assert_consistent(dev)


@pytest.mark.parametrize("bits", [0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x3F])
def test_every_critical_warning_bit_has_a_name(img: Path, bits: int) -> None:
    dev = nvme(img, FakeRun(nvme=ok({**NVME_CLI_1, "critical_warning": bits})))
    names = [n for b, n, _, _ in health.CRITICAL_WARNING_BITS if bits & b]
    assert list(dev.critical_warnings) == names and len(names) == bin(bits).count("1")


def test_nvme_percentage_used_key_variant(img: Path) -> None:
    doc = {k: v for k, v in NVME_CLI_1.items() if k != "percent_used"}
    dev = nvme(img, FakeRun(nvme=ok({**doc, "percentage_used": 55})))
    assert dev.percentage_used == 55
    dev = nvme(img, FakeRun(nvme=ok(doc)))  # neither key: a gap, not a zero
    assert dev.percentage_used is None
    assert dev.unavailable["percentage_used"] == "nvme smart-log did not report it"


def test_nvme_odd_values_become_gaps(img: Path) -> None:
    doc = {**NVME_CLI_1, "temperature": 0, "media_errors": "n/a", "power_on_hours": -1}
    dev = nvme(img, FakeRun(nvme=ok(doc)))
    assert dev.temperature_c is None and "no sensor" in dev.unavailable["temperature_c"]
    assert dev.media_errors is None
    assert "'n/a', which is not a count" in dev.unavailable["media_errors"]
    assert dev.power_on_hours is None and "not a count" in dev.unavailable["power_on_hours"]
    assert_consistent(dev)


def test_nvme_cli_missing_and_no_smartctl(img: Path) -> None:
    dev = nvme(img, FakeRun())
    assert dev.smart is None
    assert only_gaps(dev) == set(FIGURES)
    assert dev.unavailable["media_errors"] == ("nvme-cli is not installed, and smartmontools "
                                               "(smartctl) is not installed")
    assert_consistent(dev)


def test_nvme_cli_missing_falls_back_to_smartctl(img: Path) -> None:
    run = FakeRun(smartctl=ok(SMARTCTL_NVME))
    dev = nvme(img, run)
    assert run.calls == [["nvme", "smart-log", str(img), "-o", "json"],
                         ["smartctl", "--json", "-a", str(img)]]
    assert dev.smart == "smartctl"
    assert dev.temperature_c == 41  # smartctl already prints °C
    assert dev.data_written_bytes == 2000 * 512_000
    assert (dev.percentage_used, dev.available_spare, dev.available_spare_threshold) == (2, 100, 10)
    assert (dev.critical_warning, dev.smart_passed, dev.power_on_hours) == (0, True, 700)
    assert (dev.model, dev.serial, dev.firmware) == ("Samsung SSD 980 PRO 1TB", "S5GXNF0R123456",
                                                     "5B2QGXA7")
    assert_consistent(dev)


def test_nvme_cli_fails(img: Path) -> None:
    run = FakeRun(nvme=(1, "", "smart log: Permission denied\n"))
    dev = nvme(img, run)
    assert dev.smart is None and only_gaps(dev) == set(FIGURES)
    assert dev.unavailable["percentage_used"] == ("nvme smart-log failed (exit status 1): "
                                                  "smart log: Permission denied")
    assert len(run.calls) == 1  # a failing nvme-cli is reported, not papered over
    assert_consistent(dev)


@pytest.mark.parametrize("garbage", ["", "Segmentation fault", "[1, 2]", "{\"critical_warn"])
def test_nvme_cli_garbage(img: Path, garbage: str) -> None:
    dev = nvme(img, FakeRun(nvme=(0, garbage, "")))
    assert dev.smart is None and only_gaps(dev) == set(FIGURES)
    assert dev.unavailable["temperature_c"].startswith("nvme smart-log printed no JSON object")
    assert_consistent(dev)


def test_nvme_cli_timeout_and_oserror(img: Path) -> None:
    dev = nvme(img, FakeRun(nvme=subprocess.TimeoutExpired(["nvme"], 10.0)))
    assert dev.unavailable["media_errors"] == "nvme smart-log timed out after 10 s"
    dev = nvme(img, FakeRun(nvme=PermissionError(13, "Permission denied")))
    assert dev.unavailable["media_errors"] == "cannot run nvme: Permission denied"


# --- ATA/SCSI via smartctl ------------------------------------------------------------------

def test_smartctl_ata_ssd(img: Path) -> None:
    run = FakeRun(smartctl=ok(SMARTCTL_ATA))
    dev = ata(img, run)
    assert run.calls == [["smartctl", "--json", "-a", str(img)]]
    assert dev.smart == "smartctl" and dev.smart_passed is True and dev.smartctl_flags == ()
    assert (dev.reallocated_sectors, dev.pending_sectors, dev.offline_uncorrectable) == (0, 0, 0)
    assert (dev.temperature_c, dev.power_on_hours) == (33, 12345)
    assert dev.percentage_used == 5  # Wear_Leveling_Count normalized 95
    assert dev.wear_source is not None and "Wear_Leveling_Count" in dev.wear_source
    assert (dev.model, dev.serial, dev.firmware) == ("Samsung SSD 860 EVO 500GB",
                                                     "S3Z2NB0K123456A", "RVT04B6Q")
    assert dev.rotational is False  # a file has none; smartctl's rotation_rate 0 fills it
    assert_consistent(dev)
    assert only_gaps(dev) == {"critical_warning", "available_spare", "available_spare_threshold",
                              "media_errors", "unsafe_shutdowns", "data_written_bytes"}
    assert "vendor-specific units" in dev.unavailable["data_written_bytes"]


def test_smartctl_ata_failing_disk_is_still_parsed(img: Path) -> None:
    doc = copy.deepcopy(SMARTCTL_ATA)
    doc["smart_status"] = {"passed": False}
    table = doc["ata_smart_attributes"]["table"]
    table[0] = attr(5, "Reallocated_Sector_Ct", 3, 1200, 10, prefail=True)
    table[6] = attr(197, "Current_Pending_Sector", 100, 16)
    # bits 3 (DISK FAILING) and 4 (prefail attribute at threshold): nonzero, but data is good
    dev = ata(img, FakeRun(smartctl=ok(doc, rc=8 | 16)))
    assert dev.smart_passed is False
    assert dev.smartctl_flags == ("disk_failing", "prefail_at_threshold")
    assert (dev.reallocated_sectors, dev.pending_sectors) == (1200, 16)
    assert_consistent(dev)
    report = assess(dev, EngineHealthCounters(free_fraction=0.5))
    assert report.status == "failing"
    joined = " ".join(report.reasons)
    for figure in ("smart_passed", "reallocated_sectors is 1200", "pending_sectors is 16",
                   "pre-failure attribute"):
        assert figure in joined


def test_smartctl_failing_bit_without_smart_status(img: Path) -> None:
    doc = {k: v for k, v in SMARTCTL_ATA.items() if k != "smart_status"}
    dev = ata(img, FakeRun(smartctl=ok(doc, rc=8)))
    assert dev.smart_passed is False
    dev = ata(img, FakeRun(smartctl=ok(doc, rc=0)))
    assert dev.smart_passed is None
    assert "smartctl did not report it" in dev.unavailable["smart_passed"]


def test_smartctl_cannot_open_device(img: Path) -> None:
    msg = "Smartctl open device: /dev/sdz failed: No such device"
    dev = ata(img, FakeRun(smartctl=ok(smartctl_head(2, msg), rc=2)))
    assert dev.smart is None and only_gaps(dev) == set(FIGURES)
    reason = dev.unavailable["smart_passed"]
    assert reason == f"smartctl could not read {img} (exit status 2: device_open_failed): {msg}"
    assert_consistent(dev)


def test_smartctl_partial_failure_keeps_what_it_read(img: Path) -> None:
    doc = {**smartctl_head(4, "Read SMART Data failed: scsi error badly formed scsi parameters"),
           "device": {"name": "/dev/sda", "type": "sat", "protocol": "ATA"},
           "model_name": "WDC WD40EFRX-68N32N0", "smart_status": {"passed": True},
           "temperature": {"current": 41}, "rotation_rate": 5400}
    dev = ata(img, FakeRun(smartctl=ok(doc, rc=4)))
    assert dev.smart == "smartctl" and dev.smartctl_flags == ("smart_command_failed",)
    assert (dev.smart_passed, dev.temperature_c, dev.rotational) == (True, 41, True)
    assert dev.reallocated_sectors is None
    assert "some SMART commands failed: Read SMART Data failed" in dev.unavailable[
        "reallocated_sectors"]
    assert_consistent(dev)


def test_smartctl_scsi(img: Path) -> None:
    dev = ata(img, FakeRun(smartctl=ok(SMARTCTL_SCSI)))
    assert dev.smart_passed is True
    assert dev.reallocated_sectors == 3  # grown defect list
    assert dev.media_errors == 2  # uncorrected read + write errors
    assert (dev.percentage_used, dev.temperature_c, dev.power_on_hours) == (7, 34, 40123)
    assert (dev.model, dev.firmware) == ("SEAGATE XS800LE70004", "0004")
    assert_consistent(dev)
    assert only_gaps(dev) == {"critical_warning", "available_spare", "available_spare_threshold",
                              "pending_sectors", "offline_uncorrectable", "unsafe_shutdowns",
                              "data_written_bytes"}


def test_smartctl_missing_and_garbage(img: Path) -> None:
    dev = ata(img, FakeRun())
    assert dev.unavailable["temperature_c"] == "smartmontools (smartctl) is not installed"
    dev = ata(img, FakeRun(smartctl=(0, "smartctl 6.2: unknown option --json", "")))
    assert dev.unavailable["temperature_c"].startswith("smartctl printed no JSON object")
    assert dev.smart is None and only_gaps(dev) == set(FIGURES)


def test_no_wear_attribute_is_a_gap(img: Path) -> None:
    doc = copy.deepcopy(SMARTCTL_ATA)
    doc["ata_smart_attributes"]["table"] = [
        a for a in doc["ata_smart_attributes"]["table"] if a["id"] != 177]
    dev = ata(img, FakeRun(smartctl=ok(doc)))
    assert dev.percentage_used is None and dev.wear_source is None
    assert "no wear attribute" in dev.unavailable["percentage_used"]


# --- assess() -------------------------------------------------------------------------------

FINE = EngineHealthCounters(free_fraction=0.5, erase_count_min=10, erase_count_max=20,
                            erase_count_mean=15.0, gc_write_amplification=1.3)


@pytest.fixture
def good_nvme(img: Path) -> DeviceHealth:
    return nvme(img, FakeRun(nvme=ok(NVME_CLI_1)))


def test_healthy(good_nvme: DeviceHealth, img: Path) -> None:
    report = assess(good_nvme, FINE)
    # device: critical_warning, percentage_used, spare vs threshold, media_errors, temperature;
    # engine: pool_failed, checksum_errors, io_errors, read_errors, background_failures,
    # free_fraction, wear_spread
    assert report.status == "healthy"
    assert report.reasons == ("no problems found in 12 figures checked",)
    d = report.to_dict()
    json.dumps(d)
    assert d["device"]["temperature_c"] == 37 and d["engine"]["wear_spread"] == 10
    assert d["unavailable"]["smart_passed"] == good_nvme.unavailable["smart_passed"]
    # a file has no device figures: only the six always-known engine figures are checked
    plain = device_health(str(img), run=never_run)
    report = assess(plain, EngineHealthCounters(free_fraction=0.5))
    assert report.reasons == ("no problems found in 6 figures checked",)
    assert report.unavailable["gc_write_amplification"].startswith("no data written yet")
    assert report.unavailable["wear_spread"] == "the pool has no segments yet"


DEVICE_RULES: list[tuple[dict[str, Any], str, str]] = [
    ({"critical_warning": 0x01}, "failing", "spare_below_threshold"),
    ({"critical_warning": 0x02}, "degraded", "temperature bit"),
    ({"critical_warning": 0x04}, "failing", "reliability_degraded"),
    ({"critical_warning": 0x08}, "failing", "read_only"),
    ({"critical_warning": 0x10}, "degraded", "volatile_backup_failed"),
    ({"critical_warning": 0x20}, "degraded", "persistent_memory_read_only"),
    ({"media_errors": 0}, "healthy", ""),
    ({"media_errors": 1}, "degraded", "media_errors is 1, above 0"),
    ({"percentage_used": 89}, "healthy", ""),
    ({"percentage_used": 90}, "degraded", "percentage_used is 90%"),
    ({"percentage_used": 99}, "degraded", "degraded threshold of 90%"),
    ({"percentage_used": 100}, "failing", "failing threshold of 100%"),
    ({"percentage_used": 180}, "failing", "percentage_used is 180%"),
    ({"available_spare": 10}, "healthy", ""),
    ({"available_spare": 9}, "failing",
     "available_spare is 9%, below the drive's own threshold of 10%"),
    ({"temperature_c": 70}, "healthy", ""),
    ({"temperature_c": 71}, "degraded",
     "temperature_c is 71 °C, above the degraded threshold of 70"),
    ({"temperature_c": 60, "rotational": True}, "healthy", ""),
    ({"temperature_c": 61, "rotational": True}, "degraded", "threshold of 60 °C for a hard disk"),
    ({"smart_passed": True}, "healthy", ""),
    ({"smart_passed": False}, "failing", "smart_passed is false"),
    ({"reallocated_sectors": 0, "pending_sectors": 0, "offline_uncorrectable": 0}, "healthy", ""),
    ({"reallocated_sectors": 8}, "degraded", "reallocated_sectors is 8, above 0"),
    ({"pending_sectors": 1}, "degraded", "pending_sectors is 1, above 0"),
    ({"offline_uncorrectable": 2}, "degraded", "offline_uncorrectable is 2, above 0"),
    ({"smart": "smartctl", "smartctl_flags": ("error_log_has_errors",)}, "healthy", ""),
    ({"smart": "smartctl", "smartctl_flags": ("prefail_at_threshold",)}, "degraded",
     "pre-failure attribute at or below its threshold"),
]


@pytest.mark.parametrize(("change", "status", "reason"), DEVICE_RULES)
def test_device_rules(good_nvme: DeviceHealth, change: dict[str, Any], status: str,
                      reason: str) -> None:
    report = assess(dataclasses.replace(good_nvme, **change), FINE)
    assert report.status == status
    if status == "healthy":
        assert report.reasons[0].startswith("no problems found")
    else:
        assert len(report.reasons) == 1 and reason in report.reasons[0]


ENGINE_RULES: list[tuple[dict[str, Any], str, str]] = [
    ({"checksum_errors": 1}, "degraded", "checksum_errors is 1, above 0"),
    ({"io_errors": 3}, "degraded", "io_errors is 3, above 0"),
    ({"read_errors": 7, "last_read_error": "EIO at offset 8192"}, "degraded",
     "7 read errors from the backing device since start; last: EIO at offset 8192."),
    ({"background_failures": ("background service cleaner is failing: RuntimeError: x",)},
     "degraded", "background service cleaner is failing: RuntimeError: x."),
    ({"pool_failed": "the metadata store hit EIO"}, "failing",
     "refuses writes because the metadata store hit EIO"),
    ({"free_fraction": 0.10}, "healthy", ""),
    ({"free_fraction": 0.099}, "degraded",
     "free_fraction is 9.9%, below the degraded threshold of 10%"),
    ({"free_fraction": 0.02}, "degraded", "below the degraded threshold"),
    ({"free_fraction": 0.019}, "failing",
     "free_fraction is 1.9%, below the failing threshold of 2%"),
    # spread must exceed both 50 cycles and 20% of the mean
    ({"erase_count_min": 0, "erase_count_max": 50, "erase_count_mean": 25.0}, "healthy", ""),
    ({"erase_count_min": 0, "erase_count_max": 51, "erase_count_mean": 25.0}, "degraded",
     "wear_spread is 51 erase cycles"),
    ({"erase_count_min": 1000, "erase_count_max": 1100, "erase_count_mean": 1050.0}, "healthy", ""),
    ({"erase_count_min": 1000, "erase_count_max": 1300, "erase_count_mean": 1050.0}, "degraded",
     "above both 50 cycles and 20% of the mean"),
    ({"gc_write_amplification": None}, "healthy", ""),
]


@pytest.mark.parametrize(("change", "status", "reason"), ENGINE_RULES)
def test_engine_rules(good_nvme: DeviceHealth, change: dict[str, Any], status: str,
                      reason: str) -> None:
    report = assess(good_nvme, dataclasses.replace(FINE, **change))
    assert report.status == status
    if status == "healthy":
        assert report.reasons[0].startswith("no problems found")
    else:
        assert len(report.reasons) == 1 and reason in report.reasons[0]


def test_reasons_accumulate_worst_first(good_nvme: DeviceHealth) -> None:
    dev = dataclasses.replace(good_nvme, media_errors=4, critical_warning=0x08)
    eng = dataclasses.replace(FINE, checksum_errors=2, free_fraction=0.05)
    report = assess(dev, eng)
    assert report.status == "failing"
    assert len(report.reasons) == 4
    assert "read_only" in report.reasons[0]  # the failing reason leads
    joined = " ".join(report.reasons)
    for part in ("media_errors is 4", "checksum_errors is 2", "free_fraction is 5.0%"):
        assert part in joined
    # degraded findings alone stay degraded however many there are
    report = assess(dataclasses.replace(good_nvme, media_errors=4, temperature_c=80),
                    dataclasses.replace(FINE, io_errors=1))
    assert report.status == "degraded" and len(report.reasons) == 3


def test_from_erase_counts() -> None:
    c = EngineHealthCounters.from_erase_counts([3, 10, 5], free_fraction=0.4, io_errors=1)
    assert (c.erase_count_min, c.erase_count_max, c.erase_count_mean) == (3, 10, 6.0)
    assert c.wear_spread == 7 and c.io_errors == 1 and c.to_dict()["wear_spread"] == 7
    empty = EngineHealthCounters.from_erase_counts([], free_fraction=1.0)
    assert empty.wear_spread is None and "wear_spread" in empty.unavailable()
