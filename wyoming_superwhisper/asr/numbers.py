"""Spoken numbers as digits, the way Home Assistant's intents read them.

Whisper writes "vingt et un degrés", "20 et 1 degrés" or "cinquante pour
cent"; an intent sentence such as "règle le chauffage sur {temperature}
degrés" needs "21". The inverse text normalization is ``text2num``'s
``alpha2digit`` (French, English and more; a well-kept parser, not our
rules); what it leaves is mended here in three small steps that Whisper's
real output needs:

* the split tens Whisper produces, "20 et 1" or "20 et un" → "21" (French says
  "vingt et un", "soixante et onze": 20/30/40/50/60 + "et" + 1 or 11);
* percentages, "50 pour cent" / "50 pour 100" → "50 %" (English "50 percent" → "50%");
* times, "18 heures 30" or "18h30" → "18 h 30", "10 heures" → "10 h" (French typography,
  what Home Assistant's French timer and alarm sentences use).

``asr.numbers: words`` keeps Whisper's words.
"""

from __future__ import annotations

import logging
import re

_LOGGER = logging.getLogger(__name__)

_SPLIT_TENS = re.compile(r"\b([2-6]0) et (1|11|un|une|onze)\b", re.IGNORECASE)
_UNITS = {"1": 1, "11": 11, "un": 1, "une": 1, "onze": 11}
_PERCENT = re.compile(r"\b(\d+(?:[,.]\d+)?) ?(?:pour ?cent|pour 100|pourcents?)\b", re.IGNORECASE)
_PERCENT_EN = re.compile(r"\b(\d+(?:\.\d+)?) ?percent\b", re.IGNORECASE)
_HOURS = re.compile(r"\b(\d{1,2}) ?heures?(?: (\d{1,2})\b)?", re.IGNORECASE)
_GLUED_HOURS = re.compile(r"\b(\d{1,2})h(\d{2})?\b")

SUPPORTED = ("fr", "en", "es", "pt", "de", "nl", "it", "da")
"""Languages ``text2num`` parses."""


def _french_time(match: re.Match[str]) -> str:
    return f"{match.group(1)} h" + (f" {match.group(2)}" if match.group(2) else "")


def to_digits(text: str, language: str) -> str:
    """``text`` with its spoken numbers as digits (unchanged for a language text2num lacks)."""
    base = language.strip().replace("_", "-").split("-")[0].lower()
    if not text or base not in SUPPORTED:
        return text
    try:
        from text_to_num import alpha2digit

        converted = alpha2digit(text, base)
    except Exception:  # a parser bug must never cost a transcript
        _LOGGER.warning("text2num failed on %r; keeping the words", text, exc_info=True)
        return text
    if base == "fr":
        converted = _SPLIT_TENS.sub(lambda m: str(int(m.group(1)) + _UNITS[m.group(2).lower()]), converted)
        converted = _PERCENT.sub(r"\1 %", converted)
        for hours in (_HOURS, _GLUED_HOURS):
            converted = hours.sub(_french_time, converted)
    elif base == "en":
        converted = _PERCENT_EN.sub(r"\1%", converted)
    return converted
