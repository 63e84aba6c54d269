"""SRT and WebVTT formatting of transcription segments."""

from __future__ import annotations

import pytest

from lmaas.api.openai.subtitles import format_timestamp, to_srt, to_vtt
from lmaas.core.messages import Segment

SEGMENTS = [Segment(0, 0.0, 2.5, " Hello world."), Segment(1, 2.5, 3725.0416, " Line\none.")]


@pytest.mark.parametrize(
    ("seconds", "srt", "vtt"),
    [
        (0.0, "00:00:00,000", "00:00:00.000"),
        (2.5, "00:00:02,500", "00:00:02.500"),
        (59.9996, "00:01:00,000", "00:01:00.000"),
        (3725.0416, "01:02:05,042", "01:02:05.042"),
        (360_000.0, "100:00:00,000", "100:00:00.000"),
        (-1.0, "00:00:00,000", "00:00:00.000"),
    ],
)
def test_timestamps(seconds: float, srt: str, vtt: str) -> None:
    assert format_timestamp(seconds) == srt
    assert format_timestamp(seconds, ".") == vtt


def test_srt() -> None:
    assert to_srt(SEGMENTS) == (
        "1\n00:00:00,000 --> 00:00:02,500\nHello world.\n"
        "\n"
        "2\n00:00:02,500 --> 01:02:05,042\nLine one.\n"
    )


def test_vtt() -> None:
    assert to_vtt(SEGMENTS) == (
        "WEBVTT\n"
        "\n"
        "00:00:00.000 --> 00:00:02.500\nHello world.\n"
        "\n"
        "00:00:02.500 --> 01:02:05.042\nLine one.\n"
    )


def test_no_segments() -> None:
    assert to_srt([]) == ""
    assert to_vtt([]) == "WEBVTT\n"
