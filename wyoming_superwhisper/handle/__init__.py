"""The LLM "handle" service: transcripts in, spoken-style answers out (Wyoming and ``/v1``)."""

import warnings

with warnings.catch_warnings():
    # wyoming.info imports wyoming.audio, which imports the deprecated ``audioop``
    # (Python 3.11): the library's warning, not ours; keep it out of logs and tests.
    warnings.filterwarnings("ignore", "'audioop' is deprecated", DeprecationWarning)
    import wyoming.audio  # noqa: F401
