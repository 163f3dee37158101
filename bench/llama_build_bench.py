"""Tokens/s of the portable llama.cpp build against a -march=native one, on a CPU where both run.

    LLAMA_NATIVE=1 bash scripts/build_llama.sh /tmp/venv-llama-native/bin/python   # once, ~5 min
    .venv/bin/python -m bench.llama_build_bench --native-python /tmp/venv-llama-native/bin/python

Each build runs in its own venv, in a fresh process per round, rounds
interleaved (portable, native, native, portable, ...): SmolLM2-135M Q4_1,
greedy, 128 tokens after a warm-up, several generations per round. Writes
``llama-build-<date>.json`` with each build's flags (``llama_print_system_info``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from wyoming_superwhisper.config import load_settings
from wyoming_superwhisper.runtime.native import cpu_features
from wyoming_superwhisper.runtime.registry import ModelRegistry

ROUND = r"""
import json, sys, time
from llama_cpp import Llama, llama_print_system_info
llm = Llama(model_path=sys.argv[1], n_ctx=1024, n_threads=2, verbose=False)
messages = [{"role": "user", "content": "Raconte une longue histoire sur un dragon et un chevalier."}]
def once():
    stamps = []
    for chunk in llm.create_chat_completion(messages=messages, max_tokens=128, temperature=0.0, stream=True):
        if chunk["choices"][0]["delta"].get("content"):
            stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])
once()
rates = [once() for _ in range(int(sys.argv[2]))]
info = llama_print_system_info()
print(json.dumps({"rates": rates, "system_info": info.decode() if isinstance(info, bytes) else str(info)}))
"""


def one_round(python: str, model: Path, generations: int) -> dict[str, Any]:
    out = subprocess.run(
        [python, "-c", ROUND, str(model), str(generations)], check=True, capture_output=True, text=True
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--native-python", required=True, help="python of a venv with a LLAMA_NATIVE=1 build")
    parser.add_argument("--portable-python", default=sys.executable)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    model = ModelRegistry.from_settings(load_settings()).resolve("smollm2-135m").entry_path
    builds = {"portable": args.portable_python, "native": args.native_python}
    rates: dict[str, list[float]] = {name: [] for name in builds}
    info: dict[str, str] = {}
    for index in range(args.rounds):
        order = list(builds) if index % 2 == 0 else list(reversed(builds))
        for name in order:
            result = one_round(builds[name], model, args.generations)
            rates[name].extend(result["rates"])
            info[name] = result["system_info"]
    medians = {name: statistics.median(values) for name, values in rates.items()}
    results = {
        "date": dt.date.today().isoformat(),
        "host": os.uname().nodename,
        "cpu_features": list(cpu_features()),
        "model": "smollm2-135m (Q4_1), 128 tokens, greedy, 2 threads",
        "tokens_per_s_median": medians,
        "portable_over_native": medians["portable"] / medians["native"],
        "system_info": info,
        "rates": rates,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"llama-build-{results['date']}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("tokens_per_s_median", "portable_over_native")}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
