"""Shared helpers of the reliability tests: raw Wyoming bytes, a server in its own thread,
bounded exchanges, resource snapshots and latency figures.

The fuzz and soak tests drive a real service from a client that runs in a
different event loop (and thread) from the server, so a server that blocks its
loop shows up as a client timeout instead of freezing the test itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from wyoming.event import Event, async_read_event

from tests.conftest import LOOPBACK, serving
from wyoming_superwhisper.runtime.server import WyomingService

# --- raw events ------------------------------------------------------------------


def encode(
    event_type: str, data: dict[str, Any] | None = None, payload: bytes | None = None, *, inline: bool = False
) -> bytes:
    """One event as a Wyoming peer writes it; ``inline`` puts ``data`` in the header line
    (older peers do that, the bounded reader accepts both)."""
    header: dict[str, Any] = {"type": event_type, "version": "1.10.2"}
    body = b""
    if data:
        if inline:
            header["data"] = data
        else:
            body = json.dumps(data, ensure_ascii=False).encode("utf-8")
            header["data_length"] = len(body)
    if payload:
        header["payload_length"] = len(payload)
    return json.dumps(header, ensure_ascii=False).encode("utf-8") + b"\n" + body + (payload or b"")


# --- a served service in a thread of its own -----------------------------------------


class ThreadServer:
    """Runs ``serving(service)`` (tests/conftest.py) on an event loop in a daemon thread."""

    def __init__(self, factory: Callable[[], WyomingService], *, start_timeout_s: float = 300.0) -> None:
        self._factory = factory
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.service: WyomingService | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._run, name="reliability-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(start_timeout_s):
            raise TimeoutError("the service did not start")
        if self._error is not None:
            raise RuntimeError("the service did not start") from self._error

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            self.service = self._factory()
            async with serving(self.service) as server:
                assert server.port is not None
                self.port = server.port
                self._ready.set()
                await self._stop.wait()
        except BaseException as error:  # reported to the test thread
            self._error = error
            self._ready.set()

    def call(self, coroutine: Any, timeout_s: float = 60.0) -> Any:
        """Run a coroutine on the server's loop (to read its state without races)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout_s)

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Poll ``predicate`` on the server's loop until it holds or ``timeout_s`` passes."""

        async def poll() -> bool:
            try:
                async with asyncio.timeout(timeout_s):
                    while not predicate():  # noqa: ASYNC110 (another object's state: no event)
                        await asyncio.sleep(0.01)
            except TimeoutError:
                return False
            return True

        return bool(self.call(poll(), timeout_s + 5))

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


# --- a bounded exchange --------------------------------------------------------------


@dataclass
class Received:
    """What a client got: the events in order, and how the exchange ended."""

    events: list[Event] = field(default_factory=list)
    eof: bool = False
    timed_out: bool = False

    def types(self) -> list[str]:
        return [e.type for e in self.events]

    def count(self, *types: str) -> int:
        return sum(1 for e in self.events if e.type in types)


class RawClient:
    """A TCP client that writes raw bytes and reads events, every wait bounded."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.received = Received()

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection(LOOPBACK, port, limit=4 * 1024 * 1024)
        return cls(reader, writer)

    async def send(self, raw: bytes) -> bool:
        """False when the server already closed (after a protocol violation)."""
        try:
            self.writer.write(raw)
            await self.writer.drain()
        except ConnectionError:
            return False
        return True

    async def half_close(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            if self.writer.can_write_eof():
                self.writer.write_eof()

    async def read_until(self, done: Callable[[Received], bool], timeout_s: float) -> Received:
        """Read events until ``done`` holds, the server closes, or ``timeout_s`` passes."""
        received = self.received
        try:
            async with asyncio.timeout(timeout_s):
                while not done(received):
                    try:
                        event = await async_read_event(self.reader)
                    except ConnectionError:
                        event = None
                    if event is None:
                        received.eof = True
                        break
                    received.events.append(event)
        except TimeoutError:
            received.timed_out = True
        return received

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


# --- audio ---------------------------------------------------------------------------


def pcm16(samples: np.ndarray) -> bytes:
    return np.asarray(samples, dtype="<i2").tobytes()


def audio_seconds(events: Sequence[Event]) -> float:
    """Seconds of 16-bit mono audio in the ``audio-chunk`` events of one answer."""
    start = next((e for e in events if e.type == "audio-start"), None)
    if start is None:
        return 0.0
    rate = int(start.data["rate"])
    total = sum(len(e.payload or b"") for e in events if e.type == "audio-chunk")
    return total / 2 / rate


# --- resources -------------------------------------------------------------------------


def trim_allocator() -> None:
    """Give the C allocator's free pages back to the system (glibc ``malloc_trim``).

    Free memory that glibc keeps in its per-thread arenas is not a leak but makes
    RSS wander by several MiB between two reads; trimmed first, RSS counts what
    is in use. A no-op where the C library has no ``malloc_trim``.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def rss_bytes() -> int:
    """Resident memory of this process now (``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def spread(values: Sequence[float]) -> str:
    """``p50/p95/max`` in milliseconds, for the printed reports."""
    return (
        f"p50 {percentile(values, 50) * 1000:.0f} ms, p95 {percentile(values, 95) * 1000:.0f} ms, "
        f"max {max(values) * 1000:.0f} ms over {len(values)}"
    )


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default
