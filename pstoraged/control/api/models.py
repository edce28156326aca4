"""What requests look like: the request bodies, the shared parameter types and
the patterns behind them, and the error body every route documents.

The routers (volumes.py, snapshots.py, ...) import these; build_app()
(__init__.py) uses FIELD_HINTS to word validation errors.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Path, Query
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError

from ...engine.format import BLOCK_SIZE
from ...engine.snapshots import parse_until
from ...engine.units import MAX_VOLUME_SIZE, NAME_RE, parse_size
from ...errors import InvalidArgument

NAME_PATTERN = "^" + NAME_RE.pattern + "$"
VolumeName = Annotated[str, Path(description="volume name", pattern=NAME_PATTERN)]
SnapName = Annotated[str, Path(description="snapshot name", pattern=NAME_PATTERN)]
Compression = Literal["lz4", "zstd", "none"]
MaxAge = Annotated[float, Query(ge=0, le=86400, description=(
    "reuse a walk of the volumes' maps up to this many seconds old (0: walk now); a walk "
    "is always reused while nothing changed since"))]
# The schema states every rule on a request's form and values, so one that
# matches it is never refused as malformed (400/422); refusals that depend on
# state (a volume's size, the clock, a lock already set) are 409. A size
# string: a count of M/G/T/P, or of K in multiples of 4 (whole 4 KiB blocks).
_K4 = r"(?:[48]|[13579][26]|[2468][048]|[1-9][0-9]*(?:[02468][048]|[13579][26]))"
SIZE_PATTERN = rf"^(?:[1-9][0-9]*[MGTP]|{_K4}K)(?:i?B)?$"
SizeValue = Annotated[
    Annotated[int, Field(ge=BLOCK_SIZE, multiple_of=BLOCK_SIZE)]
    | Annotated[str, Field(pattern=SIZE_PATTERN, max_length=32)],
    Field(description='bytes, a multiple of 4096 (4096), or a count with a binary suffix '
                      '("10G", "512M", "64K"); above 1 PiB is refused as too large (413)')]
# size_gb is rounded down to whole blocks: anything below one block would be nothing
MIN_SIZE_GB = BLOCK_SIZE / (1 << 30)
# lock_until: a positive duration, a date or an ISO 8601 date-time
LOCK_UNTIL_SCHEMA: dict[str, Any] = {"anyOf": [
    {"type": "string", "pattern": r"^(?:[1-9][0-9]{0,4}(?:\.[0-9]+)?|0\.[0-9]*[1-9][0-9]*)[smhdw]$"},
    {"type": "string", "format": "date"},
    {"type": "string", "format": "date-time"},
]}
# horizons: 1-20 comma-separated day counts in (0, 3650]
_HORIZON = (r"(?:(?:[1-9][0-9]{0,2}|[12][0-9]{3}|3[0-5][0-9]{2}|36[0-4][0-9])(?:\.[0-9]+)?"
            r"|3650(?:\.0+)?|0\.[0-9]*[1-9][0-9]*)")
HORIZONS_PATTERN = rf"^{_HORIZON}(?:,{_HORIZON}){{0,19}}$"

# what to say when a value does not fit its field (the patterns are unreadable)
FIELD_HINTS = {
    "size": 'give bytes as a multiple of 4096, or a count with a suffix: "10G", "512M", "64K"',
    "size_gb": f"give GiB from {MIN_SIZE_GB:.3g} (one 4 KiB block) to {MAX_VOLUME_SIZE >> 30}",
    "horizons": "give 1-20 comma-separated day counts above 0 and at most 3650, e.g. 7,30,90",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _invalid(message: str, hint: str) -> PydanticCustomError:
    """A validation error that carries its hint to the 422 answer."""
    return PydanticCustomError("invalid_value", message.replace("{", "(").replace("}", ")"),
                               {"hint": hint})


def _check_until(text: str) -> str:
    try:
        parse_until(text, 0.0)  # the form only: whether it is still ahead is checked on use
    except InvalidArgument as e:
        raise _invalid(e.message, e.hint) from None
    return text


LockUntil = Annotated[str, Field(max_length=64), AfterValidator(_check_until),
                      WithJsonSchema({**LOCK_UNTIL_SCHEMA, "maxLength": 64})]


def _not_null(field: str) -> dict[str, Any]:
    return {"required": [field], "properties": {field: {"not": {"type": "null"}}}}


def size_from(size: int | str | None, size_gb: float | None) -> int | None:
    """Bytes from a request's `size` or `size_gb` (None: neither given)."""
    if size is not None:
        n = parse_size(size)
    elif size_gb is not None:
        n = int(size_gb * (1 << 30))
        n -= n % BLOCK_SIZE  # the prototype took GiB as a float: round down to whole blocks
    else:
        return None
    return n


class VolumeCreate(_Strict):
    # the schema says "size or size_gb" too, not only the validator
    model_config = ConfigDict(json_schema_extra={"anyOf": [_not_null("size"), _not_null("size_gb")]})

    name: str = Field(description="1-63 characters: a-z 0-9 . _ -", examples=["demo-vol"],
                      pattern=NAME_PATTERN)
    size_gb: float | None = Field(None, ge=MIN_SIZE_GB, le=MAX_VOLUME_SIZE >> 30,
                                  allow_inf_nan=False, description=(
                                      "size in GiB (the prototype's field), rounded down to "
                                      "whole 4 KiB blocks"))
    size: SizeValue | None = None
    compression: Compression = "lz4"

    @model_validator(mode="after")
    def _has_size(self) -> VolumeCreate:
        if self.size is None and self.size_gb is None:
            raise _invalid("a volume needs a size", 'pass "size": "10G" or "size_gb": 10')
        return self


class VolumePatch(_Strict):
    size: SizeValue | None = None
    size_gb: float | None = Field(None, ge=MIN_SIZE_GB, le=MAX_VOLUME_SIZE >> 30,
                                  allow_inf_nan=False)
    shrink: bool = Field(False, description="allow cutting the volume; data past the new end is released")
    force: bool = Field(False, description="shrink even while exported")
    compression: Compression | None = None
    readonly: bool | None = None


class ExportRequest(_Strict):
    readonly: bool = False
    tcp: str | None = Field(None, description="also serve NBD on this ADDR:PORT",
                            examples=["127.0.0.1:10809"], max_length=64)
    tls_psk_file: str | None = Field(None, max_length=4096, description=(
        "TCP requires TLS with these pre-shared keys (lines of user:hexkey, mode 0600)"))
    tls_certificates: str | None = Field(None, max_length=4096, description=(
        "TCP requires TLS with the certificates in this directory (ca-cert.pem, "
        "server-cert.pem, server-key.pem)"))
    allow: list[Annotated[str, Field(max_length=64)]] | None = Field(
        None, max_length=64, description="TCP clients accepted (addresses or CIDR blocks)")


class SnapshotCreate(_Strict):
    name: str | None = Field(None, pattern=NAME_PATTERN, description="default: snap-<generation>")
    lock_until: LockUntil | None = Field(None, description=(
        "retention lock: a date, a time or a duration (2027-01-31, 7d); nothing deletes "
        "or alters the snapshot until then"))


class SnapshotPatch(_Strict):
    lock_until: LockUntil = Field(description="a later end for the retention lock")


class CloneRequest(_Strict):
    name: str = Field(pattern=NAME_PATTERN, description="the new volume's name")


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable code, e.g. not_found, conflict")
    message: str
    hint: str = ""


# the error answers a route documents (the body is always ErrorBody)
ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorBody, "description": d} for s, d in (
        (400, "bad input"), (404, "unknown volume or object"), (409, "conflict"),
        (413, "too large"), (422, "request does not match the schema"),
        (503, "the pool failed or the daemon is stopping"), (507, "the pool is full"))
}
