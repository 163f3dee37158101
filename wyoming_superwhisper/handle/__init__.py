"""The LLM "handle" service: transcripts in, spoken-style answers out (Wyoming and ``/v1``)."""
