"""pstoraged's configuration file: /etc/pstorage/pstoraged.toml.

Every setting, its default and its check live here; `etc/pstoraged.toml`
(the shipped file, every key shown commented out with its default) and
`docs/config.md` document the same keys, and a test keeps all three equal.

Precedence, highest first: a command-line flag that was given, the
environment ($PSTORAGE_POOL_DIR, $PSTORAGE_RUN_DIR, $PSTORAGE_LOG_LEVEL), the
file, the default here. The daemon's config-backed flags default to None so
that `merge()` can tell "given" from "not given".

    cfg = config.merge(config.load(args.config), args)
    ...on SIGHUP:
    new = config.merge(config.load(args.config), args)
    now, later = config.reload_plan(cfg, new)

Errors are InvalidArgument (NotFound for a named file that does not exist),
one line naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..engine.units import parse_size
from ..errors import InvalidArgument, NotFound

DEFAULT_PATH = "/etc/pstorage/pstoraged.toml"
DEFAULT_POOL_DIR = "/var/lib/pstorage"
DEFAULT_RUN_DIR = "/run/pstorage"
TLS_MODES = ("off", "on", "require")
DOCS = "docs/config.md"


@dataclass(frozen=True, slots=True)
class ExportsConfig:
    """[exports]: how NBD exports (nbdkit) are served; read when an export starts."""

    tcp_listen: str | None = None  # "ADDR:PORT" for TCP exports; None: unix sockets only
    tls: str = "off"  # nbdkit --tls: off | on (offered) | require
    tls_psk_file: str | None = None  # nbdkit --tls-psk
    tls_certificates_dir: str | None = None  # nbdkit --tls-certificates
    # clients allowed on TCP exports (addresses or networks); () = no filter
    allow: tuple[str, ...] = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True, slots=True)
class FuseConfig:
    """[fuse]: volumes presented as files."""

    # serve the mount; `pstorage attach` then uses it instead of nbdfuse.
    # "auto": under systemd (NOTIFY_SOCKET), whose fd store carries the mount
    # across restarts; not when run by hand
    enabled: bool | str = "auto"
    mountpoint: str = ""  # "" = RUN_DIR/dev

    def active(self) -> bool:
        if self.enabled == "auto":
            return "NOTIFY_SOCKET" in os.environ
        return bool(self.enabled)

    def path(self, run_dir: str) -> str:
        return self.mountpoint or os.path.join(run_dir, "dev")


@dataclass(frozen=True, slots=True)
class DedupeConfig:
    """[dedupe]: the dedupe index (engine/fpindex.py); read at start."""

    # memory for the index's Bloom filter; beyond it the index goes sparse
    # (samples fingerprints: some isolated duplicates are stored again)
    index_memory: int = 1 << 30


@dataclass(frozen=True, slots=True)
class ReplicationConfig:
    """[replication]: peers and their TCP listener (pstoraged/replication/); read at start."""

    listen: str | None = None  # "ADDR:PORT" of the replication listener; None: off
    advertise: str | None = None  # "HOST:PORT" peers should dial; None: the listen address
    name: str = ""  # what peers call this daemon when pairing; "": the pool's label or UUID
    ping_interval: float = 10.0  # seconds between liveness checks of each peer


@dataclass(frozen=True, slots=True)
class Config:
    """Every pstoraged setting, with its default."""

    # The pool to open, by its UUID (or a unique 8+ digit prefix) or label:
    # found by its superblock on any block device, never by a /dev path.
    # Empty: the pool pool_dir last served.
    pool: str = ""
    pool_dir: str = DEFAULT_POOL_DIR
    run_dir: str = DEFAULT_RUN_DIR
    log_level: str = "INFO"
    sample_interval: float = 300.0  # seconds between capacity samples
    temperature_days: tuple[float, float, float] = (1.0, 7.0, 30.0)  # hot, warm, cold limits
    destroy_grace_hours: float = 24.0  # deleted volumes/snapshots stay recoverable this long
    api_listen: str | None = None  # "ADDR:PORT": REST API on TCP too (needs api_token_file)
    api_token_file: str | None = None
    exports: ExportsConfig = field(default_factory=ExportsConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)
    dedupe: DedupeConfig = field(default_factory=DedupeConfig)
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)


# What SIGHUP applies to the running daemon. Everything else needs a restart:
# paths and listeners are bound at startup; [exports] is read when an export
# starts, and running exports (nbdkit) outlive the daemon anyway.
RELOADABLE = frozenset({"log_level", "sample_interval", "temperature_days",
                        "destroy_grace_hours"})

SECTIONS: dict[str, type] = {"exports": ExportsConfig, "fuse": FuseConfig,
                             "dedupe": DedupeConfig, "replication": ReplicationConfig}

# The environment variables pstoraged has always honoured.
ENVIRONMENT = {"pool": "PSTORAGE_POOL", "pool_dir": "PSTORAGE_POOL_DIR", "run_dir": "PSTORAGE_RUN_DIR",
               "log_level": "PSTORAGE_LOG_LEVEL"}


def keys() -> list[str]:
    """Every setting as a dotted key ("exports.tls"), in file order."""
    out = []
    for f in dataclasses.fields(Config):
        sub = SECTIONS.get(f.name)
        out += [f"{f.name}.{g.name}" for g in dataclasses.fields(sub)] if sub else [f.name]
    return out


# ---------------------------------------------------------------- value checks
# Each takes (value, where) and returns the value to store or raises
# InvalidArgument; `where` names the source: "FILE: key", "--flag" or "$VAR".

Check = Callable[[Any, str], Any]


def _toml_type(v: Any) -> str:
    for t, name in ((bool, "a boolean"), (int, "an integer"), (float, "a float"),
                    (str, "a string"), (list, "an array"), (dict, "a table")):
        if isinstance(v, t):
            return name
    return "a date/time"


def _wrong(where: str, want: str, v: Any) -> InvalidArgument:
    return InvalidArgument(f"{where} must be {want}, not {_toml_type(v)} ({v!r})")


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _wrong(where, "a number", v)
    if not math.isfinite(v):
        raise InvalidArgument(f"{where} must be a finite number, not {v!r}")
    return float(v)


def _positive(v: Any, where: str) -> float:
    x = _number(v, where)
    if x <= 0:
        raise InvalidArgument(f"{where} must be greater than 0, not {x:g}")
    return x


def _not_negative(v: Any, where: str) -> float:
    x = _number(v, where)
    if x < 0:
        raise InvalidArgument(f"{where} must be 0 or more, not {x:g}")
    return x


def _string(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise _wrong(where, "a string", v)
    return v


def _path(v: Any, where: str) -> str:
    s = _string(v, where)
    if not os.path.isabs(s):
        raise InvalidArgument(f"{where} must be an absolute path, not {s!r}")
    return os.path.normpath(s)


def _optional(check: Check) -> Check:
    def opt(v: Any, where: str) -> Any:
        # TOML has no null: "" (or leaving the key out) means unset
        return None if v is None or v == "" else check(v, where)
    return opt


def _log_level(v: Any, where: str) -> str:
    s = _string(v, where).upper()
    if s not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise InvalidArgument(f"{where} must be DEBUG, INFO, WARNING, ERROR or CRITICAL, "
                              f"not {v!r}")
    return s


def _temperature(v: Any, where: str) -> tuple[float, float, float]:
    if not isinstance(v, list | tuple) or len(v) != 3:
        raise InvalidArgument(f"{where} must be three numbers (hot, warm, cold days), "
                              f"e.g. [1, 7, 30], not {v!r}")
    h, w, c = (_number(x, where) for x in v)
    if not 0 < h < w < c:
        raise InvalidArgument(f"{where} must increase: 0 < hot {h:g} < warm {w:g} "
                              f"< cold {c:g} days")
    return (h, w, c)


def _addr_port(v: Any, where: str) -> str:
    s = _string(v, where)
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or (
            ":" in host and not (host.startswith("[") and host.endswith("]"))):
        raise InvalidArgument(f"{where} must be ADDR:PORT like 127.0.0.1:10809 or "
                              f"[::1]:10809, not {s!r}")
    return s


def _tls(v: Any, where: str) -> str:
    s = _string(v, where)
    if s not in TLS_MODES:
        raise InvalidArgument(f"{where} must be one of {', '.join(TLS_MODES)}, not {s!r}")
    return s


def _networks(v: Any, where: str) -> tuple[str, ...]:
    if not isinstance(v, list | tuple):
        raise _wrong(where, "a list of addresses or networks", v)
    out = []
    for x in v:
        try:
            out.append(str(ipaddress.ip_network(_string(x, where))))
        except ValueError as e:  # host bits set, not an address, ...
            raise InvalidArgument(f"{where}: {e}",
                                  "write an address like 10.0.0.5 or a network like 10.0.0.0/8"
                                  ) from None
    return tuple(out)


def _path_or_empty(v: Any, where: str) -> str:
    return "" if v == "" else _path(v, where)


def _auto_or_boolean(v: Any, where: str) -> bool | str:
    if not isinstance(v, bool) and v != "auto":
        raise _wrong(where, 'true, false or "auto"', v)
    return v


def _pool_name(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise _wrong(where, "a pool UUID or label", v)
    if v and not (0 < len(v.encode()) <= 36):
        raise InvalidArgument(f"{where}: {v!r} is neither a pool UUID nor a label")
    return v


def _memory(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise _wrong(where, 'a size like "1G" or "512M"', v)
    try:
        n = parse_size(v)
    except InvalidArgument:
        raise InvalidArgument(f"{where} must be a size like \"1G\" or \"512M\", not {v!r}"
                              ) from None
    if n < 1 << 20:
        raise InvalidArgument(f"{where} must be at least 1M, not {v!r}")
    return n


def _peer_name(v: Any, where: str) -> str:
    s = _string(v, where)
    if s and not (len(s) <= 63 and s.replace("-", "").replace("_", "").replace(".", "").isalnum()
                  and s.isascii()):
        raise InvalidArgument(f"{where} must be 1-63 letters, digits, '.', '_' or '-', not {s!r}")
    return s


CHECKS: dict[str, Check] = {
    "pool": _pool_name,
    "pool_dir": _path,
    "run_dir": _path,
    "log_level": _log_level,
    "sample_interval": _positive,
    "temperature_days": _temperature,
    "destroy_grace_hours": _not_negative,
    "api_listen": _optional(_addr_port),
    "api_token_file": _optional(_path),
    "exports.tcp_listen": _optional(_addr_port),
    "exports.tls": _tls,
    "exports.tls_psk_file": _optional(_path),
    "exports.tls_certificates_dir": _optional(_path),
    "exports.allow": _networks,
    "fuse.mountpoint": _path_or_empty,
    "fuse.enabled": _auto_or_boolean,
    "dedupe.index_memory": _memory,
    "replication.listen": _optional(_addr_port),
    "replication.advertise": _optional(_addr_port),
    "replication.name": _peer_name,
    "replication.ping_interval": _positive,
}


def _check_together(cfg: Config, source: str) -> None:
    """Rules that involve more than one key."""
    if cfg.api_listen and not cfg.api_token_file:
        raise InvalidArgument(f"{source}: api_listen needs api_token_file",
                              "a file of mode 0600 holding the bearer token")
    ex = cfg.exports
    if ex.tls_psk_file and ex.tls_certificates_dir:
        raise InvalidArgument(f"{source}: set exports.tls_psk_file or "
                              "exports.tls_certificates_dir, not both")
    if ex.tls != "off" and not (ex.tls_psk_file or ex.tls_certificates_dir):
        raise InvalidArgument(f"{source}: exports.tls = {ex.tls!r} needs exports.tls_psk_file "
                              "or exports.tls_certificates_dir")


# ---------------------------------------------------------------- the file


def _unknown(key: str, known: list[str], source: str) -> InvalidArgument:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return InvalidArgument(f"{source}: unknown setting {key!r}",
                           f"{hint}the settings are listed in {DOCS}")


def from_dict(data: Mapping[str, Any], source: str = "config") -> Config:
    """A Config from parsed TOML; `source` (the file name) prefixes every error."""
    known = keys()
    flat: dict[str, Any] = {}
    for k, v in data.items():
        if k in SECTIONS:
            if not isinstance(v, dict):
                raise _wrong(f"{source}: {k}", f"a table ([{k}])", v)
            for sk, sv in v.items():
                flat[f"{k}.{sk}"] = sv
        elif isinstance(v, dict):
            close = difflib.get_close_matches(k, list(SECTIONS), n=1)
            raise InvalidArgument(f"{source}: unknown section [{k}]",
                                  (f"did you mean [{close[0]}]? " if close else "")
                                  + f"the settings are listed in {DOCS}")
        else:
            flat[k] = v
    values: dict[str, Any] = {}
    for k, v in flat.items():
        if k not in CHECKS:
            raise _unknown(k, known, source)
        values[k] = CHECKS[k](v, f"{source}: {k}")
    cfg = _build(Config(), values)
    _check_together(cfg, source)
    return cfg


def _build(base: Config, values: Mapping[str, Any]) -> Config:
    """`base` with the dotted keys in `values` replaced."""
    top = {k: v for k, v in values.items() if "." not in k}
    for sect in SECTIONS:
        sub = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(sect + ".")}
        if sub:
            top[sect] = dataclasses.replace(getattr(base, sect), **sub)
    return dataclasses.replace(base, **top)


def load(path: str | None = None) -> Config:
    """The settings in `path` (default /etc/pstorage/pstoraged.toml) over the defaults.

    A missing default file means all defaults; a file named explicitly must exist."""
    path = os.path.abspath(path or DEFAULT_PATH)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if path == DEFAULT_PATH:
            return Config()
        raise NotFound(f"config file {path} does not exist",
                       f"leave out --config, or create it: {DOCS} lists the settings") from None
    except OSError as e:
        raise InvalidArgument(f"cannot read config file {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgument(f"{path}: not valid TOML: {e}") from None
    return from_dict(data, path)


# ---------------------------------------------------------------- flags, reload


def merge(cfg: Config, args: Any, environ: Mapping[str, str] | None = None) -> Config:
    """`cfg` overridden by the environment, then by the flags given in `args`.

    `args` is the daemon's argparse.Namespace: an attribute named like a
    top-level key (pool_dir, log_level, ...) that is not None was given on the
    command line. Relative paths from flags are taken from the current directory."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for key, var in ENVIRONMENT.items():
        if environ.get(var):
            values[key] = _from_flag(key, environ[var], f"${var}")
    for f in dataclasses.fields(Config):
        if f.name in SECTIONS:
            continue
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = _from_flag(f.name, v, "--" + f.name.replace("_", "-"))
    if not values:
        return cfg
    out = _build(cfg, values)
    _check_together(out, "command line")
    return out


def _from_flag(key: str, v: Any, where: str) -> Any:
    """Flags and variables arrive as text (or argparse's float): convert, then check."""
    def num(x: Any) -> Any:
        try:
            return float(x) if isinstance(x, str) else x
        except ValueError:
            raise InvalidArgument(f"{where} must be a number, not {x!r}") from None
    if key in ("sample_interval", "destroy_grace_hours"):
        v = num(v)
    elif key == "temperature_days" and isinstance(v, str):  # "1,7,30"
        v = [num(x) for x in v.split(",")]
    elif key in ("pool_dir", "run_dir", "api_token_file") and isinstance(v, str) and v:
        v = os.path.abspath(v)
    return CHECKS[key](v, where)


def diff(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ, in file order."""
    def get(cfg: Config, key: str) -> Any:
        obj: Any = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj
    return [k for k in keys() if get(old, k) != get(new, k)]


def reload_plan(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """(changed keys SIGHUP applies now, changed keys that need a restart)."""
    changed = diff(old, new)
    return ([k for k in changed if k in RELOADABLE],
            [k for k in changed if k not in RELOADABLE])
