"""Text for speech: a French-aware sentence splitter and a normalizer.

Time to first audio is what a listener hears, so text is synthesized one
sentence at a time, as soon as a sentence is known to be complete. The
splitter works on a stream of text chunks (an LLM writing its answer) and on
whole texts with the same rules:

* ``.``, ``!``, ``?``, ``…`` (and groups such as ``?!`` or ``...``), followed
  by white space, end a sentence, unless the next word starts with a lower-case
  letter ("Eh bien... je crois"), or the word before is an abbreviation that
  never ends a sentence (``M.``, ``Mme``, ``Dr.``, ``p.``...), or ``etc.``
  followed by a lower-case word. Decimals ("3,5", "3.5") and times ("14h30")
  never contain a dot followed by a space, so they never split.
* A line break ends a sentence (lists, paragraphs).
* The first sentence of an answer, when long, is cut at its first clause
  boundary (comma, semicolon, colon, dash) so that audio starts early; any
  segment that grows past ``max_segment_chars`` without punctuation is cut at
  a clause boundary or a space, so that one run-on sentence cannot hold the
  audio back.

A streamed sentence that ends on a plain word (two letters or more, not an
abbreviation, not a number) and a single ``.``, ``!`` or ``?`` is released as
soon as its mark arrives: an LLM's next sentence may be a whole sentence away
(a handle holding its text back releases it sentence by sentence), and the
voice should not wait for it. After an ellipsis, an initial, a number or an
abbreviation the boundary is only known when the next letter is seen.

The normalizer turns what an LLM writes into what a voice should say:
markdown and emoji are removed; in French, numbers, times ("14h30"),
ordinals ("1er", "2e"), units ("3,5 km", "21 °C", "15 %") and currencies
("12,50 €") become words through ``num2words``, so every voice (Piper,
espeak-ng, a remote server) reads them the same way.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

from num2words import num2words

# --- splitting ------------------------------------------------------------------

NEVER_FINAL = frozenset(
    {
        "m",
        "mm",
        "mme",
        "mmes",
        "mlle",
        "mlles",
        "dr",
        "drs",
        "pr",
        "me",
        "mgr",
        "st",
        "ste",
        "p",
        "pp",
        "vol",
        "chap",
        "cf",
        "ex",
        "env",
        "av",
        "bd",
        "fig",
        "tél",
        "tel",
        "art",
        "mr",
        "mrs",
        "ms",
        "prof",
        "vs",
        "no",
        "n°",
        "approx",
    }
)
"""Words after which a dot never ends a sentence (titles and reference abbreviations)."""

_TERMINATOR = re.compile(r"(?:\.{2,}|…|[.!?]+)(?:[ \u00a0\u202f]?[»”])?[\"’')\]]*(?=\s|$)")
_CLAUSE = re.compile(r"(?:[,;:](?=\s)|\s[—–-](?=\s))")
_WORD_BEFORE = re.compile(r"([\w°]+)\s*$")


@dataclass(frozen=True)
class SplitterOptions:
    """How text is cut into the segments that are synthesized one by one."""

    first_max_chars: int = 40
    """A first sentence longer than this (characters) is cut at a clause boundary.

    A voice that renders a segment whole (Kokoro) makes the listener wait for all
    of it: on a 2-core CPU Kokoro takes about 0.12 s + 9 ms a character (0.34 s
    for 24 characters, 0.76 s for 73), so a first segment of 40 characters
    keeps the first audio near half a second."""
    first_min_chars: int = 16
    """...but not before this many characters, so that the first piece is not a stub
    ("Bonjour," alone would be said with a pause after it)."""
    min_tail_chars: int = 20
    """...and only where at least this many characters remain after the cut (whole texts)."""
    max_segment_chars: int = 400
    """Any segment longer than this is cut at the last clause boundary or space before it."""


class SentenceSplitter:
    """Cuts a stream of text into sentences; ``feed`` chunks, then ``flush`` the rest.

    One splitter serves one answer (``first`` tracks whether the first segment
    has been released yet).
    """

    def __init__(self, options: SplitterOptions | None = None) -> None:
        self.options = options or SplitterOptions()
        self._buffer = ""
        self._released = 0

    @property
    def pending(self) -> str:
        """Text received but not yet released as a segment."""
        return self._buffer

    def feed(self, text: str) -> list[str]:
        """Add a chunk; return the segments that are now known to be complete."""
        self._buffer += text
        return self._drain(final=False)

    def flush(self) -> list[str]:
        """The text is over: return every remaining segment."""
        return self._drain(final=True)

    def _drain(self, *, final: bool) -> list[str]:
        out: list[str] = []
        while True:
            cut = self._next_cut(final=final)
            if cut is None:
                break
            segment, self._buffer = self._buffer[:cut], self._buffer[cut:]
            segment = _clean(segment)
            if _speakable(segment):
                out.append(segment)
                self._released += 1
        if final:
            rest = _clean(self._buffer)
            self._buffer = ""
            if _speakable(rest):
                out.append(rest)
                self._released += 1
        return out

    def _next_cut(self, *, final: bool) -> int | None:
        """Index where the first complete segment of the buffer ends, or None."""
        text = self._buffer
        end = _sentence_end(text, final=final)
        opts = self.options
        if self._released == 0:
            sentence = text if end is None else text[:end]
            length = len(sentence.strip())
            complete = end is not None or final
            if length > opts.first_max_chars:
                clause = _clause_end(sentence, opts.first_min_chars, opts.min_tail_chars if complete else 0)
                if clause is not None:
                    return clause
        if end is not None:
            return end
        if len(text.strip()) > opts.max_segment_chars:
            return _forced_cut(text, opts.max_segment_chars)
        return None


def split_sentences(text: str, options: SplitterOptions | None = None) -> list[str]:
    """A whole text cut into the segments a voice speaks one by one."""
    splitter = SentenceSplitter(options)
    return splitter.feed(text) + splitter.flush()


def _sentence_end(text: str, *, final: bool) -> int | None:
    """End index (exclusive) of the first complete sentence in ``text``."""
    newline = text.find("\n")
    for match in _TERMINATOR.finditer(text):
        if newline != -1 and newline < match.start():
            break
        after = text[match.end() :].lstrip()
        if not after:
            if final or _ends_for_sure(text[: match.start()], match.group(0)):
                return match.end()
            return None  # the next word is not here yet: wait for it
        if _is_boundary(text[: match.start()], match.group(0), after[0]):
            return match.end()
    if newline != -1:
        return newline + 1
    return None


_SURE_MARK = re.compile(r"[.!?](?:[ \u00a0\u202f]?[»”])?[\"’')\]]*")


def _ends_for_sure(before: str, punctuation: str) -> bool:
    """A mark that ends the sentence whatever comes next: one ``.``, ``!`` or ``?`` after a
    plain word ("Il fait beau."), not after "M", "etc", "3" or "..." (the next letter decides)."""
    if not _SURE_MARK.fullmatch(punctuation):
        return False
    word_match = _WORD_BEFORE.search(before)
    word = word_match.group(1) if word_match else ""
    if len(word) < 2 or not word.isalpha() or word.lower() in NEVER_FINAL or word.lower() == "etc":
        return False
    # A quotation or a bracket still open: its closing mark belongs to this sentence.
    quoted = before + punctuation
    return (
        quoted.count("«") <= quoted.count("»")
        and quoted.count("“") <= quoted.count("”")
        and quoted.count("(") <= quoted.count(")")
        and quoted.count('"') % 2 == 0
    )


def _is_boundary(before: str, punctuation: str, next_char: str) -> bool:
    if next_char.islower():
        return False  # "Eh bien... je crois", "env. trois", "Quoi ? dit-il"
    if punctuation.startswith(".") and not punctuation.startswith(".."):
        word_match = _WORD_BEFORE.search(before)
        word = word_match.group(1) if word_match else ""
        if word.lower() in NEVER_FINAL:
            return False
        if len(word) == 1 and word.isupper():
            return False  # an initial: "J. Dupont"
        if word.isdigit() and not before[: -len(word)].strip():
            return False  # a numbered list item "1. Acheter du pain"
    return True


def _clause_end(sentence: str, min_chars: int, min_tail: int) -> int | None:
    for match in _CLAUSE.finditer(sentence):
        end = match.end()
        if len(sentence[:end].strip()) < min_chars:
            continue
        if len(sentence[end:].strip()) < max(min_tail, 1):
            return None
        return end
    return None


def _forced_cut(text: str, limit: int) -> int:
    window = text[:limit]
    clauses = [m.end() for m in _CLAUSE.finditer(window)]
    if clauses and clauses[-1] > limit // 2:
        return clauses[-1]
    space = window.rfind(" ")
    return space + 1 if space > limit // 2 else limit


def _clean(segment: str) -> str:
    return re.sub(r"\s+", " ", segment).strip()


def _speakable(segment: str) -> bool:
    return any(ch.isalnum() for ch in segment)


# --- normalization ----------------------------------------------------------------

_EMOJI = re.compile(
    "["
    "\U0001f000-\U0001faff"  # pictographs, emoticons, transport, symbols, flags
    "\U00002600-\U000027bf"  # misc symbols, dingbats
    "\U0001f1e6-\U0001f1ff"
    "\U00002b00-\U00002bff"
    "\ufe0f\u200d\u20e3"
    "]+"
)


def strip_markup(text: str) -> str:
    """Remove the markdown and emoji an LLM writes; keep the words."""
    text = re.sub(r"```[^\n]*\n?", "", text)
    text = re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"`([^`]*)`", r"\1", text)
    text = re.sub(r"(\*\*|__)(.+?)\1", r"\2", text)
    text = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"\1", text)
    text = re.sub(r"(?<![\w_])_(?!\s)(.+?)(?<!\s)_(?![\w_])", r"\1", text)
    text = re.sub(r"~~(.+?)~~", r"\1", text)
    text = re.sub(r"(?m)^\s{0,3}#{1,6}\s+", "", text)
    text = re.sub(r"(?m)^\s*>\s?", "", text)
    text = re.sub(r"(?m)^\s*(?:[-*+•]|\d{1,3}[.)])\s+", "", text)
    text = re.sub(r"(?m)^\s*(?:-{3,}|\*{3,}|_{3,})\s*$", "", text)
    text = re.sub(r"\s*\|\s*", ", ", text.strip("|")) if "|" in text else text
    text = _EMOJI.sub("", text)
    return text


_NUMBER = r"-?\d+(?:[.,]\d+)?"
_THOUSANDS = re.compile(r"(?<![\d,.])(\d{1,3}(?:[ \u00a0\u202f]\d{3})+)(?![\d])")


def _fr_int(n: int, *, feminine: bool = False) -> str:
    words = str(num2words(n, lang="fr"))
    if feminine and (words == "un" or words.endswith((" un", "-un"))):
        words = words[:-2] + "une"
    return words


def _fr_number(raw: str, *, feminine: bool = False) -> str:
    """ "3,5" → "trois virgule cinq", "-2" → "moins deux", "3,05" → "trois virgule zéro cinq"."""
    raw = raw.replace(".", ",") if raw.count(".") == 1 and "," not in raw else raw
    negative = raw.startswith("-")
    raw = raw.lstrip("-")
    whole, _, decimals = raw.partition(",")
    words = _fr_int(int(whole), feminine=feminine and not decimals) if len(whole) <= 15 else _digits_fr(whole)
    if decimals:
        zeros = len(decimals) - len(decimals.lstrip("0"))
        rest = decimals.lstrip("0")
        parts = ["zéro"] * zeros + ([_fr_int(int(rest))] if rest else [])
        words += " virgule " + " ".join(parts)
    return ("moins " + words) if negative else words


def _digits_fr(digits: str) -> str:
    return " ".join(_fr_int(int(d)) for d in digits)


def _is_plural(raw: str) -> bool:
    """French grammar: plural from 2 on (1,5 kilomètre, 2 kilomètres)."""
    try:
        return abs(float(raw.replace(",", "."))) >= 2
    except ValueError:
        return True


_FR_UNITS: dict[str, tuple[str, str, bool]] = {
    # symbol: (singular, plural, feminine)
    "km/h": ("kilomètre heure", "kilomètres heure", False),
    "km": ("kilomètre", "kilomètres", False),
    "m": ("mètre", "mètres", False),
    "cm": ("centimètre", "centimètres", False),
    "mm": ("millimètre", "millimètres", False),
    "m²": ("mètre carré", "mètres carrés", False),
    "m2": ("mètre carré", "mètres carrés", False),
    "m³": ("mètre cube", "mètres cubes", False),
    "km²": ("kilomètre carré", "kilomètres carrés", False),
    "kg": ("kilo", "kilos", False),
    "g": ("gramme", "grammes", False),
    "mg": ("milligramme", "milligrammes", False),
    "l": ("litre", "litres", False),
    "L": ("litre", "litres", False),
    "cl": ("centilitre", "centilitres", False),
    "ml": ("millilitre", "millilitres", False),
    "mL": ("millilitre", "millilitres", False),
    "min": ("minute", "minutes", True),
    "s": ("seconde", "secondes", True),
    "ms": ("milliseconde", "millisecondes", True),
    "kWh": ("kilowattheure", "kilowattheures", False),
    "kW": ("kilowatt", "kilowatts", False),
    "W": ("watt", "watts", False),
    "V": ("volt", "volts", False),
    "A": ("ampère", "ampères", False),
    "Go": ("gigaoctet", "gigaoctets", False),
    "Mo": ("mégaoctet", "mégaoctets", False),
    "ko": ("kilooctet", "kilooctets", False),
    "ha": ("hectare", "hectares", False),
    "hPa": ("hectopascal", "hectopascals", False),
    "dB": ("décibel", "décibels", False),
}
_FR_UNIT_RE = re.compile(
    r"(?<![\w,.])("
    + _NUMBER
    + r")\s?("
    + "|".join(re.escape(u) for u in sorted(_FR_UNITS, key=len, reverse=True))
    + r")(?![\w²³])"
)

_FR_ABBREVIATIONS: tuple[tuple[str, str], ...] = (
    (r"\bMM\.(?=\s)", "messieurs"),
    (r"\bM\.(?=\s+[A-ZÉÈÀ])", "monsieur"),
    (r"\bMmes\b\.?", "mesdames"),
    (r"\bMme\b\.?", "madame"),
    (r"\bMlles\b\.?", "mesdemoiselles"),
    (r"\bMlle\b\.?", "mademoiselle"),
    (r"\bDr\b\.?", "docteur"),
    (r"\bPr\b\.?(?=\s+[A-ZÉÈ])", "professeur"),
    (r"\betc\.(?=\s*$)", "et cetera."),
    (r"\betc\.", "et cetera"),
    (r"\betc\b", "et cetera"),
    (r"\b[nN][°º]\s?", "numéro "),
    (r"\benv\.(?=\s)", "environ"),
    (r"\bcf\.(?=\s)", "voir"),
    (r"\bex\.(?=\s)", "par exemple"),
    (r"\s&\s", " et "),
)

_MONTHS_FR = (
    "janvier",
    "février",
    "mars",
    "avril",
    "mai",
    "juin",
    "juillet",
    "août",
    "septembre",
    "octobre",
    "novembre",
    "décembre",
)


def _fr_time(match: re.Match[str]) -> str:
    hours = int(match.group(1))
    minutes = match.group(2) if (match.re.groups or 0) >= 2 else None
    if hours > 24 or (minutes and int(minutes) > 59):
        return match.group(0)
    words = _fr_int(hours, feminine=True) + (" heures" if hours >= 2 else " heure")
    if minutes and int(minutes):
        words += " " + _fr_int(int(minutes), feminine=True)
    return words


def _fr_date(match: re.Match[str]) -> str:
    day, month, year = int(match.group(1)), int(match.group(2)), match.group(3)
    if not (1 <= day <= 31 and 1 <= month <= 12):
        return match.group(0)
    words = ("premier" if day == 1 else _fr_int(day)) + " " + _MONTHS_FR[month - 1]
    if year:
        words += " " + _fr_int(int(year))
    return words


def _fr_ordinal(match: re.Match[str]) -> str:
    n, suffix = int(match.group(1)), match.group(2).lower()
    if n == 1:
        return "première" if suffix.startswith(("r", "è")) else "premier"
    return str(num2words(n, lang="fr", to="ordinal"))


def _fr_money(amount: str, unit: tuple[str, str], cents_name: str) -> str:
    amount = amount.replace(".", ",")
    whole, _, cents = amount.partition(",")
    whole_n = int(whole.lstrip("-") or "0")
    cents = (cents + "00")[:2] if cents else ""
    cents_n = int(cents) if cents else 0
    name = unit[1] if whole_n >= 2 else unit[0]
    if whole_n == 0 and cents_n:
        return f"{_fr_int(cents_n)} {cents_name}{'s' if cents_n >= 2 else ''}"
    words = f"{_fr_int(whole_n)} {name}"
    if whole_n >= 1_000_000 and whole_n % 1_000_000 == 0:
        words = f"{_fr_int(whole_n)} d'{name}"
    if cents_n:
        words += f" {_fr_int(cents_n)}"
    return ("moins " + words) if amount.startswith("-") else words


def _money_replacer(unit: tuple[str, str], cents: str) -> Callable[[re.Match[str]], str]:
    def replace(match: re.Match[str]) -> str:
        return _fr_money(match.group(1), unit, cents)

    return replace


_CURRENCIES_FR = {
    "€": (("euro", "euros"), "centime"),
    "$": (("dollar", "dollars"), "cent"),
    "£": (("livre", "livres"), "penny"),
}


def latin_only(text: str) -> str:
    """Letters of other scripts (CJK, Cyrillic, Arabic...) out: a French or English voice
    cannot say them, and spells them out instead ("lettre cyrillique...", 17 s for 45
    characters), so the quality gate refused every voice and nothing was said."""
    if text.isascii():
        return text
    return "".join(" " if ch.isalpha() and "LATIN" not in unicodedata.name(ch, "") else ch for ch in text)


def normalize_fr(text: str) -> str:
    """French text as a voice should read it (see the module docstring)."""
    text = latin_only(strip_markup(text))
    for pattern, words in _FR_ABBREVIATIONS:
        text = re.sub(pattern, words, text)
    text = _THOUSANDS.sub(lambda m: re.sub(r"[ \u00a0\u202f]", "", m.group(1)), text)
    text = re.sub(r"\b(\d{1,2})/(\d{1,2})(?:/(\d{4}))?\b", _fr_date, text)
    text = re.sub(r"\b(\d{1,2})\s?[hH]\s?(\d{2})\b", _fr_time, text)
    text = re.sub(r"\b(\d{1,2}):(\d{2})\b", _fr_time, text)
    text = re.sub(r"\b(\d{1,2})\s?h\b", _fr_time, text)
    text = re.sub(r"\b(\d+)(ers?|res?|ères?)\b", _fr_ordinal, text)
    text = re.sub(r"\b(\d+)(e|è|ème|eme|es|èmes)\b", _fr_ordinal, text)
    for symbol, (unit, cents) in _CURRENCIES_FR.items():
        sym = re.escape(symbol)
        money = _money_replacer(unit, cents)
        text = re.sub(r"(" + _NUMBER + r")\s?" + sym, money, text)
        text = re.sub(sym + r"\s?(" + _NUMBER + r")", money, text)
    text = re.sub(r"(" + _NUMBER + r")\s?%", lambda m: _fr_number(m.group(1)) + " pour cent", text)
    text = re.sub(
        r"(" + _NUMBER + r")\s?°\s?([CF])?\b|(" + _NUMBER + r")\s?°",
        _fr_degrees,
        text,
    )
    text = _FR_UNIT_RE.sub(_fr_unit, text)
    text = re.sub(r"(?<=\d)\s?\+\s?(?=\d)", " plus ", text)
    text = re.sub(r"(?<=\d)\s?=\s?(?=\d)", " égale ", text)
    text = re.sub(r"(?<![\w-])(" + _NUMBER + r")(?![\w])", lambda m: _fr_number(m.group(1)), text)
    text = re.sub(r"\d+", lambda m: " " + _fr_number(m.group(0)) + " ", text)  # glued: "A4"
    text = text.replace("°", " degrés ")
    return _clean(text)


def _fr_degrees(match: re.Match[str]) -> str:
    raw = match.group(1) or match.group(3)
    scale = match.group(2) or ""
    words = _fr_number(raw) + (" degrés" if _is_plural(raw) else " degré")
    if scale == "F":
        words += " Fahrenheit"
    return words


def _fr_unit(match: re.Match[str]) -> str:
    raw, symbol = match.group(1), match.group(2)
    singular, plural, feminine = _FR_UNITS[symbol]
    return f"{_fr_number(raw, feminine=feminine)} {plural if _is_plural(raw) else singular}"


def _en_number(raw: str) -> str:
    raw = raw.replace(",", "")
    if raw.count(".") == 1:
        whole, _, decimals = raw.partition(".")
        words = str(num2words(int(whole.lstrip("-") or "0"), lang="en"))
        words += " point " + " ".join(str(num2words(int(d), lang="en")) for d in decimals)
        return ("minus " + words) if raw.startswith("-") else words
    return str(num2words(int(raw), lang="en"))


def _en_money(raw: str, unit: str) -> str:
    whole, _, cents = raw.replace(",", "").partition(".")
    whole_n = int(whole.lstrip("-") or "0")
    words = f"{num2words(whole_n, lang='en')} {unit}{'' if whole_n == 1 else 's'}"
    cents_n = int((cents + "00")[:2]) if cents else 0
    if cents_n:
        words += f" {num2words(cents_n, lang='en')}"
    return words


def normalize_en(text: str) -> str:
    """English text as a voice should read it: markup out, numbers and symbols in words."""
    text = latin_only(strip_markup(text))
    en_number = r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?"
    text = re.sub(
        r"\b(\d{1,2}):(\d{2})\b",
        lambda m: (
            _en_number(m.group(1))
            + (
                ""
                if m.group(2) == "00"
                else " " + ("oh " if m.group(2)[0] == "0" else "") + _en_number(str(int(m.group(2))))
            )
        ),
        text,
    )
    text = re.sub(r"\$\s?(" + en_number + r")", lambda m: _en_money(m.group(1), "dollar"), text)
    text = re.sub(
        r"(" + en_number + r")\s?€|€\s?(" + en_number + r")",
        lambda m: _en_money(m.group(1) or m.group(2), "euro"),
        text,
    )
    text = re.sub(r"(" + en_number + r")\s?%", lambda m: _en_number(m.group(1)) + " percent", text)
    text = re.sub(
        r"(" + en_number + r")\s?°\s?([CF])?",
        lambda m: (
            _en_number(m.group(1))
            + " degrees"
            + {"C": " Celsius", "F": " Fahrenheit"}.get(m.group(2) or "", "")
        ),
        text,
    )
    text = re.sub(
        r"\b(\d+)(st|nd|rd|th)\b", lambda m: str(num2words(int(m.group(1)), lang="en", to="ordinal")), text
    )
    text = re.sub(r"(?<![\w-])(" + en_number + r")(?![\w])", lambda m: _en_number(m.group(1)), text)
    text = re.sub(r"\d+", lambda m: " " + _en_number(m.group(0)) + " ", text)
    text = text.replace("&", " and ")
    return _clean(text)


def normalize_plain(text: str) -> str:
    """Languages without rules of their own: markup and emoji out; the voice reads the rest."""
    return _clean(strip_markup(text))


NORMALIZERS: dict[str, Callable[[str], str]] = {"fr": normalize_fr, "en": normalize_en}


def normalize(text: str, language: str) -> str:
    """Normalize one segment for a voice of ``language`` (``fr``, ``en``; others: markup only)."""
    return NORMALIZERS.get(language.split("-")[0].split("_")[0].lower(), normalize_plain)(text)
