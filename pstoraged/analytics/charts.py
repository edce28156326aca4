"""Drawing the usage history and its forecast: as text for a terminal, or PNG.

Both charts put 0..capacity on the y axis on purpose: the question is how far
the pool is from full, and a zoomed axis would hide that. Times are shown in
UTC so that the same history draws the same chart everywhere.

matplotlib is imported inside `write_png` only: the daemon imports this module
(through the CLI and REST layers) and must not pay for, or depend on, a
plotting stack it never uses.
"""

from __future__ import annotations

import math
import time

import numpy as np

from .forecast import Forecast, Samples

_UNITS = (("B", 1), ("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30),
          ("TiB", 1 << 40), ("PiB", 1 << 50))
BRAILLE = 0x2800
# Braille dot bits by [row from the top][column] of a 2x4 cell.
_DOT = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))
MIN_WIDTH, MIN_HEIGHT = 40, 11  # 11 lines leave 7 plot rows: room for 80% and 100% rows
HISTORY, PATH, BAND, FULL, EIGHTY = "\u28ff", "+", ":", "=", "-"
LEGEND = (f"{HISTORY} used", f"{PATH} forecast", f"{BAND} {{pct}} interval", f"{FULL} 100%",
          f"{EIGHTY} 80%", "^ now")


def _axis_unit(capacity: float) -> tuple[str, float]:
    """The largest binary unit in which the capacity is at least 1."""
    name, size = _UNITS[0]
    for n, s in _UNITS:
        if capacity >= s:
            name, size = n, s
    return name, float(size)


def _clean(times: Samples, used: Samples) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(times, dtype=np.float64)
    u = np.asarray(used, dtype=np.float64)
    ok = np.isfinite(t) & np.isfinite(u)
    order = np.argsort(t[ok], kind="stable")
    return t[ok][order], u[ok][order]


def _date_format(span_seconds: float) -> str:
    return "%Y-%m-%d" if span_seconds >= 2 * 86400 else "%m-%d %H:%M"


def _path_arrays(fc: Forecast) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The forecast path as (unix times, used, lower, upper), empty without a forecast."""
    if not fc.ok or not fc.path or fc.now is None:
        e = np.zeros(0)
        return e, e, e, e
    days = np.array([p.days for p in fc.path])
    return (fc.now + days * 86400.0, np.array([p.used_bytes for p in fc.path]),
            np.array([p.lower_bytes for p in fc.path]),
            np.array([p.upper_bytes for p in fc.path]))


def _braille_history(t: np.ndarray, u: np.ndarray, t0: float, t1: float, cols: int, rows: int,
                     step: float) -> dict[tuple[int, int], int]:
    """Braille dot bits per (row, column) cell for the history line.

    Each dot column gets every dot between the lowest and highest value in it,
    counting the values interpolated at its edges so that sparse (compacted)
    stretches still join up. Cell row r holds values in [r - 0.5, r + 0.5) * step,
    matching the row labels.
    """
    cells: dict[tuple[int, int], int] = {}
    if not len(t):
        return cells
    dcols, drows = cols * 2, rows * 4
    edges = t0 + np.arange(dcols + 1) * (t1 - t0) / dcols
    inside = (edges >= t[0]) & (edges <= t[-1])
    ev = np.interp(edges, t, u)
    lo = np.full(dcols, np.inf)
    hi = np.full(dcols, -np.inf)
    left, right = inside[:-1], inside[1:]
    lo[left], hi[left] = ev[:-1][left], ev[:-1][left]
    lo[right] = np.minimum(lo[right], ev[1:][right])
    hi[right] = np.maximum(hi[right], ev[1:][right])
    sc = np.clip(((t - t0) / (t1 - t0) * dcols).astype(int), 0, dcols - 1)
    np.minimum.at(lo, sc, u)
    np.maximum.at(hi, sc, u)
    for dc in np.nonzero(np.isfinite(lo))[0].tolist():
        d_lo, d_hi = (int(np.clip(math.floor(v / step * 4 + 2), 0, drows - 1))
                      for v in (lo[dc], hi[dc]))
        for d in range(d_lo, d_hi + 1):
            key = (d // 4, dc // 2)
            cells[key] = cells.get(key, 0) | _DOT[3 - d % 4][dc % 2]
    return cells


def terminal_chart(times: Samples, used: Samples, capacity: float,
                   fc: Forecast, width: int = 72, height: int = 16) -> str:
    """Plain-text chart: exactly `height` lines, none longer than `width`.

    Lines: a title; the plot rows; an x axis with date ticks and ``^`` at now;
    the date labels; a legend. The history is drawn in braille dots (2x4 dots
    per character, so small changes still show); the forecast path as ``+`` and
    its interval as ``:``, one character per column; 100% and 80% of capacity
    as ``=`` and ``-`` rows. The y scale puts capacity exactly on a row, so
    the labels on those rows are exact. No colour codes.
    """
    if width < MIN_WIDTH or height < MIN_HEIGHT:
        raise ValueError(f"chart needs at least {MIN_WIDTH}x{MIN_HEIGHT} characters, "
                         f"got {width}x{height}")
    if not capacity > 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    t, u = _clean(times, used)
    pt, pu, plo, phi = _path_arrays(fc)
    rows = height - 4
    # Capacity sits on row k, a multiple of 5 when there is room so that 80% also
    # lands exactly on a row; at least one row of headroom above it.
    k = (rows - 2) // 5 * 5 or rows - 2
    step = capacity / k  # bytes per row
    row80 = round(0.8 * k)
    label_every = max(1, k // 5)  # labels every 20% of capacity when k allows

    unit_name, unit = _axis_unit(capacity)
    labels = {r: f"{r * step / unit:.3g} {unit_name}" for r in range(0, rows)
              if r % label_every == 0 or r in (k, row80)}
    label_w = max(len(s) for s in labels.values())
    cols = width - label_w - 2

    # Time range: the history, then the forecast out to its longest horizon.
    t0 = float(t[0]) if len(t) else time.time()
    t1 = max(float(t[-1]) if len(t) else t0, float(pt[-1]) if len(pt) else t0)
    if t1 <= t0:
        t1 = t0 + 86400.0

    grid = [[" "] * cols for _ in range(rows)]  # grid[0] is the bottom row

    def hline(r: int, ch: str) -> None:
        for c in range(cols):
            if grid[r][c] in (" ", BAND):
                grid[r][c] = ch

    # Forecast: band first, then the path over it; capacity lines over the band.
    if len(pt):
        centres = t0 + (np.arange(cols) + 0.5) * (t1 - t0) / cols
        for c in np.nonzero((centres >= pt[0]) & (centres <= pt[-1]))[0].tolist():
            lo, hi, mid = (float(np.interp(centres[c], pt, a)) / step for a in (plo, phi, pu))
            for r in range(max(0, round(lo)), min(rows - 1, round(hi)) + 1):
                grid[r][c] = BAND
            if 0 <= round(mid) < rows:
                grid[round(mid)][c] = PATH
    hline(k, FULL)
    hline(row80, EIGHTY)

    for (r, c), bits in _braille_history(t, u, t0, t1, cols, rows, step).items():
        grid[r][c] = chr(BRAILLE + bits)

    out: list[str] = []
    if fc.ok:
        title = f"Used space and forecast: {fc.message}"
    else:
        title = f"Used space (no forecast: {fc.message})"
    out.append(title[:width])
    for r in range(rows - 1, -1, -1):
        out.append(f"{labels.get(r, ''):>{label_w}} |{''.join(grid[r])}".rstrip())

    # X axis: evenly spaced date ticks that fit without overlapping.
    fmt = _date_format(t1 - t0)
    text_w = len(time.strftime(fmt, time.gmtime(t0)))
    n_ticks = max(2, min(6, cols // (text_w + 3)))
    axis = ["-"] * cols
    dates = [" "] * cols
    for j in range(n_ticks):
        c = round(j * (cols - 1) / (n_ticks - 1))
        if c:  # column 0 is under the corner already
            axis[c] = "+"
        text = time.strftime(fmt, time.gmtime(t0 + (c + 0.5) * (t1 - t0) / cols))
        start = min(max(c - text_w // 2, 0), cols - text_w)
        dates[start:start + text_w] = text
    if fc.ok and fc.now is not None:
        axis[min(cols - 1, max(0, int((fc.now - t0) / (t1 - t0) * cols)))] = "^"
    out.append(" " * label_w + " +" + "".join(axis))
    out.append((" " * (label_w + 2) + "".join(dates)).rstrip())
    legend = ""
    for template in LEGEND:  # whole items only, as many as fit
        item = template.format(pct=f"{fc.interval:.0%}")
        if len(legend) + 2 + len(item) > width:
            break
        legend = f"{legend}  {item}" if legend else item
    out.append(legend)
    return "\n".join(out)


def write_png(path: str, times: Samples, used: Samples, capacity: float,
              fc: Forecast) -> None:
    """History, forecast line with its shaded interval, and 80%/100% lines, as a
    900x500 PNG. Uses the Agg canvas directly, so no pyplot global state."""
    from datetime import UTC, datetime

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter, date2num
    from matplotlib.figure import Figure

    t, u = _clean(times, used)
    pt, pu, plo, phi = _path_arrays(fc)
    unit_name, unit = _axis_unit(capacity)

    def dates(a: np.ndarray) -> np.ndarray:
        return np.asarray(date2num([datetime.fromtimestamp(float(s), tz=UTC) for s in a]))

    fig = Figure(figsize=(9, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(dates(t), u / unit, color="tab:blue", linewidth=1.2, label="used")
    if len(pt):
        ax.fill_between(dates(pt), plo / unit, phi / unit, color="tab:orange", alpha=0.25,
                        linewidth=0, label=f"{fc.interval:.0%} interval")
        ax.plot(dates(pt), pu / unit, color="tab:orange", linestyle="--", linewidth=1.5,
                label=f"forecast ({fc.method})")
    if len(pt):
        ax.axvline(dates(pt[:1])[0], color="grey", linewidth=0.8, alpha=0.6)  # now
    ax.axhline(capacity / unit, color="tab:red", linewidth=1, label="100% capacity")
    ax.axhline(0.8 * capacity / unit, color="tab:red", linestyle=":", linewidth=1, label="80%")
    top = max(capacity * 1.1, float(u.max()) * 1.05 if len(u) else 0.0) / unit
    ax.set_ylim(0, top)  # 0..capacity-and-a-bit; a forecast past full runs off the top
    locator = AutoDateLocator(tz=UTC)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator, tz=UTC))
    ax.set_xlabel("time (UTC)")
    ax.set_ylabel(f"physical used ({unit_name})")
    if fc.ok:
        ax.set_title(f"Pool usage forecast: {fc.message}", fontsize=10)
    else:
        ax.set_title(f"Pool usage (no forecast: {fc.message})", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
