"""A sans-IO reader of HTTP/1.1 responses for the raw streaming client.

:class:`ResponseParser` takes the bytes of one connection as they arrive and returns the decoded
body bytes: after the head, a ``Transfer-Encoding: chunked`` body (chunk extensions and trailers
skipped), a ``Content-Length`` body, or a body delimited by the connection's close. ``1xx``
interim heads are skipped. It owns no socket and no clock, so the unit tests feed it any split
of the bytes.
"""

from __future__ import annotations

_MAX_HEAD_BYTES = 64 * 1024
_MAX_LINE_BYTES = 4096  # a chunk-size line or a trailer line

_HEAD = 0
_CHUNK_SIZE = 1
_CHUNK_DATA = 2
_CHUNK_END = 3  # the CRLF after a chunk's data
_TRAILER = 4
_LENGTH = 5
_UNTIL_CLOSE = 6
_DONE = 7


class ProtocolError(ValueError):
    """The server's bytes are not a well-formed HTTP/1.1 response."""


class ResponseParser:
    """Incremental reader of one response (:meth:`reset` for the next on the same connection).

    After :meth:`feed` has read the head, :attr:`status` and :attr:`keep_alive` are set;
    :attr:`complete` turns true with the body's last byte.
    """

    __slots__ = ("_buffer", "_left", "_state", "keep_alive", "status")

    def __init__(self) -> None:
        self._buffer = b""
        self._state = _HEAD
        self._left = 0  # bytes left in the current chunk or Content-Length body
        self.status = 0
        self.keep_alive = True

    def reset(self) -> None:
        """Expect the next response; bytes past the previous one are kept."""
        self._state = _HEAD
        self.status = 0
        self.keep_alive = True

    @property
    def head_done(self) -> bool:
        """The status and headers of the response are in."""
        return self._state != _HEAD

    @property
    def complete(self) -> bool:
        """The whole body is in (a close-delimited body completes in :meth:`eof`)."""
        return self._state == _DONE

    def feed(self, data: bytes) -> bytes:
        """Take the next bytes off the connection; return the body bytes they complete.

        Raises:
            ProtocolError: a malformed head or chunk framing, or bytes past a response.
        """
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        if self._state == _CHUNK_SIZE:
            # The common case of a streamed token: one whole chunk, "size CRLF data CRLF".
            size_end = buffer.find(b"\r\n", 0, 10)
            if size_end > 0:
                try:
                    size = int(buffer[:size_end], 16)
                except ValueError:
                    size = 0  # the general path below says what is wrong
                data_end = size_end + 2 + size
                if size > 0 and data_end + 2 == len(buffer) and buffer.endswith(b"\r\n"):
                    return buffer[size_end + 2 : data_end]
        out: list[bytes] = []
        pos = 0
        end = len(buffer)
        while pos < end:
            state = self._state
            if state in (_CHUNK_DATA, _LENGTH):
                take = min(self._left, end - pos)
                out.append(buffer[pos : pos + take])
                pos += take
                self._left -= take
                if self._left == 0:
                    self._state = _CHUNK_END if state == _CHUNK_DATA else _DONE
                continue
            if state == _UNTIL_CLOSE:
                out.append(buffer[pos:])
                pos = end
                break
            if state == _DONE:
                raise ProtocolError("the server sent bytes past the end of the response")
            line_end = buffer.find(b"\r\n\r\n" if state == _HEAD else b"\n", pos)
            if line_end < 0:
                self._keep(buffer[pos:])
                pos = end
                break
            if state == _HEAD:
                self._read_head(buffer[pos:line_end])
                pos = line_end + 4
            else:
                self._read_line(buffer[pos:line_end].rstrip(b"\r"))
                pos = line_end + 1
        return b"".join(out) if len(out) != 1 else out[0]

    def eof(self) -> bool:
        """The connection closed: True when that ends the response well (a close-delimited
        body, or a response already complete)."""
        if self._state == _UNTIL_CLOSE:
            self._state = _DONE
        return self._state == _DONE

    def _keep(self, rest: bytes) -> None:
        limit = _MAX_HEAD_BYTES if self._state == _HEAD else _MAX_LINE_BYTES
        if len(rest) > limit:
            raise ProtocolError(f"no end of line in the first {limit} bytes of the response")
        self._buffer = rest

    def _read_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:100]!r}")
        status = int(parts[1])
        if 100 <= status < 200:
            return  # an interim answer: the real head follows
        self.status = status
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise ProtocolError(f"a header line without a colon: {line[:100]!r}")
            headers[name.strip().lower()] = value.strip().lower()
        connection = headers.get(b"connection", b"")
        self.keep_alive = b"close" not in connection and (
            parts[0] != b"HTTP/1.0" or b"keep-alive" in connection
        )
        self._choose_body(headers)

    def _choose_body(self, headers: dict[bytes, bytes]) -> None:
        if self.status in (204, 304):
            self._state = _DONE
        elif b"chunked" in headers.get(b"transfer-encoding", b""):
            self._state = _CHUNK_SIZE
        elif b"content-length" in headers:
            length = headers[b"content-length"]
            if not length.isdigit():
                raise ProtocolError(f"bad Content-Length: {length[:50]!r}")
            self._left = int(length)
            self._state = _LENGTH if self._left else _DONE
        else:
            self._state = _UNTIL_CLOSE
            self.keep_alive = False

    def _read_line(self, line: bytes) -> None:
        if self._state == _CHUNK_END:
            if line:
                raise ProtocolError(f"chunk data longer than its size: {line[:50]!r}")
            self._state = _CHUNK_SIZE
        elif self._state == _CHUNK_SIZE:
            size_text = line.split(b";", 1)[0].strip()  # a chunk extension is ignored
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size line: {line[:50]!r}") from None
            if size < 0:
                raise ProtocolError(f"bad chunk size line: {line[:50]!r}")
            self._left = size
            self._state = _CHUNK_DATA if size else _TRAILER
        elif not line:  # the empty line that ends the trailers
            self._state = _DONE
