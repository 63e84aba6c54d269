"""What the bench clients' tests' small loopback servers share."""

from __future__ import annotations

import asyncio


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One HTTP/1.1 request with a ``Content-Length`` body (head and body), or None when the
    client closed the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await reader.readexactly(length)
