"""Forecast accuracy on traffic recorded from our own servers under a load test.

The synthetic backtest (``scaling_sim.py``) feeds the forecaster counts drawn
from a formula. This one records the traffic from the real system instead:

1. ``superwhisper asr``, ``handle`` and ``tts`` run as three processes on the
   embedded models with their ops port on, and a real Prometheus scrapes their
   ``/metrics`` every second (as a cluster's Prometheus scrapes the pods).
2. A load generator sends French requests through the ``wyoming`` client, one
   TCP connection per request as Home Assistant does, with open-loop Poisson
   arrivals. Their rate follows the same day and week shape as the synthetic
   traffic, in compressed time: ``--days`` of calendar in ``--minutes`` of wall
   clock. Two cores cannot answer a peak of tens of requests a second, so the
   servers answer ``busy`` beyond their caps. That is counted like any other
   answer in ``superwhisper_requests_total``: the forecaster sees demand, which
   is what scaling needs.
3. The counter samples that Prometheus scraped are read back raw, stretched
   onto the calendar (× the compression), written as OpenMetrics and
   backfilled with ``promtool`` into a second Prometheus. ``forecast.backtest``
   reads that one over HTTP and scores the forecast at +1 h against seasonal
   naive and PromQL ``predict_linear``. The known arrival rate gives the
   ceiling that Poisson noise leaves ("oracle").

A 1 s scrape is ``compression`` seconds of calendar (370 s at the default 9 days in 35
min), so the backtest reads the rate over ``--rate-window`` (1 h of calendar)
at 15-minute steps, not the live service's 5 minutes.

Writes ``bench/results/recorded-traffic.json``. Run it alone, it takes both cores:
``flock /tmp/sw-heavy.lock .venv/bin/python -m bench.recorded_traffic``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import numpy as np
from wyoming.asr import Transcript
from wyoming.client import AsyncTcpClient
from wyoming.event import Event
from wyoming.tts import Synthesize, SynthesizeVoice

from bench.e2e_bench import espeak_wav, free_port, ours_command, server
from bench.scaling_sim import SHAPES, START, prometheus_backfilled, running_prometheus
from wyoming_superwhisper import pipeline
from wyoming_superwhisper.forecast import (
    LabelSet,
    PrometheusClient,
    SeasonalForecaster,
    Series,
    backtest,
    openmetrics_counters,
)

_LOGGER = logging.getLogger(__name__)

RESULTS = Path(__file__).parent / "results"
METRIC = "superwhisper_requests_total"
ASR_COMMANDS = (
    "Allume la lumière du salon.",
    "Quelle heure est-il ?",
    "Ferme les volets de la chambre.",
    "Mets de la musique dans la cuisine.",
)
HANDLE_TEXTS = (
    "Quelle heure est-il ?",
    "Allume la lumière du salon.",
    "Quel temps fera-t-il demain ?",
    "Rappelle-moi d'acheter du pain.",
)
TTS_TEXTS = (
    "Il est dix heures et quart.",
    "D'accord, j'allume la lumière du salon.",
    "Demain, il fera beau et doux.",
    "C'est noté, je vous le rappellerai.",
)
REQUEST_TIMEOUT_S = 60.0
MAX_OUTSTANDING = 400
"""Requests in flight from this generator (all services) beyond which an arrival is not sent (reported)."""


# --- the compressed calendar --------------------------------------------------------------


@dataclass(frozen=True)
class Compression:
    """Wall clock ↔ calendar: ``days`` of calendar from ``start`` played in ``seconds`` of wall clock."""

    start: datetime
    days: float
    seconds: float

    @property
    def factor(self) -> float:
        return self.days * 86_400 / self.seconds

    def calendar(self, elapsed_s: float) -> float:
        """Unix time on the calendar for ``elapsed_s`` seconds into the run."""
        return self.start.timestamp() + elapsed_s * self.factor


@dataclass
class Demand:
    """The arrival rate of one service: its traffic shape, scaled so its peak is ``peak_per_s`` real."""

    service: str
    peak_per_s: float
    day_factors: np.ndarray
    zone: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))

    def per_s(self, calendar_t: float, start: datetime) -> float:
        """Arrivals per wall-clock second at calendar time ``calendar_t``."""
        shape = SHAPES[self.service]
        day = int((calendar_t - start.timestamp()) // 86_400)
        factor = float(self.day_factors[min(max(day, 0), len(self.day_factors) - 1)])
        return self.peak_per_s * shape.per_min(calendar_t, self.zone) / shape.peak_per_min * factor


def demands(services: Sequence[str], peak_per_s: float, days: int, seed: int) -> dict[str, Demand]:
    rng = np.random.default_rng(seed)
    return {
        service: Demand(service, peak_per_s, rng.lognormal(0.0, SHAPES[service].day_sigma, days + 1))
        for service in services
    }


# --- one request, as Home Assistant sends it ------------------------------------------------


@dataclass
class Tally:
    """What the generator sent and heard back, per service."""

    outcomes: Counter[str] = field(default_factory=Counter)
    seconds_ok: list[float] = field(default_factory=list)
    not_sent: int = 0


async def _exchange(port: int, event: Event, last: dict[str, str]) -> str:
    """Send one request event on a new connection; the outcome ``last`` maps the final event to.

    Named as the server counts it (``superwhisper_requests_total``): ``not-handled``
    (the spoken apology when no LLM answered) is an ``error``, not an answer.
    """
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(event)
        while True:
            answer = await client.read_event()
            if answer is None:
                return "closed"
            if answer.type == "error":
                return str((answer.data or {}).get("code") or "error")
            if answer.type in last:
                return last[answer.type]


async def _streamed_transcript(port: int, pcm: bytes) -> str:
    """One French utterance streamed in real time with the pipeline's own ASR client."""
    try:
        async with pipeline.connect_stage("asr", f"tcp://127.0.0.1:{port}", REQUEST_TIMEOUT_S) as client:
            await pipeline.stream_transcribe(
                client,
                pcm,
                language="fr",
                realtime=True,
                chunk_ms=100,
                clock=pipeline.StageClock(),
                timings=pipeline.PipelineTimings(),
            )
    except pipeline.PipelineError as error:
        # The server's error code (busy, transcription-failed...), or what the socket did.
        code = error.code or "error"
        return f"failed:{code}" if code in {"connect", "connection", "timeout"} else code
    return "ok"


RequestMaker = Callable[[int], Awaitable[str]]


def request_makers(ports: dict[str, int], work: Path) -> dict[str, RequestMaker]:
    """Per service: send request number ``n`` (a rotating French input), return its outcome."""
    utterances = []
    for index, text in enumerate(ASR_COMMANDS):
        path = work / f"asr-{index}.wav"
        espeak_wav(text, "fr", path, tail_s=0.3)
        utterances.append(pipeline.read_wav_16k(path))

    async def asr(n: int) -> str:
        return await _streamed_transcript(ports["asr"], utterances[n % len(utterances)])

    async def handle(n: int) -> str:
        event = Transcript(text=HANDLE_TEXTS[n % len(HANDLE_TEXTS)], language="fr").event()
        return await _exchange(ports["handle"], event, {"handled": "ok", "not-handled": "error"})

    async def tts(n: int) -> str:
        event = Synthesize(text=TTS_TEXTS[n % len(TTS_TEXTS)], voice=SynthesizeVoice(language="fr")).event()
        return await _exchange(ports["tts"], event, {"audio-stop": "ok"})

    makers: dict[str, RequestMaker] = {"asr": asr, "handle": handle, "tts": tts}
    return {name: makers[name] for name in ports}


async def generate(
    makers: dict[str, RequestMaker],
    demand: dict[str, Demand],
    clock: Compression,
    seed: int,
    tick_s: float = 0.05,
) -> dict[str, Tally]:
    """Open-loop Poisson arrivals for ``clock.seconds``, the rate read from ``demand`` every tick."""
    rng = np.random.default_rng(seed)
    tallies = {name: Tally() for name in makers}
    pending: set[asyncio.Task[None]] = set()
    numbers = dict.fromkeys(makers, 0)

    async def one(name: str, n: int) -> None:
        began = time.monotonic()
        try:
            outcome = await asyncio.wait_for(makers[name](n), REQUEST_TIMEOUT_S)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as error:
            outcome = f"failed:{type(error).__name__}"
        tallies[name].outcomes[outcome] += 1
        if outcome == "ok":
            tallies[name].seconds_ok.append(time.monotonic() - began)

    began = time.monotonic()
    next_log = 0.0
    while (elapsed := time.monotonic() - began) < clock.seconds:
        calendar_t = clock.calendar(elapsed)
        for name in makers:
            for _ in range(rng.poisson(demand[name].per_s(calendar_t, clock.start) * tick_s)):
                if len(pending) >= MAX_OUTSTANDING:
                    tallies[name].not_sent += 1
                    continue
                task = asyncio.create_task(one(name, numbers[name]))
                numbers[name] += 1
                pending.add(task)
                task.add_done_callback(pending.discard)
        if elapsed >= next_log:
            _LOGGER.info(
                "%s: %d in flight, %s",
                datetime.fromtimestamp(calendar_t, UTC).strftime("%a %H:%M"),
                len(pending),
                {n: dict(t.outcomes) for n, t in tallies.items()},
            )
            next_log += 60.0
        await asyncio.sleep(max(0.0, began + elapsed + tick_s - time.monotonic()))
    if pending:
        await asyncio.wait(pending, timeout=REQUEST_TIMEOUT_S + 5)
    return tallies


# --- recording: live scrapes, stretched onto the calendar -----------------------------------


def scrape_config(ops_ports: dict[str, int], interval_s: float) -> str:
    jobs = "".join(
        f"  - job_name: superwhisper-{name}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        for name, port in ops_ports.items()
    )
    every = f"{interval_s:g}s"
    return f"global:\n  scrape_interval: {every}\n  scrape_timeout: {every}\nscrape_configs:\n{jobs}"


def stretch(samples: dict[tuple[str, str], Series], run_start: float, clock: Compression) -> str:
    """OpenMetrics of the recorded counters, each wall-clock time mapped onto the calendar."""
    series: dict[LabelSet, tuple[np.ndarray, np.ndarray]] = {}
    for (service, outcome), recorded in samples.items():
        keep = recorded.times >= run_start
        times = clock.start.timestamp() + (recorded.times[keep] - run_start) * clock.factor
        totals = recorded.values[keep]
        series[(("service", service), ("outcome", outcome))] = (np.round(times), np.diff(totals, prepend=0.0))
    return openmetrics_counters(series, METRIC)


def oracle_per_min(demand: Demand, clock: Compression, end: float, window_s: int) -> float:
    """The true mean arrival rate over ``window_s`` of calendar before ``end``, per calendar minute."""
    grid = np.linspace(end - window_s, end, 61)
    per_s = np.mean([demand.per_s(t, clock.start) for t in grid])
    return float(per_s * 60.0 / clock.factor)


async def score(
    url: str, demand: dict[str, Demand], clock: Compression, *, step_s: int, rate_window: str, window_s: int
) -> dict[str, Any]:
    """Backtest the recorded week on ``url`` (the backfilled Prometheus), plus the oracle's score."""
    first = clock.start.timestamp() + 7 * 86_400
    last = clock.start.timestamp() + clock.days * 86_400 - 3600 - 2 * step_s
    async with aiohttp.ClientSession() as session:
        client = PrometheusClient(url, session)
        result = await backtest(
            client,
            first,
            last,
            every_s=step_s,
            horizon_s=3600,
            step_s=step_s,
            rate_window=rate_window,
            services=tuple(demand),
            model=SeasonalForecaster(),
        )
        query = f"sum by (service) (rate({METRIC}[{rate_window}])) * 60"
        observed = await client.query_range(query, first - 7 * 86_400, last + 3600, step_s)
    report = result.as_dict()
    for name, series in observed.items():
        if name not in demand:
            continue
        errors = []
        for origin in range(int(math.ceil(first / step_s) * step_s), int(last) + 1, step_s):
            actual = series.at(origin + 3600)
            if actual:
                truth = oracle_per_min(demand[name], clock, origin + 3600, window_s)
                errors.append(abs(truth - actual) / actual)
        report["services"][name]["oracle"] = {
            "accuracy_percent": round(100.0 - 100.0 * float(np.mean(errors)), 2),
            "mape_percent": round(100.0 * float(np.mean(errors)), 2),
            "forecasts": len(errors),
        }
        mean_per_window = float(np.mean(series.values)) * window_s / 60
        report["services"][name]["mean_requests_per_window"] = round(mean_per_window)
    return report


async def recorded_counters(url: str, span_s: float) -> dict[tuple[str, str], Series]:
    """Every raw scrape of the request counter over the last ``span_s`` seconds, by (service, outcome)."""
    async with aiohttp.ClientSession() as session:
        samples = await PrometheusClient(url, session).samples(f"{METRIC}[{math.ceil(span_s)}s]")
    return {(labels.get("service", ""), labels.get("outcome", "")): series for labels, series in samples}


async def scrape_health(url: str, span_s: float) -> dict[str, dict[str, float]]:
    """How well Prometheus could scrape each server during the load: a missed scrape is a gap."""
    window = f"{math.ceil(span_s)}s"
    out: dict[str, dict[str, float]] = {}
    async with aiohttp.ClientSession() as session:
        client = PrometheusClient(url, session)
        for name, query in (
            ("up_ratio", f"avg_over_time(up[{window}])"),
            ("slowest_scrape_s", f"max_over_time(scrape_duration_seconds[{window}])"),
        ):
            for labels, value in await client.instant(query):
                out.setdefault(labels.get("job", ""), {})[name] = round(value, 3)
    return out


def _counted_all(counters: dict[tuple[str, str], Series], tallies: dict[str, Tally]) -> bool:
    for name, tally in tallies.items():
        counted = sum(
            float(series.values[-1]) for (service, _), series in counters.items() if service == name
        )
        if counted < sum(tally.outcomes.values()):
            return False
    return True


# --- the whole run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Recording:
    """The recorded counters and what the generator saw, ready to be stretched and scored."""

    counters: dict[tuple[str, str], Series]
    tallies: dict[str, Tally]
    run_start: float
    run_end: float
    scrapes: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per job: share of scrapes that succeeded (``up``) and the slowest scrape, in seconds."""


async def record(
    services: Sequence[str],
    clock: Compression,
    demand: dict[str, Demand],
    work: Path,
    *,
    scrape_s: float = 1.0,
    seed: int = 7,
) -> Recording:
    """Start the servers and a scraping Prometheus, run the load, read back the raw counters."""
    ports = {name: free_port() for name in services}
    ops = {name: free_port() for name in services}
    async with contextlib.AsyncExitStack() as stack:
        for name in services:
            command = ours_command(name, ports[name], cpu_threads=1, metrics_port=ops[name])
            await stack.enter_async_context(server(name, command, ports[name], work))
        url = stack.enter_context(running_prometheus(work / "live", scrape_config(ops, scrape_s)))
        await asyncio.sleep(3 * scrape_s)  # a first scrape of every target before the load
        makers = request_makers(ports, work)
        run_start = time.time()
        tallies = await generate(makers, demand, clock, seed)
        run_end = time.time()
        # The last answers are scraped within a few intervals (later on a loaded machine);
        # a count the servers lost never comes, and the summary shows the difference.
        deadline = time.monotonic() + 20 * scrape_s
        while True:
            await asyncio.sleep(2 * scrape_s)
            counters = await recorded_counters(url, time.time() - run_start + 10 * scrape_s)
            if _counted_all(counters, tallies) or time.monotonic() > deadline:
                break
        scrapes = await scrape_health(url, time.time() - run_start)
    return Recording(counters, tallies, run_start, run_end, scrapes)


def summarize(recording: Recording) -> dict[str, Any]:
    """Per service: what was sent, what the servers counted, how fast the served requests went."""
    out: dict[str, Any] = {}
    for name, tally in recording.tallies.items():
        counted = {
            outcome: int(series.values[-1])
            for (service, outcome), series in recording.counters.items()
            if service == name and len(series.values) and series.values[-1]
        }
        ok = sorted(tally.seconds_ok)
        out[name] = {
            "sent": sum(tally.outcomes.values()),
            "not_sent": tally.not_sent,
            "client_outcomes": dict(tally.outcomes),
            "server_counted": counted,
            "ok_latency_s": {
                "p50": round(statistics.median(ok), 3) if ok else None,
                "p95": round(ok[int(0.95 * (len(ok) - 1))], 3) if ok else None,
            },
        }
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    services = tuple(s.strip() for s in args.services.split(",") if s.strip())
    clock = Compression(START, args.days, args.minutes * 60.0)
    demand = demands(services, args.peak, math.ceil(args.days), args.seed)
    window_s = int(args.rate_window.removesuffix("h")) * 3600
    if window_s < 3 * clock.factor:
        raise SystemExit(
            f"--rate-window {args.rate_window} holds fewer than 3 scrapes: one 1 s scrape is "
            f"{clock.factor:.0f} s of calendar; play the days over more minutes or widen the window"
        )
    with tempfile.TemporaryDirectory(prefix="sw-recorded-") as tmp:
        work = Path(tmp)
        recording = await record(services, clock, demand, work, seed=args.seed)
        (work / "backfill").mkdir()
        text = stretch(recording.counters, recording.run_start, clock)
        with prometheus_backfilled(text, work / "backfill") as url:
            scores = await score(
                url, demand, clock, step_s=args.step, rate_window=args.rate_window, window_s=window_s
            )
    return {
        "what": "forecast at +1 h on request counters scraped live from our servers under load, "
        "stretched onto the calendar and backfilled into a second Prometheus",
        "calendar": {"start": START.isoformat(), "days": args.days},
        "wall_clock_s": round(recording.run_end - recording.run_start, 1),
        "compression": round(clock.factor, 1),
        "peak_arrivals_per_s": args.peak,
        "scrape_interval_s": 1.0,
        "backtest_step_s": args.step,
        "rate_window": args.rate_window,
        "load": summarize(recording),
        "scrapes": recording.scrapes,
        "backtest": scores,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--services", default="asr,handle,tts")
    parser.add_argument("--days", type=float, default=9.0, help="calendar days played (≥ 8: a week + 1)")
    parser.add_argument("--minutes", type=float, default=35.0, help="wall-clock minutes they are played in")
    parser.add_argument("--peak", type=float, default=40.0, help="arrivals/s per service at the peak")
    parser.add_argument("--step", type=int, default=900, help="backtest step, calendar seconds")
    parser.add_argument("--rate-window", default="1h", help="rate window on the calendar (hours)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "recorded-traffic.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    report = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
