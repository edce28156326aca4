"""Capacity forecasting on synthetic histories whose answers are known.

Every series is built from a known line (or two), so the tests check numbers:
slopes, days until a threshold, which method wins and by how much.
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest

from pstoraged.analytics import forecast as fmod
from pstoraged.analytics.forecast import (
    METHODS,
    MIN_SAMPLES,
    backtest_folds,
    fit_holt,
    fit_linear,
    fit_theil_sen,
    forecast,
    student_t_quantile,
)

GiB = 1 << 30
DAY = 86400.0
T0 = 1_700_000_000.0  # 2023-11-14, any fixed origin
CAP = 4096 * GiB


def hourly(days: float) -> np.ndarray:
    return T0 + np.arange(0, days * DAY, 3600.0)


def line(t: np.ndarray, start: float, per_day: float) -> np.ndarray:
    return start + per_day * (t - T0) / DAY


def by_name(fc: fmod.Forecast) -> dict[str, fmod.MethodScore]:
    return {m.name: m for m in fc.methods}


def days_until(fc: fmod.Forecast) -> dict[str, float | None]:
    return fc.to_dict()["days_until"]


def x_days(t: np.ndarray) -> np.ndarray:
    return (t - t[-1]) / DAY


@pytest.mark.parametrize(("p", "df", "expected"), [
    (0.95, 10, 1.812461), (0.95, 30, 1.697261), (0.975, 10, 2.228139),
    (0.975, 60, 2.000298), (0.95, 5, 2.015048), (0.95, 10**6, 1.644854),
])
def test_student_t_quantile_matches_tables(p, df, expected):
    assert student_t_quantile(p, df) == pytest.approx(expected, abs=2e-4)


def test_exact_linear_growth():
    t = hourly(60)
    u = line(t, 500 * GiB, 10 * GiB)
    fc = forecast(t, u, CAP)
    assert fc.status == "ok"
    scores = by_name(fc)
    for m in METHODS:  # every method reproduces a straight line
        assert scores[m.name].mae_fraction is not None and scores[m.name].mae_fraction < 1e-9
        assert m.fit(x_days(t), u, 0.9).slope == pytest.approx(10 * GiB, rel=1e-9)
    # All tie, so the simplest wins, and says so.
    assert fc.method == "linear" and scores["linear"].chosen
    assert "simpler" in fc.reason
    assert fc.trend_bytes_per_day == pytest.approx(10 * GiB, rel=1e-9)
    last = u[-1]
    for pct in (80, 90, 100):
        analytic = (CAP * pct / 100 - last) / (10 * GiB)
        assert days_until(fc)[str(pct)] == pytest.approx(analytic, rel=0.01)
    for h in fc.horizons:
        assert h.used_bytes == pytest.approx(last + h.days * 10 * GiB, rel=1e-9)
        assert h.used_fraction == pytest.approx(h.used_bytes / CAP)


def test_linear_with_noise():
    rng = np.random.default_rng(7)
    t = hourly(90)
    truth = line(t, 300 * GiB, 8 * GiB)
    fc = forecast(t, truth + rng.normal(0, 6 * GiB, len(t)), CAP)
    assert fc.trend_bytes_per_day == pytest.approx(8 * GiB, rel=0.03)
    for h in fc.horizons:
        expected = truth[-1] + h.days * 8 * GiB
        assert h.used_bytes == pytest.approx(expected, rel=0.01)
        assert h.lower_bytes <= expected <= h.upper_bytes
        assert h.upper_bytes - h.lower_bytes < 0.05 * expected  # an interval, not a shrug
    analytic = (0.8 * CAP - truth[-1]) / (8 * GiB)
    assert days_until(fc)["80"] == pytest.approx(analytic, rel=0.03)


def test_outliers_robust_method_wins():
    rng = np.random.default_rng(11)
    t = hourly(60)
    truth = line(t, 500 * GiB, 10 * GiB)
    u = truth + rng.normal(0, 0.5 * GiB, len(t))
    # A nightly job (say, a backup snapshot) holds 15-25% of capacity for an hour:
    # one sample in 24 is wildly high.
    nightly = ((t - T0) // 3600) % 24 == 2
    u[nightly] += rng.uniform(0.15, 0.25, nightly.sum()) * CAP
    fc = forecast(t, u, CAP)
    scores = by_name(fc)
    assert fc.method == "theil_sen"
    assert fc.trend_bytes_per_day == pytest.approx(10 * GiB, rel=0.01)
    h30 = next(h for h in fc.horizons if h.days == 30)
    expected = truth[-1] + 300 * GiB
    ts_err = abs(h30.used_bytes - expected)
    assert ts_err < 0.001 * CAP
    # Plain least squares is dragged up by the spikes (by about 4% x 20% of
    # capacity): visibly worse, in the backtest and in the forecast itself.
    assert scores["linear"].mae_bytes > 1.5 * scores["theil_sen"].mae_bytes
    ols = fit_linear(x_days(t), u)
    ols_err = abs(float(ols.predict(np.array([30.0]))[0]) - expected)
    assert ols_err > 0.005 * CAP and ols_err > 20 * ts_err


def test_step_change_follows_recent_slope():
    rng = np.random.default_rng(3)
    t = hourly(60)
    x = (t - T0) / DAY
    truth = np.where(x < 30, 500 * GiB + 10 * GiB * x, 800 * GiB + 40 * GiB * (x - 30))
    u = truth + rng.normal(0, 1 * GiB, len(t))
    fc = forecast(t, u, CAP)
    assert fc.method in ("theil_sen", "holt")  # a recent-window method
    assert fc.trend_bytes_per_day == pytest.approx(40 * GiB, rel=0.05)
    # The whole-history line averages the two regimes and loses the backtest badly.
    assert fit_linear(x_days(t), u).slope < 35 * GiB
    scores = by_name(fc)
    assert scores["linear"].mae_bytes > 3 * scores[fc.method].mae_bytes
    last = truth[-1]
    h30 = next(h for h in fc.horizons if h.days == 30)
    assert h30.used_bytes == pytest.approx(last + 30 * 40 * GiB, rel=0.03)
    assert days_until(fc)["80"] == pytest.approx((0.8 * CAP - last) / (40 * GiB), rel=0.05)


@pytest.mark.parametrize("noise", [0.0, 2 * GiB])
def test_flat_usage_never_fills(noise):
    rng = np.random.default_rng(5)
    t = hourly(30)
    fc = forecast(t, 1000 * GiB + rng.normal(0, 1, len(t)) * noise, CAP)
    assert fc.status == "ok"
    assert abs(fc.trend_bytes_per_day) < 0.2 * GiB
    assert days_until(fc) == {"80": None, "90": None, "100": None}
    for h in fc.horizons:
        assert h.used_bytes == pytest.approx(1000 * GiB, rel=0.01)


def test_shrinking_usage_never_fills():
    t = hourly(30)
    fc = forecast(t, line(t, 3000 * GiB, -5 * GiB), CAP)
    assert fc.trend_bytes_per_day == pytest.approx(-5 * GiB, rel=1e-6)
    assert days_until(fc) == {"80": None, "90": None, "100": None}
    assert fc.horizons[0].used_bytes < 3000 * GiB


def test_already_past_a_threshold_is_zero_days():
    t = hourly(30)
    u = line(t, 0.82 * CAP, 2 * GiB)  # starts above 80%, crosses 85%, heads for 90%
    fc = forecast(t, u, CAP)
    du = days_until(fc)
    assert du["80"] == 0
    assert du["90"] == pytest.approx((0.9 * CAP - u[-1]) / (2 * GiB), rel=0.01)
    assert "80% full now" in fc.message


def test_one_spike_at_the_end_is_not_full():
    t = hourly(30)
    u = line(t, 0.6 * CAP, 2 * GiB)
    u[-1] = 0.95 * CAP  # a single wild reading as the latest sample
    fc = forecast(t, u, CAP)
    # Days until count from the forecast line, not from the last reading. (The
    # spike still tilts a least-squares line: it is the last point, with the
    # most leverage, and no backtest fold can see it. Hence only a loose bound.)
    expected = (0.8 * CAP - line(t, 0.6 * CAP, 2 * GiB)[-1]) / (2 * GiB)
    assert 0.7 * expected < days_until(fc)["80"] < 1.3 * expected
    assert "full now" not in fc.message


def test_trend_beyond_ten_years_is_none():
    t = hourly(30)
    fc = forecast(t, line(t, 100 * GiB, 0.5 * GiB), CAP)  # ~6000 days to 80%
    assert fc.trend_bytes_per_day == pytest.approx(0.5 * GiB, rel=1e-6)
    assert days_until(fc)["80"] is None


@pytest.mark.parametrize(("n", "span_days", "have_span"), [
    (5, 0.2, "0.2"), (100, 2 / 24, "0.1"), (11, 30, "30.0"), (0, 0, "0.0"),
])
def test_insufficient_data(n, span_days, have_span):
    t = T0 + np.linspace(0, span_days * DAY, n)
    fc = forecast(t, np.full(n, 10 * GiB), CAP)
    assert fc.status == "insufficient_data"
    assert fc.message == (f"need at least {MIN_SAMPLES} samples over 1.0 days; "
                          f"have {n} over {have_span} days")
    d = fc.to_dict()
    assert d["needed_samples"] == MIN_SAMPLES and d["needed_span_days"] == 1.0
    assert d["have_samples"] == n
    assert d["have_span_days"] == pytest.approx(span_days)
    assert "horizons" not in d and "method" not in d
    json.dumps(d, allow_nan=False)


def test_irregular_compacted_history():
    """Daily averages for a year, hourly for four weeks, five-minutely for two days:
    the shape the sampler's compaction leaves behind."""
    rng = np.random.default_rng(13)
    end = T0 + 365 * DAY
    t = np.concatenate([
        np.arange(T0, end - 30 * DAY, DAY) + DAY / 2,  # averages stamped mid-bucket
        np.arange(end - 30 * DAY, end - 2 * DAY, 3600.0) + 1800,
        np.arange(end - 2 * DAY, end, 300.0),
    ])
    assert np.all(np.diff(t) > 0)
    truth = line(t, 200 * GiB, 6 * GiB)
    u = truth + rng.normal(0, 3 * GiB, len(t))
    fc = forecast(t, u, 4 * CAP)
    assert fc.trend_bytes_per_day == pytest.approx(6 * GiB, rel=0.02)
    analytic = (0.8 * 4 * CAP - truth[-1]) / (6 * GiB)
    assert days_until(fc)["80"] == pytest.approx(analytic, rel=0.02)
    # The backtest still gets its folds from the sparse part of the history.
    assert all(m.folds == fmod.BACKTEST_FOLDS for m in fc.methods)


def test_now_after_last_sample_shifts_horizons():
    t = hourly(20)
    u = line(t, 100 * GiB, 10 * GiB)
    fc = forecast(t, u, CAP, horizons_days=(7,), now=float(t[-1]) + 5 * DAY)
    assert fc.horizons[0].used_bytes == pytest.approx(u[-1] + 12 * 10 * GiB, rel=1e-9)
    # Days until counts from now too.
    assert days_until(fc)["80"] == pytest.approx((0.8 * CAP - u[-1]) / (10 * GiB) - 5, rel=1e-6)


def test_unsorted_duplicate_and_nonfinite_samples_are_cleaned():
    rng = np.random.default_rng(17)
    t = hourly(20)
    u = line(t, 100 * GiB, 10 * GiB) + rng.normal(0, GiB, len(t))
    clean = forecast(t, u, CAP).to_dict()
    order = rng.permutation(len(t))
    t2 = np.concatenate([t[order], [np.nan, t[3], T0 + 0.5]])
    u2 = np.concatenate([u[order], [5.0, u[3], np.inf]])  # a NaN, a duplicate, an inf
    messy = forecast(t2, u2, CAP).to_dict()
    assert messy == clean


def test_theil_sen_subsampling_is_deterministic_and_close():
    rng = np.random.default_rng(19)
    t = T0 + np.sort(rng.uniform(0, 40 * DAY, 5000))
    u = line(t, 100 * GiB, 10 * GiB) + rng.normal(0, 2 * GiB, len(t))
    x = x_days(t)
    a, b = fit_theil_sen(x, u), fit_theil_sen(x, u)
    assert a == b
    assert a.slope == pytest.approx(10 * GiB, rel=0.02)
    assert forecast(t, u, CAP).to_dict() == forecast(t, u, CAP).to_dict()


def test_holt_recovers_slope_on_irregular_window():
    rng = np.random.default_rng(23)
    t = T0 + np.sort(rng.uniform(0, 30 * DAY, 800))
    fit = fit_holt(x_days(t), line(t, 0, 20 * GiB))
    assert fit.slope == pytest.approx(20 * GiB, rel=1e-6)
    assert fit.holt is not None
    hw = fit.halfwidth(np.array([1.0, 10.0, 90.0]))
    assert hw[0] <= hw[1] <= hw[2]  # the interval widens with the horizon


def test_holt_chooses_smoothing_by_one_step_error():
    rng = np.random.default_rng(37)
    t = hourly(30)
    trend = line(t, 0, 20 * GiB)
    # White noise around a line: the best one-step forecast averages a lot.
    noisy = fit_holt(x_days(t), trend + rng.normal(0, 5 * GiB, len(t)))
    assert noisy.holt is not None and noisy.holt[0] <= 0.1
    assert noisy.slope == pytest.approx(20 * GiB, rel=0.02)
    # A random walk: yesterday's level is the best guess, so alpha goes high.
    walk = fit_holt(x_days(t), trend + np.cumsum(rng.normal(0, 5 * GiB, len(t))))
    assert walk.holt is not None and walk.holt[0] >= 0.7


def test_backtest_folds_design():
    x = np.arange(0, 100.5, 0.5) - 100  # 100 days, twice a day
    folds, lead = backtest_folds(x, 90)
    assert lead == pytest.approx(15)  # 15% of the span
    assert len(folds) == fmod.BACKTEST_FOLDS
    cuts = [x[f.n_train - 1] for f in folds]
    assert cuts[0] == pytest.approx(x[0] + 50, abs=0.5) and cuts[-1] <= x[-1] - lead
    for f in folds:
        assert f.weights.sum() == pytest.approx(lead, abs=0.5)  # weights cover the lead in days
    _, capped = backtest_folds(x, 7)
    assert capped == 7  # never score further out than the operator asked


def test_result_serializes():
    rng = np.random.default_rng(29)
    t = hourly(30)
    fc = forecast(t, line(t, 100 * GiB, 10 * GiB) + rng.normal(0, GiB, len(t)), CAP)
    d = fc.to_dict()
    text = json.dumps(d, allow_nan=False)
    assert json.loads(text) == d
    for key in ("status", "method", "methods", "reason", "trend_bytes_per_day", "horizons",
                "days_until", "capacity_bytes", "current_used_bytes", "interval",
                "explanation", "message"):
        assert key in d
    assert [m["name"] for m in d["methods"]] == ["linear", "theil_sen", "holt"]
    assert sum(m["chosen"] for m in d["methods"]) == 1
    assert [h["days"] for h in d["horizons"]] == [7, 30, 90]
    for m in d["methods"]:
        assert m["mae_fraction"] == pytest.approx(m["mae_bytes"] / CAP)
        assert 0 <= m["coverage"] <= 1
    assert d["interval"] == 0.9 and d["capacity_bytes"] == CAP
    json.dumps(dataclasses.asdict(fc), allow_nan=False)  # the generic route works too


def test_bad_input_is_rejected():
    t = hourly(2)
    with pytest.raises(ValueError):
        forecast(t, t[:-1], CAP)
    with pytest.raises(ValueError):
        forecast(t, t, 0)
    with pytest.raises(ValueError):
        forecast(t, t, CAP, horizons_days=())


def test_5000_samples_is_fast():
    rng = np.random.default_rng(31)
    t = T0 + np.sort(rng.uniform(0, 180 * DAY, 5000))
    u = line(t, 100 * GiB, 10 * GiB) + rng.normal(0, 2 * GiB, len(t))
    forecast(t, u, CAP)  # warm-up: first-call imports and caches
    start = time.perf_counter()
    fc = forecast(t, u, CAP)
    elapsed = time.perf_counter() - start
    assert fc.status == "ok"
    assert elapsed < 0.5, f"forecast of 5000 samples took {elapsed:.3f} s"
