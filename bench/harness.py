"""``python -m bench``: every benchmark in one run, ours vs peer, as JSON, markdown and PNG plots.

Sections (``--only``):

* ``asr``: ``bench/asr_bench.py`` — superwhisper ASR vs wyoming-faster-whisper
  3.8, end of speech → transcript (audio-stop and endpointing modes), WER.
* ``tts``: ``bench/tts_bench.py`` — superwhisper TTS vs wyoming-piper 2.5, time
  to first audio, total, real-time factor, 1 and 4 clients.
* ``handle``: ``bench/handle_bench.py`` — our handle server vs raw
  llama-cpp-python in process (the floor: there is no peer LLM server).
* ``e2e``: ``bench/e2e_bench.py`` — audio-stop → first audio byte through our
  three servers streaming vs the peers chained without streaming.

Every figure is written as ``ours``, ``peer`` and ``ratio`` (ours / peer), with
which way is better. Peak RSS per server process comes from ``VmHWM`` in
``/proc/<pid>/status``, sampled for every process this run starts.

Peers live in their own venvs (``bench/peers.py``), built here when missing
(minutes). ``--quick`` is the test suite's smoke run: tiny counts, and with
``--no-peers`` (or when a peer venv is missing) the sections that need a peer
are skipped and the others run ours-only.

Run the full benchmark under the heavy-work lock::

    flock /tmp/sw-heavy.lock .venv/bin/python -m bench
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import re
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import peers  # noqa: E402

_LOGGER = logging.getLogger(__name__)

SECTIONS = ("asr", "tts", "handle", "e2e")
SCHEMA = "superwhisper-bench/1"


# --- peak RSS ------------------------------------------------------------------------------


def classify(cmdline: str) -> str | None:
    """Which server a process is, from its command line; None for anything else."""
    if "wyoming_faster_whisper" in cmdline:
        return "asr/peer"
    if "wyoming_piper" in cmdline:
        return "tts/peer"
    if "asr_bench.py" in cmdline and "--serve-ours" in cmdline:
        return "asr/ours"
    match = re.search(r"wyoming_superwhisper (asr|handle|tts)\b", cmdline)
    return f"{match.group(1)}/ours" if match else None


def read_hwm_kib(pid: int) -> int | None:
    """``VmHWM`` (peak resident set) of a process in KiB, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def descendants(root: int) -> list[int]:
    """Every live process below ``root``, from ``/proc/*/stat`` parent links."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@dataclass
class RssSampler:
    """Samples ``VmHWM`` of every server process below this one; keeps the peak per server.

    ``VmHWM`` is the kernel's own high-water mark, so sampling only has to catch
    each process once before it exits, not its peak moment.
    """

    interval_s: float = 0.2
    peaks_kib: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        for pid in descendants(os.getpid()):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            label = classify(cmdline)
            hwm = read_hwm_kib(pid) if label else None
            if label and hwm:
                self.peaks_kib[label] = max(self.peaks_kib.get(label, 0), hwm)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# --- figures -------------------------------------------------------------------------------


def ratio(ours: float | None, peer: float | None) -> float | None:
    if ours is None or peer is None or not peer:
        return None
    return round(ours / peer, 3)


def figure(
    section: str, name: str, unit: str, ours: float | None, peer: float | None, better: str = "lower"
) -> dict[str, Any]:
    """One row of the results table: ours, peer, ratio ours/peer, and which way is better."""
    return {
        "section": section,
        "name": name,
        "unit": unit,
        "ours": None if ours is None else round(ours, 4),
        "peer": None if peer is None else round(peer, 4),
        "ratio": ratio(ours, peer),
        "better": better,
    }


def words(text: str) -> list[str]:
    return re.sub(r"[^\w' ]+", " ", text.lower()).split()


def wer(references: list[str], hypotheses: list[str]) -> float:
    """Word error rate over a corpus: edit distance / reference words (punctuation, case ignored)."""
    errors = total = 0
    for reference, hypothesis in zip(references, hypotheses, strict=False):
        ref, hyp = words(reference), words(hypothesis)
        row = list(range(len(hyp) + 1))
        for i, ref_word in enumerate(ref, 1):
            previous, row[0] = row[0], i
            for j, hyp_word in enumerate(hyp, 1):
                previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ref_word != hyp_word))
        errors += row[-1]
        total += len(ref)
    return errors / total if total else 0.0


# --- sections ------------------------------------------------------------------------------


@dataclass
class Options:
    quick: bool
    use_peers: bool
    logs: Path


def section_asr(options: Options) -> dict[str, Any]:
    from bench import asr_bench

    peer = peers.PEERS["asr"]
    asr_bench.PEER_VENV = peer.venv
    if options.quick:
        asr_bench.COMMANDS = [asr_bench.COMMANDS[0], asr_bench.COMMANDS[4]]
    args = argparse.Namespace(rounds=1 if options.quick else 2, silence=0.8, cpu_threads=2)
    data = asyncio.run(asr_bench.run(args))
    return asr_entry(data)


def asr_entry(data: dict[str, Any]) -> dict[str, Any]:
    """The asr section's figures and plot data, from what its benchmark returned."""
    figures = []
    distributions: dict[str, dict[str, list[float]]] = {}
    for mode, entry in data["modes"].items():
        ours_name, peer_name = list(entry["latencies"])
        for stat in ("p50_s", "p95_s"):
            figures.append(
                figure(
                    "asr",
                    f"{mode}: end of speech → transcript {stat[:3]}",
                    "s",
                    entry["ours"][stat],
                    entry["peer"][stat],
                )
            )
        distributions[mode] = {"ours": entry["latencies"][ours_name], "peer": entry["latencies"][peer_name]}
        figures.append(
            figure(
                "asr",
                f"{mode}: WER ({len(data['commands'])} fr/en commands)",
                "",
                wer(data["commands"], entry["texts"][ours_name]),
                wer(data["commands"], entry["texts"][peer_name]),
            )
        )
    fast = data["fast"]
    for options, label in (("raw_default_options", "default"), ("raw_same_options", "same")):
        figures.append(
            figure(
                "asr",
                f"as fast as possible: total p50; peer = raw WhisperModel.transcribe, {label} decode options",
                "s",
                fast["ours_total"]["p50_s"],
                fast[options]["p50_s"],
            )
        )
    return {"figures": figures, "distributions": distributions, "peer": data["peer"], "detail": data}


def section_tts(options: Options) -> dict[str, Any]:
    from bench import tts_bench

    args = argparse.Namespace(
        peer_python=str(peers.PEERS["tts"].python),
        repeats=2 if options.quick else 10,
        token_interval=0.0,
        logs=str(options.logs / "tts"),
    )
    data = asyncio.run(tts_bench.bench(args))
    return tts_entry(data)


def tts_entry(data: dict[str, Any]) -> dict[str, Any]:
    """The tts section's figures and plot data, from what its benchmark returned."""
    ours, peer = data["servers"]["superwhisper"], data["servers"]["wyoming-piper"]
    figures = []
    bars: dict[str, dict[str, dict[str, float]]] = {}
    for key in ours:
        clients4 = key.endswith("4_clients")
        stat = "p95" if clients4 else "p50"
        for metric, label in (("first_audio_s", "first audio"), ("total_s", "total")):
            figures.append(
                figure("tts", f"{key}: {label} {stat}", "s", ours[key][metric][stat], peer[key][metric][stat])
            )
        if not clients4:
            figures.append(figure("tts", f"{key}: real-time factor p50", "", ours[key]["rtf"]["p50"],
                                  peer[key]["rtf"]["p50"]))  # fmt: skip
        text_name = key.split("/")[0]
        if key.endswith("/synthesize") and text_name in data.get("raw_piper", {}):
            raw = data["raw_piper"][text_name]["total_s"]["p50"]
            name = f"{key}: total p50; peer = raw PiperVoice.synthesize"
            figures.append(figure("tts", name, "s", ours[key]["total_s"]["p50"], raw))
        bars[key] = {
            "ours": {"p50": ours[key]["first_audio_s"]["p50"], "p95": ours[key]["first_audio_s"]["p95"]},
            "peer": {"p50": peer[key]["first_audio_s"]["p50"], "p95": peer[key]["first_audio_s"]["p95"]},
        }
    version = peers.PEERS["tts"].version()
    return {"figures": figures, "bars": bars, "peer": f"wyoming-piper {version}", "detail": data}


def section_handle(options: Options) -> dict[str, Any]:
    from bench import handle_bench

    args = argparse.Namespace(runs=1 if options.quick else 7, max_tokens=16 if options.quick else 64)
    data = handle_bench.run(args)
    return handle_entry(data)


def handle_entry(data: dict[str, Any]) -> dict[str, Any]:
    """The handle section's figures and plot data, from what its benchmark returned."""
    raw = data["raw"]
    served_name = next(name for name in data["server"] if name != "holdback_0")
    served = data["server"][served_name]
    figures = [
        figure("handle", f"time to first chunk ({served_name})", "s", served["median"]["ttft_s"],
               raw["median"]["ttft_s"]),
        figure("handle", "time to first chunk (holdback_0)", "s",
               data["server"]["holdback_0"]["median"]["ttft_s"], raw["median"]["ttft_s"]),
        # tokens/s over the streamed span: with holdback, an answer shorter than the holdback
        # arrives in one chunk and has no span, so the unheld server is the one to compare
        figure("handle", "tokens/s (holdback_0)", "tok/s",
               data["server"]["holdback_0"]["median"]["tokens_per_s"] or None,
               raw["median"]["tokens_per_s"] or None, better="higher"),
        figure("handle", "answer tokens (median)", "", served["median"]["tokens"], raw["median"]["tokens"]),
    ]  # fmt: skip
    distributions = {
        "time to first chunk": {
            "ours": [row["ttft_s"] for row in served["runs"]],
            "peer": [row["ttft_s"] for row in raw["runs"]],
        }
    }
    return {
        "figures": figures,
        "distributions": distributions,
        "peer": "raw llama-cpp-python in process (no peer server)",
        "detail": data,
    }


def section_e2e(options: Options, pids: dict[str, int]) -> dict[str, Any]:
    from bench import e2e_bench

    asr_peer, tts_peer = peers.PEERS["asr"], peers.PEERS["tts"]
    with_peers = options.use_peers and asr_peer.installed() and tts_peer.installed()
    args = argparse.Namespace(
        rounds=1 if options.quick else 3,
        commands=1 if options.quick else len(e2e_bench.COMMANDS),
        french=1 if options.quick else len(e2e_bench.FRENCH_COMMANDS),
        clients=2 if options.quick else 4,
        tail=0.8,
        cpu_threads=2,
        peer_asr=asr_peer.python if with_peers else None,
        peer_tts=tts_peer.python if with_peers else None,
        pids=pids,
        wyoming_bench=tts_peer.tool("wyoming-bench") if with_peers and not options.quick else None,
    )
    data = asyncio.run(e2e_bench.run(args))
    return e2e_entry(data)


def e2e_entry(data: dict[str, Any]) -> dict[str, Any]:
    """The e2e section's figures and plot data, from what its benchmark returned."""
    figures = []
    distributions = {}
    for stage, entry in data["stages"].items():
        ours = entry["ours"].get("p50_s")
        peer = entry.get("peer", {}).get("p50_s")
        label = stage.replace("_to_", " → ").replace("_", " ")
        figures.append(figure("e2e", f"{label} p50", "s", ours, peer))
        distributions[stage] = entry["values"]
    first_audio = data["stages"]["speech_end_to_first_audio"]
    tail = data["tail_s"]
    figures.append(
        figure(
            "e2e",
            f"end of speech in the audio → first audio p50 (incl. the {tail:g} s silence before audio-stop)",
            "s",
            None if first_audio["ours"].get("p50_s") is None else first_audio["ours"]["p50_s"] + tail,
            None if first_audio.get("peer", {}).get("p50_s") is None else first_audio["peer"]["p50_s"] + tail,
        )
    )
    for case, stages in data.get("cases", {}).items():
        name = "French commands" if case == "fr" else case.replace("_", " ")
        for stage, entry in stages.items():
            label = stage.replace("_to_", " → ").replace("_", " ")
            for quantile in ("p50", "p95"):
                ours = entry["ours"].get(f"{quantile}_s")
                peer = entry.get("peer", {}).get(f"{quantile}_s")
                figures.append(figure("e2e", f"{name}: {label} {quantile}", "s", ours, peer))
        distributions[f"{case}: speech_end_to_first_audio"] = stages["speech_end_to_first_audio"]["values"]
    for rows in parse_wyoming_bench(data.get("wyoming_bench") or {}).values():
        figures.extend(rows)
    return {
        "figures": figures,
        "distributions": distributions,
        "peer": data["peer"],
        "title": "e2e: superwhisper streaming all the way vs the peers chained without streaming",
        "detail": data,
    }


def parse_wyoming_bench(reports: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """Figures from wyoming-bench's summary tables (ours is the first server it was given).

    STT: mean total time and WER, non-streaming; TTS: mean time to first audio and
    mean total, non-streaming. Rows it did not print stay out.
    """
    wanted = {
        "stt": (("Total_mean", "mean total", "ms"), ("WER", "WER", "%")),
        "tts": (("TTFT_mean", "mean first audio", "ms"), ("Total_mean", "mean total", "ms")),
    }
    out: dict[str, list[dict[str, Any]]] = {}
    for name, report in reports.items():
        servers = re.search(r"^servers:\s+\[(.*)\]$", report, re.MULTILINE)
        block = re.search(r"Summary.*?\[non_streaming\]\n(.*?)(?:\n\n|\Z)", report, re.DOTALL)
        if name not in wanted or not servers or not block:
            continue
        order = [item.strip(" '\"") for item in servers.group(1).split(",")]
        header, *lines = block.group(1).splitlines()
        columns = header.split()[1:]  # after "server"
        values: dict[str, dict[str, str]] = {}
        for line in lines:
            address, _, rest = line.strip().partition(" ")
            cells = rest.split(")", 1)[-1].split()
            values[address] = dict(zip(columns, cells, strict=False))
        if len(order) < 2 or order[0] not in values or order[1] not in values:
            continue
        rows = []
        for column, label, unit in wanted[name]:
            ours, peer = values[order[0]].get(column, ""), values[order[1]].get(column, "")
            try:
                pair = [float(v.rstrip("%")) / (1000 if unit == "ms" else 100) for v in (ours, peer)]
            except ValueError:
                continue
            rows.append(
                figure(f"wyoming-bench {name}", f"{label}, non-streaming (independent client)",
                       "s" if unit == "ms" else "", pair[0], pair[1])
            )  # fmt: skip
        out[name] = rows
    return out


# --- output --------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().splitlines()[0].split()[1])
        memory = f"{kib / 1048576:.0f} GiB"
    return {
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "memory": memory,
        "gpu": "none" if not Path("/dev/nvidia0").exists() else "present",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_at_start": list(os.getloadavg()),
    }


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "MiB":
        return f"{value:.0f} MiB"
    return f"{value:.2f}" + (f" {unit}" if unit else "")


def markdown(results: dict[str, Any], stem: str) -> str:
    m = results["machine"]
    lines = [
        f"# Benchmarks {results['date']} on {m['host']}",
        "",
        f"{m['cpus']} CPUs, {m['memory']} RAM, GPU: {m['gpu']}; {m['platform']}; "
        f"load at start {m['load_at_start'][0]:.2f}. Mode: {'quick' if results['quick'] else 'full'}. "
        "Ratio = ours / peer (lower is better unless marked ↑).",
        "",
        "| section | figure | superwhisper | peer | ratio |",
        "|---|---|---|---|---|",
    ]
    for row in results["figures"]:
        arrow = " ↑" if row["better"] == "higher" else ""
        ratio_text = "—" if row["ratio"] is None else f"{row['ratio']:.2f}{arrow}"
        lines.append(
            f"| {row['section']} | {row['name']} | {fmt(row['ours'], row['unit'])} | "
            f"{fmt(row['peer'], row['unit'])} | {ratio_text} |"
        )
    lines += ["", "Peers: " + "; ".join(f"{k}: {v}" for k, v in results["peers"].items() if v), ""]
    for name, entry in results["sections"].items():
        if entry["status"] != "ok":
            lines.append(f"- {name}: {entry['status']} — {entry.get('reason', '')}")
    independent = results["sections"].get("e2e", {}).get("detail", {}).get("wyoming_bench")
    if independent:
        lines += ["", "Independent client (`wyoming-bench`, ours first, then the peer):", ""]
        for name, report in independent.items():
            lines += [f"<details><summary>wyoming-bench {name}</summary>", "", "```", report.strip(), "```",
                      "", "</details>", ""]  # fmt: skip
    lines.append("")
    for plot in results["plots"]:
        lines.append(f"![{plot}]({plot})")
    return "\n".join(lines) + "\n"


def plots(results: dict[str, Any], out: Path, stem: str) -> list[str]:
    """One small PNG per section with data: per-stage latency distributions, ours vs peer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors = {"ours": "#1f77b4", "peer": "#ff7f0e"}
    for name, entry in results["sections"].items():
        if entry["status"] != "ok":
            continue
        distributions = entry.get("distributions")
        bars = entry.get("bars")
        rss = name == "rss"
        if not distributions and not bars and not rss:
            continue
        fig, ax = plt.subplots(figsize=(8, 3.6), dpi=80)
        if distributions:
            labels = list(distributions)
            for offset, side in ((-0.2, "ours"), (0.2, "peer")):
                data = [distributions[label].get(side) or [] for label in labels]
                positions = [i + offset for i, values in enumerate(data) if values]
                data = [values for values in data if values]
                if not data:
                    continue
                box = ax.boxplot(
                    data, positions=positions, widths=0.35, patch_artist=True, medianprops={"color": "black"}
                )
                for patch in box["boxes"]:
                    patch.set_facecolor(colors[side])
                    patch.set_alpha(0.6)
                ax.plot([], [], color=colors[side], linewidth=8, alpha=0.6, label=side)
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(
                [label.replace("_", " ").replace(" to ", " →\n") for label in labels], fontsize=7
            )
            ax.set_ylabel("seconds")
        elif bars:
            labels = list(bars)
            for offset, side in ((-0.2, "ours"), (0.2, "peer")):
                p50 = [bars[label][side]["p50"] for label in labels]
                p95 = [bars[label][side]["p95"] for label in labels]
                ax.bar([i + offset for i in range(len(labels))], p50, width=0.4, color=colors[side],
                       alpha=0.7, label=f"{side} p50 (whisker p95)",
                       yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p95, strict=True)]])  # fmt: skip
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels([label.replace("/", "\n") for label in labels], fontsize=7)
            ax.set_ylabel("first audio, seconds")
        else:
            labels = list(entry["peaks_mib"])
            for offset, side in ((-0.2, "ours"), (0.2, "peer")):
                values = [entry["peaks_mib"][label].get(side) or 0 for label in labels]
                ax.bar([i + offset for i in range(len(labels))], values, width=0.4, color=colors[side],
                       alpha=0.7, label=side)  # fmt: skip
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels)
            ax.set_ylabel("peak RSS, MiB")
        ax.set_title(entry.get("title") or f"{name}: ours vs {entry.get('peer') or 'peer'}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = out / f"{stem}-{name}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path.name)
    return written


# --- main ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        raise SystemExit(
            f"unknown section(s): {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}"
        )
    use_peers = not args.no_peers
    if use_peers and not args.quick:
        needed = {"asr": ("asr",), "tts": ("tts",), "e2e": ("asr", "tts")}
        for key in sorted({peer for name in only for peer in needed.get(name, ())}):
            peers.ensure(peers.PEERS[key])
    options = Options(
        quick=args.quick, use_peers=use_peers, logs=Path(tempfile.mkdtemp(prefix="bench-logs-"))
    )
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "machine": machine(),
        "peers": {
            key: (f"{p.package} {p.version()}" if p.installed() else None) for key, p in peers.PEERS.items()
        },
        "sections": {},
        "figures": [],
    }
    pids: dict[str, int] = {}
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "asr": lambda: section_asr(options),
        "tts": lambda: section_tts(options),
        "handle": lambda: section_handle(options),
        "e2e": lambda: section_e2e(options, pids),
    }
    with RssSampler() as sampler:
        for name in SECTIONS:
            if name not in only:
                continue
            needs = {"asr": "asr", "tts": "tts"}.get(name)
            if needs and not (use_peers and peers.PEERS[needs].installed()):
                reason = "--no-peers" if not use_peers else f"no {needs} peer venv (python -m bench.peers)"
                results["sections"][name] = {"status": "skipped", "reason": reason}
                _LOGGER.warning("%s skipped: no peer venv (python -m bench.peers builds it)", name)
                continue
            started = time.monotonic()
            _LOGGER.info("section %s", name)
            try:
                entry = runners[name]()
            except Exception as error:  # a broken section must not lose the others' figures
                _LOGGER.exception("section %s failed", name)
                results["sections"][name] = {
                    "status": "error",
                    "reason": f"{type(error).__name__}: {error}",
                    "traceback": traceback.format_exc(),
                }
                continue
            entry["status"] = "ok"
            entry["seconds"] = round(time.monotonic() - started, 1)
            results["sections"][name] = entry
            results["figures"].extend(entry["figures"])
        sampler.sample()
    peaks = {label: round(kib / 1024, 1) for label, kib in sorted(sampler.peaks_kib.items())}
    by_service: dict[str, dict[str, float | None]] = {}
    for label, mib in peaks.items():
        service, side = label.split("/")
        by_service.setdefault(service, {"ours": None, "peer": None})[side] = mib
    results["figures"].extend(rss_figures(by_service))
    results["sections"]["rss"] = {
        "status": "ok" if by_service else "skipped",
        "reason": "" if by_service else "no server process was seen",
        "peaks_mib": by_service,
        "peer": "peers",
        "title": "peak RSS per server process (VmHWM): superwhisper vs peers",
        "what": "VmHWM of each server process (max over the processes of one kind)",
    }
    return results


def rss_figures(by_service: dict[str, dict[str, float | None]]) -> list[dict[str, Any]]:
    return [
        figure("rss", f"{service} server peak RSS", "MiB", sides["ours"], sides["peer"])
        for service, sides in by_service.items()
    ]


ENTRIES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "asr": asr_entry,
    "tts": tts_entry,
    "handle": handle_entry,
    "e2e": e2e_entry,
}


def render(results: dict[str, Any]) -> dict[str, Any]:
    """Figures and plot data again from the stored measurements (``detail``), measuring nothing.

    How a change to what the table shows reaches results already taken.
    """
    figures: list[dict[str, Any]] = []
    for name, entry in results["sections"].items():
        if name in ENTRIES and entry.get("status") == "ok":
            fresh = ENTRIES[name](entry["detail"])
            entry.update(fresh)
            figures.extend(fresh["figures"])
    figures.extend(rss_figures(results["sections"].get("rss", {}).get("peaks_mib", {})))
    results["figures"] = figures
    return results


def stem_for(results: dict[str, Any]) -> str:
    """``<date>-<host>``, plus the sections when a run did not run them all."""
    stem = f"{results['date'][:10]}-{results['machine']['host']}"
    ran = [name for name in SECTIONS if name in results["sections"]]
    return stem if len(ran) == len(SECTIONS) else f"{stem}-{'-'.join(ran)}"


def write(results: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = stem_for(results)
    results["plots"] = plots(results, out, stem)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md"}
    paths["json"].write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", "utf-8")
    paths["md"].write_text(markdown(results, stem), "utf-8")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny counts (the test suite's)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated: asr,tts,handle,e2e")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results directory")
    parser.add_argument("--no-peers", action="store_true", help="ours only; sections that need a peer skip")
    parser.add_argument(
        "--render", type=Path, default=None, help="redo the table and plots of a results JSON (no measuring)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.render:
        results = render(json.loads(args.render.read_text("utf-8")))
        paths = write(results, args.render.parent)
    else:
        results = run(args)
        paths = write(results, args.out)
    sys.stdout.write(paths["md"].read_text("utf-8"))
    sys.stdout.write(
        f"\nwritten: {', '.join(str(p) for p in paths.values())} and {len(results['plots'])} PNGs\n"
    )
    failed = [name for name, entry in results["sections"].items() if entry["status"] == "error"]
    return 1 if failed else 0
