from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from lmaas.bench.metrics import (
    RequestOutcome,
    aggregate,
    peak_concurrency,
    percentile,
    percentile_key,
    summarize,
)


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 99.9, 100])
def test_percentile_matches_numpy_linear(q: float) -> None:
    values = [0.3, 1.7, 0.2, 9.0, 4.4, 4.4, 2.5]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_nothing_is_zero() -> None:
    assert percentile([], 99) == 0.0


def test_summarize_converts_to_ms_with_numpy_std() -> None:
    stats = summarize([0.010, 0.020, 0.060])
    assert stats.mean_ms == pytest.approx(30.0)
    assert stats.median_ms == pytest.approx(20.0)
    assert stats.std_ms == pytest.approx(float(np.std([10.0, 20.0, 60.0])))
    assert stats.percentiles_ms[99.0] == pytest.approx(float(np.percentile([10, 20, 60], 99)))


def _outcome(
    start: float, chunk_times: list[float], tokens: int, prompt: int = 8
) -> RequestOutcome:
    """A successful request whose choices-bearing chunks arrived at ``chunk_times``."""
    return RequestOutcome(
        start_s=start,
        prompt_tokens=prompt,
        output_tokens=tokens,
        ttft_s=chunk_times[0] - start,
        itl_s=[b - a for a, b in itertools.pairwise(chunk_times)],
        latency_s=chunk_times[-1] - start,
        success=True,
    )


def test_tpot_is_decode_time_over_tokens_after_the_first() -> None:
    out = _outcome(0.0, [0.5, 0.6, 0.7, 0.9], tokens=4)
    assert out.tpot_s == pytest.approx((0.9 - 0.5) / 3)
    assert _outcome(0.0, [0.5], tokens=1).tpot_s is None


def test_tpot_uses_usage_tokens_not_chunk_count() -> None:
    # Two chunks carrying 5 tokens: TPOT divides by 4 tokens, ITL has the one chunk gap.
    out = _outcome(1.0, [1.2, 1.6], tokens=5)
    assert out.tpot_s == pytest.approx(0.4 / 4)
    assert out.itl_s == pytest.approx([0.4])


def test_aggregate_matches_vllm_definitions() -> None:
    a = _outcome(0.0, [0.1, 0.2, 0.4], tokens=3, prompt=10)
    b = _outcome(0.05, [0.35, 0.45], tokens=2, prompt=6)
    c = _outcome(0.1, [0.3], tokens=1, prompt=4)
    failed = RequestOutcome(start_s=0.0, error="HTTP 503: overloaded")
    result = aggregate([a, b, c, failed], duration_s=2.0)
    assert (result.completed, result.failed) == (3, 1)
    assert result.total_input_tokens == 20
    assert result.total_output_tokens == 6
    assert result.request_throughput == pytest.approx(1.5)
    assert result.output_throughput == pytest.approx(3.0)
    assert result.total_token_throughput == pytest.approx(13.0)
    ttft = result.latency["ttft"]
    assert ttft.mean_ms == pytest.approx(1000 * (0.1 + 0.3 + 0.2) / 3)
    # TPOT only over requests with more than one output token.
    assert result.latency["tpot"].mean_ms == pytest.approx(1000 * (0.15 + 0.1) / 2)
    # ITL is pooled over all requests' chunk gaps.
    itls = [100.0, 200.0, 100.0]
    assert result.latency["itl"].mean_ms == pytest.approx(sum(itls) / 3)
    assert result.latency["itl"].percentiles_ms[90.0] == pytest.approx(np.percentile(itls, 90))
    assert result.latency["e2el"].median_ms == pytest.approx(400.0)
    assert result.errors == ["HTTP 503: overloaded"]
    assert result.max_concurrent_requests == 3


def test_aggregate_of_nothing_is_all_zero() -> None:
    result = aggregate([], duration_s=0.0)
    assert result.completed == 0
    assert result.request_throughput == 0.0
    assert not math.isnan(result.latency["ttft"].mean_ms)


def test_peak_concurrency_does_not_count_back_to_back_requests() -> None:
    first = _outcome(0.0, [0.5, 1.0], tokens=2)
    second = _outcome(1.0, [1.5, 2.0], tokens=2)
    overlapping = _outcome(0.5, [0.6, 1.5], tokens=2)
    assert peak_concurrency([first, second]) == 1
    assert peak_concurrency([first, second, overlapping]) == 2


def test_percentile_keys_follow_vllm() -> None:
    assert percentile_key(99.0) == "p99"
    assert percentile_key(99.9) == "p99.9"
