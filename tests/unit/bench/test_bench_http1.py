"""The sans-IO HTTP/1.1 response reader of the raw client, fed every split of its bytes."""

from __future__ import annotations

import pytest

from lmaas.bench.http1 import ProtocolError, ResponseParser

EVENTS = [b'data: {"choices":[{"text":"a"}]}\n\n', b"data: [DONE]\n\n"]
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def _chunked(*pieces: bytes, ext: bytes = b"") -> bytes:
    body = b"".join(b"%x%s\r\n%s\r\n" % (len(p), ext, p) for p in pieces)
    return body + b"0\r\n\r\n"


def _read(parser: ResponseParser, parts: list[bytes]) -> bytes:
    return b"".join(parser.feed(part) for part in parts)


CHUNKED = HEAD + _chunked(*EVENTS)


def test_a_chunked_body_in_one_piece() -> None:
    parser = ResponseParser()
    assert parser.feed(CHUNKED) == b"".join(EVENTS)
    assert (parser.status, parser.complete, parser.keep_alive) == (200, True, True)


@pytest.mark.parametrize("cut", range(1, len(CHUNKED)))
def test_a_chunked_body_split_at_every_byte_boundary(cut: int) -> None:
    parser = ResponseParser()
    assert _read(parser, [CHUNKED[:cut], CHUNKED[cut:]]) == b"".join(EVENTS)
    assert parser.complete


def test_a_chunked_body_fed_one_byte_at_a_time() -> None:
    parser = ResponseParser()
    parts = [CHUNKED[i : i + 1] for i in range(len(CHUNKED))]
    body = b""
    for i, part in enumerate(parts):
        body += parser.feed(part)
        assert parser.complete == (i == len(parts) - 1)
    assert body == b"".join(EVENTS)


def test_one_chunk_per_read_as_a_server_streams_tokens() -> None:
    parser = ResponseParser()
    assert parser.feed(HEAD) == b""
    for event in EVENTS:
        assert parser.feed(b"%x\r\n%s\r\n" % (len(event), event)) == event
        assert not parser.complete
    assert parser.feed(b"0\r\n\r\n") == b"" and parser.complete


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"zz\r\nab\r\n", "bad chunk size line"), (b"2\r\nabc\r\n", "longer than its size")],
)
def test_a_bad_chunk_read_alone_is_a_protocol_error(data: bytes, message: str) -> None:
    parser = ResponseParser()
    parser.feed(HEAD)
    with pytest.raises(ProtocolError, match=message):
        parser.feed(data)


def test_several_events_in_one_chunk_and_an_event_across_chunks() -> None:
    event = b'data: {"choices":[{"text":"b"}]}\n\n'
    data = HEAD + _chunked(EVENTS[0] + event, event[:7], event[7:] + EVENTS[1])
    assert ResponseParser().feed(data) == EVENTS[0] + event + event + EVENTS[1]


def test_chunk_extensions_and_trailers_are_skipped() -> None:
    data = HEAD + _chunked(*EVENTS, ext=b";name=value").replace(
        b"0\r\n\r\n", b"0;last\r\nx-trailer: 1\r\nx-other: 2\r\n\r\n"
    )
    parser = ResponseParser()
    assert parser.feed(data) == b"".join(EVENTS)
    assert parser.complete


def test_a_content_length_body_then_the_next_response_on_the_same_connection() -> None:
    first = b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found"
    parser = ResponseParser()
    assert _read(parser, [first[:30], first[30:]]) == b"not found"
    assert (parser.status, parser.complete) == (404, True)
    parser.reset()
    assert parser.feed(CHUNKED) == b"".join(EVENTS)
    assert parser.status == 200


def test_interim_heads_are_skipped_and_empty_bodies_complete_with_the_head() -> None:
    parser = ResponseParser()
    assert parser.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n") == b""
    assert (parser.status, parser.complete) == (204, True)
    parser.reset()
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert parser.complete


def test_a_body_delimited_by_the_close() -> None:
    parser = ResponseParser()
    assert parser.feed(b"HTTP/1.0 200 OK\r\n\r\nda") + parser.feed(b"ta") == b"data"
    assert not parser.complete and not parser.keep_alive
    assert parser.eof() and parser.complete


def test_connection_close_and_http_1_0_keep_alive() -> None:
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert not parser.keep_alive
    parser = ResponseParser()
    parser.feed(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n")
    assert parser.keep_alive


def test_a_cut_chunked_body_does_not_end_well() -> None:
    parser = ResponseParser()
    parser.feed(CHUNKED[:-7])
    assert not parser.eof() and not parser.complete


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 abc OK\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "header line without a colon"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
        (HEAD + b"zz\r\n", "bad chunk size line"),
        (HEAD + b"-1\r\n", "bad chunk size line"),
        (HEAD + b"2\r\nabc\r\n", "chunk data longer than its size"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nab", "past the end of the response"),
        (b"HTTP/1.1 200 OK\r\n" + b"x" * 70_000, "no end of line"),
        (HEAD + b"1" * 5000, "no end of line"),
    ],
)
def test_malformed_responses_are_protocol_errors(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        ResponseParser().feed(data)
