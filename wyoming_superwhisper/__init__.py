"""wyoming-superwhisper: French-first Wyoming ASR, handle (LLM) and TTS servers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wyoming-superwhisper")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
