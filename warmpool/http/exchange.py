"""The client's side of one proxied exchange, whichever server carried it: what the request said
(`Incoming`) and where the answer goes (`Reply`). The proxy and the relay speak only to these two;
`server` implements them on the socket itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

Headers = list[tuple[str, str]]

JSON = "application/json; charset=utf-8"
TEXT = "text/plain; charset=utf-8"


class HeaderLookup(Protocol):
    """A request's headers by name, case ignored (the first of repeated ones)."""

    def get(self, name: str, /) -> str | None: ...


class Incoming(Protocol):
    """A request as the proxy needs it. `headers.get` ignores case; `raw_headers` are the bytes as sent;
    `query` is the raw query string, without "?"."""

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def query(self) -> str: ...
    @property
    def headers(self) -> HeaderLookup: ...
    @property
    def raw_headers(self) -> Sequence[tuple[bytes, bytes]]: ...
    @property
    def content_length(self) -> int | None: ...
    @property
    def peer(self) -> str:
        """The client's address (its host, without the port); "" when not known."""
        ...

    async def read(self) -> bytes:
        """The whole body (one over `max_body_size` was refused with 413 before the handler ran)."""
        ...


class Reply(Protocol):
    """Where the answer goes: either `whole` once, or `start`, any number of `write`s, then `end`."""

    status: int  # 0 until the head is sent
    content_type: str  # the media type of the answer being sent, without parameters ("" before)

    @property
    def started(self) -> bool: ...

    @property
    def length_framed(self) -> bool:
        """Whether the head announced the body's length: such a body can carry nothing after it (an error
        line there would be read as the start of the next answer), so it is cut by dropping the connection."""
        ...

    async def whole(self, status: int, reason: str, headers: Headers, body: bytes) -> None:
        """Head and body together (one write where the server allows it)."""

    async def start(self, status: int, reason: str, headers: Headers, length: int | None) -> None:
        """Send the head; `length` None means the body's size is not known (chunked)."""

    async def write(self, data: bytes) -> None: ...

    def write_now(self, data: bytes) -> bool:
        """`write` without waiting: True when the client is not taking more for now (await `drain`)."""
        ...

    async def drain(self) -> None:
        """Until the client takes more (at once when it does)."""

    async def end(self) -> None: ...

    def abort(self) -> None:
        """Drop the connection: a body cut short must not look whole to the client."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A small answer warmpool makes itself (listings, errors, model admin for non-Ollama backends)."""

    body: bytes
    content_type: str = JSON
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Answer:
        return cls(json.dumps(obj).encode(), JSON, status, tuple((headers or {}).items()))

    @classmethod
    def text(cls, text: str) -> Answer:
        return cls(text.encode(), TEXT)

    async def send(self, reply: Reply, extra: Headers) -> None:
        headers = [("Content-Type", self.content_type), *self.headers, *extra]
        await reply.whole(self.status, "", headers, self.body)


def media_type(headers: Headers) -> str:
    """The media type a header list declares, without parameters: "text/event-stream"."""
    for name, value in headers:
        if name.lower() == "content-type":
            return value.partition(";")[0].strip().lower()
    return ""
