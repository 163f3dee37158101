"""Every Prometheus metric of the project, defined once.

Names start with ``superwhisper_``; latencies are histograms in seconds; the
``fallback_level`` label says which level of a chain answered. Metrics take a
``registry`` so that tests (and several services in one process) never
collide. GPU series come from NVML and are absent, not faked, without a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .. import __version__
from .fallback import Attempt, CircuitState
from .gpu import GpuDecision, read_telemetry

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
CIRCUIT_VALUE = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}

REQUEST_OUTCOMES = ("ok", "fallback", "error", "busy", "rejected_input")

STAGES = {
    "asr": ("audio_stop_to_transcript", "endpoint_to_transcript", "decode"),
    "handle": ("first_chunk", "generation"),
    "tts": ("first_audio", "synthesis"),
}
"""Stage names of ``superwhisper_stage_seconds`` per service (dashboards and alerts use them)."""


class Metrics:
    """The project's metrics on one registry; also the chains' observer."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.build_info = Info("superwhisper_build", "Version of the running server", registry=r)
        self.build_info.info({"version": __version__})
        self.requests = Counter(
            "superwhisper_requests_total",
            "Requests answered, by service and outcome (ok, fallback, error, busy, rejected_input)",
            ["service", "outcome"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "superwhisper_stage_seconds",
            "Latency of one stage of a request, in seconds (e.g. asr audio_stop_to_transcript, "
            "asr decode, handle first_chunk, tts first_audio)",
            ["service", "stage", "fallback_level"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.engine_attempts = Counter(
            "superwhisper_engine_attempts_total",
            "Tries of one chain level, by engine and outcome",
            ["service", "engine", "outcome"],
            registry=r,
        )
        self.engine_crashes = Counter(
            "superwhisper_engine_crashes_total",
            "Deaths of an engine's worker process, by chain level and signal (SIGSEGV, SIGABRT, "
            "SIGKILL...; hang: killed for not stopping; exit:N: exited)",
            ["service", "level", "signal"],
            registry=r,
        )
        self.fallbacks = Counter(
            "superwhisper_fallback_activations_total",
            "Requests that moved down a chain, by from-level, to-level and reason",
            ["service", "from_level", "to_level", "reason"],
            registry=r,
        )
        self.circuit_state = Gauge(
            "superwhisper_circuit_state",
            "Circuit breaker of each engine: 0 closed, 1 half-open, 2 open",
            ["service", "engine"],
            registry=r,
        )
        self.model_load_seconds = Gauge(
            "superwhisper_model_load_seconds",
            "Seconds the last load of each engine took",
            ["service", "engine"],
            registry=r,
        )
        self.active_connections = Gauge(
            "superwhisper_active_connections", "Open client connections", ["service"], registry=r
        )
        self.queue_depth = Gauge(
            "superwhisper_queue_depth", "Requests waiting for an engine", ["service"], registry=r
        )
        self.protocol_errors = Counter(
            "superwhisper_protocol_errors_total",
            "Connections closed for a protocol violation, by code",
            ["service", "code"],
            registry=r,
        )
        self.speculative = Counter(
            "superwhisper_asr_speculative_total",
            "Speculative decodes by result: hit (used as the answer) or miss (speech resumed)",
            ["result"],
            registry=r,
        )
        self.endpoint_decisions = Counter(
            "superwhisper_asr_endpoint_decisions_total",
            "Semantic endpointing verdicts at a pause: complete (answered at once), incomplete "
            "(waiting, up to asr.endpointing_s), stale (speech resumed before the verdict)",
            ["decision", "reason"],
            registry=r,
        )
        self.local_intents = Counter(
            "superwhisper_handle_local_intents_total",
            "Home requests answered from Home Assistant's sentence templates without a model, by "
            "reason (intent: a matched command; follow_up: a pronoun; confirmation, state: the words "
            "after a tool result; not_understood: a command nothing matched and no level may act; "
            "state_unknown: a question about a device's state that no level may read; clock: the "
            "time or the date asked, answered from the clock)",
            ["reason"],
            registry=r,
        )
        self.home_actions = Counter(
            "superwhisper_handle_home_actions_total",
            "Home actions of the Wyoming handle, by path (mcp: run through Home Assistant's MCP "
            "server; intent: handed to a Wyoming 1.9 client as an intent event) and outcome (ok, "
            "tool_error, unreachable, unauthorized, not_configured, timeout, protocol)",
            ["path", "outcome"],
            registry=r,
        )
        self.tokens_per_second = Histogram(
            "superwhisper_handle_tokens_per_second",
            "LLM generation speed of one answer, in tokens per second",
            ["fallback_level"],
            buckets=(1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 400),
            registry=r,
        )
        self.tts_cache = Counter(
            "superwhisper_tts_cache_total",
            "Segments the TTS looked up in its audio cache (tts.cache_mb): hit (sent without "
            "synthesis), miss (synthesized for an answer) or prepared (synthesized in advance, "
            "offered by another service of the process)",
            ["result"],
            registry=r,
        )
        self.real_time_factor = Histogram(
            "superwhisper_tts_real_time_factor",
            "Synthesis seconds per second of audio produced (lower is faster)",
            ["fallback_level"],
            buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0),
            registry=r,
        )
        self.gpu_hygiene = Counter(
            "superwhisper_gpu_hygiene_events_total",
            "GPU memory above the high watermark: caches freed or an engine unloaded",
            ["action"],
            registry=r,
        )
        self.vram_delta = Histogram(
            "superwhisper_gpu_request_vram_delta_bytes",
            "Change of GPU memory in use across one request (NVML), in bytes",
            ["service"],
            buckets=(-1e9, -1e8, -1e7, 0, 1e7, 1e8, 1e9, 4e9),
            registry=r,
        )
        self.throttled = Counter(
            "superwhisper_events_throttled_total",
            "Times a connection's reading was slowed by server.max_events_per_second",
            ["service"],
            registry=r,
        )
        self.ready = Gauge(
            "superwhisper_ready", "1 when the service has a healthy chain level", ["service"], registry=r
        )
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

    # ChainObserver
    def on_attempt(self, service: str, attempt: Attempt) -> None:
        self.engine_attempts.labels(service, attempt.engine, attempt.outcome.value).inc()

    def on_fallback(self, service: str, from_level: int, to_level: int, reason: str) -> None:
        self.fallbacks.labels(service, str(from_level), str(to_level), reason).inc()

    def on_circuit(self, service: str, engine: str, state: CircuitState) -> None:
        self.circuit_state.labels(service, engine).set(CIRCUIT_VALUE[state])

    def on_load(self, service: str, engine: str, seconds: float) -> None:
        self.model_load_seconds.labels(service, engine).set(seconds)

    def on_crash(self, service: str, engine: str, level: int | str, cause: str) -> None:
        self.engine_crashes.labels(service, str(level), cause).inc()

    def expect_requests(self, service: str) -> None:
        """Create every outcome's series at 0 when a service starts serving.

        A counter series that only appears at its first increment makes
        ``rate()`` and ``increase()`` miss that request: the first ``busy`` of
        a burst would be invisible to the autoscaler and the forecaster.
        """
        for outcome in REQUEST_OUTCOMES:
            self.requests.labels(service, outcome)

    def count(self, service: str, outcome: str) -> None:
        if outcome not in REQUEST_OUTCOMES:
            raise ValueError(f"unknown request outcome {outcome!r}")
        self.requests.labels(service, outcome).inc()

    def observe(self, service: str, stage: str, seconds: float, fallback_level: int = 0) -> None:
        self.stage_seconds.labels(service, stage, str(fallback_level)).observe(seconds)

    def watch_gpu(self, decision: GpuDecision) -> None:
        """Export the pinned GPU's NVML telemetry; nothing at all on the CPU."""
        if decision.gpu is not None:
            self.registry.register(_GpuCollector(decision))


class _GpuCollector(Collector):
    def __init__(self, decision: GpuDecision) -> None:
        assert decision.gpu is not None
        self.gpu = decision.gpu

    def collect(self) -> Iterator[GaugeMetricFamily]:
        telemetry = read_telemetry(self.gpu)
        if telemetry is None:
            return
        labels = ["gpu", "pci_bus_id"]
        values = [self.gpu.name, self.gpu.pci_bus_id]
        for name, doc, value in (
            ("superwhisper_gpu_memory_used_bytes", "GPU memory in use (NVML)", telemetry.used_bytes),
            ("superwhisper_gpu_memory_total_bytes", "GPU memory in all (NVML)", telemetry.total_bytes),
            ("superwhisper_gpu_utilization_percent", "GPU busy share (NVML)", telemetry.utilization_percent),
            ("superwhisper_gpu_temperature_celsius", "GPU temperature (NVML)", telemetry.temperature_c),
        ):
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric(values, value)
            yield family
