"""The end-of-turn judge's parts: features, text cues, the combination rule, config."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import make_settings
from wyoming_superwhisper.asr.turn import (
    COMMAND_THRESHOLD,
    MIN_AVG_LOGPROB,
    WINDOW_SAMPLES,
    TextCue,
    TurnJudge,
    command_vocabulary,
    glued_dangling_word,
    inside_a_name,
    last_window,
    log_mel_features,
    trailing_cue,
)
from wyoming_superwhisper.config import ConfigError
from wyoming_superwhisper.runtime.fallback import EngineCrashed


def _pipecat_features() -> Any:
    """Pipecat's own numpy feature extractor, loaded from the installed wheel's file (no import of
    the ``pipecat`` package, which needs its dependencies)."""
    try:
        dist = importlib.metadata.distribution("pipecat-ai")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pipecat-ai (the Smart Turn model package) is not installed")
    path = Path(str(dist.locate_file("pipecat/audio/turn/smart_turn/_whisper_features.py")))
    spec = importlib.util.spec_from_file_location("pipecat_whisper_features", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.compute_whisper_log_mel_features


def test_features_equal_pipecats_reference() -> None:
    reference = _pipecat_features()
    rng = np.random.default_rng(11)
    t = np.arange(int(2.5 * 16000)) / 16000
    voice = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))
    audio = (voice + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
    window = last_window(audio)
    ours = log_mel_features(window)
    assert ours.shape == (80, 800) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference(window), atol=1e-5)


def test_last_window_pads_in_front_and_keeps_the_end() -> None:
    short = np.ones(16000, np.float32)
    window = last_window(short)
    assert len(window) == WINDOW_SAMPLES
    assert not window[: WINDOW_SAMPLES - 16000].any() and window[-16000:].all()
    long = np.arange(WINDOW_SAMPLES + 500, dtype=np.float32)
    assert last_window(long)[0] == 500.0 and last_window(long)[-1] == long[-1]


@pytest.mark.parametrize(
    ("text", "language", "cue"),
    [
        ("Mets un minuteur de", "fr", TextCue.INCOMPLETE),
        ("Allume la lumière du", "fr", TextCue.INCOMPLETE),
        ("Quelle est la capitale de...", "fr", TextCue.INCOMPLETE),
        ("Allume la lampe et", "fr", TextCue.INCOMPLETE),
        ("Ferme la porte,", "fr", TextCue.INCOMPLETE),
        ("ferme la p***", "fr", TextCue.INCOMPLETE),  # whisper-base at a pause inside "porte du… garage"
        ("", "fr", TextCue.INCOMPLETE),
        ("Allume la lumière du salon.", "fr", TextCue.NEUTRAL),
        ("Oui.", "fr", TextCue.NEUTRAL),
        ("Éteins-la.", "fr", TextCue.NEUTRAL),  # an imperative's pronoun, not an article
        ("Fais-le", "fr", TextCue.NEUTRAL),
        ("Tu vas où ?", "fr", TextCue.NEUTRAL),
        ("Il est où", "fr", TextCue.NEUTRAL),
        ("Turn on the", "en", TextCue.INCOMPLETE),
        ("Set a timer for five minutes and", "en", TextCue.INCOMPLETE),
        ("Set a timer for", "en", TextCue.INCOMPLETE),
        ("Turn off the lights in", "en", TextCue.INCOMPLETE),
        ("Turn the light on", "en", TextCue.NEUTRAL),
        ("Thank you", "en", TextCue.NEUTRAL),
        ("Yes.", "en", TextCue.NEUTRAL),
    ],
)
def test_trailing_words(text: str, language: str, cue: TextCue) -> None:
    assert trailing_cue(text, language) is cue


def test_a_transcript_that_stops_inside_a_name_is_not_over() -> None:
    names = ["Lumière du salon", "salon", "cuisine", "porte du garage"]
    assert inside_a_name("Allume la lumière", names)
    assert inside_a_name("Ferme la porte", names)
    assert not inside_a_name("Allume la lumière du salon", names)  # the whole name
    assert not inside_a_name("Allume la cuisine", names)
    assert not inside_a_name("Allume la lumière", [*names, "lumière"])  # a name of its own: can end
    assert not inside_a_name("Allume la lumière", [])  # no names known: no opinion
    # whisper-base at a pause, 2026-12-04: "la lumière…" heard as "l'alumière"
    assert inside_a_name("allume l'alumière", names)
    assert not inside_a_name("allume l'alumière du salon", names)
    assert not inside_a_name("Allume la lune", names)  # "lune" is no "lumière"


def test_a_dangling_word_glued_on_by_whisper_is_seen() -> None:
    """whisper-base at a pause, 2026-12-04: "Mets un minuteur de…" heard "mais un minuteurde"."""
    assert {"minuteur", "lumière", "volets"} <= command_vocabulary("fr")  # from home-assistant-intents
    names = ["Lumière du salon", "salon", "cuisine"]
    assert glued_dangling_word("mais un minuteurde", "fr")
    assert glued_dangling_word("ouvre les voletsdes", "fr")
    assert glued_dangling_word("allume la cuisinepour", "fr", names)  # a name's word, glued
    assert not glued_dangling_word("allume la cuisinepour", "fr")  # "cuisine" is no template word
    assert not glued_dangling_word("mets un minuteur de 5 minutes", "fr")
    assert not glued_dangling_word("la température actuelle", "fr")  # "-le" inflects, never glued
    assert not glued_dangling_word("les secondes", "fr")  # "secon" is no word
    assert not glued_dangling_word("mais un minuteurde", "en")  # French only
    assert not glued_dangling_word("", "fr")
    judge = TurnJudge(_Sure())
    assert judge.quick_cue("mais un minuteurde", "fr") is TextCue.INCOMPLETE
    assert judge.quick_cue("mets un minuteur", "fr") is TextCue.NEUTRAL


class _Sure:
    async def load(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def probability(self, audio: Any) -> float:
        return 0.99


class _Templates:
    """Home Assistant's templates stand-in for the rule tests: matches one sentence."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.calls = 0

    def recognize(self, text: str, language: str) -> object | None:
        self.calls += 1
        return object() if text.lower() == self.command else None

    def supports(self, language: str) -> bool:
        return True


class _Crashing:
    """A model whose worker dies on every call (what a segfault looks like from here)."""

    async def load(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def probability(self, audio: np.ndarray) -> float:
        raise EngineCrashed("smart-turn-v3.2", "SIGSEGV")


def test_the_combination_rule() -> None:
    judge = TurnJudge(_Crashing(), threshold=0.5)
    assert judge.decide(0.99, TextCue.INCOMPLETE) == (False, "text")  # the words win over the audio
    assert judge.decide(0.6, TextCue.NEUTRAL) == (True, "audio")
    assert judge.decide(0.4, TextCue.NEUTRAL) == (False, "audio")
    assert judge.decide(COMMAND_THRESHOLD, TextCue.COMMAND) == (True, "template")
    assert judge.decide(COMMAND_THRESHOLD - 0.01, TextCue.COMMAND) == (False, "audio")
    assert judge.decide(None, TextCue.COMMAND) == (False, "error")
    assert judge.decide(0.99, TextCue.UNSURE) == (False, "unsure")


async def test_templates_mark_a_whole_command() -> None:
    judge = TurnJudge(_Crashing(), templates=_Templates("allume la cuisine"))
    assert judge.text_cue("Allume la cuisine.", "fr") is TextCue.COMMAND
    assert judge.text_cue("Allume la", "fr") is TextCue.INCOMPLETE  # trailing words come first
    assert judge.text_cue("Bonjour.", "fr") is TextCue.NEUTRAL


class _Says:
    """A model that answers one probability: the judge's combination is what is under test."""

    def __init__(self, probability: float) -> None:
        self.value = probability

    async def load(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def probability(self, audio: np.ndarray) -> float:
        return self.value


@pytest.mark.parametrize(
    ("probability", "complete", "reason", "template_calls"),
    [(0.9, True, "audio", 0), (0.3, True, "template", 1), (0.1, False, "audio", 0)],
)
async def test_templates_are_read_only_when_they_can_change_the_verdict(
    probability: float, complete: bool, reason: str, template_calls: int
) -> None:
    """hassil takes ~140 ms on a sentence it cannot match: not on the path of every verdict."""
    templates = _Templates("allume la cuisine")
    judge = TurnJudge(_Says(probability), threshold=0.5, templates=templates)
    verdict = await judge.judge("Allume la cuisine.", "fr", audio=np.zeros(16000, np.float32))
    assert (verdict.complete, verdict.reason, templates.calls) == (complete, reason, template_calls)


@pytest.mark.parametrize(
    ("text", "complete", "cue"),
    [
        ("allume la cuisine,", True, TextCue.COMMAND),  # whisper's comma after a whole command
        ("allume la,", False, TextCue.INCOMPLETE),  # the words before the comma dangle
        ("je voudrais savoir,", False, TextCue.INCOMPLETE),  # no command: the comma holds the turn
        ("allume la cuisine...", False, TextCue.INCOMPLETE),  # an ellipsis is not a comma
    ],
)
async def test_a_comma_after_a_whole_command_lets_the_audio_decide(
    text: str, complete: bool, cue: TextCue
) -> None:
    judge = TurnJudge(_Says(0.3), threshold=0.5, templates=_Templates("allume la cuisine"))
    verdict = await judge.judge(text, "fr", audio=np.zeros(16000, np.float32))
    assert (verdict.complete, verdict.cue) == (complete, cue), verdict


async def test_words_whisper_doubts_never_end_a_turn() -> None:
    judge = TurnJudge(_Crashing(), templates=_Templates("allume la cuisine"))
    verdict = await judge.judge(
        "Allume la cuisine.", "fr", audio=np.zeros(16000, np.float32), avg_logprob=MIN_AVG_LOGPROB - 0.1
    )
    assert not verdict.complete and verdict.cue is TextCue.UNSURE and verdict.reason == "unsure"


async def test_a_crashed_model_means_wait_not_cut() -> None:
    judge = TurnJudge(_Crashing())
    verdict = await judge.judge("Allume la cuisine.", "fr", audio=np.zeros(16000, np.float32))
    assert not verdict.complete and verdict.reason == "error" and verdict.probability is None


def test_endpointing_mode_is_checked() -> None:
    assert make_settings().asr.endpointing == "semantic"
    assert make_settings(**{"asr.endpointing": "fixed"}).asr.endpointing == "fixed"
    with pytest.raises(ConfigError, match=r"asr\.endpointing"):
        make_settings(**{"asr.endpointing": "smart"})
