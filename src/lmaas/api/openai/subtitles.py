"""SubRip (SRT) and WebVTT renderings of transcription segments."""

from __future__ import annotations

from collections.abc import Sequence

from lmaas.core.messages import Segment


def format_timestamp(seconds: float, decimal_marker: str = ",") -> str:
    """``HH:MM:SS,mmm`` (SRT; ``.`` for VTT), rounded to the millisecond; hours may exceed 99.

    Negative times are clamped to zero.
    """
    total_ms = max(0, round(seconds * 1000))
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{millis:03d}"


def _cue_text(text: str) -> str:
    # A blank line ends a cue in both formats: collapse line breaks inside one segment.
    return " ".join(text.split())


def to_srt(segments: Sequence[Segment]) -> str:
    """SubRip: numbered cues from 1, ``start --> end`` with a comma before the milliseconds."""
    cues = [
        f"{i}\n{format_timestamp(s.start)} --> {format_timestamp(s.end)}\n{_cue_text(s.text)}\n"
        for i, s in enumerate(segments, start=1)
    ]
    return "\n".join(cues)


def to_vtt(segments: Sequence[Segment]) -> str:
    """WebVTT: the ``WEBVTT`` header, then cues with a dot before the milliseconds."""
    cues = [
        f"{format_timestamp(s.start, '.')} --> {format_timestamp(s.end, '.')}\n"
        f"{_cue_text(s.text)}\n"
        for s in segments
    ]
    return "\n".join(["WEBVTT\n", *cues])
