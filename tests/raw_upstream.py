"""A raw HTTP/1.1 upstream for tests that need bytes no real server sends, and warmpool in front of it.

`RawUpstream` reads each request (its head and a Content-Length body), answers `GET /v1/models` with the one
model `m`, and hands every other request to `answer`, which writes whatever bytes it likes and says whether
to close the connection. `warmpool_in_front` serves one on loopback behind warmpool (an openai-kind backend:
forward only, no scheduling)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from tests.conftest import running_warmpool

MODELS = b'{"object": "list", "data": [{"id": "m", "object": "model"}]}'


class RawUpstream:
    """Subclasses write the answers (`answer`); this reads the requests and serves the model list."""

    async def answer(self, writer: asyncio.StreamWriter) -> bool:
        """Write the answer to one proxied request; True closes the connection after it."""
        raise NotImplementedError

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if length := re.search(rb"(?i)\r\ncontent-length: *(\d+)", head):
                    await reader.readexactly(int(length.group(1)))
                if head.startswith(b"GET /v1/models"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                                 % (len(MODELS), MODELS))
                    continue
                if await self.answer(writer):
                    break
        writer.close()


@asynccontextmanager
async def warmpool_in_front(upstream: RawUpstream, **timeouts: float) -> AsyncIterator[int]:
    """Serve `upstream` on loopback with warmpool in front (model `m`); yields warmpool's port."""
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    raw = {"backends": {"up": {"kind": "openai", "url": url}}, "models": {"m": {"backend": "up"}},
           "timeouts": timeouts}
    try:
        async with running_warmpool(raw) as proxy:
            yield int(proxy.rsplit(":", 1)[1])
    finally:
        server.close()
