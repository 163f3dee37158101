"""ASR latency: superwhisper vs wyoming-faster-whisper 3.8, side by side, in one run.

Both servers run the same whisper-base directory (from the registry), int8 on
the CPU, beam size 5, the same number of CPU threads, and hear the same
espeak-ng commands streamed in real time (10 ms chunks, as Home Assistant
sends them). Two modes, as the peer offers them:

* ``audio-stop``: the client sends ``audio-stop`` after a fixed silence
  (Home Assistant's own VAD); the peer then decodes the whole utterance,
  while superwhisper has usually decoded during the silence already.
* ``endpointing``: the server ends the utterance itself after the same
  silence (the peer's ``--vad-endpointing S``, our ``asr.endpointing_s``);
  the client keeps streaming silence until a transcript arrives.

Latency is measured from the end of speech in the audio (when its last
sample was sent) to the ``transcript`` event; p50/p95 per server and mode,
and the ratio ours/peer. Also: an as-fast-as-possible stream through our
server versus ``WhisperModel.transcribe`` in process on the same audio.

The peer is installed in its own venv, never ours::

    python3.11 -m venv /tmp/superwhisper-peers-venv      # or $SUPERWHISPER_PEER_VENV
    /tmp/superwhisper-peers-venv/bin/pip install "wyoming-faster-whisper>=3.8,<3.9" "torch==2.13.0"
    flock /tmp/sw-heavy.lock .venv/bin/python bench/asr_bench.py

Results go to ``bench/results/asr-<date>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import wyoming.audio  # noqa: F401  (audioop is deprecated; harmless here)

import numpy as np
from prometheus_client import CollectorRegistry
from wyoming.client import AsyncTcpClient
from wyoming.info import Describe, Info

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wyoming_superwhisper.asr.client import pcm_bytes, transcribe  # noqa: E402
from wyoming_superwhisper.asr.service import AsrService  # noqa: E402
from wyoming_superwhisper.audio import AudioConverter  # noqa: E402
from wyoming_superwhisper.config import Settings, load_settings  # noqa: E402
from wyoming_superwhisper.runtime.gpu import choose_gpu  # noqa: E402
from wyoming_superwhisper.runtime.metrics import Metrics  # noqa: E402
from wyoming_superwhisper.runtime.registry import ModelRegistry  # noqa: E402
from wyoming_superwhisper.runtime.server import ServiceContext, ServiceServer  # noqa: E402

_LOGGER = logging.getLogger("asr_bench")
RATE = 16000
PEER_VENV = Path(os.environ.get("SUPERWHISPER_PEER_VENV", "/tmp/superwhisper-peers-venv"))
"""The peer's own venv, outside the work tree (the GPU-guard audit scans bench/)."""
COMMANDS = [
    ("fr", "Allume la lumière du salon."),
    ("fr", "Ferme les volets de la chambre."),
    ("fr", "Quelle est la météo pour demain ?"),
    ("fr", "Mets de la musique dans la cuisine."),
    ("en", "Turn on the kitchen lights please."),
    ("en", "What is the weather like tomorrow?"),
    ("en", "Set a timer for ten minutes."),
    ("en", "Close the garage door."),
]


def bench_settings(port: int = 0, endpointing_s: float = 0.0, cpu_threads: int = 2) -> Settings:
    return load_settings(
        environ={},
        overrides={
            "models.environment": "test",
            "asr.uri": f"tcp://127.0.0.1:{port}",
            "asr.endpointing_s": endpointing_s,
            "asr.beam_size": 5,
            "asr.chain": [
                {
                    "model": "whisper-base",
                    "device": "cpu",
                    "options": {"compute_type": "int8", "cpu_threads": cpu_threads},
                }
            ],
            "zeroconf.enabled": False,
            "metrics.enabled": False,
        },
    )


async def serve_ours(port: int, endpointing_s: float, cpu_threads: int) -> None:
    """The ``--serve-ours`` child: one AsrService on 127.0.0.1:port until killed."""
    settings = bench_settings(port, endpointing_s, cpu_threads)
    context = ServiceContext(
        settings,
        ModelRegistry.from_settings(settings),
        choose_gpu(None, settings.gpu),
        Metrics(CollectorRegistry()),
    )
    service = AsrService(context)
    server = ServiceServer(service)
    await service.start()
    await server.start()
    await asyncio.Event().wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    audio = np.concatenate([converter.convert(raw[index + 8 :]), converter.flush()])
    pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > 300)
    return pcm[loud[0] : loud[-1] + 1]


@contextlib.asynccontextmanager
async def process(name: str, command: Sequence[str], port: int, log_dir: Path) -> AsyncIterator[None]:
    log = (log_dir / f"{name}.log").open("w")
    child = await asyncio.create_subprocess_exec(*command, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            if child.returncode is not None:
                raise RuntimeError(f"{name} exited with {child.returncode}; see {log.name}")
            try:
                async with AsyncTcpClient("127.0.0.1", port) as client:
                    await client.write_event(Describe().event())
                    event = await asyncio.wait_for(client.read_event(), 5)
                    if event is not None and Info.is_type(event.type):
                        break
            except OSError:
                await asyncio.sleep(0.2)
        else:
            raise RuntimeError(f"{name} did not answer describe")
        _LOGGER.info("%s ready on port %d", name, port)
        yield
    finally:
        if child.returncode is None:
            child.terminate()
            try:
                await asyncio.wait_for(child.wait(), 10)
            except TimeoutError:
                child.kill()
                await child.wait()
        log.close()


def summary(values: Sequence[float]) -> dict[str, Any]:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0}
    p95_index = min(len(ordered) - 1, max(0, round(0.95 * (len(ordered) - 1))))
    return {
        "n": len(ordered),
        "p50_s": round(statistics.median(ordered), 4),
        "p95_s": round(ordered[p95_index], 4),
        "mean_s": round(statistics.fmean(ordered), 4),
        "min_s": round(ordered[0], 4),
        "max_s": round(ordered[-1], 4),
    }


async def one(
    port: int, speech: np.ndarray, language: str, silence_s: float, *, endpointing: bool
) -> tuple[float, str]:
    """Stream lead-in + speech + silence in real time; seconds from end of speech to transcript."""
    lead = np.zeros(int(0.3 * RATE), np.int16)
    tail = np.zeros(int((3.0 if endpointing else silence_s) * RATE), np.int16)
    audio = pcm_bytes(np.concatenate([lead, speech, tail]))
    exchange = await transcribe(
        port,
        audio,
        language=language,
        chunk_ms=10,
        pace=1.0,
        final=("transcript", "error"),
    )
    if exchange.transcript_at is None:
        raise RuntimeError(f"no transcript: {exchange.types} {exchange.error}")
    speech_end = exchange.started_at + (len(lead) + len(speech)) / RATE
    return exchange.transcript_at - speech_end, exchange.text or ""


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = bench_settings()
    registry = ModelRegistry.from_settings(settings)
    model_dir = registry.resolve("whisper-base").entry_path
    peer_python = PEER_VENV / "bin" / "python"
    if not peer_python.exists():
        raise SystemExit(f"install the peer first: see {__file__}'s docstring ({peer_python} missing)")
    version_run = await asyncio.to_thread(
        subprocess.run,
        [
            str(peer_python),
            "-c",
            "import importlib.metadata as m; print(m.version('wyoming-faster-whisper'))",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    peer_version = version_run.stdout.strip()
    commands = [(lang, text, espeak(text, lang)) for lang, text in COMMANDS]
    silence = args.silence
    log_dir = Path(tempfile.mkdtemp(prefix="asr-bench-"))
    data_dir = log_dir / "peer-data"
    data_dir.mkdir()
    ports = {key: free_port() for key in ("ours", "ours_ep", "peer", "peer_ep")}
    ours = [sys.executable, __file__, "--serve-ours", "--cpu-threads", str(args.cpu_threads)]
    peer = [
        str(peer_python), "-m", "wyoming_faster_whisper", "--model", str(model_dir),
        "--stt-library", "faster-whisper", "--data-dir", str(data_dir), "--local-files-only",
        "--compute-type", "int8", "--beam-size", "5", "--cpu-threads", str(args.cpu_threads),
    ]  # fmt: skip
    results: dict[str, Any] = {
        "benchmark": "asr latency, end of speech → transcript",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "model": {"ref": "whisper-base", "dir": str(model_dir), "compute_type": "int8", "device": "cpu"},
        "beam_size": 5,
        "cpu_threads": args.cpu_threads,
        "silence_s": silence,
        "peer": f"wyoming-faster-whisper {peer_version}",
        "rounds": args.rounds,
        "commands": [text for _, text, _ in commands],
        "modes": {},
    }
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(
            process(
                "ours", [*ours, "--port", str(ports["ours"]), "--endpointing", "0"], ports["ours"], log_dir
            )
        )
        await stack.enter_async_context(
            process(
                "ours_ep",
                [*ours, "--port", str(ports["ours_ep"]), "--endpointing", str(silence)],
                ports["ours_ep"],
                log_dir,
            )
        )
        await stack.enter_async_context(
            process("peer", [*peer, "--uri", f"tcp://127.0.0.1:{ports['peer']}"], ports["peer"], log_dir)
        )
        await stack.enter_async_context(
            process(
                "peer_ep",
                [*peer, "--uri", f"tcp://127.0.0.1:{ports['peer_ep']}", "--vad-endpointing", str(silence)],
                ports["peer_ep"],
                log_dir,
            )
        )
        for mode, endpointing, pair in (
            ("audio-stop", False, ("ours", "peer")),
            ("endpointing", True, ("ours_ep", "peer_ep")),
        ):
            latencies: dict[str, list[float]] = {name: [] for name in pair}
            texts: dict[str, list[str]] = {name: [] for name in pair}
            for name in pair:  # warm-up, not counted
                await one(ports[name], commands[0][2], commands[0][0], silence, endpointing=endpointing)
            for round_index in range(args.rounds):
                for index, (language, _, speech) in enumerate(commands):
                    order = pair if (index + round_index) % 2 == 0 else pair[::-1]
                    for name in order:
                        seconds, text = await one(
                            ports[name], speech, language, silence, endpointing=endpointing
                        )
                        latencies[name].append(seconds)
                        if round_index == 0:
                            texts[name].append(text)
                        _LOGGER.info("%s %s %.3f s %r", mode, name, seconds, text)
            ours_summary, peer_summary = summary(latencies[pair[0]]), summary(latencies[pair[1]])
            results["modes"][mode] = {
                "ours": ours_summary,
                "peer": peer_summary,
                "ratio_p50": round(ours_summary["p50_s"] / peer_summary["p50_s"], 3),
                "ratio_p95": round(ours_summary["p95_s"] / peer_summary["p95_s"], 3),
                "texts": texts,
                "latencies": {k: [round(v, 4) for v in vs] for k, vs in latencies.items()},
            }
        results["fast"] = await fast_mode(ports["ours"], commands, model_dir, args.cpu_threads)
    return results


async def fast_mode(
    port: int, commands: Sequence[tuple[str, str, np.ndarray]], model_dir: Path, cpu_threads: int
) -> dict[str, Any]:
    """As-fast-as-possible stream through our server vs raw WhisperModel.transcribe in process."""
    from faster_whisper import WhisperModel

    model = WhisperModel(str(model_dir), device="cpu", compute_type="int8", cpu_threads=cpu_threads)
    same_options = {"temperature": 0.0, "without_timestamps": True, "condition_on_previous_text": False}
    ours: list[float] = []
    raw_same: list[float] = []
    raw_default: list[float] = []

    def raw(audio: np.ndarray, language: str, options: dict[str, Any]) -> float:
        started = time.monotonic()
        segments, _ = model.transcribe(audio, language=language, beam_size=5, **options)
        list(segments)
        return time.monotonic() - started

    for language, _, speech in commands:
        lead, tail = np.zeros(int(0.3 * RATE), np.int16), np.zeros(int(0.5 * RATE), np.int16)
        padded = np.concatenate([lead, speech, tail])
        started = time.monotonic()
        exchange = await transcribe(port, pcm_bytes(padded), language=language, chunk_ms=10)
        assert exchange.transcript_at is not None
        ours.append(exchange.transcript_at - started)
        audio = padded.astype(np.float32) / 32768
        raw_same.append(await asyncio.to_thread(raw, audio, language, same_options))
        raw_default.append(await asyncio.to_thread(raw, audio, language, {}))
    return {
        "what": "whole padded command sent as fast as possible, first chunk → transcript; vs "
        "WhisperModel.transcribe in process on the same audio (same decode options, and defaults)",
        "ours_total": summary(ours),
        "raw_same_options": summary(raw_same),
        "raw_default_options": summary(raw_default),
        "ratio_vs_same_options": round(sum(ours) / sum(raw_same), 3),
        "ratio_vs_default_options": round(sum(ours) / sum(raw_default), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--silence", type=float, default=0.8, help="end-of-utterance silence, seconds")
    parser.add_argument(
        "--cpu-threads",
        type=int,
        default=1,
        help="CTranslate2 threads, ours and the peer alike (1: our default)",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--serve-ours", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--endpointing", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.serve_ours:
        asyncio.run(serve_ours(args.port, args.endpointing, args.cpu_threads))
        return
    results = asyncio.run(run(args))
    out = args.out or ROOT / "bench" / "results" / f"asr-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", "utf-8")
    for mode, figures in results["modes"].items():
        print(
            f"{mode}: ours p50 {figures['ours']['p50_s']:.3f} s p95 {figures['ours']['p95_s']:.3f} s | "
            f"peer p50 {figures['peer']['p50_s']:.3f} s p95 {figures['peer']['p95_s']:.3f} s | "
            f"ratio p50 {figures['ratio_p50']:.2f}"
        )
    fast = results["fast"]
    print(
        f"fast: ours/raw same options {fast['ratio_vs_same_options']:.2f}, "
        f"ours/raw defaults {fast['ratio_vs_default_options']:.2f}"
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
