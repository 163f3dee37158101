"""The shipped Prometheus and Grafana configuration, checked against the code.

``config/prometheus/alerts.yml`` and the queries of ``config/grafana/superwhisper.json``
must name only metrics, labels and label values the servers really export: the
exported set is read from a real ``Metrics`` registry (runtime/metrics.py) with
every family touched once, plus the NVML GPU series (only NVML itself is faked:
there is no GPU here). promtool (Debian's ``prometheus`` package, installed by
``scripts/setup.sh --test``) checks the rule syntax, the scrape config and the
alert unit tests, and parses every dashboard query as PromQL.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from wyoming_superwhisper.runtime import metrics as metrics_module
from wyoming_superwhisper.runtime.gpu import GpuDecision, GpuDevice, GpuTelemetry
from wyoming_superwhisper.runtime.metrics import REQUEST_OUTCOMES, STAGES, Metrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "config" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
SCRAPE_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARD = ROOT / "config" / "grafana" / "superwhisper.json"

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
requires_promtool = pytest.mark.skipif(
    not Path(PROMTOOL).exists(),
    reason="promtool missing (Debian package prometheus; scripts/setup.sh --test)",
)

SYNTHESIZED = {"up": {"job", "instance"}}
"""Series Prometheus makes itself for every target (no server exports them)."""
TARGET_LABELS = {"job", "instance"}
"""Labels Prometheus attaches to every scraped series."""


# --- what the code exports ----------------------------------------------------------


@dataclass
class Exported:
    """Sample names the servers export, with the label names each carries."""

    labels: dict[str, set[str]] = field(default_factory=dict)

    def add(self, name: str, labels: set[str]) -> None:
        self.labels.setdefault(name, set()).update(labels)


def _touch(metric: MetricWrapperBase) -> None:
    """Make one child of a labelled family exist, so its series appear in the output."""
    labelled = metric.labels(*["x"] * len(metric._labelnames)) if metric._labelnames else metric
    if hasattr(labelled, "observe"):
        labelled.observe(0.1)
    elif hasattr(labelled, "inc"):
        labelled.inc()
    elif hasattr(labelled, "set"):
        labelled.set(1)


@pytest.fixture(scope="module")
def exported() -> Iterator[Exported]:
    """Everything a server's /metrics can contain, GPU series included."""
    metrics = Metrics(CollectorRegistry())
    families = [v for v in vars(metrics).values() if isinstance(v, MetricWrapperBase)]
    assert len(families) >= 10, "Metrics() no longer holds its families as attributes"
    for family in families:
        _touch(family)
    gpu = GpuDevice(0, "NVIDIA GeForce RTX 3090", 24 * 1024**3, "00000000:01:00.0", "GPU-fake")
    with pytest.MonkeyPatch.context() as patch:  # NVML is the one thing this machine cannot have
        patch.setattr(
            metrics_module,
            "read_telemetry",
            lambda device: GpuTelemetry(
                used_bytes=10**9, total_bytes=device.total_bytes, utilization_percent=5.0, temperature_c=40.0
            ),
        )
        metrics.watch_gpu(GpuDecision(device="cuda:0", gpu=gpu, reason="fake GPU for the name check"))
        text = generate_latest(metrics.registry).decode()
    result = Exported()
    for parsed in text_string_to_metric_families(text):
        for sample in parsed.samples:
            result.add(sample.name, set(sample.labels))
    for name, labels in SYNTHESIZED.items():
        result.add(name, labels)
    assert "superwhisper_gpu_memory_used_bytes" in result.labels, "GPU collector exported nothing"
    yield result


# --- a small PromQL reader -------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "and",
    "or",
    "unless",
    "atan2",
    "inf",
    "nan",
}


@dataclass
class Selector:
    metric: str
    matchers: list[tuple[str, str, str]]


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's variables by values Prometheus can parse."""
    expr = re.sub(r"\$\{?__\w+\}?", "1m", expr)  # $__rate_interval, $__interval, $__range
    return re.sub(r"\$\{?\w+(?::\w+)?\}?", ".*", expr)  # $job, ${instance}, ${x:regex}


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (functions, keywords and label lists excluded)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    names = set()
    for match in _IDENT.finditer(text):
        word = match.group(0)
        if word.lower() in KEYWORDS:
            continue
        if match.start() > 0 and (text[match.start() - 1].isdigit() or text[match.start() - 1] == "."):
            continue  # the unit of a duration (5m) or an exponent (1e9)
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        names.add(word)
    return names


def selectors(expr: str) -> list[Selector]:
    """``metric{matchers}`` parts of an expression (matchers with their operator and value)."""
    found = []
    for match in _SELECTOR.finditer(expr):
        name = match.group(1) or ""
        if name.lower() in KEYWORDS or name in {"by", "on"}:
            continue
        found.append(Selector(name, [m.groups() for m in _MATCHER.finditer(match.group(2))]))  # type: ignore[misc]
    return found


def grouping_labels(expr: str) -> set[str]:
    labels: set[str] = set()
    for match in _GROUPING.finditer(_STRING.sub('""', expr)):
        labels.update(part.strip() for part in match.group(2).split(",") if part.strip())
    return labels


# --- the shipped files -----------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    flat = []
    for panel in board["panels"]:
        flat.append(panel)
        flat.extend(panel.get("panels", []))  # panels inside a collapsed row
    return flat


def dashboard_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    queries = []
    for panel in panels(board):
        for target in panel.get("targets", []):
            if target.get("expr"):
                queries.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for variable in board.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        inner = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query)
        queries.append((f"variable {variable['name']}", inner.group(1) if inner else query))
    return queries


def all_queries() -> list[tuple[str, str]]:
    return [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()] + dashboard_queries(dashboard())


def problems(queries: list[tuple[str, str]], exported: Exported) -> list[str]:
    """Every metric, label or label value a query names that the servers do not export."""
    found = []
    known_stages = {stage for stages in STAGES.values() for stage in stages}
    known_values = {"stage": known_stages, "outcome": set(REQUEST_OUTCOMES), "service": set(STAGES)}
    all_labels = set().union(*exported.labels.values()) | TARGET_LABELS
    for where, expr in queries:
        for name in sorted(metric_names(expr)):
            if name not in exported.labels:
                found.append(f"{where}: metric {name} is not exported")
        for selector in selectors(expr):
            allowed = exported.labels.get(selector.metric, set()) | TARGET_LABELS
            for label, op, value in selector.matchers:
                if selector.metric and label not in allowed:
                    found.append(f"{where}: {selector.metric} has no label {label}")
                if label in known_values and op in ("=", "=~"):
                    for alternative in value.split("|") if op == "=~" else [value]:
                        if re.fullmatch(r"\w+", alternative) and alternative not in known_values[label]:
                            found.append(f"{where}: {label}={alternative!r} never exported")
        for label in sorted(grouping_labels(expr) - all_labels):
            found.append(f"{where}: grouping by {label}, which no metric carries")
    return found


# --- promtool ------------------------------------------------------------------------------


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@requires_promtool
def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(ALERTS), cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


@requires_promtool
def test_promtool_unit_tests_of_the_alerts() -> None:
    result = promtool("test", "rules", ALERTS_TEST.name, cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


@requires_promtool
def test_promtool_unit_tests_catch_a_wrong_threshold(tmp_path: Path) -> None:
    """The alert tests can fail: a rule with a lax threshold breaks its firing case."""
    shutil.copy(ALERTS_TEST, tmp_path / ALERTS_TEST.name)
    text = ALERTS.read_text(encoding="utf-8")
    assert "> 0.05" in text
    (tmp_path / ALERTS.name).write_text(text.replace("> 0.05", "> 0.5"), encoding="utf-8")
    result = promtool("test", "rules", ALERTS_TEST.name, cwd=tmp_path)
    assert result.returncode != 0
    assert "SuperwhisperErrorRateHigh" in result.stdout + result.stderr


@requires_promtool
def test_promtool_check_config(tmp_path: Path) -> None:
    """The scrape config and the rule file it names load together (from a copy elsewhere)."""
    for path in (SCRAPE_CONFIG, ALERTS):
        shutil.copy(path, tmp_path / path.name)
    result = promtool("check", "config", str(tmp_path / SCRAPE_CONFIG.name), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


@requires_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query (Grafana variables replaced) as a recording rule."""
    queries = dashboard_queries(dashboard())
    rules = [
        {"record": f"superwhisper:dashboard_query_{i}", "expr": grafana_to_promql(expr)}
        for i, (_, expr) in enumerate(queries)
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    result = promtool("check", "rules", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


# --- names against the code --------------------------------------------------------------


def test_exported_names_include_every_kind_of_series(exported: Exported) -> None:
    for name in (
        "superwhisper_requests_total",
        "superwhisper_stage_seconds_bucket",
        "superwhisper_ready",
        "superwhisper_circuit_state",
        "superwhisper_build_info",
        "process_resident_memory_bytes",
        "superwhisper_gpu_memory_total_bytes",
    ):
        assert name in exported.labels
    assert {"service", "stage", "fallback_level", "le"} <= exported.labels[
        "superwhisper_stage_seconds_bucket"
    ]


def test_alerts_and_dashboard_name_only_exported_metrics(exported: Exported) -> None:
    queries = all_queries()
    assert len(queries) > 20
    assert problems(queries, exported) == []


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("rate(superwhisper_request_total[5m])", "metric superwhisper_request_total is not exported"),
        (
            "superwhisper_gpu_memory_free_bytes / 2",
            "metric superwhisper_gpu_memory_free_bytes is not exported",
        ),
        (
            'histogram_quantile(0.95, sum by (le) (rate(superwhisper_stage_seconds{stage="decode"}[1m])))',
            "metric superwhisper_stage_seconds is not exported",
        ),
        ('superwhisper_stage_seconds_count{stage="time_to_first_token"}', "stage='time_to_first_token'"),
        ('superwhisper_requests_total{outcome=~"ok|timeout"}', "outcome='timeout'"),
        ('superwhisper_queue_depth{engine="piper"}', "superwhisper_queue_depth has no label engine"),
        ("sum by (model) (superwhisper_active_connections)", "grouping by model"),
    ],
)
def test_the_check_catches_what_the_servers_do_not_export(
    exported: Exported, expr: str, expected: str
) -> None:
    found = problems([("case", expr)], exported)
    assert any(expected in problem for problem in found), found


def test_promql_reader() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (service, le) (rate(superwhisper_stage_seconds_bucket"
        '{job=~"$job", stage="decode"}[$__rate_interval]))) > 2 and on (service) '
        "up offset 5m / 1e9 + superwhisper_ready"
    )
    assert metric_names(expr) == {"superwhisper_stage_seconds_bucket", "up", "superwhisper_ready"}
    assert grouping_labels(expr) == {"service", "le"}
    assert selectors(expr)[0].matchers == [("job", "=~", "$job"), ("stage", "=", "decode")]
    assert grafana_to_promql('x{a=~"$job", b=~"${instance}"}[$__rate_interval]') == 'x{a=~".*", b=~".*"}[1m]'


# --- the dashboard --------------------------------------------------------------------


def test_dashboard_is_importable() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    assert board["uid"] and board["title"]
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    assert board["__inputs"][0]["pluginId"] == "prometheus"
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(board):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
    for variable in board["templating"]["list"]:
        assert variable["datasource"]["uid"] == "${DS_PROMETHEUS}"


@pytest.mark.parametrize(
    "needle",
    [
        "histogram_quantile(0.95, sum by (service, stage, le) (rate(superwhisper_stage_seconds_bucket",
        "histogram_quantile(0.5, sum by (service, stage, le) (rate(superwhisper_stage_seconds_bucket",
        "superwhisper_requests_total",
        "fallback_level",
        "superwhisper_queue_depth",
        "superwhisper_active_connections",
        "superwhisper_circuit_state",
        "superwhisper_gpu_memory_used_bytes",
        "superwhisper_gpu_utilization_percent",
        "process_resident_memory_bytes",
        "superwhisper_handle_tokens_per_second_bucket",
        "superwhisper_tts_real_time_factor_bucket",
        "superwhisper_asr_endpoint_decisions_total",
    ],
)
def test_dashboard_shows(needle: str) -> None:
    """What issue 6 asks the dashboard to show: latency per stage, outcomes, load, GPU, RSS…"""
    assert any(needle in expr for _, expr in dashboard_queries(dashboard()))


def test_dashboard_outcome_panels_cover_every_outcome() -> None:
    exprs = [expr for _, expr in dashboard_queries(dashboard())]
    assert any("by (service, outcome)" in e and "outcome=" not in e for e in exprs)


# --- the alerts ------------------------------------------------------------------------

EXPECTED_ALERTS = {
    "SuperwhisperSttLatencyHigh": ("5m", "warning"),
    "SuperwhisperGpuMemoryHigh": ("2m", "critical"),
    "SuperwhisperErrorRateHigh": ("10m", "high"),
    "SuperwhisperFallbackShareHigh": ("10m", "warning"),
    "SuperwhisperServerDown": ("1m", "critical"),
    "SuperwhisperNotReady": ("1m", "critical"),
    "SuperwhisperCircuitOpen": ("5m", "warning"),
}


def test_alert_rules_are_the_ones_asked_for() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert {name: (r["for"], r["labels"]["severity"]) for name, r in rules.items()} == EXPECTED_ALERTS
    for rule in rules.values():
        assert {"summary", "description"} <= set(rule["annotations"])
    assert 'stage="audio_stop_to_transcript"' in rules["SuperwhisperSttLatencyHigh"]["expr"]
    assert "> 2" in rules["SuperwhisperSttLatencyHigh"]["expr"]


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(ALERTS_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert fires == names
    assert quiet == names


# --- the scrape config --------------------------------------------------------------------


def test_scrape_config_covers_every_layout() -> None:
    config = load_yaml(SCRAPE_CONFIG)
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    ports = {
        name: [t.rsplit(":", 1)[1] for c in job["static_configs"] for t in c["targets"]]
        for name, job in jobs.items()
    }
    assert ports == {
        "superwhisper": ["9300"],  # superwhisper serve: one process, one ops port (metrics.port default)
        "superwhisper-asr": ["9301"],
        "superwhisper-handle": ["9302"],
        "superwhisper-tts": ["9303"],
        "superwhisper-addon": ["9300"],
    }
    for name, job in jobs.items():
        assert re.fullmatch(r"superwhisper.*", name), "alerts.yml watches up{job=~'superwhisper.*'}"
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for static in job["static_configs"]:
            assert "service" not in static.get("labels", {}), "would clash with the metrics' service label"


def test_default_ops_port_is_the_one_scraped() -> None:
    from wyoming_superwhisper.config import MetricsSettings

    assert MetricsSettings().port == 9300


def test_scrape_ports_match_the_systemd_units_and_the_addon() -> None:
    """The ports scraped are the ones the shipped units and the add-on really open."""
    units = {
        name: (ROOT / "systemd" / f"superwhisper-{name}.service").read_text(encoding="utf-8")
        for name in ("asr", "handle", "tts")
    }
    for name, port in (("asr", 9301), ("handle", 9302), ("tts", 9303)):
        assert re.search(rf"^ExecStart=.*superwhisper {name}\b.*--metrics-port {port}\b", units[name], re.M)
    addon = load_yaml(ROOT / "addon" / "config.yaml")
    assert "9300/tcp" in addon["ports"]
