"""Helpers shared by the API tests."""

from __future__ import annotations

import json
from typing import Any


def sse_payloads(body: str) -> list[Any]:
    """The ``data:`` payloads of an SSE body, JSON-decoded (``[DONE]`` kept as a string)."""
    out: list[Any] = []
    for line in body.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def chat_body(text: str = "hello big world", **extra: Any) -> dict[str, Any]:
    return {"model": "fake-chat", "messages": [{"role": "user", "content": text}], **extra}


async def post_json(client: Any, url: str, body: Any) -> Any:
    """POST ``body`` as JSON, NaN and Infinity included (httpx's ``json=`` refuses them)."""
    raw = json.dumps(body).encode()
    return await client.post(url, content=raw, headers={"content-type": "application/json"})


class AsgiCall:
    """Drive an ASGI app directly: a body in chunks, and a disconnect on demand."""

    def __init__(self, app: Any, path: str, body: bytes | list[bytes], headers: Any = None) -> None:
        import asyncio

        self.app = app
        chunks = body if isinstance(body, list) else [body]
        self._inbox = [
            {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
            for i, c in enumerate(chunks)
        ]
        default = [(b"content-type", b"application/json")]
        if not isinstance(body, list):
            default.append((b"content-length", str(len(body)).encode()))
        self.scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": default if headers is None else headers,
            "client": ("127.0.0.1", 5000),
            "server": ("lmaas.test", 80),
        }
        self.sent: list[dict[str, Any]] = []
        self.disconnect = asyncio.Event()
        self.num_body_reads = 0

    async def receive(self) -> dict[str, Any]:
        if self._inbox:
            self.num_body_reads += 1
            return self._inbox.pop(0)
        await self.disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    async def run(self) -> None:
        await self.app(self.scope, self.receive, self.send)

    @property
    def status(self) -> int | None:
        starts = [m for m in self.sent if m["type"] == "http.response.start"]
        return int(starts[0]["status"]) if starts else None

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")
