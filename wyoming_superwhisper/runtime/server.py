"""Run Wyoming services: bounded TCP servers, ops HTTP, zeroconf, graceful shutdown.

Every server has the same shape: a :class:`WyomingService` owns its engines
(behind fallback chains) and makes one :class:`EventHandler` per connection;
this module owns the sockets. It reads events through the bounded reader,
answers protocol violations with an ``error`` event before closing, caps the
number of connections, and on SIGTERM stops accepting, lets running requests
finish for ``server.shutdown_timeout_s``, then cancels what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from wyoming.error import Error
from wyoming.event import Event, async_write_event

from ..config import Settings
from .fallback import FallbackChain
from .gpu import GpuDecision
from .hygiene import VramGuard
from .limits import ProtocolViolation, ReadLimits, read_event
from .metrics import Metrics
from .registry import ModelRegistry

_LOGGER = logging.getLogger(__name__)

LINGER_S = 2.0
"""How long a closing connection drops what the client still sends, so it can read our last answer."""
LINGER_BYTES = 1 << 20
"""At most this much is dropped (about 30 s of 16 kHz audio) before the socket is closed anyway."""


class PhraseBook:
    """Sentences one service expects another to say soon, shared by the services of a process.

    The handle offers the confirmations it would word for this home ("J'ai allumé la lumière
    de la cuisine."); a TTS in the same process renders them while it is idle, so the first
    time one is said its audio is already kept. In separate processes nobody takes them.
    """

    def __init__(self) -> None:
        self._offered: set[tuple[str, str]] = set()
        self._pending: list[tuple[str, str]] = []
        self._arrived: asyncio.Event | None = None

    def offer(self, language: str, texts: Sequence[str]) -> int:
        """Queue the texts not offered before; how many were new."""
        new = [
            (language, text)
            for text in dict.fromkeys(texts)
            if text and (language, text) not in self._offered
        ]
        self._offered.update(new)
        self._pending.extend(new)
        if new and self._arrived is not None:
            self._arrived.set()
        return len(new)

    async def next(self) -> tuple[str, str]:
        """The next offered (language, text), waiting for one."""
        if self._arrived is None:
            self._arrived = asyncio.Event()
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        return self._pending.pop(0)


@dataclass
class ServiceContext:
    """What the runtime gives every service: one of each, shared in the process."""

    settings: Settings
    registry: ModelRegistry
    gpu: GpuDecision
    metrics: Metrics
    vram: VramGuard | None = None
    """GPU memory hygiene shared by every chain of the process (no-op without a GPU)."""
    phrases: PhraseBook = field(default_factory=PhraseBook)
    """What one service expects another to say soon (the handle's confirmations → the TTS)."""

    def __post_init__(self) -> None:
        if self.vram is None:
            self.vram = VramGuard(self.gpu, self.metrics, self.settings.gpu.vram_high_watermark)


class Connection:
    """One client connection as a handler sees it: write events, send errors."""

    def __init__(self, service: str, writer: asyncio.StreamWriter, metrics: Metrics) -> None:
        self.service = service
        self.writer = writer
        self.metrics = metrics
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
        self._write_lock = asyncio.Lock()

    @property
    def closed(self) -> bool:
        return self.writer.is_closing()

    async def write(self, event: Event) -> None:
        """Send an event; events from concurrent tasks of one handler never interleave."""
        async with self._write_lock:
            await async_write_event(event, self.writer)

    async def error(self, text: str, code: str) -> None:
        """Send a Wyoming ``error`` event (what Home Assistant shows the user)."""
        _LOGGER.info("%s %s: error %s: %s", self.service, self.peer, code, text)
        with contextlib.suppress(ConnectionError):
            await self.write(Error(text=text, code=code).event())


class EventHandler(ABC):
    """Translates events for one connection; owns per-request state, not models."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    @abstractmethod
    async def handle_event(self, event: Event) -> bool:
        """Handle one event; False closes the connection."""

    async def disconnect(self) -> None:
        """The client is gone: cancel work in flight, free per-request state."""


class ServiceState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"


class WyomingService(ABC):
    """A Wyoming service (ASR, handle, TTS): its chains, its handler, its readiness."""

    name: str = "service"

    def __init__(self, context: ServiceContext) -> None:
        self.context = context
        self.state = ServiceState.STARTING
        self.started_at = time.time()
        self._background: set[asyncio.Task[None]] = set()

    def background(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``work`` beside the service (warm-ups, preparing): :meth:`stop` cancels it."""
        task = asyncio.create_task(work, name=f"{self.name}-{name}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @property
    @abstractmethod
    def uri(self) -> str:
        """Where to listen, ``tcp://host:port`` or ``unix:///path``."""

    @abstractmethod
    def chains(self) -> Sequence[FallbackChain[Any]]:
        """The service's fallback chains (for readiness, status, warm-up, close)."""

    @abstractmethod
    def create_handler(self, connection: Connection) -> EventHandler:
        """A new handler for one connection."""

    @abstractmethod
    async def smoke(self) -> str:
        """One tiny real request through the chain (the doctor's functional check).

        Returns a short description of what came back (e.g. the transcript);
        raises when no level could answer.
        """

    async def start(self) -> None:
        """Warm up: load the first usable level of every chain before taking traffic."""
        for chain in self.chains():
            for index in range(len(chain.levels)):
                if await chain.load(index):
                    break
        self.state = ServiceState.READY

    async def stop(self) -> None:
        self.state = ServiceState.STOPPING
        for task in list(self._background):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for chain in self.chains():
            await chain.close()
        self.state = ServiceState.STOPPED

    def readiness(self) -> tuple[bool, str]:
        """Ready when started and every chain has a level that is loaded and not open."""
        if self.state is not ServiceState.READY:
            return False, f"{self.name} is {self.state.value}"
        for chain in self.chains():
            usable = [lv for lv in chain.status() if lv["loaded"] and lv["circuit"] != "open"]
            if not chain.healthy() or not usable:
                crashed = [
                    f"{lv['engine']} {lv['last_error']}"
                    for lv in chain.status()
                    if lv["worker"] and lv["worker"]["crashes"] and lv["circuit"] == "open"
                ]
                detail = f" ({'; '.join(crashed)})" if crashed else ""
                return False, f"{chain.service}: no healthy, loaded engine{detail}"
        return True, "ok"

    def crashed_levels(self) -> list[str]:
        """``engine: crashed: SIGSEGV`` for every level whose worker has crashed."""
        return [
            f"{level['engine']}: {level['last_error'] or 'crashed: ' + level['worker']['last_crash']}"
            for chain in self.chains()
            for level in chain.status()
            if level["worker"] and level["worker"]["crashes"]
        ]

    def status(self) -> dict[str, Any]:
        ready, reason = self.readiness()
        return {
            "service": self.name,
            "uri": self.uri,
            "state": self.state.value,
            "ready": ready,
            "reason": reason,
            "chains": {chain.service: chain.status() for chain in self.chains()},
        }


class ServiceServer:
    """Accepts connections for one service and runs its handlers under the limits."""

    def __init__(self, service: WyomingService) -> None:
        self.service = service
        settings = service.context.settings.server
        self.limits = ReadLimits.from_settings(settings)
        self.max_connections = settings.max_connections
        self.max_events_per_second = settings.max_events_per_second
        self.metrics = service.context.metrics
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing: set[asyncio.Task[None]] = set()
        """Connections answered and closing (``_close``); they hold no slot."""
        self.port: int | None = None
        self.host: str | None = None

    async def start(self) -> None:
        parsed = urlparse(self.service.uri)
        if parsed.scheme == "tcp":
            if parsed.hostname is None or parsed.port is None:
                raise ValueError(f"{self.service.name}: {self.service.uri} needs a host and a port")
            self._server = await asyncio.start_server(
                self._on_connection, parsed.hostname, parsed.port, limit=self.limits.max_header_bytes
            )
            sockname = self._server.sockets[0].getsockname()
            self.host, self.port = parsed.hostname, int(sockname[1])
        elif parsed.scheme == "unix":
            self._server = await asyncio.start_unix_server(
                self._on_connection, parsed.path, limit=self.limits.max_header_bytes
            )
        else:
            raise ValueError(
                f"{self.service.name}: only tcp:// and unix:// URIs are served, not {self.service.uri}"
            )
        self.metrics.expect_requests(self.service.name)
        _LOGGER.info("%s listening on %s (port %s)", self.service.name, self.service.uri, self.port)

    @property
    def active(self) -> int:
        return len(self._tasks)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            if len(self._tasks) >= self.max_connections:  # refused: it never takes a slot
                self.metrics.count(self.service.name, "busy")
                connection = Connection(self.service.name, writer, self.metrics)
                await connection.error(f"server busy: {self.max_connections} connections open", "busy")
                return
            self._tasks.add(task)
            gauge = self.metrics.active_connections.labels(self.service.name)
            gauge.inc()
            try:
                await self._serve(reader, writer)
            finally:
                gauge.dec()
                self._tasks.discard(task)
        finally:
            self._closing.add(task)
            await self._close(reader, writer)
            self._closing.discard(task)

    @staticmethod
    async def _close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, drop what the client still sends (briefly), then close.

        Closing a socket with unread input makes the kernel send a TCP reset,
        and the client's stack (asyncio's among them) then discards the answer
        it had not read yet: a satellite still streaming audio into a full
        server never saw its ``busy``, nor a refused one its ``error``.
        """
        try:
            with contextlib.suppress(Exception):  # whatever state the socket is in, it gets closed
                if not writer.is_closing() and writer.can_write_eof():
                    writer.write_eof()
                async with asyncio.timeout(LINGER_S):
                    dropped = 0
                    while dropped < LINGER_BYTES:
                        data = await reader.read(65536)
                        if not data:
                            break
                        dropped += len(data)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        name = self.service.name
        connection = Connection(name, writer, self.metrics)
        handler = self.service.create_handler(connection)
        bucket = _TokenBucket(self.max_events_per_second)
        try:
            while not connection.closed:
                if bucket.rate and await bucket.take():
                    self.metrics.throttled.labels(name).inc()
                try:
                    event = await read_event(reader, self.limits)
                except ProtocolViolation as violation:
                    self.metrics.protocol_errors.labels(name, violation.code).inc()
                    self.metrics.count(name, "rejected_input")
                    await connection.error(str(violation), violation.code)
                    return
                except TimeoutError:
                    _LOGGER.info(
                        "%s %s: idle for %.0f s, closing", name, connection.peer, self.limits.idle_timeout_s
                    )
                    self.metrics.protocol_errors.labels(name, "idle-timeout").inc()
                    return
                if event is None:
                    return
                try:
                    if not await handler.handle_event(event):
                        return
                except ProtocolViolation as violation:  # bad values inside an event: answer, keep serving
                    self.metrics.count(name, "rejected_input")
                    await connection.error(str(violation), violation.code)
        except ConnectionError:
            _LOGGER.info("%s %s: connection lost", name, connection.peer)
        finally:
            await handler.disconnect()

    async def stop(self, timeout_s: float) -> None:
        """Stop accepting; give running connections ``timeout_s`` to finish, then cancel them."""
        if self._server is not None:
            self._server.close()
        pending = set(self._tasks)
        if pending:
            _, still = await asyncio.wait(pending, timeout=timeout_s)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=2.0)
        for task in set(self._closing):
            task.cancel()
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=2.0)
        if self._server is not None:
            await self._server.wait_closed()


class StartupError(Exception):
    """A service could not answer its smoke request at start-up: refuse to serve."""


class _TokenBucket:
    """Events per second per connection; an empty bucket waits (backpressure), never drops."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(rate, 1.0)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    async def take(self) -> bool:
        """Take one token; returns True when the caller had to wait for it."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return False
        await asyncio.sleep((1 - self.tokens) / self.rate)
        self.tokens = 0.0
        self.stamp = time.monotonic()
        return True


class Runtime:
    """Everything one ``superwhisper`` process serves, with a bounded, ordered shutdown."""

    def __init__(
        self, services: Sequence[WyomingService], context: ServiceContext, *, smoke: bool = True
    ) -> None:
        self.smoke = smoke
        self.services = list(services)
        self.context = context
        self.servers = [ServiceServer(service) for service in self.services]
        self._stop = asyncio.Event()
        self.listening = False
        """Every service's Wyoming port accepts connections (what /readyz waits for)."""
        self._ops: Any = None
        self._discovery: Any = None

    def request_stop(self) -> None:
        self._stop.set()

    async def start(self) -> None:
        settings = self.context.settings
        if settings.metrics.enabled:
            from .ops import OpsServer

            self._ops = OpsServer(self.services, self.context, listening=lambda: self.listening)
            await self._ops.start()
        for service in self.services:
            await service.start()
            if self.smoke:
                try:
                    result = await service.smoke()
                except Exception as error:  # any failure here means the service cannot answer
                    crashed = service.crashed_levels()
                    if not crashed:
                        raise StartupError(f"{service.name}: smoke request failed: {error}") from error
                    # A native crash is this service's fault alone: the others serve, its
                    # workers restart with backoff and its circuits probe them again.
                    _LOGGER.error(
                        "%s: smoke request failed, its engines crashed (%s): serving the other "
                        "services while its workers restart",
                        service.name,
                        "; ".join(crashed),
                    )
                else:
                    _LOGGER.info("%s: smoke request answered: %s", service.name, result)
            self.context.metrics.ready.labels(service.name).set(1 if service.readiness()[0] else 0)
        for server in self.servers:
            await server.start()
        self.listening = True
        if settings.zeroconf.enabled:
            from .discovery import Discovery

            self._discovery = Discovery(settings.zeroconf)
            await self._discovery.register(
                [(s.service.name, s.port) for s in self.servers if s.port is not None]
            )

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT or :meth:`request_stop`, then shut down."""
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
                installed.append(sig)
        try:
            await self.start()
            await self._stop.wait()
            _LOGGER.info("stopping")
        finally:
            await self.shutdown()
            for sig in installed:
                loop.remove_signal_handler(sig)

    async def shutdown(self) -> None:
        self.listening = False
        timeout = self.context.settings.server.shutdown_timeout_s
        if self._discovery is not None:
            await self._discovery.close()
            self._discovery = None
        for server in self.servers:
            await server.stop(timeout)
        for service in self.services:
            await service.stop()
        if self._ops is not None:
            await self._ops.stop()
            self._ops = None
