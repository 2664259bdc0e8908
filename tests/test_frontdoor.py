"""The front door (warmpool's own HTTP/1.1 server for the proxied routes) against real loopback clients
that send exact bytes: which requests it takes and which it hands to aiohttp (with the connection and
every byte buffered), keep-alive, pipelining, bodies in pieces, chunked and bodiless answers, a client
that leaves, a cut answer, the idle timeout, and shutdown; and, against h11, that every head it takes
is one a strict parser reads the same way."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import h11
import pytest
from aiohttp import web

from tests.splits import bytewise
from warmpool.http import server as frontdoor
from warmpool.http.exchange import Incoming, Reply
from warmpool.http.server import INCOMPLETE, Head, Lane, parse_head

PATHS = frozenset({"/api/chat", "/v1/chat/completions", "/api/tags"})
LIMIT = 1000


def takes(path: str) -> bool:
    return path in PATHS


def head_of(raw: bytes, limit: int = LIMIT) -> Head | str | None:
    return parse_head(raw, takes, limit)


# -- which heads the front door takes (pure) -----------------------------------------------------------------

def test_takes_a_plain_post_and_keeps_the_raw_query_and_headers() -> None:
    raw = (b"POST /api/chat?x=1&y=%2F HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nX-Warmpool-Phase: plan\r\n"
           b"x-warmpool-phase: other\r\n\r\n{}")
    head = head_of(raw)
    assert isinstance(head, Head)
    assert (head.method, head.path, head.query, head.content_length, head.close) == (
        "POST", "/api/chat", "x=1&y=%2F", 2, False)
    assert head.size == raw.index(b"{}")
    assert head.fields.get("X-WARMPOOL-PHASE") == "plan"  # any case; the first of repeated fields
    assert head.fields.get("Authorization", "") == ""
    assert head.raw_headers[2] == (b"X-Warmpool-Phase", b"plan")


def test_connection_close_is_noted() -> None:
    head = head_of(b"GET /api/tags HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n")
    assert isinstance(head, Head) and head.close and head.content_length == 0


def test_an_unfinished_head_needs_more_bytes_until_it_is_too_long() -> None:
    assert head_of(b"POST /api/chat HTTP/1.1\r\nHost: a\r\n") == INCOMPLETE
    assert head_of(b"POST /api/chat HTTP/1.1\r\nX: " + b"a" * frontdoor.MAX_HEAD) is None


@pytest.mark.parametrize("raw", [
    b"POST /api/chat HTTP/1.0\r\nContent-Length: 0\r\n\r\n",  # not HTTP/1.1
    b"HEAD /api/tags HTTP/1.1\r\n\r\n",  # a method it does not take
    b"OPTIONS * HTTP/1.1\r\n\r\n",
    b"POST http://a/api/chat HTTP/1.1\r\n\r\n",  # absolute form
    b"POST /healthz HTTP/1.1\r\n\r\n",  # not a proxied path
    b"POST /api/%63hat HTTP/1.1\r\n\r\n",  # escapes in the path: aiohttp decodes them
    b"POST //api/chat HTTP/1.1\r\n\r\n",
    b"POST /api/./chat HTTP/1.1\r\n\r\n",
    b"POST /api/chat#x HTTP/1.1\r\n\r\n",
    b"POST  /api/chat HTTP/1.1\r\n\r\n",  # two spaces
    b"POST /api/chat HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST /api/chat HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST /api/chat HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
    b"GET /api/tags HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"POST /api/chat HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n",  # repeated
    b"POST /api/chat HTTP/1.1\r\nContent-Length: +2\r\n\r\n",
    b"POST /api/chat HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\n",
    b"POST /api/chat HTTP/1.1\r\nContent-Length: 0x2\r\n\r\n",
    b"POST /api/chat HTTP/1.1\r\nContent-Length: 1001\r\n\r\n",  # over the limit: aiohttp answers 413
    b"POST /api/chat HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"POST /api/chat HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n",  # obs-fold
    b"POST /api/chat HTTP/1.1\r\nX-A : 1\r\n\r\n",  # space before the colon
    b"POST /api/chat HTTP/1.1\r\nX-A: 1\nX-B: 2\r\n\r\n",  # a bare LF
    b"POST /api/chat HTTP/1.1\r\nX-A: 1\rX-B: 2\r\n\r\n",  # a bare CR
    b"POST /api/chat HTTP/1.1\r\nX-A: a\x00b\r\n\r\n",  # a control character
    b"POST /api/chat HTTP/1.1\r\nNo colon here\r\n\r\n",
    b"POST /api/chat HTTP/1.1\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n",  # too many fields
])
def test_declines_what_it_does_not_fully_understand(raw: bytes) -> None:
    assert head_of(raw) is None


BASES = [
    b"POST /api/chat HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n",
    b"GET /api/tags?x=1 HTTP/1.1\r\nHost: localhost:11435\r\nAccept: */*\r\nUser-Agent: t/1\r\n\r\n",
    (b"POST /v1/chat/completions HTTP/1.1\r\nhost: b\r\nAuthorization: Bearer k\r\nContent-Length: 10\r\n"
     b"X-Warmpool-Phase:  plan \r\n\r\n"),
]
NASTY = b"\r\n\t :/%.?#aA0\x00\x7f\x80\xff-,"


def mutated(rng: random.Random, raw: bytes) -> bytes:
    """`raw` with one to three random edits: a byte inserted, deleted or replaced, or a line doubled."""
    out = bytearray(raw)
    for _ in range(rng.randint(1, 3)):
        op, at = rng.random(), rng.randrange(len(out) - 4)
        if op < 0.4:
            out.insert(at, rng.choice(NASTY))
        elif op < 0.7:
            del out[at]
        elif op < 0.85:
            out[at] = rng.choice(NASTY)
        else:
            lines = bytes(out).split(b"\r\n")
            line = rng.randrange(1, max(2, len(lines) - 2))
            lines.insert(line, lines[line])
            out = bytearray(b"\r\n".join(lines))
    return bytes(out)


def test_every_head_it_takes_is_one_a_strict_parser_reads_the_same_way() -> None:
    """Differential check against h11 (a strict HTTP/1.1 parser): of thousands of mangled heads, each one
    the front door takes must be valid to h11 with the same method, target and fields. (h11 also demands
    a Host field, which neither the front door nor aiohttp requires.)"""
    rng = random.Random(20261130)
    taken = 0
    for _ in range(4000):
        raw = mutated(rng, rng.choice(BASES))
        head = head_of(raw)
        if not isinstance(head, Head):
            continue
        taken += 1
        connection = h11.Connection(h11.SERVER)
        connection.receive_data(raw)
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError as exc:
            assert "Host" in str(exc), (raw, exc)
            continue
        assert isinstance(event, h11.Request), raw
        target = head.path.encode() + (b"?" + head.query.encode() if head.query else b"")
        assert (event.method, event.target.removesuffix(b"?")) == (head.method.encode(), target), raw
        assert list(event.headers) == [(name.lower(), value) for name, value in head.raw_headers], raw
        assert head.content_length == int(dict(event.headers).get(b"content-length", b"0")), raw
    assert taken > 500  # the mutations must leave plenty that are taken, or this tests nothing


# -- on a socket ---------------------------------------------------------------------------------------------

@dataclass
class Door:
    """A front door on loopback, in front of an aiohttp server that says it answered."""

    lane: Lane
    port: int
    seen: list[str] = field(default_factory=list)  # "front PATH" or "aiohttp PATH", in order

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


Handler = Callable[[Incoming, Reply], Awaitable[None]]


async def echo(request: Incoming, reply: Reply) -> None:
    body = json.dumps({"path": request.path, "query": request.query, "body": (await request.read()).decode(),
                       "phase": request.headers.get("X-Warmpool-Phase")}).encode()
    await reply.whole(200, "", [("Content-Type", "application/json"), ("X-Served-By", "front")], body)


@pytest.fixture
async def door() -> AsyncIterator[Callable[[Handler], Awaitable[Door]]]:
    servers: list[asyncio.Server] = []
    runners: list[web.ServerRunner] = []

    async def start(handle: Handler) -> Door:
        seen: list[str] = []

        async def front(request: Incoming, reply: Reply) -> None:
            seen.append(f"front {request.path}")
            await handle(request, reply)

        async def fallback(request: web.BaseRequest) -> web.Response:
            seen.append(f"aiohttp {request.path}")
            return web.Response(text=f"aiohttp {request.method} {request.path} {(await request.read()).decode()}",
                                headers={"X-Served-By": "aiohttp"})

        runner = web.ServerRunner(web.Server(fallback))
        await runner.setup()
        runners.append(runner)
        lane = Lane(front, takes, LIMIT)
        lane.fallback = runner.server
        server = await asyncio.get_running_loop().create_server(lane.protocol, "127.0.0.1", 0)
        servers.append(server)
        return Door(lane, server.sockets[0].getsockname()[1], seen)

    yield start
    for server in servers:
        server.close()
    for runner in runners:
        await runner.cleanup()


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


async def test_hands_the_connection_to_aiohttp_at_the_first_request_it_declines(
        door: Callable[[Handler], Awaitable[Door]]) -> None:
    d = await door(echo)
    reader, writer = await d.connect()
    writer.write(post("/api/chat", b"a"))
    assert b"X-Served-By: front" in (await read_answer(reader))[0]
    # declined (not a proxied path), pipelined with a proxied one: both reach aiohttp, bytes intact
    writer.write(post("/healthz", b"b") + post("/api/chat", b"c"))
    assert (await read_answer(reader))[1] == b"aiohttp POST /healthz b"
    assert (await read_answer(reader))[1] == b"aiohttp POST /api/chat c"
    assert d.seen == ["front /api/chat", "aiohttp /healthz", "aiohttp /api/chat"]
    assert not d.lane.connections  # no longer the front door's
    writer.close()


def test_the_hand_over_works_on_uvloop_too() -> None:
    """warmpool runs on uvloop (app.run): the transport's protocol switch must work there as well."""
    import uvloop

    async def scenario() -> list[bytes]:
        async def fallback(request: web.BaseRequest) -> web.Response:
            return web.Response(text=f"aiohttp {request.path} {(await request.read()).decode()}")

        runner = web.ServerRunner(web.Server(fallback))
        await runner.setup()
        lane = Lane(echo, takes, LIMIT)
        lane.fallback = runner.server
        server = await asyncio.get_running_loop().create_server(lane.protocol, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        writer.write(post("/api/chat", b"a"))
        bodies = [(await read_answer(reader))[1]]
        writer.write(post("/healthz", b"b") + post("/api/chat", b"c"))
        bodies += [(await read_answer(reader))[1] for _ in range(2)]
        writer.close()
        server.close()
        await runner.cleanup()
        return bodies

    first, *handed = uvloop.run(scenario())
    assert json.loads(first)["body"] == "a"
    assert handed == [b"aiohttp /healthz b", b"aiohttp /api/chat c"]


async def test_a_chunked_request_goes_to_aiohttp_which_reads_it(door: Callable[[Handler], Awaitable[Door]]) -> None:
    d = await door(echo)
    reader, writer = await d.connect()
    writer.write(b"POST /api/chat HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert (await read_answer(reader))[1] == b"aiohttp POST /api/chat abc"
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
async def impatient(door: Callable[[Handler], Awaitable[Door]],
                    monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to an echoing front door whose idle timeout is 0.2 s."""
    monkeypatch.setattr(frontdoor, "KEEPALIVE_SECONDS", 0.2)
    return await (await door(echo)).connect()


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
    assert rest == b""
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
