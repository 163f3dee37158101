"""A real Prometheus scrapes a real ``superwhisper tts`` process with the shipped configuration.

Debian's ``prometheus`` (installed by ``scripts/setup.sh --test``) runs on loopback
with a scrape config derived from ``config/prometheus/prometheus.yml`` (same job
names, every target rewritten to the test server, 1 s intervals) and the shipped
``alerts.yml``. After a few French ``synthesize`` requests, PromQL over the HTTP
API returns the request counter and a latency quantile; the alert rules evaluate
without error and stay quiet on a healthy server; every dashboard query runs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml
from wyoming.client import AsyncTcpClient
from wyoming.event import Event

from tests.unit.test_observability_config import (
    ALERTS,
    SCRAPE_CONFIG,
    dashboard,
    dashboard_queries,
    grafana_to_promql,
)
from wyoming_superwhisper.runtime.metrics import STAGES

_LOGGER = logging.getLogger(__name__)

PROMETHEUS = "/usr/bin/prometheus"
SUPERWHISPER = Path(sys.executable).with_name("superwhisper")
JOB = "superwhisper-tts"
"""The shipped job for a separate TTS process (ops port 9303); the test server stands in for it."""

SENTENCES = (
    "Bonjour, il fait beau aujourd'hui à Paris.",
    "La lumière du salon est allumée.",
    "Il est dix-huit heures et quart.",
)

TTS_PANELS = {
    "Ops endpoints",
    "Services ready",
    "Requests per second",
    "Version",
    "Latency per stage (p95)",
    "Latency per stage (p50)",
    "Time to first answer by fallback level (p95)",
    "Throughput",
    "Outcomes",
    "Success / fallback / error share",
    "Fallback level share",
    "Engine attempts",
    "Active connections",
    "Model load seconds",
    "Resident memory (RSS)",
    "CPU",
}
"""Dashboard panels a healthy TTS server fills after a few requests (the others need ASR,
handle, a GPU or a failure)."""

pytestmark = pytest.mark.skipif(
    not Path(PROMETHEUS).exists(), reason="prometheus missing (Debian package; scripts/setup.sh --test)"
)

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _http_ok(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    """Poll ``url`` until it answers 200; fail with the process log if it dies or never does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{log.stem} exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        if _http_ok(url):
            return
        time.sleep(0.3)
    pytest.fail(f"{url} not ready after {timeout_s} s:\n{log.read_text()[-4000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@dataclass
class TtsProcess:
    wyoming_port: int
    ops_port: int


@pytest.fixture(scope="module")
def tts_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TtsProcess]:
    """``superwhisper tts`` as a user runs it, on loopback ports."""
    if not SUPERWHISPER.exists():
        pytest.fail(f"{SUPERWHISPER} missing: install the package (pip install -e .)")
    server = TtsProcess(free_port(), free_port())
    log = tmp_path_factory.mktemp("tts") / "tts.log"
    command = [
        str(SUPERWHISPER),
        "tts",
        "--uri",
        f"tcp://127.0.0.1:{server.wyoming_port}",
        "--metrics-port",
        str(server.ops_port),
        "--set",
        "metrics.host=127.0.0.1",
        "--no-zeroconf",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_http(f"http://127.0.0.1:{server.ops_port}/readyz", process, log, timeout_s=180)
        yield server
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory, tts_server: TtsProcess) -> Iterator[str]:
    """A real Prometheus with the shipped jobs and rules; returns its base URL."""
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load(SCRAPE_CONFIG.read_text(encoding="utf-8"))
    config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    shutil.copy(ALERTS, work / ALERTS.name)
    config["rule_files"] = [str(work / ALERTS.name)]
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{tts_server.ops_port}"]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    log = work / "prometheus.log"
    command = [
        PROMETHEUS,
        f"--config.file={work / 'prometheus.yml'}",
        f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        _wait_http(f"http://127.0.0.1:{port}/-/ready", process, log, timeout_s=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(process)


# --- helpers ------------------------------------------------------------------------------


async def query(base: str, promql: str) -> list[dict[str, Any]]:
    """Instant query over the HTTP API; the vector of results (fails on a PromQL error)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{base}/api/v1/query", params={"query": promql}) as answer,
    ):
        body = await answer.json()
    assert body["status"] == "success", f"{promql}: {body}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def api(base: str, path: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(f"{base}{path}") as answer:
        body = await answer.json()
    assert body["status"] == "success", body
    return body["data"]


async def eventually(check: Callable[[], Awaitable[T | None]], what: str, timeout_s: float = 30.0) -> T:
    """Re-run ``check`` until it returns a value (scrapes are 1 s apart); fail after the timeout."""
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while time.monotonic() < deadline:
        last = await check()
        if last is not None:
            return last
        await asyncio.sleep(0.5)
    pytest.fail(f"Prometheus never showed {what} within {timeout_s} s")


def shipped_jobs() -> list[str]:
    config = yaml.safe_load(SCRAPE_CONFIG.read_text(encoding="utf-8"))
    return [job["job_name"] for job in config["scrape_configs"]]


async def all_targets_up(base: str) -> None:
    async def up() -> dict[str, float] | None:
        values = {r["metric"]["job"]: float(r["value"][1]) for r in await query(base, "up")}
        return values if values == dict.fromkeys(shipped_jobs(), 1.0) else None

    await eventually(up, "up == 1 for every shipped job")


async def synthesize(port: int, text: str) -> int:
    """One French request as Home Assistant sends it; returns the bytes of audio received."""
    audio = 0
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Event("synthesize", {"text": text}))
        while True:
            event = await asyncio.wait_for(client.read_event(), 60)
            assert event is not None, "server closed the connection before audio-stop"
            assert event.type != "error", event.data
            if event.type == "audio-chunk":
                audio += len(event.payload or b"")
            if event.type == "audio-stop":
                return audio


async def served_requests(ops_port: int) -> float:
    """The server's own count of TTS requests, read from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{ops_port}/metrics") as answer,
    ):
        text = await answer.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "superwhisper_requests_total" and sample.labels.get("service") == "tts"
    )


# --- tests ------------------------------------------------------------------------------------


async def test_every_shipped_job_scrapes_the_ops_server(prometheus: str) -> None:
    await all_targets_up(prometheus)
    ready = await query(prometheus, f'superwhisper_ready{{job="{JOB}"}}')
    assert [(r["metric"]["service"], r["value"][1]) for r in ready] == [("tts", "1")]


@dataclass
class Traffic:
    served: float
    """The server's own count of TTS requests after the traffic."""


async def _send_traffic(prometheus: str, server: TtsProcess) -> Traffic:
    await all_targets_up(prometheus)
    before = await served_requests(server.ops_port)
    # A labelled series is born with its first observation: let Prometheus scrape it
    # once, so that rate() sees the next requests as an increase.
    assert await synthesize(server.wyoming_port, SENTENCES[0]) > 0
    stage = f'superwhisper_stage_seconds_count{{job="{JOB}", service="tts", stage="first_audio"}}'

    async def stage_seen() -> bool | None:
        return bool(await query(prometheus, stage)) or None

    await eventually(stage_seen, "the tts first_audio series")
    for text in SENTENCES:
        assert await synthesize(server.wyoming_port, text) > 0
    served = await served_requests(server.ops_port)
    assert served >= before + len(SENTENCES) + 1
    return Traffic(served)


@pytest.fixture(scope="module")
def traffic(prometheus: str, tts_server: TtsProcess) -> Traffic:
    """A few French requests, sent once for the module after Prometheus has a first sample."""
    return asyncio.run(_send_traffic(prometheus, tts_server))


async def test_requests_show_up_as_counter_and_latency_quantile(prometheus: str, traffic: Traffic) -> None:
    served = traffic.served

    async def counter() -> float | None:
        result = await query(prometheus, f'sum(superwhisper_requests_total{{job="{JOB}", service="tts"}})')
        value = float(result[0]["value"][1]) if result else None
        return value if value == served else None

    assert await eventually(counter, f"superwhisper_requests_total == {served}") == served
    answered = await query(
        prometheus, f'sum(superwhisper_requests_total{{job="{JOB}", service="tts", outcome=~"ok|fallback"}})'
    )
    assert float(answered[0]["value"][1]) >= len(SENTENCES)

    quantile = (
        "histogram_quantile(0.95, sum by (le) (rate(superwhisper_stage_seconds_bucket"
        f'{{job="{JOB}", service="tts", stage="first_audio"}}[1m])))'
    )

    async def p95() -> float | None:
        result = await query(prometheus, quantile)
        value = float(result[0]["value"][1]) if result else math.nan
        return value if math.isfinite(value) else None

    seconds = await eventually(p95, "a finite p95 of tts first_audio")
    _LOGGER.info("Prometheus: %s tts requests, p95 first audio %.3f s", served, seconds)
    assert 0 < seconds <= 30, seconds


async def test_alert_rules_evaluate_and_stay_quiet_on_a_healthy_server(prometheus: str) -> None:
    await all_targets_up(prometheus)

    async def evaluated() -> list[dict[str, Any]] | None:
        groups = (await api(prometheus, "/api/v1/rules"))["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        done = rules and all(rule["lastEvaluation"] > "0001-01-01T00:00:00Z" for rule in rules)
        return rules if done else None

    rules = await eventually(evaluated, "an evaluation of every alert rule")
    shipped = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"][0]["rules"]
    assert {r["name"] for r in rules} == {r["alert"] for r in shipped}
    assert {r["name"]: (r["health"], r.get("lastError", "")) for r in rules} == {
        r["alert"]: ("ok", "") for r in shipped
    }
    active = [a["labels"]["alertname"] for a in (await api(prometheus, "/api/v1/alerts"))["alerts"]]
    assert "SuperwhisperServerDown" not in active
    assert "SuperwhisperNotReady" not in active


async def test_every_dashboard_query_runs(prometheus: str, traffic: Traffic) -> None:
    empty = []
    for where, expr in dashboard_queries(dashboard()):
        promql = grafana_to_promql(expr)
        try:
            result = await query(prometheus, promql)
        except AssertionError as error:
            pytest.fail(f"{where}: {error}")
        if not [r for r in result if math.isfinite(float(r["value"][1]))]:
            empty.append(where)
    _LOGGER.info("dashboard queries without data on a TTS server: %s", empty)
    unfilled = {title for title in TTS_PANELS if any(w.startswith(f"panel {title!r}") for w in empty)}
    assert not unfilled, f"panels without data after TTS traffic: {sorted(unfilled)}"
    rss = await query(prometheus, f'process_resident_memory_bytes{{job="{JOB}"}}')
    assert rss and float(rss[0]["value"][1]) > 10 * 1024**2


async def test_every_stage_the_server_reports_is_declared(prometheus: str, traffic: Traffic) -> None:
    """Dashboards and alerts select stages by the names in runtime/metrics.py STAGES."""

    async def stages() -> set[str] | None:
        result = await query(
            prometheus, f'count by (stage) (superwhisper_stage_seconds_count{{job="{JOB}"}})'
        )
        found = {r["metric"]["stage"] for r in result}
        return found or None

    reported = await eventually(stages, "a stage of the tts server")
    assert reported <= set(STAGES["tts"]), f"stages not in STAGES['tts']: {reported - set(STAGES['tts'])}"


async def test_tts_real_time_factor_reaches_prometheus(prometheus: str, traffic: Traffic) -> None:
    """The dashboard's RTF panel reads this series: the TTS server must really record it."""

    async def rtf() -> list[dict[str, object]] | None:
        result = await query(prometheus, f'sum(superwhisper_tts_real_time_factor_count{{job="{JOB}"}})')
        return result if result and float(result[0]["value"][1]) > 0 else None  # type: ignore[index]

    assert await eventually(rtf, "superwhisper_tts_real_time_factor samples")
