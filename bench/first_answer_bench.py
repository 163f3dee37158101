"""French commands, end of speech → first answer audio, with the embedded models, per way of ending the turn.

Issue #20's last target: a French command's answer starts ≤ 0.5 s after the
speaker stops. The whole chain runs as separate servers on the embedded
defaults (whisper-base int8, SmolLM2-135M, the Kokoro ``ff_siwis`` French
voice), driven by ``wyoming_superwhisper.pipeline`` as a satellite would, and
timed from the end of the speech *in the audio* (the first audio chunk's send
time + the speech's offset; the audio is paced in real time), so every way of
ending the turn is measured from the same instant:

* ``semantic``: our ASR ends the turn itself (``asr.endpointing_s`` 0.8,
  ``asr.endpointing: semantic``): the client streams until the transcript comes;
* ``fixed``: our ASR ends it after 0.8 s of silence (``asr.endpointing: fixed``);
* ``ha_vad``: Home Assistant's own VAD ends it: ``audio-stop`` 0.7 s after the
  speech (``VadSensitivity.DEFAULT`` in ``assist_pipeline/vad.py``, 2025.4),
  then our streamed chain;
* ``ha_vad_aggressive``: the same with the satellite's "finished speaking
  detection" set to aggressive: ``audio-stop`` 0.25 s after the speech
  (``--ab-speculative-pause S`` adds ``ha_vad_aggressive_spec``: an ASR whose
  ``asr.speculative_pause_s`` is S, side by side);
* ``peer`` (when ``bench/.venv-peer-asr`` is built, ``python -m bench.peers``):
  chained as Home Assistant ≤ 2025.6 chains them: HA's VAD (0.7 s) →
  wyoming-faster-whisper 3.8 → our handle read whole (``handled``) → one
  ``synthesize`` to our TTS (no peer TTS speaks French here).

With ``--home``, six French home commands also go through a real Home Assistant
(``.venv-hass``, the French home of ``tests/e2e/hass.py``, its MCP server): our
semantic ASR → a handle acting through MCP (Home Assistant's templates, no model) →
a TTS that keeps segments (``tts.cache_mb``), the handle and the TTS in one
``superwhisper serve`` process as the add-on runs them, so the TTS prepares the
confirmations the handle offers for this home once it reached Home Assistant (the rounds
start when it is done): ``home_first_time`` (round 0, each confirmation's first time)
and ``home_again`` (later rounds).
The other modes' TTS keeps nothing (``tts.cache_mb`` 0), as before the cache.

The commands are spoken by our TTS's Kokoro voice (a natural voice stands in
for a person: whisper-base garbles espeak-ng's French, and a garbled reading
is a different request). Runs rotate the modes so drift weighs on each.

    flock /tmp/heavy.lock .venv/bin/python -m bench.first_answer_bench [--rounds 3]

Results go to ``bench/results/first-answer-<date>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.tts import Synthesize, SynthesizeVoice

from bench.e2e_bench import (
    chained,
    free_port,
    ours_command,
    peer_asr_command,
    server,
    summary,
    wait_ready,
)
from bench.peers import PEERS
from wyoming_superwhisper import pipeline
from wyoming_superwhisper.config import load_settings
from wyoming_superwhisper.runtime.registry import ModelRegistry
from wyoming_superwhisper.tts.engines import Audio

_LOGGER = logging.getLogger("first_answer_bench")
ROOT = Path(__file__).resolve().parent.parent
COMMANDS = [
    "Quelle est la capitale de la France ?",
    "Bonjour, quelle heure est-il ?",
    "Allume la lumière du salon.",
    "Mets un minuteur de cinq minutes.",
    "Quel temps fera-t-il demain ?",
    "Raconte-moi une blague.",
]
HOME_COMMANDS = [
    "Allume la lumière de la cuisine.",
    "Éteins la lumière de la cuisine.",
    "Allume la lampe de chevet.",
    "Éteins la lampe de chevet.",
    "Allume la cafetière.",
    "Éteins la cafetière.",
]
"""``--home``: commands Home Assistant's templates match, in pairs, so each one changes its
entity (what whisper base hears from Kokoro: tests/e2e/test_home_control_assist.py)."""
LEAD_S = 0.3
HA_SILENCE_S = 0.7
"""Home Assistant's default VAD silence before it ends the speech-to-text stream."""
HA_AGGRESSIVE_SILENCE_S = 0.25
"""The same, "finished speaking detection: aggressive" (``VadSensitivity.AGGRESSIVE``)."""
SERVER_TAIL_S = 2.5
"""Silence streamed after the speech when the server ends the turn (it stops the stream sooner)."""
ENDPOINTING_S = 0.8
TARGET_P50_S = 0.5


async def speak(port: int, text: str, language: str = "fr") -> np.ndarray:
    """Our TTS's voice for ``language`` saying ``text``, as 16 kHz int16, its own silences cut.

    A natural voice (Kokoro in French, Piper joe in English) stands in for a person:
    whisper-base garbles espeak-ng's French, and a garbled reading is another request.
    """
    parts: list[bytes] = []
    rate = 0
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Synthesize(text=text, voice=SynthesizeVoice(language=language)).event())
        while True:
            event = await asyncio.wait_for(client.read_event(), 120)
            if event is None or Error.is_type(event.type):
                raise RuntimeError(f"our TTS could not say {text!r}: {event}")
            if AudioStart.is_type(event.type):
                rate = AudioStart.from_event(event).rate
            elif AudioChunk.is_type(event.type):
                parts.append(AudioChunk.from_event(event).audio)
            elif AudioStop.is_type(event.type):
                break
    pcm = np.frombuffer(Audio(b"".join(parts), rate).resampled(16000).pcm, dtype="<i2")
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > 300)
    return pcm[loud[0] : loud[-1] + 1] if len(loud) else pcm


def wav_with(speech: np.ndarray, tail_s: float, path: Path) -> float:
    """``speech`` between LEAD_S and ``tail_s`` of silence, written as a WAV; where the speech ends."""
    silence = np.zeros(int(LEAD_S * 16000), "<i2")
    audio = np.concatenate([silence, speech, np.zeros(int(tail_s * 16000), "<i2")])
    pipeline.write_wav(path, audio.tobytes(), 16000)
    return LEAD_S + len(speech) / 16000


def asr_command(port: int, cpu_threads: int, *settings: str) -> list[str]:
    command = ours_command("asr", port, cpu_threads)
    for setting in settings:
        command += ["--set", setting]
    return command


def tts_command(port: int, cache_mb: float = 0.0) -> list[str]:
    """The TTS on the embedded defaults: French Kokoro ff_siwis, English Piper joe; espeak-ng behind.

    ``cache_mb`` 0 (the comparison of the ways to end a turn): every answer is synthesized, as
    in the runs before the TTS kept segments; the ``--home`` TTS keeps them (32, the default).
    """
    voices = json.dumps(
        {
            "fr": [{"model": "kokoro-ff_siwis"}, {"model": "espeak-fr"}],
            "en": [{"model": "piper-joe"}, {"model": "espeak-en"}],
        }
    )
    return [
        *ours_command("tts", port, 1),
        *("--set", "tts.language=fr", "--set", f"tts.voices={voices}", "--set", f"tts.cache_mb={cache_mb}"),
    ]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = load_settings(environ={}, overrides={"models.environment": "test"})
    registry = ModelRegistry.from_settings(settings)
    work = Path(tempfile.mkdtemp(prefix="first-answer-bench-"))
    wants_peer = not args.no_peers and (not args.modes or "peer" in args.modes.split(","))
    peer = PEERS["asr"] if PEERS["asr"].installed() and wants_peer else None
    modes = ["semantic", "fixed", "ha_vad", "ha_vad_aggressive", *(["peer"] if peer else [])]
    if args.modes:
        modes = [mode for mode in modes if mode in args.modes.split(",")]
    if args.ab_cpu_nice:
        modes.append("semantic_same_cpu")
    if args.ab_speculative_pause:
        modes.append("ha_vad_aggressive_spec")
    ports = {
        name: free_port()
        for name in (
            "semantic",
            "fixed",
            "ha_vad",
            "ha_vad_aggressive_spec",
            "handle",
            "handle_same_cpu",
            "tts",
            "peer",
            "handle_home",
            "tts_home",
        )
    }
    uri = {name: f"tcp://127.0.0.1:{port}" for name, port in ports.items()}
    rows: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    async with contextlib.AsyncExitStack() as stack:
        endpointing = f"asr.endpointing_s={ENDPOINTING_S}"
        asr_settings = {
            "semantic": (endpointing, "asr.endpointing=semantic"),
            "fixed": (endpointing, "asr.endpointing=fixed"),
            "ha_vad": ("asr.endpointing_s=0",),
        }
        if args.ab_speculative_pause:
            asr_settings["ha_vad_aggressive_spec"] = (
                "asr.endpointing_s=0",
                f"asr.speculative_pause_s={args.ab_speculative_pause}",
            )
        for name, extra in asr_settings.items():
            command = asr_command(ports[name], args.cpu_threads, *extra)
            await stack.enter_async_context(server(f"asr_{name}", command, ports[name], work))
        command = ours_command("handle", ports["handle"], args.cpu_threads)
        await stack.enter_async_context(server("handle", command, ports["handle"], work))
        if args.ab_cpu_nice:  # the same handle with its model at the servers' own CPU priority
            command = [*ours_command("handle", ports["handle_same_cpu"], args.cpu_threads)]
            command += ["--set", "handle.cpu_nice=0"]
            await stack.enter_async_context(
                server("handle_same_cpu", command, ports["handle_same_cpu"], work)
            )
        await stack.enter_async_context(server("tts", tts_command(ports["tts"]), ports["tts"], work))
        if peer is not None:
            model_dir = registry.resolve("whisper-base").entry_path
            data_dir = work / "peer-data"
            data_dir.mkdir()
            command = peer_asr_command(peer.python, ports["peer"], model_dir, data_dir, args.cpu_threads)
            await stack.enter_async_context(server("peer_asr", command, ports["peer"], work))

        clips = []
        for index, text in enumerate(COMMANDS[: args.commands]):
            speech = await speak(ports["tts"], text)
            ha_wav, server_wav = work / f"ha-{index}.wav", work / f"server-{index}.wav"
            speech_end = wav_with(speech, HA_SILENCE_S, ha_wav)
            wav_with(speech, SERVER_TAIL_S, server_wav)
            wav_with(speech, HA_AGGRESSIVE_SILENCE_S, work / f"ha-aggressive-{index}.wav")
            clips.append((text, speech_end, ha_wav, server_wav))

        async def one(mode: str, wav_ha: Path, wav_server: Path) -> pipeline.PipelineTimings:
            if mode == "peer":
                return await chained(wav_ha, uri["peer"], uri["handle"], uri["tts"], "fr")
            wav = wav_ha if mode == "ha_vad" else wav_server
            if mode.startswith("ha_vad_aggressive"):
                wav = wav_ha.with_name(wav_ha.name.replace("ha-", "ha-aggressive-"))
            asr, handle = uri[_asr_of(mode)], uri["handle"]
            if mode == "semantic_same_cpu":
                handle = uri["handle_same_cpu"]
            return await pipeline.run_pipeline(
                wav, work / "answer.wav", asr, handle, uri["tts"],
                realtime=True, language="fr", tts_streaming=True,
            )  # fmt: skip

        for mode in modes:  # warm-up, not counted
            await one(mode, clips[0][2], clips[0][3])
        turn = 0
        for round_index in range(args.rounds if modes else 0):
            for text, speech_end, wav_ha, wav_server in clips:
                order = modes[turn % len(modes) :] + modes[: turn % len(modes)]
                turn += 1
                for mode in order:
                    result = await one(mode, wav_ha, wav_server)
                    rows[mode].append(_row(mode, text, round_index, result, speech_end))
        if args.home:
            rows.update(await _home_rows(args, stack, work, ports, uri))
    stages = (
        "speech_end_to_transcript",
        "transcript_to_first_answer_chunk",
        "first_answer_chunk_to_first_audio",
        "speech_end_to_first_audio",
    )
    results = {
        mode: {stage: summary([r[stage] for r in mode_rows if r[stage] is not None]) for stage in stages}
        for mode, mode_rows in rows.items()
    }
    return {
        "benchmark": "French commands: end of speech (in the audio) → first answer audio",
        "date": datetime.date.today().isoformat(),
        "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
        "models": {"asr": "whisper-base int8 cpu beam 5", "handle": "smollm2-135m", "tts": "kokoro-ff_siwis"},
        "speech": "the commands said by our TTS's Kokoro ff_siwis voice, 0.3 s of silence before",
        "modes": {
            "semantic": f"our ASR ends the turn: asr.endpointing semantic, at most {ENDPOINTING_S} s",
            "fixed": f"our ASR ends the turn after {ENDPOINTING_S} s of silence",
            "ha_vad": f"Home Assistant's VAD: audio-stop {HA_SILENCE_S} s after the speech, our chain",
            "ha_vad_aggressive": f"as ha_vad, aggressive: audio-stop {HA_AGGRESSIVE_SILENCE_S} s after",
            "ha_vad_aggressive_spec": "as ha_vad_aggressive, the ASR's asr.speculative_pause_s "
            f"{args.ab_speculative_pause}",
            "peer": "HA's VAD → wyoming-faster-whisper → our handle read whole → one synthesize to our TTS",
            "semantic_same_cpu": "as semantic, the handle's model at the servers' CPU priority (cpu_nice 0)",
            "home_first_time": "--home: semantic ASR → handle acting through Home Assistant's MCP server "
            "(templates, no model) → TTS keeping segments, handle and TTS in one serve process as in the "
            "add-on (the TTS prepared the confirmations the handle offered); each said the first time",
            "home_again": "--home: the same commands in later rounds: each confirmation said again",
        },
        "tts_cache": "off (tts.cache_mb 0) but for the --home modes",
        "home_prepared_segments": getattr(args, "prepared", None),
        "peer_asr": peer.version() if peer else None,
        "target_p50_s": TARGET_P50_S,
        "rounds": args.rounds,
        "results": results,
        "runs": rows,
    }


def _asr_of(mode: str) -> str:
    """The ASR server a mode talks to (``ha_vad_aggressive`` shares ``ha_vad``'s)."""
    if mode == "ha_vad_aggressive":
        return "ha_vad"
    return mode.removesuffix("_same_cpu")


def _row(
    mode: str, text: str, round_index: int, result: pipeline.PipelineTimings, speech_end: float
) -> dict[str, Any]:
    """One run's times from the end of the speech in its audio, logged."""
    ended = (result.audio_started or 0.0) + speech_end
    stage = result.stages()
    row = {
        "command": text,
        "round": round_index,
        "transcript": result.transcript_text,
        "answer": result.answer_text,
        "speech_end_to_transcript": _after(result.transcript, ended),
        "speech_end_to_first_answer_chunk": _after(result.first_answer_chunk, ended),
        "speech_end_to_first_audio": _after(result.first_audio, ended),
        "transcript_to_first_answer_chunk": stage["transcript_to_first_answer_chunk"],
        "first_answer_chunk_to_first_audio": stage["first_answer_chunk_to_first_audio"],
    }
    _LOGGER.info(
        "%-8s %-40s transcript %+.3f s, first audio %+.3f s  %r → %r",
        mode, text, row["speech_end_to_transcript"] or -1, row["speech_end_to_first_audio"] or -1,
        result.transcript_text, result.answer_text[:50],
    )  # fmt: skip
    return row


async def _home_rows(
    args: argparse.Namespace,
    stack: contextlib.AsyncExitStack,
    work: Path,
    ports: dict[str, int],
    uri: dict[str, str],
) -> dict[str, list[dict[str, Any]]]:
    """``--home``: French home commands through a real Home Assistant (its MCP server).

    Our semantic ASR → a handle acting through Home Assistant's MCP server (templates match,
    no model) → a TTS that keeps segments (``tts.cache_mb`` default). Round 0 says each
    confirmation for the first time (synthesized); later rounds say it again (from the cache).
    """
    import aiohttp

    from tests.e2e.hass import home_assistant, mcp_home, reset_home

    hass = stack.enter_context(home_assistant(work / "hass-config", home=True))
    await asyncio.to_thread(hass.wait_ready, 180)
    token = await mcp_home(hass.url)
    # The handle and the TTS in one process, as the add-on runs them: the TTS prepares the
    # confirmations the handle offers for this home (context.phrases) while idle.
    metrics_port = free_port()
    settings = [
        *_sets(ours_command("handle", ports["handle_home"], args.cpu_threads)),
        *_sets(tts_command(ports["tts_home"], cache_mb=32)),
        *("--set", f"handle.uri=tcp://127.0.0.1:{ports['handle_home']}"),
        *("--set", f"tts.uri=tcp://127.0.0.1:{ports['tts_home']}"),
        *("--set", f"handle.hass_url={hass.url}", "--set", f"handle.hass_token={token}"),
        *("--set", "metrics.host=127.0.0.1"),
    ]
    command = [
        sys.executable, "-m", "wyoming_superwhisper", "serve", "--only", "handle,tts", "--no-zeroconf",
        "--metrics-port", str(metrics_port), "--no-smoke", "--log-level", "WARNING", *settings,
    ]  # fmt: skip
    await stack.enter_async_context(server("handle_tts_home", command, ports["tts_home"], work))
    await wait_ready(ports["handle_home"], None, "handle_home")
    asr = uri["semantic"]
    if args.home_hints:  # names of the home as hints, read from Home Assistant (asr.hass_url)
        hinted = free_port()
        command = asr_command(
            hinted, args.cpu_threads, f"asr.endpointing_s={ENDPOINTING_S}", "asr.endpointing=semantic",
            f"asr.hass_url={hass.url}", f"asr.hass_token={token}",
        )  # fmt: skip
        await stack.enter_async_context(server("asr_home_hints", command, hinted, work))
        asr = f"tcp://127.0.0.1:{hinted}"
    clips = []
    for index, text in enumerate(HOME_COMMANDS):
        speech = await speak(ports["tts_home"], text)
        wav = work / f"home-{index}.wav"
        clips.append((text, wav_with(speech, SERVER_TAIL_S, wav), wav))
    warm_up = work / "home-warm-up.wav"  # not counted: a command none of the clips' answers say
    wav_with(await speak(ports["tts_home"], "Allume la lumière du bureau."), SERVER_TAIL_S, warm_up)
    await pipeline.run_pipeline(
        warm_up, work / "answer.wav", asr, uri["handle_home"], uri["tts_home"],
        realtime=True, language="fr", tts_streaming=True,
    )  # fmt: skip
    async with aiohttp.ClientSession() as session:
        await reset_home(session, hass.url, token)
        prepared = await _prepared(session, metrics_port)
    _LOGGER.info("the TTS prepared %d confirmations before the rounds", prepared)
    rows: dict[str, list[dict[str, Any]]] = {"home_first_time": [], "home_again": []}
    args.prepared = prepared
    for round_index in range(args.rounds):
        for text, speech_end, wav in clips:
            result = await pipeline.run_pipeline(
                wav, work / "answer.wav", asr, uri["handle_home"], uri["tts_home"],
                realtime=True, language="fr", tts_streaming=True,
            )  # fmt: skip
            mode = "home_first_time" if round_index == 0 else "home_again"
            rows[mode].append(_row(mode, text, round_index, result, speech_end))
    return rows


def _sets(command: list[str]) -> list[str]:
    """The ``--set KEY=VALUE`` pairs of a server command line."""
    return [part for i, part in enumerate(command) if part == "--set" or (i and command[i - 1] == "--set")]


async def _prepared(session: Any, metrics_port: int, limit_s: float = 180.0) -> int:
    """Wait until the TTS stops preparing offered phrases (its count unchanged for 3 s); the count."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    last, steady, waited = -1, 0.0, 0.0
    while waited < limit_s:
        async with session.get(url) as reply:
            text = await reply.text()
        count = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("superwhisper_tts_cache_total") and 'result="prepared"' in line
        )
        steady = steady + 0.5 if count == last and count > 0 else 0.0
        if steady >= 3.0:
            return int(count)
        last = int(count)
        await asyncio.sleep(0.5)
        waited += 0.5
    return max(last, 0)


def _after(at: float | None, ended: float) -> float | None:
    return None if at is None else round(at - ended, 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--commands", type=int, default=len(COMMANDS))
    parser.add_argument(
        "--cpu-threads",
        type=int,
        default=1,
        help="CTranslate2 threads, ours and the peer alike (1: our default)",
    )
    parser.add_argument("--no-peers", action="store_true", help="only our chain")
    parser.add_argument(
        "--modes", default="", help="comma-separated subset of semantic,fixed,ha_vad,ha_vad_aggressive,peer"
    )
    parser.add_argument(
        "--ab-cpu-nice",
        action="store_true",
        help="add semantic_same_cpu: a second handle with handle.cpu_nice=0, side by side",
    )
    parser.add_argument(
        "--home",
        action="store_true",
        help="also French home commands through a real Home Assistant (.venv-hass), cache on",
    )
    parser.add_argument(
        "--home-hints", action="store_true", help="--home with the home's names as ASR hints (asr.hass_url)"
    )
    parser.add_argument(
        "--ab-speculative-pause",
        type=float,
        default=0.0,
        help="add ha_vad_aggressive_spec: an ASR with this asr.speculative_pause_s, side by side",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--tag", default="", help="suffix of the results file (first-answer-<date>-<tag>.json)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    data = asyncio.run(run(args))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"first-answer-{data['date']}{'-' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", "utf-8")
    for mode, stages in data["results"].items():
        first = stages["speech_end_to_first_audio"]
        heard = stages["speech_end_to_transcript"]
        print(
            f"{mode:9s} speech end → transcript p50 {heard.get('p50_s')} s; "
            f"→ first audio p50 {first.get('p50_s')} s, p95 {first.get('p95_s')} s (n={first.get('n')})"
        )
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
