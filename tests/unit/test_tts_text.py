"""The French sentence splitter and normalizer, as tables of tricky inputs."""

from __future__ import annotations

import pytest

from wyoming_superwhisper.tts.sentences import (
    SentenceSplitter,
    SplitterOptions,
    normalize,
    split_sentences,
    strip_markup,
)

SPLITS: list[tuple[str, list[str]]] = [
    (
        "Bonjour M. Dupont. Comment allez-vous ? Très bien !",
        ["Bonjour M. Dupont.", "Comment allez-vous ?", "Très bien !"],
    ),
    (
        "Mme Martin et le Dr. Petit sont arrivés. Ils repartent à 14h30.",
        ["Mme Martin et le Dr. Petit sont arrivés.", "Ils repartent à 14h30."],
    ),
    ("Il fait 3,5 degrés. Le vent souffle.", ["Il fait 3,5 degrés.", "Le vent souffle."]),
    ("La version 3.5 est sortie. Super.", ["La version 3.5 est sortie.", "Super."]),
    (
        "Attendez... Je réfléchis. Eh bien... je crois que oui.",
        ["Attendez...", "Je réfléchis.", "Eh bien... je crois que oui."],
    ),
    ("Attendez… Voilà.", ["Attendez…", "Voilà."]),
    ("Quoi ?! Vraiment ? Oui.", ["Quoi ?!", "Vraiment ?", "Oui."]),
    ("Pommes, poires, etc. Ensuite, on verra.", ["Pommes, poires, etc.", "Ensuite, on verra."]),
    ("Des fruits, etc. et du pain.", ["Des fruits, etc. et du pain."]),
    ("Voir p. 12 du rapport. Merci.", ["Voir p. 12 du rapport.", "Merci."]),
    ("J. Dupont est là. Oui.", ["J. Dupont est là.", "Oui."]),
    ("« Bonjour. » Il est parti.", ["« Bonjour. »", "Il est parti."]),
    (
        "1. Acheter du pain\n2. Appeler maman\n- Sortir le chien",
        ["1. Acheter du pain", "2. Appeler maman", "- Sortir le chien"],
    ),
    ("Rendez-vous à 14h30. À bientôt !", ["Rendez-vous à 14h30.", "À bientôt !"]),
    ("Sans ponctuation finale", ["Sans ponctuation finale"]),
    ("   ", []),
    ("... !", []),
]


@pytest.mark.parametrize(("text", "expected"), SPLITS)
def test_split_table(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


@pytest.mark.parametrize(("text", "expected"), SPLITS)
def test_streaming_split_equals_whole_split(text: str, expected: list[str]) -> None:
    """Fed word by word (as an LLM writes), the same segments come out."""
    splitter = SentenceSplitter()
    out: list[str] = []
    for piece in _pieces(text):
        out.extend(splitter.feed(piece))
    out.extend(splitter.flush())
    assert out == expected


def _pieces(text: str) -> list[str]:
    pieces, word = [], ""
    for ch in text:
        word += ch
        if ch in " \n":
            pieces.append(word)
            word = ""
    return [*pieces, word] if word else pieces


def test_streamed_sentence_is_released_before_the_text_ends() -> None:
    splitter = SentenceSplitter()
    assert splitter.feed("Bonjour M") == []
    assert splitter.feed(".") == []  # "M." is not an end: the next word decides
    assert splitter.feed(" Dupont") == []
    assert splitter.feed(".") == ["Bonjour M. Dupont."]  # a plain word and its dot: at once
    assert splitter.feed(" Il fait beau") == []
    assert splitter.flush() == ["Il fait beau"]


@pytest.mark.parametrize(
    ("written", "released"),
    [
        ("Il fait beau.", ["Il fait beau."]),
        ("Tu viens ?", ["Tu viens ?"]),
        ("Quelle belle journée !", ["Quelle belle journée !"]),
        ("Eh bien...", []),  # "Eh bien... je crois": the next letter decides
        ("Il fait 21.", []),  # "21.5"
        ("Voyez la p.", []),  # an abbreviation
        ("Du pain, du lait, etc.", []),  # "etc. et le reste"
        ("Signé J.", []),  # an initial
        ("Il a dit « bonjour.", []),  # the guillemet closes after the dot
        ("Il a dit « bonjour. »", ["Il a dit « bonjour. »"]),
    ],
)
def test_a_sentence_is_released_when_its_mark_arrives_if_nothing_can_follow_it(
    written: str, released: list[str]
) -> None:
    assert SentenceSplitter().feed(written) == released


LONG_FIRST = (
    "Aujourd'hui à Paris, le ciel sera nuageux le matin avec quelques averses, puis le soleil "
    "reviendra l'après-midi avec 21 °C. Bonne journée !"
)


def test_long_first_sentence_is_cut_at_a_clause_boundary() -> None:
    assert split_sentences(LONG_FIRST) == [
        "Aujourd'hui à Paris,",
        "le ciel sera nuageux le matin avec quelques averses, "
        "puis le soleil reviendra l'après-midi avec 21 °C.",
        "Bonne journée !",
    ]


def test_long_first_sentence_is_cut_while_streaming() -> None:
    splitter = SentenceSplitter()
    released: list[str] = []
    for piece in _pieces(LONG_FIRST):
        released.extend(splitter.feed(piece))
        if released:
            break
    assert released == ["Aujourd'hui à Paris,"]
    assert "averses" not in "".join(released)  # released before the sentence was written


def test_only_the_first_sentence_is_cut() -> None:
    second = "Ensuite, " + "il fera beau sur toute la région avec des températures agréables, " * 2
    segments = split_sentences("Bonjour. " + second.strip() + ".")
    assert segments[0] == "Bonjour."
    assert len(segments) == 2


def test_short_first_sentence_and_decimal_comma_are_not_cut() -> None:
    text = "Il fait 3,5 degrés, un peu frais. Couvrez-vous."
    assert split_sentences(text) == ["Il fait 3,5 degrés, un peu frais.", "Couvrez-vous."]


def test_run_on_text_is_cut_below_the_segment_limit() -> None:
    words = " ".join(["mot"] * 200)
    segments = split_sentences("Bonjour. Voici " + words, SplitterOptions(max_segment_chars=100))
    assert segments[0] == "Bonjour."
    assert len(segments) > 3
    assert all(len(s) <= 100 for s in segments)
    assert " ".join(segments[1:]) == "Voici " + words


NORMALIZED_FR: list[tuple[str, str]] = [
    ("Il fait 21 °C.", "Il fait vingt et un degrés."),
    ("Il fait -5 °C la nuit.", "Il fait moins cinq degrés la nuit."),
    ("Il fait 1,5 °C.", "Il fait un virgule cinq degré."),
    ("15 % de réduction", "quinze pour cent de réduction"),
    ("3,5 km", "trois virgule cinq kilomètres"),
    ("20 km/h", "vingt kilomètres heure"),
    ("1,5 kg et 2 m", "un virgule cinq kilo et deux mètres"),
    ("à 14h30", "à quatorze heures trente"),
    ("à 14 h 05", "à quatorze heures cinq"),
    ("à 9h", "à neuf heures"),
    ("à 1h", "à une heure"),
    ("à 21h", "à vingt et une heures"),
    ("à 14:30", "à quatorze heures trente"),
    ("le 1er mai", "le premier mai"),
    ("la 1re fois", "la première fois"),
    ("le 2e étage", "le deuxième étage"),
    ("la 3ème place", "la troisième place"),
    ("le 21e siècle", "le vingt et unième siècle"),
    ("12,50 €", "douze euros cinquante"),
    ("1 €", "un euro"),
    ("0,50 €", "cinquante centimes"),
    ("€15", "quinze euros"),
    ("1 200 000 habitants", "un million deux cent mille habitants"),
    ("3,05", "trois virgule zéro cinq"),
    ("le 24/11/2026", "le vingt-quatre novembre deux mille vingt-six"),
    ("Bonjour M. Dupont", "Bonjour monsieur Dupont"),
    ("Mme Martin et le Dr Petit", "madame Martin et le docteur Petit"),
    ("n° 12", "numéro douze"),
    ("fruits, etc.", "fruits, et cetera."),
    ("A4", "A quatre"),
    ("il reste 1 min", "il reste une minute"),
    ("**Important** : *vraiment*", "Important : vraiment"),
    ("Super 😀🎉 !", "Super !"),
    ("[la météo](https://exemple.fr) du jour", "la météo du jour"),
    ("# Titre", "Titre"),
    ("- premier point", "premier point"),
    ("`code`", "code"),
]


@pytest.mark.parametrize(("text", "expected"), NORMALIZED_FR)
def test_normalize_fr_table(text: str, expected: str) -> None:
    assert normalize(text, "fr") == expected


NORMALIZED_EN: list[tuple[str, str]] = [
    ("It is 21 °C.", "It is twenty-one degrees Celsius."),
    ("15% off", "fifteen percent off"),
    ("$3.50", "three dollars fifty"),
    ("at 2:30", "at two thirty"),
    ("the 2nd time", "the second time"),
    ("**bold** 🎉", "bold"),
]


@pytest.mark.parametrize(("text", "expected"), NORMALIZED_EN)
def test_normalize_en_table(text: str, expected: str) -> None:
    assert normalize(text, "en") == expected


def test_other_languages_only_lose_markup() -> None:
    assert normalize("**Hallo** 21 Grad 😀", "de") == "Hallo 21 Grad"
    assert normalize("**Bonjour** 21", "fr-FR") == "Bonjour vingt et un"


def test_degree_sign_survives_emoji_stripping() -> None:
    assert "°" in strip_markup("21 °C 😀")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "La lumière est allumée, 照明 включена.",
            "La lumière est allumée, .",
        ),
        ("Ça coûte douze euros à Noël, œuf, naïve.", "Ça coûte douze euros à Noël, œuf, naïve."),
        ("Привет", ""),
    ],
)
def test_letters_a_latin_voice_cannot_say_are_left_out(text: str, expected: str) -> None:
    assert normalize(text, "fr") == expected
