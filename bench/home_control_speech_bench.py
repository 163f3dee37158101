"""Spoken home commands → the home changed: end of speech → state changed, through Home Assistant.

    .venv/bin/python -m bench.home_control_speech_bench [--rounds 2] [--model-only]

A real Home Assistant Core 2025.4.4 (``.venv-hass``) with the bilingual French home
of ``tests/e2e/hass.py``; our three servers (``superwhisper serve``, the handle's
Ollama API on); Home Assistant's Ollama integration set up against us with the
Assist API; a French and an English pipeline: our ASR → that agent → our TTS.
Each command is spoken by our TTS (Kokoro in French, Piper in English), streamed
into the pipeline (faster than real time, as a recorded command), and the entity's
``state_changed`` event is timed from the last audio frame sent. The home is reset
before each round, and the commands alternate, so each must change its entity:
right when it changed, to the asked state. ``--model-only`` runs the same
with ``handle.local_intents: false`` and SmolLM2's calls allowed (the model decides every call).
Writes ``home-control-speech-<date>[-model-only].json`` in bench/results.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from tests.e2e.hass import Home, assist_home, reset_home, say, state

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

Check = Callable[[dict[str, Any]], bool]


def is_state(value: str) -> Check:
    return lambda current: current.get("state") == value


def target(degrees: float) -> Check:
    return lambda current: current.get("attributes", {}).get("temperature") == degrees


# (language, spoken command, entity watched, what its state must be after). French phrasings
# whisper base hears from our Kokoro voice (tests/e2e/test_home_control_assist.py, ASR_LIMIT).
COMMANDS: list[tuple[str, str, str, Check]] = [
    ("fr", "Allume la lumière de la cuisine.", "light.lumiere_cuisine", is_state("on")),
    ("fr", "Éteins la lumière de la cuisine.", "light.lumiere_cuisine", is_state("off")),
    ("fr", "Allume la lampe de chevet.", "light.lampe_chevet", is_state("on")),
    ("fr", "Éteins la lampe de chevet.", "light.lampe_chevet", is_state("off")),
    ("fr", "Allume la cafetière.", "switch.cafetiere", is_state("on")),
    ("fr", "Éteins la cafetière.", "switch.cafetiere", is_state("off")),
    ("fr", "Allume le ventilateur de la chambre.", "fan.ventilateur_chambre", is_state("on")),
    ("fr", "Éteins le ventilateur de la chambre.", "fan.ventilateur_chambre", is_state("off")),
    ("fr", "Règle le chauffage sur vingt et un degrés.", "climate.chauffage", target(21)),
    ("fr", "Ouvre le volet du salon.", "cover.volet_salon", is_state("open")),
    ("fr", "Ferme le volet du salon.", "cover.volet_salon", is_state("closed")),
    ("en", "Turn on the kitchen light.", "light.lumiere_cuisine", is_state("on")),
    ("en", "Turn off the kitchen light.", "light.lumiere_cuisine", is_state("off")),
    ("en", "Set the heating to 23 degrees.", "climate.chauffage", target(23)),
    ("en", "Turn on the coffee maker.", "switch.cafetiere", is_state("on")),
    ("en", "Turn off the coffee maker.", "switch.cafetiere", is_state("off")),
]


async def run(home: Home, rounds: int) -> list[dict[str, Any]]:
    rows = []
    for round_ in range(rounds):
        async with aiohttp.ClientSession() as session:  # every command below changes a state
            await reset_home(session, home.hass.url, home.token)
        await asyncio.sleep(1.0)
        for language, text, entity_id, check in COMMANDS:
            said = await say(home, text, language, watch=entity_id)
            current = await state(home, entity_id)
            # Right: the command changed the entity, to the asked state (doing nothing is not right).
            right = said.changed_after_s is not None and check(current)
            rows.append(
                {
                    "round": round_, "language": language, "command": text, "entity": entity_id,
                    "heard": said.transcript, "answer": said.answer, "right": right,
                    "state_changed_after_s": None if said.changed_after_s is None
                    else round(said.changed_after_s, 3),
                }
            )  # fmt: skip
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    changed = [
        r["state_changed_after_s"] for r in rows if r["right"] and r["state_changed_after_s"] is not None
    ]

    def share(subset: list[dict[str, Any]]) -> float:
        return round(sum(r["right"] for r in subset) / max(1, len(subset)), 3)

    return {
        "commands": len(rows),
        "right": share(rows),
        "right_fr": share([r for r in rows if r["language"] == "fr"]),
        "right_en": share([r for r in rows if r["language"] == "en"]),
        "audio_end_to_state_changed_p50_s": round(statistics.median(changed), 3) if changed else None,
        "audio_end_to_state_changed_max_s": round(max(changed), 3) if changed else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="times each command is said")
    parser.add_argument(
        "--model-only", action="store_true", help="handle.local_intents false: the model decides every call"
    )
    args = parser.parse_args()
    extra = []
    if args.model_only:  # the chain's model decides every call, its calls allowed (catalog: words only)
        chain = "[{model: smollm2-135m, device: cpu, options: {tools: true}}]"
        extra = ["--set", "handle.local_intents=false", "--set", f"handle.chain={chain}"]
    with tempfile.TemporaryDirectory(prefix="speech-bench-") as root, assist_home(Path(root), extra) as home:
        rows = asyncio.run(run(home, args.rounds))
    out = {
        "bench": "home-control-speech",
        "date": dt.date.today().isoformat(),
        "home_assistant": "2025.4.4, Ollama integration, Assist API",
        "path": "model only (handle.local_intents: false, SmolLM2 tools: true)"
        if args.model_only
        else "server defaults",
        "summary": summary(rows),
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "-model-only" if args.model_only else ""
    target_file = RESULTS / f"home-control-speech-{out['date']}{suffix}.json"
    target_file.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(out["summary"], indent=2))
    print(target_file)


if __name__ == "__main__":
    main()
