"""Forecast backtest on a real Prometheus, then a day of autoscaling replayed with and without it.

1. A week-plus of synthetic traffic per service (morning and evening peaks,
   later weekend mornings, day-to-day volume changes, Poisson noise, one
   public holiday) is written as OpenMetrics counters and backfilled into a
   real Prometheus with ``promtool tsdb create-blocks-from openmetrics``.
2. ``wyoming_superwhisper.forecast.backtest`` reads it back over Prometheus's
   HTTP API and scores the forecast at +1 h against seasonal naive and PromQL
   ``predict_linear`` (asked of that Prometheus).
3. One day is replayed minute by minute through the HPA replica formula that
   KEDA feeds, ``desired = ceil(current × metric / target)`` (Kubernetes
   docs, "Horizontal Pod Autoscaling", algorithm details), with its 10 %
   tolerance, immediate scale-up, 5-minute scale-down stabilization and a
   pod start delay (image pull + model load) — once on live load only, once
   with the forecast trigger too (KEDA/HPA take the larger of the two).

Writes ``bench/results/scaling.json``. Run: ``.venv/bin/python bench/scaling_sim.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from wyoming_superwhisper.forecast import (
    HORIZONS,
    LabelSet,
    PrometheusClient,
    SeasonalForecaster,
    Series,
    TrafficShape,
    backtest,
    openmetrics_counters,
    synthetic_traffic,
)

_LOGGER = logging.getLogger(__name__)

RESULTS = Path(__file__).parent / "results"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")

START = datetime(2026, 10, 5, tzinfo=UTC)
"""A Monday: 15 days of history run to Monday 19 October (holiday on Wednesday 14)."""
HOLIDAY = date(2026, 10, 14)
DAYS = 15

SHAPES: dict[str, TrafficShape] = {
    # Every voice command is transcribed; a few are typed, so handle sees a little more;
    # TTS answers most of them, more in the evening (timers, stories).
    "asr": TrafficShape(peak_per_min=200.0),
    "handle": TrafficShape(peak_per_min=220.0, day_sigma=0.1),
    "tts": TrafficShape(
        peak_per_min=180.0,
        weekday=((7.5, 0.8, 0.8), (12.5, 1.5, 0.3), (15.0, 2.0, 0.25), (20.0, 1.5, 1.0)),
    ),
}
CAPACITY_PER_MIN: dict[str, float] = {"asr": 30.0, "handle": 40.0, "tts": 45.0}
"""Requests per minute one CPU replica sustains (the KEDA forecast trigger's threshold)."""


# --- history into a real Prometheus ---------------------------------------------------


def build_history(
    days: int = DAYS, start: datetime = START, holidays: Sequence[date] = (HOLIDAY,), seed: int = 11
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per service: (minute times, requests in that minute)."""
    return {
        service: synthetic_traffic(start.timestamp(), days, shape=shape, holidays=holidays, seed=seed + i)
        for i, (service, shape) in enumerate(SHAPES.items())
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def prometheus_with(history: Mapping[str, tuple[np.ndarray, np.ndarray]], workdir: Path) -> Iterator[str]:
    """Backfill ``history`` (per service: times, requests) with promtool, run Prometheus; yields its URL."""
    series: dict[LabelSet, tuple[np.ndarray, np.ndarray]] = {
        (("service", s), ("outcome", "ok")): v for s, v in history.items()
    }
    with prometheus_backfilled(openmetrics_counters(series, "superwhisper_requests_total"), workdir) as url:
        yield url


@contextlib.contextmanager
def prometheus_backfilled(openmetrics: str, workdir: Path) -> Iterator[str]:
    """Backfill OpenMetrics text with ``promtool tsdb create-blocks-from openmetrics``, then serve it."""
    if PROMTOOL is None:
        raise RuntimeError("promtool not installed (Debian package prometheus)")
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    source = workdir / "history.om"
    source.write_text(openmetrics)
    subprocess.run(
        [PROMTOOL, "tsdb", "create-blocks-from", "openmetrics", str(source), str(data)],
        check=True,
        capture_output=True,
    )
    with running_prometheus(workdir, "global:\n  scrape_interval: 1m\nscrape_configs: []\n", data) as url:
        yield url


@contextlib.contextmanager
def running_prometheus(workdir: Path, config: str, data: Path | None = None) -> Iterator[str]:
    """A real Prometheus on loopback with ``config`` (YAML text) until the block ends; yields its URL."""
    if PROMETHEUS is None:
        raise RuntimeError("prometheus not installed (Debian package prometheus)")
    data = data or workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "prometheus.yml"
    config_file.write_text(config)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={data}",
            "--storage.tsdb.retention.time=100y",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Prometheus did not start; see {workdir / 'prometheus.log'}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


# --- the replica formula ----------------------------------------------------------------


@dataclass(frozen=True)
class Autoscaler:
    """HPA behaviour that KEDA configures (defaults of autoscaling/v2, our manifests' values)."""

    capacity_per_min: float
    """Target per replica: requests per minute one replica serves (the trigger threshold)."""
    min_replicas: int = 1
    max_replicas: int = 12
    tolerance: float = 0.1
    """No change while |metric/target − 1| ≤ tolerance (kube-controller-manager default)."""
    scale_down_window_s: int = 300
    """Scale-down stabilization: the highest recommendation of the last 5 minutes wins."""
    start_delay_s: int = 180
    """Seconds from scheduling to Ready: image already on the node, model load, warm-up."""
    sync_s: int = 60
    """Replay resolution (the HPA syncs every 15 s; the traffic is per minute)."""


@dataclass(frozen=True)
class SimResult:
    minutes: int
    minutes_over_capacity: int
    requests_over_capacity: float
    """Requests beyond the ready replicas' capacity (queued or refused)."""
    replica_hours: float
    peak_replicas: int


def desired_replicas(current: int, metric_total: float, scaler: Autoscaler) -> int:
    """``ceil(current × (metric_total / current) / target)`` with the HPA tolerance."""
    if current <= 0:
        return scaler.min_replicas
    ratio = (metric_total / current) / scaler.capacity_per_min
    wanted = current if abs(ratio - 1.0) <= scaler.tolerance else math.ceil(current * ratio)
    return max(scaler.min_replicas, min(scaler.max_replicas, wanted))


def simulate(
    demand_per_min: np.ndarray, scaler: Autoscaler, forecast_per_min: np.ndarray | None = None
) -> SimResult:
    """Replay per-minute demand; the live trigger sees last minute's load, the forecast the future."""
    replicas = scaler.min_replicas
    starts = [-(10**9)] * replicas  # start minute of each replica (ready after the delay)
    history: list[int] = []
    over = 0
    lost = 0.0
    replica_minutes = 0.0
    peak = replicas
    delay = scaler.start_delay_s // scaler.sync_s
    for minute, demand in enumerate(demand_per_min):
        ready_count = sum(1 for s in starts if minute - s >= delay)
        capacity = ready_count * scaler.capacity_per_min
        if demand > capacity:
            over += 1
            lost += float(demand - capacity)
        replica_minutes += len(starts)
        observed = float(demand_per_min[minute - 1]) if minute else float(demand)
        wanted = desired_replicas(len(starts), observed, scaler)
        if forecast_per_min is not None:
            wanted = max(wanted, desired_replicas(len(starts), float(forecast_per_min[minute]), scaler))
        history.append(wanted)
        window = history[-max(1, scaler.scale_down_window_s // scaler.sync_s) :]
        target = wanted if wanted > len(starts) else max(window)
        if target > len(starts):
            starts.extend([minute] * (target - len(starts)))
        elif target < len(starts):
            starts = sorted(starts)[:target]
        peak = max(peak, len(starts))
    return SimResult(
        minutes=len(demand_per_min),
        minutes_over_capacity=over,
        requests_over_capacity=round(lost, 1),
        replica_hours=round(replica_minutes / 60.0, 2),
        peak_replicas=peak,
    )


def forecast_per_minute(
    series: Series, day_start: float, horizon_s: int, model: SeasonalForecaster, refresh_s: int = 300
) -> np.ndarray:
    """What the forecast trigger reads at each minute of one day: the last refresh's value.

    The manifests scale on the upper bound of the 80 % interval at +15 min: a
    replica started on it is ready before the load arrives, and the bound
    covers the Poisson noise a point forecast would leave over capacity.
    """
    out = np.zeros(1440)
    value = 0.0
    label = f"{horizon_s}s"
    for minute in range(1440):
        now = day_start + minute * 60
        if minute % (refresh_s // 60) == 0:
            known = series.until(now)
            known = Series(known.times[-(7 * 86400 // 300) :], known.values[-(7 * 86400 // 300) :])
            value = model.forecast(known, {label: horizon_s})[0].upper
        out[minute] = value
    return out


# --- the whole bench --------------------------------------------------------------------


async def run_backtests(url: str, first: float, last: float, every_s: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        client = PrometheusClient(url, session)
        unknown = await backtest(client, first, last, every_s=every_s, model=SeasonalForecaster())
        known = await backtest(
            client, first, last, every_s=every_s, model=SeasonalForecaster(holidays=frozenset({HOLIDAY}))
        )
        history = await client.query_range(
            "sum by (service) (rate(superwhisper_requests_total[5m])) * 60", first - 7 * 86400, last, 300
        )
    return {"holiday_unknown": unknown.as_dict(), "holiday_known": known.as_dict(), "_history": history}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--every", type=int, default=1800, help="seconds between backtest origins")
    parser.add_argument("--sim-day", default="2026-10-13", help="day replayed (ISO date, UTC)")
    parser.add_argument("--out", type=Path, default=RESULTS / "scaling.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    history = build_history()
    first = (START + timedelta(days=7)).timestamp()
    last = (START + timedelta(days=DAYS) - timedelta(hours=1, minutes=5)).timestamp()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sw-prom-") as tmp, prometheus_with(history, Path(tmp)) as url:
        scores = asyncio.run(run_backtests(url, first, last, args.every))
    backtest_s = time.perf_counter() - began
    rates: dict[str, Series] = scores.pop("_history")
    day = datetime.fromisoformat(args.sim_day).replace(tzinfo=UTC)
    day_start = day.timestamp()
    sims: dict[str, Any] = {}
    model = SeasonalForecaster()
    lead = HORIZONS["15m"]
    for service, (times, counts) in history.items():
        begin = int(np.searchsorted(times, day_start))
        demand = counts[begin : begin + 1440]
        scaler = Autoscaler(capacity_per_min=CAPACITY_PER_MIN[service])
        forecast = forecast_per_minute(rates[service], day_start, lead, model)
        sims[service] = {
            "reactive": asdict(simulate(demand, scaler)),
            "predictive": asdict(simulate(demand, scaler, forecast)),
            "capacity_per_replica_per_min": scaler.capacity_per_min,
            "start_delay_s": scaler.start_delay_s,
        }
    report = {
        "what": "forecast backtest at +1 h on a real Prometheus (backfilled with promtool), "
        "and one day replayed through the HPA/KEDA replica formula",
        "history": {
            "start": START.isoformat(),
            "days": DAYS,
            "holiday": HOLIDAY.isoformat(),
            "step_s": 300,
            "peaks_per_min": {s: shape.peak_per_min for s, shape in SHAPES.items()},
        },
        "backtest": scores,
        "backtest_seconds": round(backtest_s, 1),
        "simulation": {"day": args.sim_day, "forecast_horizon": "15m", "services": sims},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
