"""Predictive autoscaling: forecast each server's request rate from Prometheus history.

A replica that loads a Whisper model takes minutes to become ready, so scaling
on live load alone always arrives late for the morning peak. This module reads
the request rate of every service from Prometheus's HTTP API (a range query
over up to 7 days), forecasts the next hour and exports the forecast on its
own ``/metrics`` for KEDA (or an HPA through prometheus-adapter) to scale on::

    superwhisper_forecast_requests_per_minute{service, horizon}
    superwhisper_forecast_requests_per_minute_lower{service, horizon}
    superwhisper_forecast_requests_per_minute_upper{service, horizon}

The model (:class:`SeasonalForecaster`) is a classic decomposition, chosen
because it is accurate at one hour ahead on a week of history and fits in
milliseconds on two cores:

* **daily and weekly seasonality**: in log space (traffic is multiplicative:
  a busy Monday is busy all day), the mean of each time-of-day slot over the
  history, separately for working days and for weekends + configured
  holidays, smoothed over neighbouring slots. A week holds 5 + 2 samples per
  slot, enough for a stable profile; MSTL or a weekly Fourier fit need two or
  more weeks, which the 7-day window does not have;
* **the level of today**: the residual (log rate minus profile) of the last
  day goes through a statsmodels local-level state-space model
  (``UnobservedComponents``), which separates a lasting shift (a holiday, a
  party, a busier season) from Poisson noise and gives the prediction
  interval.

Two baselines that need no code of ours are computed by :func:`backtest`:
seasonal naive (the same time last week) and PromQL ``predict_linear``.

Run it with ``superwhisper forecast`` (or ``python -m wyoming_superwhisper.forecast``);
``... backtest`` measures the accuracy on a Prometheus that holds history.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import numpy as np
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

_LOGGER = logging.getLogger(__name__)

SERVICES = ("asr", "handle", "tts")
HORIZONS: dict[str, int] = {"5m": 300, "15m": 900, "30m": 1800, "1h": 3600}
"""Forecast horizons exported, label → seconds ahead. KEDA scales on ``15m`` (longer
than a pod's start with model load); accuracy is reported at ``1h``."""
RATE_QUERY = "sum by (service) (rate(superwhisper_requests_total[{window}])) * 60"
"""Requests per minute of each service, from the counter every server exports."""
MAX_POINTS = 11_000
"""Prometheus refuses range queries of more than 11,000 points per series."""
WEEK_S = 7 * 86_400
DAY_S = 86_400
RATE_FLOOR = 0.1
"""Requests per minute below which the log transform is clamped (an idle night)."""


# --- data ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """One time series on a regular grid: Unix seconds and values."""

    times: np.ndarray
    values: np.ndarray

    def until(self, origin: float) -> Series:
        """The part known at ``origin`` (no look-ahead in a backtest)."""
        keep = self.times <= origin
        return Series(self.times[keep], self.values[keep])

    def at(self, when: float) -> float | None:
        """The value at exactly ``when`` (a grid point), or None."""
        found = np.nonzero(self.times == when)[0]
        return float(self.values[found[0]]) if len(found) else None


@dataclass(frozen=True)
class ForecastPoint:
    """The forecast for one horizon, in requests per minute, with its interval."""

    horizon: str
    seconds: int
    value: float
    lower: float
    upper: float


# --- the model ------------------------------------------------------------------------


@dataclass
class SeasonalForecaster:
    """Daily × day-type seasonal profile in log space, plus a local level on the residual.

    A pure function of the history handed in (no I/O), so a backtest and the
    live service run exactly the same code.
    """

    timezone: str = "UTC"
    """Local time of the users: the profile's time of day and weekday are local."""
    holidays: frozenset[date] = field(default_factory=frozenset)
    """Dates that behave like a Sunday (known public holidays)."""
    smooth_s: int = 600
    """Profile smoothing on each side of a slot (noise vs sharp peaks): 2 slots at 5-min steps."""
    level_window_s: int = DAY_S
    """History the level model sees: long enough to learn the noise, short enough to follow today."""
    alpha: float = 0.2
    """1 − coverage of the interval (0.2: an 80 % interval)."""

    def forecast(self, history: Series, horizons: Mapping[str, int] = HORIZONS) -> list[ForecastPoint]:
        """Forecast each horizon after the last point of ``history``."""
        if len(history.times) < 2:
            raise ValueError("need at least two points of history")
        step = int(np.median(np.diff(history.times)))
        if step <= 0:
            raise ValueError("history times must increase")
        logs = np.log(np.maximum(history.values, RATE_FLOOR))
        slots, weekend = self._calendar(history.times, step)
        per_day = max(1, DAY_S // step)
        profile = self._profile(logs, slots, weekend, per_day)
        residual = logs - profile[weekend, slots]
        window = residual[-max(2, self.level_window_s // step) :]
        origin = float(history.times[-1])
        steps = {label: max(1, round(seconds / step)) for label, seconds in horizons.items()}
        level, low, high = self._level(window, max(steps.values()))
        future = np.array([origin + n * step for n in steps.values()])
        f_slots, f_weekend = self._calendar(future, step)
        points = []
        for i, (label, n) in enumerate(steps.items()):
            base = profile[f_weekend[i], f_slots[i]]
            points.append(
                ForecastPoint(
                    horizon=label,
                    seconds=horizons[label],
                    value=float(math.exp(base + level[n - 1])),
                    lower=float(math.exp(base + low[n - 1])),
                    upper=float(math.exp(base + high[n - 1])),
                )
            )
        return points

    def _calendar(self, times: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(slot of the local day, 1 for a weekend or holiday) for each time."""
        import pandas as pd

        local = pd.to_datetime(np.asarray(times, dtype=float), unit="s", utc=True).tz_convert(self.timezone)
        per_day = max(1, DAY_S // step)
        seconds = np.asarray(local.hour * 3600 + local.minute * 60 + local.second, dtype=np.int64)
        slots = np.minimum(per_day - 1, seconds // step)
        weekend = np.asarray(local.day_of_week >= 5, dtype=np.int64)
        if self.holidays:
            days = np.array([d.isoformat() for d in self.holidays], dtype="datetime64[D]")
            local_days = np.asarray(local.tz_localize(None).normalize(), dtype="datetime64[D]")
            weekend = np.maximum(weekend, np.isin(local_days, days).astype(np.int64))
        return slots, weekend

    def _profile(self, logs: np.ndarray, slots: np.ndarray, weekend: np.ndarray, per_day: int) -> np.ndarray:
        """Mean log rate per (day type, slot), circularly smoothed; gaps filled sensibly."""
        sums = np.zeros((2, per_day))
        counts = np.zeros((2, per_day))
        np.add.at(sums, (weekend, slots), logs)
        np.add.at(counts, (weekend, slots), 1)
        pooled = _fill_circular(_safe_mean(sums.sum(axis=0), counts.sum(axis=0)))
        profile = np.empty((2, per_day))
        for kind in (0, 1):
            mean = _safe_mean(sums[kind], counts[kind])
            # A day type not seen yet (less than a week of history) borrows the pooled profile.
            profile[kind] = pooled if np.all(np.isnan(mean)) else _fill_circular(mean)
        side = round(self.smooth_s * per_day / DAY_S)
        if side > 0:
            kernel = np.ones(2 * side + 1) / (2 * side + 1)
            padded = np.concatenate([profile[:, -side:], profile, profile[:, :side]], axis=1)
            profile = np.vstack([np.convolve(row, kernel, mode="valid") for row in padded])
        return profile

    def _level(self, residual: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Forecast of the residual ``steps`` ahead with its interval (local-level model)."""
        from statsmodels.tsa.statespace.structural import UnobservedComponents

        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                # Optimizer chatter (convergence, bounds) is not actionable here; a
                # failed fit falls back below.
                warnings.simplefilter("ignore")
                fitted = UnobservedComponents(residual, "llevel").fit(disp=False)
                prediction = fitted.get_forecast(steps)
                mean = np.asarray(prediction.predicted_mean, dtype=float)
                bounds = np.asarray(prediction.conf_int(alpha=self.alpha), dtype=float)
            if np.all(np.isfinite(mean)) and np.all(np.isfinite(bounds)):
                return mean, bounds[:, 0], bounds[:, 1]
        except (ValueError, np.linalg.LinAlgError) as error:
            _LOGGER.warning("level model failed (%s); using the last hour's mean residual", error)
        recent = residual[-12:]
        spread = float(np.std(residual)) * 1.2816 if len(residual) > 1 else 0.0
        level = np.full(steps, float(np.mean(recent)))
        return level, level - spread, level + spread


def _safe_mean(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    out = np.full(sums.shape, np.nan)
    np.divide(sums, counts, out=out, where=counts > 0)
    return out


def _fill_circular(values: np.ndarray) -> np.ndarray:
    """Fill NaN slots by circular linear interpolation (a scrape gap, a short history)."""
    known = np.nonzero(~np.isnan(values))[0]
    if len(known) == 0:
        return np.full(values.shape, math.log(RATE_FLOOR))
    n = len(values)
    xs = np.concatenate([known - n, known, known + n])
    ys = np.tile(values[known], 3)
    return np.interp(np.arange(n), xs, ys)


def seasonal_naive(history: Series, target: float, season_s: int = WEEK_S) -> float | None:
    """Baseline: the value one season (a week) before the target time."""
    return history.at(target - season_s)


# --- Prometheus ------------------------------------------------------------------------


class PrometheusError(Exception):
    """Prometheus answered with an error or could not be reached."""


class PrometheusClient:
    """The two calls of Prometheus's HTTP API this module needs (session injected)."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession, timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def query_range(self, query: str, start: float, end: float, step: int) -> dict[str, Series]:
        """Series by ``service`` label, fetched in chunks under Prometheus's point limit."""
        parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        chunk = step * (MAX_POINTS - 1)
        begin = start
        while begin <= end:
            stop = min(end, begin + chunk)
            data = await self._get(
                "/api/v1/query_range", {"query": query, "start": begin, "end": stop, "step": step}
            )
            for item in data.get("result", []):
                key = item.get("metric", {}).get("service", "")
                values = item.get("values", [])
                times = np.array([float(t) for t, _ in values])
                numbers = np.array([float(v) for _, v in values])
                parts.setdefault(key, []).append((times, numbers))
            begin = stop + step
        out = {}
        for key, pieces in parts.items():
            times = np.concatenate([p[0] for p in pieces])
            values = np.concatenate([p[1] for p in pieces])
            keep = np.isfinite(values)
            out[key] = Series(times[keep], values[keep])
        return out

    async def instant(self, query: str) -> list[tuple[dict[str, str], float]]:
        """An instant query now: (labels, value) per series."""
        data = await self._get("/api/v1/query", {"query": query})
        return [
            (dict(item.get("metric", {})), float(item["value"][1]))
            for item in data.get("result", [])
            if isinstance(item.get("value"), list)
        ]

    async def samples(self, selector: str, at: float | None = None) -> list[tuple[dict[str, str], Series]]:
        """The raw samples of a range selector (``metric[10m]``) at ``at``: scrape times, no step grid."""
        params: dict[str, Any] = {"query": selector}
        if at is not None:
            params["time"] = at
        data = await self._get("/api/v1/query", params)
        if data.get("resultType") != "matrix":
            raise PrometheusError(f"{selector!r} is not a range selector (got {data.get('resultType')})")
        out = []
        for item in data.get("result", []):
            values = item.get("values", [])
            times = np.array([float(t) for t, _ in values])
            numbers = np.array([float(v) for _, v in values])
            out.append((dict(item.get("metric", {})), Series(times, numbers)))
        return out

    async def _get(self, path: str, params: Mapping[str, Any]) -> dict[str, Any]:
        try:
            async with self.session.get(
                self.base_url + path, params={k: str(v) for k, v in params.items()}, timeout=self.timeout
            ) as response:
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise PrometheusError(f"{self.base_url}{path}: {error}") from error
        if not isinstance(body, dict) or body.get("status") != "success":
            message = body.get("error", body) if isinstance(body, dict) else body
            raise PrometheusError(f"{self.base_url}{path}: {message}")
        data = body.get("data", {})
        return data if isinstance(data, dict) else {}


# --- export ---------------------------------------------------------------------------


class ForecastMetrics:
    """The forecast gauges, on their own registry (injected in tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        labels = ["service", "horizon"]
        self.value = Gauge(
            "superwhisper_forecast_requests_per_minute",
            "Forecast request rate of a service at a horizon ahead, in requests per minute",
            labels,
            registry=r,
        )
        self.lower = Gauge(
            "superwhisper_forecast_requests_per_minute_lower",
            "Lower bound of the forecast's 80 % interval, in requests per minute",
            labels,
            registry=r,
        )
        self.upper = Gauge(
            "superwhisper_forecast_requests_per_minute_upper",
            "Upper bound of the forecast's 80 % interval, in requests per minute",
            labels,
            registry=r,
        )
        self.history_points = Gauge(
            "superwhisper_forecast_history_points",
            "Points of history the last fit used",
            ["service"],
            registry=r,
        )
        self.fit_seconds = Gauge(
            "superwhisper_forecast_fit_seconds", "Seconds the last fit took", ["service"], registry=r
        )
        self.last_success = Gauge(
            "superwhisper_forecast_last_success_timestamp_seconds",
            "Unix time of the last refresh that read Prometheus and fitted every service",
            registry=r,
        )
        self.errors = Counter(
            "superwhisper_forecast_errors_total",
            "Refreshes or fits that failed, by service (empty: reading Prometheus failed)",
            ["service"],
            registry=r,
        )

    def publish(self, service: str, points: Sequence[ForecastPoint]) -> None:
        for point in points:
            self.value.labels(service, point.horizon).set(point.value)
            self.lower.labels(service, point.horizon).set(point.lower)
            self.upper.labels(service, point.horizon).set(point.upper)

    def withdraw(self, service: str) -> None:
        """Remove a service's forecast (no history any more): absent, not stale."""
        for gauge in (self.value, self.lower, self.upper):
            for horizon in HORIZONS:
                with contextlib.suppress(KeyError):
                    gauge.remove(service, horizon)


# --- the service ----------------------------------------------------------------------


@dataclass(frozen=True)
class ForecastSettings:
    """Settings of ``superwhisper forecast`` (command-line flags)."""

    prometheus_url: str = "http://127.0.0.1:9090"
    host: str = "0.0.0.0"
    port: int = 9310
    refresh_s: float = 300.0
    """Seconds between two refreshes (read history, fit, publish)."""
    history_s: int = WEEK_S
    """History read from Prometheus, in seconds (at most 7 days)."""
    step_s: int = 300
    """Resolution of the history, in seconds (60 or 300)."""
    rate_window: str = "5m"
    services: tuple[str, ...] = SERVICES
    timezone: str = "UTC"
    holidays: tuple[date, ...] = ()


class ForecastService:
    """Refreshes the forecast in the background; serves ``/metrics``, ``/healthz``, ``/readyz``."""

    def __init__(
        self,
        settings: ForecastSettings,
        client: PrometheusClient,
        metrics: ForecastMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.metrics = metrics or ForecastMetrics()
        self.model = SeasonalForecaster(timezone=settings.timezone, holidays=frozenset(settings.holidays))
        self.last: dict[str, list[ForecastPoint]] = {}
        self.ready = False
        self._task: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self.port = settings.port

    async def refresh(self, now: float | None = None) -> dict[str, list[ForecastPoint]]:
        """Read the history, fit every service, publish; returns the forecasts."""
        now = time.time() if now is None else now
        step = self.settings.step_s
        end = math.floor(now / step) * step
        start = end - min(self.settings.history_s, WEEK_S)
        query = RATE_QUERY.format(window=self.settings.rate_window)
        try:
            history = await self.client.query_range(query, start, end, step)
        except PrometheusError:
            self.metrics.errors.labels("").inc()
            raise
        results: dict[str, list[ForecastPoint]] = {}
        for service in self.settings.services:
            series = history.get(service)
            if series is None or len(series.times) < 2:
                _LOGGER.info("no request history for %s yet: no forecast", service)
                self.metrics.withdraw(service)
                continue
            began = time.perf_counter()
            try:
                points = await asyncio.to_thread(self.model.forecast, series)
            except ValueError as error:
                _LOGGER.warning("forecast of %s failed: %s", service, error)
                self.metrics.errors.labels(service).inc()
                continue
            self.metrics.fit_seconds.labels(service).set(time.perf_counter() - began)
            self.metrics.history_points.labels(service).set(len(series.times))
            self.metrics.publish(service, points)
            results[service] = points
        self.metrics.last_success.set(now)
        self.last = results
        self.ready = True
        return results

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port)
        await site.start()
        addresses = self._runner.addresses
        if addresses:
            self.port = int(addresses[0][1])
        self._task = asyncio.create_task(self._loop(), name="forecast-refresh")
        _LOGGER.info(
            "forecast on %s:%s, reading %s", self.settings.host, self.port, self.settings.prometheus_url
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except PrometheusError as error:
                _LOGGER.warning("forecast refresh failed: %s", error)
            await asyncio.sleep(self.settings.refresh_s)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    async def _readyz(self, request: web.Request) -> web.Response:
        body = {"ready": self.ready, "services": sorted(self.last)}
        return web.json_response(body, status=200 if self.ready else 503)


# --- backtest -------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodScore:
    """Accuracy of one method at one horizon: 100 % − MAPE, and how many forecasts."""

    accuracy_percent: float
    mape_percent: float
    forecasts: int


@dataclass(frozen=True)
class BacktestResult:
    """Per service: the score of the forecaster and of both baselines."""

    horizon_s: int
    step_s: int
    origins: int
    services: dict[str, dict[str, MethodScore]]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def backtest(
    client: PrometheusClient,
    start: float,
    end: float,
    *,
    every_s: int = 3600,
    horizon_s: int = 3600,
    step_s: int = 300,
    rate_window: str = "5m",
    services: Sequence[str] = SERVICES,
    model: SeasonalForecaster | None = None,
) -> BacktestResult:
    """Forecast from origins every ``every_s`` in [start, end] and score at ``horizon_s``.

    The history of an origin is the week before it, exactly what the live
    service reads (one range query, then sliced, so no point after the origin
    is ever seen). ``predict_linear`` is asked of Prometheus itself over the
    last hour of the same rate, at the same origins.
    """
    model = model or SeasonalForecaster()
    query = RATE_QUERY.format(window=rate_window)
    first = math.ceil(start / step_s) * step_s
    origins = [t for t in range(int(first), int(end) + 1, every_s)]
    data = await client.query_range(query, first - WEEK_S, origins[-1] + horizon_s, step_s)
    linear_query = f"predict_linear(({query})[1h:{step_s}s], {horizon_s})"
    linear = await client.query_range(linear_query, origins[0], origins[-1], every_s)
    scores: dict[str, dict[str, MethodScore]] = {}
    label = f"{horizon_s}s"
    for service in services:
        series = data.get(service)
        if series is None:
            raise PrometheusError(f"no history for service {service!r}")
        errors: dict[str, list[float]] = {"forecast": [], "seasonal_naive": [], "predict_linear": []}
        for origin in origins:
            actual = series.at(origin + horizon_s)
            known = series.until(origin)
            if actual is None or actual <= 0 or len(known.times) < 2:
                continue
            point = (await asyncio.to_thread(model.forecast, known, {label: horizon_s}))[0]
            naive = seasonal_naive(known, origin + horizon_s)
            line = linear[service].at(origin) if service in linear else None
            if naive is None or line is None:
                continue
            errors["forecast"].append(abs(point.value - actual) / actual)
            errors["seasonal_naive"].append(abs(naive - actual) / actual)
            # A line through a falling hour goes below zero; no rate is negative.
            errors["predict_linear"].append(abs(max(line, 0.0) - actual) / actual)
        scores[service] = {
            name: MethodScore(
                accuracy_percent=round(100.0 - 100.0 * float(np.mean(errs)), 2) if errs else float("nan"),
                mape_percent=round(100.0 * float(np.mean(errs)), 2) if errs else float("nan"),
                forecasts=len(errs),
            )
            for name, errs in errors.items()
        }
    return BacktestResult(horizon_s=horizon_s, step_s=step_s, origins=len(origins), services=scores)


# --- synthetic traffic (backtests, the scaling simulation, the docs) ---------------------


@dataclass(frozen=True)
class TrafficShape:
    """A day of voice-assistant traffic: peaks in requests per minute at local hours."""

    peak_per_min: float = 200.0
    floor: float = 0.06
    """Night traffic as a share of the peak."""
    weekday: tuple[tuple[float, float, float], ...] = (
        (7.5, 0.8, 1.0),
        (12.5, 1.5, 0.3),
        (15.0, 2.0, 0.25),
        (19.5, 1.3, 0.9),
    )
    """(hour, width in hours, height) of each bump on a working day: morning routine, lunch, evening."""
    weekend: tuple[tuple[float, float, float], ...] = ((10.0, 1.5, 0.45), (14.5, 2.5, 0.35), (20.0, 1.5, 0.8))
    """Later, flatter mornings on Saturday and Sunday (and holidays)."""
    day_sigma: float = 0.08
    """Day-to-day variation of the whole day's volume (log-normal sigma)."""

    def per_min(self, when: float, zone: ZoneInfo, holidays: Sequence[date] = ()) -> float:
        """The expected rate at Unix time ``when`` (requests per minute), before day-to-day variation."""
        local = datetime.fromtimestamp(when, zone)
        hour = local.hour + local.minute / 60.0 + local.second / 3600.0
        bumps = self.weekend if local.weekday() >= 5 or local.date() in holidays else self.weekday
        level = self.floor + sum(h * math.exp(-0.5 * ((hour - mu) / w) ** 2) for mu, w, h in bumps)
        return self.peak_per_min * level


def synthetic_traffic(
    start: float,
    days: int,
    *,
    shape: TrafficShape | None = None,
    holidays: Sequence[date] = (),
    timezone: str = "UTC",
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(minute start times, requests counted in each minute): Poisson around the shape."""
    shape = shape or TrafficShape()
    rng = np.random.default_rng(seed)
    zone = ZoneInfo(timezone)
    minutes = np.arange(days * 1440)
    times = float(start) + minutes * 60.0
    day_factor = rng.lognormal(0.0, shape.day_sigma, days + 1)
    rates = np.array([shape.per_min(t, zone, holidays) * day_factor[i // 1440] for i, t in enumerate(times)])
    return times, rng.poisson(rates).astype(float)


LabelSet = tuple[tuple[str, str], ...]
"""A series' labels as hashable (name, value) pairs."""


def openmetrics_counters(series: Mapping[LabelSet, tuple[np.ndarray, np.ndarray]], name: str) -> str:
    """OpenMetrics text of cumulative counters for ``promtool tsdb create-blocks-from openmetrics``.

    ``series`` maps a label set to ``(times, increments)``; samples are the
    running sums, one per time (timestamps in seconds).
    """
    family = name.removesuffix("_total")
    lines = [f"# TYPE {family} counter", f"# HELP {family} Requests answered (backfilled history)"]
    for labels, (times, increments) in series.items():
        pairs = dict(labels)
        rendered = ",".join(f'{k}="{v}"' for k, v in sorted(pairs.items()))
        total = np.cumsum(increments)
        lines.extend(
            f"{family}_total{{{rendered}}} {int(v)} {int(t)}" for t, v in zip(times, total, strict=True)
        )
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


# --- command line ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="superwhisper forecast",
        description="Forecast each server's request rate from Prometheus history and export it.",
    )
    parser.add_argument("--prometheus-url", default=ForecastSettings.prometheus_url)
    parser.add_argument("--timezone", default="UTC", help="users' local time zone, e.g. Europe/Paris")
    parser.add_argument("--holidays", default="", help="comma-separated ISO dates that behave like a Sunday")
    parser.add_argument("--step", type=int, default=300, help="history resolution in seconds (60 or 300)")
    parser.add_argument("--services", default=",".join(SERVICES))
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="refresh in the background and serve /metrics (default)")
    serve.add_argument("--host", default=ForecastSettings.host)
    serve.add_argument("--port", type=int, default=ForecastSettings.port)
    serve.add_argument("--refresh", type=float, default=ForecastSettings.refresh_s, help="seconds")
    serve.add_argument("--history", type=int, default=WEEK_S, help="seconds of history (at most 7 days)")
    check = sub.add_parser("backtest", help="score the forecast against both baselines on stored history")
    check.add_argument("--start", type=float, required=True, help="first origin, Unix seconds")
    check.add_argument("--end", type=float, required=True, help="last origin, Unix seconds")
    check.add_argument("--every", type=int, default=3600, help="seconds between origins")
    check.add_argument("--horizon", type=int, default=3600, help="seconds ahead")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``superwhisper forecast [serve|backtest] ...``; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        holidays = tuple(date.fromisoformat(d.strip()) for d in args.holidays.split(",") if d.strip())
        ZoneInfo(args.timezone)
    except (ValueError, KeyError) as error:
        _LOGGER.error("bad --holidays or --timezone: %s", error)
        return 2
    services = tuple(s.strip() for s in args.services.split(",") if s.strip())
    if args.command == "backtest":
        model = SeasonalForecaster(timezone=args.timezone, holidays=frozenset(holidays))
        return asyncio.run(_backtest_main(args, model, services))
    settings = ForecastSettings(
        prometheus_url=args.prometheus_url,
        host=getattr(args, "host", ForecastSettings.host),
        port=getattr(args, "port", ForecastSettings.port),
        refresh_s=getattr(args, "refresh", ForecastSettings.refresh_s),
        history_s=min(getattr(args, "history", WEEK_S), WEEK_S),
        step_s=args.step,
        services=services,
        timezone=args.timezone,
        holidays=holidays,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_main(settings))
    return 0


async def _serve_main(settings: ForecastSettings) -> None:
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with aiohttp.ClientSession() as session:
        service = ForecastService(settings, PrometheusClient(settings.prometheus_url, session))
        await service.start()
        try:
            await stop.wait()
        finally:
            await service.stop()


async def _backtest_main(
    args: argparse.Namespace, model: SeasonalForecaster, services: tuple[str, ...]
) -> int:
    async with aiohttp.ClientSession() as session:
        client = PrometheusClient(args.prometheus_url, session)
        try:
            result = await backtest(
                client,
                args.start,
                args.end,
                every_s=args.every,
                horizon_s=args.horizon,
                step_s=args.step,
                services=services,
                model=model,
            )
        except PrometheusError as error:
            _LOGGER.error("%s", error)
            return 1
    json.dump(result.as_dict(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
