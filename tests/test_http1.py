"""The data path's HTTP/1.1 client against real loopback servers that send exact bytes: framing (length,
chunked at every split, until close), keep-alive reuse and its limits, a stale connection retried once,
an early close reaching the upstream, the idle timeout, flow control, and what it refuses to send."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from tests.splits import Split, bytewise, sized, whole
from warmpool.http import client as http1
from warmpool.http.client import ConnectFailed, Origin, UpstreamBroken
from warmpool.http.wire import encode_headers

OPENSSL = shutil.which("openssl")

# A script answers each request on a connection: it gets (request bytes, index of the request on this
# connection) and the stream writer, and writes whatever it likes.
Script = Callable[[bytes, int, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawServer:
    """A loopback server that reads requests (head + Content-Length body) and lets a script answer."""

    script: Script
    url: str = ""
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        index = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    break
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                await self.script(request, index, writer)
                index += 1
                if writer.is_closing():
                    break
        except ConnectionError:
            pass
        finally:
            self.disconnected.set()
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Script], Awaitable[RawServer]]]:
    servers: list[asyncio.Server] = []

    async def start(script: Script) -> RawServer:
        raw = RawServer(script)
        server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
        servers.append(server)
        raw.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return raw

    yield start
    for server in servers:
        server.close()


def origin(url: str, idle: float = 30.0) -> Origin:
    return Origin(url, connect_timeout=5.0, idle_timeout=idle)


def answer(body: bytes, extra: bytes = b"") -> Script:
    async def script(request: bytes, index: int, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n" + extra
                     + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
    return script


def sent_in(parts: list[bytes], pause: float = 0.0) -> Script:
    """Write the response in these pieces, flushing (and optionally pausing) between them."""
    async def script(request: bytes, index: int, writer: asyncio.StreamWriter) -> None:
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(pause)
    return script


def sent_then_closed(data: bytes) -> Script:
    """Write `data` and close the connection."""
    async def script(request: bytes, index: int, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        writer.close()
    return script


CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/x-ndjson\r\n\r\n"
           b"7\r\n{\"a\":1}\r\n"
           b"A;ext=1\r\n{\"b\":22}\n\n\r\n"
           b"0\r\nX-Trailer: yes\r\n\r\n")


async def test_content_length_body_and_the_connection_is_reused(serve) -> None:
    server = await serve(answer(b"hello", b"X-Up: 1\r\n"))
    pool = origin(server.url)
    for _ in range(3):
        response = await pool.request("POST", "/v1/x", b"Accept: */*\r\n", b"{}", timeout=30)
        assert (response.status, response.reason, response.content_length) == (200, "OK", 5)
        assert response.header("x-up") == "1"
        assert await response.read() == b"hello"
        response.close()
    assert server.connections == 1 and len(server.requests) == 3
    first = server.requests[0]
    assert first.startswith(b"POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nContent-Length: 2\r\n\r\n{}" in first
    pool.close()


@pytest.mark.parametrize("split", [whole, bytewise, sized(3), sized(16)], ids=lambda s: s.__name__)
async def test_chunked_body_is_decoded_wherever_the_reads_end(serve, split: Split) -> None:
    server = await serve(sent_in(split(CHUNKED)))
    pool = origin(server.url)
    response = await pool.request("GET", "/api/ps", b"", b"", timeout=30)
    assert response.content_length is None
    assert await response.read() == b'{"a":1}{"b":22}\n\n'
    # The body ended with its last chunk, so the connection is reused.
    response = await pool.request("GET", "/api/ps", b"", b"", timeout=30)
    assert await response.read() == b'{"a":1}{"b":22}\n\n'
    assert server.connections == 1
    pool.close()


def first_then_second(release: asyncio.Event) -> Script:
    """A chunked answer: "first" at once, "second" and the end once `release` is set."""
    async def script(request: bytes, index: int, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()
    return script


async def test_chunks_are_handed_on_as_they_arrive(serve) -> None:
    release = asyncio.Event()
    script = first_then_second(release)

    pool = origin((await serve(script)).url)
    response = await pool.request("POST", "/api/chat", b"", b"{}", timeout=30)
    assert await asyncio.wait_for(response.readany(), 5) == b"first"
    release.set()
    assert await response.read() == b"second"
    pool.close()


async def test_a_body_without_length_runs_until_close(serve) -> None:
    server = await serve(sent_then_closed(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it"))
    pool = origin(server.url)
    for _ in range(2):
        response = await pool.request("GET", "/", b"", b"", timeout=30)
        assert await response.read() == b"all of it"
    assert server.connections == 2
    pool.close()


async def test_connection_close_and_bodiless_answers(serve) -> None:
    async def script(request: bytes, index: int, writer: asyncio.StreamWriter) -> None:
        if request.startswith(b"HEAD"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n")
        elif request.startswith(b"DELETE"):
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    server = await serve(script)
    pool = origin(server.url)
    head = await pool.request("HEAD", "/", b"", b"", timeout=30)
    assert head.status == 200 and await head.read() == b""
    empty = await pool.request("DELETE", "/api/delete", b"", b"", timeout=30)
    assert empty.status == 204 and await empty.read() == b""
    closing = await pool.request("GET", "/", b"", b"", timeout=30)
    assert await closing.read() == b"ok"
    again = await pool.request("GET", "/", b"", b"", timeout=30)  # the server said close: a new connection
    assert await again.read() == b"ok"
    assert server.connections == 2
    pool.close()


async def test_a_stale_reused_connection_is_retried_once_on_a_fresh_one(serve) -> None:
    async def script(request: bytes, index: int, writer: asyncio.StreamWriter) -> None:
        if index == 1:
            writer.close()  # closes as the second request arrives, as a server's keep-alive timer may
            return
        await answer(b"fine")(request, index, writer)

    server = await serve(script)
    pool = origin(server.url)
    assert await (await pool.request("POST", "/x", b"", b"1", timeout=30)).read() == b"fine"
    assert await (await pool.request("POST", "/x", b"", b"2", timeout=30)).read() == b"fine"
    assert server.connections == 2 and len(server.requests) == 3
    pool.close()


async def test_a_fresh_connection_closed_before_the_answer_is_an_error(serve) -> None:
    async def script(request: bytes, index: int, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await serve(script)
    with pytest.raises(UpstreamBroken, match="before the response"):
        await origin(server.url).request("POST", "/x", b"", b"{}", timeout=30)
    assert len(server.requests) == 1  # not sent twice


async def test_idle_connections_are_not_reused_after_the_keepalive_limit(serve, monkeypatch) -> None:
    server = await serve(answer(b"x"))
    pool = origin(server.url)
    await (await pool.request("GET", "/", b"", b"", timeout=30)).read()
    monkeypatch.setattr(http1, "KEEPALIVE_SECONDS", 0.0)
    await (await pool.request("GET", "/", b"", b"", timeout=30)).read()
    assert server.connections == 2
    pool.close()


async def test_closing_mid_body_closes_the_connection(serve) -> None:
    async def script(request: bytes, index: int, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:
            writer.write(b"3\r\ntok\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)

    server = await serve(script)
    pool = origin(server.url)
    response = await pool.request("POST", "/api/generate", b"", b"{}", timeout=30)
    assert (await response.readany()).startswith(b"tok")
    response.close()
    await asyncio.wait_for(server.disconnected.wait(), 5)  # the upstream saw its client go
    pool.close()


async def test_no_head_within_the_timeout_is_a_timeout_and_the_request_is_dropped(serve) -> None:
    server = await serve(sent_in([], pause=30))
    with pytest.raises(TimeoutError):
        await origin(server.url).request("POST", "/x", b"", b"{}", timeout=0.2)
    await asyncio.wait_for(server.disconnected.wait(), 5)


async def test_silence_after_the_head_is_a_timeout(serve) -> None:
    server = await serve(sent_in([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n"],
                                 pause=30))
    response = await origin(server.url, idle=0.2).request("POST", "/x", b"", b"{}", timeout=30)
    assert await response.readany() == b"hi"
    with pytest.raises(TimeoutError):
        await response.readany()
    response.close()


async def test_silence_is_timed_on_a_kept_connection_whatever_its_earlier_waits(serve) -> None:
    # One timer per connection serves the waits of all its answers: a wait shorter than the earlier ones
    # must not be left to a later timer, and a timer left from an earlier wait must not cut a longer one.
    async def script(request: bytes, index: int, writer: asyncio.StreamWriter) -> None:
        if index in (0, 2):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        else:
            await asyncio.sleep(30)

    loop = asyncio.get_running_loop()
    for first, second in ((30.0, 0.2), (0.1, 0.6)):
        server = await serve(script)
        pool = origin(server.url)
        assert await (await pool.request("GET", "/", b"", b"", timeout=first)).read() == b"ok"
        started = loop.time()
        with pytest.raises(TimeoutError):
            await pool.request("GET", "/", b"", b"", timeout=second)
        assert second - 0.05 <= loop.time() - started < second + 2
        assert server.connections == 1
        pool.close()


async def test_dropped_mid_body_is_an_error_not_a_short_body(serve) -> None:
    server = await serve(sent_then_closed(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"))
    response = await origin(server.url).request("GET", "/", b"", b"", timeout=30)
    with pytest.raises(UpstreamBroken, match="mid-response"):
        await response.read()


@pytest.mark.parametrize("reply", [
    b"SSH-2.0-OpenSSH\r\n\r\n",
    b"HTTP/1.1 abc Weird\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n Folded: no\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nx\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\nxy\r\n",
])
async def test_what_is_not_http_is_refused(serve, reply: bytes) -> None:
    server = await serve(sent_in([reply], pause=5))
    with pytest.raises(UpstreamBroken):
        response = await origin(server.url).request("GET", "/", b"", b"", timeout=30)
        await response.read()


async def test_reading_pauses_while_the_reader_lags_and_loses_nothing(serve) -> None:
    piece = bytes(range(256)) * 256  # 64 KiB
    pieces = 40

    async def script(request: bytes, index: int, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(piece) * pieces))
        for _ in range(pieces):
            writer.write(piece)
            await writer.drain()

    response = await origin((await serve(script)).url).request("GET", "/", b"", b"", timeout=30)
    await asyncio.sleep(0.3)  # the server writes; we do not read
    assert response._paused and response._buffered < 2 * http1.HIGH_WATER
    assert await response.read() == piece * pieces


async def test_values_that_would_split_the_head_are_not_sent(serve) -> None:
    server = await serve(answer(b""))
    pool = origin(server.url + "/prefix")
    headers = encode_headers([("X-Evil", "a\r\nInjected: 1"), ("X-Ok", "é")])
    response = await pool.request("GET", "/api/tags?a=b c", headers, b"", timeout=30)
    await response.read()
    sent = server.requests[0]
    assert sent.startswith(b"GET /prefix/api/tags?a=b%20c HTTP/1.1\r\n")
    assert b"Injected" not in sent and b"X-Evil" not in sent
    assert "X-Ok: é".encode() in sent
    pool.close()


async def test_nothing_listening_is_a_connect_failure() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(ConnectFailed):
        await origin(f"http://127.0.0.1:{port}").request("GET", "/", b"", b"", timeout=30)


def test_host_header_omits_default_ports_and_brackets_ipv6() -> None:
    assert origin("http://example.test").host_header == "example.test"
    assert origin("https://example.test:443/v1").host_header == "example.test"
    assert origin("http://[::1]:8080").host_header == "[::1]:8080"
    with pytest.raises(ValueError):
        origin("ftp://example.test")


CLIENT_HEADERS = [
    ("Host", "evil.example"), ("Connection", "keep-alive"), ("Content-Length", "2"),
    ("Content-Type", "application/x-www-form-urlencoded"), ("Expect", "100-continue"),
    ("Authorization", "Bearer client-key"), ("X-Warmpool-Phase", "plan"), ("Accept", "*/*"),
    ("X-Request-Id", "abc"), ("x-api-key", "client-key"),
]


async def test_only_end_to_end_headers_go_upstream(serve) -> None:
    from warmpool.backends.openai import OpenAIBackend
    from warmpool.config import config_from_mapping

    server = await serve(answer(b"{}"))
    backends = {"o": {"kind": "openai", "url": server.url, "api_key": "upstream-key"}}
    cfg = config_from_mapping({"backends": backends, "models": {"m": {"backend": "o"}}},
                              env={}, source="<test>")
    backend = OpenAIBackend(cfg.backends["o"], cfg)
    # The client's raw bytes, as the server parsed them, minus hop-by-hop ones; the backend's key added.
    raw = tuple((name.encode(), value.encode()) for name, value in CLIENT_HEADERS)
    response = await backend.forward(cfg.models["m"], "POST", "/v1/chat/completions", raw, b"{}")
    await response.read()
    await backend.close()
    sent = server.requests[0].split(b"\r\n\r\n")[0].split(b"\r\n")
    assert sent[2:] == [b"Accept: */*", b"X-Request-Id: abc", b"Authorization: Bearer upstream-key",
                        b"Content-Type: application/json", b"Content-Length: 2"]
    assert sent[1] == b"Host: " + server.url.removeprefix("http://").encode()


@pytest.fixture
def certificate(tmp_path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1, and its key."""
    assert OPENSSL is not None, "the openssl command makes this test's certificate"
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=x",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return str(cert), str(key)


@pytest.mark.skipif(OPENSSL is None and not os.environ.get("CI"), reason="openssl is not installed "
                    "(apt-get install openssl; under CI this test fails instead)")
async def test_https_upstreams_are_verified_and_spoken_to(certificate, monkeypatch) -> None:
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    raw = RawServer(answer(b"secret"))
    server = await asyncio.start_server(raw.handle, "127.0.0.1", 0, ssl=server_tls)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ConnectFailed):  # not signed by anything this machine trusts
            await origin(f"https://127.0.0.1:{port}").request("GET", "/", b"", b"", timeout=30)
        monkeypatch.setenv("SSL_CERT_FILE", cert)  # now it is trusted
        pool = origin(f"https://127.0.0.1:{port}")
        response = await pool.request("GET", "/v1/models", b"", b"", timeout=30)
        assert await response.read() == b"secret"
        assert raw.requests[-1].startswith(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:")
        pool.close()
    finally:
        server.close()


async def test_origins_of_servers_that_went_away_are_forgotten(serve) -> None:
    from warmpool.backends.openai import OpenAIBackend
    from warmpool.config import config_from_mapping

    old, new = await serve(answer(b"{}")), await serve(answer(b"{}"))
    cfg = config_from_mapping({"backends": {"o": {"kind": "openai", "url": old.url}},
                               "models": {"m": {"backend": "o"}}}, env={}, source="<test>")
    backend = OpenAIBackend(cfg.backends["o"], cfg)
    await (await backend.forward(cfg.models["m"], "GET", "/v1/models", (), b"")).read()
    assert backend._origins[old.url].open_connections == 1  # idle, kept for reuse
    backend._origins[old.url].close()  # the server went away (a managed process stopped)
    await asyncio.sleep(0.05)
    assert backend._origins[old.url].open_connections == 0
    backend.base_url = lambda model: new.url  # as a restarted llama.cpp server on a new port
    await (await backend.forward(cfg.models["m"], "GET", "/v1/models", (), b"")).read()
    assert list(backend._origins) == [new.url]
    await backend.close()


async def test_repeated_headers_are_kept_in_order_and_joined_when_asked_for(serve) -> None:
    head = (b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nX-Name: caf\xc3\xa9\r\n"
            b"set-cookie: b=2\r\nContent-Length: 0\r\n\r\n")
    server = await serve(sent_in([head]))
    response = await origin(server.url).request("GET", "/", b"", b"", timeout=30)
    assert response.headers == [("Set-Cookie", "a=1"), ("X-Name", "café"), ("set-cookie", "b=2"),
                                ("Content-Length", "0")]
    assert response.header("SET-COOKIE") == "a=1, b=2" and response.header("x-name") == "café"


async def test_a_doubled_content_length_is_refused(serve) -> None:
    server = await serve(sent_in([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc"],
                                 pause=5))
    with pytest.raises(UpstreamBroken, match="Content-Length"):
        await origin(server.url).request("GET", "/", b"", b"", timeout=30)


async def test_a_second_answer_in_the_same_read_is_not_taken_for_the_next_one(serve) -> None:
    # The connection's parser lives as long as it does: bytes after a complete answer must not start
    # the next request's answer, nor touch the answer already read.
    async def script(request: bytes, index: int, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                     b"HTTP/1.1 201 Created\r\nX-Extra: 1\r\nContent-Length: 3\r\n\r\nbad")
        await writer.drain()

    server = await serve(script)
    pool = origin(server.url)
    first = await pool.request("GET", "/", b"", b"", timeout=30)
    assert first.status == 200 and await first.read() == b"ok"
    assert first.headers == [("Content-Length", "2")]
    second = await pool.request("GET", "/", b"", b"", timeout=30)
    assert second.status == 200 and await second.read() == b"ok"
    assert server.connections == 2  # the first connection was not trusted again
    pool.close()


async def test_many_answers_on_one_kept_connection(serve) -> None:
    server = await serve(sent_in([CHUNKED]))
    pool = origin(server.url)
    for _ in range(5):
        response = await pool.request("GET", "/", b"", b"", timeout=30)
        assert await response.read() == b'{"a":1}{"b":22}\n\n'
    head = await pool.request("GET", "/", b"", b"", timeout=30)
    assert head.header("content-type") == "application/x-ndjson"
    await head.read()
    assert server.connections == 1
    pool.close()


@pytest.mark.parametrize("pieces", [1, 40], ids=["one write", "many writes"])
async def test_a_head_over_the_limit_is_refused_however_it_arrives(serve, pieces: int) -> None:
    fields = b"".join(b"X-Pad-%d: %s\r\n" % (index, b"v" * 1000) for index in range(70))  # 70 kB, 70 fields
    head = b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 2\r\n\r\nok"
    size = -(-len(head) // pieces)
    server = await serve(sent_in([head[at:at + size] for at in range(0, len(head), size)]))
    with pytest.raises(UpstreamBroken, match="larger than"):
        await origin(server.url).request("GET", "/", b"", b"", timeout=30)


async def test_a_head_just_under_the_limit_with_a_large_body_in_the_same_read_is_taken(serve) -> None:
    fields = b"".join(b"X-Pad-%d: %s\r\n" % (index, b"v" * 1000) for index in range(60))  # 61 kB
    body = b"b" * 200_000
    server = await serve(sent_in([b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: %d\r\n\r\n" % len(body)
                                  + body]))
    response = await origin(server.url).request("GET", "/", b"", b"", timeout=30)
    assert len(response.headers) == 61 and await response.read() == body


# -- pipe(): chunks handed to a sink from the connection's callback ------------------------------------------

async def test_pipe_hands_each_chunk_on_while_the_caller_sleeps(serve) -> None:
    release = asyncio.Event()
    script = first_then_second(release)

    got: list[bytes] = []
    first = asyncio.Event()

    def sink(chunk: bytes) -> bool:
        got.append(chunk)
        first.set()
        return False

    pool = origin((await serve(script)).url)
    response = await pool.request("POST", "/api/chat", b"", b"{}", timeout=30)
    piping = asyncio.create_task(response.pipe(sink))
    await asyncio.wait_for(first.wait(), 5)
    assert got == [b"first"] and not piping.done()  # delivered from the callback, the caller still asleep
    release.set()
    assert await asyncio.wait_for(piping, 5) is True
    assert b"".join(got) == b"firstsecond"
    assert len(pool._idle) == 1  # read to its end: the connection went back to the pool
    pool.close()


async def test_a_full_sink_pauses_the_upstream_and_loses_nothing(serve) -> None:
    piece = bytes(range(256)) * 256  # 64 KiB
    pieces = 40

    async def script(request: bytes, index: int, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(piece) * pieces))
        for _ in range(pieces):
            writer.write(piece)
            await writer.drain()

    got: list[bytes] = []
    response = await origin((await serve(script)).url).request("GET", "/", b"", b"", timeout=30)
    assert await asyncio.wait_for(response.pipe(lambda chunk: got.append(chunk) is None), 5) is False
    await asyncio.sleep(0.3)  # the sink said it is full: the upstream connection is not read meanwhile
    assert response._paused and response._buffered < 2 * http1.HIGH_WATER
    while not await asyncio.wait_for(response.pipe(lambda chunk: got.append(chunk) is not None), 5):
        pass
    assert b"".join(got) == piece * pieces


async def test_pipe_times_silence_not_the_whole_stream(serve) -> None:
    # Chunks every 0.1 s for 0.8 s with an idle timeout of 0.3 s: no timeout; then silence: a timeout.
    parts = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"] + [b"2\r\nhi\r\n"] * 8
    server = await serve(sent_in(parts, pause=0.1))
    got: list[bytes] = []
    response = await origin(server.url, idle=0.3).request("POST", "/x", b"", b"{}", timeout=30)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(response.pipe(lambda chunk: got.append(chunk) is not None), 10)
    assert b"".join(got) == b"hi" * 8
    response.close()


async def test_what_the_sink_raises_pipe_raises_and_a_drop_is_an_error(serve) -> None:
    server = await serve(sent_in([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"2\r\nhi\r\n"],
                                 pause=0.05))

    def sink(chunk: bytes) -> bool:
        raise ConnectionResetError("the client closed the connection")

    response = await origin(server.url).request("POST", "/x", b"", b"{}", timeout=30)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(response.pipe(sink), 5)
    response.close()
    server = await serve(sent_then_closed(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"))
    response = await origin(server.url).request("GET", "/", b"", b"", timeout=30)
    with pytest.raises(UpstreamBroken, match="mid-response"):
        await asyncio.wait_for(response.pipe(lambda chunk: False), 5)
