"""Level 1: log lines journald keeps (priority prefixes under systemd)."""

from __future__ import annotations

import os
import subprocess
import sys

CODE = """
import logging
from pstoraged.control import logsetup
logsetup.setup("DEBUG")
log = logging.getLogger("pstoraged.test")
log.info("volume v created")
log.warning("disk slow")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("boom")
"""


def run(env: dict, stderr_path: str) -> str:
    with open(stderr_path, "w") as err:
        st = os.fstat(err.fileno())
        if env.get("JOURNAL_STREAM") == "match":
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run([sys.executable, "-c", CODE], stderr=err, env=env, check=True)
    with open(stderr_path) as f:
        return f.read()


def test_priority_prefixes_under_journald(tmp_path):
    out = run({**os.environ, "JOURNAL_STREAM": "match"}, str(tmp_path / "err"))
    lines = out.splitlines()
    assert lines[0] == "<6>pstoraged.test: volume v created"
    assert lines[1] == "<4>pstoraged.test: disk slow"
    assert lines[2] == "<3>pstoraged.test: boom"
    assert all(ln.startswith("<3>") for ln in lines[3:]) and "ZeroDivisionError" in out


def test_plain_lines_elsewhere(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    out = run(env, str(tmp_path / "err"))
    assert " INFO pstoraged.test: volume v created" in out and not out.startswith("<")
    # a JOURNAL_STREAM that is not our stderr (inherited by a child) is ignored
    out = run({**env, "JOURNAL_STREAM": "1:2"}, str(tmp_path / "err2"))
    assert not out.startswith("<")
