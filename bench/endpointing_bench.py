"""Endpointing: fixed silence versus semantic (Smart Turn v3.2 + text cues), side by side.

One ASR service per mode (whisper-base int8 on the CPU, beam 5, Silero in
process, Smart Turn in its worker), the same ``asr.endpointing_s`` (the fixed
endpoint, and the semantic mode's longest wait), the same audio streamed in
real time in 20 ms chunks without ``audio-stop``, and the home's names as
transcription hints (what ``asr.hass_url`` gives). The sets are said by our
TTS's natural voices (``--voice natural``, default: Kokoro ff_siwis in French,
Piper joe in English, standing in for a person) or by espeak-ng (``--voice
espeak``: whisper-base garbles its French, and doubts it). Two sets:

* complete commands (10 French, 5 English), speech then silence: latency
  from the end of speech (its last sample sent) to the ``transcript``, p50/p95;
* sentences with a pause in the middle (25 French, 15 English): the natural
  voices pause in two ways (``--styles``): ``trailing``, the words before the
  pause said apart with a trailing "…" (an unfinished ending, but a falling
  tone), and ``cut``, the whole sentence said at once and cut at the word
  boundary (found by Whisper's word timestamps), so the first half keeps the
  pitch of a sentence that goes on; ``--pause`` seconds of silence between.
  espeak-ng's comma pause is stretched to ``--pause`` instead. A *false
  cut-off* is a transcript that arrives before the words after the pause were
  sent; those whose first half is a whole sentence itself ("Allume la
  lumière… du salon") are counted apart too.

Also the cost of one Smart Turn verdict: the model in process and through
its worker (``server.engine_workers``), p50 over 30 runs.

    flock /tmp/heavy.lock .venv/bin/python -m bench.endpointing_bench [--turn-pause 0.2,0.1] [--voice espeak]

Results go to ``bench/results/endpointing-<date>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import wyoming.audio  # noqa: F401  (audioop is deprecated; harmless here)

import numpy as np
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart
from wyoming.client import AsyncTcpClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import make_context  # noqa: E402
from wyoming_superwhisper.asr.client import pcm_bytes  # noqa: E402
from wyoming_superwhisper.asr.service import AsrService  # noqa: E402
from wyoming_superwhisper.asr.turn import SMART_TURN_REF, SmartTurnModel  # noqa: E402
from wyoming_superwhisper.audio import AudioConverter  # noqa: E402
from wyoming_superwhisper.config import Settings, load_settings  # noqa: E402
from wyoming_superwhisper.runtime.metrics import Metrics  # noqa: E402
from wyoming_superwhisper.runtime.registry import ModelRegistry  # noqa: E402
from wyoming_superwhisper.runtime.server import ServiceServer  # noqa: E402
from wyoming_superwhisper.runtime.worker import WorkerOptions, supervised  # noqa: E402

_LOGGER = logging.getLogger("endpointing_bench")
RATE = 16000
COMPLETE = [
    ("fr", "Allume la lumière du salon."),
    ("fr", "Ferme la porte du garage."),
    ("fr", "Éteins la cuisine."),
    ("fr", "Quelle heure est-il ?"),
    ("fr", "Mets un minuteur de cinq minutes."),
    ("fr", "Ouvre les volets de la chambre."),
    ("fr", "Quelle est la météo pour demain ?"),
    ("fr", "Baisse le chauffage du bureau."),
    ("fr", "Oui."),
    ("fr", "Quelle est la capitale de la France ?"),
    ("en", "Turn on the kitchen lights."),
    ("en", "Close the garage door."),
    ("en", "What time is it?"),
    ("en", "Set a timer for five minutes."),
    ("en", "Yes."),
]
PAUSED = [
    ("fr", "Allume la lumière", "du salon."),
    ("fr", "Mets un minuteur de", "cinq minutes."),
    ("fr", "Ferme la porte du", "garage."),
    ("fr", "Ouvre les volets de", "la chambre."),
    ("fr", "Quelle est la météo pour", "demain ?"),
    ("fr", "Baisse le chauffage du", "bureau."),
    ("fr", "Éteins la lampe de", "la cuisine."),
    ("fr", "Quelle est la capitale de", "la France ?"),
    ("fr", "Règle le thermostat à", "vingt degrés."),
    ("fr", "Allume la lampe et", "ferme les volets."),
    ("en", "Turn on the", "living room lamp."),
    ("en", "Set a timer for", "five minutes."),
    ("en", "What is the weather like", "tomorrow?"),
    ("en", "Close the garage door and", "turn off the lights."),
    ("en", "Turn off the lights in", "the kitchen."),
    # Added 2026-12-07 (15 became 40): where people stop to find the next word.
    ("fr", "Allume la lumière de", "la chambre."),
    ("fr", "Mets le chauffage à", "vingt et un degrés."),
    ("fr", "Ferme les volets du", "salon."),
    ("fr", "Quelle température fait-il dans", "le bureau ?"),
    ("fr", "Éteins toutes les lumières", "du rez-de-chaussée."),
    ("fr", "Lance la musique dans", "la cuisine."),
    ("fr", "Baisse le volume de", "la télé."),
    ("fr", "Rappelle-moi d'acheter", "du pain."),
    ("fr", "Est-ce que la porte du garage", "est fermée ?"),
    ("fr", "Allume la lampe", "de chevet."),
    ("fr", "Quel temps fera-t-il", "demain matin ?"),
    ("fr", "Ajoute du lait à", "la liste de courses."),
    ("fr", "Ouvre la porte", "du garage."),
    ("fr", "Mets un minuteur pour", "les pâtes."),
    ("fr", "Combien de temps reste-t-il sur", "le minuteur ?"),
    ("en", "Turn on the lights in", "the bedroom."),
    ("en", "Set the heating to", "twenty one degrees."),
    ("en", "What is the temperature in", "the living room?"),
    ("en", "Close the blinds in", "the office."),
    ("en", "Play some music in", "the kitchen."),
    ("en", "Add milk to", "the shopping list."),
    ("en", "Is the front door", "locked?"),
    ("en", "Turn off all the lights", "downstairs."),
    ("en", "Remind me to call", "my mother."),
    ("en", "How long is left on", "the timer?"),
]
WHOLE_BEFORE = frozenset(
    [
        "Allume la lumière",
        "Allume la lampe",
        "Ouvre la porte",
        "Éteins toutes les lumières",
        "Quel temps fera-t-il",
        "What is the weather like",
        "Turn off all the lights",
    ]
)
"""First halves that are a whole command or question themselves: only the voice can tell
that more is coming (reported apart: ``false_cuts_whole_before``)."""
NAMES = [
    "lumière du salon",
    "salon",
    "cuisine",
    "chambre",
    "bureau",
    "porte du garage",
    "volets de la chambre",
    "lampe de la cuisine",
    "chauffage du bureau",
    "thermostat",
    "kitchen lights",
    "garage door",
    "living room lamp",
    "kitchen",
]
"""The home's entity and area names, given as hints as Home Assistant's would be."""


def espeak(text: str, voice: str) -> np.ndarray:
    """espeak-ng speech as int16 at 16 kHz, its own leading/trailing silence cut."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise SystemExit("espeak-ng is needed (Debian package espeak-ng)")
    raw = subprocess.run([binary, "-v", voice, "--stdout", text], check=True, capture_output=True).stdout
    index = raw.find(b"data")
    fmt = raw.find(b"fmt ")
    channels = int.from_bytes(raw[fmt + 10 : fmt + 12], "little")
    rate = int.from_bytes(raw[fmt + 12 : fmt + 16], "little")
    width = int.from_bytes(raw[fmt + 22 : fmt + 24], "little") // 8
    converter = AudioConverter(rate, width, channels)
    samples = np.concatenate([converter.convert(raw[index + 8 :]), converter.flush()])
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype(np.int16)
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > 300)
    return pcm[loud[0] : loud[-1] + 1]


def paused(before: str, after: str, voice: str, pause_s: float) -> tuple[np.ndarray, int]:
    """``before, after`` as one sentence, its comma pause stretched; and where ``after`` starts."""
    return stretch_pause(espeak(f"{before}, {after}", voice), pause_s)


def settings_for(
    mode: str,
    endpointing_s: float,
    turn_pause_s: float = 0.2,
    turn_decode_pause_s: float = 0.1,
    cpu_threads: int | None = None,
) -> Settings:
    """``cpu_threads`` None: the server's default for a CPU level."""
    options: dict[str, Any] = {"compute_type": "int8"}
    if cpu_threads is not None:
        options["cpu_threads"] = cpu_threads
    return load_settings(
        environ={},
        overrides={
            "models.environment": "test",
            "asr.uri": "tcp://127.0.0.1:0",
            "asr.endpointing_s": endpointing_s,
            "asr.endpointing": mode,
            "asr.turn_pause_s": turn_pause_s,
            "asr.turn_decode_pause_s": turn_decode_pause_s,
            "asr.beam_size": 5,
            "asr.chain": [{"model": "whisper-base", "device": "cpu", "options": options}],
            "zeroconf.enabled": False,
            "metrics.enabled": False,
        },
    )


async def stream(port: int, audio: np.ndarray, language: str) -> tuple[float, float, str]:
    """Real-time stream without audio-stop; (start time, transcript time, text)."""
    async with AsyncTcpClient("127.0.0.1", port) as client:
        arrived: list[tuple[float, str]] = []

        async def read() -> None:
            while True:
                event = await client.read_event()
                if event is None:
                    return
                if Transcript.is_type(event.type):
                    arrived.append((time.monotonic(), Transcript.from_event(event).text))
                if event.type in ("transcript-stop", "error"):
                    return

        reader = asyncio.create_task(read())
        await client.write_event(Transcribe(language=language, transcript_names=NAMES).event())
        await client.write_event(AudioStart(rate=RATE, width=2, channels=1).event())
        payload = pcm_bytes(audio)
        step = RATE // 50 * 2
        started = time.monotonic()
        for index, offset in enumerate(range(0, len(payload), step)):
            if reader.done():
                break
            chunk = AudioChunk(rate=RATE, width=2, channels=1, audio=payload[offset : offset + step])
            await client.write_event(chunk.event())
            await asyncio.sleep(max(0.0, started + (index + 1) * 0.02 - time.monotonic()))
        await asyncio.wait_for(reader, 60)
    if not arrived:
        return started, float("nan"), ""
    return started, arrived[0][0], arrived[0][1]


class VerdictLog(logging.Handler):
    """The ASR handler's end-of-turn verdicts (its debug line), kept per streamed clip: what the
    judge heard at each pause, Smart Turn's probability and the text cue."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.verdicts: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not (isinstance(record.msg, str) and record.msg.startswith("asr %s: turn ") and record.args):
            return
        try:
            _, decision, reason, probability, cue, logprob, _ms, text = record.args  # type: ignore[misc]
        except ValueError:  # the line changed: say so, never raise into the server
            self.handleError(record)
            return
        self.verdicts.append(
            {
                "decision": decision,
                "reason": reason,
                "p": probability,
                "cue": cue,
                "avg_logprob": round(float(logprob), 3),
                "text": text,
            }
        )

    def take(self) -> list[dict[str, Any]]:
        taken, self.verdicts = self.verdicts, []
        return taken


VERDICTS = VerdictLog()


def decisions(metrics: Metrics) -> dict[str, float]:
    counts: dict[str, float] = {}
    for metric in metrics.endpoint_decisions.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                key = f"{sample.labels['decision']}:{sample.labels['reason']}"
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values), q))


async def run_mode(mode: str, args: argparse.Namespace, audio: dict[str, Any]) -> dict[str, Any]:
    settings = settings_for(
        mode,
        args.endpointing,
        getattr(args, "current_turn_pause", 0.2),
        getattr(args, "current_decode_pause", 0.1),
        getattr(args, "current_cpu_threads", None),
    )
    context = make_context(settings)
    metrics = context.metrics
    service = AsrService(context)
    server = ServiceServer(service)
    await service.start()
    await server.start()
    port = server.port or 0
    complete_rows: list[dict[str, Any]] = []
    paused_rows: list[dict[str, Any]] = []
    try:
        await stream(port, audio["warm"], "fr")  # first decode pays CTranslate2's warm-up
        for (language, text), (speech, lead) in zip(COMPLETE, audio["complete"], strict=True):
            clip = np.concatenate([np.zeros(lead, np.int16), speech, np.zeros(int(3.0 * RATE), np.int16)])
            VERDICTS.take()
            started, at, heard = await stream(port, clip, language)
            latency = at - (started + (lead + len(speech)) / RATE)
            complete_rows.append(
                {
                    "language": language,
                    "text": text,
                    "heard": heard,
                    "latency_s": latency,
                    "verdicts": VERDICTS.take(),
                }
            )
            _LOGGER.info("%s complete %-40s %.3f s  %r", mode, text, latency, heard)
        before_paused = decisions(metrics)
        for style, clips in audio["paused"].items():
            for (language, before, after), made in zip(PAUSED, clips, strict=True):
                if made is None:
                    continue
                sentence, resume, lead = made
                clip = np.concatenate(
                    [np.zeros(lead, np.int16), sentence, np.zeros(int(3.0 * RATE), np.int16)]
                )
                VERDICTS.take()
                started, at, heard = await stream(port, clip, language)
                resumed_at = started + (lead + resume) / RATE
                cut = bool(at < resumed_at)
                paused_rows.append(
                    {
                        "style": style,
                        "language": language,
                        "text": f"{before}… {after}",
                        "whole_before": before in WHOLE_BEFORE,
                        "heard": heard,
                        "false_cut": cut,
                        "transcript_after_end_s": at - (started + (lead + len(sentence)) / RATE),
                        "verdicts": VERDICTS.take(),
                    }
                )
                _LOGGER.info("%s %s paused %-45s cut=%s %r", mode, style, f"{before}… {after}", cut, heard)
        after_paused = decisions(metrics)
        if mode == "semantic" and not any(row["verdicts"] for row in complete_rows):
            _LOGGER.warning("semantic: no verdict was recorded: the judge did not run (see the server's log)")
    finally:
        await server.stop(2.0)
        await service.stop()
    latencies = [row["latency_s"] for row in complete_rows]
    cuts = [row["false_cut"] for row in paused_rows]
    by_language = {
        language: {
            "complete_p50_s": percentile(
                [r["latency_s"] for r in complete_rows if r["language"] == language], 50
            ),
            "false_cuts": sum(r["false_cut"] for r in paused_rows if r["language"] == language),
            "paused_count": sum(1 for r in paused_rows if r["language"] == language),
        }
        for language in ("fr", "en")
    }
    return {
        "endpointing": mode,
        "endpointing_s": args.endpointing,
        "turn_pause_s": getattr(args, "current_turn_pause", None) if mode == "semantic" else None,
        "turn_decode_pause_s": getattr(args, "current_decode_pause", None) if mode == "semantic" else None,
        "complete": {
            "count": len(latencies),
            "p50_s": percentile(latencies, 50),
            "p95_s": percentile(latencies, 95),
            "mean_s": statistics.fmean(latencies),
            "target_p50_s": 0.35,
            "rows": complete_rows,
        },
        "paused": {
            "count": len(cuts),
            "pause_s": args.pause,
            "false_cuts": sum(cuts),
            "false_cut_rate": sum(cuts) / len(cuts),
            "target_rate": 0.02,
            "by_style": {
                style: {
                    "count": sum(1 for r in paused_rows if r["style"] == style),
                    "false_cuts": sum(r["false_cut"] for r in paused_rows if r["style"] == style),
                    "false_cuts_whole_before": sum(
                        r["false_cut"] for r in paused_rows if r["style"] == style and r["whole_before"]
                    ),
                    "whole_before_count": sum(
                        1 for r in paused_rows if r["style"] == style and r["whole_before"]
                    ),
                }
                for style in audio["paused"]
            },
            "rows": paused_rows,
        },
        "by_language": by_language,
        "decisions_complete_set": before_paused,
        "decisions_all": after_paused,
    }


async def threads_side_by_side(
    threads: Sequence[int], args: argparse.Namespace, audio: dict[str, Any], rounds: int = 3
) -> dict[str, Any]:
    """The complete commands, semantic endpointing, one server per CTranslate2 thread count,
    clip after clip in alternating order: the machine's drift hits both alike (run one
    after the other, two modes differ by as much as the drift, ~1.5x within a day here)."""
    servers: dict[int, tuple[AsrService, ServiceServer]] = {}
    latencies: dict[int, list[float]] = {count: [] for count in threads}
    try:
        for count in threads:
            settings = settings_for("semantic", args.endpointing, cpu_threads=count)
            service = AsrService(make_context(settings))
            server = ServiceServer(service)
            await service.start()
            await server.start()
            servers[count] = (service, server)
            await stream(server.port or 0, audio["warm"], "fr")
        for round_index in range(rounds):
            for index, ((language, text), (speech, lead)) in enumerate(
                zip(COMPLETE, audio["complete"], strict=True)
            ):
                clip = np.concatenate([np.zeros(lead, np.int16), speech, np.zeros(int(3.0 * RATE), np.int16)])
                order = list(threads) if (index + round_index) % 2 == 0 else list(threads)[::-1]
                for count in order:
                    started, at, heard = await stream(servers[count][1].port or 0, clip, language)
                    latencies[count].append(at - (started + (lead + len(speech)) / RATE))
                    _LOGGER.info("threads %d %-40s %.3f s %r", count, text, latencies[count][-1], heard)
    finally:
        for service, server in servers.values():
            await server.stop(2.0)
            await service.stop()
    return {
        "rounds": rounds,
        **{
            f"threads@{count}": {
                "count": len(values),
                "p50_s": percentile(values, 50),
                "p95_s": percentile(values, 95),
                "mean_s": statistics.fmean(values),
            }
            for count, values in latencies.items()
        },
    }


async def smart_turn_cost(runs: int = 30) -> dict[str, Any]:
    """p50 of one Smart Turn probability: in process, and through a supervised worker."""
    settings = settings_for("semantic", 0.8)
    path = str(ModelRegistry.from_settings(settings).resolve(SMART_TURN_REF).entry_path)
    rng = np.random.default_rng(3)
    audio = (rng.standard_normal(3 * RATE) * 0.05).astype(np.float32)
    results: dict[str, Any] = {}
    local = SmartTurnModel(path)
    await local.load()
    worker = supervised(WorkerOptions(), SmartTurnModel, path, calls=("probability",))
    await worker.load()
    try:
        for name, model in (("in_process", local), ("worker", worker)):
            await model.probability(audio)
            times = []
            for _ in range(runs):
                begun = time.perf_counter()
                await model.probability(audio)
                times.append(time.perf_counter() - begun)
            results[f"{name}_p50_ms"] = 1000 * statistics.median(times)
    finally:
        await worker.close()
        await local.close()
    return results


def stretch_pause(whole: np.ndarray, pause_s: float) -> tuple[np.ndarray, int]:
    """``whole`` with its longest inner silence (espeak-ng's comma) made ``pause_s`` long;
    and where speech resumes."""
    loud = np.flatnonzero(np.abs(whole.astype(np.int32)) > 300)
    gap = int(np.argmax(np.diff(loud)))
    head, tail = whole[: loud[gap] + 1], whole[loud[gap + 1] :]
    silence = np.zeros(int(pause_s * RATE), np.int16)
    return np.concatenate([head, silence, tail]), len(head) + len(silence)


def word_boundary(aligner: Any, speech: np.ndarray, before: str, language: str) -> int | None:
    """Where ``before``'s last word ends in ``speech`` (samples), from Whisper's word
    timestamps; None when the words heard do not start with ``before``'s."""
    import difflib
    import unicodedata

    def fold(word: str) -> str:
        bare = unicodedata.normalize("NFD", word.casefold().strip(" ,.!?…"))
        return "".join(c for c in bare if unicodedata.category(c) != "Mn")

    segments, _ = aligner.transcribe(
        speech.astype(np.float32) / 32768.0, language=language, word_timestamps=True, beam_size=5
    )
    words = [w for segment in segments for w in (segment.words or [])]
    said = before.split()
    if len(words) <= len(said):
        return None
    heard = " ".join(fold(w.word) for w in words[: len(said)])
    if difflib.SequenceMatcher(None, heard, " ".join(fold(w) for w in said)).ratio() < 0.8:
        return None
    end, start = words[len(said) - 1].end, words[len(said)].start
    return int(RATE * (end + max(0.0, start - end) / 2))


async def natural_speech(args: argparse.Namespace) -> dict[str, Any]:
    """The sets said by our TTS's natural voices (Kokoro French, Piper joe English)."""
    from bench.e2e_bench import free_port, server
    from bench.first_answer_bench import speak, tts_command

    lead = int(0.3 * RATE)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="endpointing-bench-") as logs:
        async with server("tts", tts_command(port), port, Path(logs)):
            warm = await speak(port, "Bonjour.", "fr")
            complete = [(await speak(port, text, language), lead) for language, text in COMPLETE]
            silence = np.zeros(int(args.pause * RATE), np.int16)
            paused_audio: dict[str, list[tuple[np.ndarray, int, int] | None]] = {"trailing": [], "cut": []}
            wholes = []
            for language, before, after in PAUSED if args.styles else ():
                # Said apart, the halves keep an exact seam: a natural voice barely pauses at a
                # comma after "du", so no silence in the whole sentence marks where to stretch.
                # "…" gives the first half a hesitant, unfinished ending (a falling tone).
                head = await speak(port, f"{before}…", language)
                tail = await speak(port, after, language)
                paused_audio["trailing"].append(
                    (np.concatenate([head, silence, tail]), len(head) + len(silence), lead)
                )
                if "cut" in args.styles:
                    wholes.append(await speak(port, f"{before} {after}", language))
    if "cut" in args.styles:
        # The whole sentence cut at the word boundary: the voice does not know a pause is
        # coming, so the first half keeps the pitch of a sentence that goes on.
        from faster_whisper import WhisperModel

        settings = settings_for("fixed", 0.8)
        path = ModelRegistry.from_settings(settings).resolve("whisper-base").entry_path
        aligner = WhisperModel(str(path), device="cpu", compute_type="int8")
        for (language, before, _), whole in zip(PAUSED, wholes, strict=True):
            at = word_boundary(aligner, whole, before, language)
            if at is None:
                _LOGGER.warning("cut: no word boundary found after %r: left out", before)
                paused_audio["cut"].append(None)
                continue
            paused_audio["cut"].append(
                (np.concatenate([whole[:at], silence, whole[at:]]), at + len(silence), lead)
            )
        del aligner
    return {
        "warm": np.concatenate([np.zeros(lead, np.int16), warm, np.zeros(2 * RATE, np.int16)]),
        "complete": complete,
        "paused": {style: paused_audio[style] for style in args.styles},
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    lead = int(0.3 * RATE)
    if args.voice == "natural":
        audio = await natural_speech(args)
    else:
        audio = {
            "warm": np.concatenate(
                [np.zeros(lead, np.int16), espeak("Bonjour.", "fr"), np.zeros(2 * RATE, np.int16)]
            ),
            "complete": [(espeak(text, language), lead) for language, text in COMPLETE],
            "paused": {
                "comma": [
                    (*paused(before, after, language, args.pause), lead) for language, before, after in PAUSED
                ]
            },
        }
    if args.ab_cpu_threads:
        return {
            "bench": "endpointing: CTranslate2 threads side by side",
            "date": datetime.date.today().isoformat(),
            "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
            "asr": "whisper-base int8 CPU, beam 5, semantic endpointing; complete commands only",
            "voice": args.voice,
            "cpu_threads_side_by_side": await threads_side_by_side(args.ab_cpu_threads, args, audio),
        }
    modes = {"fixed": await run_mode("fixed", args, audio)}
    for turn_pause in args.turn_pause:
        for decode_pause in args.decode_pause:
            for threads in args.cpu_threads:
                args.current_turn_pause, args.current_decode_pause = turn_pause, decode_pause
                args.current_cpu_threads = threads
                name = f"semantic@{turn_pause:g}" + (
                    f"/decode@{decode_pause:g}" if 0 < decode_pause < turn_pause else ""
                )
                if len(args.cpu_threads) > 1:
                    name += f"/threads@{threads}"
                modes[name] = await run_mode("semantic", args, audio)
    cost = await smart_turn_cost()
    voices = "Kokoro ff_siwis (fr), Piper joe (en)" if args.voice == "natural" else "espeak-ng"
    return {
        "bench": "endpointing",
        "date": datetime.date.today().isoformat(),
        "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
        "asr": f"whisper-base int8 CPU, beam 5; {voices} speech streamed in real time, 20 ms chunks",
        "voice": args.voice,
        "modes": modes,
        "smart_turn_cost": cost,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--endpointing", type=float, default=0.8, help="asr.endpointing_s for both modes")
    parser.add_argument("--pause", type=float, default=0.6, help="the pause inside the paused sentences, s")
    parser.add_argument(
        "--turn-pause",
        type=lambda text: [float(v) for v in text.split(",")],
        default=[0.2],
        help="asr.turn_pause_s of the semantic mode; several (0.2,0.1) run one semantic mode each",
    )
    parser.add_argument(
        "--decode-pause",
        type=lambda text: [float(v) for v in text.split(",")],
        default=[0.1],
        help="asr.turn_decode_pause_s (the decode starts ahead of the verdict); several run one mode each",
    )
    parser.add_argument(
        "--voice",
        choices=("natural", "espeak"),
        default="natural",
        help="who says the sets: our TTS's natural voices (Kokoro, Piper joe) or espeak-ng",
    )
    parser.add_argument(
        "--styles",
        type=lambda text: text.split(","),
        default=["trailing", "cut"],
        help="how the natural voices pause: trailing (first half said apart, ending in '…'), "
        "cut (the whole sentence cut at the word boundary)",
    )
    parser.add_argument(
        "--cpu-threads",
        type=lambda text: [int(v) for v in text.split(",")],
        default=None,
        help="CTranslate2 threads of the semantic modes; several (1,0) run one mode each "
        "(default: the server's own, one; 0: CTranslate2's)",
    )
    parser.add_argument(
        "--ab-cpu-threads",
        type=lambda text: [int(v) for v in text.split(",")],
        default=None,
        help="only this: the complete commands through one server per thread count (1,0), side by side",
    )
    parser.add_argument("--tag", default="", help="suffix of the result file's name")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if args.cpu_threads is None:
        args.cpu_threads = [None]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("wyoming_superwhisper").setLevel(logging.WARNING)
    handler_log = logging.getLogger("wyoming_superwhisper.asr.handler")
    handler_log.setLevel(logging.DEBUG)  # its verdict lines, kept per clip, not printed
    handler_log.propagate = False
    handler_log.addHandler(VERDICTS)
    if args.ab_cpu_threads:
        args.styles = []  # the complete commands only
    results = asyncio.run(main_async(args))
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = ("" if args.voice == "natural" else "-espeak") + (f"-{args.tag}" if args.tag else "")
    path = args.out / f"endpointing-{results['date']}{suffix}.json"
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    if "cpu_threads_side_by_side" in results:
        print(json.dumps(results["cpu_threads_side_by_side"], indent=1))
        print(f"written {path}")
        return 0
    for mode, data in results["modes"].items():
        complete = data["complete"]
        print(
            f"{mode:9s} complete p50 {complete['p50_s']:.3f} s (p95 {complete['p95_s']:.3f}); "
            f"false cut-offs {data['paused']['false_cuts']}/{data['paused']['count']} "
            f"({100 * data['paused']['false_cut_rate']:.0f} %); by style {data['paused']['by_style']}; "
            f"by language {data['by_language']}"
        )
    print(f"smart turn: {results['smart_turn_cost']}")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
