"""Parsing and validation of user-supplied names and sizes."""

from __future__ import annotations

import re

from ..errors import InvalidArgument, TooLarge
from .format import BLOCK_SIZE

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_SUFFIX = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
MAX_VOLUME_SIZE = 1 << 50  # 1 PiB: LBAs fit comfortably in the key format


def validate_name(name: str, what: str = "volume") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise InvalidArgument(
            f"invalid {what} name {name!r}",
            "use 1-63 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name


def parse_size(text: str | int) -> int:
    """'10G', '512M', '4096', 4096 -> bytes (binary units)."""
    if isinstance(text, bool):
        raise InvalidArgument(f"invalid size {text!r}")
    if isinstance(text, int):
        n = text
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([KMGTP]?)(?:I?B)?\s*", str(text).upper())
        if not m:
            raise InvalidArgument(f"invalid size {text!r}", "write it like 10G, 512M or 4096")
        n = int(m.group(1)) * _SUFFIX[m.group(2)]
    return n


def validate_volume_size(size: int) -> int:
    if size <= 0 or size % BLOCK_SIZE:
        raise InvalidArgument(
            f"volume size {size} is not a positive multiple of {BLOCK_SIZE}",
            f"round it to a multiple of {BLOCK_SIZE} bytes",
        )
    if size > MAX_VOLUME_SIZE:
        raise TooLarge(f"volume size {size} exceeds the 1 PiB limit", "choose a smaller size")
    return size


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError
