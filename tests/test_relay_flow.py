"""A stream relayed to a client that stops reading: warmpool stops reading the upstream (it does not
buffer the stream in its own memory), and when the client reads again every byte arrives, in order,
passed through (OpenAI SSE to an OpenAI client) and translated (OpenAI SSE to an Ollama client)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import h11
import pytest

from tests.raw_upstream import RawUpstream, warmpool_in_front

EVENTS = 2048
CONTENT = 16 * 1024  # characters of content per event: 32 MiB of stream in all


def event(index: int) -> bytes:
    delta = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": f"{index:08d}".ljust(CONTENT, "x")},
                          "finish_reason": None}]}
    return b"data: " + json.dumps(delta).encode() + b"\n\n"


class StreamingUpstream(RawUpstream):
    """An OpenAI-style upstream whose chat answer is a long SSE stream; it counts the bytes the proxy has
    taken from it so far (its writes wait while the proxy does not read)."""

    def __init__(self) -> None:
        self.sent = 0
        self.total = 0

    async def answer(self, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for index in range(EVENTS):
            data = event(index)
            writer.write(b"%x\r\n%b\r\n" % (len(data), data))
            await writer.drain()
            self.sent += len(data)
        done = b"data: [DONE]\n\n"
        writer.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(done), done))
        await writer.drain()
        self.total = self.sent
        return False


@pytest.fixture
async def proxied() -> AsyncIterator[tuple[StreamingUpstream, int]]:
    upstream = StreamingUpstream()
    async with warmpool_in_front(upstream, idle=30, shutdown=2) as port:
        yield upstream, port


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    """The body of one answer, parsed by h11 (which raises on anything malformed)."""
    parser = h11.Connection(h11.CLIENT)
    parser.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))  # h11 must know it asked
    body = bytearray()
    while True:
        got = parser.next_event()
        if got is h11.NEED_DATA:
            parser.receive_data(await reader.read(256 * 1024))
        elif isinstance(got, h11.Response):
            assert got.status_code == 200
        elif isinstance(got, h11.Data):
            body += got.data
        elif isinstance(got, h11.EndOfMessage):
            return bytes(body)


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}),
    ("/api/chat", {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}),
], ids=["passed-through", "translated"])
async def test_a_client_that_stops_reading_stops_the_upstream_and_loses_nothing(
        proxied: tuple[StreamingUpstream, int], path: str, body: dict[str, object]) -> None:
    upstream, port = proxied
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=64 * 1024)
    payload = json.dumps(body).encode()
    writer.write(b"POST %b HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                 % (path.encode(), len(payload), payload))
    await asyncio.sleep(1.5)  # the client reads nothing: the kernel's buffers fill, then warmpool's transport
    stalled_at = upstream.sent
    stream_size = sum(len(event(i)) for i in range(EVENTS))
    # What the socket buffers on both sides of warmpool hold (a few MiB each on loopback) and one read's
    # worth in warmpool: far less than the stream. Without flow control warmpool would take all 32 MiB.
    assert stalled_at < stream_size * 0.6, (stalled_at, stream_size)
    received = await asyncio.wait_for(read_answer(reader), 60)
    writer.close()
    assert upstream.total == stream_size
    if path == "/v1/chat/completions":
        assert received == b"".join(event(i) for i in range(EVENTS)) + b"data: [DONE]\n\n"
    else:
        lines = [json.loads(line) for line in received.splitlines()]
        content = [line["message"]["content"] for line in lines if not line["done"]]
        assert content == [f"{i:08d}".ljust(CONTENT, "x") for i in range(EVENTS)]
        assert lines[-1]["done"] is True
