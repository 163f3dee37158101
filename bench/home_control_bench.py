"""Home commands → the call each model makes, scored against the call Home Assistant needs.

    .venv/bin/python -m bench.home_control_bench [--model smollm2-135m] [--gguf PATH ...]

The home and the tools are the ones Home Assistant 2025.4.4 really sent
(tests/data/hass-2025.4.4-ollama-chat.json: 12 entities in 4 areas, 7 tools).
Each command goes to the engine exactly as the Ollama API hands it over
(grammar, instructions and example turns included), greedy. Scored per
command: the tool, the entity (or area) and the value must all be right.
Malformed: output that is neither text nor a call Home Assistant can execute
(:func:`validate_call`). The home is bilingual, as a French household that
gave its devices English aliases is (Home Assistant lists aliases after the
name). Three paths are scored: Home Assistant's own sentence templates alone
(``local-intents``, :mod:`wyoming_superwhisper.handle.intents`), each model
alone, and what the server does (``handle.local_intents``: templates first,
the model for what they do not match). Writes ``home-control-<date>.json`` in
bench/results.
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
from wyoming_superwhisper.handle.home import Home, home_of
from wyoming_superwhisper.handle.intents import IntentRecognizer, fast_answer
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


ALIASES = {
    "Lumière de la cuisine": "Kitchen light",
    "Lumière du salon": "Living room light",
    "Lampe du salon": "Living room lamp",
    "Lumière de la chambre": "Bedroom light",
    "Lampe de chevet": "Bedside lamp",
    "Lumière du bureau": "Office light",
    "Prise du bureau": "Office plug",
    "Cafetière": "Coffee maker",
    "Ventilateur de la chambre": "Bedroom fan",
    "Volet du salon": "Living room shutter",
    "Chauffage": "Heating",
    "Température du salon": "Living room temperature",
}
"""English aliases of the French home's entities."""


def bilingual(system: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Home Assistant's system prompt with each entity's English alias after its name."""
    out = []
    for message in system:
        content = str(message.get("content") or "")
        for name, alias in ALIASES.items():
            content = content.replace(f"- names: {name}\n", f"- names: {name}, {alias}\n")
        out.append({**message, "content": content})
    return out


def right(tool: str | None, expected: dict[str, Any], calls: list[dict[str, Any]], home: Home) -> bool:
    if tool is None:
        return not calls
    if len(calls) != 1 or calls[0]["name"] != tool:
        return False
    got = calls[0]["arguments"]
    for key, value in expected.items():
        seen = got.get(key)
        if key == "name" and isinstance(seen, str):  # any name or alias of the right entity
            if home.entity(seen) is None or home.entity(seen) != home.entity(value):
                return False
        elif isinstance(value, str) and isinstance(seen, str):
            if seen.casefold() != value.casefold():
                return False
        elif isinstance(value, (int, float)) and isinstance(seen, (int, float)):
            if abs(seen - value) > 0.01:
                return False
        elif seen != value:
            return False
    return True


def _system() -> tuple[list[dict[str, Any]], list[Any]]:
    body = json.loads(FIXTURE.read_text())["request"]["body"]
    return bilingual(chat_messages(body["messages"])[:-1]), body["tools"]


def _score(
    language: str, command: str, tool: str | None, expected: dict[str, Any], home: Home,
    calls: list[dict[str, Any]], text: str, error: str | None, seconds: float, answered: bool = True,
) -> dict[str, Any]:  # fmt: skip
    problems = [validate_call(c["name"], c["arguments"], home) for c in calls]
    malformed = answered and (error is not None or any(problems) or (not calls and not text.strip()))
    return {
        "language": language, "command": command, "expected_tool": tool, "expected": expected,
        "calls": calls, "text": text.strip()[:200], "error": error, "answered": answered,
        "right": answered and (not malformed) and right(tool, expected, calls, home),
        "malformed": malformed, "seconds": round(seconds, 4),
    }  # fmt: skip


def run_local() -> list[dict[str, Any]]:
    """Home Assistant's sentence templates alone: a call, or nothing (the model's turn)."""
    system, tools = _system()
    recognizer = IntentRecognizer()
    rows = []
    for language, command, tool, expected in COMMANDS:
        messages = [*system, {"role": "user", "content": command}]
        home = home_of(messages, tools)
        started = time.perf_counter()
        answer = fast_answer(recognizer, messages, language, home)
        seconds = time.perf_counter() - started
        calls = [dict(answer.tool_call)] if answer is not None and answer.tool_call else []
        rows.append(
            _score(language, command, tool, expected, home, calls, "", None, seconds, answered=bool(calls))
        )
    return rows


async def run_model(name: str, path: Path, options: dict[str, Any]) -> list[dict[str, Any]]:
    system, tools = _system()
    engine = LlamaCppEngine(path, ref=name, options=options)
    await engine.load()
    rows = []
    try:
        for language, command, tool, expected in COMMANDS:
            messages = [*system, {"role": "user", "content": command}]
            home = home_of(messages, tools)
            request = ChatRequest(messages, max_tokens=128, temperature=0.0, tools=tools, language=language)
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
            rows.append(_score(language, command, tool, expected, home, calls, text, error, seconds))
    finally:
        await engine.close()
    return rows


def local_first(local: list[dict[str, Any]], model: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the server answers: the template's call where one matched, else the model's answer."""
    rows = []
    for fast, slow in zip(local, model, strict=True):
        if fast["answered"]:
            rows.append({**fast, "by": "local-intents"})
        else:
            rows.append({**slow, "seconds": round(fast["seconds"] + slow["seconds"], 4), "by": "model"})
    return rows


def summary(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    def share(key: str, subset: list[dict[str, Any]]) -> float:
        return round(sum(r[key] for r in subset) / max(1, len(subset)), 3)

    french = [r for r in rows if r["language"] == "fr"]
    english = [r for r in rows if r["language"] == "en"]
    answered = [r for r in rows if r["answered"]]
    return {
        "path": name,
        "commands": len(rows),
        "answered": len(answered),
        "right": share("right", rows),
        "right_fr": share("right", french),
        "right_en": share("right", english),
        "right_when_answered": share("right", answered),
        "malformed": share("malformed", rows),
        "seconds_p50": round(statistics.median(r["seconds"] for r in answered), 4) if answered else None,
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
        options = dict(resolved.spec.options)
        if options.get("tools") is False:  # as shipped (words only), and what its calls would be
            models.append((f"{ref} (calls allowed)", resolved.entry_path, {**options, "tools": True}))
        models.append((ref, resolved.entry_path, options))
    for item in args.gguf:
        name, _, path = item.partition("=")
        models.append((name, Path(path), {"n_ctx": 4096}))
    local = run_local()
    results = [summary("local-intents", local)]
    for name, path, options in models:
        model = await run_model(name, path, options)
        results.append(summary(name, model))
        results.append(summary(f"local-intents → {name} (the server)", local_first(local, model)))
    out = {
        "bench": "home-control",
        "date": dt.date.today().isoformat(),
        "home": str(FIXTURE.relative_to(ROOT)) + " with English aliases (bench.home_control_bench.ALIASES)",
        "path": "templates (handle.local_intents); the engine with grammar (the Ollama API's level), greedy",
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = RESULTS / f"home-control-{out['date']}.json"
    target.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    for result in results:
        p50 = result["seconds_p50"]
        print(
            f"{result['path']}: answered {result['answered']}/{result['commands']},"
            f" right {result['right']:.0%}"
            f" (fr {result['right_fr']:.0%}, en {result['right_en']:.0%}),"
            f" malformed {result['malformed']:.0%}, p50 {p50} s"
        )
    print(target)


if __name__ == "__main__":
    asyncio.run(main())
