"""The configuration file: parsing, checks, precedence, reload, and its documentation."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

import pytest

from pstoraged.control import config
from pstoraged.control.config import Config, ExportsConfig, FuseConfig
from pstoraged.errors import InvalidArgument, NotFound

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "etc" / "pstoraged.toml"
DOCS = ROOT / "docs" / "config.md"

FULL = """
pool_dir = "/srv/pstorage/pool"
run_dir = "/run/pst"
log_level = "debug"
sample_interval = 60
temperature_days = [0.5, 3, 14.5]
destroy_grace_hours = 0
api_listen = "[::1]:8470"
api_token_file = "/etc/pstorage/api.token"

[exports]
tcp_listen = "0.0.0.0:10809"
tls = "require"
tls_certificates_dir = "/etc/pstorage/tls"
allow = ["127.0.0.1", "10.0.0.0/8", "fd00::/8"]

[fuse]
mountpoint = "/srv/pstorage/dev"
"""


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "pstoraged.toml"
    p.write_text(text)
    return str(p)


def error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(InvalidArgument) as e:
        config.load(path)
    msg = str(e.value)
    assert path in msg and "\n" not in msg  # one line, naming the file
    return msg


def test_defaults_match_the_daemon_flags(monkeypatch):
    """Config() holds what pstoraged does without flags (argparse defaults or None)."""
    from pstoraged.control.daemon import parse_args

    for var in config.ENVIRONMENT.values():
        monkeypatch.delenv(var, raising=False)
    assert config.merge(Config(), parse_args([]), environ={}) == Config()
    top = [k for k in config.keys() if "." not in k]
    assert top == ["pool", "pool_dir", "run_dir", "log_level", "sample_interval", "temperature_days",
                   "destroy_grace_hours", "api_listen", "api_token_file"]
    assert all(hasattr(parse_args([]), k) for k in top)  # every top-level key is a flag


def test_full_file(tmp_path):
    cfg = config.load(write(tmp_path, FULL))
    assert cfg == Config(
        pool_dir="/srv/pstorage/pool", run_dir="/run/pst", log_level="DEBUG",
        sample_interval=60.0, temperature_days=(0.5, 3.0, 14.5), destroy_grace_hours=0.0,
        api_listen="[::1]:8470", api_token_file="/etc/pstorage/api.token",
        exports=ExportsConfig(tcp_listen="0.0.0.0:10809", tls="require",
                              tls_certificates_dir="/etc/pstorage/tls",
                              allow=("127.0.0.1/32", "10.0.0.0/8", "fd00::/8")),
        fuse=FuseConfig(mountpoint="/srv/pstorage/dev"))


def test_partial_file_and_empty_strings(tmp_path):
    cfg = config.load(write(tmp_path, 'log_level = "WARNING"\napi_listen = ""\n[fuse]\n'))
    assert cfg == Config(log_level="WARNING")
    cfg = config.load(write(tmp_path, "[exports]\nallow = []\n"))
    assert cfg.exports.allow == ()  # no filter


def test_missing_files(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "none.toml"))
    assert config.load() == Config()                          # the default path: defaults
    assert config.load(str(tmp_path / "none.toml")) == Config()
    with pytest.raises(NotFound) as e:                         # a file the user named
        config.load(str(tmp_path / "typo.toml"))
    assert "typo.toml does not exist" in str(e.value) and e.value.exit_code == 3
    assert config.load("/dev/null") == Config()                # empty TOML
    with pytest.raises(InvalidArgument, match="cannot read config file"):
        config.load(str(tmp_path))


def test_unknown_keys(tmp_path):
    msg = error(tmp_path, 'pool_dri = "/x"\n')
    assert "unknown setting 'pool_dri'" in msg and "did you mean 'pool_dir'" in msg
    msg = error(tmp_path, '[exports]\ntsl = "on"\n')
    assert "unknown setting 'exports.tsl'" in msg and "did you mean 'exports.tls'" in msg
    msg = error(tmp_path, '[export]\ntls = "on"\n')
    assert "unknown section [export]" in msg and "did you mean [exports]" in msg
    assert "unknown setting 'zzz'" in error(tmp_path, "zzz = 1\n")


@pytest.mark.parametrize("text, words", [
    ('sample_interval = "5m"', "sample_interval must be a number, not a string"),
    ("sample_interval = true", "sample_interval must be a number, not a boolean"),
    ("pool_dir = 5", "pool_dir must be a string, not an integer"),
    ("temperature_days = 7", "temperature_days must be three numbers"),
    ("temperature_days = [1, 7]", "temperature_days must be three numbers"),
    ('temperature_days = [1, "7", 30]', "must be a number, not a string"),
    ("exports = 3", "exports must be a table ([exports])"),
    ('[exports]\nallow = "10.0.0.0/8"', "exports.allow must be a list"),
    ("[exports]\nallow = [10]", "exports.allow must be a string, not an integer"),
    ("log_level = 20", "log_level must be a string"),
])
def test_wrong_types(tmp_path, text, words):
    assert words in error(tmp_path, text + "\n")


@pytest.mark.parametrize("text, words", [
    ('log_level = "LOUD"', "log_level must be DEBUG, INFO"),
    ('pool_dir = "var/lib/pstorage"', "pool_dir must be an absolute path"),
    ("sample_interval = 0", "sample_interval must be greater than 0"),
    ("sample_interval = inf", "sample_interval must be a finite number"),
    ("destroy_grace_hours = -1", "destroy_grace_hours must be 0 or more"),
    ('api_listen = "localhost"', "api_listen must be ADDR:PORT"),
    ('api_listen = "::1:8470"', "api_listen must be ADDR:PORT"),  # IPv6 needs brackets
    ('api_listen = "127.0.0.1:70000"', "api_listen must be ADDR:PORT"),
    ('api_listen = "127.0.0.1:8470"', "api_listen needs api_token_file"),
    ('[exports]\ntls = "yes"', "exports.tls must be one of off, on, require"),
    ('[exports]\ntls = "on"', "exports.tls = 'on' needs exports.tls_psk_file"),
    ('[exports]\ntls_psk_file = "/a"\ntls_certificates_dir = "/b"', "not both"),
    ('[exports]\nallow = ["10.0.0.1/8"]', "has host bits set"),
    ('[exports]\nallow = ["ten"]', "does not appear to be an IPv4 or IPv6"),
    ('[fuse]\nmountpoint = "dev"', "fuse.mountpoint must be an absolute path"),
])
def test_wrong_values(tmp_path, text, words):
    assert words in error(tmp_path, text + "\n")


@pytest.mark.parametrize("days", ["[7, 1, 30]", "[1, 7, 7]", "[0, 7, 30]", "[-1, 7, 30]"])
def test_temperature_days_must_increase(tmp_path, days):
    assert "temperature_days must increase" in error(tmp_path, f"temperature_days = {days}\n")


def test_not_toml(tmp_path):
    assert "not valid TOML" in error(tmp_path, "pool_dir = /var/lib\n")


def flags(**kw) -> argparse.Namespace:
    base = dict.fromkeys(k for k in config.keys() if "." not in k)
    return argparse.Namespace(**{**base, **kw})


def test_merge_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.load(write(tmp_path, 'pool_dir = "/srv/file"\nrun_dir = "/run/file"\n'
                                      'log_level = "WARNING"\nsample_interval = 60\n'))
    env = {"PSTORAGE_POOL_DIR": "/srv/env", "PSTORAGE_LOG_LEVEL": "error"}
    out = config.merge(cfg, flags(log_level="debug", temperature_days="2,8,40"), environ=env)
    assert out.log_level == "DEBUG"                   # flag over environment over file
    assert out.pool_dir == "/srv/env"                 # environment over file
    assert out.run_dir == "/run/file"                 # file over default
    assert out.sample_interval == 60.0                # not given: the file's
    assert out.temperature_days == (2.0, 8.0, 40.0)   # the flag's "HOT,WARM,COLD" form
    assert out.destroy_grace_hours == 24.0            # nowhere: the default
    rel = config.merge(cfg, flags(pool_dir="pool"), environ={})
    assert rel.pool_dir == str(tmp_path / "pool")     # relative flags: from the cwd
    assert config.merge(cfg, flags(), environ={}) == cfg


def test_merge_checks_flags():
    with pytest.raises(InvalidArgument, match="--sample-interval must be greater than 0"):
        config.merge(Config(), flags(sample_interval=-5.0), environ={})
    with pytest.raises(InvalidArgument, match="--temperature-days must increase"):
        config.merge(Config(), flags(temperature_days="7,1,30"), environ={})
    with pytest.raises(InvalidArgument, match=r"\$PSTORAGE_LOG_LEVEL must be DEBUG"):
        config.merge(Config(), flags(), environ={"PSTORAGE_LOG_LEVEL": "chatty"})
    with pytest.raises(InvalidArgument, match="api_listen needs api_token_file"):
        config.merge(Config(), flags(api_listen="127.0.0.1:8470"), environ={})
    ok = config.merge(Config(), flags(api_listen="127.0.0.1:8470", api_token_file="/t"),
                      environ={})
    assert (ok.api_listen, ok.api_token_file) == ("127.0.0.1:8470", "/t")


def test_diff_and_reload_plan():
    old = Config()
    assert config.diff(old, Config()) == []
    new = Config(pool_dir="/srv/x", log_level="DEBUG", temperature_days=(2, 8, 40),
                 exports=ExportsConfig(tls="on", tls_psk_file="/etc/pstorage/psk"))
    assert config.diff(old, new) == ["pool_dir", "log_level", "temperature_days",
                                     "exports.tls", "exports.tls_psk_file"]
    now, later = config.reload_plan(old, new)
    assert now == ["log_level", "temperature_days"]
    assert later == ["pool_dir", "exports.tls", "exports.tls_psk_file"]
    assert config.RELOADABLE == {"log_level", "sample_interval", "temperature_days",
                                 "destroy_grace_hours"}
    assert config.RELOADABLE <= set(config.keys())
    assert not {"pool_dir", "run_dir", "api_listen"} & config.RELOADABLE


# ---------------------------------------------------------------- the documentation

SETTING = re.compile(r"^#([a-z_]+ = .*)$")  # a setting shown commented out


def test_shipped_file_is_the_defaults():
    assert config.load(str(SHIPPED)) == Config()
    # uncommented, every line still gives exactly the defaults, and every key is there
    text = SHIPPED.read_text()
    lines = [SETTING.sub(r"\1", line) for line in text.splitlines()]
    data = tomllib.loads("\n".join(lines))
    assert config.from_dict(data, str(SHIPPED)) == Config()
    present = [k for k, v in data.items() if not isinstance(v, dict)]
    present += [f"{s}.{k}" for s, t in data.items() if isinstance(t, dict) for k in t]
    assert present == config.keys()


def test_every_key_is_documented():
    table = DOCS.read_text()
    for key in config.keys():
        assert f"| `{key}` |" in table, f"{key} missing from docs/config.md"
    documented = re.findall(r"^\| `([a-z_.]+)` \|", table, re.M)
    assert documented == config.keys()  # and nothing stale
    reload_rows = {k for k in documented
                   if re.search(rf"^\| `{re.escape(k)}` \|[^|]*\|[^|]*\| reload \|", table, re.M)}
    assert reload_rows == config.RELOADABLE



def test_dedupe_index_memory(tmp_path):
    assert config.load(write(tmp_path, '[dedupe]\nindex_memory = "4G"\n')).dedupe.index_memory == 4 << 30
    assert config.load(write(tmp_path, "[dedupe]\nindex_memory = 67108864\n")
                       ).dedupe.index_memory == 64 << 20
    for bad, words in (('"lots"', 'size like "1G"'), ('"512K"', "at least 1M"),
                       ("true", 'size like "1G"')):
        assert words in error(tmp_path, f"[dedupe]\nindex_memory = {bad}\n")
