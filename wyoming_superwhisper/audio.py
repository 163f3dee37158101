"""PCM in any client format → mono float32 at the rate a model wants (16 kHz by default).

Shared by the ASR server (streaming conversion of what satellites send) and the
pipeline client (WAV files and TTS answers); one decoder for 8/16/24/32-bit.

Whisper and Silero both want 16 kHz mono. Satellites send 16 kHz s16 mono, but
a browser or a USB microphone may send 44.1/48 kHz, stereo, or 24-bit samples.
Conversion is streaming (a chunk may end in the middle of a sample frame, the
resampler keeps its filter state), so no chunk boundary adds a click, and no
audio is written to disk.
"""

from __future__ import annotations

import numpy as np
import soxr

TARGET_RATE = 16000
"""What the VAD and Whisper consume."""

SUPPORTED_WIDTHS = (1, 2, 3, 4)
"""Bytes per sample: unsigned 8-bit, signed 16/24/32-bit little-endian (the WAV conventions)."""


class AudioFormatError(ValueError):
    """A rate, width or channel count no converter can honour."""


class AudioConverter:
    """Stateful converter for one stream of one format."""

    def __init__(self, rate: int, width: int, channels: int, target_rate: int = TARGET_RATE) -> None:
        if width not in SUPPORTED_WIDTHS:
            raise AudioFormatError(f"sample width {width} bytes is not supported (1, 2, 3 or 4)")
        if not 1 <= channels <= 32:
            raise AudioFormatError(f"{channels} channels is not supported (1 to 32)")
        if not 1000 <= rate <= 384000:
            raise AudioFormatError(f"sample rate {rate} Hz is not supported (1000 to 384000)")
        self.rate = rate
        self.width = width
        self.channels = channels
        self._frame_bytes = width * channels
        self._carry = b""
        self._resampler = (
            None if rate == target_rate else soxr.ResampleStream(rate, target_rate, 1, dtype="float32")
        )

    def matches(self, rate: int, width: int, channels: int) -> bool:
        return (rate, width, channels) == (self.rate, self.width, self.channels)

    def convert(self, data: bytes) -> np.ndarray:
        """Raw little-endian PCM → float32 mono samples at the target rate, in [-1, 1]."""
        data = self._carry + data
        usable = len(data) - len(data) % self._frame_bytes
        self._carry = data[usable:]
        samples = decode_pcm(data[:usable], self.width)
        if self.channels > 1:
            samples = samples.reshape(-1, self.channels).mean(axis=1, dtype=np.float32)
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples, last=False)
        return np.ascontiguousarray(samples, dtype=np.float32)

    def flush(self) -> np.ndarray:
        """The resampler's tail at the end of the stream."""
        self._carry = b""
        if self._resampler is None:
            return np.zeros(0, dtype=np.float32)
        return np.ascontiguousarray(
            self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True), dtype=np.float32
        )


def decode_pcm(data: bytes, width: int) -> np.ndarray:
    """Interleaved PCM bytes → float32 in [-1, 1] (channels still interleaved)."""
    if width == 2:
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    if width == 1:
        return (np.frombuffer(data, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 4:
        return (np.frombuffer(data, dtype="<i4").astype(np.float64) / 2147483648.0).astype(np.float32)
    # 24-bit: three bytes per sample, little-endian, signed; widen to int32 by hand.
    raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
    value = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
    value = np.where(value & 0x800000, value - 0x1000000, value)
    return value.astype(np.float32) / 8388608.0


def to_pcm16(samples: np.ndarray) -> bytes:
    """float32 [-1, 1] → s16 little-endian bytes; the exact inverse of ``decode_pcm`` for s16."""
    clipped = np.clip(samples, -1.0, 1.0 - 1.0 / 32768.0)
    return np.round(clipped * 32768.0).astype("<i2").tobytes()


def convert_pcm(raw: bytes, rate: int, width: int, channels: int, target_rate: int = TARGET_RATE) -> bytes:
    """A whole buffer of PCM in any supported format → mono s16 at ``target_rate``."""
    converter = AudioConverter(rate, width, channels, target_rate)
    return to_pcm16(np.concatenate([converter.convert(raw), converter.flush()]))
