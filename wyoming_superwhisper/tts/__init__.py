"""The TTS service: text in, Piper / espeak-ng / remote audio out, sentence by sentence."""

import warnings

with warnings.catch_warnings():
    # wyoming.audio imports the deprecated ``audioop`` (Python 3.11): the library's
    # warning, not ours; keep it out of logs and tests.
    warnings.filterwarnings("ignore", "'audioop' is deprecated", DeprecationWarning)
    import wyoming.audio  # noqa: F401
