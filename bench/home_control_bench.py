"""Home commands → the call each model makes, scored against the call Home Assistant needs.

    .venv/bin/python -m bench.home_control_bench [--model smollm2-135m] [--gguf PATH ...]

The home and the tools are the ones Home Assistant 2025.4.4 really sent
(tests/data/hass-2025.4.4-ollama-chat.json: 12 entities in 4 areas, 7 tools).
Each command goes to the engine exactly as the Ollama API hands it over
(grammar, instructions and example turns included), greedy. Scored per
command: the tool, the entity (or area) and the value must all be right.
Malformed: output that is neither text nor a call Home Assistant can execute
(:func:`validate_call`). Writes ``home-control-<date>.json`` in bench/results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import statistics
import time
from pathlib import Path
from typing import Any

from wyoming_superwhisper.config import load_settings
from wyoming_superwhisper.handle.engines import ChatRequest, LlamaCppEngine
from wyoming_superwhisper.handle.home import home_of
from wyoming_superwhisper.handle.ollama import chat_messages
from wyoming_superwhisper.handle.toolcalls import validate_call
from wyoming_superwhisper.runtime.registry import ModelRegistry

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "hass-2025.4.4-ollama-chat.json"
RESULTS = ROOT / "bench" / "results"

ON, OFF = "HassTurnOn", "HassTurnOff"
LIGHT, CLIMATE = "HassLightSet", "HassClimateSetTemperature"
# (language, command, tool, expected arguments that must match; None: text, no call)
COMMANDS: list[tuple[str, str, str | None, dict[str, Any]]] = [
    ("fr", "Allume la lumière de la cuisine", ON, {"name": "Lumière de la cuisine"}),
    ("fr", "Éteins la lumière de la cuisine", OFF, {"name": "Lumière de la cuisine"}),
    ("fr", "Allume la lumière du salon", ON, {"name": "Lumière du salon"}),
    ("fr", "Éteins la lumière du salon", OFF, {"name": "Lumière du salon"}),
    ("fr", "Allume la lampe du salon", ON, {"name": "Lampe du salon"}),
    ("fr", "Éteins la lampe du salon", OFF, {"name": "Lampe du salon"}),
    ("fr", "Allume la lumière de la chambre", ON, {"name": "Lumière de la chambre"}),
    ("fr", "Éteins la lumière de la chambre", OFF, {"name": "Lumière de la chambre"}),
    ("fr", "Allume la lampe de chevet", ON, {"name": "Lampe de chevet"}),
    ("fr", "Éteins la lampe de chevet", OFF, {"name": "Lampe de chevet"}),
    ("fr", "Allume la lumière du bureau", ON, {"name": "Lumière du bureau"}),
    ("fr", "Éteins la lumière du bureau", OFF, {"name": "Lumière du bureau"}),
    ("fr", "Allume la prise du bureau", ON, {"name": "Prise du bureau"}),
    ("fr", "Coupe la prise du bureau", OFF, {"name": "Prise du bureau"}),
    ("fr", "Allume la cafetière", ON, {"name": "Cafetière"}),
    ("fr", "Éteins la cafetière", OFF, {"name": "Cafetière"}),
    ("fr", "Mets en marche le ventilateur de la chambre", ON, {"name": "Ventilateur de la chambre"}),
    ("fr", "Arrête le ventilateur de la chambre", OFF, {"name": "Ventilateur de la chambre"}),
    ("fr", "Ouvre le volet du salon", ON, {"name": "Volet du salon"}),
    ("fr", "Ferme le volet du salon", OFF, {"name": "Volet du salon"}),
    ("fr", "Mets le chauffage à 21 degrés", CLIMATE, {"temperature": 21}),
    ("fr", "Règle le chauffage sur 19 degrés", CLIMATE, {"temperature": 19}),
    ("fr", "Mets le chauffage à 23 degrés", CLIMATE, {"temperature": 23}),
    ("fr", "Baisse le chauffage à 18 degrés", CLIMATE, {"temperature": 18}),
    ("fr", "Règle la lumière du bureau à 50 %", LIGHT, {"name": "Lumière du bureau", "brightness": 50}),
    ("fr", "Mets la lumière du salon à 30 %", LIGHT, {"name": "Lumière du salon", "brightness": 30}),
    ("fr", "Mets la lampe de chevet à 10 %", LIGHT, {"name": "Lampe de chevet", "brightness": 10}),
    (
        "fr",
        "Règle la lumière de la cuisine à 100 %",
        LIGHT,
        {"name": "Lumière de la cuisine", "brightness": 100},
    ),
    ("fr", "Allume les lumières du salon", ON, {"area": "Salon", "domain": ["light"]}),
    ("fr", "Éteins les lumières de la chambre", OFF, {"area": "Chambre", "domain": ["light"]}),
    ("fr", "Éteins tout dans le bureau", OFF, {"area": "Bureau"}),
    ("fr", "Allume tout dans la cuisine", ON, {"area": "Cuisine"}),
    ("fr", "Tu peux allumer la lumière de la cuisine ?", ON, {"name": "Lumière de la cuisine"}),
    ("fr", "Il fait sombre dans le bureau, allume la lumière du bureau", ON, {"name": "Lumière du bureau"}),
    ("fr", "La lumière du salon est-elle allumée ?", "GetLiveContext", {}),
    ("fr", "Quelle température fait-il dans le salon ?", "GetLiveContext", {}),
    ("fr", "Est-ce que la cafetière est allumée ?", "GetLiveContext", {}),
    ("fr", "Le volet du salon est-il ouvert ?", "GetLiveContext", {}),
    ("fr", "Bonjour, comment ça va ?", None, {}),
    ("fr", "Quelle est la capitale de l'Italie ?", None, {}),
    ("en", "Turn on the kitchen light", ON, {"name": "Lumière de la cuisine"}),
    ("en", "Turn off the kitchen light", OFF, {"name": "Lumière de la cuisine"}),
    ("en", "Switch on the office plug", ON, {"name": "Prise du bureau"}),
    ("en", "Turn off the coffee maker", OFF, {"name": "Cafetière"}),
    ("en", "Set the heating to 21 degrees", CLIMATE, {"temperature": 21}),
    ("en", "Set the office light to 50%", LIGHT, {"name": "Lumière du bureau", "brightness": 50}),
    ("en", "Open the living room shutter", ON, {"name": "Volet du salon"}),
    ("en", "Is the living room light on?", "GetLiveContext", {}),
    ("en", "Turn on the bedroom fan", ON, {"name": "Ventilateur de la chambre"}),
    ("en", "What is the capital of Italy?", None, {}),
]


def right(tool: str | None, expected: dict[str, Any], calls: list[dict[str, Any]]) -> bool:
    if tool is None:
        return not calls
    if len(calls) != 1 or calls[0]["name"] != tool:
        return False
    got = calls[0]["arguments"]
    for key, value in expected.items():
        seen = got.get(key)
        if isinstance(value, str) and isinstance(seen, str):
            if seen.casefold() != value.casefold():
                return False
        elif isinstance(value, (int, float)) and isinstance(seen, (int, float)):
            if abs(seen - value) > 0.01:
                return False
        elif seen != value:
            return False
    return True


async def run_model(name: str, path: Path, options: dict[str, Any]) -> dict[str, Any]:
    body = json.loads(FIXTURE.read_text())["request"]["body"]
    system = chat_messages(body["messages"])[:-1]
    engine = LlamaCppEngine(path, ref=name, options=options)
    await engine.load()
    rows = []
    try:
        for language, command, tool, expected in COMMANDS:
            messages = [*system, {"role": "user", "content": command}]
            home = home_of(messages, body["tools"])
            request = ChatRequest(
                messages, max_tokens=128, temperature=0.0, tools=body["tools"], language=language
            )
            started = time.perf_counter()
            text, raw_calls, error = "", [], None
            try:
                async with contextlib.aclosing(engine.stream(request)) as stream:
                    async for delta in stream:
                        text += delta.text
                        raw_calls += list(delta.tool_calls or [])
            except Exception as failure:  # a malformed call surfaces as an engine error
                error = str(failure)
            seconds = time.perf_counter() - started
            calls = [
                {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"] or "{}")}
                for c in raw_calls
            ]
            problems = [validate_call(c["name"], c["arguments"], home) for c in calls]
            malformed = error is not None or any(problems) or (not calls and not text.strip())
            rows.append(
                {
                    "language": language, "command": command, "expected_tool": tool, "expected": expected,
                    "calls": calls, "text": text.strip()[:200], "error": error,
                    "right": (not malformed) and right(tool, expected, calls), "malformed": malformed,
                    "seconds": round(seconds, 3),
                }
            )  # fmt: skip
    finally:
        await engine.close()

    def share(key: str, subset: list[dict[str, Any]]) -> float:
        return round(sum(r[key] for r in subset) / max(1, len(subset)), 3)

    french = [r for r in rows if r["language"] == "fr"]
    english = [r for r in rows if r["language"] == "en"]
    return {
        "model": name,
        "commands": len(rows),
        "right": share("right", rows),
        "right_fr": share("right", french),
        "right_en": share("right", english),
        "malformed": share("malformed", rows),
        "seconds_p50": round(statistics.median(r["seconds"] for r in rows), 3),
        "rows": rows,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="catalog LLM (default smollm2-135m)")
    parser.add_argument("--gguf", action="append", default=[], help="NAME=PATH of another GGUF to compare")
    args = parser.parse_args()
    registry = ModelRegistry.from_settings(load_settings())
    models: list[tuple[str, Path, dict[str, Any]]] = []
    for ref in args.model or ["smollm2-135m"]:
        resolved = registry.resolve(ref)
        models.append((ref, resolved.entry_path, dict(resolved.spec.options)))
    for item in args.gguf:
        name, _, path = item.partition("=")
        models.append((name, Path(path), {"n_ctx": 4096}))
    results = [await run_model(name, path, options) for name, path, options in models]
    out = {
        "bench": "home-control",
        "date": dt.date.today().isoformat(),
        "home": str(FIXTURE.relative_to(ROOT)),
        "path": "engine with grammar (the Ollama API's level), greedy, no intent fast path",
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = RESULTS / f"home-control-{out['date']}.json"
    target.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    for result in results:
        print(
            f"{result['model']}: right {result['right']:.0%}"
            f" (fr {result['right_fr']:.0%}, en {result['right_en']:.0%}),"
            f" malformed {result['malformed']:.0%}, p50 {result['seconds_p50']} s"
        )
    print(target)


if __name__ == "__main__":
    asyncio.run(main())
