"""warmpool in front of a deliberately broken upstream (issue 14, defects 1 and 8): an answer cut short,
heads no client could parse (100 KB in one read, a NUL in a value, a space in a name, a bad status line,
bare LF), garbage chunk sizes. Every answer a client gets is read by h11, a strict parser: it is either
a well-formed 502 in the client's dialect, or a body visibly cut short (the connection closed before its
declared length), never bytes a client cannot parse; and the proxy keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import h11
import pytest

from tests.raw_upstream import RawUpstream, warmpool_in_front

GOOD = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{"ok": true}'
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@dataclass
class Script:
    """What the upstream sends for the next proxied request, and whether it closes afterwards."""

    data: bytes
    close: bool = False


class BrokenUpstream(RawUpstream):
    """A raw HTTP/1.1 upstream that answers /v1/models properly and every other request with `script`."""

    def __init__(self) -> None:
        self.script = Script(GOOD)
        self.port = 0

    async def answer(self, writer: asyncio.StreamWriter) -> bool:
        script = self.script
        writer.write(script.data)
        await writer.drain()
        return script.close


@pytest.fixture
async def broken() -> AsyncIterator[tuple[BrokenUpstream, int]]:
    """The broken upstream and warmpool in front of it (an openai-kind backend: forward only)."""
    upstream = BrokenUpstream()
    async with warmpool_in_front(upstream, idle=5, shutdown=2) as port:
        yield upstream, port


class Client:
    """One keep-alive connection to warmpool, its answers parsed by h11 (which raises on anything invalid)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, port: int) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def post(self, path: str, body: dict[str, object]) -> tuple[int, dict[str, str], bytes, bool]:
        """(status, headers, body, complete): complete is False when the connection closed mid-body."""
        if self.h11.our_state is h11.DONE:
            self.h11.start_next_cycle()
        data = json.dumps(body).encode()
        self.writer.write(self.h11.send(h11.Request(method="POST", target=path, headers=[
            ("Host", "warmpool"), ("Content-Type", "application/json"), ("Content-Length", str(len(data)))])))
        self.writer.write(self.h11.send(h11.Data(data=data)) + self.h11.send(h11.EndOfMessage()))
        status, headers, parts = 0, {}, []
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                chunk = await asyncio.wait_for(self.reader.read(65536), 10)
                if not chunk and status:
                    return status, headers, b"".join(parts), False  # closed mid-body
                self.h11.receive_data(chunk)
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return status, headers, b"".join(parts), True

    def close(self) -> None:
        self.writer.close()


# -- defect 1: a body framed by Content-Length that the upstream cuts short ------------------------------------

@pytest.mark.parametrize("declared", [130, 600])
async def test_a_cut_length_framed_body_ends_short_and_the_connection_closes(
        broken: tuple[BrokenUpstream, int], declared: int) -> None:
    upstream, port = broken
    body = b'{"model": "m", "message": {"content": "' + b"x" * 80 + b'"}}\n'
    body = body[:120]
    upstream.script = Script(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nContent-Length: %d\r\n\r\n%b"
                             % (declared, body), close=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = json.dumps(CHAT).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%b" % (len(request), request))
    received = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(reader.read(65536), 10):  # a hang here is the defect too
            received += chunk
    head, _, sent = received.partition(b"\r\n\r\n")
    assert b"Content-Length: %d" % declared in head
    assert sent == body  # what the upstream sent, nothing after it (no error line), then the close
    writer.close()


async def test_a_cut_chunked_stream_ends_with_an_error_event_and_a_proper_end(
        broken: tuple[BrokenUpstream, int]) -> None:
    upstream, port = broken
    upstream.script = Script(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                             b"\r\n10\r\ndata: {\"a\": 1}\n\n\r\n", close=True)
    client = await Client.open(port)
    status, _, body, complete = await client.post("/v1/chat/completions", {**CHAT, "stream": True})
    assert status == 200 and complete
    assert body.startswith(b'data: {"a": 1}\n\ndata: {"error": ')
    upstream.script = Script(GOOD)
    assert (await client.post("/v1/chat/completions", CHAT))[0] == 200  # the same connection goes on
    client.close()


# -- defect 8: upstream heads no client could parse -------------------------------------------------------------

BAD_HEADS = {
    "100 KB header in one read": b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 100_000 + b"\r\nContent-Length: 2\r\n\r\n{}",
    "NUL in a value": b"HTTP/1.1 200 OK\r\nX-Bad: a\x00b\r\nContent-Length: 2\r\n\r\n{}",
    "space in a name": b"HTTP/1.1 200 OK\r\nX Bad: 1\r\nContent-Length: 2\r\n\r\n{}",
    "bad status line": b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\n{}",
    "not HTTP": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "bare LF": b"HTTP/1.1 200 OK\nContent-Length: 2\n\n{}",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 2\r\n\r\n{}",
    "doubled length": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
}


@pytest.mark.parametrize("name", sorted(BAD_HEADS))
async def test_an_invalid_upstream_answer_is_a_502_in_the_clients_dialect(
        broken: tuple[BrokenUpstream, int], name: str) -> None:
    upstream, port = broken
    upstream.script = Script(BAD_HEADS[name], close=True)
    client = await Client.open(port)
    status, headers, body, complete = await client.post("/v1/chat/completions", CHAT)
    assert (status, complete) == (502, True), body
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["type"] == "server_error"  # OpenAI's shape
    status, _, body, _ = await client.post("/api/chat", CHAT)  # Ollama's dialect, translated on the way
    assert status == 502 and isinstance(json.loads(body)["error"], str)
    upstream.script = Script(GOOD)
    status, _, body, _ = await client.post("/v1/chat/completions", CHAT)
    assert (status, body) == (200, b'{"ok": true}')  # and it keeps serving
    client.close()


@pytest.mark.parametrize("size", [b"zz", b"-1", b"0x2", b"1" * 40])
async def test_a_garbage_chunk_size_cuts_the_body_visibly_and_the_proxy_goes_on(
        broken: tuple[BrokenUpstream, int], size: bytes) -> None:
    """The head was valid and went out (the body's length unknown): the body is cut by closing."""
    upstream, port = broken
    upstream.script = Script(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                             b"\r\n1\r\n{\r\n%b\r\n}\r\n0\r\n\r\n" % size, close=True)
    client = await Client.open(port)
    status, _, _, complete = await client.post("/v1/chat/completions", CHAT)
    assert (status, complete) == (200, False)
    client.close()
    upstream.script = Script(GOOD)
    client = await Client.open(port)
    assert (await client.post("/v1/chat/completions", CHAT))[0] == 200
    client.close()


# -- an upstream answer nested deeper than a translation can read ---------------------------------------------

DEEP = b'{"choices": [{"message": {"content": ' + b"[" * 5000 + b"]" * 5000 + b"}}]}"


async def test_a_deeply_nested_upstream_answer_is_a_502_when_translated(broken: tuple[BrokenUpstream, int]) -> None:
    """Ollama's dialect on an OpenAI upstream reads the answer to translate it: JSON too deep to read is the
    upstream's fault (502 in the client's dialect), not warmpool's (500)."""
    upstream, port = broken
    upstream.script = Script(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                             % (len(DEEP), DEEP))
    client = await Client.open(port)
    status, _, body, complete = await client.post("/api/chat", {**CHAT, "stream": False})
    assert (status, complete) == (502, True), body
    assert "cannot translate" in json.loads(body)["error"]
    event = b"data: " + DEEP + b"\n\n"
    upstream.script = Script(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n%b"
                             % (len(event), event))
    status, _, body, complete = await client.post("/api/chat", {**CHAT, "stream": True})
    assert (status, complete) == (200, True)
    assert "error" in json.loads(body.splitlines()[-1])  # the stream ends with Ollama's error line
    upstream.script = Script(GOOD)
    assert (await client.post("/v1/chat/completions", CHAT))[0] == 200  # and it keeps serving
    client.close()
