"""The forecaster against a real Prometheus holding a week-plus of backfilled traffic.

Synthetic traffic (morning and evening peaks, later weekend mornings, noise,
a holiday) is backfilled with ``promtool tsdb create-blocks-from openmetrics``
into a real Prometheus (Debian ``prometheus``) on loopback; the forecaster
reads it over the HTTP API, exactly as in production. The full-size backtest
and the scaling simulation are ``bench/scaling_sim.py``.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from bench.scaling_sim import (
    PROMETHEUS,
    PROMTOOL,
    SHAPES,
    Autoscaler,
    desired_replicas,
    prometheus_with,
    simulate,
)
from wyoming_superwhisper.forecast import (
    HORIZONS,
    ForecastMetrics,
    ForecastService,
    ForecastSettings,
    PrometheusClient,
    PrometheusError,
    SeasonalForecaster,
    backtest,
    main,
    synthetic_traffic,
)

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="prometheus/promtool (Debian package prometheus) not installed",
)

START = datetime(2026, 10, 5, tzinfo=UTC)  # a Monday
DAYS = 9
HOLIDAY = date(2026, 10, 9)  # a Friday inside the week of history
SERVICES = ("asr", "tts")


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    history = {
        service: synthetic_traffic(
            START.timestamp(), DAYS, shape=SHAPES[service], holidays=[HOLIDAY], seed=20 + i
        )
        for i, service in enumerate(SERVICES)
    }
    workdir: Path = tmp_path_factory.mktemp("prometheus")
    with prometheus_with(history, workdir) as url:
        yield url


FIRST = (START + timedelta(days=7)).timestamp()
LAST = (START + timedelta(days=DAYS) - timedelta(hours=1, minutes=5)).timestamp()


async def test_forecast_beats_both_baselines_at_one_hour(prometheus: str) -> None:
    async with aiohttp.ClientSession() as session:
        result = await backtest(
            PrometheusClient(prometheus, session),
            FIRST,
            LAST,
            every_s=7200,
            services=SERVICES,
            model=SeasonalForecaster(holidays=frozenset({HOLIDAY})),
        )
    assert set(result.services) == set(SERVICES)
    for service, scores in result.services.items():
        ours = scores["forecast"]
        assert ours.forecasts >= 20, service
        assert scores["seasonal_naive"].forecasts == ours.forecasts == scores["predict_linear"].forecasts
        assert ours.accuracy_percent >= 80.0, (service, scores)
        assert ours.accuracy_percent > scores["seasonal_naive"].accuracy_percent, (service, scores)
        assert ours.accuracy_percent > scores["predict_linear"].accuracy_percent, (service, scores)


async def test_service_publishes_the_forecast_on_metrics(prometheus: str) -> None:
    settings = ForecastSettings(
        prometheus_url=prometheus, host="127.0.0.1", port=0, services=(*SERVICES, "handle")
    )
    metrics = ForecastMetrics(CollectorRegistry())
    async with aiohttp.ClientSession() as session:
        service = ForecastService(settings, PrometheusClient(prometheus, session), metrics)
        await service.start()
        try:
            base = f"http://127.0.0.1:{service.port}"
            async with session.get(f"{base}/readyz") as answer:
                # Not ready before a refresh has read Prometheus (the background one runs
                # at "now", long after the backfilled history: no series, but it succeeds).
                assert answer.status in (200, 503)
            results = await service.refresh(now=(START + timedelta(days=8, hours=6)).timestamp())
            async with session.get(f"{base}/metrics") as answer:
                text = await answer.text()
            async with session.get(f"{base}/readyz") as answer:
                assert answer.status == 200
        finally:
            await service.stop()
    assert set(results) == set(SERVICES)  # no history for handle: no forecast, no error
    values: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("superwhisper_forecast_requests_per_minute"):
                values[(sample.name, sample.labels["service"], sample.labels["horizon"])] = sample.value
    for service in SERVICES:
        for horizon in HORIZONS:
            name = "superwhisper_forecast_requests_per_minute"
            low, mid, high = (values[(n, service, horizon)] for n in (f"{name}_lower", name, f"{name}_upper"))
            assert math.isfinite(mid) and 0 < low <= mid <= high, (service, horizon)
    assert not [k for k in values if k[1] == "handle"]
    # 06:00 on a Tuesday, one hour before the morning peak: the forecast rises toward it.
    asr = {h: values[("superwhisper_forecast_requests_per_minute", "asr", h)] for h in HORIZONS}
    assert asr["1h"] > 2 * asr["5m"]


async def test_unreachable_prometheus_is_an_error_not_a_crash() -> None:
    settings = ForecastSettings(prometheus_url="http://127.0.0.1:9", services=SERVICES)
    metrics = ForecastMetrics(CollectorRegistry())
    async with aiohttp.ClientSession() as session:
        service = ForecastService(settings, PrometheusClient(settings.prometheus_url, session, 2.0), metrics)
        with pytest.raises(PrometheusError):
            await service.refresh()
    assert metrics.errors.labels("")._value.get() == 1
    assert not service.ready


async def test_bad_query_reports_prometheus_error(prometheus: str) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(PrometheusError, match="parse error"):
            await PrometheusClient(prometheus, session).query_range("sum(", FIRST, LAST, 300)


def test_backtest_command_prints_json(prometheus: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "--prometheus-url",
            prometheus,
            "--services",
            "asr",
            "--holidays",
            HOLIDAY.isoformat(),
            "backtest",
            "--start",
            str(FIRST),
            "--end",
            str(FIRST + 6 * 3600),
            "--every",
            "3600",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["horizon_s"] == 3600
    assert report["services"]["asr"]["forecast"]["forecasts"] == 7
    assert main(["--holidays", "not-a-date", "backtest", "--start", "0", "--end", "1"]) == 2


# --- the replica formula of the simulation --------------------------------------------------


@pytest.mark.parametrize(
    ("current", "load", "expected"),
    [
        (1, 30.0, 1),  # exactly at target
        (2, 63.0, 2),  # 5 % over: inside the 10 % tolerance
        (2, 90.0, 3),  # ceil(2 × 45/30)
        (4, 30.0, 1),  # scale in
        (1, 10_000.0, 12),  # capped at max
        (3, 0.0, 1),  # floor at min
    ],
)
def test_desired_replicas_follows_the_hpa_formula(current: int, load: float, expected: int) -> None:
    assert desired_replicas(current, load, Autoscaler(capacity_per_min=30.0)) == expected


def test_forecast_trigger_starts_replicas_before_a_step_in_demand() -> None:
    scaler = Autoscaler(capacity_per_min=30.0, start_delay_s=180)
    demand = np.array([20.0] * 60 + [100.0] * 60)
    reactive = simulate(demand, scaler)
    told = np.array([20.0] * 45 + [100.0] * 75)  # a forecast that sees the step 15 minutes early
    ahead = simulate(demand, scaler, told)
    assert reactive.minutes_over_capacity >= 3  # the pod start delay, at least
    assert ahead.minutes_over_capacity == 0
    assert ahead.replica_hours > reactive.replica_hours


def test_synthetic_traffic_has_the_promised_shape() -> None:
    times, counts = synthetic_traffic(START.timestamp(), 7, holidays=[HOLIDAY], seed=1)
    per_hour = counts.reshape(7, 24, 60).sum(axis=2)
    weekday, saturday, holiday = per_hour[1], per_hour[5], per_hour[4]
    assert weekday[7] > 3 * weekday[3]  # morning peak over the night
    assert weekday[19] > 3 * weekday[3]  # evening peak
    assert saturday[7] < weekday[7] / 2  # later weekend mornings
    assert holiday[7] < weekday[7] / 2  # a holiday is like a Sunday
    assert len(times) == 7 * 1440 and asyncio.iscoroutinefunction(backtest)
