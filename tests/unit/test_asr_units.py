"""ASR decisions as tables: format conversion, the speech tracker, the filters, event parsing."""

from __future__ import annotations

import numpy as np
import pytest

from wyoming_superwhisper.asr.engines import (
    AsrResult,
    QualityGate,
    collapse_repetitions,
    collapse_whole_loop,
    hotwords,
    is_hallucination,
    looks_looped,
    word_error_rate,
)
from wyoming_superwhisper.asr.handler import _audio_format, _parse_transcribe
from wyoming_superwhisper.asr.hass import names_from_states
from wyoming_superwhisper.asr.vad import FRAME_SAMPLES, SpeechSpan, SpeechTracker, VadEvent
from wyoming_superwhisper.audio import AudioConverter, AudioFormatError, decode_pcm, to_pcm16
from wyoming_superwhisper.runtime.limits import ProtocolViolation

# --- audio ------------------------------------------------------------------------------


def test_24_bit_samples_decode_with_their_sign() -> None:
    # -1 (ff ff ff), +max (ff ff 7f), -max-1 (00 00 80), 0
    data = bytes([0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F, 0x00, 0x00, 0x80, 0, 0, 0])
    values = decode_pcm(data, 3)
    assert values[0] == pytest.approx(-1 / 8388608)
    assert values[1] == pytest.approx(1.0, abs=1e-6)
    assert values[2] == -1.0
    assert values[3] == 0.0


def test_8_bit_is_unsigned() -> None:
    assert list(decode_pcm(bytes([128, 0, 255]), 1)) == pytest.approx([0.0, -1.0, 127 / 128])


def test_stereo_is_mixed_down_and_partial_frames_are_carried() -> None:
    converter = AudioConverter(16000, 2, 2)
    frame = np.array([1000, 3000], dtype="<i2").tobytes()  # one stereo frame, 4 bytes
    out = converter.convert(frame[:3])  # cut inside the frame
    assert len(out) == 0
    out = converter.convert(frame[3:] + frame)
    assert list(out) == pytest.approx([2000 / 32768, 2000 / 32768])


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampling_keeps_the_duration(rate: int) -> None:
    converter = AudioConverter(rate, 2, 1)
    tone = (np.sin(2 * np.pi * 440 * np.arange(rate) / rate) * 10000).astype("<i2").tobytes()
    step = rate // 50 * 2
    pieces = [converter.convert(tone[i : i + step]) for i in range(0, len(tone), step)]
    total = sum(len(p) for p in pieces) + len(converter.flush())
    assert abs(total - 16000) <= 2


@pytest.mark.parametrize(("rate", "width", "channels"), [(16000, 5, 1), (16000, 2, 0), (100, 2, 1)])
def test_impossible_formats_are_refused(rate: int, width: int, channels: int) -> None:
    with pytest.raises(AudioFormatError):
        AudioConverter(rate, width, channels)


def test_pcm16_round_trip_clips() -> None:
    samples = np.array([0.0, 0.5, 2.0, -2.0], dtype=np.float32)
    back = np.frombuffer(to_pcm16(samples), dtype="<i2")
    assert list(back) == [0, 16384, 32767, -32768]
    pcm = np.arange(-32768, 32768, 7, dtype="<i2").tobytes()
    assert to_pcm16(decode_pcm(pcm, 2)) == pcm  # s16 survives a round trip exactly


# --- speech tracker -----------------------------------------------------------------------

SILENT, SPEECH, SOFT = 0.05, 0.9, 0.4  # SOFT: under the threshold, above threshold - 0.15


def run(tracker: SpeechTracker, probabilities: list[float]) -> list[tuple[int, VadEvent]]:
    events = []
    for index, probability in enumerate(probabilities):
        events.extend((index, event) for event in tracker.update(probability))
    return events


def frames(seconds: float) -> int:
    return round(seconds * 16000 / FRAME_SAMPLES)


def test_tracker_start_pause_endpoint() -> None:
    tracker = SpeechTracker(0.5, pause_s=0.3, endpoint_s=0.8)
    probabilities = [SILENT] * 5 + [SPEECH] * 20 + [SILENT] * frames(1.0)
    events = run(tracker, probabilities)
    assert [e for _, e in events] == [VadEvent.STARTED, VadEvent.PAUSED, VadEvent.ENDPOINT]
    assert events[0][0] == 5 + 2  # after min_speech_frames (3)
    assert tracker.span == SpeechSpan(5 * FRAME_SAMPLES, 25 * FRAME_SAMPLES)
    pause_frame = events[1][0]
    assert (pause_frame + 1 - 25) * FRAME_SAMPLES >= 0.3 * 16000 > (pause_frame - 25) * FRAME_SAMPLES


def test_a_click_is_not_speech() -> None:
    tracker = SpeechTracker(0.5, pause_s=0.3, endpoint_s=0.8)
    assert run(tracker, [SILENT, SPEECH, SPEECH, SILENT] * 10) == []
    assert tracker.span is None


def test_soft_frames_keep_speech_going_and_short_dips_are_one_utterance() -> None:
    tracker = SpeechTracker(0.5, pause_s=0.3)
    probabilities = [SPEECH] * 5 + [SOFT] * 5 + [SILENT] * 3 + [SPEECH] * 5 + [SILENT] * 2
    events = run(tracker, probabilities)
    assert [e for _, e in events] == [VadEvent.STARTED]
    assert tracker.span == SpeechSpan(0, 18 * FRAME_SAMPLES)


def test_speech_after_a_reported_pause_starts_again_and_keeps_the_start() -> None:
    tracker = SpeechTracker(0.5, pause_s=0.3, endpoint_s=2.0)
    probabilities = [SPEECH] * 10 + [SILENT] * frames(0.5) + [SPEECH] * 10 + [SILENT] * frames(0.5)
    kinds = [e for _, e in run(tracker, probabilities)]
    assert kinds == [VadEvent.STARTED, VadEvent.PAUSED, VadEvent.STARTED, VadEvent.PAUSED]
    assert tracker.span is not None and tracker.span.start == 0


def test_the_decode_pause_comes_before_the_verdict_pause_and_both_again_after_speech() -> None:
    """Semantic endpointing: decode at 0.1 s, judge at 0.2 s, each once per pause."""
    tracker = SpeechTracker(0.5, pause_s=0.1, turn_s=0.2, endpoint_s=0.8)
    probabilities = [SPEECH] * 10 + [SILENT] * frames(0.15) + [SPEECH] * 10 + [SILENT] * frames(1.0)
    events = run(tracker, probabilities)
    assert [e for _, e in events] == [
        VadEvent.STARTED,
        VadEvent.PAUSED,  # 0.1 s into a 0.15 s dip: decode
        VadEvent.STARTED,  # no verdict: speech came back first
        VadEvent.PAUSED,
        VadEvent.TURN,
        VadEvent.ENDPOINT,
    ]
    paused, turn = events[3][0], events[4][0]
    last_speech = 10 + frames(0.15) + 10
    assert (paused + 1 - last_speech) * FRAME_SAMPLES >= 0.1 * 16000 > (paused - last_speech) * FRAME_SAMPLES
    assert (turn + 1 - last_speech) * FRAME_SAMPLES >= 0.2 * 16000 > (turn - last_speech) * FRAME_SAMPLES


def test_decode_and_verdict_at_the_same_pause_come_in_that_order() -> None:
    tracker = SpeechTracker(0.5, pause_s=0.2, turn_s=0.2)
    kinds = [e for _, e in run(tracker, [SPEECH] * 10 + [SILENT] * frames(0.5))]
    assert kinds == [VadEvent.STARTED, VadEvent.PAUSED, VadEvent.TURN]


def test_no_speech_no_events() -> None:
    tracker = SpeechTracker(0.5, pause_s=0.3, endpoint_s=0.5)
    assert run(tracker, [SILENT] * 200) == []


# --- filters ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "no_speech", "logprob", "expected"),
    [
        ("Sous-titres réalisés par la communauté d'Amara.org", 0.0, -0.2, True),
        ("Merci d’avoir regardé cette vidéo !", 0.1, -0.3, True),
        (" Thanks for watching!", 0.0, -0.1, True),
        ("...", 0.0, 0.0, True),
        ("Allume la lumière.", 0.9, -1.5, True),  # Whisper's own silence rule
        ("Allume la lumière.", 0.9, -0.3, False),  # confident: keep
        ("Allume la lumière du salon.", 0.1, -0.4, False),
        ("Merci", 0.0, -0.2, False),  # a real "merci" is a command ending
    ],
)
def test_hallucination_filter(text: str, no_speech: float, logprob: float, expected: bool) -> None:
    assert is_hallucination(text, no_speech, logprob) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Baisse le chauffage de de de de de de !", "Baisse le chauffage de !"),
        ("Ma paie, ma paie, ma paie, ma paie", "Ma paie,"),
        ("très très bien", "très très bien"),
        ("Bonjour", "Bonjour"),
        ("", ""),
    ],
)
def test_repetition_loops_are_cut(text: str, expected: str) -> None:
    assert collapse_repetitions(text) == expected


@pytest.mark.parametrize(
    ("text", "looped"),
    [
        ("Bonjour, quelle heure est-il ? Bonjour, quelle heure est-il ?", True),
        ("Turn on the light turn on the light", True),
        ("de de de de", True),
        ("Bonjour, quelle heure est-il ?", False),
        ("oui oui", False),
        ("très très bien", False),
        # whisper-base with a 6 s window on CI's CPU, 2026-12-04: three copies of 5 words
        (
            "Bonjour, quelle heure est-il ? Bonjour, quelle heure est-il ? Bonjour, quelle heure est-il ?",
            True,
        ),
        ("Ferme la porte du garage. Ferme la porte du garage. Ferme la", True),
        ("Allume la lumière de la cuisine et la lumière du salon.", False),
    ],
)
def test_loop_detection_for_the_short_encoder_window(text: str, looped: bool) -> None:
    assert looks_looped(text) is looped


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Bonjour, quelle heure est-il ? Bonjour, quelle heure est-il ? Bonjour, quelle heure est-il ?",
            "Bonjour, quelle heure est-il ?",
        ),
        (
            "Ferme la porte du garage. Ferme la porte du garage. Ferme la porte du garage. Ferme",
            "Ferme la porte du garage.",
        ),
        # twice is left alone: a person may repeat a request once
        ("Ferme la porte. Ferme la porte.", "Ferme la porte. Ferme la porte."),
        (
            "Allume la lumière de la cuisine et la lumière du salon.",
            "Allume la lumière de la cuisine et la lumière du salon.",
        ),
    ],
)
def test_a_whole_command_said_three_times_is_kept_once(text: str, expected: str) -> None:
    assert collapse_whole_loop(text) == expected


@pytest.mark.parametrize(
    ("result", "rejected"),
    [
        (AsrResult("Allume", "fr", "e", avg_logprob=-0.3, compression_ratio=1.1), False),
        (AsrResult("", "fr", "e", avg_logprob=-5.0, compression_ratio=9.0), False),  # silence is an answer
        (AsrResult("la la la", "fr", "e", avg_logprob=-0.3, compression_ratio=3.0), True),
        (AsrResult("xq", "fr", "e", avg_logprob=-2.5, compression_ratio=1.0), True),
    ],
)
def test_quality_gate(result: AsrResult, rejected: bool) -> None:
    assert (QualityGate(-2.0, 2.4)(result) is not None) is rejected


def test_hotwords_names_first_deduplicated_and_capped() -> None:
    assert hotwords(["Kerguelen", "Salon"], ["salon", "volets"]) == "Kerguelen, Salon, volets"
    assert hotwords([], []) is None
    assert hotwords([f"n{i}" for i in range(100)], [], limit=3) == "n0, n1, n2"


def test_names_from_home_assistant_states() -> None:
    states = [
        {"entity_id": "light.salon", "attributes": {"friendly_name": "Lampe Kerguelen"}},
        {"entity_id": "sensor.temp", "attributes": {"friendly_name": "Température"}},
        {"entity_id": "cover.chambre", "attributes": {}},
        "garbage",
    ]
    assert names_from_states(states) == ["Lampe Kerguelen"]
    assert names_from_states({"not": "a list"}) == []


# --- event parsing ---------------------------------------------------------------------------


def test_transcribe_parsing() -> None:
    options = _parse_transcribe(
        {"language": "fr-FR", "name": "whisper-base", "transcript_names": ["Kerguelen", " "]}
    )
    assert options.language == "fr" and options.name == "whisper-base"
    assert options.names == ("Kerguelen",)
    assert _parse_transcribe({}).language is None


@pytest.mark.parametrize(
    "data",
    [{"language": 3}, {"language": "x" * 40}, {"transcript_names": "Kerguelen"}, {"transcript_terms": [1]}],
)
def test_bad_transcribe_values_are_protocol_violations(data: dict[str, object]) -> None:
    with pytest.raises(ProtocolViolation):
        _parse_transcribe(data)


@pytest.mark.parametrize(
    "data",
    [{"rate": "16000"}, {"rate": float("nan")}, {"width": 7}, {"channels": 0}, {"rate": 16000.5}],
)
def test_bad_audio_formats_are_protocol_violations(data: dict[str, object]) -> None:
    with pytest.raises(ProtocolViolation):
        _audio_format(data)


def test_audio_format_defaults() -> None:
    assert _audio_format({}) == (16000, 2, 1)
    assert _audio_format({"rate": 8000, "width": 3, "channels": 2}) == (8000, 3, 2)


@pytest.mark.parametrize(
    ("reference", "hypothesis", "expected"),
    [
        ("Turn on the kitchen lights please.", "Turn on the kitchen lights, please!", 0.0),
        ("Turn on the kitchen lights please.", "Turn on the kitchen light please.", 1 / 6),
        ("Bonjour, quelle heure est-il ?", "Bonjour, Calum et Thil.", 4 / 5),
        ("Il est dix heures.", "Il est dix heures et quart.", 2 / 4),
        ("Ouvre la porte.", "", 1.0),
        ("", "", 0.0),
        ("", "bonjour", 1.0),
        ("L’heure", "l'heure", 0.0),
    ],
)
def test_word_error_rate(reference: str, hypothesis: str, expected: float) -> None:
    assert word_error_rate(reference, hypothesis) == pytest.approx(expected)
