"""Audio decoding with PyAV: every container to 16 kHz mono float32, and the refusals."""

from __future__ import annotations

import io
import math

import av
import numpy as np
import pytest

from lmaas.core.errors import InvalidRequestError, PayloadTooLargeError
from lmaas.runtimes.speech.audio import SAMPLE_RATE, decode_audio, silence_wav


def encode_tone(container: str, codec: str, seconds: float = 1.0, rate: int = 44_100) -> bytes:
    """A 440 Hz stereo tone encoded with FFmpeg (through PyAV) in ``container``/``codec``."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="stereo")
        supported = [f.name for f in stream.codec_context.codec.audio_formats or []]
        fmt = next(f for f in ("flt", "fltp", "s16", "s16p") if not supported or f in supported)
        stream.codec_context.format = fmt
        frame_size = stream.codec_context.frame_size or 1024
        t = np.arange(int(seconds * rate)) / rate
        tone = (0.5 * np.sin(2 * math.pi * 440 * t)).astype(np.float32)
        for start in range(0, tone.shape[0], frame_size):
            chunk = np.stack([tone[start : start + frame_size]] * 2)
            planar = fmt.endswith("p")
            data = chunk if planar else chunk.T.reshape(1, -1)
            if fmt.startswith("s16"):
                data = (data * 32767).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(data), format=fmt, layout="stereo"
            )
            frame.sample_rate = rate
            frame.pts = start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("container", "codec", "rate"),
    [
        ("wav", "pcm_s16le", 44_100),
        ("flac", "flac", 22_050),
        ("ogg", "libopus", 48_000),
        ("mp3", "libmp3lame", 44_100),
    ],
)
def test_decodes_each_container_to_16k_mono(container: str, codec: str, rate: int) -> None:
    data = encode_tone(container, codec, rate=rate)
    audio = decode_audio(data, max_duration_s=60)
    assert audio.dtype == np.float32 and audio.ndim == 1
    # Encoders pad a little (mp3 priming, vorbis blocks): one second, give or take 0.1 s.
    assert abs(audio.shape[0] / SAMPLE_RATE - 1.0) < 0.1
    assert 0.3 < np.abs(audio).max() <= 1.0
    spectrum = np.abs(np.fft.rfft(audio[: SAMPLE_RATE // 2]))
    peak_hz = spectrum.argmax() * SAMPLE_RATE / (SAMPLE_RATE // 2)
    assert abs(peak_hz - 440) < 10


def test_silence_wav_round_trips() -> None:
    audio = decode_audio(silence_wav(2.0), max_duration_s=10)
    assert audio.shape == (2 * SAMPLE_RATE,)
    assert not audio.any()


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage" * 100, b"RIFF\x00\x00\x00\x00WAVEfmt ", b"\x89PNG\r\n\x1a\n" + b"\0" * 64],
)
def test_garbage_is_invalid_request(data: bytes) -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode_audio(data, max_duration_s=60)
    assert info.value.param == "file"


def test_longer_than_the_limit_is_payload_too_large() -> None:
    data = encode_tone("wav", "pcm_s16le", seconds=3.0)
    assert decode_audio(data, max_duration_s=3.5).shape[0] == 3 * SAMPLE_RATE
    with pytest.raises(PayloadTooLargeError, match="longer than the limit of 2 s"):
        decode_audio(data, max_duration_s=2.0)


def test_limit_holds_without_a_declared_duration() -> None:
    # An ogg stream states no duration up front: the cap is enforced while decoding.
    data = encode_tone("ogg", "libopus", seconds=3.0, rate=48_000)
    with pytest.raises(PayloadTooLargeError):
        decode_audio(data, max_duration_s=1.0)
