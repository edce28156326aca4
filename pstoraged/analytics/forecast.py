"""Capacity forecasting: how full will the pool be, and when.

The analytics sampler keeps a history of (unix time, physical bytes used),
dense recently and compacted to hourly/daily averages further back. This
module turns that history into a forecast an operator can check by hand.

Three small, explainable methods compete; all three end in a straight-line
point forecast, and differ in which data they trust and how they build the
prediction interval:

``linear``
    Ordinary least squares through the whole history: the baseline. Interval
    from the textbook OLS prediction formula with a Student-t quantile.
``theil_sen``
    Theil-Sen line through the recent window: the median of the slopes between
    pairs of samples, intercept by the median residual. A few wild samples
    (a glitching probe, a transient burst) cannot move a median. Interval from
    the empirical residual quantile plus Sen's rank-based slope interval.
``holt``
    Holt's linear trend (double exponential smoothing) over the recent window,
    resampled to a regular grid first because the recursion assumes evenly
    spaced steps. Smoothing weights by least one-step error on a small grid;
    interval from the one-step residuals, widening with the horizon.

The winner is chosen by backtesting on the series itself (see `backtest`):
lowest mean absolute error wins, and near-ties go to the simpler method.

Inside, x is days relative to the last sample (small numbers, slopes in
bytes/day) and y is bytes. Nothing here blocks or touches the pool: plain
functions over arrays, called from the REST layer and the CLI.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from ..engine.units import human_bytes

FloatArray = npt.NDArray[np.float64]
Samples = Sequence[float] | npt.NDArray[Any]  # lists from JSON, arrays from the sampler

MIN_SAMPLES = 12
MIN_SPAN_SECONDS = 24 * 3600  # less than a day of history has no trend worth extrapolating
DAY = 86400.0
THRESHOLDS = (80, 90, 100)  # percent of capacity reported in days_until
INTERVAL = 0.9  # two-sided prediction interval
MAX_DAYS_UNTIL = 3650.0  # ten years: a straight line says nothing useful that far out

RECENT_FRACTION = 0.25  # theil_sen and holt look at the last quarter of the history ...
MIN_WINDOW_SAMPLES = 8  # ... but at no fewer samples than this

BACKTEST_FOLDS = 5
BACKTEST_FIRST_CUT = 0.5  # earliest cut point, as a fraction of the history span
BACKTEST_LEAD_FRACTION = 0.15  # forecast this far past each cut, as a fraction of the span
MIN_FOLD_SAMPLES = 6  # a fold must have this many samples before its cut
TIE_RELATIVE = 0.05  # backtest errors within 5% of the best ...
TIE_ABSOLUTE = 1e-4  # ... or within 0.01% of capacity count as a tie

TS_MAX_PAIRS = 50_000  # Theil-Sen: beyond this many pairs, use a random subset
TS_SEED = 0x5EED  # fixed, so the same history always gives the same forecast
HOLT_MAX_POINTS = 300  # regular grid points for Holt; bounds the Python-level loop
HOLT_ALPHAS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
HOLT_BETAS = (0.01, 0.03, 0.1, 0.2, 0.3, 0.5)
PATH_POINTS = 49  # samples of the forecast path handed to charts


def _z(level: float) -> float:
    """Two-sided standard normal quantile: 1.645 for a 90% interval."""
    return NormalDist().inv_cdf(0.5 + level / 2)


def student_t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t, without scipy.

    Cornish-Fisher expansion around the normal quantile (Abramowitz & Stegun
    26.7.5); error below 1e-3 for df >= 5 at the quantiles we use, and it
    tends to the normal quantile as df grows.
    """
    z = NormalDist().inv_cdf(p)
    if df <= 0:
        return math.inf
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


# --- Fitted models -----------------------------------------------------------


class Fit(Protocol):
    """A fitted method: a straight-line point forecast plus an interval."""

    @property
    def slope(self) -> float:
        """Bytes per day of the point forecast."""
        ...

    def predict(self, x: FloatArray) -> FloatArray: ...

    def halfwidth(self, x: FloatArray) -> FloatArray:
        """Half-width of the prediction interval at each x."""
        ...


@dataclass(frozen=True, slots=True)
class LinearFit:
    intercept: float  # at x = 0
    slope: float
    n: int
    x_mean: float
    sxx: float
    sigma: float  # residual standard error, n - 2 degrees of freedom
    t: float  # Student-t quantile for the interval

    def predict(self, x: FloatArray) -> FloatArray:
        return self.intercept + self.slope * x

    def halfwidth(self, x: FloatArray) -> FloatArray:
        # Standard OLS prediction interval for a new observation at x.
        return self.t * self.sigma * np.sqrt(1 + 1 / self.n + (x - self.x_mean) ** 2 / self.sxx)


@dataclass(frozen=True, slots=True)
class LineFromEnd:
    """A line anchored at the end of its training data, for theil_sen and holt."""

    x_end: float
    level: float  # forecast value at x_end
    slope: float
    noise: float  # half-width at lead 0
    slope_spread: float  # half-width added per day of lead (theil_sen)
    holt: tuple[float, float, float] | None = None  # (alpha, state-space beta, step days)

    def predict(self, x: FloatArray) -> FloatArray:
        return self.level + self.slope * (x - self.x_end)

    def halfwidth(self, x: FloatArray) -> FloatArray:
        lead = np.maximum(x - self.x_end, 0.0)
        if self.holt is None:
            # Noise and slope uncertainty are roughly independent: add in quadrature.
            return np.sqrt(self.noise**2 + (self.slope_spread * lead) ** 2)
        alpha, beta, step = self.holt
        # ETS(A,A,N) h-step variance (Hyndman & Athanasopoulos, "Forecasting:
        # Principles and Practice", forecast variance of the additive ETS models):
        # sigma^2 * [1 + (h-1)(alpha^2 + alpha*beta*h + beta^2*h*(2h-1)/6)].
        h = np.maximum(lead / step, 1.0)
        factor = 1 + (h - 1) * (alpha**2 + alpha * beta * h + beta**2 * h * (2 * h - 1) / 6)
        return self.noise * np.sqrt(factor)


# --- Methods ------------------------------------------------------------------


def recent_window(x: FloatArray, y: FloatArray) -> tuple[FloatArray, FloatArray]:
    """The last RECENT_FRACTION of the time span, by time rather than by count
    (recent samples are denser), and at least MIN_WINDOW_SAMPLES samples."""
    start = x[-1] - RECENT_FRACTION * (x[-1] - x[0])
    i = int(np.searchsorted(x, start, side="left"))
    i = max(0, min(i, len(x) - MIN_WINDOW_SAMPLES))
    return x[i:], y[i:]


def fit_linear(x: FloatArray, y: FloatArray, interval: float = INTERVAL) -> LinearFit:
    """Ordinary least squares through the whole history.

    Interval: s * t(n-2) * sqrt(1 + 1/n + (x0 - mean x)^2 / Sxx), which assumes
    independent residuals; real usage is autocorrelated, so the interval is
    optimistic. The backtest reports how often it actually covered.
    """
    n = len(x)
    x_mean, y_mean = float(x.mean()), float(y.mean())
    dx = x - x_mean
    sxx = float(dx @ dx)
    slope = float(dx @ (y - y_mean)) / sxx
    intercept = y_mean - slope * x_mean
    resid = y - (intercept + slope * x)
    sigma = math.sqrt(max(float(resid @ resid), 0.0) / max(n - 2, 1))
    return LinearFit(intercept, slope, n, x_mean, sxx, sigma,
                     student_t_quantile(0.5 + interval / 2, n - 2))


def fit_theil_sen(x: FloatArray, y: FloatArray, interval: float = INTERVAL) -> LineFromEnd:
    """Theil-Sen line through the recent window.

    Slope: median of (y_j - y_i) / (x_j - x_i) over pairs i < j, from a fixed-seed
    random subset of TS_MAX_PAIRS pairs when there are more (the median of a
    large random subset is within noise of the full median). Intercept: median
    of y - slope * x. Interval: the `interval` quantile of the absolute
    residuals (the noise around the line, whatever its shape), combined with
    Sen's (1968) rank-based confidence interval for the slope times the lead.
    """
    xw, yw = recent_window(x, y)
    m = len(xw)
    n_pairs = m * (m - 1) // 2
    if n_pairs <= TS_MAX_PAIRS:
        i, j = np.triu_indices(m, k=1)
    else:
        rng = np.random.default_rng(TS_SEED)
        a, b = rng.integers(0, m, TS_MAX_PAIRS), rng.integers(0, m, TS_MAX_PAIRS)
        i, j = np.minimum(a, b), np.maximum(a, b)
    dx = xw[j] - xw[i]
    keep = dx > 0  # drops i == j from sampling; times are unique after cleaning
    slopes = (yw[j][keep] - yw[i][keep]) / dx[keep]
    slope = float(np.median(slopes))
    x_end = float(xw[-1])
    level = float(np.median(yw - slope * (xw - x_end)))
    resid = yw - (level + slope * (xw - x_end))
    noise = float(np.quantile(np.abs(resid), interval))
    # Sen's interval: the slopes ranked (N -+ C) / 2, with C = z * sqrt(Var S) from
    # Kendall's S statistic; C is scaled to the number of pairs actually used.
    n_used = len(slopes)
    c = _z(interval) * math.sqrt(m * (m - 1) * (2 * m + 5) / 18) * n_used / n_pairs
    lo = int(np.clip(math.floor((n_used - c) / 2), 0, n_used - 1))
    hi = int(np.clip(math.ceil((n_used + c) / 2), 0, n_used - 1))
    part = np.partition(slopes, (lo, hi))
    spread = max(slope - float(part[lo]), float(part[hi]) - slope, 0.0)
    return LineFromEnd(x_end, level, slope, noise, spread)


def fit_holt(x: FloatArray, y: FloatArray, interval: float = INTERVAL) -> LineFromEnd:
    """Holt's linear trend (double exponential smoothing) over the recent window.

    The window is resampled onto a regular grid (bin averages at about the
    median sample spacing, at most HOLT_MAX_POINTS bins), since the recursion
    counts steps, not seconds. In error-correction form, with e the one-step
    error: level += trend + alpha * e; trend += alpha * beta * e. The level and
    trend start from a least-squares line through the first half of the
    window. (alpha, beta) is the pair from HOLT_ALPHAS x HOLT_BETAS with the
    smallest one-step squared error; all pairs run at once as numpy vectors.
    Interval: the ETS(A,A,N) h-step variance built from the one-step residual
    variance, so it widens faster than linearly with the horizon.
    """
    xw, yw = recent_window(x, y)
    span = float(xw[-1] - xw[0])
    median_dt = float(np.median(np.diff(xw)))
    n = int(np.clip(round(span / median_dt) + 1, MIN_WINDOW_SAMPLES, HOLT_MAX_POINTS))
    step = span / (n - 1)
    # Each grid point stands for the samples nearest to it: average their times
    # and values, then interpolate those means back onto the grid (grid points
    # with no sample fall between their neighbours). Regular samples map one to
    # one onto the grid; averaging instead of interpolating between samples
    # keeps the noise of neighbouring steps independent, which the one-step
    # error used to choose alpha relies on.
    grid = xw[0] + np.arange(n) * step
    nearest = np.rint((xw - xw[0]) / step).astype(np.int64)
    counts = np.bincount(nearest, minlength=n)
    full = counts > 0
    xm = np.bincount(nearest, weights=xw, minlength=n)[full] / counts[full]
    ym = np.bincount(nearest, weights=yw, minlength=n)[full] / counts[full]
    g = np.interp(grid, xm, ym)  # bin means sit on the line when the data does

    half = max(n // 2, 2)
    k = np.arange(half, dtype=np.float64)
    b0, a0 = np.polyfit(k, g[:half], 1)  # per-step slope, value at grid[0]
    alpha, beta = (v.ravel() for v in np.meshgrid(HOLT_ALPHAS, HOLT_BETAS, indexing="ij"))
    level = np.full(alpha.shape, a0)
    trend = np.full(alpha.shape, b0)
    sse = np.zeros(alpha.shape)
    for t in range(1, n):
        err = g[t] - (level + trend)
        sse += err * err
        level = level + trend + alpha * err
        trend = trend + alpha * beta * err
    best = int(np.argmin(sse))  # first minimum: smallest alpha, then beta, on ties
    a, b = float(alpha[best]), float(beta[best])
    sigma = math.sqrt(float(sse[best]) / max(n - 1, 1))
    return LineFromEnd(float(grid[-1]), float(level[best]), float(trend[best]) / step,
                       _z(interval) * sigma, 0.0, holt=(a, a * b, step))


@dataclass(frozen=True, slots=True)
class Method:
    name: str
    description: str
    interval_note: str  # how its prediction interval is built
    fit: Callable[[FloatArray, FloatArray, float], Fit]


# Simplest first: near-ties in the backtest go to the earlier entry.
METHODS: tuple[Method, ...] = (
    Method("linear", "least-squares line through the whole history",
           "the OLS prediction interval with a Student-t quantile", fit_linear),
    Method("theil_sen", "Theil-Sen line (median of pairwise slopes) through the recent window",
           "the residual quantile combined with Sen's rank interval for the slope",
           fit_theil_sen),
    Method("holt", "Holt's double exponential smoothing of the recent window on a regular grid",
           "built from the one-step residuals and widens with the horizon", fit_holt),
)


# --- Backtest -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fold:
    n_train: int  # samples [0, n_train) are known at the cut
    stop: int  # samples [n_train, stop) are the ones to forecast
    weights: FloatArray  # time each test sample stands for


@dataclass(frozen=True, slots=True)
class BacktestResult:
    mae: float | None  # bytes; None when no fold fitted
    coverage: float | None  # fraction of test time inside the interval
    folds: int


def backtest_folds(x: FloatArray, horizon_days: float) -> tuple[list[Fold], float]:
    """Rolling-origin folds: cut points evenly spaced from half-way through the
    history to one lead before its end; each fold forecasts `lead` days past its
    cut, where lead is BACKTEST_LEAD_FRACTION of the span, capped at the longest
    horizon asked for (errors beyond what the operator asked for are noise).
    """
    span = float(x[-1] - x[0])
    lead = min(BACKTEST_LEAD_FRACTION * span, horizon_days)
    folds: list[Fold] = []
    seen: set[int] = set()
    for cut in np.linspace(x[0] + BACKTEST_FIRST_CUT * span, x[-1] - lead, BACKTEST_FOLDS):
        n_train = int(np.searchsorted(x, cut, side="right"))
        stop = int(np.searchsorted(x, cut + lead, side="right"))
        if n_train < MIN_FOLD_SAMPLES or stop <= n_train or n_train in seen:
            continue  # sparse compacted history can map several cuts to one sample
        seen.add(n_train)
        # Weight each test sample by the time it covers, so a dense recent burst
        # of samples does not outvote the sparse part of the fold.
        xt = x[n_train:stop]
        edges = np.concatenate(([cut], (xt[1:] + xt[:-1]) / 2, [cut + lead]))
        w = np.diff(edges)
        folds.append(Fold(n_train, stop, w if w.sum() > 0 else np.ones_like(xt)))
    return folds, lead


def backtest(method: Method, x: FloatArray, y: FloatArray, folds: Sequence[Fold],
             interval: float = INTERVAL) -> BacktestResult:
    """Fit on each fold's past, forecast its future, and compare with what was
    recorded: time-weighted mean absolute error per fold, averaged over folds
    (each fold counts equally)."""
    maes: list[float] = []
    covered: list[float] = []
    for f in folds:
        fit = method.fit(x[: f.n_train], y[: f.n_train], interval)
        xt, yt = x[f.n_train : f.stop], y[f.n_train : f.stop]
        err = np.abs(yt - fit.predict(xt))
        wsum = float(f.weights.sum())
        maes.append(float(f.weights @ err) / wsum)
        # The slack keeps exact fits (zero-width interval) from scoring rounding as misses.
        slack = 1e-9 * float(np.max(np.abs(yt)))
        covered.append(float(f.weights @ (err <= fit.halfwidth(xt) + slack)) / wsum)
    if not maes:
        return BacktestResult(None, None, 0)
    return BacktestResult(float(np.mean(maes)), float(np.mean(covered)), len(maes))


# --- Result -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MethodScore:
    name: str
    description: str
    mae_bytes: float | None  # backtest mean absolute error
    mae_fraction: float | None  # the same, as a fraction of capacity
    coverage: float | None  # how often the backtest actuals fell inside the interval
    folds: int
    chosen: bool


@dataclass(frozen=True, slots=True)
class HorizonForecast:
    days: float
    used_bytes: float  # point forecast; may exceed capacity (the pool would be full)
    lower_bytes: float  # floored at 0, never capped
    upper_bytes: float  # not capped at capacity
    used_fraction: float  # used_bytes / capacity, not capped


@dataclass(frozen=True, slots=True)
class DaysUntil:
    percent: int
    days: float | None  # 0 if the forecast line is there now; None if flat, falling or too far


@dataclass(frozen=True, slots=True)
class Forecast:
    status: str  # "ok" or "insufficient_data"
    message: str  # one line for the CLI
    capacity_bytes: float
    current_used_bytes: float | None  # last sample
    now: float | None  # forecast origin, unix seconds
    have_samples: int
    have_span_days: float
    needed_samples: int
    needed_span_days: float
    interval: float
    explanation: str
    method: str | None = None
    methods: tuple[MethodScore, ...] = ()
    reason: str = ""
    trend_bytes_per_day: float | None = None
    horizons: tuple[HorizonForecast, ...] = ()
    days_until: tuple[DaysUntil, ...] = ()
    path: tuple[HorizonForecast, ...] = ()  # dense version of horizons, for charts

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: plain floats, ints, strings, lists, dicts and None."""
        d: dict[str, Any] = {
            "status": self.status, "message": self.message,
            "capacity_bytes": self.capacity_bytes, "current_used_bytes": self.current_used_bytes,
            "now": self.now, "have_samples": self.have_samples,
            "have_span_days": self.have_span_days, "needed_samples": self.needed_samples,
            "needed_span_days": self.needed_span_days, "interval": self.interval,
            "explanation": self.explanation,
        }
        if not self.ok:
            return d
        row = ("days", "used_bytes", "lower_bytes", "upper_bytes", "used_fraction")
        d.update({
            "method": self.method,
            "methods": [{"name": m.name, "description": m.description,
                         "mae_bytes": m.mae_bytes, "mae_fraction": m.mae_fraction,
                         "coverage": m.coverage, "folds": m.folds, "chosen": m.chosen}
                        for m in self.methods],
            "reason": self.reason,
            "trend_bytes_per_day": self.trend_bytes_per_day,
            "horizons": [{k: getattr(h, k) for k in row} for h in self.horizons],
            "days_until": {str(e.percent): e.days for e in self.days_until},
            "path": [{k: getattr(h, k) for k in row} for h in self.path],
        })
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Forecast:
        """The inverse of to_dict (the CLI rebuilds the API's answer to draw it)."""
        base = {k: d[k] for k in (
            "status", "message", "capacity_bytes", "current_used_bytes", "now", "have_samples",
            "have_span_days", "needed_samples", "needed_span_days", "interval", "explanation")}
        if d["status"] != "ok":
            return cls(**base)
        return cls(
            **base, method=d["method"], reason=d.get("reason", ""),
            methods=tuple(MethodScore(**m) for m in d.get("methods", [])),
            trend_bytes_per_day=d.get("trend_bytes_per_day"),
            horizons=tuple(HorizonForecast(**h) for h in d.get("horizons", [])),
            days_until=tuple(DaysUntil(int(p), v) for p, v in d.get("days_until", {}).items()),
            path=tuple(HorizonForecast(**h) for h in d.get("path", [])),
        )


# --- Entry point --------------------------------------------------------------


def _clean(times: Samples, used: Samples) -> tuple[FloatArray, FloatArray]:
    """Finite samples in time order; samples sharing a timestamp are averaged
    (the recursion and pairwise slopes need strictly increasing times)."""
    t = np.asarray(times, dtype=np.float64)
    u = np.asarray(used, dtype=np.float64)
    if t.shape != u.shape or t.ndim != 1:
        raise ValueError(f"times and used must be 1-D and equally long, got {t.shape} and {u.shape}")
    ok = np.isfinite(t) & np.isfinite(u)
    t, u = t[ok], u[ok]
    if len(t) and np.any(np.diff(t) <= 0):
        ts, inv, counts = np.unique(t, return_inverse=True, return_counts=True)
        u = np.bincount(inv, weights=u) / counts
        t = ts
    return t, u


def _pct(f: float) -> str:
    return f"{f:.2%}" if f < 0.1 else f"{f:.1%}"


def forecast(times: Samples, used: Samples, capacity: float,
             horizons_days: Sequence[float] = (7, 30, 90), now: float | None = None,
             interval: float = INTERVAL) -> Forecast:
    """Forecast pool usage at each horizon (days after `now`, which defaults to
    the last sample) and the days until 80/90/100% of `capacity`.

    Raises ValueError on malformed input (unequal lengths, capacity <= 0, no
    positive horizon); too little history is a normal result, not an error.
    """
    if not capacity > 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    horizons = [float(h) for h in horizons_days]
    if not horizons or min(horizons) <= 0:
        raise ValueError(f"horizons must be positive days, got {list(horizons_days)}")
    if not 0 < interval < 1:
        raise ValueError(f"interval must be between 0 and 1, got {interval}")
    t, u = _clean(times, used)
    n = len(t)
    span_days = float(t[-1] - t[0]) / DAY if n else 0.0
    if now is None:
        now = float(t[-1]) if n else None
    current = float(u[-1]) if n else None
    need_days = MIN_SPAN_SECONDS / DAY
    common: dict[str, Any] = dict(
        capacity_bytes=float(capacity), current_used_bytes=current, now=now,
        have_samples=n, have_span_days=span_days, needed_samples=MIN_SAMPLES,
        needed_span_days=need_days, interval=interval)

    if n < MIN_SAMPLES or span_days * DAY < MIN_SPAN_SECONDS:
        msg = (f"need at least {MIN_SAMPLES} samples over {need_days:.1f} days; "
               f"have {n} over {span_days:.1f} days")
        return Forecast(status="insufficient_data", message=msg, **common,
                        explanation="Not enough usage history to estimate a trend yet: "
                        + msg + ". The daemon samples usage continuously; try again later.")
    assert now is not None and current is not None

    x = (t - t[-1]) / DAY
    x_now = (now - float(t[-1])) / DAY
    folds, lead = backtest_folds(x, max(horizons))
    results = [backtest(m, x, u, folds, interval) for m in METHODS]

    scored = [(m, r) for m, r in zip(METHODS, results, strict=True) if r.mae is not None]
    if scored:
        best_m, best_r = min(scored, key=lambda mr: mr[1].mae or 0.0)
        assert best_r.mae is not None
        tol = best_r.mae * (1 + TIE_RELATIVE) + TIE_ABSOLUTE * capacity
        win_m, win_r = next((m, r) for m, r in scored if r.mae is not None and r.mae <= tol)
        assert win_r.mae is not None
        others = ", ".join(f"{m.name} {human_bytes(r.mae or 0.0)}" for m, r in scored
                           if m is not win_m)
        if win_m is best_m:
            reason = (f"{win_m.name} had the lowest backtest error "
                      f"({human_bytes(win_r.mae)}, {_pct(win_r.mae / capacity)} of capacity; "
                      f"{others}).")
        else:
            reason = (f"{win_m.name} ({human_bytes(win_r.mae)}) was within "
                      f"{TIE_RELATIVE:.0%} of the best backtest error ({best_m.name}, "
                      f"{human_bytes(best_r.mae)}) and is the simpler method.")
    else:
        win_m = METHODS[0]
        reason = ("The history is too short or too sparse to backtest, so the baseline "
                  "(linear) is used.")

    fit = win_m.fit(x, u, interval)

    def point(days: float) -> HorizonForecast:
        xa = np.array([x_now + days])
        p, hw = float(fit.predict(xa)[0]), float(fit.halfwidth(xa)[0])
        return HorizonForecast(days, p, max(p - hw, 0.0), p + hw, p / capacity)

    level_now = float(fit.predict(np.array([x_now]))[0])
    slope = float(fit.slope)
    etas = []
    for pct in THRESHOLDS:
        limit = capacity * pct / 100
        days: float | None
        if level_now >= limit:  # the line, not the last sample: one spike is not "full"
            days = 0.0
        elif slope <= 0:
            days = None
        else:
            days = max((limit - level_now) / slope, 0.0)
            if days > MAX_DAYS_UNTIL:
                days = None
        etas.append(DaysUntil(pct, days))

    methods = tuple(
        MethodScore(m.name, f"{m.description}; interval: {m.interval_note}", r.mae,
                    None if r.mae is None else r.mae / capacity, r.coverage, r.folds, m is win_m)
        for m, r in zip(METHODS, results, strict=True))
    reached = [e.percent for e in etas if e.days == 0]
    ahead = next((e for e in etas if e.days is not None and e.days > 0), None)
    parts = [f"{max(reached)}% full now"] if reached else []
    if ahead is not None:
        parts.append(f"{ahead.percent}% full in about {ahead.days:.0f} days")
    elif len(reached) < len(etas):
        parts.append("no further threshold within 10 years at the current trend")
    headline = "; ".join(parts)
    message = f"{headline} ({win_m.name}, {human_bytes(slope)}/day)"
    tested = (f"Each was backtested {len(folds)} times: fitted on the history up to a cut "
              f"point, asked to forecast the next {lead:.1f} days, and scored by its mean "
              f"absolute error against what was recorded. " if folds else "")
    explanation = (
        f"Used space was sampled {n} times over {span_days:.1f} days. Three methods were "
        f"fitted: a least-squares line through the whole history (linear), a Theil-Sen line "
        f"through the most recent {RECENT_FRACTION:.0%} of it (theil_sen), and Holt's double "
        f"exponential smoothing of that same window (holt). {tested}{reason} The forecast extends its line of {human_bytes(slope)}/day from now; "
        f"the {interval:.0%} interval is {win_m.interval_note}. Lower bounds "
        f"are floored at 0 and nothing is capped at capacity, so values above capacity mean "
        f"the pool would be full before then. Days until a threshold are empty when usage is "
        f"flat or falling or the threshold is more than 10 years away, and 0 when the "
        f"forecast line is already past it.")
    return Forecast(
        status="ok", message=message, **common, explanation=explanation,
        method=win_m.name, methods=methods, reason=reason, trend_bytes_per_day=slope,
        horizons=tuple(point(h) for h in horizons), days_until=tuple(etas),
        path=tuple(point(float(d)) for d in np.linspace(0, max(horizons), PATH_POINTS)))
