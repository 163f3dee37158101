"""TTS handler and chains over a real socket, with fake voices where the chain is under test.

The fakes inject what real voices do rarely (silence, failures, another sample
rate, a synthesis that takes as long as the test wants); the protocol, the
splitter, the quality gate, resampling and the chain are the real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from wyoming.client import AsyncTcpClient
from wyoming.event import Event
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

from tests.conftest import make_context, make_settings
from wyoming_superwhisper.config import ConfigError
from wyoming_superwhisper.runtime.fallback import EngineError, FallbackChain
from wyoming_superwhisper.runtime.server import ServiceServer
from wyoming_superwhisper.tts.engines import (
    Audio,
    PriorityLock,
    SynthesisOptions,
    TtsEngine,
    check_audio,
    parse_wav,
)
from wyoming_superwhisper.tts.handler import SAMPLES_PER_CHUNK
from wyoming_superwhisper.tts.service import TtsService

CHARS_PER_SECOND = 14.0


def speech_like(text: str, rate: int) -> bytes:
    """A tone as long as a speaker would take to say ``text``."""
    chars = sum(1 for ch in text if ch.isalnum())
    n = int(rate * max(chars, 1) / CHARS_PER_SECOND)
    t = np.arange(n) / rate
    return (np.sin(2 * math.pi * 220 * t) * 8000).astype("<i2").tobytes()


@dataclass
class FakeVoice(TtsEngine):
    name: str = "fake"
    native_rate: int = 22050
    mode: str = "ok"
    """ok | silent | fail | block (waits for ``release``)."""
    answers: int = 1_000_000
    """Calls answered before it starts failing."""
    device: str = "cpu"
    quality: int = 1
    calls: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False

    async def load(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def synthesize(self, text: str, options: SynthesisOptions) -> Audio:
        self.calls.append(text)
        if self.mode == "fail" or len(self.calls) > self.answers:
            raise EngineError(f"{self.name} fails on purpose")
        if self.mode == "silent":
            return Audio(bytes(len(speech_like(text, self.native_rate))), self.native_rate, self.name)
        if self.mode == "block":
            self.started.set()
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        return Audio(speech_like(text, self.native_rate), self.native_rate, self.name)


def make_service(voices: dict[str, list[FakeVoice]], **overrides: Any) -> TtsService:
    settings = make_settings(
        **{"tts.voices": {"fr": [{"model": "espeak-fr"}], "en": [{"model": "espeak-en"}]}, **overrides}
    )
    service = TtsService(make_context(settings))
    for language, engines in voices.items():
        service.routes[language] = FallbackChain(
            f"tts.{language}", engines, timeout_s=10, observer=service.context.metrics
        )
    return service


@contextlib.asynccontextmanager
async def client_of(server: ServiceServer) -> AsyncIterator[AsyncTcpClient]:
    assert server.port is not None
    async with AsyncTcpClient("127.0.0.1", server.port) as client:
        yield client


async def read_answer(client: AsyncTcpClient, last: str = "audio-stop") -> list[Event]:
    """Events up to and including ``last`` (or an error); fails instead of hanging."""
    events: list[Event] = []
    while True:
        event = await asyncio.wait_for(client.read_event(), 30)
        assert event is not None, f"connection closed after {[e.type for e in events]}"
        events.append(event)
        if event.type in (last, "error"):
            return events


def audio_of(events: list[Event]) -> tuple[int, bytes]:
    starts = [e for e in events if e.type == "audio-start"]
    assert len(starts) == 1, [e.type for e in events]
    rate = starts[0].data["rate"]
    assert starts[0].data["width"] == 2 and starts[0].data["channels"] == 1
    chunks = [e for e in events if e.type == "audio-chunk"]
    for chunk in chunks:
        assert (chunk.data["rate"], chunk.data["width"], chunk.data["channels"]) == (rate, 2, 1)
        assert chunk.payload is not None and len(chunk.payload) <= SAMPLES_PER_CHUNK * 2
    assert [e.type for e in events].count("audio-stop") == 1
    return rate, b"".join(c.payload or b"" for c in chunks)


Serve = Callable[..., Any]

TWO_SENTENCES = "Bonjour tout le monde. Il fait beau aujourd'hui."


async def test_one_audio_format_per_answer_when_voices_differ_in_rate(serve: Serve) -> None:
    first = FakeVoice("fast16k", native_rate=16000, answers=1)
    second = FakeVoice("slow22k", native_rate=22050)
    service = make_service({"fr": [first, second]})
    async with serve(service) as server, client_of(server) as client:
        await client.write_event(Synthesize(text=TWO_SENTENCES).event())
        rate, pcm = audio_of(await read_answer(client))
    assert rate == 16000
    assert len(first.calls) == 2 and second.calls == ["Il fait beau aujourd'hui."]
    sentences = ("Bonjour tout le monde.", "Il fait beau aujourd'hui.")
    expected = sum(len(speech_like(s, 16000)) for s in sentences)
    assert abs(len(pcm) - expected) / expected < 0.01  # resampled, not truncated or stretched


async def test_output_rate_setting_resamples_every_answer(serve: Serve) -> None:
    service = make_service({"fr": [FakeVoice(native_rate=22050)]}, **{"tts.output_rate": 16000})
    async with serve(service) as server, client_of(server) as client:
        await client.write_event(Synthesize(text="Bonjour.").event())
        rate, pcm = audio_of(await read_answer(client))
    assert rate == 16000
    assert abs(len(pcm) / 2 / 16000 - len(speech_like("Bonjour", 22050)) / 2 / 22050) < 0.01


async def test_silent_voice_is_rejected_and_next_voice_answers(serve: Serve) -> None:
    silent, good = FakeVoice("silent", mode="silent"), FakeVoice("good")
    service = make_service({"fr": [silent, good]})
    async with serve(service) as server, client_of(server) as client:
        await client.write_event(Synthesize(text="Bonjour.").event())
        _, pcm = audio_of(await read_answer(client))
    assert silent.calls == ["Bonjour."] and good.calls == ["Bonjour."]
    assert np.abs(np.frombuffer(pcm, "<i2")).max() > 1000
    status = service.status()["chains"]["tts.fr"]
    assert status[0]["last_error"].startswith("rejected: silent")
    assert service.context.metrics.requests.labels("tts", "fallback")._value.get() == 1


async def test_every_voice_failing_gives_an_error_and_the_connection_lives_on(serve: Serve) -> None:
    service = make_service({"fr": [FakeVoice("a", mode="fail"), FakeVoice("b", mode="fail")]})
    async with serve(service) as server, client_of(server) as client:
        await client.write_event(Synthesize(text="Bonjour.").event())
        events = await read_answer(client)
        assert events[-1].type == "error"
        assert events[-1].data["code"] == "synthesis-failed"
        assert "a: failed" in events[-1].data["text"] and "b: failed" in events[-1].data["text"]
        await client.write_event(Event("describe"))
        info = await read_answer(client, last="info")
        assert info[-1].type == "info"


async def test_describe_is_answered_while_a_synthesis_is_running(serve: Serve) -> None:
    slow = FakeVoice("slow", mode="block")
    service = make_service({"fr": [slow]})
    async with serve(service) as server, client_of(server) as busy, client_of(server) as other:
        await busy.write_event(Synthesize(text="Bonjour.").event())
        await slow.started.wait()
        await other.write_event(Event("describe"))
        assert (await read_answer(other, last="info"))[-1].type == "info"
        await busy.write_event(Event("describe"))  # same connection, synthesis still running
        assert (await read_answer(busy, last="info"))[-1].type == "info"
        slow.release.set()
        audio_of(await read_answer(busy))


async def test_streaming_protocol_order_and_first_audio_before_last_chunk(serve: Serve) -> None:
    voice = FakeVoice("voice")
    service = make_service({"fr": [voice]})
    text = "Bonjour M. Dupont. Il fait beau. Bonne journée !"
    async with serve(service) as server, client_of(server) as client:
        await client.write_event(SynthesizeStart().event())
        for word in ["Bonjour ", "M. ", "Dupont. ", "Il "]:
            await client.write_event(SynthesizeChunk(text=word).event())
        first = await asyncio.wait_for(client.read_event(), 30)  # before the rest is sent
        assert first is not None and first.type == "audio-start"
        for word in ["fait ", "beau. ", "Bonne ", "journée !"]:
            await client.write_event(SynthesizeChunk(text=word).event())
        await client.write_event(Synthesize(text=text).event())  # compatibility copy: ignored
        await client.write_event(SynthesizeStop().event())
        events = [first, *await read_answer(client, last="synthesize-stopped")]
    types = [e.type for e in events]
    assert types[-2:] == ["audio-stop", "synthesize-stopped"]
    audio_of(events)
    assert voice.calls == ["Bonjour monsieur Dupont.", "Il fait beau.", "Bonne journée !"]


FIRST_CLAUSE, REST = "Il est quinze heures trente,", "et il fait vingt et un degrés dans le salon."
LONG_FIRST_SENTENCE = f"{FIRST_CLAUSE} {REST} Bonne soirée."


@pytest.mark.parametrize(
    ("first_segment_chars", "segments"),
    [
        (40, [FIRST_CLAUSE, REST, "Bonne soirée."]),
        (0, [f"{FIRST_CLAUSE} {REST}", "Bonne soirée."]),
        (80, [f"{FIRST_CLAUSE} {REST}", "Bonne soirée."]),
    ],
)
async def test_a_long_first_sentence_is_said_in_two_parts_as_configured(
    serve: Serve, first_segment_chars: int, segments: list[str]
) -> None:
    """tts.first_segment_chars: the voice gets the first clause alone, whole texts and streams alike."""
    for streaming in (False, True):
        voice = FakeVoice()
        service = make_service({"fr": [voice]}, **{"tts.first_segment_chars": first_segment_chars})
        async with serve(service) as server, client_of(server) as client:
            if streaming:
                await client.write_event(SynthesizeStart().event())
                for word in LONG_FIRST_SENTENCE.split(" "):
                    await client.write_event(SynthesizeChunk(text=word + " ").event())
                await client.write_event(SynthesizeStop().event())
                audio_of(await read_answer(client, last="synthesize-stopped"))
            else:
                await client.write_event(Synthesize(text=LONG_FIRST_SENTENCE).event())
                audio_of(await read_answer(client))
        assert voice.calls == segments, streaming


async def test_streamed_text_over_the_limit_is_refused(serve: Serve) -> None:
    service = make_service({"fr": [FakeVoice()]}, **{"tts.max_chars": 50})
    async with serve(service) as server, client_of(server) as client:
        await client.write_event(SynthesizeStart().event())
        await client.write_event(SynthesizeChunk(text="Bonjour à tous. " * 5).event())
        error = await read_answer(client, last="error")
        assert error[-1].data["code"] == "text-too-long"
        await client.write_event(SynthesizeChunk(text="Encore. ").event())
        await client.write_event(SynthesizeStop().event())
        assert (await read_answer(client, last="synthesize-stopped"))[-1].type == "synthesize-stopped"


async def test_text_over_the_limit_is_refused_and_serving_goes_on(serve: Serve) -> None:
    voice = FakeVoice()
    service = make_service({"fr": [voice]}, **{"tts.max_chars": 20})
    async with serve(service) as server, client_of(server) as client:
        await client.write_event(Synthesize(text="x" * 21).event())
        events = await read_answer(client)
        assert events[-1].data["code"] == "text-too-long"
        await client.write_event(Synthesize(text="Bonjour.").event())
        audio_of(await read_answer(client))
    assert voice.calls == ["Bonjour."]


async def test_voice_and_language_routing(serve: Serve) -> None:
    fr1, fr2, en = FakeVoice("fr1"), FakeVoice("fr2"), FakeVoice("en1")
    service = make_service({"fr": [fr1, fr2], "en": [en]})
    async with serve(service) as server, client_of(server) as client:
        await client.write_event(Synthesize(text="Bonjour.").event())  # no language: tts.language
        audio_of(await read_answer(client))
        await client.write_event(Synthesize(text="Hello.", voice=SynthesizeVoice(language="en-US")).event())
        audio_of(await read_answer(client))
        await client.write_event(Synthesize(text="Salut.", voice=SynthesizeVoice(name="nope")).event())
        unknown = await read_answer(client)
        await client.write_event(Synthesize(text="Hallo.", voice=SynthesizeVoice(language="de")).event())
        german = await read_answer(client)
        await client.write_event(Event("synthesize", {"text": "Salut.", "voice": "fr1"}))
        bad = await read_answer(client)
    assert fr1.calls == ["Bonjour."] and fr2.calls == [] and en.calls == ["Hello."]
    assert unknown[-1].data["code"] == "unknown-voice" and "espeak-fr" in unknown[-1].data["text"]
    assert german[-1].data["code"] == "unsupported-language"
    assert bad[-1].data["code"] == "bad-value"


async def test_named_voice_is_tried_first(serve: Serve) -> None:
    service = make_service({})
    first, second = FakeVoice("espeak-en"), FakeVoice("other")
    service.routes["en"] = FallbackChain("tts.en", [second, first])
    service.voices["espeak-en"].level = 1
    async with serve(service) as server, client_of(server) as client:
        await client.write_event(Synthesize(text="Hello.", voice=SynthesizeVoice(name="espeak-en")).event())
        audio_of(await read_answer(client))
    assert first.calls == ["Hello."] and second.calls == []


async def test_empty_text_gives_an_empty_answer(serve: Serve) -> None:
    voice = FakeVoice(native_rate=16000)
    service = make_service({"fr": [voice]})
    async with serve(service) as server, client_of(server) as client:
        await client.write_event(Synthesize(text=" 😀 ").event())
        rate, pcm = audio_of(await read_answer(client))
    assert (rate, pcm, voice.calls) == (16000, b"", [])


async def test_client_gone_mid_synthesis_cancels_and_server_keeps_serving(serve: Serve) -> None:
    slow = FakeVoice("slow", mode="block")
    service = make_service({"fr": [slow]})
    async with serve(service) as server:
        async with client_of(server) as leaving:
            await leaving.write_event(Synthesize(text="Bonjour.").event())
            await slow.started.wait()
        for _ in range(100):
            if slow.cancelled:
                break
            await asyncio.sleep(0.05)
        assert slow.cancelled
        slow.mode = "ok"
        async with client_of(server) as staying:
            await staying.write_event(Synthesize(text="Bonjour.").event())
            audio_of(await read_answer(staying))


def test_quality_gate_table() -> None:
    text = "Bonjour tout le monde"
    good = Audio(speech_like(text, 22050), 22050)
    assert check_audio(good, text) is None
    assert check_audio(Audio(b"", 22050), text) == "no audio"
    assert (check_audio(Audio(bytes(44100), 22050), text) or "").startswith("silent")
    assert "too short" in (check_audio(Audio(speech_like("a", 22050)[:200], 22050), text) or "")
    assert "too long" in (check_audio(Audio(speech_like(text * 10, 22050), 22050), text) or "")
    assert check_audio(Audio(speech_like(text * 2, 22050), 22050), text, length_scale=2.0) is None


def test_parse_wav_tolerates_piped_sizes() -> None:
    pcm = speech_like("Bonjour", 22050)
    header = b"RIFF" + struct.pack("<I", 0x7FFFFFFF) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, 22050, 44100, 2, 16)
    header += b"data" + struct.pack("<I", 0x7FFFFFFF)
    assert parse_wav(header + pcm) == (22050, pcm)
    with pytest.raises(EngineError):
        parse_wav(b"not a wav at all")


def test_resampling_keeps_the_duration() -> None:
    audio = Audio(speech_like("Bonjour tout le monde", 22050), 22050)
    out = audio.resampled(16000)
    assert out.rate == 16000 and abs(out.seconds - audio.seconds) < 0.002
    assert audio.resampled(22050) is audio


async def test_priority_lock_serves_first_segments_first_then_arrival_order() -> None:
    lock = PriorityLock()
    order: list[str] = []
    gate = asyncio.Event()

    async def use(name: str, priority: tuple[float, float]) -> None:
        async with lock.hold(priority):
            order.append(name)
            if name == "holder":
                await gate.wait()

    holder = asyncio.create_task(use("holder", (0, 0)))
    await asyncio.sleep(0)
    waiters = [
        asyncio.create_task(use(name, priority))
        for name, priority in [
            ("a-rest", (1, 1.0)),
            ("b-first", (0, 2.0)),
            ("c-rest", (1, 0.5)),
            ("d-first", (0, 1.5)),
        ]
    ]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(holder, *waiters)
    assert order == ["holder", "d-first", "b-first", "c-rest", "a-rest"]
    assert not lock.locked


async def test_priority_lock_survives_cancelled_waiters() -> None:
    lock = PriorityLock()
    gate = asyncio.Event()
    got: list[str] = []

    async def hold() -> None:
        async with lock.hold():
            await gate.wait()

    async def wait(name: str) -> None:
        async with lock.hold():
            got.append(name)

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    doomed, patient = asyncio.create_task(wait("doomed")), asyncio.create_task(wait("patient"))
    await asyncio.sleep(0)
    doomed.cancel()
    gate.set()
    await asyncio.gather(holder, patient)
    with contextlib.suppress(asyncio.CancelledError):
        await doomed
    assert got == ["patient"] and not lock.locked


async def test_over_long_stream_queued_behind_an_answer_is_refused_without_hanging(serve: Serve) -> None:
    slow = FakeVoice("slow", mode="block")
    service = make_service({"fr": [slow]}, **{"tts.max_chars": 50})
    async with serve(service) as server, client_of(server) as client:
        await client.write_event(Synthesize(text="Bonjour.").event())
        await slow.started.wait()  # the first answer holds the voice
        await client.write_event(SynthesizeStart().event())  # its answer waits behind it
        await client.write_event(Event("describe"))
        await read_answer(client, last="info")  # the stream's task is now waiting
        await client.write_event(SynthesizeChunk(text="a" * 51).event())
        error = await read_answer(client, last="error")
        assert error[-1].data["code"] == "text-too-long"
        await client.write_event(SynthesizeStop().event())
        assert (await read_answer(client, last="synthesize-stopped"))[-1].type == "synthesize-stopped"
        slow.release.set()
        audio_of(await read_answer(client))


async def test_hanging_up_with_answers_queued_closes_the_connection(serve: Serve) -> None:
    slow = FakeVoice("slow", mode="block")
    service = make_service({"fr": [slow]})
    async with serve(service) as server:
        async with client_of(server) as leaving:
            await leaving.write_event(Synthesize(text="Bonjour.").event())
            await slow.started.wait()
            await leaving.write_event(SynthesizeStart().event())  # queued behind the first
            await leaving.write_event(Synthesize(text="Encore.").event())
        for _ in range(200):
            if server.active == 0:
                break
            await asyncio.sleep(0.05)
        assert server.active == 0  # the handler did not hang on its queued answers
        assert slow.cancelled


def cache_counts(service: TtsService) -> tuple[float, float]:
    counter = service.context.metrics.tts_cache
    return counter.labels("hit")._value.get(), counter.labels("miss")._value.get()


async def say(server: ServiceServer, text: str) -> bytes:
    async with client_of(server) as client:
        await client.write_event(Synthesize(text=text).event())
        return audio_of(await read_answer(client))[1]


async def test_a_segment_said_again_comes_from_the_cache_not_the_voice(serve: Serve) -> None:
    voice = FakeVoice()
    service = make_service({"fr": [voice]})
    async with serve(service) as server:
        first = await say(server, "C'est fait.")
        again = await say(server, "C'est fait.")
        async with client_of(server) as client:  # streamed, the cached sentence first
            await client.write_event(SynthesizeStart().event())
            await client.write_event(SynthesizeChunk(text="C'est fait. Autre chose ?").event())
            await client.write_event(SynthesizeStop().event())
            _, streamed = audio_of(await read_answer(client, last="synthesize-stopped"))
    assert voice.calls == ["C'est fait.", "Autre chose ?"]
    assert again == first and streamed.startswith(first) and len(streamed) > len(first)
    assert cache_counts(service) == (2, 2)


async def test_a_fallback_voice_audio_is_not_kept(serve: Serve) -> None:
    broken, spare = FakeVoice("broken", mode="fail"), FakeVoice("spare")
    service = make_service({"fr": [broken, spare]})
    async with serve(service) as server:
        await say(server, "Bonjour.")
        await say(server, "Bonjour.")
    assert spare.calls == ["Bonjour.", "Bonjour."]  # asked again: the first voice may be back
    assert cache_counts(service) == (0, 2)


async def test_the_cache_forgets_the_least_recently_said_past_its_size_and_can_be_off(serve: Serve) -> None:
    texts = [f"Bonjour {word}." for word in ("aaa", "bbb", "ccc", "ddd", "eee")]
    size = len(speech_like(texts[0], 22050))  # 31,500 bytes each: 4.5 of them fit
    voice = FakeVoice()
    service = make_service({"fr": [voice]}, **{"tts.cache_mb": 4.5 * size / 1024 / 1024})
    async with serve(service) as server:
        for text in texts:
            await say(server, text)
        await say(server, texts[4])  # kept
        await say(server, texts[0])  # pushed out by the fifth
    assert voice.calls == [*texts, texts[0]]
    off_voice = FakeVoice()
    off = make_service({"fr": [off_voice]}, **{"tts.cache_mb": 0})
    async with serve(off) as server:
        await say(server, texts[0])
        await say(server, texts[0])
    assert off_voice.calls == [texts[0], texts[0]]
    assert cache_counts(off) == (0, 0)


def test_a_negative_cache_size_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError) as error:
        make_service({}, **{"tts.cache_mb": -1})
    assert error.value.key == "tts.cache_mb"


async def test_kept_segments_outlive_a_restart_in_the_cache_dir(serve: Serve, tmp_path: Path) -> None:
    """With ``tts.cache_dir`` a new server (a restart) says a segment the old one kept without its
    voice; another voice (another name) does not get that audio."""
    folder = tmp_path / "segments"
    before = FakeVoice()
    async with serve(make_service({"fr": [before]}, **{"tts.cache_dir": str(folder)})) as server:
        first = await say(server, "C'est fait.")
    assert [p.suffix for p in folder.iterdir()] == [".wav"]
    after = FakeVoice()
    restarted = make_service({"fr": [after]}, **{"tts.cache_dir": str(folder)})
    async with serve(restarted) as server:
        assert await say(server, "C'est fait.") == first
        assert await say(server, "C'est fait.") == first  # then from memory
    assert after.calls == [] and cache_counts(restarted) == (2, 0)
    other = FakeVoice("other")
    async with serve(make_service({"fr": [other]}, **{"tts.cache_dir": str(folder)})) as server:
        await say(server, "C'est fait.")
    assert other.calls == ["C'est fait."]


async def test_the_cache_dir_keeps_to_its_size_and_drops_a_broken_file(serve: Serve, tmp_path: Path) -> None:
    texts = [f"Bonjour {word}." for word in ("aaa", "bbb", "ccc", "ddd", "eee", "fff")]
    size = len(speech_like(texts[0], 22050)) + 44  # a WAV header each
    folder = tmp_path / "segments"
    settings = {"tts.cache_dir": str(folder), "tts.cache_mb": 4.5 * size / 1024 / 1024}
    async with serve(make_service({"fr": [FakeVoice()]}, **settings)) as server:
        for text in texts:
            await say(server, text)
            await asyncio.sleep(0.01)  # distinct modification times: the oldest goes first
    files = list(folder.glob("*.wav"))
    assert len(files) == 4 and sum(f.stat().st_size for f in files) <= 4.5 * size
    newest = max(files, key=lambda f: f.stat().st_mtime)
    newest.write_bytes(b"RIFF broken")
    voice = FakeVoice()
    async with serve(make_service({"fr": [voice]}, **settings)) as server:
        await say(server, texts[5])  # its file was broken: said again, and kept anew
        await say(server, texts[4])  # kept
        await say(server, texts[0])  # removed for the size
    assert voice.calls == [texts[5], texts[0]]


async def until(predicate: Callable[[], bool], limit_s: float = 10.0) -> None:
    for _ in range(int(limit_s / 0.01)):  # bounded: background work of the service
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not reached in time")


async def test_offered_phrases_are_prepared_when_idle_and_then_said_from_the_cache(serve: Serve) -> None:
    """What another service of the process offers (the handle's confirmations) is rendered while
    no answer is in flight; its first request is then a hit."""
    voice = FakeVoice()
    service = make_service({"fr": [voice]})
    async with serve(service) as server:
        assert service.in_flight.try_enter()  # an answer in flight: preparing waits for it
        phrases = ["J'ai allumé la cafetière.", "C'est fait.", "C'est fait."]
        assert service.context.phrases.offer("fr", phrases) == 2
        await asyncio.sleep(0.2)
        assert voice.calls == []
        service.in_flight.leave()
        await until(lambda: len(voice.calls) == 2)
        assert (
            await say(server, "J'ai allumé la cafetière.")
            == Audio(speech_like("J'ai allumé la cafetière.", 22050), 22050).pcm
        )
        assert service.context.phrases.offer("fr", ["C'est fait."]) == 0  # offered once only
    assert voice.calls == ["J'ai allumé la cafetière.", "C'est fait."]
    counter = service.context.metrics.tts_cache
    assert counter.labels("prepared")._value.get() == 2 and counter.labels("hit")._value.get() == 1


async def test_nothing_is_prepared_without_a_cache(serve: Serve) -> None:
    voice = FakeVoice()
    service = make_service({"fr": [voice]}, **{"tts.cache_mb": 0})
    async with serve(service):
        service.context.phrases.offer("fr", ["C'est fait."])
        await asyncio.sleep(0.2)
    assert voice.calls == []
