"""The peer servers' virtual environments: one per peer, built on demand, never ours.

Each peer pins its own dependencies (wyoming-faster-whisper wants torch for
its VAD; wyoming-piper its own piper-tts), so each lives in its own venv under
``bench/`` — hidden directories, which the GPU-guard audit does not scan and
which hold a ``.gitignore`` of ``*`` so that nothing in them is ever committed.

    .venv/bin/python -m bench.peers            # build both if missing
    .venv/bin/python -m bench.peers --check    # only say what is there
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_LOGGER = logging.getLogger(__name__)

BENCH = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Peer:
    """A peer server: where its venv lives and what goes into it."""

    key: str
    """``asr`` or ``tts``: the service it is compared with."""
    package: str
    """The distribution whose version the results name."""
    requirements: tuple[str, ...]
    venv: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def installed(self) -> bool:
        return self.python.exists() and self.version() is not None

    def version(self) -> str | None:
        """The installed peer's version, or None when the venv is missing or broken."""
        if not self.python.exists():
            return None
        run = subprocess.run(
            [str(self.python), "-c", f"import importlib.metadata as m; print(m.version({self.package!r}))"],
            capture_output=True,
            text=True,
            check=False,
        )
        return run.stdout.strip() or None if run.returncode == 0 else None

    def tool(self, name: str) -> Path | None:
        """A console script of this venv (e.g. ``wyoming-bench``), if installed."""
        path = self.venv / "bin" / name
        return path if path.exists() else None


PEERS = {
    "asr": Peer(
        "asr",
        "wyoming-faster-whisper",
        ("wyoming-faster-whisper>=3.8,<3.9", "torch==2.13.0", "wyoming-bench"),
        BENCH / ".venv-peer-asr",
    ),
    "tts": Peer(
        "tts",
        "wyoming-piper",
        ("wyoming-piper>=2.5,<2.6", "wyoming-bench"),
        BENCH / ".venv-peer-tts",
    ),
}


def base_python() -> str:
    """The interpreter the peer venvs are made from: python3.11, like the peers' own CI."""
    found = shutil.which("python3.11")
    if found is None:
        raise RuntimeError("python3.11 is needed to build the peer venvs")
    return found


def ensure(peer: Peer) -> Peer:
    """Build the peer's venv if it is missing or broken (this takes minutes: torch is large)."""
    if peer.installed():
        return peer
    _LOGGER.info("building %s in %s (minutes)", peer.package, peer.venv)
    subprocess.run([base_python(), "-m", "venv", "--clear", str(peer.venv)], check=True)
    (peer.venv / ".gitignore").write_text("*\n", "utf-8")
    subprocess.run([str(peer.python), "-m", "pip", "install", "--quiet", *peer.requirements], check=True)
    if not peer.installed():
        raise RuntimeError(f"{peer.package} did not install into {peer.venv}")
    return peer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="report only, build nothing")
    parser.add_argument("--only", default="asr,tts", help="comma-separated peers (asr, tts)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for key in args.only.split(","):
        peer = PEERS[key.strip()]
        if not args.check:
            ensure(peer)
        _LOGGER.info("%s: %s %s (%s)", key, peer.package, peer.version() or "missing", peer.venv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
