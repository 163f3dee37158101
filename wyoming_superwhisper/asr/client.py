"""A small Wyoming ASR client: the tests and the benchmark speak to servers through it.

Real socket, the ``wyoming`` library's own client, audio paced in real time
or sent as fast as possible, and the arrival time of the ``transcript`` kept
for latency figures.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event

FINAL_TYPES = ("transcript-stop", "error")


@dataclass
class Exchange:
    """Everything the server sent for one request."""

    events: list[Event] = field(default_factory=list)
    transcript_at: float | None = None
    """``time.monotonic()`` when the ``transcript`` arrived."""
    started_at: float = 0.0
    """``time.monotonic()`` when the first audio chunk was sent (pacing starts there)."""

    @property
    def types(self) -> list[str]:
        return [e.type for e in self.events]

    @property
    def text(self) -> str | None:
        for event in self.events:
            if Transcript.is_type(event.type):
                return Transcript.from_event(event).text
        return None

    @property
    def error(self) -> Error | None:
        for event in self.events:
            if Error.is_type(event.type):
                return Error.from_event(event)
        return None


def pcm_bytes(samples: np.ndarray, width: int = 2) -> bytes:
    """int16 samples (interleaved if stereo) → little-endian PCM of ``width`` bytes."""
    if width == 2:
        return samples.astype("<i2").tobytes()
    if width == 3:
        wide = samples.astype(np.int32) * 256
        raw = wide.astype("<i4").tobytes()
        return b"".join(raw[i : i + 3] for i in range(0, len(raw), 4))
    if width == 4:
        return (samples.astype(np.int64) * 65536).astype("<i4").tobytes()
    raise ValueError(width)


async def read_until_done(client: AsyncTcpClient, exchange: Exchange, final: tuple[str, ...]) -> None:
    while True:
        event = await client.read_event()
        if event is None:
            return
        exchange.events.append(event)
        if Transcript.is_type(event.type) and exchange.transcript_at is None:
            exchange.transcript_at = time.monotonic()
        if event.type in final:
            return


async def transcribe(
    port: int,
    audio: bytes,
    *,
    rate: int = 16000,
    width: int = 2,
    channels: int = 1,
    chunk_ms: int = 20,
    pace: float = 0.0,
    language: str | None = "fr",
    names: list[str] | None = None,
    send_transcribe: bool = True,
    send_stop: bool = True,
    final: tuple[str, ...] = FINAL_TYPES,
    host: str = "127.0.0.1",
) -> Exchange:
    """Send one utterance; ``pace`` 1.0 streams in real time, 0 as fast as possible."""
    exchange = Exchange()
    async with AsyncTcpClient(host, port) as client:
        reader = asyncio.create_task(read_until_done(client, exchange, final))
        if send_transcribe:
            await client.write_event(Transcribe(language=language, transcript_names=names).event())
        await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
        step = int(rate * chunk_ms / 1000) * width * channels
        started = exchange.started_at = time.monotonic()
        for index, offset in enumerate(range(0, len(audio), step)):
            if reader.done():
                break
            chunk = AudioChunk(rate=rate, width=width, channels=channels, audio=audio[offset : offset + step])
            await client.write_event(chunk.event())
            if pace > 0:
                due = started + (index + 1) * chunk_ms / 1000 / pace
                await asyncio.sleep(max(0.0, due - time.monotonic()))
        if send_stop and not reader.done():
            await client.write_event(AudioStop().event())
        await asyncio.wait_for(reader, 120)
    return exchange
