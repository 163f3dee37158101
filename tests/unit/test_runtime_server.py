"""The server runtime over real sockets: bounded reader, limits, ops HTTP, shutdown.

A tiny echo service stands in for ASR/handle/TTS: the runtime is under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from wyoming.audio import AudioChunk
from wyoming.client import AsyncTcpClient
from wyoming.event import Event

from tests.conftest import make_context, make_settings
from wyoming_superwhisper.runtime.fallback import FallbackChain
from wyoming_superwhisper.runtime.limits import ProtocolViolation, finite_number
from wyoming_superwhisper.runtime.ops import OpsServer, redact
from wyoming_superwhisper.runtime.server import (
    Connection,
    EventHandler,
    ServiceContext,
    ServiceServer,
    WyomingService,
)


@dataclass
class EchoEngine:
    name: str = "echo"
    device: str = "cpu"
    quality: int = 1
    broken: bool = False

    async def load(self) -> None:
        if self.broken:
            raise OSError("broken on purpose")

    async def close(self) -> None:
        pass


class EchoHandler(EventHandler):
    def __init__(self, connection: Connection, service: EchoService) -> None:
        super().__init__(connection)
        self.service = service

    async def handle_event(self, event: Event) -> bool:
        if event.type == "slow":
            await asyncio.sleep(float(event.data.get("seconds", 0.5)))
        if event.type == "number":
            finite_number(event.data, "value", 0, 0, 10)
        if event.type == "bye":
            return False
        if event.type == "fail":
            raise ProtocolViolation("bad-request", "you asked for it")
        result = await self.service.chain.run(lambda engine: _echo(event))
        await self.connection.write(Event("echo", {"type": event.type, **event.data}, result.value))
        return True


async def _echo(event: Event) -> bytes | None:
    return event.payload


class EchoService(WyomingService):
    name = "echo"

    def __init__(self, context: ServiceContext, broken: bool = False) -> None:
        super().__init__(context)
        self.chain: FallbackChain[EchoEngine] = FallbackChain(
            "echo", [EchoEngine(broken=broken)], observer=context.metrics
        )

    @property
    def uri(self) -> str:
        return "tcp://127.0.0.1:0"

    def chains(self) -> Sequence[FallbackChain[Any]]:
        return [self.chain]

    def create_handler(self, connection: Connection) -> EventHandler:
        return EchoHandler(connection, self)

    async def smoke(self) -> str:
        return "echo"


@pytest.fixture
async def server(request: pytest.FixtureRequest) -> AsyncIterator[ServiceServer]:
    overrides = getattr(request, "param", {})
    context = make_context(make_settings(**overrides))
    service = EchoService(context)
    srv = ServiceServer(service)
    await service.start()
    await srv.start()
    yield srv
    await srv.stop(1.0)
    await service.stop()


async def raw(server: ServiceServer, data: bytes, read_timeout: float = 5.0) -> list[dict[str, Any]]:
    """Send raw bytes, return the JSON headers the server answered before closing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(data)
    await writer.drain()
    answered = []
    try:
        while True:
            line = await asyncio.wait_for(reader.readline(), read_timeout)
            if not line:
                break
            header = json.loads(line)
            if header.get("data_length"):
                header["data"] = json.loads(await reader.readexactly(header["data_length"]))
            if header.get("payload_length"):
                await reader.readexactly(header["payload_length"])
            answered.append(header)
    finally:
        writer.close()
    return answered


async def roundtrip(server: ServiceServer, event: Event) -> Event | None:
    async with AsyncTcpClient("127.0.0.1", server.port) as client:
        await client.write_event(event)
        return await asyncio.wait_for(client.read_event(), 5)


async def test_echo_with_the_wyoming_client(server: ServiceServer) -> None:
    answer = await roundtrip(server, Event("ping", {"n": 1}, b"abc"))
    assert answer is not None
    assert (answer.type, answer.data, answer.payload) == ("echo", {"type": "ping", "n": 1}, b"abc")


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b'{"type": "x", "data_length": 4294967296}\n', "too-large"),
        (b'{"type": "x", "payload_length": 2000000}\n', "too-large"),
        (b'{"type": "x", "payload_length": -1}\n', "bad-event"),
        (b'{"type": "x", "data_length": "ten"}\n', "bad-event"),
        (b"this is not json\n", "bad-json"),
        (b'{"type": "x", "data": {"v": NaN}}\n', "bad-json"),
        (b'{"type": "x"}\n'.replace(b"x", b"\xff"), "bad-encoding"),
        (b'{"data": {}}\n', "bad-event"),
        (b"[1, 2]\n", "bad-event"),
        (b'{"type": "x", "data": [1]}\n', "bad-event"),
        (b'{"type": "x", "data_length": 3}\n[1]', "bad-event"),
        (b'{"type": "x", "payload_length": 10}\nabc', "truncated"),
    ],
)
async def test_protocol_violations_get_an_error_then_close(
    server: ServiceServer, data: bytes, code: str
) -> None:
    writer_data = data
    answered = (
        await raw(server, writer_data, read_timeout=3.0)
        if not data.endswith(b"abc")
        else await _truncated(server, data)
    )
    assert [a["type"] for a in answered] == ["error"]
    assert answered[0]["data"]["code"] == code
    # ...and the same server still serves a valid request.
    answer = await roundtrip(server, Event("ping"))
    assert answer is not None and answer.type == "echo"


async def _truncated(server: ServiceServer, data: bytes) -> list[dict[str, Any]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(data)
    writer.write_eof()
    answered = []
    while line := await asyncio.wait_for(reader.readline(), 3):
        header = json.loads(line)
        header["data"] = json.loads(await reader.readexactly(header["data_length"]))
        answered.append(header)
    writer.close()
    return answered


async def test_oversized_header_is_refused_without_reading_it(server: ServiceServer) -> None:
    header = b'{"type": "x", "data": {"pad": "' + b"a" * 70000 + b'"}}\n'
    answered = await raw(server, header)
    assert answered[0]["data"]["code"] == "header-too-large"


async def test_bad_value_inside_an_event_keeps_the_connection(server: ServiceServer) -> None:
    async with AsyncTcpClient("127.0.0.1", server.port) as client:
        await client.write_event(Event("number", {"value": 11}))
        error = await asyncio.wait_for(client.read_event(), 5)
        assert error is not None and error.type == "error" and error.data["code"] == "bad-value"
        await client.write_event(Event("fail"))
        error = await asyncio.wait_for(client.read_event(), 5)
        assert error is not None and error.data["code"] == "bad-request"
        await client.write_event(Event("number", {"value": 3}))
        answer = await asyncio.wait_for(client.read_event(), 5)
        assert answer is not None and answer.type == "echo"


@pytest.mark.parametrize("server", [{"server.idle_timeout_s": 0.3}], indirect=True)
async def test_idle_and_trickling_clients_are_dropped(server: ServiceServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    dropped = False
    for byte in b'{"type": "ping", "data": {}}':  # a header trickled byte by byte
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionResetError:
            dropped = True
            break
        await asyncio.sleep(0.05)
    assert dropped or await asyncio.wait_for(reader.read(), 3) == b""  # closed by the server
    writer.close()


@pytest.mark.parametrize("server", [{"server.max_connections": 2}], indirect=True)
async def test_connection_cap_answers_busy(server: ServiceServer) -> None:
    held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
    await asyncio.sleep(0.1)
    answered = await raw(server, b"")
    assert answered[0]["data"]["code"] == "busy"
    for _, writer in held:
        writer.close()
    await asyncio.sleep(0.1)
    answer = await roundtrip(server, Event("ping"))
    assert answer is not None and answer.type == "echo"


@pytest.mark.parametrize("server", [{"server.max_connections": 2}], indirect=True)
async def test_a_satellite_streaming_into_a_full_server_reads_busy_not_a_reset(server: ServiceServer) -> None:
    """Closing on unread audio sends a TCP reset, which destroyed the busy answer (13-97 per load test)."""
    held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
    await asyncio.sleep(0.1)
    chunk = AudioChunk(16000, 2, 1, bytes(6400)).event()

    async def stream_audio(client: AsyncTcpClient) -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(100):  # as a satellite does: audio goes on until an answer comes
                await client.write_event(chunk)
                await asyncio.sleep(0.002)

    client = AsyncTcpClient("127.0.0.1", server.port)
    await client.connect()
    streaming = asyncio.create_task(stream_audio(client))
    await asyncio.sleep(0.3)  # the server has answered while audio was still arriving
    try:
        answer: Event | Exception | None = await asyncio.wait_for(client.read_event(), 5)
    except ConnectionError as error:  # what Home Assistant saw instead of "busy"
        answer = error
    streaming.cancel()
    with contextlib.suppress(ConnectionError):
        await client.disconnect()
    assert isinstance(answer, Event) and answer.type == "error", answer
    assert answer.data["code"] == "busy"
    assert server.active == 2  # a refused connection never takes a slot
    for _, writer in held:
        writer.close()


async def test_shutdown_lets_a_running_request_finish(server: ServiceServer) -> None:
    client = AsyncTcpClient("127.0.0.1", server.port)
    await client.connect()
    await client.write_event(Event("slow", {"seconds": 0.3}))
    await asyncio.sleep(0.05)
    stopping = asyncio.create_task(server.stop(5.0))
    answer = await asyncio.wait_for(client.read_event(), 5)
    assert answer is not None and answer.type == "echo"
    await client.disconnect()
    await stopping


async def test_shutdown_cancels_what_outlives_the_timeout(server: ServiceServer) -> None:
    client = AsyncTcpClient("127.0.0.1", server.port)
    await client.connect()
    await client.write_event(Event("slow", {"seconds": 30}))
    await asyncio.sleep(0.05)
    await asyncio.wait_for(server.stop(0.2), 5)
    assert server.active == 0
    await client.disconnect()


async def test_ops_http_endpoints() -> None:
    context = make_context(make_settings(**{"handle.api_key": "sk-secret", "asr.hass_token": "tok"}))
    good, bad = EchoService(context), EchoService(context, broken=True)
    bad.name = "broken-echo"
    await good.start()
    await bad.start()
    ops = OpsServer([good, bad], context)
    await ops.start()
    try:
        await roundtrip_server(good)
        base = f"http://127.0.0.1:{ops.port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/healthz") as response:
                assert response.status == 200
            async with session.get(f"{base}/readyz") as response:
                assert response.status == 503
                body = await response.json()
                assert "broken-echo" in body["reasons"] and "echo" not in body["reasons"]
            async with session.get(f"{base}/metrics") as response:
                text = await response.text()
                assert (
                    'superwhisper_engine_attempts_total{engine="echo",outcome="ok",service="echo"} 1.0'
                    in text
                )
                assert 'superwhisper_ready{service="broken-echo"} 0.0' in text
                # Every outcome exists from the start, so rate() sees the first busy of a burst.
                assert 'superwhisper_requests_total{outcome="busy",service="echo"} 0.0' in text
                assert 'outcome="busy",service="broken-echo"' not in text  # never served
                assert "process_resident_memory_bytes" in text
                assert "superwhisper_gpu_memory_used_bytes" not in text  # absent on CPU, not faked
            async with session.get(f"{base}/status") as response:
                status = await response.text()
                assert "sk-secret" not in status and '"tok"' not in status
                data = json.loads(status)
                assert data["gpu"]["device"] == "cpu"
                assert data["services"][1]["chains"]["echo"][0]["last_error"].startswith("load_failed")
    finally:
        await ops.stop()
        await good.stop()
        await bad.stop()


async def roundtrip_server(service: EchoService) -> None:
    srv = ServiceServer(service)
    await srv.start()
    try:
        assert await roundtrip(srv, Event("ping")) is not None
    finally:
        await srv.stop(1.0)


def test_redact_hides_secrets_only() -> None:
    tree = {"handle": {"api_key": "sk", "chain": [{"options": {"api_key": "x", "n_ctx": 2048}}]}, "token": ""}
    assert redact(tree) == {
        "handle": {"api_key": "***", "chain": [{"options": {"api_key": "***", "n_ctx": 2048}}]},
        "token": "",
    }


@pytest.mark.parametrize("server", [{"server.max_events_per_second": 50}], indirect=True)
async def test_event_flood_is_slowed_not_dropped(server: ServiceServer) -> None:
    async with AsyncTcpClient("127.0.0.1", server.port) as client:
        for i in range(120):
            await client.write_event(Event("ping", {"i": i}))
        answers = [await asyncio.wait_for(client.read_event(), 10) for _ in range(120)]
    assert [a.data["i"] for a in answers if a is not None] == list(range(120))
    throttled = server.metrics.registry.get_sample_value(
        "superwhisper_events_throttled_total", {"service": "echo"}
    )
    assert throttled is not None and throttled > 0


async def test_readyz_waits_for_the_wyoming_ports_to_listen() -> None:
    """Services warm up before the ports open: /readyz sent clients to a closed port."""
    context = make_context(make_settings())
    service = EchoService(context)
    await service.start()
    listening = False
    ops = OpsServer([service], context, listening=lambda: listening)
    await ops.start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{ops.port}/readyz") as response:
                assert response.status == 503
                assert "not listening" in (await response.json())["reasons"]["runtime"]
            listening = True
            async with session.get(f"http://127.0.0.1:{ops.port}/readyz") as response:
                assert response.status == 200
    finally:
        await ops.stop()
        await service.stop()


async def test_background_work_runs_beside_the_service_and_stops_with_it() -> None:
    service = EchoService(make_context())
    await service.start()
    started, finished = asyncio.Event(), asyncio.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            finished.set()

    service.background(forever(), "forever")
    await asyncio.wait_for(started.wait(), 5)
    await service.stop()
    assert finished.is_set()  # cancelled by stop, not left running
