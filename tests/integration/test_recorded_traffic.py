"""Traffic recorded from a real server under load reaches the forecaster intact.

``bench/recorded_traffic.py`` scores the forecast on a week recorded this way
(40 minutes of load); this test runs the same code on a short recording. A
real ``superwhisper asr`` and ``tts`` process are scraped every second by a
real Prometheus while the load generator streams French speech to one (in
real time) and sends French ``synthesize`` requests to the other. The
counters that Prometheus recorded are stretched onto the calendar and
backfilled into a second Prometheus. The test checks that nothing is lost or
invented on the way: every request the client saw answered is counted once
by the server, the backfill holds the same totals on the calendar, and the
forecaster's rate query reads a series from it over HTTP.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from bench.recorded_traffic import METRIC, Compression, demands, record, stretch
from bench.scaling_sim import PROMETHEUS, PROMTOOL, prometheus_backfilled
from tests.conftest import requires_espeak
from wyoming_superwhisper.forecast import RATE_QUERY, PrometheusClient, PrometheusError, Series

pytestmark = [
    pytest.mark.slow,
    requires_espeak,
    pytest.mark.skipif(
        PROMETHEUS is None or PROMTOOL is None, reason="Debian package prometheus not installed"
    ),
]

START = datetime(2026, 10, 5, tzinfo=UTC)


def test_stretch_maps_wall_clock_onto_the_calendar_and_keeps_totals() -> None:
    clock = Compression(START, days=1, seconds=100)  # one wall-clock second is 864 s of calendar
    run_start = 1_000.0
    recorded = {
        ("tts", "ok"): Series(np.array([999.0, 1000.0, 1050.0, 1100.0]), np.array([0.0, 0.0, 7.0, 12.0])),
        ("tts", "busy"): Series(np.array([1050.0, 1100.0]), np.array([1.0, 3.0])),
    }
    text = stretch(recorded, run_start, clock)
    lines = [line for line in text.splitlines() if line.startswith(METRIC)]
    ok = [line for line in lines if 'outcome="ok"' in line]
    busy = [line for line in lines if 'outcome="busy"' in line]
    at = START.timestamp()
    assert ok == [  # the scrape before the load is dropped; 50 s of wall clock → 43,200 s
        f'{METRIC}{{outcome="ok",service="tts"}} 0 {int(at)}',
        f'{METRIC}{{outcome="ok",service="tts"}} 7 {int(at + 43_200)}',
        f'{METRIC}{{outcome="ok",service="tts"}} 12 {int(at + 86_400)}',
    ]
    assert busy[-1] == f'{METRIC}{{outcome="busy",service="tts"}} 3 {int(at + 86_400)}'
    assert text.endswith("# EOF\n")


async def test_a_recorded_load_is_counted_once_and_backfilled_whole(tmp_path: Path) -> None:
    clock = Compression(START, days=2, seconds=20)
    demand = demands(["asr", "tts"], peak_per_s=6.0, days=2, seed=3)
    recording = await record(["asr", "tts"], clock, demand, tmp_path)

    for service, tally in recording.tallies.items():
        sent = sum(tally.outcomes.values())
        assert sent >= 15, (service, tally.outcomes)  # ~2.5 per second on average over two days
        assert not [o for o in tally.outcomes if o.startswith("failed")], (service, tally.outcomes)
        counted = {o: int(s.values[-1]) for (name, o), s in recording.counters.items() if name == service}
        assert set(counted) >= {"ok", "busy", "error", "fallback", "rejected_input"}  # there from the start
        counted = {o: n for o, n in counted.items() if n}
        assert (service, counted) == (service, dict(tally.outcomes))  # each answer counted once
    assert {service for service, _ in recording.counters} == {"asr", "tts"}
    assert set(recording.scrapes) == {"superwhisper-asr", "superwhisper-tts"}
    for job, health in recording.scrapes.items():  # a light load: (nearly) every scrape answered
        assert health["up_ratio"] > 0.9 and 0 < health["slowest_scrape_s"] < 1.0, (job, health)
    counted = {o: int(s.values[-1]) for (name, o), s in recording.counters.items() if name == "tts"}

    (tmp_path / "backfill").mkdir()
    with prometheus_backfilled(
        stretch(recording.counters, recording.run_start, clock), tmp_path / "backfill"
    ) as url:
        async with aiohttp.ClientSession() as session:
            client = PrometheusClient(url, session)
            # Answers still arriving after the load stopped are kept, stretched like the rest.
            last_scrape = max(float(series.times[-1]) for series in recording.counters.values())
            end = START.timestamp() + (last_scrape - recording.run_start) * clock.factor + 1
            back = [
                (labels, series)
                for labels, series in await client.samples(
                    f"{METRIC}[{int(end - START.timestamp()) + 60}s]", at=end
                )
                if labels["service"] == "tts"
            ]
            totals = {labels["outcome"]: int(series.values[-1]) for labels, series in back}
            assert totals == counted
            # Every scrape is back, at its wall-clock time mapped onto the calendar.
            for labels, series in back:
                live = recording.counters[("tts", labels["outcome"])]
                kept = live.times >= recording.run_start
                expected = np.round(
                    START.timestamp() + (live.times[kept] - recording.run_start) * clock.factor
                )
                assert np.array_equal(series.times, expected), labels
                assert np.array_equal(series.values, live.values[kept]), labels
            assert START.timestamp() <= min(float(series.times[0]) for _, series in back)
            assert max(float(series.times[-1]) for _, series in back) <= end
            rates = await client.query_range(
                RATE_QUERY.format(window="6h"),
                START.timestamp() + 6 * 3_600,
                START.timestamp() + 2 * 86_400,
                900,
            )
            assert set(rates) == {"asr", "tts"}
            assert len(rates["tts"].times) > 100 and float(rates["tts"].values.max()) > 0
            with pytest.raises(PrometheusError, match="not a range selector"):
                await client.samples(f"sum({METRIC})", at=end)
