"""Home commands answered without a model: Home Assistant's own sentences, matched first.

Home Assistant's "prefer handling commands locally" runs its sentence
templates (``home-assistant-intents``, matched by ``hassil``) before the LLM.
A small local model gets one command in ten right (``bench/home_control_bench.py``);
the templates get every command they cover right, in milliseconds. So when a
request offers Home Assistant's tools, the last user sentence is matched
against the templates of its language, with the exposed names and areas as
slot lists. A match becomes the call Home Assistant would have made; a
pronoun ("Éteins-la", "turn it off") reuses the target of the conversation's
last call; once Home Assistant has run the call, the confirmation (or the
state asked about) is worded from the tool's result. Anything else goes to the
model, as before.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import re
import threading
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .home import ExposedEntity, Home, exposed_entities
from .toolcalls import validate_call

_LOGGER = logging.getLogger(__name__)

CLOCK_INTENTS = frozenset({"HassGetCurrentTime", "HassGetCurrentDate"})
"""Questions the handle answers from its own clock, home or no home: no model reads a clock."""
QUERY_INTENTS = frozenset({"HassGetState", "HassClimateGetTemperature", "HassGetWeather"})
"""Questions: answered from Home Assistant's live context when their own tool is not offered."""
LIVE_CONTEXT_TOOL = "GetLiveContext"


@dataclass(frozen=True)
class IntentMatch:
    """One recognized sentence: Home Assistant's intent name and its slot values."""

    intent: str
    slots: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FastAnswer:
    """What the fast path answers instead of a model: one tool call, or a sentence."""

    text: str = ""
    tool_call: Mapping[str, Any] | None = None
    """``{"name": ..., "arguments": {...}}``, as a model's call would be."""
    reason: str = ""
    """Why this answer (``intent``, ``follow_up``, ``confirmation``, ``state``): logs and metrics."""


class IntentRecognizer:
    """hassil over ``home-assistant-intents``, one compiled template set per language."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    @functools.lru_cache(maxsize=16)  # noqa: B019 - one recognizer per service, lives as long
    def _templates(
        self, language: str, only: frozenset[str] | None = None
    ) -> tuple[Any, tuple[str, ...]] | None:
        """The compiled templates of ``language``; ``only``: just these intents' (the clock
        questions: matching against all templates costs ~140 ms when nothing matches, against
        those two well under a millisecond, and they are asked of every request)."""
        from hassil import Intents
        from home_assistant_intents import get_intents

        data = get_intents(language)
        if not data:
            return None
        if only is not None:
            data = {**data, "intents": {n: v for n, v in data.get("intents", {}).items() if n in only}}
            if not data["intents"]:
                return None
        return Intents.from_dict(data), tuple(data.get("skip_words") or ())

    def supports(self, language: str) -> bool:
        with self._lock:
            return self._templates(_base(language)) is not None

    def prepare(self, language: str) -> bool:
        """Compile ``language``'s templates, all and the clock's, now rather than at the first
        request (about 0.2 s on two cores); whether the language has templates."""
        with self._lock:
            self._templates(_base(language), CLOCK_INTENTS)
            return self._templates(_base(language)) is not None

    def clock_question(self, text: str, language: str) -> str | None:
        """``HassGetCurrentTime`` or ``HassGetCurrentDate`` when ``text`` asks the time or the date
        in one of Home Assistant's own sentences ("Quelle heure est-il ?"), else None."""
        from hassil import recognize_best

        text = text.strip().rstrip(".!?").strip()
        if not text or len(text) > 80:
            return None
        with self._lock:
            compiled = self._templates(_base(language), CLOCK_INTENTS)
        if compiled is None:
            return None
        intents, skip_words = compiled
        try:
            result = recognize_best(text, intents, skip_words=skip_words, language=_base(language))
        except Exception as error:  # hassil on an odd sentence: the model answers instead
            _LOGGER.debug("intents: cannot match %r: %s", text, error)
            return None
        return None if result is None else str(result.intent.name)

    def recognize(self, text: str, language: str, home: Home | None = None) -> IntentMatch | None:
        """The best template match of ``text``; names and areas from ``home`` (wildcards if none).

        Thread-safe; takes milliseconds (the first call per language compiles
        the templates, about 0.2 s). Runs in a thread from the event loop.
        """
        from hassil import recognize_best
        from hassil.intents import TextSlotList, WildcardSlotList

        text = text.strip()
        if not text or len(text) > 300:  # a paragraph is not a command
            return None
        with self._lock:
            compiled = self._templates(_base(language))
        if compiled is None:
            return None
        intents, skip_words = compiled
        slot_lists: dict[str, Any]
        if home is not None and home.entities:
            slot_lists = {
                "name": TextSlotList.from_tuples(
                    [(n, n, {"domain": e.domain}) for e in home.entities for n in e.names],
                    allow_template=False,
                ),
                "area": TextSlotList.from_strings(home.areas, allow_template=False),
                "floor": TextSlotList.from_strings([], allow_template=False),
            }
        else:  # no list of names: Home Assistant resolves whatever name was said
            slot_lists = {key: WildcardSlotList(key) for key in ("name", "area", "floor")}
        try:
            result = recognize_best(
                text,
                intents,
                slot_lists=slot_lists,
                skip_words=skip_words,
                language=_base(language),
                best_slot_name="name",
            )
        except Exception as error:  # hassil on an odd sentence: the model answers instead
            _LOGGER.debug("intents: cannot match %r: %s", text, error)
            return None
        if result is None:
            return None
        slots = {key: entity.value for key, entity in result.entities.items()}
        return IntentMatch(result.intent.name, slots)


def _base(language: str) -> str:
    return (language or "en").split("-")[0].split("_")[0].lower()


# --- calls from matches -------------------------------------------------------------------


def call_for(match: IntentMatch, home: Home) -> dict[str, Any] | None:
    """The tool call Home Assistant would run for ``match``, or None when no offered tool fits."""
    if home.tool(match.intent) is None:
        if match.intent in QUERY_INTENTS and home.tool(LIVE_CONTEXT_TOOL) is not None:
            return {"name": LIVE_CONTEXT_TOOL, "arguments": {}}
        return None
    tool = home.tool(match.intent)
    assert tool is not None
    arguments: dict[str, Any] = {}
    for key, value in match.slots.items():
        schema = tool.properties.get(key)
        if not isinstance(schema, Mapping):
            continue  # a slot the tool does not take (e.g. a yes/no question's expected state)
        coerced = _coerce(value, schema)
        if coerced is not None:
            arguments[key] = coerced
    required = tool.parameters.get("required") or ()
    if any(key not in arguments for key in required):
        return None
    problem = validate_call(tool.name, arguments, home)
    if problem:
        _LOGGER.debug("intents: %s does not fit the tool: %s", match, problem)
        return None
    return {"name": tool.name, "arguments": arguments}


def _coerce(value: Any, schema: Mapping[str, Any]) -> Any:
    kind = schema.get("type")
    if kind == "array":
        return value if isinstance(value, list) else [value]
    if kind == "integer":
        try:
            return round(float(value))
        except (TypeError, ValueError):
            return None
    if kind == "number":
        try:
            number = float(value)
        except (TypeError, ValueError):
            return None
        return int(number) if number.is_integer() else number
    if kind == "string":
        return str(value)
    return value


_END = (
    r"\s*(?:s'il te pla[iî]t|s'il vous pla[iî]t|aussi|maintenant|encore|please|too|now|again)?\s*[.!?]*\s*$"
)
"""After the pronoun, only politeness or punctuation: "Allume la lumière" is no pronoun."""
_PRONOUN_COMMANDS: dict[str, tuple[tuple[re.Pattern[str], str], ...]] = {
    "fr": (
        (
            re.compile(r"^\s*(?:r?allume|mets en marche|d[ée]marre)[- ](?:la|le|les|l')" + _END, re.I),
            "HassTurnOn",
        ),
        (re.compile(r"^\s*(?:[ée]teins|arr[êe]te|coupe)[- ](?:la|le|les|l')" + _END, re.I), "HassTurnOff"),
        (re.compile(r"^\s*ouvre[- ](?:la|le|les|l')" + _END, re.I), "HassTurnOn"),
        (re.compile(r"^\s*ferme[- ](?:la|le|les|l')" + _END, re.I), "HassTurnOff"),
    ),
    "en": (
        (re.compile(r"^\s*(?:turn|switch|put) (?:it|them)(?: back)? on" + _END, re.I), "HassTurnOn"),
        (re.compile(r"^\s*(?:turn|switch) on (?:it|them)" + _END, re.I), "HassTurnOn"),
        (re.compile(r"^\s*(?:turn|switch) (?:it|them)(?: back)? off" + _END, re.I), "HassTurnOff"),
        (re.compile(r"^\s*(?:turn|switch) off (?:it|them)" + _END, re.I), "HassTurnOff"),
        (re.compile(r"^\s*open (?:it|them)" + _END, re.I), "HassTurnOn"),
        (re.compile(r"^\s*close (?:it|them)" + _END, re.I), "HassTurnOff"),
    ),
}
"""Commands whose object is a pronoun: the target is the one of the conversation's last call."""
_TARGET_KEYS = ("name", "area", "floor", "domain", "device_class")


def follow_up_call(
    text: str, language: str, messages: Sequence[Mapping[str, Any]], home: Home
) -> dict[str, Any] | None:
    """ "Éteins-la" after "Allume la lumière de la cuisine": the same target, the new action."""
    intent = next(
        (name for pattern, name in _PRONOUN_COMMANDS.get(_base(language), ()) if pattern.search(text)), None
    )
    if intent is None or home.tool(intent) is None:
        return None
    previous = _last_call(messages)
    if previous is None:
        return None
    target = {k: v for k, v in (previous.get("arguments") or {}).items() if k in _TARGET_KEYS}
    if not target:
        return None
    problem = validate_call(intent, target, home)
    return None if problem else {"name": intent, "arguments": target}


def _last_call(
    messages: Sequence[Mapping[str, Any]], *, with_live_context: bool = False
) -> Mapping[str, Any] | None:
    """The newest call in ``messages`` (reading the live context has no target: skipped)."""
    skipped = () if with_live_context else (LIVE_CONTEXT_TOOL,)
    for message in reversed(messages):
        for call in reversed(message.get("tool_calls") or []):
            function = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(function, Mapping) and function.get("name") and function["name"] not in skipped:
                arguments = function.get("arguments")
                if isinstance(arguments, str):
                    try:
                        arguments = json.loads(arguments)
                    except ValueError:
                        continue
                if isinstance(arguments, Mapping):
                    return {"name": function["name"], "arguments": arguments}
    return None


# --- words after the call -----------------------------------------------------------------

_FEMININE = frozenset(
    [
        "lumière",
        "lampe",
        "prise",
        "cafetière",
        "télévision",
        "télé",
        "porte",
        "fenêtre",
        "climatisation",
        "clim",
        "chaudière",
        "alarme",
        "bouilloire",
        "machine",
        "plaque",
        "hotte",
        "pompe",
        "guirlande",
        "veilleuse",
        "ampoule",
        "enceinte",
        "radio",
        "serrure",
        "vanne",
        "sonnette",
        "caméra",
        "applique",
        "suspension",
        "ventilation",
        "piscine",
        "douche",
        "baignoire",
    ]
)
_MASCULINE = frozenset(
    [
        "chauffage",
        "volet",
        "ventilateur",
        "radiateur",
        "store",
        "portail",
        "garage",
        "éclairage",
        "spot",
        "plafonnier",
        "lampadaire",
        "thermostat",
        "climatiseur",
        "four",
        "frigo",
        "réfrigérateur",
        "congélateur",
        "lave-linge",
        "lave-vaisselle",
        "sèche-linge",
        "aspirateur",
        "robot",
        "humidificateur",
        "déshumidificateur",
        "purificateur",
        "projecteur",
        "capteur",
        "interrupteur",
        "téléviseur",
        "écran",
        "bureau",
        "salon",
        "arrosage",
        "chauffe-eau",
        "ballon",
        "rideau",
    ]
)

_DONE_FR = {
    "HassTurnOn": ("J'ai allumé {t}.", "J'ai ouvert {t}."),
    "HassTurnOff": ("J'ai éteint {t}.", "J'ai fermé {t}."),
    "HassLightSet": ("J'ai réglé {t}.", "J'ai réglé {t}."),
    "HassClimateSetTemperature": ("J'ai réglé {t} à {temperature} degrés.",) * 2,
    "HassSetPosition": ("J'ai réglé {t} à {position} %.",) * 2,
}
_DONE_EN = {
    "HassTurnOn": ("Turned on {t}.", "Opened {t}."),
    "HassTurnOff": ("Turned off {t}.", "Closed {t}."),
    "HassLightSet": ("Set {t}.", "Set {t}."),
    "HassClimateSetTemperature": ("Set {t} to {temperature} degrees.",) * 2,
    "HassSetPosition": ("Set {t} to {position} percent.",) * 2,
}


def with_article(name: str, language: str) -> str:
    """ "Lumière de la cuisine" → "la lumière de la cuisine" in a French sentence.

    Home Assistant's names have no article; a French sentence needs one. Known
    device nouns get theirs; any other name is left as written (a brand, a
    nickname), which reads correctly without one.
    """
    if _base(language) != "fr" or not name:
        return name
    first = name.split()[0].casefold()
    if first in ("le", "la", "les", "l'") or first.startswith("l'"):
        return name[0].lower() + name[1:]
    lowered = name[0].lower() + name[1:]
    if first in _FEMININE or first in _MASCULINE:
        if first[0] in "aeiouyéèêh":
            return "l'" + lowered
        return ("la " if first in _FEMININE else "le ") + lowered
    return name


def _join(names: Sequence[str], language: str) -> str:
    if len(names) <= 1:
        return "".join(names)
    last = " et " if _base(language) == "fr" else " and "
    return ", ".join(names[:-1]) + last + names[-1]


def confirmation(call: Mapping[str, Any], result: Any, language: str, home: Home) -> str | None:
    """The spoken line after Home Assistant ran ``call``; None: let the model word it."""
    fr = _base(language) == "fr"
    if isinstance(result, Mapping) and result.get("error"):
        detail = str(result.get("error_text") or result.get("error"))
        return f"Je n'ai pas pu le faire : {detail}." if fr else f"I could not do that: {detail}."
    if not isinstance(result, Mapping):
        return None
    speech = _speech_of(result)
    if result.get("response_type") == "error":
        return str(speech) if speech else ("Je n'ai pas pu le faire." if fr else "I could not do that.")
    data: Mapping[str, Any] = result["data"] if isinstance(result.get("data"), Mapping) else {}
    failed = [str(item.get("name")) for item in data.get("failed") or [] if isinstance(item, Mapping)]
    succeeded = [str(item.get("name")) for item in data.get("success") or [] if isinstance(item, Mapping)]
    if failed:
        names = _join([with_article(n, language) for n in failed], language)
        return f"Je n'ai pas pu agir sur {names}." if fr else f"I could not control {names}."
    if speech:
        return str(speech)
    name = str(call.get("name", ""))
    arguments: Mapping[str, Any] = call["arguments"] if isinstance(call.get("arguments"), Mapping) else {}
    templates = (_DONE_FR if fr else _DONE_EN).get(name)
    if templates is None:
        return "C'est fait." if fr else "Done."
    said = str(arguments.get("name") or arguments.get("area") or "")
    targets = succeeded or [said]
    if len(succeeded) == 1 and said and arguments.get("name"):
        entity = home.entity(said)
        if entity is not None and succeeded[0] in entity.names:
            targets = [said]  # the alias the user said ("Kitchen light"), not the French name
    targets = [t for t in targets if t]
    if not targets:
        return "C'est fait." if fr else "Done."
    is_cover = any((home.entity(t) or _NO_ENTITY).domain in ("cover", "valve") for t in targets)
    template = templates[1 if is_cover else 0]
    values = {k: _spoken_number(v, language) for k, v in arguments.items()}
    try:
        return template.format(t=_join([with_article(t, language) for t in targets], language), **values)
    except (KeyError, IndexError):
        return "C'est fait." if fr else "Done."


_NO_ENTITY = ExposedEntity(names=("",), domain="")

_SWITCHED_DOMAINS = frozenset(["light", "switch", "fan", "cover", "valve", "media_player"])


def likely_confirmations(home: Home, language: str) -> list[str]:
    """What :func:`confirmation` says after each exposed device was turned on and off (a cover
    opened and closed), and the fixed answers ("C'est fait.", not understood): the sentences a
    home hears most, worth having ready before they are needed (the TTS renders them while
    idle, ``runtime.server.PhraseBook``)."""
    fr = _base(language) == "fr"
    texts = [
        "C'est fait." if fr else "Done.",
        not_understood(language),
        not_understood(language, device_heard=True),
        state_unknown(language),
    ]
    for entity in home.entities:
        if entity.domain not in _SWITCHED_DOMAINS:
            continue
        for tool in ("HassTurnOn", "HassTurnOff"):
            call = {"name": tool, "arguments": {"name": entity.name}}
            done = {
                "response_type": "action_done",
                "data": {"success": [{"name": entity.name}], "failed": []},
            }
            text = confirmation(call, done, language, home)
            if text:
                texts.append(text)
    return texts


def _speech_of(result: Mapping[str, Any]) -> str | None:
    """Home Assistant's own sentence in an intent result, when it wrote one."""
    speech = result.get("speech")
    plain = speech.get("plain") if isinstance(speech, Mapping) else None
    text = plain.get("speech") if isinstance(plain, Mapping) else None
    return str(text) if text else None


def _spoken_number(value: Any, language: str) -> Any:
    if isinstance(value, float):
        text = f"{value:g}"
        return text.replace(".", ",") if _base(language) == "fr" else text
    return value


_STATE_WORDS_FR = {
    "on": ("allumé", "allumée"),
    "off": ("éteint", "éteinte"),
    "open": ("ouvert", "ouverte"),
    "closed": ("fermé", "fermée"),
    "opening": ("en cours d'ouverture",) * 2,
    "closing": ("en cours de fermeture",) * 2,
    "locked": ("verrouillé", "verrouillée"),
    "unlocked": ("déverrouillé", "déverrouillée"),
    "unavailable": ("indisponible",) * 2,
    "heat": ("en chauffe",) * 2,
}
_STATE_WORDS_EN = {"heat": "heating"}


def state_answer(match: IntentMatch, live: Sequence[ExposedEntity], language: str) -> str | None:
    """A state question ("La lumière du salon est-elle allumée ?") answered from live context."""
    if match.intent != "HassGetState":
        return None
    fr = _base(language) == "fr"
    wanted = str(match.slots.get("name") or "")
    entity = next((e for e in live if wanted and wanted.casefold() in (n.casefold() for n in e.names)), None)
    if entity is None or entity.state is None:
        return None
    state = entity.state
    said = _state_word(entity, state, language)
    said_name = next((n for n in entity.names if n.casefold() == wanted.casefold()), entity.name)
    subject = with_article(said_name, language)  # mid-sentence form: "la lumière du salon"
    verb = "est" if fr else "is"
    asked = match.slots.get("state")
    if asked is None:
        if entity.domain == "sensor":
            unit = str(entity.attributes.get("unit_of_measurement", ""))
            line = f"{subject} : {_spoken_number(_number(state), language)} {unit}".strip() + "."
        else:
            line = f"{subject} {verb} {said}."
        return line[0].upper() + line[1:]
    yes = str(asked).casefold() == state.casefold()
    opening = ("Oui" if yes else "Non") if fr else ("Yes" if yes else "No")
    return f"{opening}, {subject} {verb} {said}."


def _number(state: str) -> Any:
    try:
        return float(state)
    except ValueError:
        return state


def _state_word(entity: ExposedEntity, state: str, language: str) -> str:
    if _base(language) != "fr":
        return _STATE_WORDS_EN.get(state, state)
    words = _STATE_WORDS_FR.get(state)
    if words is None:
        return state
    feminine = entity.name.split()[0].casefold() in _FEMININE if entity.name else False
    return words[1 if feminine else 0]


# --- the fast path ------------------------------------------------------------------------


def _last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    return next((str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"), "")


def fast_answer(
    recognizer: IntentRecognizer, messages: Sequence[Mapping[str, Any]], language: str, home: Home
) -> FastAnswer | None:
    """The answer the templates give to this request, or None for the model to answer.

    Blocking (hassil is pure Python): call it in a thread.
    """
    if not messages or not home.tools:
        return None
    last = messages[-1]
    role = last.get("role")
    if role == "user":
        text = str(last.get("content") or "")
        matched = _command_in(recognizer, text, language, home)
        if matched is not None:
            return FastAnswer(tool_call=matched, reason="intent")
        follow_up = follow_up_call(text, language, messages, home)
        if follow_up is not None:
            return FastAnswer(tool_call=follow_up, reason="follow_up")
        return None
    if role != "tool":
        return None
    call = _answered_call(messages)
    if call is None:
        return None
    try:
        result = json.loads(str(last.get("content") or ""))
    except ValueError:
        return None
    if call["name"] == LIVE_CONTEXT_TOOL:
        match = recognizer.recognize(_last_user_text(messages), language, home)
        if match is None:
            return None
        answer = state_answer(match, exposed_entities([last]), language)
        return FastAnswer(text=answer, reason="state") if answer else None
    confirmed = confirmation(call, result, language, home)
    return FastAnswer(text=confirmed, reason="confirmation") if confirmed else None


# --- what the ASR mishears --------------------------------------------------------------

_FIRST_WORD_SLIPS: dict[str, dict[str, str]] = {
    "fr": {
        "mais": "mets",
        "met": "mets",
        "mes": "mets",
        "éteint": "éteins",
        "étant": "éteins",
        "étends": "éteins",
        "éteinds": "éteins",
        "éteindre": "éteins",
        "allumer": "allume",
        "allumes": "allume",
        "allumé": "allume",
        "ouvert": "ouvre",
        "ouvres": "ouvre",
        "fermé": "ferme",
        "fermes": "ferme",
        "réglé": "règle",
        "régler": "règle",
        "règles": "règle",
        "alume": "allume",
        "alumes": "allume",
    },
    "en": {"turned": "turn", "turns": "turn", "sat": "set", "said": "set"},
}
"""Command verbs Whisper writes as a homophone at the start of a command (measured on our voices:
"Mets le chauffage…" → "Mais le chauffage…", "Éteins la…" → "Étant la…" / "Éteint la…",
"Allume la…" → "Alume la…" with the home's names as hints). Compared without accents: Whisper
often writes a capital without its accent ("Etant", "Eteins"), as French typists do."""
NAME_SIMILARITY = 0.8
"""Least similarity (difflib ratio, accents and case folded) for a heard phrase to be taken for an
exposed name: "caftière" → "Cafetière" (0.94), "lampe de chevais" → "Lampe de chevet" (0.84);
"lumière du garage" stays itself against "Lumière du salon" (0.73)."""


_DETERMINERS = frozenset(
    ["le", "la", "les", "l'", "du", "de", "des", "mon", "ma", "mes", "the", "a", "an", "my", "all"]
)


_PARTICLES = frozenset(["on", "off", "up", "down", "tout", "tous", "toutes"])


def _fold(text: str) -> str:
    decomposed = unicodedata.normalize("NFD", text.casefold())
    return "".join(ch for ch in decomposed if unicodedata.category(ch) != "Mn")


def mended(text: str, language: str, home: Home) -> str:
    """``text`` with what the ASR likely misheard put right: a homophone of the command verb
    first, phrases close to an exposed name or area (:data:`NAME_SIMILARITY`) replaced by it.

    Used only when the sentence as heard matches no template; the mended sentence must then
    match one in full, and its call pass :func:`validate_call`: a guess never reaches the
    home on its own.
    """
    words = text.strip().split()
    if not words:
        return text
    base = _base(language)
    first = _fold(words[0].strip(",.!?"))
    # "Mais le chauffage" is "Mets le chauffage"; "Mais pourquoi" stays "Mais pourquoi".
    then = _fold(words[1]) if len(words) > 1 else ""
    fixed = _FOLDED_SLIPS.get(base, {}).get(first) or _FOLDED_VERBS.get(base, {}).get(first)
    if fixed and (then in _DETERMINERS or then in _PARTICLES or then.startswith("l'")):
        words[0] = fixed.capitalize() if words[0][:1].isupper() else fixed
    names = sorted({*home.names, *home.areas}, key=lambda n: -len(n.split()))
    folded_names = {name: _fold(name) for name in names}
    out: list[str] = []
    index = 0
    while index < len(words):
        best: tuple[float, int, str] | None = None
        for name, folded in folded_names.items():
            size = len(name.split())
            for width in {size - 1, size, size + 1}:
                if width < 1 or index + width > len(words):
                    continue
                if _fold(words[index]) in _DETERMINERS and _fold(name.split()[0]) not in _DETERMINERS:
                    continue  # "la caftière": the article stays, the name after it is mended
                window = " ".join(words[index : index + width])
                core = window.strip(",.!?;:")
                ratio = difflib.SequenceMatcher(None, _fold(core), folded).ratio()
                if ratio >= NAME_SIMILARITY and (best is None or ratio > best[0]):
                    trail = window[len(window.rstrip(",.!?;:")) :]
                    best = (ratio, width, name + trail)
        if best is not None:
            out.append(best[2])
            index += best[1]
        else:
            out.append(words[index])
            index += 1
    return " ".join(out)


_COMMAND_VERBS = {
    "fr": frozenset(
        [
            "allume",
            "rallume",
            "éteins",
            "mets",
            "règle",
            "ouvre",
            "ferme",
            "monte",
            "baisse",
            "augmente",
            "diminue",
            "coupe",
            "arrête",
            "démarre",
            "lance",
            "active",
            "désactive",
            "verrouille",
            "déverrouille",
        ]
    ),
    "en": frozenset(
        [
            "turn",
            "switch",
            "set",
            "open",
            "close",
            "raise",
            "lower",
            "increase",
            "decrease",
            "start",
            "stop",
            "lock",
            "unlock",
            "dim",
        ]
    ),
}


_FOLDED_SLIPS = {
    base: {_fold(slip): verb for slip, verb in slips.items()} for base, slips in _FIRST_WORD_SLIPS.items()
}
_FOLDED_VERBS = {base: {_fold(verb): verb for verb in verbs} for base, verbs in _COMMAND_VERBS.items()}
"""Slips and command verbs by their accent-less spelling: "Etant" and "Eteins" are "éteins"."""


def looks_like_command(text: str, language: str) -> bool:
    """Does the sentence start with a verb that commands a device (its homophones mended)?"""
    words = mended(text, language, Home()).split()
    return bool(words) and _fold(words[0].strip(",.!?")) in _FOLDED_VERBS.get(_base(language), {})


def lost_verb_command(text: str, language: str, home: Home) -> bool:
    """Is the sentence one word, an article and an exposed name or area, and nothing else?

    "Éton la cafetière." (heard for "Éteins la cafetière."): the shape of a command whose
    verb the ASR lost; a question ("?") is not one.
    """
    words = mended(text, language, home).split()
    if len(words) < 3 or text.rstrip().endswith("?"):
        return False
    article, rest = _fold(words[1]), words[2:]
    if article.startswith("l'") and len(article) > 2:
        rest = [words[1][2:], *rest]
    elif article not in _DETERMINERS:
        return False
    said = _fold(" ".join(rest).strip(",.!?;: "))
    return any(said == _fold(name) for name in (*home.names, *home.areas) if name.strip())


_QUESTION_WORDS = {
    "fr": frozenset(
        ["est-ce", "quel", "quelle", "quels", "quelles", "combien", "comment", "où", "qu'est-ce"]
    ),
    "en": frozenset(["is", "are", "was", "were", "does", "do", "did", "what", "which", "how", "where"]),
}
_FRENCH_DEVICE_WORDS = """
    lumière lumières lampe lampes chauffage radiateur thermostat température volet volets store
    stores porte portes fenêtre fenêtres prise prises interrupteur ventilateur serrure capteur
    alarme télé télévision climatisation clim allumé allumée allumés allumées éteint éteinte
    éteints éteintes ouvert ouverte ouverts ouvertes fermé fermée fermés fermées
"""
_ENGLISH_DEVICE_WORDS = """
    light lights lamp lamps heating heater radiator thermostat temperature blind blinds shutter
    shutters cover covers door doors window windows plug plugs switch switches fan fans lock locks
    sensor alarm tv television
"""
_DEVICE_WORDS = {
    "fr": frozenset(_FRENCH_DEVICE_WORDS.split()),
    "en": frozenset(_ENGLISH_DEVICE_WORDS.split()),
}
"""Words that make a question one about the home's devices (their plural and state words too)."""


def asks_for_a_state(text: str, language: str, home: Home) -> bool:
    """Is this a question about a device or a room of the home (its answer is a live state)?

    A question: a "?" or a question word first. About the home: a device word
    (:data:`_DEVICE_WORDS`) or an exposed name or area in it. "Quelle est la capitale
    de l'Italie ?" is not; "Is the living room life on?" (misheard) is.
    """
    base = _base(language)
    words = [_fold(w) for w in re.findall(r"[\w'’-]+", text.replace("’", "'"))]
    if not words:
        return False
    question_words = {_fold(w) for w in _QUESTION_WORDS.get(base, frozenset())}
    if not (text.rstrip().endswith("?") or words[0] in question_words or words[0].startswith("est-ce")):
        return False
    device_words = {_fold(w) for w in _DEVICE_WORDS.get(base, frozenset())}
    if any(w in device_words for w in words):
        return True
    folded = " " + " ".join(words) + " "
    return any(f" {_fold(name)} " in folded for name in (*home.names, *home.areas) if name.strip())


def state_unknown(language: str) -> str:
    """What a question about the home gets when no template matched and no level may read it."""
    if _base(language) == "fr":
        return "Je n'ai pas compris de quel appareil vous parlez. Pouvez-vous répéter ?"
    return "I did not understand which device you mean. Could you say it again?"


def not_understood(language: str, *, device_heard: bool = False) -> str:
    """What a command no template matched gets when no level may act on the home
    (``device_heard``: it named an exposed device, its verb was lost)."""
    fr = _base(language) == "fr"
    if device_heard:
        return (
            "Je n'ai pas compris ce que je dois faire. Pouvez-vous répéter ?"
            if fr
            else "I did not understand what to do. Could you say it again?"
        )
    if fr:
        return "Je n'ai pas compris quel appareil. Pouvez-vous répéter ?"
    return "I did not understand which device. Could you say it again?"


_CLAUSE_BREAK = re.compile(r"\s*[,;:]\s*|\s+(?:et|puis|alors|and|then|so)\s+", re.IGNORECASE)
_LEADING_LINK = re.compile(r"^(?:et|puis|alors|donc|and|then|so)\s+", re.IGNORECASE)


def _command_in(recognizer: IntentRecognizer, text: str, language: str, home: Home) -> dict[str, Any] | None:
    """The call of the whole sentence; else of its one clause that is a command.

    "Il fait sombre dans le bureau, allume la lumière du bureau": a remark, then the
    command. Two commands in one sentence ("allume la cuisine et éteins le salon")
    are left to the model: doing one of them would be worse than asking.
    """
    match = recognizer.recognize(text, language, home)
    if match is None:
        heard = mended(text, language, home)
        if heard != text:
            match = recognizer.recognize(heard, language, home)
            if match is not None:
                _LOGGER.info("intents: %r heard as %r", text, heard)
    if match is not None:
        return call_for(match, home)
    clauses = [_LEADING_LINK.sub("", c) for c in _CLAUSE_BREAK.split(text) if c]
    clauses = [c for c in clauses if len(c.split()) >= 2]
    if len(clauses) < 2:
        return None
    calls = []
    for clause in clauses:
        found = recognizer.recognize(clause, language, home)
        call = call_for(found, home) if found is not None else None
        if call is not None:
            calls.append(call)
    return calls[0] if len(calls) == 1 else None


def _answered_call(messages: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The call whose result is the last message (the assistant message right before it)."""
    for message in reversed(messages[:-1]):
        if message.get("role") == "tool":
            continue
        calls = message.get("tool_calls") if message.get("role") == "assistant" else None
        if not calls or len(calls) != 1:
            return None  # several calls at once: the model words the summary
        return _last_call([message], with_live_context=True)
    return None
