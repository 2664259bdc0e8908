"""The front door (warmpool's HTTP/1.1 server, every route) against real loopback clients that send exact
bytes: keep-alive, pipelining, bodies in pieces, chunked requests and answers, bodiless answers, a client
that leaves, a cut answer, the idle and head timeouts, and shutdown. Hostile heads, the limits and the
parser differential against h11 are in test_http_hostile.py and test_reliability_*.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest

from tests.splits import bytewise
from warmpool.http.exchange import Incoming, Reply
from warmpool.http.server import Lane, Limits

LIMIT = 1000


# -- on a socket ---------------------------------------------------------------------------------------------

@dataclass
class Door:
    """A front door on loopback."""

    lane: Lane
    port: int
    seen: list[str] = field(default_factory=list)  # "front PATH", in order

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


Handler = Callable[[Incoming, Reply], Awaitable[None]]


async def echo(request: Incoming, reply: Reply) -> None:
    body = json.dumps({"path": request.path, "query": request.query, "body": (await request.read()).decode(),
                       "phase": request.headers.get("X-Warmpool-Phase")}).encode()
    await reply.whole(200, "", [("Content-Type", "application/json"), ("X-Served-By", "front")], body)


@pytest.fixture
async def door() -> AsyncIterator[Callable[..., Awaitable[Door]]]:
    servers: list[asyncio.Server] = []

    async def start(handle: Handler, limits: Limits | None = None) -> Door:
        seen: list[str] = []

        async def front(request: Incoming, reply: Reply) -> None:
            seen.append(f"front {request.path}")
            await handle(request, reply)

        lane = Lane(front, limits or Limits(max_body=LIMIT))
        server = await asyncio.get_running_loop().create_server(lane.protocol, "127.0.0.1", 0)
        servers.append(server)
        return Door(lane, server.sockets[0].getsockname()[1], seen)

    yield start
    for server in servers:
        server.close()


async def read_answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One answer framed by Content-Length or chunked: (head, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in
              (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)}
    if b"content-length" in fields:
        return head, await reader.readexactly(int(fields[b"content-length"]))
    if fields.get(b"transfer-encoding") == b"chunked":
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            body += (await reader.readexactly(size + 2))[:-2]
        assert await reader.readexactly(2) == b"\r\n"
        return head, body
    return head, b""


def post(path: str, body: bytes = b"{}", extra: bytes = b"") -> bytes:
    return b"POST %b HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n%b\r\n%b" % (path.encode(), len(body), extra, body)


async def test_keep_alive_serves_requests_one_after_another(door: Callable[[Handler], Awaitable[Door]]) -> None:
    d = await door(echo)
    reader, writer = await d.connect()
    for n in range(3):
        writer.write(post("/api/chat", b'{"n": %d}' % n, b"X-Warmpool-Phase: plan\r\n"))
        head, body = await read_answer(reader)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nDate: " in head
        assert json.loads(body) == {"path": "/api/chat", "query": "", "body": f'{{"n": {n}}}', "phase": "plan"}
    assert d.seen == ["front /api/chat"] * 3
    writer.close()


async def test_pipelined_requests_are_answered_in_order(door: Callable[[Handler], Awaitable[Door]]) -> None:
    d = await door(echo)
    reader, writer = await d.connect()
    writer.write(post("/api/chat", b"1") + post("/v1/chat/completions?a=b", b"2") + post("/api/chat", b"3"))
    answers = [json.loads((await read_answer(reader))[1]) for _ in range(3)]
    assert [(a["path"], a["query"], a["body"]) for a in answers] == [
        ("/api/chat", "", "1"), ("/v1/chat/completions", "a=b", "2"), ("/api/chat", "", "3")]
    writer.close()


async def test_a_request_sent_byte_by_byte_is_read_whole(door: Callable[[Handler], Awaitable[Door]]) -> None:
    d = await door(echo)
    reader, writer = await d.connect()
    for piece in bytewise(post("/api/chat", b'{"long": "' + b"x" * 200 + b'"}')):
        writer.write(piece)
        await writer.drain()
    assert json.loads((await read_answer(reader))[1])["body"].endswith('x"}')
    writer.close()


def test_it_serves_on_uvloop_too() -> None:
    """warmpool runs on uvloop (app.run): pipelined requests and answers work there as well."""
    import uvloop

    async def scenario() -> list[bytes]:
        lane = Lane(echo, Limits(max_body=LIMIT))
        server = await asyncio.get_running_loop().create_server(lane.protocol, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        writer.write(post("/api/chat", b"a") + post("/healthz", b"b"))
        bodies = [(await read_answer(reader))[1] for _ in range(2)]
        writer.close()
        server.close()
        return bodies

    assert [json.loads(body)["body"] for body in uvloop.run(scenario())] == ["a", "b"]


async def test_a_chunked_request_is_read_whole(door: Callable[[Handler], Awaitable[Door]]) -> None:
    d = await door(echo)
    reader, writer = await d.connect()
    writer.write(b"POST /api/chat HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"3\r\nabc\r\n1;x=y\r\nd\r\n0\r\n\r\n")
    assert json.loads((await read_answer(reader))[1])["body"] == "abcd"
    writer.write(post("/api/chat", b"next"))  # and the connection goes on
    assert json.loads((await read_answer(reader))[1])["body"] == "next"
    writer.close()


async def test_connection_close_is_honoured(door: Callable[[Handler], Awaitable[Door]]) -> None:
    d = await door(echo)
    reader, writer = await d.connect()
    writer.write(post("/api/chat", extra=b"Connection: close\r\n"))
    head, _ = await read_answer(reader)
    assert b"\r\nConnection: close\r\n" in head
    assert await reader.read() == b""  # closed by the server
    writer.close()


async def streamed(request: Incoming, reply: Reply) -> None:
    await reply.start(200, "", [("Content-Type", "text/event-stream"), ("X-Bad", "a\r\nInjected: 1")], None)
    for n in range(3):
        await reply.write(b"data: %d\n\n" % n)
        await reply.write(b"")  # nothing to send: must not end the chunked body
    await reply.end()


async def test_a_body_of_unknown_length_goes_chunked(door: Callable[[Handler], Awaitable[Door]]) -> None:
    d = await door(streamed)
    async with aiohttp.ClientSession() as session:
        for _ in range(2):  # and the connection stays usable
            async with session.post(f"http://127.0.0.1:{d.port}/api/chat", data=b"{}") as response:
                assert response.headers["Transfer-Encoding"] == "chunked"
                assert "Injected" not in response.headers and "X-Bad" not in response.headers
                assert await response.read() == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


async def no_content(request: Incoming, reply: Reply) -> None:
    await reply.start(204, "", [("X-A", "1")], None)
    await reply.write(b"ignored")
    await reply.end()


async def test_a_bodiless_status_gets_no_framing_and_no_body(door: Callable[[Handler], Awaitable[Door]]) -> None:
    d = await door(no_content)
    reader, writer = await d.connect()
    writer.write(post("/api/chat") + post("/api/chat"))
    for _ in range(2):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 204 No Content\r\n")
        assert b"Content-Length" not in head and b"Transfer-Encoding" not in head
    writer.close()


async def test_a_client_that_leaves_cancels_its_exchange(door: Callable[[Handler], Awaitable[Door]]) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow(request: Incoming, reply: Reply) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    d = await door(slow)
    _, writer = await d.connect()
    writer.write(post("/api/chat"))
    await asyncio.wait_for(started.wait(), 5)
    writer.close()
    await asyncio.wait_for(cancelled.wait(), 5)


async def test_an_aborted_answer_drops_the_connection(door: Callable[[Handler], Awaitable[Door]]) -> None:
    async def cut(request: Incoming, reply: Reply) -> None:
        await reply.start(200, "", [("Content-Type", "application/json")], 100)
        await reply.write(b'{"half": ')
        reply.abort()

    d = await door(cut)
    async with aiohttp.ClientSession() as session, session.post(f"http://127.0.0.1:{d.port}/api/chat") as response:
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


async def test_an_answer_the_handler_never_finished_is_not_passed_off_as_whole(
        door: Callable[[Handler], Awaitable[Door]]) -> None:
    async def unfinished(request: Incoming, reply: Reply) -> None:
        await reply.start(200, "", [("Content-Type", "text/event-stream")], None)
        await reply.write(b"data: 1\n\n")

    d = await door(unfinished)
    async with aiohttp.ClientSession() as session, session.post(f"http://127.0.0.1:{d.port}/api/chat") as response:
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


@pytest.fixture
async def impatient(door: Callable[..., Awaitable[Door]]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to an echoing front door whose idle and head timeouts are 0.2 s."""
    return await (await door(echo, Limits(max_body=LIMIT, keepalive=0.2, header_timeout=0.2))).connect()


async def test_an_idle_connection_is_closed(impatient: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    reader, writer = impatient
    writer.write(post("/api/chat"))
    await read_answer(reader)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_a_body_still_arriving_keeps_the_connection_open(
        impatient: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    reader, writer = impatient
    request = post("/api/chat", b"0123456789")
    writer.write(request[:-10])
    for digit in request[-10:]:
        await asyncio.sleep(0.05)  # ten pieces over 0.5 s: longer than the idle timeout in all
        writer.write(bytes([digit]))
    assert json.loads((await read_answer(reader))[1])["body"] == "0123456789"
    writer.close()


async def test_a_head_never_finished_is_dropped(impatient: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    reader, writer = impatient
    pieces = [b"POST /api/chat HTTP/1.1\r\n", b"Host: a\r\n", b"X-A: 1\r\n", b"X-B: 2\r\n", b"X-C: 3\r\n"]
    with contextlib.suppress(ConnectionError):  # the server may have closed before the last pieces
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.1)
    try:
        rest = await asyncio.wait_for(reader.read(), 5)  # times out (and fails) if it stays open
    except ConnectionError:
        rest = b""  # closed while the client was still writing
    assert rest == b"" or rest.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    writer.close()


async def test_shutdown_lets_a_running_exchange_finish_and_closes_idle_ones(
        door: Callable[[Handler], Awaitable[Door]]) -> None:
    release = asyncio.Event()

    async def waits(request: Incoming, reply: Reply) -> None:
        if request.path == "/api/chat":
            await release.wait()
        await echo(request, reply)

    d = await door(waits)
    busy_reader, busy_writer = await d.connect()
    idle_reader, idle_writer = await d.connect()
    idle_writer.write(post("/api/tags"))
    await read_answer(idle_reader)
    busy_writer.write(post("/api/chat", b"kept"))
    await asyncio.sleep(0.1)
    d.lane.close()
    assert await asyncio.wait_for(idle_reader.read(), 5) == b""
    drained = asyncio.create_task(d.lane.drain(10))
    await asyncio.sleep(0.1)
    assert not drained.done()
    release.set()
    head, body = await read_answer(busy_reader)
    assert b"Connection: close" in head and json.loads(body)["body"] == "kept"
    await asyncio.wait_for(drained, 5)
    assert not d.lane.connections
    busy_writer.close()
    idle_writer.close()


async def test_shutdown_drops_exchanges_that_outlive_the_timeout(door: Callable[[Handler], Awaitable[Door]]) -> None:
    async def forever(request: Incoming, reply: Reply) -> None:
        await asyncio.sleep(60)

    d = await door(forever)
    reader, writer = await d.connect()
    writer.write(post("/api/chat"))
    await asyncio.sleep(0.1)
    await d.lane.drain(0.2)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_head_gets_the_head_alone_and_the_connection_goes_on(door: Callable[[Handler], Awaitable[Door]]) -> None:
    d = await door(echo)
    reader, writer = await d.connect()
    writer.write(b"HEAD /api/tags HTTP/1.1\r\nHost: a\r\n\r\n" + post("/api/chat", b"after"))
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: " in head
    assert json.loads((await read_answer(reader))[1])["body"] == "after"  # no body came between
    writer.close()


async def test_expect_100_continue_gets_its_interim_answer(door: Callable[[Handler], Awaitable[Door]]) -> None:
    d = await door(echo)
    reader, writer = await d.connect()
    writer.write(b"POST /api/chat HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"{}")
    assert json.loads((await read_answer(reader))[1])["body"] == "{}"
    writer.close()


async def test_an_upgrade_request_is_answered_then_closed(door: Callable[[Handler], Awaitable[Door]]) -> None:
    d = await door(echo)
    reader, writer = await d.connect()
    writer.write(b"GET /api/tags HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n\x00\x01")
    head, _ = await read_answer(reader)
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in head
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_an_http10_stream_ends_at_the_close(door: Callable[[Handler], Awaitable[Door]]) -> None:
    d = await door(streamed)
    reader, writer = await d.connect()
    writer.write(b"POST /api/chat HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    writer.close()
