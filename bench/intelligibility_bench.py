"""Is the French voice understood? Each voice of the French chain speaks, our ASR reads it back.

``python -m bench.intelligibility_bench [--voices kokoro-ff_siwis,espeak-fr] [--out bench/results]``

32 French answer sentences of a home assistant (times, temperatures,
percentages, device and room names) are spoken by each French voice that is
installed (Kokoro ``ff_siwis``, espeak-ng, a Piper French voice when fetched),
resampled to 16 kHz and transcribed by whisper base (int8, beam 5, the
embedded ASR). Reported per voice: the round-trip word error rate (numbers
compared as digits on both sides, as ``asr.numbers: digits`` writes them),
synthesis time of one sentence (the first audio: every engine here answers a
sentence whole), and the real-time factor. Target (issue 18): Kokoro's WER at
most a quarter of espeak-ng's. Writes ``intelligibility-<date>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from wyoming_superwhisper.asr.engines import AsrRequest, WhisperEngine, word_error_rate
from wyoming_superwhisper.asr.numbers import to_digits
from wyoming_superwhisper.config import load_settings
from wyoming_superwhisper.runtime.chains import plan_chain
from wyoming_superwhisper.runtime.gpu import choose_gpu
from wyoming_superwhisper.runtime.registry import ModelRegistry
from wyoming_superwhisper.tts.engines import SynthesisOptions, TtsEngine
from wyoming_superwhisper.tts.sentences import normalize
from wyoming_superwhisper.tts.service import build_engine

SENTENCES = [
    "Il est dix heures et demie.",
    "Il est sept heures du matin.",
    "Votre réveil sonnera à six heures quarante-cinq.",
    "Le minuteur de cinq minutes est lancé.",
    "Il reste trois minutes sur le minuteur de la cuisine.",
    "Il fait vingt et un degrés dans le salon.",
    "La température extérieure est de douze degrés.",
    "Le chauffage de la chambre est réglé sur dix-neuf degrés.",
    "J'ai mis le thermostat à vingt-deux degrés.",
    "L'humidité de la salle de bain est de soixante pour cent.",
    "La lumière du salon est allumée à cinquante pour cent.",
    "J'ai baissé la lampe du bureau à trente pour cent.",
    "La batterie du capteur est à quinze pour cent.",
    "J'ai allumé la lumière de la cuisine.",
    "J'ai éteint toutes les lumières du rez-de-chaussée.",
    "La porte du garage est fermée.",
    "Les volets de la chambre sont ouverts.",
    "La prise du salon est éteinte.",
    "Le lave-linge a terminé son programme.",
    "La porte d'entrée est verrouillée.",
    "Il y a du mouvement dans le jardin.",
    "La fenêtre de la salle de bain est ouverte.",
    "Je lance la musique dans le salon.",
    "Le volume est maintenant à quarante.",
    "Demain, il fera beau avec un maximum de vingt-cinq degrés.",
    "Il va pleuvoir cet après-midi.",
    "Votre rendez-vous chez le médecin est à quatorze heures.",
    "Nous sommes le trois décembre.",
    "La consommation électrique est de deux cents watts.",
    "Désolé, je n'ai pas compris.",
    "Bonjour, que puis-je faire pour vous ?",
    "C'est fait, bonne soirée.",
]

DEFAULT_VOICES = ("piper-fr_FR-siwis-medium", "kokoro-ff_siwis", "espeak-fr")


def to_16k(pcm: bytes, rate: int) -> np.ndarray:
    import soxr

    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    return np.asarray(soxr.resample(samples, rate, 16000), dtype=np.float32)


async def one_voice(engine: TtsEngine, whisper: WhisperEngine) -> dict[str, Any]:
    await engine.load()
    rows = []
    try:
        for text in SENTENCES:
            started = time.perf_counter()
            audio = await engine.synthesize(normalize(text, "fr"), SynthesisOptions())
            seconds = time.perf_counter() - started
            result = await whisper.transcribe(AsrRequest(to_16k(audio.pcm, audio.rate), "fr"))
            heard = to_digits(result.text, "fr")
            rows.append(
                {
                    "text": text,
                    "heard": heard,
                    "wer": word_error_rate(to_digits(text, "fr"), heard),
                    "synthesis_s": seconds,
                    "audio_s": audio.seconds,
                    "rtf": seconds / audio.seconds if audio.seconds else None,
                }
            )
    finally:
        await engine.close()
    references = sum(len(to_digits(r["text"], "fr").split()) for r in rows)
    edits = sum(r["wer"] * len(to_digits(r["text"], "fr").split()) for r in rows)
    return {
        "wer": edits / references,
        "first_audio_p50_s": statistics.median(r["synthesis_s"] for r in rows),
        "rtf_p50": statistics.median(r["rtf"] for r in rows if r["rtf"] is not None),
        "sentences": rows,
    }


async def run(voices: list[str]) -> dict[str, Any]:
    settings = load_settings(
        environ={}, overrides={"models.environment": "test", "server.engine_workers": False}
    )
    registry = ModelRegistry.from_settings(settings)
    decision = choose_gpu(None, settings.gpu)
    whisper_model = registry.resolve("whisper-base")
    whisper = WhisperEngine(whisper_model.entry_path, model_name="whisper-base", languages=("fr", "en"))
    await whisper.load()
    from wyoming_superwhisper.config import EngineLevel

    plan = plan_chain("bench", [EngineLevel(model=v) for v in voices], registry, decision)
    results: dict[str, Any] = {"skipped": {s.level.model: s.reason for s in plan.skipped}}
    for planned in plan.levels:
        engine = build_engine(planned, settings.tts)
        logging.getLogger("bench").warning("voice %s", engine.name)
        results[engine.name] = await one_voice(engine, whisper)
    await whisper.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voices", default=",".join(DEFAULT_VOICES))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    voices = [v.strip() for v in args.voices.split(",") if v.strip()]
    by_voice = asyncio.run(run(voices))
    results = {
        "date": dt.date.today().isoformat(),
        "host": os.uname().nodename,
        "asr": "whisper-base int8, beam 5, temperature 0",
        "sentences": len(SENTENCES),
        "voices": by_voice,
    }
    measured = {k: v for k, v in by_voice.items() if k != "skipped"}
    if "kokoro-ff_siwis" in measured and "espeak-fr" in measured and measured["espeak-fr"]["wer"]:
        results["kokoro_over_espeak_wer"] = measured["kokoro-ff_siwis"]["wer"] / measured["espeak-fr"]["wer"]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"intelligibility-{results['date']}.json"
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    for name, voice in measured.items():
        print(
            f"{name}: WER {voice['wer']:.3f}, first audio p50 {voice['first_audio_p50_s']:.3f} s, "
            f"RTF p50 {voice['rtf_p50']:.3f}"
        )
    if "kokoro_over_espeak_wer" in results:
        print(f"Kokoro / espeak-ng WER: {results['kokoro_over_espeak_wer']:.3f} (target ≤ 0.25)")
    print(f"skipped: {by_voice['skipped']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
