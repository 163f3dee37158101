"""Handle server vs raw llama-cpp-python: time to first chunk and tokens per second.

Same GGUF, same messages (the service's own prompt), same settings (greedy,
same ``max_tokens``, same ``n_ctx``), on this machine's CPU. The server is
measured through a real TCP socket with the wyoming client, at the configured
holdback (``handle.stream_holdback_chars``) and with none. Target (issue 5):
TTFT within raw + 20 ms, throughput ≥ 0.95× raw.

``clock_moves``: a French question in a new minute each time, as a user asks
one every few minutes: the built-in prompt (the date, no time of day) beside
the prompt as it was until 2026-12-07 (date and time second, as an override).
llama.cpp reuses the start of the last prompt it evaluated, up to the first change.

    .venv/bin/python bench/handle_bench.py [--runs 7] [--max-tokens 64]

Writes ``bench/results/handle_bench.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import LOOPBACK, make_context, make_settings, serving  # noqa: E402
from wyoming.asr import Transcript  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402

from wyoming_superwhisper.handle.engines import LlamaCppEngine  # noqa: E402
from wyoming_superwhisper.handle.service import HandleService  # noqa: E402

QUESTION = "What is the capital of France?"
LANGUAGE = "en"
OPTIONS = {"temperature": 0.0, "seed": 1}


def raw_run(llm: Any, messages: list[dict[str, Any]], max_tokens: int) -> dict[str, float]:
    started = time.perf_counter()
    first = last = 0.0
    tokens = 0
    for chunk in llm.create_chat_completion(messages=messages, stream=True, max_tokens=max_tokens, **OPTIONS):
        if chunk["choices"][0]["delta"].get("content"):
            now = time.perf_counter()
            tokens += 1
            if tokens == 1:
                first = now
            last = now
    return _figures(started, first, last, tokens)


def _figures(started: float, first: float, last: float, tokens: int) -> dict[str, float]:
    span = last - first
    return {
        "ttft_s": first - started,
        "tokens": tokens,
        "tokens_per_s": (tokens - 1) / span if tokens > 1 and span > 0 else 0.0,
    }


DATE_SECOND = (
    "Tu es {name}, un assistant vocal de maison connectée. Nous sommes le {date}. "
    "Réponds en {language}, en une ou deux phrases courtes, faites pour être dites à voix haute. "
    "N'utilise ni markdown, ni emoji, ni liste, ni titre. Si tu ne sais pas, dis-le simplement."
)
"""The built-in French prompt as it was until 2026-12-07: the date and the time second."""
FRENCH_QUESTION = "Quelle est la capitale de la France ?"


class MovingClock:
    """A clock one minute later at each reading: every question in a new minute."""

    def __init__(self) -> None:
        self.now = dt.datetime(2026, 12, 7, 20, 0)

    def __call__(self) -> dt.datetime:
        self.now += dt.timedelta(minutes=1)
        return self.now


async def server_runs(
    holdback: int,
    runs: int,
    max_tokens: int,
    *,
    question: str = QUESTION,
    language: str = LANGUAGE,
    system_prompt: str = "",
    clock: Any = dt.datetime.now,
) -> list[dict[str, float]]:
    settings = make_settings(
        **{
            "handle.chain": [{"model": "smollm2-135m", "device": "cpu", "options": OPTIONS}],
            "handle.max_tokens": max_tokens,
            "handle.stream_holdback_chars": holdback,
            "handle.system_prompt": system_prompt,
        }
    )
    service = HandleService(make_context(settings), clock=clock)
    engine = service.chain.engines[0]
    assert isinstance(getattr(engine, "engine", engine), LlamaCppEngine)  # in its worker by default
    results = []
    async with serving(service) as server:
        assert server.port is not None
        for i in range(runs + 1):
            async with AsyncTcpClient(LOOPBACK, server.port) as client:
                # a fresh conversation id each time: same prompt as the raw runs
                conversation = {"conversation_id": f"b{i}"}
                event = Transcript(text=question, language=language, context=conversation)
                started = time.perf_counter()
                await client.write_event(event.event())
                first = last = 0.0
                while True:
                    reply = await client.read_event()
                    assert reply is not None
                    if reply.type == "handled-chunk":
                        last = time.perf_counter()
                        first = first or last
                    if reply.type in ("handled-stop", "not-handled", "error"):
                        break
                end = time.perf_counter()
            tokens = engine.stats.tokens
            # tokens/s from the model's own tokens over the streamed span, like the raw run
            figures = _figures(started, first, last, tokens)
            figures["answer_s"] = end - started
            if i > 0:  # the first request warms caches, as the raw warm-up does
                results.append(figures)
    return results


def summary(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in rows) for key in rows[0]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark (``args.runs``, ``args.max_tokens``); the result that main() writes."""
    from llama_cpp import Llama

    context = make_context()
    model = context.registry.resolve("smollm2-135m")
    chain = [{"model": "smollm2-135m", "device": "cpu"}]
    probe = HandleService(make_context(make_settings(**{"handle.chain": chain})))
    messages = probe.conversation_messages("bench", QUESTION, LANGUAGE)
    llm = Llama(
        model_path=str(model.entry_path), n_gpu_layers=0, n_ctx=2048, verbose=False, chat_format="chatml"
    )
    raw_run(llm, messages, args.max_tokens)  # warm-up
    raw = [raw_run(llm, messages, args.max_tokens) for _ in range(args.runs)]
    llm.close()

    default_holdback = probe.settings.stream_holdback_chars
    served = {
        f"holdback_{default_holdback}": asyncio.run(
            server_runs(default_holdback, args.runs, args.max_tokens)
        ),
        "holdback_0": asyncio.run(server_runs(0, args.runs, args.max_tokens)),
    }
    french = {"question": FRENCH_QUESTION, "language": "fr", "clock": MovingClock()}
    clock_moves = {
        "built_in": asyncio.run(server_runs(0, args.runs, args.max_tokens, **french)),
        "date_and_time_second": asyncio.run(
            server_runs(0, args.runs, args.max_tokens, system_prompt=DATE_SECOND, **french)
        ),
    }
    raw_summary = summary(raw)
    result: dict[str, Any] = {
        "benchmark": "handle: server vs raw llama-cpp-python",
        "model": "smollm2-135m (SmolLM2-135M-Instruct Q4_1 GGUF)",
        "device": "cpu",
        "machine": {"python": platform.python_version(), "cpu_count": __import__("os").cpu_count()},
        "question": QUESTION,
        "max_tokens": args.max_tokens,
        "runs": args.runs,
        "raw": {"median": raw_summary, "runs": raw},
        "server": {},
        "clock_moves": {
            "question": FRENCH_QUESTION,
            **{name: {"median": summary(rows), "runs": rows} for name, rows in clock_moves.items()},
        },
    }
    for name, rows in served.items():
        med = summary(rows)
        result["server"][name] = {
            "median": med,
            "ttft_over_raw_ms": 1000 * (med["ttft_s"] - raw_summary["ttft_s"]),
            "throughput_ratio": med["tokens_per_s"] / raw_summary["tokens_per_s"]
            if raw_summary["tokens_per_s"]
            else 0.0,
            "runs": rows,
        }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    result = run(args)
    raw_summary = result["raw"]["median"]
    out = ROOT / "bench" / "results" / "handle_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", "utf-8")
    print(json.dumps({k: v for k, v in result.items() if k not in ("raw", "server")}, indent=2))
    print("raw   ", json.dumps(raw_summary))
    for name, data in result["server"].items():
        print(
            f"server {name}: ttft {data['median']['ttft_s'] * 1000:.1f} ms "
            f"(+{data['ttft_over_raw_ms']:.1f} ms), {data['median']['tokens_per_s']:.1f} tok/s "
            f"({data['throughput_ratio']:.2f}x raw)"
        )
    for name in ("built_in", "date_and_time_second"):
        data = result["clock_moves"][name]["median"]
        print(f"a new minute each question, {name}: ttft {data['ttft_s'] * 1000:.1f} ms")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
