"""``python -m bench --quick``: the benchmark harness runs and writes well-formed results.

A smoke run, not a measurement: it asserts the shape of what the harness
writes (JSON figures as ours/peer/ratio, the markdown table, non-empty PNG
plots), never a speed. Peers are left out (``--no-peers``): building their
venvs takes minutes, so the sections that need one must say they were skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    pytest.importorskip("matplotlib")  # the plots; in the project's `bench` extra
    out = tmp_path_factory.mktemp("bench")
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--no-peers", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return out, run


def results(out: Path) -> dict[str, Any]:
    found = list(out.glob("*.json"))
    assert len(found) == 1, found
    data: dict[str, Any] = json.loads(found[0].read_text("utf-8"))
    return data


def test_quick_run_succeeds(quick_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    _, run = quick_run
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| section | figure |" in run.stdout


def test_json_is_well_formed(quick_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    data = results(quick_run[0])
    assert data["schema"] == "superwhisper-bench/1"
    assert data["quick"] is True
    assert data["machine"]["cpus"] >= 1
    sections = data["sections"]
    assert sections["handle"]["status"] == "ok"
    assert sections["e2e"]["status"] == "ok"
    assert sections["asr"] == {"status": "skipped", "reason": "--no-peers"}
    assert sections["tts"]["status"] == "skipped"
    assert data["figures"], "no figures"
    for row in data["figures"]:
        assert set(row) == {"section", "name", "unit", "ours", "peer", "ratio", "better"}
        assert row["better"] in ("lower", "higher")
        assert row["ours"] is None or isinstance(row["ours"], (int, float))
        if row["ours"] is not None and row["peer"]:
            assert row["ratio"] == pytest.approx(row["ours"] / row["peer"], rel=0.01, abs=0.001)
        else:
            assert row["ratio"] is None
    e2e = {row["name"]: row for row in data["figures"] if row["section"] == "e2e"}
    first_audio = e2e["speech end → first audio p50"]
    assert first_audio["ours"] is not None and first_audio["ours"] > 0
    assert first_audio["peer"] is None  # no peers in this run
    # The French case (espeak-ng fr on our side) and the concurrent-clients case ran and were timed.
    for name in ("French commands: speech end → first audio p50", "2 clients: speech end → first audio p95"):
        assert e2e[name]["ours"] is not None and e2e[name]["ours"] > 0, name
    detail = data["sections"]["e2e"]["detail"]
    assert {row["case"] for row in detail["runs"]["ours"]} == {"en", "fr", "2_clients"}
    assert sum(row["case"] == "2_clients" for row in detail["runs"]["ours"]) == 2
    french = [row for row in detail["runs"]["ours"] if row["case"] == "fr"]
    assert all(row["transcript"] for row in french), french  # French speech was heard, not dropped
    handle = [row for row in data["figures"] if row["section"] == "handle"]
    assert all(row["peer"] is not None and row["peer"] > 0 for row in handle if row["unit"] == "s")


def test_peak_rss_of_our_three_servers(quick_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    data = results(quick_run[0])
    rss = {row["name"]: row for row in data["figures"] if row["section"] == "rss"}
    for service in ("asr", "handle", "tts"):
        row = rss[f"{service} server peak RSS"]
        assert row["unit"] == "MiB"
        assert row["ours"] is not None and row["ours"] > 20  # a Python process with a model loaded


def test_markdown_and_plots_exist(quick_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out = quick_run[0]
    data = results(out)
    (markdown,) = out.glob("*.md")
    text = markdown.read_text("utf-8")
    assert "| section | figure | superwhisper | peer | ratio |" in text
    assert "speech end → first audio p50" in text
    assert {"e2e", "handle", "rss"} <= {name.rsplit("-", 1)[1].removesuffix(".png") for name in data["plots"]}
    for name in data["plots"]:
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 1000
        assert f"]({name})" in text


def test_render_redoes_the_same_table(quick_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    """``--render`` rebuilds figures from the stored measurements alone: the same figures."""
    out = quick_run[0]
    before = results(out)
    (path,) = out.glob("*.json")
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--render", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    after = results(out)
    assert after["figures"] == before["figures"]
    assert after["plots"] == before["plots"]


# --- the harness's pure parts (no models) ------------------------------------------------

STT_REPORT = """wyoming-bench 2026.10.0 (stt)
servers: ['127.0.0.1:37773', '127.0.0.1:41491']
==============================================================================
Summary (lower is better)
==============================================================================

[non_streaming]
  server                              ok      WER      CER     SAR  Total_mean   TTFT_p95  RTF_mean
  127.0.0.1:37773 (superwhisper-asr)   8    13.6%     5.3%   25.0%       263.4      286.7      0.10
  127.0.0.1:41491 (faster-whisper)     8    20.0%     5.3%   25.0%       740.3        n/a      0.30

[streaming]
  server                              ok      WER      CER     SAR  Total_mean   TTFT_p95  RTF_mean
  127.0.0.1:37773 (superwhisper-asr)   8    13.6%     5.3%   25.0%       264.5      283.3      0.11
"""


def test_wyoming_bench_summary_becomes_figures() -> None:
    from bench.harness import parse_wyoming_bench

    rows = {row["name"]: row for row in parse_wyoming_bench({"stt": STT_REPORT})["stt"]}
    total = rows["mean total, non-streaming (independent client)"]
    assert (total["ours"], total["peer"]) == (pytest.approx(0.2634), pytest.approx(0.7403))
    assert total["unit"] == "s"
    wer = rows["WER, non-streaming (independent client)"]
    assert (wer["ours"], wer["peer"]) == (pytest.approx(0.136), pytest.approx(0.2))
    assert parse_wyoming_bench({"stt": "wyoming-bench crashed"}) == {}


@pytest.mark.parametrize(
    ("cmdline", "label"),
    [
        ("/x/.venv-peer-asr/bin/python -m wyoming_faster_whisper --uri tcp://127.0.0.1:1", "asr/peer"),
        ("/x/.venv-peer-tts/bin/python -m wyoming_piper --voice joe", "tts/peer"),
        ("/w/.venv/bin/python /w/bench/asr_bench.py --serve-ours --port 5", "asr/ours"),
        ("/w/.venv/bin/python -m wyoming_superwhisper handle --uri tcp://127.0.0.1:2", "handle/ours"),
        ("/w/.venv/bin/python -m wyoming_superwhisper tts --uri tcp://127.0.0.1:3", "tts/ours"),
        ("/w/.venv/bin/python -m pytest tests", None),
    ],
)
def test_server_processes_are_recognised(cmdline: str, label: str | None) -> None:
    from bench.harness import classify

    assert classify(cmdline) == label


def test_word_error_rate() -> None:
    from bench.harness import wer

    assert wer(["Allume la lumière du salon."], ["allume la lumière du salon"]) == 0.0
    assert wer(["Ferme les volets"], ["Ferme des volets de"]) == pytest.approx(2 / 3)
