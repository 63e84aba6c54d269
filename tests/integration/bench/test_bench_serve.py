"""``run_benchmark`` and ``lmaas bench serve`` against a real server running the echo runner,
through both clients (raw, the default, and httpx, the reference)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmaas.bench import BenchConfig, result_dict, run_benchmark
from lmaas.bench.serve import ClientKind
from lmaas.cli.main import app
from lmaas.testing.tiny_models import build_tiny_causal_lm
from tests.integration.server.conftest import start_echo_server
from tests.integration.serverproc import ServerProcess


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("bench")
    source = build_tiny_causal_lm(root / "tiny", "llama", seed=0)
    server = start_echo_server(root / "home", source, token_delay_s="0.002")
    try:
        server.wait_ready(60)
        yield server
    finally:
        server.stop()


CLIENTS = pytest.mark.parametrize("client", ["raw", "httpx"])


@CLIENTS
def test_run_benchmark_measures_every_request(
    echo_server: ServerProcess, client: ClientKind
) -> None:
    config = BenchConfig(
        base_url=echo_server.base_url, model="echo", num_prompts=6, input_len=8, output_len=5,
        max_concurrency=3, warmup=1, vocab_size=500, client=client,
    )  # fmt: skip
    seen: list[bool] = []
    result = asyncio.run(run_benchmark(config, lambda outcome: seen.append(outcome.success)))
    summary = result.summary
    assert summary.errors == []
    assert (summary.completed, summary.failed, len(seen)) == (6, 0, 6)
    assert summary.total_output_tokens == 30  # ignore_eos + max_tokens, from usage
    assert summary.total_input_tokens == 48  # the client's exact id count
    assert 1 <= summary.max_concurrent_requests <= 3
    ttft = summary.latency["ttft"]
    assert 0 < ttft.mean_ms < 5000
    assert len([gap for out in result.outcomes for gap in out.itl_s]) == 6 * 4
    data = result_dict(result)
    assert data["output_throughput"] == pytest.approx(30 / summary.duration_s)
    assert {"mean_ttft_ms", "p99_itl_ms", "median_tpot_ms", "p90_e2el_ms"} <= data.keys()


@CLIENTS
def test_chat_endpoint_with_poisson_arrivals(
    echo_server: ServerProcess, client: ClientKind
) -> None:
    config = BenchConfig(
        base_url=echo_server.base_url, model="echo", endpoint="/v1/chat/completions",
        num_prompts=4, input_len=6, output_len=3, request_rate=40.0, seed=1,
        client=client,
    )  # fmt: skip
    summary = asyncio.run(run_benchmark(config)).summary
    assert (summary.completed, summary.total_output_tokens) == (4, 12)
    assert summary.duration_s >= 4 / 40.0 * 0.9


@CLIENTS
def test_unknown_model_is_counted_as_failures_with_the_error(
    echo_server: ServerProcess, client: ClientKind
) -> None:
    config = BenchConfig(
        base_url=echo_server.base_url, model="nope", num_prompts=2, input_len=2,
        client=client,
    )  # fmt: skip
    summary = asyncio.run(run_benchmark(config)).summary
    assert (summary.completed, summary.failed) == (0, 2)
    assert summary.errors[0].startswith("HTTP 404: {")
    assert "nope" in summary.errors[0]


def test_cli_clients_count_the_same_requests_and_tokens(
    echo_server: ServerProcess, tmp_path: Path
) -> None:
    results = {}
    for client in ("raw", "httpx"):
        out = tmp_path / f"{client}.json"
        result = CliRunner().invoke(
            app, ["bench", "serve", "--base-url", echo_server.base_url, "--model", "echo",
                  "--num-prompts", "8", "--input-len", "4", "--output-len", "6",
                  "--max-concurrency", "4", "--vocab-size", "500", "--client", client,
                  "--json", str(out)],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "Output token throughput" in result.stdout
        results[client] = json.loads(out.read_text())
    raw, reference = results["raw"], results["httpx"]
    assert raw.keys() == reference.keys()
    counts = ("completed", "failed", "total_input_tokens", "total_output_tokens")
    assert [raw[key] for key in counts] == [reference[key] for key in counts] == [8, 0, 32, 48]
    assert raw["max_concurrency"] == 4 and raw["request_rate"] == "inf"
