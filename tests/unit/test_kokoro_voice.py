"""The packaged French voice pack: intact, with its licence, readable without torch."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest

from wyoming_superwhisper.runtime.fallback import EngineError
from wyoming_superwhisper.tts.kokoro import VOICE_PACK_SHAPE, packaged_voice, read_voice_pack

FF_SIWIS_SHA256 = "8073bf2d2c4b9543a90f2f0fd2144de4ed157e2d4b79ddeb0d5123066171fbc9"


def test_ff_siwis_ships_unchanged_with_its_licence_and_provenance() -> None:
    path = packaged_voice("ff_siwis")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == FF_SIWIS_SHA256
    folder = path.parent
    assert "Apache License" in (folder / "LICENSE-Kokoro-FastAPI").read_text("utf-8")
    provenance = (folder / "README.md").read_text("utf-8")
    assert "hexgrad" in provenance and "26eec068d8ce" in provenance and FF_SIWIS_SHA256 in provenance


def test_the_voice_pack_reads_as_510_style_vectors() -> None:
    style = read_voice_pack(packaged_voice("ff_siwis"))
    assert style.shape == VOICE_PACK_SHAPE and style.dtype == np.float32
    assert np.isfinite(style).all() and 0.01 < float(np.abs(style).mean()) < 10
    assert not np.allclose(style[0], style[-1])  # one vector per phoneme count, not a copy


def test_a_file_that_is_not_a_voice_pack_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("bad/data/0", b"\0" * 100)
    with pytest.raises(EngineError, match="expected 522240"):
        read_voice_pack(bad)
    (tmp_path / "text.pt").write_text("not a zip")
    with pytest.raises(EngineError, match="cannot read voice pack"):
        read_voice_pack(tmp_path / "text.pt")
