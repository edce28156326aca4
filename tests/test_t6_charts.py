"""Charts of the usage history and forecast: text layout and PNG output."""

from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest

from pstoraged.analytics.charts import BRAILLE, terminal_chart, write_png
from pstoraged.analytics.forecast import forecast

GiB = 1 << 30
DAY = 86400.0
T0 = 1_700_000_000.0  # 2023-11-14 22:13 UTC
CAP = 4096 * GiB


def is_braille(ch: str) -> bool:
    return BRAILLE < ord(ch) <= BRAILLE + 0xFF


@pytest.fixture
def growing():
    t = T0 + np.arange(0, 60 * DAY, 3600.0)
    u = 500 * GiB + 10 * GiB * (t - T0) / DAY
    return t, u, forecast(t, u, CAP)


def plot_rows(chart: str, height: int) -> list[str]:
    return chart.split("\n")[1:height - 3]  # between the title and the x axis


@pytest.mark.parametrize(("width", "height"), [(72, 16), (80, 24), (40, 11), (120, 30)])
def test_terminal_chart_dimensions(growing, width, height):
    t, u, fc = growing
    chart = terminal_chart(t, u, CAP, fc, width=width, height=height)
    lines = chart.split("\n")
    assert len(lines) == height
    assert max(len(line) for line in lines) <= width
    rows = plot_rows(chart, height)
    bar = rows[0].index("|")
    assert all(r[bar] == "|" for r in rows)  # the y axis is one straight column
    assert lines[-3][bar] == "+"  # and meets the x axis at the corner
    assert "\x1b" not in chart  # no colour codes


def test_terminal_chart_marks(growing):
    t, u, fc = growing
    chart = terminal_chart(t, u, CAP, fc)  # 72 x 16: 12 plot rows, capacity on row 10 of 0..11
    lines = chart.split("\n")
    rows = plot_rows(chart, 16)
    assert len(rows) == 12
    by_label = {r.split("|")[0].strip(): r.split("|", 1)[1] for r in rows}
    assert set(by_label) >= {"0 TiB", "0.8 TiB", "1.6 TiB", "2.4 TiB", "3.2 TiB", "4 TiB"}
    assert by_label["4 TiB"].count("=") > 30  # the 100% line, on the row labelled capacity
    assert by_label["3.2 TiB"].count("-") > 30  # the 80% line
    bar = rows[0].index("|")
    now_col = lines[-3].index("^") - bar - 1
    for r in rows:
        cells = r[bar + 1:]
        # History (braille) left of now, forecast (+) right of it.
        assert all(c <= now_col + 1 for c, ch in enumerate(cells) if is_braille(ch))
        assert all(c >= now_col - 1 for c, ch in enumerate(cells) if ch == "+")
    assert sum(is_braille(ch) for ch in chart) >= 20

    def line_of(value: float) -> int:  # row r holds [r - 0.5, r + 0.5) x 10% of capacity
        return 11 - round(value / (CAP / 10))

    # The history starts at 500 GiB (12% of capacity) ...
    assert line_of(500 * GiB) == 10 and is_braille(rows[10][bar + 1])
    assert rows[10][bar + 1:].strip()[0] == rows[10][bar + 1]
    # ... and the path ends at about 500 + 150 * 10 GiB (49%), at the right edge.
    end = fc.path[-1].used_bytes
    assert end == pytest.approx(2000 * GiB, rel=0.01)
    assert [i for i, r in enumerate(rows) if len(r) == 72 and r.endswith("+")] == [line_of(end)]
    assert "2023-11" in lines[-2] and "2024-0" in lines[-2]  # dates on the x axis
    assert lines[0].startswith("Used space and forecast: 80% full in about")
    assert "= 100%" in lines[-1] and "- 80%" in lines[-1]


def test_terminal_chart_band_is_drawn_when_wide():
    rng = np.random.default_rng(3)
    t = T0 + np.arange(0, 30 * DAY, 3600.0)
    u = 500 * GiB + 30 * GiB * (t - T0) / DAY + rng.normal(0, 200 * GiB, len(t))
    fc = forecast(t, u, CAP)
    chart = terminal_chart(t, u, CAP, fc)
    assert chart.count(":") - chart.split("\n")[-1].count(":") > 10  # the interval band


def test_terminal_chart_insufficient_data_shows_history_only():
    t = T0 + np.linspace(0, 0.2 * DAY, 5)
    u = np.full(5, 1000 * GiB)
    fc = forecast(t, u, CAP)
    assert fc.status == "insufficient_data"
    chart = terminal_chart(t, u, CAP, fc)
    lines = chart.split("\n")
    assert len(lines) == 16
    assert "need at least 12 samples" in lines[0]
    body = "\n".join(plot_rows(chart, 16))
    assert "+" not in body and ":" not in body and "^" not in lines[-3]
    assert sum(is_braille(ch) for ch in body) > 30  # a flat history across the width
    assert "11-14" in lines[-2]  # sub-day span: dates with times


def test_terminal_chart_without_any_samples():
    fc = forecast([], [], CAP)
    chart = terminal_chart([], [], CAP, fc)
    assert len(chart.split("\n")) == 16
    assert not any(is_braille(ch) for ch in chart.split("\n", 1)[1].rsplit("\n", 1)[0])


def test_terminal_chart_rejects_tiny_sizes(growing):
    t, u, fc = growing
    with pytest.raises(ValueError):
        terminal_chart(t, u, CAP, fc, width=30)
    with pytest.raises(ValueError):
        terminal_chart(t, u, CAP, fc, height=8)


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_write_png(growing, tmp_path):
    t, u, fc = growing
    out = tmp_path / "forecast.png"
    write_png(str(out), t, u, CAP, fc)
    assert png_size(out) == (900, 500)
    assert 10_000 < out.stat().st_size < 1_000_000


def test_write_png_insufficient_data(tmp_path):
    t = T0 + np.linspace(0, 0.2 * DAY, 5)
    u = np.full(5, 1000 * GiB)
    out = tmp_path / "history.png"
    write_png(str(out), t, u, CAP, forecast(t, u, CAP))
    assert png_size(out) == (900, 500)
    assert 10_000 < out.stat().st_size < 1_000_000


def test_importing_charts_does_not_import_matplotlib():
    code = ("import sys, pstoraged.analytics.charts, pstoraged.analytics.forecast; "
            "sys.exit('matplotlib' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=".").returncode == 0
