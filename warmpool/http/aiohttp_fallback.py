"""The proxy behind aiohttp's server: adapts a web.Request to `Incoming` and aiohttp's responses to
`Reply`. It serves the connections the front door hands over (requests it does not take itself), so
every proxied route works on both.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from multidict import CIMultiDict

from warmpool.errors import PayloadTooLarge
from warmpool.http.exchange import HeaderLookup, Headers, Incoming, Reply, media_type

Handler = Callable[[Incoming, Reply], Awaitable[None]]


class AiohttpIncoming:
    """`Incoming` over a web.Request."""

    def __init__(self, request: web.Request, limit: int) -> None:
        self.request = request
        self.method = request.method
        self.path = request.path
        self.query = request.rel_url.raw_query_string
        self.headers: HeaderLookup = request.headers
        self.raw_headers = request.raw_headers
        self.content_length = request.content_length
        self.peer = request.remote or ""
        self.limit = limit

    async def read(self) -> bytes:
        if self.content_length is not None and self.content_length > self.limit:
            raise PayloadTooLarge(f"request body of {self.content_length} bytes exceeds the limit of {self.limit}")
        try:
            return await self.request.read()
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge(f"request body exceeds the limit of {self.limit} bytes") from None


class AiohttpReply:
    """`Reply` over aiohttp's responses; `response` is what the handler returns to aiohttp."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None
        self.status = 0
        self.content_type = ""

    @property
    def started(self) -> bool:
        return self.response is not None

    async def whole(self, status: int, reason: str, headers: Headers, body: bytes) -> None:
        self._begin(status, headers)
        self.response = web.Response(status=status, reason=reason or None, body=body, headers=CIMultiDict(headers))
        await self.response.prepare(self.request)
        await self.response.write_eof()

    async def start(self, status: int, reason: str, headers: Headers, length: int | None) -> None:
        self._begin(status, headers)
        self.response = web.StreamResponse(status=status, reason=reason or None, headers=CIMultiDict(headers))
        if length is not None:
            self.response.content_length = length
        await self.response.prepare(self.request)

    async def write(self, data: bytes) -> None:
        assert self.response is not None
        await self.response.write(data)

    async def end(self) -> None:
        assert self.response is not None
        await self.response.write_eof()

    def abort(self) -> None:
        if self.request.transport is not None:
            self.request.transport.abort()

    def _begin(self, status: int, headers: Headers) -> None:
        if self.response is not None:
            raise RuntimeError("a reply is sent once")
        self.status, self.content_type = status, media_type(headers)


def handler(handle: Handler, limit: int) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An aiohttp handler running `handle` (the proxy) on the request."""
    async def serve(request: web.Request) -> web.StreamResponse:
        reply = AiohttpReply(request)
        await handle(AiohttpIncoming(request, limit), reply)
        if reply.response is None:  # the proxy always answers; this would be a bug
            raise web.HTTPInternalServerError(text="warmpool sent no answer")
        return reply.response
    return serve
