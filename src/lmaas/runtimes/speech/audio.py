"""Decoding encoded audio (wav, mp3, flac, ogg/opus, m4a... whatever FFmpeg reads) with PyAV.

Every runtime gets the same input: 16 kHz mono float32 samples in [-1, 1], the rate Whisper was
trained on. Decoding runs on the worker's helper threads; a file that is not audio is the
caller's mistake (:class:`~lmaas.core.errors.InvalidRequestError`, 400) and an audio longer than
the model's limit is refused while decoding (:class:`~lmaas.core.errors.PayloadTooLargeError`,
413), so a small compressed file cannot expand into gigabytes of samples.
"""

from __future__ import annotations

import io
import struct

import av
import numpy as np
import numpy.typing as npt

from lmaas.core.errors import InvalidRequestError, PayloadTooLargeError

SAMPLE_RATE = 16_000
"""Samples per second of decoded audio."""


def _too_long(max_duration_s: float) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"the audio is longer than the limit of {max_duration_s:g} s", param="file"
    )


def decode_audio(data: bytes, max_duration_s: float) -> npt.NDArray[np.float32]:
    """Decode the first audio stream of ``data`` to 16 kHz mono float32.

    Args:
        data: An encoded audio file (any container and codec FFmpeg supports).
        max_duration_s: Longest audio accepted, in seconds.

    Raises:
        InvalidRequestError: empty, corrupt or not audio (no audio stream, no samples).
        PayloadTooLargeError: longer than ``max_duration_s``.
    """
    if not data:
        raise InvalidRequestError("the audio file is empty", param="file")
    max_samples = int(max_duration_s * SAMPLE_RATE)
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise InvalidRequestError("the file holds no audio stream", param="file")
            declared = container.duration  # microseconds, when the container says
            if declared is not None and declared / 1e6 > max_duration_s + 1.0:
                raise _too_long(max_duration_s)
            chunks = _decode_stream(container, max_samples, max_duration_s)
    except av.FFmpegError as exc:
        raise InvalidRequestError(
            f"the file could not be decoded as audio ({exc.strerror or type(exc).__name__})",
            param="file",
        ) from None
    if not chunks:
        raise InvalidRequestError("the file holds no audio samples", param="file")
    return np.concatenate(chunks)


def _decode_stream(
    container: av.container.InputContainer, max_samples: int, max_duration_s: float
) -> list[npt.NDArray[np.float32]]:
    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    chunks: list[npt.NDArray[np.float32]] = []
    total = 0
    for frame in container.decode(stream):
        for out in resampler.resample(frame):
            total = _append(chunks, out, total, max_samples, max_duration_s)
    for out in resampler.resample(None):
        total = _append(chunks, out, total, max_samples, max_duration_s)
    return chunks


def _append(
    chunks: list[npt.NDArray[np.float32]],
    frame: av.AudioFrame,
    total: int,
    max_samples: int,
    max_duration_s: float,
) -> int:
    samples = frame.to_ndarray().reshape(-1).astype(np.float32, copy=False)
    total += samples.shape[0]
    if total > max_samples:
        raise _too_long(max_duration_s)
    chunks.append(samples)
    return total


def silence_wav(seconds: float) -> bytes:
    """A 16 kHz mono 16-bit PCM WAV file of silence (runner warm-up)."""
    num = int(seconds * SAMPLE_RATE)
    data = b"\x00\x00" * num
    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", 36 + len(data), b"WAVE", b"fmt ", 16, 1, 1,
        SAMPLE_RATE, SAMPLE_RATE * 2, 2, 16, b"data", len(data),
    )  # fmt: skip
    return header + data
