"""The Kubernetes manifests, rendered by ``kubectl kustomize`` and checked as far as no cluster allows.

Every overlay renders; every built-in object validates against the Kubernetes
schemas (``kubernetes-validate``), KEDA ScaledObjects and ServiceMonitors
against their CRDs' schemas (tests/data, copied from the upstream CRDs); and
what matters is asserted: probes, ports, GPU requests, autoscaler queries that
name metrics the servers really export, settings the servers really accept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from wyoming_superwhisper.config import load_settings
from wyoming_superwhisper.forecast import ForecastMetrics
from wyoming_superwhisper.runtime.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
DATA = ROOT / "tests" / "data"
OVERLAYS = ("cpu", "gpu", "cpu-hpa")
SERVERS = ("asr", "handle", "tts")
KUBECTL = shutil.which("kubectl")
KUBERNETES_VERSION = "1.32.0"

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl (Debian package) not installed")


def render(path: Path) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    out = subprocess.run([KUBECTL, "kustomize", str(path)], check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: render(KUBE / "overlays" / overlay) for overlay in OVERLAYS}


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for obj in objects:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise AssertionError(f"no {kind} {name}")


def server_container(objects: list[dict[str, Any]], server: str) -> dict[str, Any]:
    deployment = find(objects, "Deployment", f"superwhisper-{server}")
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == server]
    return container


def default_port(server: str) -> int:
    uri = getattr(load_settings(environ={}), server).uri
    return int(uri.rsplit(":", 1)[1])


# --- schemas ---------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_objects_validate_against_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    builtin = [
        o for o in rendered[overlay] if not o["apiVersion"].startswith(("keda.sh/", "monitoring.coreos"))
    ]
    kinds = {o["kind"] for o in builtin}
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "PersistentVolumeClaim"} <= kinds
    for obj in builtin:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def crd_validator(name: str) -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((DATA / name).read_text())["openAPIV3Schema"]
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_scaled_objects_validate_against_the_keda_crd(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    validator = crd_validator("keda_scaledobject_schema.json")
    scaled = [o for o in rendered[overlay] if o["kind"] == "ScaledObject"]
    assert sorted(o["metadata"]["name"] for o in scaled) == [f"superwhisper-{s}" for s in sorted(SERVERS)]
    for obj in scaled:
        errors = [e.message for e in validator.iter_errors(obj)]
        assert errors == [], obj["metadata"]["name"]
    # The schema really checks something: a ScaledObject without its target is refused.
    broken = json.loads(json.dumps(scaled[0]))
    del broken["spec"]["scaleTargetRef"]
    assert list(validator.iter_errors(broken))


def test_service_monitor_component_renders_and_validates(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                # kustomize takes relative paths only.
                "resources": [os.path.relpath(KUBE / "overlays" / "cpu", tmp_path)],
                "components": [os.path.relpath(KUBE / "components" / "servicemonitor", tmp_path)],
            }
        )
    )
    objects = render(tmp_path)
    validator = crd_validator("servicemonitor_schema.json")
    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
    assert len(monitors) == 2
    for monitor in monitors:
        assert list(validator.iter_errors(monitor)) == []
    # Each monitor selects Services that have the port it scrapes.
    services = [o for o in objects if o["kind"] == "Service"]
    for monitor in monitors:
        port = monitor["spec"]["endpoints"][0]["port"]
        selected = [s for s in services if _selects(monitor["spec"]["selector"], s["metadata"]["labels"])]
        assert selected
        assert all(port in {p["name"] for p in s["spec"]["ports"]} for s in selected)


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        if expr["operator"] == "In" and labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


# --- what matters ----------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("server", SERVERS)
def test_ports_probes_and_security(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, server: str
) -> None:
    objects = rendered[overlay]
    container = server_container(objects, server)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"wyoming": default_port(server), "ops": load_settings(environ={}).metrics.port}
    assert container["args"][:3] == [server, "--uri", f"tcp://0.0.0.0:{default_port(server)}"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}
    assert container["resources"]["requests"] and container["resources"]["limits"]
    deployment = find(objects, "Deployment", f"superwhisper-{server}")
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports["ops"])
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["runAsUser"] != 0
    for each in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
        assert each["securityContext"]["allowPrivilegeEscalation"] is False
        assert each["securityContext"]["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "superwhisper-models"
    config_map = find(objects, "ConfigMap", volumes["config"]["configMap"]["name"])
    assert "superwhisper.yaml" in config_map["data"]
    service = find(objects, "Service", f"superwhisper-{server}")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["wyoming"] == default_port(server)
    assert _selects(
        service["spec"]["selector"] and {"matchLabels": service["spec"]["selector"]},
        pod["metadata"]["labels"],
    )
    budget = find(objects, "PodDisruptionBudget", f"superwhisper-{server}")
    assert _selects(budget["spec"]["selector"], pod["metadata"]["labels"])


def _gpu_requests(objects: list[dict[str, Any]]) -> dict[str, Any]:
    found = {}
    for obj in objects:
        if obj["kind"] != "Deployment":
            continue
        for container in obj["spec"]["template"]["spec"]["containers"]:
            limits = container.get("resources", {}).get("limits", {})
            if "nvidia.com/gpu" in limits:
                found[container["name"]] = limits["nvidia.com/gpu"]
    return found


def test_gpu_requested_only_in_the_gpu_overlay(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert _gpu_requests(rendered["cpu"]) == {}
    assert _gpu_requests(rendered["cpu-hpa"]) == {}
    assert "nvidia.com" not in yaml.safe_dump_all(rendered["cpu"])
    assert _gpu_requests(rendered["gpu"]) == {"asr": 1, "handle": 1}
    for server in ("asr", "handle"):
        pod = find(rendered["gpu"], "Deployment", f"superwhisper-{server}")["spec"]["template"]["spec"]
        assert "nvidia.com/gpu.product" in pod["nodeSelector"]
        env = {e["name"]: e["value"] for e in server_container(rendered["gpu"], server)["env"]}
        assert env["SUPERWHISPER_GPU__DEVICE"] == "auto"
        assert env["SUPERWHISPER_GPU__ON_MISMATCH"] == "fail"
        # The node label and the guard's policy name the same card.
        assert (
            env["SUPERWHISPER_GPU__REQUIRE_NAME"].replace(" ", "-")
            in pod["nodeSelector"]["nvidia.com/gpu.product"]
        )
    tts = find(rendered["gpu"], "Deployment", "superwhisper-tts")["spec"]["template"]["spec"]
    assert "nodeSelector" not in tts


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_settings_are_accepted_by_the_servers(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, tmp_path: Path
) -> None:
    objects = rendered[overlay]
    for server in SERVERS:
        container = server_container(objects, server)
        env = {e["name"]: e["value"] for e in container["env"]}
        deployment = find(objects, "Deployment", f"superwhisper-{server}")
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        config_map = find(objects, "ConfigMap", volumes["config"]["configMap"]["name"])
        config = tmp_path / "superwhisper.yaml"
        config.write_text(config_map["data"]["superwhisper.yaml"])
        assert env["SUPERWHISPER_CONFIG"] == "/etc/superwhisper/superwhisper.yaml"
        settings_env = {k: v for k, v in env.items() if "__" in k}
        settings = load_settings(config, environ=settings_env)
        assert settings.zeroconf.enabled is False
        assert settings.metrics.port == 9300
        assert settings.models.environment == "prod"
        if "SUPERWHISPER_HANDLE__MEMORY" in settings_env:
            assert settings.handle.memory.startswith("redis://")


# --- autoscaler queries name metrics that exist ------------------------------------------


def exported_series() -> dict[str, set[str]]:
    """Every sample name the servers and the forecaster export, with its label names."""
    metrics = Metrics(CollectorRegistry())
    for service in SERVERS:
        metrics.count(service, "ok")
        metrics.active_connections.labels(service).set(0)
        metrics.queue_depth.labels(service).set(0)
        metrics.ready.labels(service).set(1)
    forecast = ForecastMetrics(CollectorRegistry())
    forecast.value.labels("asr", "15m").set(1)
    forecast.lower.labels("asr", "15m").set(1)
    forecast.upper.labels("asr", "15m").set(1)
    names: dict[str, set[str]] = {}
    for registry in (metrics.registry, forecast.registry):
        for family in registry.collect():
            for sample in family.samples:
                names.setdefault(sample.name, set()).update(sample.labels)
    return names


SELECTOR = re.compile(r"(superwhisper_[a-z_]+)(?:\{([^}]*)\})?")


def check_query(query: str, exported: dict[str, set[str]], server: str) -> list[str]:
    used = SELECTOR.findall(query)
    assert used, f"no superwhisper metric in {query!r}"
    for name, matchers in used:
        assert name in exported, f"{name} is not exported (query {query!r})"
        labels = dict(re.findall(r'(\w+)\s*=~?\s*"([^"]*)"', matchers))
        assert set(labels) <= exported[name], f"{name} has no label {set(labels) - exported[name]}"
        assert labels.get("service") == server, query
    return [name for name, _ in used]


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_scaled_object_queries_name_exported_metrics(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    exported = exported_series()
    for server in SERVERS:
        scaled = find(rendered[overlay], "ScaledObject", f"superwhisper-{server}")
        assert scaled["spec"]["scaleTargetRef"]["name"] == f"superwhisper-{server}"
        assert 1 <= scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]
        assert scaled["spec"]["cooldownPeriod"] > 0
        triggers = {t["name"]: t for t in scaled["spec"]["triggers"]}
        assert set(triggers) == {"live-load", "forecast"}
        for trigger in triggers.values():
            assert trigger["type"] == "prometheus"
            assert float(trigger["metadata"]["threshold"]) > 0
        live = check_query(triggers["live-load"]["metadata"]["query"], exported, server)
        assert "superwhisper_active_connections" in live and "superwhisper_queue_depth" in live
        ahead = check_query(triggers["forecast"]["metadata"]["query"], exported, server)
        assert ahead == ["superwhisper_forecast_requests_per_minute_upper"]
        assert 'horizon="15m"' in triggers["forecast"]["metadata"]["query"]


def test_hpa_variant_names_exported_metrics(rendered: dict[str, list[dict[str, Any]]]) -> None:
    exported = exported_series()
    objects = rendered["cpu-hpa"]
    assert not [o for o in objects if o["kind"] == "ScaledObject"]
    for server in SERVERS:
        hpa = find(objects, "HorizontalPodAutoscaler", f"superwhisper-{server}")
        assert hpa["spec"]["scaleTargetRef"]["name"] == f"superwhisper-{server}"
        for metric in hpa["spec"]["metrics"]:
            if metric["type"] in ("Pods", "External"):
                spec = metric[metric["type"].lower()]["metric"]
                assert spec["name"] in exported
                labels = spec["selector"]["matchLabels"]
                assert set(labels) <= exported[spec["name"]]
                assert labels["service"] == server
    rules = yaml.safe_load((KUBE / "components" / "hpa" / "prometheus-adapter-rules.yaml").read_text())
    for rule in rules["custom"] + rules["external"]:
        assert rule["name"]["as"] in exported


def test_memory_is_shared_by_the_handle_replicas(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay in OVERLAYS:
        env = {e["name"]: e["value"] for e in server_container(rendered[overlay], "handle")["env"]}
        url = env["SUPERWHISPER_HANDLE__MEMORY"]
        host, port = re.match(r"redis://([^:/]+):(\d+)/", url).groups()  # type: ignore[union-attr]
        redis_service = find(rendered[overlay], "Service", host)
        assert int(port) in {p["port"] for p in redis_service["spec"]["ports"]}


def test_dockerfile_runs_as_non_root_and_exposes_the_server_ports() -> None:
    text = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    exposed = {int(p) for line in re.findall(r"^EXPOSE\s+(.+)$", text, re.M) for p in line.split()}
    settings = load_settings(environ={})
    assert exposed == {default_port(s) for s in SERVERS} | {settings.metrics.port}
    assert re.search(r'^ENTRYPOINT \["superwhisper"\]', text, re.M)
