"""Spoken numbers → digits, over the forms Whisper really writes (French first)."""

from __future__ import annotations

import pytest

from wyoming_superwhisper.asr.numbers import to_digits


@pytest.mark.parametrize(
    ("heard", "language", "expected"),
    [
        # what Whisper wrote through a real Home Assistant pipeline, and its neighbours
        ("Règle le chauffage sur 20 et 1 degrés.", "fr", "Règle le chauffage sur 21 degrés."),
        ("Règle le chauffage sur vingt et un degrés.", "fr", "Règle le chauffage sur 21 degrés."),
        ("Il fait 20 et un degrés dans le salon.", "fr", "Il fait 21 degrés dans le salon."),
        ("Votre réveil sonnera à 6h45.", "fr", "Votre réveil sonnera à 6 h 45."),
        ("Rendez-vous à 14h.", "fr", "Rendez-vous à 14 h."),
        ("Mets le chauffage à vingt-deux degrés.", "fr", "Mets le chauffage à 22 degrés."),
        ("Règle sur vingt et un virgule cinq degrés", "fr", "Règle sur 21,5 degrés"),
        ("Mets la lumière à cinquante pour cent.", "fr", "Mets la lumière à 50 %."),
        ("Mets le volume à 50 pour cent", "fr", "Mets le volume à 50 %"),
        ("Réveille-moi à dix-huit heures trente.", "fr", "Réveille-moi à 18 h 30."),
        ("Il est 10 heures.", "fr", "Il est 10 h."),
        ("Il est dix heures et quart.", "fr", "Il est 10 h et quart."),
        ("Mets un minuteur de cinq minutes.", "fr", "Mets un minuteur de 5 minutes."),
        ("soixante et onze ans", "fr", "71 ans"),
        ("quatre-vingt-dix-neuf", "fr", "99"),
        # articles stay words
        ("Allume une lampe.", "fr", "Allume une lampe."),
        ("Ferme un volet.", "fr-FR", "Ferme un volet."),
        # English
        ("Turn the heating to twenty one degrees", "en", "Turn the heating to 21 degrees"),
        ("Set the light to fifty percent", "en", "Set the light to 50%"),
        # a language text2num does not parse: unchanged
        ("こんにちは", "ja", "こんにちは"),
        ("", "fr", ""),
    ],
)
def test_spoken_numbers_become_digits(heard: str, language: str, expected: str) -> None:
    assert to_digits(heard, language) == expected
