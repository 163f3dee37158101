"""Words for a voice: the system prompt, the apology, and the checks an answer must pass.

Everything here is a pure function of text (and of the clock for the prompt's
date), so the quality gate and the prompt are tested as tables without a model.
An answer is *spoken*: no markdown, no emoji, no lists, one or two sentences,
in the user's language.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from collections.abc import Sequence

_DAYS_FR = ("lundi", "mardi", "mercredi", "jeudi", "vendredi", "samedi", "dimanche")
_MONTHS_FR = (
    "janvier", "février", "mars", "avril", "mai", "juin",
    "juillet", "août", "septembre", "octobre", "novembre", "décembre",
)  # fmt: skip

_DAYS_EN = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS_EN = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip

LANGUAGE_NAMES_FR = {"fr": "français", "en": "anglais", "de": "allemand", "es": "espagnol", "it": "italien"}

APOLOGIES = {
    "fr": "Désolé, je n'arrive pas à répondre pour le moment. Réessayez dans un instant.",
    "en": "Sorry, I can't answer right now. Please try again in a moment.",
}


def base_language(language: str | None) -> str:
    """``fr-FR`` / ``fr_CA`` → ``fr``; empty stays empty."""
    return (language or "").replace("_", "-").split("-")[0].lower()


def apology(language: str | None) -> str:
    """The short spoken apology for ``not-handled``: French unless the user speaks English."""
    return APOLOGIES.get(base_language(language), APOLOGIES["fr"])


def french_datetime(now: dt.datetime) -> str:
    """``mardi 24 novembre 2026, 9 h 27``: how a French speaker would say it."""
    return (
        f"{_DAYS_FR[now.weekday()]} {now.day} {_MONTHS_FR[now.month - 1]} {now.year}, "
        f"{now.hour} h {now.minute:02d}"
    )


def french_date(now: dt.datetime) -> str:
    """``mardi 24 novembre 2026``."""
    return f"{_DAYS_FR[now.weekday()]} {now.day} {_MONTHS_FR[now.month - 1]} {now.year}"


def english_date(now: dt.datetime) -> str:
    """``Tuesday 24 November 2026``."""
    return f"{_DAYS_EN[now.weekday()]} {now.day} {_MONTHS_EN[now.month - 1]} {now.year}"


def clock_answer(intent: str, now: dt.datetime, language: str | None) -> str:
    """The spoken answer to "what time / what day is it" (``HassGetCurrentTime`` / ``…Date``):
    French unless the user speaks English; a 24-hour clock in French, 12-hour in English."""
    english = base_language(language) == "en"
    if intent == "HassGetCurrentDate":
        return f"Today is {english_date(now)}." if english else f"Nous sommes le {french_date(now)}."
    if english:
        hour = now.hour % 12 or 12
        return f"It is {hour}:{now.minute:02d} {'PM' if now.hour >= 12 else 'AM'}."
    if now.minute == 0:
        return f"Il est {({0: 'minuit', 12: 'midi'}).get(now.hour, f'{now.hour} h')}."
    return f"Il est {now.hour} h {now.minute:02d}."


def system_prompt(assistant_name: str, language: str, now: dt.datetime, override: str = "") -> str:
    """The voice assistant's instructions: in English for an English request, else in French.

    Small models answer in the language of the *instructions* whatever they are
    told (SmolLM2-135M answered English questions in French under a French
    prompt), so an English request gets English instructions; any other
    language gets the French ones, which name the language to answer in.
    ``override`` (``handle.system_prompt``) replaces the built-in text; it may use
    ``{name}``, ``{date}`` and ``{language}`` (the date and language in French).

    The prompt carries the date, not the time of day. llama.cpp reuses the evaluated start
    of the previous prompt: with the time in it the prompt changed every minute and nearly
    every question paid all of it again (SmolLM2-135M, 2-core CPU, a question in a new
    minute: first token 0.33 s; without the time, 0.02 s, the prompt changes once a day).
    And SmolLM2 recited the time where nobody asked ("Il y a 23 heures de cinq minutes":
    3 of 13 French answers with it, 6 with the date and time last, 2 with the date alone,
    both to "what day is it"; in English the date last was recited twice unasked, second
    never). "Quelle heure est-il ?" is answered from the clock (:func:`clock_answer`).
    """
    lang = base_language(language) or "fr"
    language_name = LANGUAGE_NAMES_FR.get(lang, lang)
    if override:
        return override.format(name=assistant_name, date=french_datetime(now), language=language_name)
    if lang == "en":
        return (
            f"You are {assistant_name}, a smart home voice assistant. "
            f"Today is {english_date(now)}. "
            "Answer in English, in one or two short sentences meant to be spoken aloud. "
            "Use no markdown, no emoji, no lists, no headings. "
            "If you do not know, just say so."
        )
    return (
        f"Tu es {assistant_name}, un assistant vocal de maison connectée. "
        f"Nous sommes le {french_date(now)}. "
        f"Réponds en {language_name}, en une ou deux phrases courtes, faites pour être dites "
        "à voix haute. N'utilise ni markdown, ni emoji, ni liste, ni titre. "
        "Si tu ne sais pas, dis-le simplement."
    )


# --- cleaning for speech -------------------------------------------------------

_EMOJI = re.compile(
    "[\U0001f000-\U0001faff\U00002600-\U000027bf\U0001f1e6-\U0001f1ff\ufe0f\u200d\u2b50\u2b55]"
)
_LINE_MARKERS = re.compile(r"(?m)^[ \t]*(?:#{1,6}[ \t]+|[-*+•][ \t]+|\d{1,2}[.)][ \t]+|>[ \t]*)")
_LINK = re.compile(r"\[([^\]\n]*)\]\([^)\n]*\)")
_MARKUP_CHARS = re.compile(r"[*_`~|]")
_SPACES = re.compile(r"\s+")


def clean_for_speech(text: str) -> str:
    """Markdown, emoji and list markers out, whitespace collapsed to single spaces.

    Applied to the whole raw answer so far (not per token) so a marker split
    across two tokens is still recognised; leading whitespace is dropped,
    trailing whitespace kept (the next token may follow it).
    """
    text = _LINK.sub(r"\1", text)
    text = _LINE_MARKERS.sub("", text)
    text = _MARKUP_CHARS.sub("", text)
    text = _EMOJI.sub("", text)
    text = _SPACES.sub(" ", text)
    return text.lstrip()


_SENTENCE_END = re.compile(r"[.!?…](?=[\s\"»)]|$)")


def last_sentence_end(text: str, start: int = 0) -> int:
    """Index just after the last sentence-ending punctuation at or after ``start``; -1 if none."""
    found = -1
    for match in _SENTENCE_END.finditer(text, start):
        found = match.end()
    return found


def ends_sentence(text: str) -> bool:
    return bool(text.rstrip()) and text.rstrip()[-1] in '.!?…»")'


_FINISHED_SENTENCE = re.compile(r"[^\W\d_][ \u00a0\u202f]?[.!?…]+(?:[ \u00a0\u202f]?[»\")])*\s*$")
_LETTER_FIRST = re.compile(r"[^\W\d_]")


def ends_a_finished_sentence(text: str) -> bool:
    """A word then a sentence end: safe to stream. Not "3." (a decimal may follow) nor "1."
    (a list marker :func:`clean_for_speech` may still strip); French "Tiens !" counts."""
    return bool(_FINISHED_SENTENCE.search(text))


def starts_with_a_word(text: str) -> bool:
    """A letter first: no list marker or heading that :func:`clean_for_speech` could take back."""
    return bool(_LETTER_FIRST.match(text))


# --- quality checks -------------------------------------------------------------

_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)?", re.UNICODE)


def _word_set(text: str) -> frozenset[str]:
    return frozenset(text.split())


_STOPWORDS = {
    "fr": _word_set(
        "le la les un une des du de et est sont je tu il elle nous vous ils elles ce cette ces "
        "pour pas que qui dans sur avec mais ou où au aux son sa ses mon ma mes ton ta tes "
        "votre vos leur leurs fait il y a aujourd'hui très bien oui non c'est n'est j'ai "
        "suis es êtes sommes à ne plus aussi comme quel quelle temps demain"
    ),
    "en": _word_set(
        "the a an and is are i you he she it we they this that these those for not what who "
        "in on with but or at his her my your their do does did today very well yes no it's "
        "i'm am was were be been to of have has will would can could there here how when "
        "weather tomorrow"
    ),
}


def words(text: str) -> list[tuple[str, int, int]]:
    """(lowercased word, start, end) for each word of the text."""
    return [(m.group(0).lower().replace("’", "'"), m.start(), m.end()) for m in _WORD.finditer(text)]


def guess_language(text: str, *, min_hits: int = 2) -> str | None:
    """``fr`` or ``en`` from stopword counts, or None when the text does not say clearly.

    Crude on purpose: it only has to catch a model answering a French question
    in English (or the reverse), the common failure of small models. Accented
    letters count for French.
    """
    counts = {lang: 0 for lang in _STOPWORDS}
    for word, _, _ in words(text):
        for lang, stop in _STOPWORDS.items():
            if word in stop:
                counts[lang] += 1
    accents = sum(1 for ch in text if ch in "éèêàùçôîûœ")
    counts["fr"] += min(accents, 3)
    ranked = sorted(counts.items(), key=lambda item: item[1], reverse=True)
    (best, best_count), (_, second_count) = ranked[0], ranked[1]
    if best_count >= min_hits and best_count >= 2 * second_count + 1:
        return best
    return None


def wrong_language(text: str, wanted: str | None) -> str | None:
    """Why the text is not in ``wanted`` (fr/en only), or None when it is or cannot tell."""
    want = base_language(wanted)
    if want not in _STOPWORDS:
        return None
    guessed = guess_language(text)
    if guessed is not None and guessed != want:
        return f"answer in {guessed}, expected {want}"
    return None


def loop_start(text: str, *, max_n: int = 16, repeats: int = 3) -> int | None:
    """Where a degenerate repetition begins (char index of its 2nd occurrence), or None.

    A loop is the same n-gram (2 ≤ n ≤ ``max_n`` words) ``repeats`` times in a
    row at the end of the text, or one word four times in a row; small models
    fall into "le Canada, le Canada, le Canada..." and never stop.
    """
    tokens = words(text)
    for n in range(1, max_n + 1):
        needed = repeats + 1 if n == 1 else repeats
        if len(tokens) < n * needed:
            continue
        tail = [w for w, _, _ in tokens[-n * needed :]]
        gram = tail[:n]
        if all(tail[i * n : (i + 1) * n] == gram for i in range(needed)):
            second = tokens[len(tokens) - n * needed + n]
            return second[1]
    return None


def detect_language(text: str, default: str) -> str:
    """The language of a request that names none: a clear guess, else ``default``."""
    return guess_language(text, min_hits=1) or base_language(default) or "fr"


def strip_control(text: str) -> str:
    """Control characters out of a client's text (newlines become spaces)."""
    return "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in text).strip()


def describe_messages(messages: Sequence[dict[str, object]]) -> str:
    """One line per message, for debug logs."""
    return " | ".join(f"{m.get('role')}: {str(m.get('content'))[:60]}" for m in messages)
