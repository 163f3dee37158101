"""End to end: speech end → first audio byte, our three servers streaming vs the peers chained.

Ours: superwhisper ASR → handle → TTS, each its own process, driven by
``wyoming_superwhisper.pipeline.run_pipeline`` exactly as a user (or Home
Assistant 2025.7+) would: the answer is streamed from the LLM into the TTS as
``synthesize-chunk`` events while it is being written.

Peers, chained without streaming (Home Assistant 2025.6 and older, and what the
peer servers offer): wyoming-faster-whisper 3.8 → our handle server, read as
Home Assistant reads it (the whole ``handled`` event, chunks ignored) →
wyoming-piper 2.5 with one ``synthesize``. The handle server is the same
process for both sides (there is no peer LLM server; ours is the only one
here), so the difference is what streaming buys across the chain.

Same models on both sides: whisper-base int8 on the CPU, beam 5; SmolLM2-135M;
Piper ``en_US-joe-medium``. The headline figures are English commands, because
that Piper voice is the only one the peer can load here (our TTS never reads a
French text with an English voice). French commands are a case of their own:
our TTS answers them with espeak-ng ``fr``, and the peer chain's TTS is then our
own server read with one ``synthesize`` (wyoming-piper has no French voice
here), so that case measures what streaming buys, not which TTS is faster.
With ``--clients N`` (N > 1) every side also serves N commands at once, N
pipelines started together, to show how the chain holds when a house has
several satellites. Each command is espeak-ng speech with 0.3 s of silence
before and ``--tail`` seconds after it, streamed in real time in 20 ms chunks;
``audio-stop`` follows the tail, like Home Assistant's VAD. Runs alternate
ours/peer (A B B A …) so machine drift weighs on both.

``speech_end_to_first_audio`` is measured from ``audio-stop`` (what the
pipeline client can see); the tail silence before it is the same on both sides
and is reported as ``tail_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from wyoming.asr import Transcript
from wyoming.client import AsyncTcpClient
from wyoming.event import Event
from wyoming.handle import Handled, NotHandled
from wyoming.tts import Synthesize

from wyoming_superwhisper import pipeline
from wyoming_superwhisper.config import load_settings
from wyoming_superwhisper.runtime.registry import ModelRegistry

_LOGGER = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = [
    ("en", "Turn on the kitchen lights please."),
    ("en", "What is the weather like tomorrow?"),
    ("en", "Set a timer for ten minutes."),
    ("en", "Close the garage door."),
]
FRENCH_COMMANDS = [
    # Among those whisper-base reads steadily in espeak-ng's French (tests/integration/test_asr_service.py).
    ("fr", "Quelle est la capitale de la France ?"),
    ("fr", "Bonjour, quelle heure est-il ?"),
]
CASE_STAGES = ("speech_end_to_transcript", "speech_end_to_first_audio", "speech_end_to_done")
STAGES = (
    "speech_end_to_transcript",
    "transcript_to_first_answer_chunk",
    "first_answer_chunk_to_first_audio",
    "speech_end_to_first_audio",
    "speech_end_to_done",
)
LLM_OPTIONS = {"temperature": 0.0, "seed": 1}


# --- audio ---------------------------------------------------------------------------------


def espeak_wav(text: str, voice: str, path: Path, tail_s: float) -> float:
    """espeak-ng speech with 0.3 s of silence before and ``tail_s`` after, as a WAV; its length."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise RuntimeError("espeak-ng is needed (Debian package espeak-ng)")
    subprocess.run([binary, "-v", voice, "-w", str(path), text], check=True, capture_output=True)
    with wave.open(str(path), "rb") as source:
        rate, width, channels = source.getframerate(), source.getsampwidth(), source.getnchannels()
        pcm = np.frombuffer(source.readframes(source.getnframes()), dtype="<i2")
    if width != 2 or channels != 1:
        raise RuntimeError(f"espeak-ng wrote {width * 8}-bit {channels}-channel audio")
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > 300)
    speech = pcm[loud[0] : loud[-1] + 1] if len(loud) else pcm
    audio = np.concatenate([np.zeros(int(0.3 * rate), "<i2"), speech, np.zeros(int(tail_s * rate), "<i2")])
    pipeline.write_wav(path, audio.tobytes(), rate)
    return len(audio) / rate


# --- servers -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_ready(
    port: int, child: subprocess.Popen[bytes] | None, name: str, within_s: float = 180
) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if child is not None and child.poll() is not None:
            raise RuntimeError(f"{name} exited with {child.returncode}")
        with contextlib.suppress(OSError, TimeoutError):
            async with AsyncTcpClient("127.0.0.1", port) as client:
                await client.write_event(Event("describe"))
                if await asyncio.wait_for(client.read_event(), 5) is not None:
                    return
        await asyncio.sleep(0.3)
    raise RuntimeError(f"{name} did not answer describe within {within_s:.0f} s")


@contextlib.asynccontextmanager
async def server(name: str, command: Sequence[str], port: int, logs: Path) -> AsyncIterator[int]:
    """One server process until the block ends; its log goes to ``logs/<name>.log``."""
    with (logs / f"{name}.log").open("wb") as sink:
        child = subprocess.Popen(  # noqa: ASYNC220 (a long-lived child, started once)
            list(command), stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT
        )
        try:
            await wait_ready(port, child, name)
            _LOGGER.info("%s ready on port %d (pid %d)", name, port, child.pid)
            yield child.pid
        finally:
            child.terminate()
            try:
                await asyncio.to_thread(child.wait, 15)
            except subprocess.TimeoutExpired:
                child.kill()
                await asyncio.to_thread(child.wait)


def ours_command(service: str, port: int, cpu_threads: int, metrics_port: int | None = None) -> list[str]:
    """``superwhisper <service>`` on loopback with the benchmark's models (ops port off unless given)."""
    ops = ["--no-metrics"] if metrics_port is None else ["--metrics-port", str(metrics_port)]
    command = [
        sys.executable, "-m", "wyoming_superwhisper", service,
        "--uri", f"tcp://127.0.0.1:{port}",
        "--no-zeroconf", *ops, "--no-smoke", "--log-level", "WARNING",
        "--set", "models.environment=test",
    ]  # fmt: skip
    if service == "asr":
        chain = [
            {
                "model": "whisper-base",
                "device": "cpu",
                "options": {"compute_type": "int8", "cpu_threads": cpu_threads},
            }
        ]
        command += ["--set", f"asr.chain={json.dumps(chain)}", "--set", "asr.beam_size=5"]
    elif service == "handle":
        chain = [{"model": "smollm2-135m", "device": "cpu", "options": LLM_OPTIONS}]
        # no implicit memory: every run starts from the same prompt, on both sides
        command += ["--set", f"handle.chain={json.dumps(chain)}", "--set", "handle.implicit_memory_ttl_s=0"]
    else:
        voices = json.dumps({"en": [{"model": "piper-joe"}], "fr": [{"model": "espeak-fr"}]})
        command += ["--set", "tts.language=en", "--set", f"tts.voices={voices}"]
    return command


def peer_asr_command(python: Path, port: int, model_dir: Path, data_dir: Path, cpu_threads: int) -> list[str]:
    return [
        str(python), "-m", "wyoming_faster_whisper", "--uri", f"tcp://127.0.0.1:{port}",
        "--model", str(model_dir), "--stt-library", "faster-whisper", "--data-dir", str(data_dir),
        "--local-files-only", "--compute-type", "int8", "--beam-size", "5",
        "--cpu-threads", str(cpu_threads),
    ]  # fmt: skip


def peer_tts_command(python: Path, port: int, voice: Path) -> list[str]:
    return [
        str(python), "-m", "wyoming_piper", "--uri", f"tcp://127.0.0.1:{port}",
        "--voice", voice.stem, "--data-dir", str(voice.parent), "--local-files-only",
    ]  # fmt: skip


# --- the peer chain, without streaming -----------------------------------------------------


async def chained(
    wav: Path, asr_uri: str, handle_uri: str, tts_uri: str, language: str, timeout_s: float = 60.0
) -> pipeline.PipelineTimings:
    """ASR → handle (whole ``handled``) → one ``synthesize``: Home Assistant ≤ 2025.6's chain.

    The ASR half is the pipeline client's own (same pacing, same clock), so both
    sides are timed alike; only what follows the transcript differs.
    """
    pcm = pipeline.read_wav_16k(wav)
    timings = pipeline.PipelineTimings(audio_seconds=len(pcm) / (pipeline.RATE * pipeline.WIDTH))
    clock = pipeline.StageClock()
    async with pipeline.connect_stage("asr", asr_uri, timeout_s) as client:
        timings.transcript_text = await pipeline.stream_transcribe(
            client, pcm, language=language, realtime=True, chunk_ms=pipeline.DEFAULT_CHUNK_MS,
            clock=clock, timings=timings,
        )  # fmt: skip
    async with pipeline.connect_stage("handle", handle_uri, timeout_s) as client:
        await client.write_event(Transcript(text=timings.transcript_text, language=language).event())
        while True:
            event = await pipeline.read_stage("handle", client)
            if Handled.is_type(event.type) or NotHandled.is_type(event.type):
                timings.handled = Handled.is_type(event.type)
                timings.answer_text = (event.data.get("text") or "").strip()
                timings.first_answer_chunk = timings.answer_done = clock.now()
                break
    async with pipeline.connect_stage("tts", tts_uri, timeout_s) as client:
        await client.write_event(Synthesize(text=timings.answer_text).event())
        samples = 0
        while True:
            event = await pipeline.read_stage("tts", client)
            if event.type == "audio-chunk":
                if timings.first_audio is None and event.payload:
                    timings.first_audio = clock.now()
                timings.output_rate = int(event.data.get("rate", 0))
                samples += len(event.payload or b"") // 2
            elif event.type == "audio-stop":
                timings.done = clock.now()
                break
    timings.output_seconds = samples / timings.output_rate if timings.output_rate else 0.0
    return timings


# --- an independent client ----------------------------------------------------------------


async def independent_client(
    tool: Path | None, ports: dict[str, int], wavs: Sequence[tuple[str, str, Path]], work: Path
) -> dict[str, str] | None:
    """``wyoming-bench`` (PyPI, neither ours nor the peers') on both sides' ASR and TTS servers.

    Its own client, its own timing: a check that our figures are not an
    artefact of our client. Its report is kept as the text it prints.
    """
    if tool is None:
        return None
    corpus = work / "corpus"
    corpus.mkdir(exist_ok=True)
    for index, (_, text, wav) in enumerate(wavs):
        shutil.copy(wav, corpus / f"command_{index:02d}.wav")
        (corpus / f"command_{index:02d}.txt").write_text(text + "\n", "utf-8")
    answer = "It is twenty one degrees in the living room. Tomorrow will be sunny. Have a nice evening!"
    commands = {
        "stt": [str(tool), "stt", "--corpus", str(corpus), "--config", json.dumps({"language": "en"}),
                "--rounds", "2", f"127.0.0.1:{ports['asr']}", f"127.0.0.1:{ports['peer_asr']}"],
        "tts": [str(tool), "tts", "--texts", answer, "--rounds", "3",
                f"127.0.0.1:{ports['tts']}", f"127.0.0.1:{ports['peer_tts']}"],
    }  # fmt: skip
    reports = {}
    for name, command in commands.items():
        run = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, check=False)
        reports[name] = (
            run.stdout + ("" if run.returncode == 0 else f"\n[exit {run.returncode}] {run.stderr}")
        )[-12000:]
        _LOGGER.info("wyoming-bench %s: exit %d", name, run.returncode)
    return reports


# --- the benchmark -------------------------------------------------------------------------


def summary(values: Sequence[float]) -> dict[str, Any]:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0}
    return {
        "n": len(ordered),
        "p50_s": round(statistics.median(ordered), 4),
        "p95_s": round(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], 4),
        "mean_s": round(statistics.fmean(ordered), 4),
    }


def stage_summaries(
    timings: dict[str, list[dict[str, Any]]], case: str, names: Sequence[str], with_peers: bool
) -> dict[str, Any]:
    """p50/p95 per stage and side over the rows of one case, with every value kept for the plots."""
    stages: dict[str, Any] = {}
    for stage in names:
        per_side = {
            side: [row[stage] for row in rows if row["case"] == case and row[stage] is not None]
            for side, rows in timings.items()
        }
        entry: dict[str, Any] = {side: summary(values) for side, values in per_side.items()}
        entry["values"] = {side: [round(v, 4) for v in values] for side, values in per_side.items()}
        if with_peers and entry["ours"].get("n") and entry["peer"].get("n") and entry["peer"]["p50_s"]:
            entry["ratio_p50"] = round(entry["ours"]["p50_s"] / entry["peer"]["p50_s"], 3)
        stages[stage] = entry
    return stages


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Our three servers and (when ``args.peer_asr``/``args.peer_tts`` are given) the peers.

    ``args``: ``rounds``, ``commands`` (how many of COMMANDS), ``french`` (how many
    of FRENCH_COMMANDS), ``clients`` (concurrent pipelines of the N-client case; 1:
    none), ``tail``, ``cpu_threads``, ``peer_asr`` and ``peer_tts`` (peer venv
    pythons or None), ``pids`` (a dict the server pids are put in, by name, for the
    RSS sampler).
    """
    settings = load_settings(environ={}, overrides={"models.environment": "test"})
    registry = ModelRegistry.from_settings(settings)
    model_dir = registry.resolve("whisper-base").entry_path
    voice = registry.resolve("piper-joe").entry_path
    work = Path(tempfile.mkdtemp(prefix="e2e-bench-"))
    commands = COMMANDS[: args.commands]
    french = FRENCH_COMMANDS[: getattr(args, "french", 0)]
    clients = max(1, getattr(args, "clients", 1))
    wavs, french_wavs = [], []
    for index, (language, text) in enumerate([*commands, *french]):
        path = work / f"command-{index}.wav"
        espeak_wav(text, language, path, args.tail)
        (wavs if language == "en" else french_wavs).append((language, text, path))
    with_peers = args.peer_asr is not None and args.peer_tts is not None
    ports = {name: free_port() for name in ("asr", "handle", "tts", "peer_asr", "peer_tts")}
    uri = {name: f"tcp://127.0.0.1:{port}" for name, port in ports.items()}
    pids: dict[str, int] = getattr(args, "pids", None) or {}
    sides = ("ours", "peer") if with_peers else ("ours",)
    timings: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    async with contextlib.AsyncExitStack() as stack:
        for name in ("asr", "handle", "tts"):
            pids[f"ours_{name}"] = await stack.enter_async_context(
                server(f"ours_{name}", ours_command(name, ports[name], args.cpu_threads), ports[name], work)
            )
        if with_peers:
            data_dir = work / "peer-data"
            data_dir.mkdir()
            pids["peer_asr"] = await stack.enter_async_context(
                server("peer_asr", peer_asr_command(Path(args.peer_asr), ports["peer_asr"], model_dir,
                                                     data_dir, args.cpu_threads), ports["peer_asr"], work)
            )  # fmt: skip
            pids["peer_tts"] = await stack.enter_async_context(
                server("peer_tts", peer_tts_command(Path(args.peer_tts), ports["peer_tts"], voice),
                       ports["peer_tts"], work)
            )  # fmt: skip

        async def one(side: str, language: str, wav: Path, slot: int = 0) -> pipeline.PipelineTimings:
            if side == "ours":
                return await pipeline.run_pipeline(
                    wav, work / f"answer-ours-{slot}.wav", uri["asr"], uri["handle"], uri["tts"],
                    realtime=True, language=language, tts_streaming=True,
                )  # fmt: skip
            # French: wyoming-piper has no French voice here, the peer chain reads ours unstreamed
            tts = uri["peer_tts"] if language == "en" else uri["tts"]
            return await chained(wav, uri["peer_asr"], uri["handle"], tts, language)

        def record(
            side: str, case: str, text: str, round_index: int, result: pipeline.PipelineTimings
        ) -> None:
            row = {"case": case, "command": text, "round": round_index, **result.stages()}
            row.update(transcript=result.transcript_text, answer=result.answer_text)
            timings[side].append(row)
            _LOGGER.info(
                "%s %s %r → first audio %.3f s", side, case, text, row["speech_end_to_first_audio"] or -1
            )

        for side in sides:  # warm-up, not counted
            await one(side, wavs[0][0], wavs[0][2])
        turn = 0
        for round_index in range(args.rounds):
            for language, text, wav in [*wavs, *french_wavs]:
                order = sides if turn % 2 == 0 else sides[::-1]
                turn += 1
                for side in order:
                    record(side, language, text, round_index, await one(side, language, wav))
            if clients > 1:
                # N satellites at once: N pipelines started together on one side, then the other.
                batch = [wavs[i % len(wavs)] for i in range(clients)]
                for side in sides if round_index % 2 == 0 else sides[::-1]:
                    results = await asyncio.gather(
                        *[one(side, language, wav, slot) for slot, (language, _, wav) in enumerate(batch)]
                    )
                    for (_, text, _), result in zip(batch, results, strict=True):
                        record(side, f"{clients}_clients", text, round_index, result)
        independent = await independent_client(getattr(args, "wyoming_bench", None), ports, wavs, work)
    stages = stage_summaries(timings, "en", STAGES, with_peers)
    cases = {
        case: stage_summaries(timings, case, CASE_STAGES, with_peers)
        for case in (*(["fr"] if french_wavs else []), *([f"{clients}_clients"] if clients > 1 else []))
    }
    shutil.rmtree(work, ignore_errors=True)
    return {
        "benchmark": "end to end: audio-stop → first audio byte",
        "ours": "superwhisper asr → handle → tts, streamed (synthesize-chunk while the answer is written)",
        "peer": (
            "wyoming-faster-whisper → superwhisper handle (whole `handled`) → wyoming-piper (one synthesize)"
            if with_peers
            else None
        ),
        "models": {"asr": "whisper-base int8 cpu beam 5", "handle": "smollm2-135m", "tts": voice.name},
        "tail_s": args.tail,
        "rounds": args.rounds,
        "commands": [text for _, text in commands],
        "french_commands": [text for _, text in french],
        "clients": clients,
        "stages": stages,
        "cases": cases,
        "runs": timings,
        "wyoming_bench": independent,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--commands", type=int, default=len(COMMANDS))
    parser.add_argument("--french", type=int, default=len(FRENCH_COMMANDS), help="French commands (a case)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent pipelines of the N-client case")
    parser.add_argument("--tail", type=float, default=0.8, help="silence before audio-stop, seconds")
    parser.add_argument(
        "--cpu-threads",
        type=int,
        default=1,
        help="CTranslate2 threads, ours and the peer alike (1: our default)",
    )
    parser.add_argument("--peer-asr", type=Path, default=None, help="wyoming-faster-whisper's python")
    parser.add_argument("--peer-tts", type=Path, default=None, help="python of the wyoming-piper venv")
    parser.add_argument("--wyoming-bench", type=Path, default=None, help="wyoming-bench to run on both")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    results = asyncio.run(run(args))
    text = json.dumps(results, indent=2, ensure_ascii=False) + "\n"
    if args.out:
        args.out.write_text(text, "utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
