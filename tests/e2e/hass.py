"""Drive a real Home Assistant Core and our servers from the outside, as a user would.

Both run as real subprocesses on 127.0.0.1, each in its own process group so that
stopping one also ends what it started (Home Assistant runs ffmpeg for TTS, our TTS
runs espeak-ng): nothing may outlive a test, even a failed one. Home Assistant is
talked to only through its public APIs (onboarding, ``/auth/token``, the
config-entries flow REST API, the websocket API, the TTS proxy URL): the same calls
its frontend makes, so the test proves what a user's setup does.

Home Assistant lives in its own venv (``.venv-hass``, built by
``scripts/setup_hass.sh``): its wheels need Python 3.13 and pin their own libraries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]
HASS_VENV = REPO / ".venv-hass"
HASS_BIN = HASS_VENV / "bin" / "hass"
SUPERWHISPER_BIN = REPO / ".venv" / "bin" / "superwhisper"

OWNER = {"name": "Camille", "username": "camille", "password": "superwhisper-e2e", "language": "fr"}
"""The owner created by the onboarding users step (a local account; nothing leaves the machine)."""


REQUIRES_HASS = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not HASS_BIN.exists(),
        reason=f"{HASS_BIN} missing: bash scripts/setup_hass.sh builds the Home Assistant venv",
    ),
]
"""``pytestmark`` of every module that starts a real Home Assistant."""


def free_port() -> int:
    """A port free on loopback now (the servers take a fixed port on the command line)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


# --- processes -----------------------------------------------------------------------


@dataclass
class ManagedProcess:
    """A subprocess in its own session; ``stop()`` ends its whole process group."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    started: float = field(default_factory=time.monotonic)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the group (a graceful stop), SIGKILL what is left after ``timeout``."""
        pgid = self.popen.pid  # start_new_session: the leader's pid is the group id
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                self.popen.wait(10)
        # Children that outlived their leader (an ffmpeg, an espeak-ng) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def start_process(name: str, argv: Sequence[str], log_path: Path, cwd: Path | None = None) -> ManagedProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )
    return ManagedProcess(name, popen, log_path)


def wait_http(url: str, process: ManagedProcess, timeout: float, expect: int = 200) -> float:
    """Poll ``url`` until it answers ``expect``; seconds waited. Fails fast if the process dies."""
    start = time.monotonic()
    deadline = start + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(
                f"{process.name} exited with {process.popen.returncode} before {url} answered;"
                f" its log ends with:\n{process.tail()}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == expect:
                    return time.monotonic() - start
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as error:
            last = f"HTTP {error.code}"
            if error.code == expect:
                return time.monotonic() - start
        except OSError as error:
            last = str(error)
        time.sleep(0.25)
    raise TimeoutError(
        f"{url} did not answer {expect} within {timeout:.0f} s ({last}); log:\n{process.tail()}"
    )


# --- our servers ---------------------------------------------------------------------


@dataclass(frozen=True)
class SuperwhisperPorts:
    asr: int
    handle: int
    tts: int
    metrics: int


@dataclass
class SuperwhisperServe:
    process: ManagedProcess
    ports: SuperwhisperPorts

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.metrics}/metrics"

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Seconds until /readyz is 200 (models loaded, start-up smoke requests answered)."""
        return wait_http(f"http://{LOOPBACK}:{self.ports.metrics}/readyz", self.process, timeout)


@contextlib.contextmanager
def superwhisper_serve(log_dir: Path, extra: Sequence[str] = ()) -> Iterator[SuperwhisperServe]:
    """``superwhisper serve``: the three services on loopback ports, the ops HTTP too.

    Yields as soon as the process is started (``wait_ready()`` waits), so that Home
    Assistant can start alongside; the process group is stopped on the way out.
    """
    ports = SuperwhisperPorts(free_port(), free_port(), free_port(), free_port())
    argv = [
        str(SUPERWHISPER_BIN),
        "serve",
        "--no-zeroconf",
        "--metrics-port",
        str(ports.metrics),
        "--set",
        f"metrics.host={LOOPBACK}",
        "--set",
        f"asr.uri=tcp://{LOOPBACK}:{ports.asr}",
        "--set",
        f"handle.uri=tcp://{LOOPBACK}:{ports.handle}",
        "--set",
        f"tts.uri=tcp://{LOOPBACK}:{ports.tts}",
        *extra,
    ]
    process = start_process("superwhisper serve", argv, log_dir / "superwhisper.log", cwd=REPO)
    try:
        yield SuperwhisperServe(process, ports)
    finally:
        process.stop()


def metric_total(metrics_text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus sample over the series whose labels include ``labels``."""
    total = 0.0
    for line in metrics_text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        series, _, value = line.rpartition(" ")
        if all(f'{key}="{val}"' in series for key, val in labels.items()):
            total += float(value)
    return total


async def transcribe_direct(host: str, port: int, pcm: bytes, language: str, rate: int = 16000) -> str:
    """Our ASR's transcript of ``pcm``, asked directly over Wyoming as Home Assistant asks:
    ``transcribe`` with the language, 10 ms chunks, ``audio-stop``. The control run that
    tells whether Home Assistant delivered the audio intact."""
    chunk = rate // 100 * 2
    async with AsyncTcpClient(host, port) as client:
        await client.write_event(Transcribe(language=language).event())
        await client.write_event(AudioStart(rate=rate, width=2, channels=1).event())
        for start in range(0, len(pcm), chunk):
            await client.write_event(
                AudioChunk(rate=rate, width=2, channels=1, audio=pcm[start : start + chunk]).event()
            )
        await client.write_event(AudioStop().event())
        while True:
            event = await asyncio.wait_for(client.read_event(), timeout=60)
            if event is None:
                raise HassError("our ASR closed the connection without a transcript")
            if Transcript.is_type(event.type):
                return Transcript.from_event(event).text
            if Error.is_type(event.type):
                raise HassError(f"our ASR answered an error: {Error.from_event(event).text}")


async def synthesize_direct(
    host: str, port: int, text: str, rate: int = 16000, language: str | None = None
) -> bytes:
    """Our TTS's audio for ``text`` (no language, as Home Assistant asks, unless given), as
    16-bit mono PCM at ``rate``: speech in a natural voice to feed a pipeline."""
    from wyoming.tts import Synthesize, SynthesizeVoice

    from wyoming_superwhisper.tts.engines import Audio

    parts: list[bytes] = []
    native = 0
    async with AsyncTcpClient(host, port) as client:
        voice = SynthesizeVoice(language=language) if language else None
        await client.write_event(Synthesize(text=text, voice=voice).event())
        while True:
            event = await asyncio.wait_for(client.read_event(), timeout=60)
            if event is None:
                raise HassError("our TTS closed the connection mid-answer")
            if Error.is_type(event.type):
                raise HassError(f"our TTS answered an error: {Error.from_event(event).text}")
            if AudioStart.is_type(event.type):
                native = AudioStart.from_event(event).rate
            elif AudioChunk.is_type(event.type):
                parts.append(AudioChunk.from_event(event).audio)
            elif AudioStop.is_type(event.type):
                break
    return Audio(b"".join(parts), native).resampled(rate).pcm


# --- Home Assistant: the process -----------------------------------------------------


def write_hass_config(config_dir: Path, port: int, home: bool = False) -> None:
    """A minimal configuration: loopback HTTP, and a full core config (Paris, French).

    Location, time zone, units, currency and country are given so that Home Assistant
    has nothing to detect over the network; ``default_config`` is left out on purpose
    (it would start zeroconf, SSDP, DHCP, Bluetooth and cloud discovery). ``home``:
    also the entities of the French home (``home_yaml()``; ``build_french_home()``
    then puts them in their areas and exposes them to Assist).
    """
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "configuration.yaml").write_text(
        textwrap.dedent(
            f"""\
            homeassistant:
              name: superwhisper e2e
              latitude: 48.8566
              longitude: 2.3522
              elevation: 35
              unit_system: metric
              currency: EUR
              country: FR
              language: fr
              time_zone: Europe/Paris
            http:
              server_host: {LOOPBACK}
              server_port: {port}
            logger:
              default: warning
              logs:
                homeassistant.components.wyoming: debug
                homeassistant.components.assist_pipeline: info
                homeassistant.components.ollama: debug
            """
        )
        + (home_yaml() if home else "")
    )


@dataclass
class HassInstance:
    process: ManagedProcess
    config_dir: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def wait_ready(self, timeout: float = 90.0) -> float:
        """Seconds until /api/onboarding answers (the HTTP API is up)."""
        return wait_http(f"{self.url}/api/onboarding", self.process, timeout)

    def log(self) -> str:
        try:
            return (self.config_dir / "home-assistant.log").read_text(errors="replace")
        except OSError:
            return ""


@contextlib.contextmanager
def home_assistant(config_dir: Path, home: bool = False) -> Iterator[HassInstance]:
    """``hass -c config_dir --skip-pip`` on a free loopback port; ``wait_ready()`` waits.

    ``--skip-pip``: every requirement is installed by scripts/setup_hass.sh; a missing
    one must fail here, not be fetched from PyPI in the middle of a test. ``home``: with
    the French home's entities in its configuration (see ``write_hass_config``).
    """
    port = free_port()
    write_hass_config(config_dir, port, home=home)
    argv = [str(HASS_BIN), "-c", str(config_dir), "--skip-pip", "--log-no-color"]
    process = start_process("hass", argv, config_dir / "hass.stdout.log")
    try:
        yield HassInstance(process, config_dir, port)
    finally:
        process.stop()


# --- Home Assistant: REST --------------------------------------------------------------


class HassError(AssertionError):
    """Home Assistant answered something a user's setup would not get."""


async def _json(response: aiohttp.ClientResponse) -> Any:
    text = await response.text()
    if response.status >= 400:
        raise HassError(f"{response.method} {response.url} → HTTP {response.status}: {text[:500]}")
    return json.loads(text) if text else None


async def onboard_owner(session: aiohttp.ClientSession, base: str) -> str:
    """Onboarding's users step only (later steps add integrations), then an access token."""
    client_id = f"{base}/"
    async with session.post(f"{base}/api/onboarding/users", json={"client_id": client_id, **OWNER}) as resp:
        auth_code = (await _json(resp))["auth_code"]
    form = {"grant_type": "authorization_code", "code": auth_code, "client_id": client_id}
    async with session.post(f"{base}/auth/token", data=form) as resp:
        return str((await _json(resp))["access_token"])


async def add_wyoming_entry(
    session: aiohttp.ClientSession, base: str, token: str, host: str, port: int
) -> dict[str, Any]:
    """The config flow a user walks through in Settings → Integrations → Wyoming Protocol."""
    headers = {"Authorization": f"Bearer {token}"}
    async with session.post(
        f"{base}/api/config/config_entries/flow",
        json={"handler": "wyoming", "show_advanced_options": False},
        headers=headers,
    ) as resp:
        form = await _json(resp)
    if form.get("type") != "form" or form.get("step_id") != "user":
        raise HassError(f"wyoming flow did not open its user form: {form}")
    async with session.post(
        f"{base}/api/config/config_entries/flow/{form['flow_id']}",
        json={"host": host, "port": port},
        headers=headers,
    ) as resp:
        result = await _json(resp)
    if result.get("type") != "create_entry":
        raise HassError(f"wyoming flow for {host}:{port} did not create an entry: {result}")
    return dict(result["result"])


async def wait_entries_loaded(
    session: aiohttp.ClientSession, base: str, token: str, entry_ids: Sequence[str], limit_s: float = 30.0
) -> list[dict[str, Any]]:
    """The config entries, once every one of ``entry_ids`` is ``loaded`` (or failed for good)."""
    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + limit_s
    while True:
        async with session.get(f"{base}/api/config/config_entries/entry", headers=headers) as resp:
            entries = [e for e in await _json(resp) if e["entry_id"] in entry_ids]
        states = {e["entry_id"]: e["state"] for e in entries}
        if all(states.get(i) == "loaded" for i in entry_ids):
            return entries
        if any(s in ("setup_error", "migration_error", "failed_unload") for s in states.values()):
            raise HassError(f"a config entry failed to load: {entries}")
        if time.monotonic() > deadline:
            raise HassError(f"config entries not loaded after {limit_s:.0f} s: {entries}")
        await asyncio.sleep(0.2)


# --- Home Assistant: websocket -----------------------------------------------------------


@dataclass
class PipelineEvent:
    type: str
    data: dict[str, Any]
    at: float
    """``time.monotonic()`` when the event arrived."""


@dataclass
class PipelineRunResult:
    events: list[PipelineEvent]
    audio_sent_at: float
    """``time.monotonic()`` when the last audio frame (the empty one) was sent."""

    def first(self, event_type: str) -> PipelineEvent:
        for event in self.events:
            if event.type == event_type:
                return event
        raise HassError(f"no {event_type} event in the run: {[e.type for e in self.events]}")

    def errors(self) -> list[dict[str, Any]]:
        return [e.data for e in self.events if e.type == "error"]


class HassWebSocket:
    """Home Assistant's websocket API, as its frontend uses it (one connection, numbered calls)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._next_id = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, session: aiohttp.ClientSession, base: str, token: str) -> Any:
        async with session.ws_connect(f"{base}/api/websocket", max_msg_size=0) as ws:
            hello = await ws.receive_json(timeout=10)
            if hello.get("type") != "auth_required":
                raise HassError(f"websocket did not ask for auth: {hello}")
            await ws.send_json({"type": "auth", "access_token": token})
            answer = await ws.receive_json(timeout=10)
            if answer.get("type") != "auth_ok":
                raise HassError(f"websocket auth refused: {answer}")
            yield cls(ws)

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def call(self, message_type: str, limit_s: float = 30.0, **data: Any) -> Any:
        """One command; its ``result`` (raises on ``success: false``)."""
        msg_id = self._id()
        await self._ws.send_json({"id": msg_id, "type": message_type, **data})
        while True:
            message = await self._ws.receive_json(timeout=limit_s)
            if message.get("id") != msg_id:
                continue
            if message.get("type") != "result":
                continue
            if not message.get("success"):
                raise HassError(f"{message_type} failed: {message.get('error')}")
            return message.get("result")

    @contextlib.asynccontextmanager
    async def state_changes(self) -> Any:
        """Every ``state_changed`` event while inside, as ``(entity_id, new state, monotonic time)``:
        when the home really changed, for a latency measured from the end of speech."""
        seen: list[tuple[str, dict[str, Any], float]] = []
        msg_id = self._id()
        await self._ws.send_json({"id": msg_id, "type": "subscribe_events", "event_type": "state_changed"})

        async def read() -> None:
            while True:
                message = await self._ws.receive_json()
                if message.get("id") == msg_id and message.get("type") == "event":
                    data = message["event"]["data"]
                    seen.append((data["entity_id"], data.get("new_state") or {}, time.monotonic()))

        reader = asyncio.create_task(read())
        try:
            yield seen
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def run_pipeline(
        self,
        pipeline_id: str,
        pcm: bytes,
        *,
        sample_rate: int = 16000,
        frame_bytes: int = 640,
        limit_s: float = 60.0,
        conversation_id: str | None = None,
    ) -> PipelineRunResult:
        """``assist_pipeline/run`` from stt to tts, the audio streamed as binary frames.

        Each frame is the run's ``stt_binary_handler_id`` byte followed by PCM
        (16-bit mono); the lone handler byte ends the audio, as the frontend does.
        """
        msg_id = self._id()
        request: dict[str, Any] = {
            "id": msg_id,
            "type": "assist_pipeline/run",
            "pipeline": pipeline_id,
            "start_stage": "stt",
            "end_stage": "tts",
            "input": {"sample_rate": sample_rate},
            "timeout": limit_s,
        }
        if conversation_id is not None:  # a follow-up in the same conversation ("Éteins-la")
            request["conversation_id"] = conversation_id
        await self._ws.send_json(request)
        events: list[PipelineEvent] = []
        audio_sent_at = 0.0
        deadline = time.monotonic() + limit_s + 10
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HassError(f"pipeline run did not end; events so far: {[e.type for e in events]}")
            message = await self._ws.receive_json(timeout=remaining)
            if message.get("id") != msg_id:
                continue
            if message["type"] == "result":
                if not message.get("success"):
                    raise HassError(f"assist_pipeline/run refused: {message.get('error')}")
                continue
            event = message["event"]
            events.append(PipelineEvent(event["type"], event.get("data") or {}, time.monotonic()))
            if event["type"] == "run-start":
                handler_id = event["data"]["runner_data"]["stt_binary_handler_id"]
                prefix = bytes([handler_id])
                for start in range(0, len(pcm), frame_bytes):
                    await self._ws.send_bytes(prefix + pcm[start : start + frame_bytes])
                await self._ws.send_bytes(prefix)
                audio_sent_at = time.monotonic()
            elif event["type"] in ("run-end", "error"):
                if event["type"] == "error":
                    # an error ends the run; run-end may or may not follow
                    with contextlib.suppress(TimeoutError):
                        follow = await self._ws.receive_json(timeout=2)
                        if follow.get("id") == msg_id and follow.get("type") == "event":
                            ev = follow["event"]
                            events.append(PipelineEvent(ev["type"], ev.get("data") or {}, time.monotonic()))
                return PipelineRunResult(events, audio_sent_at)


async def fetch_bytes(session: aiohttp.ClientSession, url: str) -> tuple[bytes, str]:
    """Body and content type of a plain GET (the TTS proxy URL needs no token)."""
    async with session.get(url) as resp:
        body = await resp.read()
        if resp.status != 200:
            raise HassError(f"GET {url} → HTTP {resp.status}: {body[:300]!r}")
        return body, resp.headers.get("Content-Type", "")


def decode_audio(data: bytes, rate: int = 16000) -> bytes:
    """Any audio ffmpeg reads (here the MP3 Home Assistant serves) → 16-bit mono PCM."""
    result = subprocess.run(
        [
            "ffmpeg",
            "-hide_banner",
            "-loglevel",
            "error",
            "-i",
            "pipe:0",
            "-f",
            "s16le",
            "-ac",
            "1",
            "-ar",
            str(rate),
            "pipe:1",
        ],
        input=data,
        capture_output=True,
        check=False,
        timeout=30,
    )
    if result.returncode != 0:
        raise HassError(f"ffmpeg could not decode the audio: {result.stderr.decode(errors='replace')[:500]}")
    return result.stdout


async def get_state(session: aiohttp.ClientSession, base: str, token: str, entity_id: str) -> dict[str, Any]:
    """``GET /api/states/<entity_id>``: the state object (``state``, ``attributes``...)."""
    async with session.get(
        f"{base}/api/states/{entity_id}", headers={"Authorization": f"Bearer {token}"}
    ) as resp:
        return dict(await _json(resp))


async def call_service(
    session: aiohttp.ClientSession,
    base: str,
    token: str,
    domain: str,
    service: str,
    data: dict[str, Any] | None = None,
) -> Any:
    """``POST /api/services/<domain>/<service>``: the states it changed."""
    async with session.post(
        f"{base}/api/services/{domain}/{service}",
        json=data or {},
        headers={"Authorization": f"Bearer {token}"},
    ) as resp:
        return await _json(resp)


async def converse(
    ws: HassWebSocket,
    text: str,
    agent_id: str,
    language: str = "fr",
    conversation_id: str | None = None,
    limit_s: float = 60.0,
) -> dict[str, Any]:
    """``conversation/process``, as the Assist dialog sends a typed sentence: the result
    (``response`` with ``response_type``, ``speech``, ``data``; ``conversation_id``)."""
    data: dict[str, Any] = {"text": text, "language": language, "agent_id": agent_id}
    if conversation_id is not None:
        data["conversation_id"] = conversation_id
    result: dict[str, Any] = await ws.call("conversation/process", limit_s=limit_s, **data)
    return result


def speech_of(result: dict[str, Any]) -> str:
    """The plain speech of a ``conversation/process`` result."""
    return str(result["response"]["speech"].get("plain", {}).get("speech", ""))


# --- Home Assistant: a French home ---------------------------------------------------------

DEFAULT_AGENT = "conversation.home_assistant"
"""Home Assistant's own agent (hassil sentences): the control that the home is right."""

UNIQUE_ID_PREFIX = "superwhisper_e2e_"


@dataclass(frozen=True)
class HomeEntity:
    """One entity of the French home, as Assist sees it: a name in an area."""

    entity_id: str
    name: str
    area: str
    """The area's name (its id is Home Assistant's slug of it: ``Cuisine`` → ``cuisine``)."""
    alias: str = ""
    """Its English alias, given only by ``build_french_home(english_aliases=True)``."""

    @property
    def domain(self) -> str:
        return self.entity_id.split(".", 1)[0]

    @property
    def object_id(self) -> str:
        return self.entity_id.split(".", 1)[1]

    @property
    def unique_id(self) -> str:
        return UNIQUE_ID_PREFIX + self.object_id


HOME_AREAS = ("Cuisine", "Salon", "Chambre", "Bureau")
AREA_ALIASES = {"Cuisine": "Kitchen", "Salon": "Living room", "Chambre": "Bedroom", "Bureau": "Office"}
HOME: tuple[HomeEntity, ...] = (
    HomeEntity("light.lumiere_cuisine", "Lumière de la cuisine", "Cuisine", "Kitchen light"),
    HomeEntity("light.lumiere_salon", "Lumière du salon", "Salon", "Living room light"),
    HomeEntity("light.lampe_salon", "Lampe du salon", "Salon", "Living room lamp"),
    HomeEntity("light.lumiere_chambre", "Lumière de la chambre", "Chambre", "Bedroom light"),
    HomeEntity("light.lampe_chevet", "Lampe de chevet", "Chambre", "Bedside lamp"),
    HomeEntity("light.lumiere_bureau", "Lumière du bureau", "Bureau", "Office light"),
    HomeEntity("switch.prise_bureau", "Prise du bureau", "Bureau", "Office plug"),
    HomeEntity("switch.cafetiere", "Cafetière", "Cuisine", "Coffee maker"),
    HomeEntity("fan.ventilateur_chambre", "Ventilateur de la chambre", "Chambre", "Bedroom fan"),
    HomeEntity("cover.volet_salon", "Volet du salon", "Salon", "Living room shutter"),
    HomeEntity("climate.chauffage", "Chauffage", "Salon", "Heating"),
    HomeEntity("sensor.temperature_salon", "Température du salon", "Salon", "Living room temperature"),
)
"""Twelve entities in four areas, each exposed to Assist. Each is a template entity (or a
``generic_thermostat``) backed by ``input_boolean`` / ``input_number`` helpers, which
are not exposed: the state Assist changes is real Home Assistant state, read back
through the REST API. The heating's room temperature is ``input_number.temperature_salon``
(19.5 °C); its heater relay ``input_boolean.chauffage_relais``."""

HEATING_START_TARGET = 19.0
"""The target temperature of ``climate.chauffage`` at start."""


def home_entity(entity_id: str) -> HomeEntity:
    for entity in HOME:
        if entity.entity_id == entity_id:
            return entity
    raise KeyError(entity_id)


def _on_off(boolean: str) -> str:
    target = f"target: {{entity_id: input_boolean.{boolean}}}"
    return (
        f"        turn_on: [{{action: input_boolean.turn_on, {target}}}]\n"
        f"        turn_off: [{{action: input_boolean.turn_off, {target}}}]\n"
    )


def home_yaml() -> str:
    """The configuration.yaml sections of ``HOME`` (written before Home Assistant starts).

    Template entities of the legacy platform form, whose key gives the object id, so
    that entity ids are known in advance; ``unique_id`` puts each in the entity
    registry (areas and exposure need it). Also ``conversation:``, for the default agent.
    """
    by_domain: dict[str, list[HomeEntity]] = {}
    for entity in HOME:
        by_domain.setdefault(entity.domain, []).append(entity)
    booleans = [e.object_id for e in HOME if e.domain in ("light", "switch", "fan")] + ["chauffage_relais"]
    out = ["conversation:", "input_boolean:"]
    out += [f"  {name}: {{name: '{name} (état)', initial: false}}" for name in booleans]
    out.append("input_number:")
    out += [
        f"  {e.object_id}_niveau: {{name: '{e.object_id} (niveau)', min: 0, max: 255, step: 1, initial: 255}}"
        for e in by_domain["light"]
    ]
    out.append("  volet_salon_position: {name: 'volet (position)', min: 0, max: 100, step: 1, initial: 0}")
    out.append(
        "  temperature_salon: {name: 'salon (température)', min: 0, max: 40, step: 0.5, initial: 19.5,"
        " unit_of_measurement: '°C'}"
    )
    out.append("light:\n  - platform: template\n    lights:")
    for e in by_domain["light"]:
        level = f"input_number.{e.object_id}_niveau"
        boolean = f"input_boolean.{e.object_id}"
        out.append(
            f"      {e.object_id}:\n"
            f"        unique_id: {e.unique_id}\n"
            f'        friendly_name: "{e.name}"\n'
            f"        value_template: \"{{{{ is_state('input_boolean.{e.object_id}', 'on') }}}}\"\n"
            f"        level_template: \"{{{{ states('{level}') | int(0) }}}}\"\n"
            + _on_off(e.object_id)
            + "        set_level:\n"
            f"          - {{action: input_number.set_value, target: {{entity_id: {level}}},"
            ' data: {value: "{{ brightness }}"}}\n'
            f"          - {{action: input_boolean.turn_on, target: {{entity_id: {boolean}}}}}"
        )
    # Template switches and fans differ only in how their state reads the helper.
    for domain, plural, state in (
        ("switch", "switches", "is_state('input_boolean.{id}', 'on')"),
        ("fan", "fans", "states('input_boolean.{id}')"),
    ):
        out.append(f"{domain}:\n  - platform: template\n    {plural}:")
        for e in by_domain[domain]:
            value = "{{ " + state.format(id=e.object_id) + " }}"
            out.append(
                f"      {e.object_id}:\n"
                f"        unique_id: {e.unique_id}\n"
                f'        friendly_name: "{e.name}"\n'
                f'        value_template: "{value}"\n' + _on_off(e.object_id).rstrip("\n")
            )
    out.append("cover:\n  - platform: template\n    covers:")
    for e in by_domain["cover"]:
        position = "input_number.volet_salon_position"
        set_value = f"action: input_number.set_value, target: {{entity_id: {position}}}"
        out.append(
            f"      {e.object_id}:\n"
            f"        unique_id: {e.unique_id}\n"
            f'        friendly_name: "{e.name}"\n'
            "        device_class: shutter\n"
            f"        position_template: \"{{{{ states('{position}') | int(0) }}}}\"\n"
            f"        open_cover: [{{{set_value}, data: {{value: 100}}}}]\n"
            f"        close_cover: [{{{set_value}, data: {{value: 0}}}}]\n"
            f'        set_cover_position: [{{{set_value}, data: {{value: "{{{{ position }}}}"}}}}]'
        )
    out.append("sensor:\n  - platform: template\n    sensors:")
    for e in by_domain["sensor"]:
        out.append(
            f"      {e.object_id}:\n"
            f"        unique_id: {e.unique_id}\n"
            f'        friendly_name: "{e.name}"\n'
            "        device_class: temperature\n"
            "        unit_of_measurement: '°C'\n"
            "        value_template: \"{{ states('input_number.temperature_salon') }}\""
        )
    out.append("climate:")
    for e in by_domain["climate"]:
        out.append(
            "  - platform: generic_thermostat\n"
            f'    name: "{e.name}"\n'
            f"    unique_id: {e.unique_id}\n"
            "    heater: input_boolean.chauffage_relais\n"
            "    target_sensor: sensor.temperature_salon\n"
            "    min_temp: 7\n"
            "    max_temp: 30\n"
            f"    target_temp: {HEATING_START_TARGET}\n"
            "    initial_hvac_mode: heat\n"
            "    precision: 0.5\n"
            "    target_temp_step: 0.5"
        )
    return "\n".join(out) + "\n"


async def build_french_home(
    ws: HassWebSocket, limit_s: float = 30.0, *, english_aliases: bool = False
) -> dict[str, str]:
    """Put ``HOME`` in its areas and expose it to Assist, as a user does in the frontend.

    Areas by ``config/area_registry/create`` (those missing), each entity's area by
    ``config/entity_registry/update``, exposure by ``homeassistant/expose_entity``
    (assistant ``conversation``). Waits (``limit_s``) for every entity to be in the
    registry first. ``english_aliases``: each entity and area also gets its English
    alias, as a bilingual household names them (Home Assistant lists aliases after the
    name to the model). Returns area id per area name.
    """
    existing = {a["name"]: a["area_id"] for a in await ws.call("config/area_registry/list")}
    areas: dict[str, str] = {}
    for name in HOME_AREAS:
        if name in existing:
            areas[name] = existing[name]
        else:
            created = await ws.call("config/area_registry/create", name=name)
            areas[name] = created["area_id"]
    deadline = time.monotonic() + limit_s
    while True:
        registry = await ws.call("config/entity_registry/list")
        by_unique = {e.get("unique_id"): e for e in registry}
        missing = [e for e in HOME if e.unique_id not in by_unique]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise HassError(
                f"not in the entity registry after {limit_s:.0f} s: {[e.entity_id for e in missing]}"
            )
        await asyncio.sleep(0.5)
    for entity in HOME:
        registered = by_unique[entity.unique_id]["entity_id"]
        if registered != entity.entity_id:
            raise HassError(f"{entity.unique_id} registered as {registered}, not {entity.entity_id}")
        aliases = [entity.alias] if english_aliases and entity.alias else []
        await ws.call(
            "config/entity_registry/update", entity_id=entity.entity_id, area_id=areas[entity.area],
            aliases=aliases,
        )  # fmt: skip
    if english_aliases:
        for name, area_id in areas.items():
            await ws.call("config/area_registry/update", area_id=area_id, aliases=[AREA_ALIASES[name]])
    await ws.call(
        "homeassistant/expose_entity",
        assistants=["conversation"],
        entity_ids=[e.entity_id for e in HOME],
        should_expose=True,
    )
    return areas


async def reset_home(session: aiohttp.ClientSession, base: str, token: str) -> None:
    """Every entity of ``HOME`` back to its start: off, full brightness, closed, 19 °C."""

    def ids(domain: str) -> list[str]:
        return [e.entity_id for e in HOME if e.domain == domain]

    for domain in ("light", "switch", "fan"):
        await call_service(session, base, token, domain, "turn_off", {"entity_id": ids(domain)})
    levels = [f"input_number.{e.object_id}_niveau" for e in HOME if e.domain == "light"]
    await call_service(session, base, token, "input_number", "set_value", {"entity_id": levels, "value": 255})
    await call_service(
        session, base, token, "cover", "set_cover_position", {"entity_id": ids("cover"), "position": 0}
    )
    await call_service(
        session,
        base,
        token,
        "climate",
        "set_temperature",
        {"entity_id": ids("climate"), "temperature": HEATING_START_TARGET},
    )


# --- Home Assistant: the Ollama integration ---------------------------------------------------


async def add_mcp_server_entry(session: aiohttp.ClientSession, base: str, token: str) -> str:
    """Settings → Integrations → Model Context Protocol Server: its one form, the Assist API."""
    headers = {"Authorization": f"Bearer {token}"}
    flows = f"{base}/api/config/config_entries/flow"
    async with session.post(flows, json={"handler": "mcp_server"}, headers=headers) as resp:
        form = await _json(resp)
    names = [field["name"] for field in form.get("data_schema", [])]
    if form.get("type") != "form" or names != ["llm_hass_api"]:
        raise HassError(f"mcp_server flow did not ask for an LLM API: {form}")
    async with session.post(
        f"{flows}/{form['flow_id']}", json={"llm_hass_api": "assist"}, headers=headers
    ) as resp:
        result = await _json(resp)
    if result.get("type") != "create_entry":
        raise HassError(f"mcp_server flow did not create an entry: {result}")
    entry_id = str(result["result"]["entry_id"])
    await wait_entries_loaded(session, base, token, [entry_id])
    return entry_id


async def mcp_home(base: str, aliases: Mapping[str, list[str]] | None = None) -> str:
    """Owner, the French home in its areas and exposed, entity ``aliases``, the MCP server: a token
    a handle started with ``handle.hass_url`` acts with (tests and benchmarks)."""
    async with aiohttp.ClientSession() as session:
        token = await onboard_owner(session, base)
        async with HassWebSocket.connect(session, base, token) as ws:
            await build_french_home(ws)
            for entity_id, names in (aliases or {}).items():
                await ws.call("config/entity_registry/update", entity_id=entity_id, aliases=names)
        await add_mcp_server_entry(session, base, token)
    return token


@dataclass(frozen=True)
class OllamaAgent:
    entry_id: str
    entity_id: str
    """The conversation entity (``conversation.<model>``), the agent id for ``converse``."""
    options: dict[str, Any]


async def add_ollama_agent(
    session: aiohttp.ClientSession,
    base: str,
    token: str,
    url: str,
    model: str,
    *,
    llm_hass_api: str = "assist",
    num_ctx: int = 8192,
    max_history: int = 20,
    keep_alive: int = -1,
    limit_s: float = 30.0,
) -> OllamaAgent:
    """Settings → Integrations → Ollama: the config flow (URL, then model), then the
    options flow (control by the Assist API, the default prompt kept as the form
    suggests it), as the frontend posts them. Returns once the reloaded entity offers
    control (``supported_features`` 1)."""
    headers = {"Authorization": f"Bearer {token}"}
    flows = f"{base}/api/config/config_entries/flow"
    async with session.post(
        flows, json={"handler": "ollama", "show_advanced_options": False}, headers=headers
    ) as resp:
        form = await _json(resp)
    if form.get("type") != "form" or form.get("step_id") != "user":
        raise HassError(f"ollama flow did not open its URL form: {form}")
    async with session.post(f"{flows}/{form['flow_id']}", json={"url": url}, headers=headers) as resp:
        form = await _json(resp)
    names = [field_["name"] for field_ in form.get("data_schema", [])]
    if form.get("type") != "form" or form.get("errors") or names != ["model"]:
        raise HassError(f"ollama flow for {url} did not ask for a model: {form}")
    async with session.post(f"{flows}/{form['flow_id']}", json={"model": model}, headers=headers) as resp:
        result = await _json(resp)
    if result.get("type") != "create_entry":
        raise HassError(f"ollama flow for {model!r} did not create an entry (not in /api/tags?): {result}")
    entry_id = str(result["result"]["entry_id"])
    await wait_entries_loaded(session, base, token, [entry_id], limit_s)

    options_flows = f"{base}/api/config/config_entries/options/flow"
    async with session.post(
        options_flows, json={"handler": entry_id, "show_advanced_options": False}, headers=headers
    ) as resp:
        form = await _json(resp)
    schema = {field_["name"]: field_ for field_ in form.get("data_schema", [])}
    prompt = (schema.get("prompt", {}).get("description") or {}).get("suggested_value")
    if form.get("type") != "form" or not prompt:
        raise HassError(f"ollama options flow did not suggest a prompt: {form}")
    options = {
        "prompt": prompt,
        "llm_hass_api": llm_hass_api,
        "num_ctx": num_ctx,
        "max_history": max_history,
        "keep_alive": keep_alive,
    }
    async with session.post(f"{options_flows}/{form['flow_id']}", json=options, headers=headers) as resp:
        result = await _json(resp)
    if result.get("type") != "create_entry":
        raise HassError(f"ollama options flow did not save: {result}")

    deadline = time.monotonic() + limit_s
    async with HassWebSocket.connect(session, base, token) as ws:
        while True:
            registry = await ws.call("config/entity_registry/list")
            entity_ids = [
                e["entity_id"]
                for e in registry
                if e.get("platform") == "ollama" and e.get("config_entry_id") == entry_id
            ]
            if entity_ids:
                with contextlib.suppress(HassError):  # 404 while the entry reloads
                    state = await get_state(session, base, token, entity_ids[0])
                    if state["state"] != "unavailable" and state["attributes"].get("supported_features") == 1:
                        return OllamaAgent(entry_id, entity_ids[0], options)
            if time.monotonic() > deadline:
                raise HassError(
                    f"no Ollama conversation entity offering control after {limit_s:.0f} s: {entity_ids}"
                )
            await asyncio.sleep(0.25)


# --- spoken commands into a configured home ---------------------------------------------

SILENCE = np.zeros(16000 // 2, dtype=np.int16).tobytes()
"""Half a second: a command has silence around it, and the trailing one ends Home Assistant's VAD."""


@dataclass
class Home:
    """A running Home Assistant with our servers, configured by :func:`assist_home`."""

    servers: SuperwhisperServe
    hass: HassInstance
    api_port: int
    token: str = ""
    pipelines: dict[str, str] | None = None


@contextlib.contextmanager
def assist_home(root: Path, extra: Sequence[str] = ()) -> Iterator[Home]:
    """Our servers (the handle's Ollama API on) and Home Assistant with the bilingual French
    home, its Ollama agent set up against us, a French and an English pipeline (our ASR →
    that agent → our TTS). ``extra``: more ``superwhisper serve`` flags. Both processes are
    stopped on the way out."""
    api_port = free_port()
    extra = ["--set", f"handle.api_host={LOOPBACK}", "--set", f"handle.api_port={api_port}", *extra]
    with contextlib.ExitStack() as exits:
        servers = exits.enter_context(superwhisper_serve(root / "superwhisper", extra))
        hass = exits.enter_context(home_assistant(root / "hass-config", home=True))
        hass.wait_ready()
        servers.wait_ready(240)
        state = Home(servers, hass, api_port)
        asyncio.run(_configure(state))
        yield state
        print(f"[logs] {servers.process.log_path} and {hass.config_dir / 'home-assistant.log'}")


async def _configure(home: Home) -> None:
    base = home.hass.url
    async with aiohttp.ClientSession() as session:
        home.token = token = await onboard_owner(session, base)
        entries = [
            await add_wyoming_entry(session, base, token, LOOPBACK, port)
            for port in (home.servers.ports.asr, home.servers.ports.tts)
        ]
        await wait_entries_loaded(session, base, token, [e["entry_id"] for e in entries])
        agent = await add_ollama_agent(
            session, base, token, f"http://{LOOPBACK}:{home.api_port}", "superwhisper:latest"
        )
        async with HassWebSocket.connect(session, base, token) as ws:
            await build_french_home(ws, english_aliases=True)
            registry = await ws.call("config/entity_registry/list")
            ours = {e["entry_id"] for e in entries}
            stt = next(
                e["entity_id"]
                for e in registry
                if e["config_entry_id"] in ours and e["entity_id"].startswith("stt.")
            )
            tts = next(
                e["entity_id"]
                for e in registry
                if e["config_entry_id"] in ours and e["entity_id"].startswith("tts.")
            )
            home.pipelines = {}
            for language in ("fr", "en"):
                created = await ws.call(
                    "assist_pipeline/pipeline/create",
                    name=f"superwhisper-home-{language}", language=language,
                    conversation_engine=agent.entity_id, conversation_language=language,
                    stt_engine=stt, stt_language=language, tts_engine=tts, tts_language=language,
                    tts_voice=None, wake_word_entity=None, wake_word_id=None,
                )  # fmt: skip
                home.pipelines[language] = created["id"]


@dataclass
class Said:
    run: PipelineRunResult
    transcript: str
    answer: str
    conversation_id: str | None
    changed_after_s: float | None
    """The audio's last frame sent → the watched entity's state changed (None: it did not)."""


async def say(
    home: Home, text: str, language: str, watch: str | None = None, conversation_id: str | None = None
) -> Said:
    """``text`` spoken by our TTS, streamed into the language's pipeline; what happened."""
    assert home.pipelines is not None
    spoken = await synthesize_direct(LOOPBACK, home.servers.ports.tts, text, language=language)
    pcm = SILENCE + spoken + SILENCE * 3
    async with (
        aiohttp.ClientSession() as session,
        HassWebSocket.connect(session, home.hass.url, home.token) as ws,
        HassWebSocket.connect(session, home.hass.url, home.token) as watcher,
        watcher.state_changes() as changes,
    ):
        await asyncio.sleep(0.2)  # the subscription is in place before anything is said
        run = await ws.run_pipeline(
            home.pipelines[language], pcm, limit_s=120, conversation_id=conversation_id
        )
    assert not run.errors(), f"{text!r}: the pipeline reported errors: {run.errors()}"
    transcript = run.first("stt-end").data["stt_output"]["text"]
    output = run.first("intent-end").data["intent_output"]
    answer = str(output["response"]["speech"].get("plain", {}).get("speech", ""))
    # The audio is streamed faster than real time: its end is when the last frame was sent.
    changed = next((at for entity_id, _, at in changes if entity_id == watch), None)
    after = None if changed is None else changed - run.audio_sent_at
    said = Said(run, transcript, answer, output.get("conversation_id"), after)
    print(
        f"\n[said] {text!r} → heard {transcript!r} → answered {answer!r}"
        + (f"; state changed {after:.2f} s after the audio ended" if after is not None else "")
    )
    return said


async def state(home: Home, entity_id: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        return await get_state(session, home.hass.url, home.token, entity_id)
