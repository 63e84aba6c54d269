from __future__ import annotations

from typer.testing import CliRunner

from lmaas.cli.main import app


def test_bench_serve_refuses_a_bad_endpoint() -> None:
    result = CliRunner().invoke(
        app, ["bench", "serve", "--base-url", "http://127.0.0.1:9", "--model", "m",
              "--endpoint", "/v1/embeddings"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "endpoint" in result.stderr


def test_bench_serve_counts_an_unreachable_server_as_failures() -> None:
    # Port 9 (discard) is closed on loopback: every request fails to connect.
    result = CliRunner().invoke(
        app, ["bench", "serve", "--base-url", "http://127.0.0.1:9", "--model", "m",
              "--num-prompts", "2", "--input-len", "4", "--output-len", "2"],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "2 failed; first error:" in result.stderr
    assert "ConnectError" in result.stderr


def test_bench_serve_refuses_https_with_the_raw_client_and_names_the_way_out() -> None:
    result = CliRunner().invoke(
        app, ["bench", "serve", "--base-url", "https://example.com", "--model", "m"]
    )
    assert result.exit_code == 2
    assert "plain http only" in result.stderr and "--client httpx" in result.stderr


def test_bench_serve_refuses_an_unknown_client() -> None:
    result = CliRunner().invoke(
        app, ["bench", "serve", "--base-url", "http://127.0.0.1:9", "--model", "m",
              "--client", "aiohttp"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "--client 'aiohttp' is not one of raw, httpx" in result.stderr


def test_bench_serve_counts_an_unreachable_server_as_failures_with_httpx_too() -> None:
    result = CliRunner().invoke(
        app, ["bench", "serve", "--base-url", "http://127.0.0.1:9", "--model", "m",
              "--num-prompts", "2", "--input-len", "4", "--output-len", "2", "--client", "httpx"],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "ConnectError" in result.stderr


def test_bench_serve_refuses_a_base_url_without_a_scheme() -> None:
    result = CliRunner().invoke(
        app, ["bench", "serve", "--base-url", "127.0.0.1:8000", "--model", "m"]
    )
    assert result.exit_code == 2
    assert "base_url must be http://host[:port]" in result.stderr
