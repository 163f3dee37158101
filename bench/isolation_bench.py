"""What the worker processes cost: the same servers with native engines in process and in workers.

``python -m bench.isolation_bench [--n 12] [--out bench/results]`` starts the
ASR, handle and TTS services twice in one process, once with
``server.engine_workers: false`` (engines in the server's process), once with
``true`` (each native engine in its supervised worker, Silero in process: the
default) and once with ``asr.vad_in_worker: true`` as well, on the embedded
models, and sends the same requests to both, interleaved, over real Wyoming
TCP connections:

* ASR: ``audio-stop`` → ``transcript`` for a French command streamed in real time
  (as a satellite does) and sent as fast as the socket takes it (every VAD
  frame then waits its round trip to the worker before the stop is read: the
  worst case for the pipe);
* handle: transcript → first ``handled-chunk`` (a new conversation each time), and tokens/s of the raw engine
  stream (64 tokens) through the proxy and in process;
* TTS: ``synthesize`` → first ``audio-chunk`` with the Piper voice;
* memory: the server's RSS and each worker's, after warm-up (a model's
  weights must live in one process only).

Writes ``isolation-<date>.json``. Targets (issue 17): at most +5 ms p50 on each
latency, at most 5 % fewer tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.event import Event
from wyoming.tts import Synthesize, SynthesizeVoice

from wyoming_superwhisper.asr.service import AsrService
from wyoming_superwhisper.config import load_settings
from wyoming_superwhisper.handle.engines import ChatRequest
from wyoming_superwhisper.handle.service import HandleService
from wyoming_superwhisper.runtime.gpu import choose_gpu
from wyoming_superwhisper.runtime.metrics import Metrics
from wyoming_superwhisper.runtime.registry import ModelRegistry
from wyoming_superwhisper.runtime.server import ServiceContext, ServiceServer, WyomingService
from wyoming_superwhisper.runtime.worker import EngineWorker
from wyoming_superwhisper.tts.service import TtsService

LOOPBACK = "127.0.0.1"
COMMAND_FR = "Allume la lumière du salon."
ANSWER_EN = "The living room light is on."
MODES = {"in_process": (False, False), "workers": (True, False), "workers_vad": (True, True)}
"""(server.engine_workers, asr.vad_in_worker): the default is "workers" (Silero in process)."""


def settings_for(workers: bool, vad_in_worker: bool) -> Any:
    return load_settings(
        environ={},
        overrides={
            "models.environment": "test",
            "asr.uri": f"tcp://{LOOPBACK}:0",
            "handle.uri": f"tcp://{LOOPBACK}:0",
            "tts.uri": f"tcp://{LOOPBACK}:0",
            "metrics.enabled": False,
            "zeroconf.enabled": False,
            "server.engine_workers": workers,
            "asr.vad_in_worker": vad_in_worker,
            "log_level": "WARNING",
        },
    )


def french_command() -> bytes:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise SystemExit("espeak-ng is needed for the ASR audio (apt install espeak-ng)")
    raw = subprocess.run(
        [espeak, "-v", "fr", "-s", "150", "--stdout", COMMAND_FR], check=True, capture_output=True
    ).stdout
    data = raw[raw.find(b"data") + 8 :]
    samples = np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2").astype(np.float32)
    rate = int.from_bytes(raw[24:28], "little")
    import soxr

    pcm = soxr.resample(samples, rate, 16000).astype("<i2")
    silence = np.zeros(4800, dtype="<i2")
    return np.concatenate([silence, pcm, silence]).tobytes()


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Stack:
    """The three services in this process, in one mode."""

    def __init__(self, workers: bool, vad_in_worker: bool) -> None:
        settings = settings_for(workers, vad_in_worker)
        self.context = ServiceContext(
            settings, ModelRegistry.from_settings(settings), choose_gpu(None, settings.gpu),
            Metrics(CollectorRegistry()),
        )  # fmt: skip
        self.services: dict[str, WyomingService] = {
            "asr": AsrService(self.context),
            "handle": HandleService(self.context),
            "tts": TtsService(self.context),
        }
        self.servers = {name: ServiceServer(service) for name, service in self.services.items()}

    async def start(self) -> None:
        for name, service in self.services.items():
            await service.start()
            await self.servers[name].start()
        tts = self.services["tts"]
        assert isinstance(tts, TtsService)
        for chain in tts.routes.values():
            for index in range(len(chain.levels)):
                await chain.load(index)

    async def stop(self) -> None:
        for name, service in self.services.items():
            await self.servers[name].stop(2.0)
            await service.stop()

    def port(self, name: str) -> int:
        return self.servers[name].port or 0

    def worker_pids(self) -> dict[str, int]:
        pids: dict[str, int] = {}
        for service in self.services.values():
            for chain in service.chains():
                for level in chain.levels:
                    engine = level.engine
                    if isinstance(engine, EngineWorker) and engine.worker_status()["pid"]:
                        pids[engine.name] = engine.worker_status()["pid"]
        asr = self.services["asr"]
        assert isinstance(asr, AsrService)
        vad = asr.vad.worker_status()
        if vad and vad["pid"]:
            pids["silero-vad"] = vad["pid"]
        return pids


async def until(client: AsyncTcpClient, types: tuple[str, ...]) -> Event:
    while True:
        event = await asyncio.wait_for(client.read_event(), 60)
        if event is None:
            raise RuntimeError("server closed the connection")
        if event.type in (*types, "error"):
            return event


async def asr_once(port: int, pcm: bytes, *, real_time: bool) -> float:
    """``audio-stop`` → ``transcript``; 20 ms chunks, paced like a satellite or as fast as possible."""
    async with AsyncTcpClient(LOOPBACK, port) as client:
        await client.write_event(Transcribe(language="fr").event())
        await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
        began = time.perf_counter()
        for offset in range(0, len(pcm), 640):
            if real_time:
                await asyncio.sleep(max(0.0, began + offset / 32000 - time.perf_counter()))
            await client.write_event(
                AudioChunk(rate=16000, width=2, channels=1, audio=pcm[offset : offset + 640]).event()
            )
        started = time.perf_counter()
        await client.write_event(AudioStop().event())
        event = await until(client, ("transcript",))
        if event.type != "transcript":
            raise RuntimeError(f"asr answered {event.type}: {event.data}")
        return time.perf_counter() - started


async def handle_once(port: int, question: str, conversation: str) -> float:
    """A new conversation each time: the same prompt, as Home Assistant's first turn."""
    async with AsyncTcpClient(LOOPBACK, port) as client:
        started = time.perf_counter()
        context = {"conversation_id": conversation}
        await client.write_event(Transcript(text=question, language="fr", context=context).event())
        event = await until(client, ("handled-chunk", "handled", "not-handled"))
        elapsed = time.perf_counter() - started
        if event.type != "handled-chunk":
            raise RuntimeError(f"handle answered {event.type}: {event.data}")
        await until(client, ("handled-stop",))
        return elapsed


async def tts_once(port: int) -> float:
    async with AsyncTcpClient(LOOPBACK, port) as client:
        started = time.perf_counter()
        await client.write_event(Synthesize(text=ANSWER_EN, voice=SynthesizeVoice(name="piper-joe")).event())
        await until(client, ("audio-chunk",))
        elapsed = time.perf_counter() - started
        await until(client, ("audio-stop",))
        return elapsed


async def tokens_per_second(stack: Stack) -> float:
    handle = stack.services["handle"]
    assert isinstance(handle, HandleService)
    engine = handle.chain.engines[-1]
    request = ChatRequest(
        [{"role": "user", "content": "Raconte une histoire sur un dragon."}], max_tokens=64, temperature=0.0
    )
    stamps: list[float] = []
    async with contextlib.aclosing(engine.stream(request)) as stream:
        async for delta in stream:
            if delta.text:
                stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
        "mean": statistics.fmean(ordered),
        "n": len(ordered),
    }


async def run(n: int) -> dict[str, Any]:
    pcm = french_command()
    stacks = {mode: Stack(*flags) for mode, flags in MODES.items()}
    rss_before = rss_mib(os.getpid())
    for stack in stacks.values():
        await stack.start()
    keys = ("asr_real_time", "asr_burst", "handle", "tts", "tok_s")
    samples: dict[str, dict[str, list[float]]] = {m: {k: [] for k in keys} for m in MODES}
    try:
        for mode, stack in stacks.items():  # warm-up: first decodes and generations are slower
            await asr_once(stack.port("asr"), pcm, real_time=False)
            await handle_once(stack.port("handle"), "Bonjour !", f"warm-{mode}")
            await tts_once(stack.port("tts"))
        for i in range(n):
            order = list(MODES)[i % len(MODES) :] + list(MODES)[: i % len(MODES)]
            for mode in order:
                stack = stacks[mode]
                port = stack.port("asr")
                samples[mode]["asr_real_time"].append(await asr_once(port, pcm, real_time=True))
                samples[mode]["asr_burst"].append(await asr_once(port, pcm, real_time=False))
                samples[mode]["handle"].append(
                    await handle_once(stack.port("handle"), "Quelle heure est-il ?", f"{mode}-{i}")
                )
                samples[mode]["tts"].append(await tts_once(stack.port("tts")))
                samples[mode]["tok_s"].append(await tokens_per_second(stack))
        workers = stacks["workers_vad"].worker_pids()
        memory = {
            "server_rss_mib_both_stacks": rss_mib(os.getpid()),
            "server_rss_mib_before_start": rss_before,
            "workers_rss_mib": {name: rss_mib(pid) for name, pid in workers.items()},
        }
    finally:
        for stack in stacks.values():
            await stack.stop()
    figures: dict[str, Any] = {}
    for key, label in (
        ("asr_real_time", "ASR audio-stop → transcript, audio in real time (s)"),
        ("asr_burst", "ASR audio-stop → transcript, audio as fast as the socket takes it (s)"),
        ("handle", "handle transcript → first chunk (s)"),
        ("tts", "TTS synthesize → first audio (s)"),
        ("tok_s", "handle tokens/s (64 tokens, SmolLM2-135M)"),
    ):
        inproc = summary(samples["in_process"][key])
        figures[key] = {"label": label, "in_process": inproc}
        for mode in ("workers", "workers_vad"):
            worker = summary(samples[mode][key])
            figures[key][mode] = worker
            figures[key][f"{mode}_p50_delta"] = worker["p50"] - inproc["p50"]
            figures[key][f"{mode}_p50_ratio"] = worker["p50"] / inproc["p50"] if inproc["p50"] else None
    return {
        "date": dt.date.today().isoformat(),
        "host": os.uname().nodename,
        "cpus": os.cpu_count(),
        "n": n,
        "figures": figures,
        "memory": memory,
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12, help="requests per service and mode")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = asyncio.run(run(args.n))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"isolation-{results['date']}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    for figure in results["figures"].values():
        print(
            f"{figure['label']}: in process p50 {figure['in_process']['p50']:.4f}; "
            f"workers {figure['workers']['p50']:.4f} ({figure['workers_p50_delta'] * 1000:+.1f} ms, "
            f"x{figure['workers_p50_ratio']:.3f}); with the VAD in a worker too "
            f"{figure['workers_vad']['p50']:.4f} ({figure['workers_vad_p50_delta'] * 1000:+.1f} ms)"
        )
    print(json.dumps(results["memory"], indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
