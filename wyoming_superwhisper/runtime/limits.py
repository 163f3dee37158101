"""Bounded Wyoming event reader: sizes are checked before anything is read into memory.

The ``wyoming`` library's reader trusts ``data_length`` and ``payload_length``
from the header and turns parse errors into a silent disconnect. Here a
header over the cap, a length over the cap, invalid JSON or a malformed event
raises :class:`ProtocolViolation` with a code the server sends back in an
``error`` event before closing; a client that stalls mid-event or stays idle
too long gets :class:`TimeoutError`.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from typing import Any

from wyoming.event import Event

from ..config import ServerSettings


@dataclass
class ClientEvent(Event):
    """An event as read from a client, with the ``version`` of its header.

    Every Wyoming peer writes its library's release in each header; a server
    that answers newer clients with newer events (a handle's intents for
    Wyoming 1.9+) reads it here. None when the header had none.
    """

    version: str | None = None


class ProtocolViolation(Exception):
    """The client sent something no valid Wyoming peer sends; the connection will close."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


@dataclass(frozen=True)
class ReadLimits:
    max_header_bytes: int = 64 * 1024
    max_data_bytes: int = 1024 * 1024
    max_payload_bytes: int = 1024 * 1024
    idle_timeout_s: float = 60.0

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> ReadLimits:
        return cls(
            settings.max_header_bytes,
            settings.max_data_bytes,
            settings.max_payload_bytes,
            settings.idle_timeout_s,
        )


async def read_event(reader: asyncio.StreamReader, limits: ReadLimits) -> Event | None:
    """Read one event, or None at a clean end of stream.

    The whole event (header, data, payload) must arrive within ``idle_timeout_s``,
    so neither an idle client nor one trickling a header byte by byte holds a slot.
    The reader's own ``limit`` must be at least ``max_header_bytes`` (the server
    creates it so).
    """
    async with asyncio.timeout(limits.idle_timeout_s):
        return await _read_event(reader, limits)


async def _read_event(reader: asyncio.StreamReader, limits: ReadLimits) -> Event | None:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as error:
        if not error.partial.strip():
            return None
        raise ProtocolViolation("truncated", "connection closed in the middle of an event header") from error
    except asyncio.LimitOverrunError as error:
        raise ProtocolViolation(
            "header-too-large", f"event header longer than {limits.max_header_bytes} bytes"
        ) from error
    if len(line) > limits.max_header_bytes:
        raise ProtocolViolation(
            "header-too-large", f"event header longer than {limits.max_header_bytes} bytes"
        )
    header = _parse_json_object(line, "header")
    event_type = header.get("type")
    if not isinstance(event_type, str) or not event_type:
        raise ProtocolViolation("bad-event", "event header has no 'type' string")
    data = header.get("data") or {}
    if not isinstance(data, dict):
        raise ProtocolViolation("bad-event", "event 'data' must be a JSON object")
    data_length = _length(header, "data_length", limits.max_data_bytes)
    payload_length = _length(header, "payload_length", limits.max_payload_bytes)
    if data_length:
        extra = _parse_json_object(await _read_exactly(reader, data_length), "data")
        data.update(extra)
    payload = await _read_exactly(reader, payload_length) if payload_length else None
    version = header.get("version")
    return ClientEvent(
        type=event_type, data=data, payload=payload, version=version if isinstance(version, str) else None
    )


def _length(header: dict[str, Any], key: str, cap: int) -> int:
    value = header.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolViolation("bad-event", f"'{key}' must be a non-negative integer")
    if value > cap:
        raise ProtocolViolation("too-large", f"'{key}' {value} exceeds the limit of {cap} bytes")
    return value


async def _read_exactly(reader: asyncio.StreamReader, count: int) -> bytes:
    try:
        return await reader.readexactly(count)
    except asyncio.IncompleteReadError as error:
        raise ProtocolViolation("truncated", "connection closed in the middle of an event") from error


def _parse_json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as error:
        raise ProtocolViolation("bad-encoding", f"event {what} is not valid UTF-8") from error
    except ValueError as error:
        raise ProtocolViolation("bad-json", f"event {what} is not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise ProtocolViolation("bad-event", f"event {what} must be a JSON object")
    return value


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def finite_number(data: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    """A numeric field from event data, checked: handlers use it for rates, widths, speeds."""
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolViolation("bad-value", f"'{key}' must be a number, got {value!r}")
    try:
        number = float(value)  # an int beyond float range (10**400 is valid JSON) overflows here
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ProtocolViolation("bad-value", f"'{key}' must be a finite number, got {str(value)[:40]}")
    if not low <= number <= high:
        raise ProtocolViolation("bad-value", f"'{key}' must be between {low:g} and {high:g}, got {value!r}")
    return number


class InFlight:
    """Requests a service is answering, capped: over the cap a client is told ``busy`` at once.

    Waiting behind a long queue is worse for a voice assistant than a quick
    "busy": the user would hear the answer long after asking. ``gauge``, when
    given, follows the count (``superwhisper_queue_depth``).
    """

    def __init__(self, limit: int, gauge: Any = None) -> None:
        self.limit = max(1, limit)
        self.count = 0
        self._gauge = gauge
        self._idle: asyncio.Event | None = None

    async def idle(self) -> None:
        """Return once no request is being answered (background work waits for it)."""
        if self._idle is None:
            self._idle = asyncio.Event()
        while self.count:
            self._idle.clear()
            await self._idle.wait()

    def try_enter(self) -> bool:
        """Count one request in; False when ``limit`` are already being answered."""
        if self.count >= self.limit:
            return False
        self.count += 1
        self._report()
        return True

    def leave(self) -> None:
        self.count = max(0, self.count - 1)
        self._report()
        if not self.count and self._idle is not None:
            self._idle.set()

    def _report(self) -> None:
        if self._gauge is not None:
            self._gauge.set(self.count)
