"""The systemd units in ``systemd/``: valid for Debian's systemd, hardened, wired together.

``systemd-analyze verify`` checks that every ``ExecStart=`` binary exists, and
the units name the install path ``/opt/superwhisper/.venv`` that does not exist
on a build machine. The test therefore copies the units to a temporary
directory with that prefix rewritten to this checkout's venv (the same files
the install copies, only the prefix differs), so the verification is of the
real units, binary check included.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from wyoming_superwhisper.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
UNIT_DIR = ROOT / "systemd"
INSTALL_PREFIX = "/opt/superwhisper/.venv"
VENV = Path(sys.prefix)
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
requires_systemd = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")

SERVICES = {
    # service: (Wyoming port, ops HTTP port)
    "asr": (10300, 9301),
    "handle": (10400, 9302),
    "tts": (10200, 9303),
}
SECURITY_LEVELS = ("PERFECT", "SAFE", "OK", "MEDIUM", "EXPOSED", "UNSAFE")
ACCEPTED_LEVELS = ("PERFECT", "SAFE", "OK")
"""The issue asks for "OK" or better; measured: 1.6 OK for each unit (systemd 252)."""


def unit_path(service: str) -> Path:
    return UNIT_DIR / f"superwhisper-{service}.service"


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as section → key → values (repeated keys keep every value, in order)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text("utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit.get(section, {}).get(key, [])
    assert len(values) == 1, f"[{section}] {key}: expected one value, got {values}"
    return values[0]


@pytest.fixture
def installed_units(tmp_path: Path) -> Path:
    """The units with the install prefix pointing at this checkout's venv."""
    target = tmp_path / "units"
    target.mkdir()
    for source in [*UNIT_DIR.glob("*.service"), *UNIT_DIR.glob("*.target")]:
        text = source.read_text("utf-8").replace(INSTALL_PREFIX, str(VENV))
        (target / source.name).write_text(text, "utf-8")
    assert (VENV / "bin" / "superwhisper").exists(), "the venv has no superwhisper script (pip install -e .)"
    return target


ALL_UNITS = [*(f"superwhisper-{s}.service" for s in SERVICES), "superwhisper.target"]


@requires_systemd
@pytest.mark.parametrize("name", ALL_UNITS)
def test_systemd_analyze_verify_is_clean(installed_units: Path, name: str) -> None:
    # verify exits 0 even on unknown keys and unparsable values (it only warns),
    # so the test also requires an empty stderr.
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(installed_units / name)],
        capture_output=True,
        text=True,
        cwd=installed_units,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


@requires_systemd
def test_verify_would_catch_a_broken_unit(installed_units: Path) -> None:
    """The check above can fail: a typo in a directive is reported on stderr."""
    assert SYSTEMD_ANALYZE is not None
    broken = installed_units / "superwhisper-asr.service"
    broken.write_text(broken.read_text("utf-8").replace("ProtectSystem=strict", "ProtectSytem=strict"))
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(broken)], capture_output=True, text=True, check=False
    )
    assert "ProtectSytem" in result.stderr


def security_score(output: str) -> tuple[float, str]:
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d) (\w+)", output)
    assert match, output[-500:]
    return float(match.group(1)), match.group(2)


def test_security_score_parser() -> None:
    sample = "→ Overall exposure level for superwhisper-asr.service: 1.8 OK 🙂"
    assert security_score(sample) == (1.8, "OK")
    with pytest.raises(AssertionError):
        security_score("no score here")


@requires_systemd
@pytest.mark.parametrize("service", list(SERVICES))
def test_security_exposure_is_ok_or_better(installed_units: Path, service: str) -> None:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", str(installed_units / unit_path(service).name)],
        capture_output=True,
        text=True,
        check=False,
    )
    score, level = security_score(result.stdout)
    assert level in SECURITY_LEVELS
    assert level in ACCEPTED_LEVELS, f"{service}: exposure {score} {level}"
    assert score < 4.0, f"{service}: exposure {score} {level}"


@pytest.mark.parametrize("service", list(SERVICES))
def test_unit_runs_the_right_server_hardened(service: str) -> None:
    wyoming_port, ops_port = SERVICES[service]
    unit = parse_unit(unit_path(service))
    svc = unit["Service"]

    argv = shlex.split(one(unit, "Service", "ExecStart"))
    assert argv[0] == f"{INSTALL_PREFIX}/bin/superwhisper"
    args = build_parser().parse_args(argv[1:])  # the flags exist in the CLI
    assert args.command == service
    assert args.metrics_port == ops_port
    assert args.uri is None  # default tcp://0.0.0.0:<port>
    assert f"tcp/{wyoming_port}" in unit_path(service).read_text("utf-8").splitlines()[0]

    # identity and writable places
    assert one(unit, "Service", "User") == "superwhisper"
    assert one(unit, "Service", "StateDirectory") == "superwhisper"
    assert one(unit, "Service", "CacheDirectory") == "superwhisper"
    assert "ReadWritePaths" not in svc, "only StateDirectory/CacheDirectory may be writable"
    assert one(unit, "Service", "ProtectSystem") == "strict"
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "ProtectKernelModules", "LockPersonality"):
        assert one(unit, "Service", key) == "yes", key
    assert one(unit, "Service", "CapabilityBoundingSet") == ""
    assert one(unit, "Service", "RestrictAddressFamilies").split() == [
        "AF_INET",
        "AF_INET6",
        "AF_UNIX",
        "AF_NETLINK",
    ]
    assert "@system-service" in svc["SystemCallFilter"]
    assert "MemoryDenyWriteExecute" not in svc  # CTranslate2/oneDNN/CUDA JIT: see the unit's comment

    # devices: closed, NVIDIA only
    assert one(unit, "Service", "DevicePolicy") == "closed"
    assert "PrivateDevices" not in svc
    assert svc["DeviceAllow"], "the GPU must stay reachable"
    for entry in svc["DeviceAllow"]:
        assert "nvidia" in entry.split()[0], entry

    # restart with back-off, but not on a broken configuration (exit 2)
    assert one(unit, "Service", "Restart") == "on-failure"
    assert float(one(unit, "Service", "RestartSec").rstrip("s")) >= 1
    assert one(unit, "Service", "RestartPreventExitStatus") == "2"
    assert int(one(unit, "Unit", "StartLimitBurst")) >= 1
    assert int(one(unit, "Unit", "StartLimitIntervalSec")) >= 60

    # readiness: a bounded poll of this server's /readyz
    post = one(unit, "Service", "ExecStartPost")
    assert f"http://127.0.0.1:{ops_port}/readyz" in post
    assert "deadline" in post and "while time.monotonic() < deadline" in post
    assert int(one(unit, "Service", "TimeoutStartSec")) > 540

    assert one(unit, "Install", "WantedBy") == "superwhisper.target"
    assert one(unit, "Unit", "PartOf") == "superwhisper.target"

    # the TTS keeps said segments across restarts, in its (writable) cache directory
    cache = [e for e in svc["Environment"] if e.startswith("SUPERWHISPER_TTS__CACHE_DIR=")]
    assert cache == (["SUPERWHISPER_TTS__CACHE_DIR=%C/superwhisper/tts-segments"] if service == "tts" else [])


def test_target_pulls_in_every_server() -> None:
    target = parse_unit(UNIT_DIR / "superwhisper.target")
    wants = one(target, "Unit", "Wants").split()
    assert sorted(wants) == sorted(unit_path(s).name for s in SERVICES)
    assert one(target, "Install", "WantedBy") == "multi-user.target"


def test_ops_ports_are_distinct() -> None:
    """One process per unit: each needs its own ops port (9300 is the single-process default)."""
    ports = [SERVICES[s][1] for s in SERVICES]
    assert len(set(ports)) == len(ports) and 9300 not in ports


def test_sysusers_creates_the_unit_user() -> None:
    lines = [
        line.split()
        for line in (UNIT_DIR / "superwhisper.sysusers.conf").read_text("utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0][:2] == ["u", "superwhisper"]


# --- the readiness poll really works ---------------------------------------------------------


def poll_code(service: str) -> str:
    """The Python program of ``ExecStartPost=``, with systemd's ``\\n`` escapes decoded."""
    argv = shlex.split(one(parse_unit(unit_path(service)), "Service", "ExecStartPost"))
    assert argv[0] == f"{INSTALL_PREFIX}/bin/python" and argv[1] == "-c"
    return argv[2].replace("\\n", "\n")


class _Readyz(BaseHTTPRequestHandler):
    not_ready_left = 3
    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        if self.path != "/readyz" or type(self).not_ready_left > 0:
            type(self).not_ready_left -= 1
            self.send_response(503)
        else:
            self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def readyz_server() -> Iterator[ThreadingHTTPServer]:
    _Readyz.not_ready_left, _Readyz.hits = 3, 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Readyz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("service", list(SERVICES))
def test_readiness_poll_waits_for_200(service: str, readyz_server: ThreadingHTTPServer) -> None:
    _, ops_port = SERVICES[service]
    code = poll_code(service).replace(f":{ops_port}/", f":{readyz_server.server_address[1]}/")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert _Readyz.hits == 4  # three 503 answers, then 200


def test_readiness_poll_gives_up(service: str = "asr") -> None:
    """Nothing listening and a short deadline: the poll fails with a message (exit 1)."""
    code = poll_code(service).replace("+ 540", "+ 2").replace(":9301/", ":9/")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "not ready" in result.stderr
