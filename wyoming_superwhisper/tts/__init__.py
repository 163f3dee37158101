"""The TTS service: text in, Piper / espeak-ng / remote audio out, sentence by sentence."""
