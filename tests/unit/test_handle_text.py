"""Handle service, pure parts: prompt, cleaning for speech, quality checks, memory."""

from __future__ import annotations

import datetime as dt

import pytest

from wyoming_superwhisper.handle.conversation import (
    ConversationMemory,
    build_messages,
    conversation_key,
)
from wyoming_superwhisper.handle.prompts import (
    apology,
    clean_for_speech,
    clock_answer,
    detect_language,
    ends_a_finished_sentence,
    guess_language,
    last_sentence_end,
    loop_start,
    starts_with_a_word,
    system_prompt,
    wrong_language,
)

NOW = dt.datetime(2026, 11, 24, 9, 5)


def test_system_prompt_is_french_with_name_date_and_language() -> None:
    prompt = system_prompt("Jarvis", "fr-FR", NOW)
    assert "Tu es Jarvis" in prompt
    assert "Nous sommes le mardi 24 novembre 2026. " in prompt
    assert "9 h" not in prompt  # the time of day: the clock answers it, and SmolLM2 parroted it
    assert "Réponds en français" in prompt
    assert "markdown" in prompt and "emoji" in prompt
    assert "Réponds en allemand" in system_prompt("Jarvis", "de", NOW)  # French words, the language named
    assert "Réponds en français" in system_prompt("Jarvis", "", NOW)


def test_system_prompt_is_english_for_an_english_request() -> None:
    """Small models follow the language of the instructions, not what the instructions say."""
    prompt = system_prompt("Jarvis", "en-US", NOW)
    assert "You are Jarvis" in prompt
    assert "Today is Tuesday 24 November 2026. " in prompt
    assert "9:05" not in prompt
    assert "Answer in English" in prompt and "markdown" in prompt
    assert "Réponds" not in prompt


@pytest.mark.parametrize("language", ["fr", "en", "de"])
def test_the_prompt_stays_the_same_all_day(language: str) -> None:
    """llama.cpp reuses the evaluated start of the previous prompt: the prompt may change once
    a day (the date), not every minute (the time of day is answered from the clock)."""
    morning = system_prompt("Jarvis", language, NOW)
    assert system_prompt("Jarvis", language, NOW.replace(hour=23, minute=59)) == morning
    assert system_prompt("Jarvis", language, NOW + dt.timedelta(days=1)) != morning


@pytest.mark.parametrize(
    ("intent", "now", "language", "said"),
    [
        ("HassGetCurrentTime", dt.datetime(2026, 12, 7, 23, 41), "fr", "Il est 23 h 41."),
        ("HassGetCurrentTime", dt.datetime(2026, 12, 7, 9, 5), "fr-FR", "Il est 9 h 05."),
        ("HassGetCurrentTime", dt.datetime(2026, 12, 7, 0, 0), "fr", "Il est minuit."),
        ("HassGetCurrentTime", dt.datetime(2026, 12, 7, 12, 0), None, "Il est midi."),
        ("HassGetCurrentTime", dt.datetime(2026, 12, 7, 15, 0), "fr", "Il est 15 h."),
        ("HassGetCurrentTime", dt.datetime(2026, 12, 7, 23, 41), "en", "It is 11:41 PM."),
        ("HassGetCurrentTime", dt.datetime(2026, 12, 7, 0, 5), "en-US", "It is 12:05 AM."),
        ("HassGetCurrentDate", NOW, "fr", "Nous sommes le mardi 24 novembre 2026."),
        ("HassGetCurrentDate", NOW, "en", "Today is Tuesday 24 November 2026."),
    ],
)
def test_the_clock_answers_in_the_users_language(
    intent: str, now: dt.datetime, language: str | None, said: str
) -> None:
    assert clock_answer(intent, now, language) == said


def test_system_prompt_override_fills_placeholders() -> None:
    prompt = system_prompt("Alfred", "fr", NOW, "Je suis {name}, le {date}, en {language}.")
    assert prompt == "Je suis Alfred, le mardi 24 novembre 2026, 9 h 05, en français."


@pytest.mark.parametrize(
    ("language", "start"),
    [
        ("fr", "Désolé"),
        ("fr-CA", "Désolé"),
        ("en", "Sorry"),
        ("en_US", "Sorry"),
        ("de", "Désolé"),
        (None, "Désolé"),
    ],
)
def test_apology_speaks_the_users_language(language: str | None, start: str) -> None:
    assert apology(language).startswith(start)


@pytest.mark.parametrize(
    ("raw", "spoken"),
    [
        ("**Bonjour** !", "Bonjour !"),
        ("## Titre\nLa réponse.", "Titre La réponse."),
        ("- un\n- deux\n1. trois", "un deux trois"),
        ("Il fait beau ☀️ aujourd'hui 😀.", "Il fait beau aujourd'hui ."),
        ("Voir [la doc](http://x.y/z) ici.", "Voir la doc ici."),
        ("  `code`   et\n\n  _fin_ ", "code et fin "),
    ],
)
def test_clean_for_speech(raw: str, spoken: str) -> None:
    assert clean_for_speech(raw) == spoken


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("Il fait très beau aujourd'hui à Paris.", "fr"),
        ("La capitale de la France est Paris.", "fr"),
        ("The weather is nice today in London.", "en"),
        ("It is what it is.", "en"),
        ("Paris.", None),
        ("", None),
    ],
)
def test_guess_language(text: str, language: str | None) -> None:
    assert guess_language(text) == language


def test_wrong_language_only_judges_clear_cases() -> None:
    assert wrong_language("The weather is nice today.", "fr") == "answer in en, expected fr"
    assert wrong_language("Il fait beau aujourd'hui.", "fr") is None
    assert wrong_language("Paris.", "fr") is None
    assert wrong_language("The weather is nice today.", "de") is None  # no opinion on German


def test_detect_language_of_a_request() -> None:
    assert detect_language("What is the weather like?", "fr") == "en"
    assert detect_language("Quel temps fait-il ?", "en") == "fr"
    assert detect_language("Paris", "fr") == "fr"


@pytest.mark.parametrize(
    ("text", "loops_from"),
    [
        ("Le Canada, le Canada, le Canada", "le Canada, le Canada"),
        ("non non non non", "non non non"),
        ("oui oui oui", None),  # three times one word: allowed
        ("Il fait beau et il fait chaud.", None),
        ("a b c d a b c d a b c d", "a b c d a b c d"),
        # SmolLM2 through `superwhisper serve`: a ten-word cycle (seen live, not caught at n ≤ 8)
        (
            "L'on est la famille. N'avons pas deux partes, que n'avons pas deux partes. "
            "N'avons pas deux partes, que n'avons pas deux partes. "
            "N'avons pas deux partes, que n'avons pas deux partes.",
            "N'avons pas deux partes, que n'avons pas deux partes. "
            "N'avons pas deux partes, que n'avons pas deux partes.",
        ),
    ],
)
def test_loop_start(text: str, loops_from: str | None) -> None:
    found = loop_start(text)
    if loops_from is None:
        assert found is None
    else:
        assert found is not None and text[found:] == loops_from


def test_last_sentence_end() -> None:
    assert last_sentence_end("Oui. Il fait beau ! Et") == len("Oui. Il fait beau !")
    assert last_sentence_end("Pas de fin") == -1
    assert last_sentence_end("Oui. Non", start=5) == -1
    assert last_sentence_end("3.5 degrés") == -1  # a decimal point ends nothing


# --- memory -------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_memory_keeps_last_turns_per_conversation() -> None:
    memory = ConversationMemory(2, 900, 120, clock=FakeClock())
    for i in range(3):
        memory.remember("a", f"question {i}", f"réponse {i}")
    memory.remember("b", "autre", "chose")
    assert [t.user for t in memory.history("a")] == ["question 1", "question 2"]
    assert [t.user for t in memory.history("b")] == ["autre"]
    assert memory.history("c") == []


def test_memory_expires_idle_conversations_implicit_sooner() -> None:
    clock = FakeClock()
    memory = ConversationMemory(6, 900, 120, clock=clock)
    memory.remember("explicit", "q", "r")
    memory.remember("peer:10.0.0.2", "q", "r", implicit=True)
    clock.now += 121
    assert memory.history("peer:10.0.0.2") == []
    assert len(memory.history("explicit")) == 1
    clock.now += 900
    assert memory.history("explicit") == []
    assert len(memory) == 0


def test_memory_off_when_no_turns_or_no_implicit_ttl() -> None:
    memory = ConversationMemory(0, 900, 120)
    memory.remember("a", "q", "r")
    assert memory.history("a") == []
    memory = ConversationMemory(6, 900, 0)
    memory.remember("peer:x", "q", "r", implicit=True)
    assert memory.history("peer:x") == []


def test_memory_is_bounded() -> None:
    memory = ConversationMemory(6, 900, 120, clock=FakeClock(), max_conversations=3)
    for i in range(5):
        memory.remember(str(i), "q", "r")
    assert len(memory) == 3
    assert memory.history("0") == [] and memory.history("4") != []


@pytest.mark.parametrize(
    ("context", "peer", "key", "implicit"),
    [
        ({"conversation_id": "01HS6SP2XD"}, "10.0.0.2:5555", "01HS6SP2XD", False),
        ({"conversation_id": 42}, "10.0.0.2:5555", "42", False),
        ({"conversation_id": ""}, "10.0.0.2:5555", "peer:10.0.0.2", True),
        (None, "10.0.0.2:5555", "peer:10.0.0.2", True),
        ({}, "::1:40000", "peer:::1", True),
        ({"conversation_id": True}, "10.0.0.3:1", "peer:10.0.0.3", True),
    ],
)
def test_conversation_key(context: dict[str, object] | None, peer: str, key: str, implicit: bool) -> None:
    assert conversation_key(context, peer) == (key, implicit)


def test_build_messages_puts_history_between_system_and_request() -> None:
    memory = ConversationMemory(6, 900, 120)
    memory.remember("a", "Quel temps fait-il aujourd'hui ?", "Il fait beau.")
    messages = build_messages("sys", memory.history("a"), "Et demain ?")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[1]["content"] == "Quel temps fait-il aujourd'hui ?"
    assert messages[-1]["content"] == "Et demain ?"


@pytest.mark.parametrize(
    ("text", "finished"),
    [
        ("Il fait beau.", True),
        ("Il fait beau. ", True),
        ("Vraiment ?!", True),  # French spacing before ? and !
        ("Il dit « oui. » ", True),
        ("Il fait 3.", False),  # "3.5" may follow
        ("Voici :\n1.", False),  # a list marker the cleaner may strip
        ("Bonjour", False),
        ("Il fait beau, ", False),
    ],
)
def test_a_finished_sentence_is_safe_to_stream(text: str, finished: bool) -> None:
    assert ends_a_finished_sentence(text) is finished


@pytest.mark.parametrize(
    ("text", "word"), [("Il", True), ("Élodie", True), ("1", False), ("- Il", False), ("#", False)]
)
def test_only_a_letter_may_start_an_early_release(text: str, word: bool) -> None:
    assert starts_with_a_word(text) is word
