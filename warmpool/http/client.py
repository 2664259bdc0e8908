"""The data path's HTTP/1.1 client: keep-alive connections to an upstream, each request written in one
call, the response parsed by llhttp (httptools) and its body handed on chunk by chunk as it arrives.

Why not aiohttp's client here: on the proxy's hot path it cost about 70 µs of the 250 µs warmpool spent
on each request (benchmarks/overhead.py), for features a reverse proxy does not use (redirects, cookies,
decompression, a request model). Calls the proxy makes on its own behalf (load, unload, /api/ps) still
use aiohttp. Bodies are passed through untouched: chunked transfer coding is undone, content coding is not.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections import deque
from collections.abc import Callable
from urllib.parse import quote

import httptools
from yarl import URL

MAX_HEAD = 64 * 1024  # bytes of status line and headers an upstream may send
MAX_FIELDS = 200  # header fields an upstream may send
HIGH_WATER = 256 * 1024  # body bytes buffered before reading from the upstream pauses
# An idle connection is not reused after this long: llama.cpp (uvicorn, cpp-httplib) and most servers
# close idle keep-alive connections after 5 s, and a request written as they close is lost.
KEEPALIVE_SECONDS = 4.0
NO_BODY_STATUSES = frozenset({204, 304})
SAFE_TARGET = "/?&=%:+,;@!$'()*~-._"
UNSAFE_IN_TARGET = re.compile(r"[^\x21-\x7e]|#")  # non-ASCII, spaces, controls, a fragment


Sink = Callable[[bytes], bool]  # takes a body chunk; True when it can take no more for now


class UpstreamBroken(Exception):
    """The upstream closed or broke the connection, or did not speak HTTP/1.x."""


class ConnectFailed(UpstreamBroken):
    """No connection to the upstream could be opened."""


class Origin:
    """Keep-alive connections to one upstream (scheme, host, port, and a path prefix)."""

    def __init__(self, base_url: str, *, connect_timeout: float, idle_timeout: float) -> None:
        url = URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = url.host
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.tls = ssl.create_default_context() if url.scheme == "https" else None
        host = f"[{url.raw_host}]" if ":" in (url.raw_host or "") else url.raw_host
        self.host_header = host if url.is_default_port() else f"{host}:{self.port}"
        self.prefix = url.raw_path.rstrip("/")
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._idle: list[Connection] = []
        self.open_connections = 0  # idle or carrying a request

    async def request(self, method: str, target: str, headers: bytes, body: bytes, *,
                      timeout: float) -> Response:
        """Send one request and wait for the head of its answer; the body is read from the Response.
        `headers` is an encoded block (see wire.encode_headers, wire.forwardable); Host and Content-Length are
        added here. TimeoutError when no head arrived within `timeout` seconds, connecting included."""
        head = self._head(method, target, headers, body)
        reused = self._checkout()
        # The kept connection's loop when there is one: get_running_loop() is a getpid() call on 3.11.
        deadline = (reused.loop if reused is not None else asyncio.get_running_loop()).time() + timeout
        for connection in (reused, None):
            if connection is None:
                connection = await self._connect(deadline)
            response = connection.send(head + body if body else head, expect_body=method != "HEAD")
            try:
                await response.head_received(deadline)
                return response
            except UpstreamBroken:
                # A reused connection the upstream closed just as the request went out: the upstream
                # never saw it, so it is sent again once, on a fresh connection.
                if not (connection is reused and response.nothing_received):
                    raise
            except BaseException:
                response.close()
                raise
        raise AssertionError("unreachable: the second attempt uses a fresh connection")

    def close(self) -> None:
        """Close the idle connections (connections in use close when their response does)."""
        for connection in self._idle:
            connection.abort()
        self._idle.clear()

    def _head(self, method: str, target: str, headers: bytes, body: bytes) -> bytes:
        target = self.prefix + target
        if UNSAFE_IN_TARGET.search(target):
            target = quote(target, safe=SAFE_TARGET)
        sends_body = body or method in ("POST", "PUT", "PATCH", "DELETE")
        length = f"Content-Length: {len(body)}\r\n" if sends_body else ""
        start = f"{method} {target} HTTP/1.1\r\nHost: {self.host_header}\r\n"
        return b"%s%s%s\r\n" % (start.encode("ascii"), headers, length.encode("ascii"))

    def _checkout(self) -> Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed and now - connection.idle_since < KEEPALIVE_SECONDS:
                return connection
            connection.abort()
        return None

    def checkin(self, connection: Connection) -> None:
        connection.idle_since = time.monotonic()
        self._idle.append(connection)

    def discard(self, connection: Connection) -> None:
        if connection in self._idle:
            self._idle.remove(connection)

    async def _connect(self, deadline: float) -> Connection:
        loop = asyncio.get_running_loop()
        connect_by = loop.time() + self.connect_timeout
        try:
            async with asyncio.timeout_at(min(deadline, connect_by)):
                _, connection = await loop.create_connection(
                    lambda: Connection(self), self.host, self.port, ssl=self.tls,
                    server_hostname=self.host if self.tls else None)
        except TimeoutError:
            if deadline < connect_by:
                raise  # the whole request's time ran out first
            raise ConnectFailed(f"no connection within {self.connect_timeout:g} s") from None
        except OSError as exc:
            raise ConnectFailed(exc.strerror or str(exc)) from exc
        return connection


class Connection(asyncio.Protocol):
    """One TCP connection; it carries one request at a time and feeds the bytes to that request's Response."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        # Kept: on Python 3.11 every asyncio.get_running_loop() is a getpid() system call.
        self.loop = asyncio.get_running_loop()
        self.response: Response | None = None
        self.closed = False
        self.idle_since = 0.0
        # One llhttp parser for the connection's life, its callbacks filling in the Response being received:
        # one per answer cost about 1.3 µs (a parser made, and a reference cycle with its answer).
        self.parser = httptools.HttpResponseParser(self)
        self.fields: list[tuple[bytes, bytes]] = []  # the raw header fields of the head being parsed
        # One timer for the silences of all its answers, re-armed only when it fires early: a timer armed
        # and cancelled for every wait cost more (each answer waits at least once, a stream once a chunk).
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.origin.open_connections += 1

    def send(self, data: bytes, *, expect_body: bool) -> Response:
        assert self.transport is not None and self.response is None
        self.response = Response(self, expect_body, self.origin.idle_timeout, self.loop)
        self.transport.write(data)
        return self.response

    def data_received(self, data: bytes) -> None:
        if self.response is None:
            self.abort()  # bytes nobody asked for: this connection can no longer be trusted
            return
        self.response.feed(data)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.origin.open_connections -= 1
        self.origin.discard(self)
        if self.response is not None:
            self.response.lost(exc)

    def finished(self, reusable: bool) -> None:
        """The response is complete: the connection goes back to its origin, or is closed."""
        self.response = None
        if reusable and not self.closed:
            assert self.transport is not None
            self.transport.resume_reading()
            self.origin.checkin(self)
        else:
            self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def watch(self, until: float) -> None:
        """Make sure the timer fires by `until` (loop time), when the waiting answer's silence runs out."""
        if self.timer is None or self.timer_at > until:
            if self.timer is not None:
                self.timer.cancel()
            self.timer_at = until
            self.timer = self.loop.call_at(until, self._check_silence)

    def _check_silence(self) -> None:
        self.timer = None
        response = self.response
        if response is not None and response._waiter is not None:  # else nobody waits: the timer rests
            if self.loop.time() >= response._wait_until:
                response._timed_out()
            else:
                self.watch(response._wait_until)

    # -- llhttp's callbacks, for self.response (set whenever bytes are fed) --------------------------------

    def on_message_begin(self) -> None:
        if self.response._done:  # type: ignore[union-attr]
            raise _Trailing

    def on_status(self, reason: bytes) -> None:
        self.response._reason += reason  # type: ignore[union-attr]

    def on_header(self, name: bytes, value: bytes) -> None:
        # Per field of every answer, so kept lean: llhttp checked the name is a token and the value has no
        # control bytes; the head's size is checked once it is complete, or after each read until then.
        fields = self.fields
        fields.append((name, value))
        if len(fields) > MAX_FIELDS:
            raise UpstreamBroken(f"response head over {MAX_FIELDS} fields")

    def on_headers_complete(self) -> None:
        fields, self.fields = self.fields, []
        self.response._head_complete(self.parser, fields)  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        response = self.response
        response._chunks.append(body)  # type: ignore[union-attr]
        response._buffered += len(body)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        response = self.response
        if response._head_done:  # type: ignore[union-attr]  # not an interim 1xx answer's end
            response._done = True  # type: ignore[union-attr]


class _Trailing(Exception):
    """Raised from llhttp's message-begin callback: a second answer after the one asked for, in the same read."""


class _HeadEnd(Exception):
    """Raised from llhttp's headers-complete callback to stop it at the end of a bodiless answer's head
    (an answer to HEAD declares a length it does not send, and httptools cannot tell llhttp so)."""


class Response:
    """An upstream's answer: status, reason and headers once the head is in; the body through readany()
    and read(). close() releases it: back to the pool when the body was read to its end, else the
    connection is closed, which is how an upstream learns that its client left.

    llhttp (httptools) parses the bytes in strict mode: a status line, header field or chunk it rejects
    (bare LF, a space in a name, a NUL or other control byte in a value, a bad chunk size, doubled
    Content-Length) makes the answer an UpstreamBroken, so nothing a client could not parse is relayed."""

    def __init__(self, connection: Connection, expect_body: bool, idle_timeout: float,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []  # as sent, in order
        self._fields: dict[str, str] = {}  # by lower-case name
        self.content_length: int | None = None
        self.nothing_received = True
        self._connection: Connection | None = connection
        self._expect_body = expect_body
        self._idle_timeout = idle_timeout
        self._loop = loop
        self._head_size = 0  # bytes received before the head was complete
        self._reason = b""
        self._head_done = False
        self._until_close = False  # no framing: the body ends where the connection does
        self._keep_alive = True
        self._done = False
        self._error: BaseException | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._wait_until = 0.0  # loop time the current wait gives up at
        self._sink: Sink | None = None  # while pipe() runs: where each chunk goes as it is parsed
        self._sink_full = False  # the sink asked for no more for now

    # -- reading (the relay's side) ------------------------------------------------------------------------

    async def head_received(self, deadline: float) -> None:
        while not self._head_done:
            if self._error is not None:
                raise self._error
            await self._wait(deadline)

    def header(self, name: str) -> str | None:
        """A header's value (repeated ones joined with ", "), or None."""
        return self._fields.get(name.lower())

    async def readany(self) -> bytes:
        """The body bytes that have arrived since the last call, waiting for some if none have;
        b"" at the end of the body. Silence longer than the idle timeout raises TimeoutError."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            await self._wait(self._loop.time() + self._idle_timeout)
        data = self._take()
        self._resume()
        return data

    async def pipe(self, sink: Sink) -> bool:
        """Hand the body to `sink` chunk by chunk, each from the connection's own callback as soon as llhttp
        has framed it: no wake-up of the caller per chunk (on a stream that was most of the proxy's work per
        chunk). True at the body's end; False as soon as `sink` returns True (its receiver is full): reading
        from the upstream pauses until pipe() or readany() is called again. Raises what readany() raises,
        and whatever `sink` raised. Silence longer than the idle timeout raises TimeoutError."""
        self._resume()
        try:
            self._sink, self._sink_full = sink, False
            while True:
                if self._chunks and sink(self._take()):
                    self._pause()
                    return False
                if self._error is not None:
                    raise self._error
                if self._sink_full:
                    return False
                if self._done:
                    return True
                await self._wait(self._loop.time() + self._idle_timeout)
        finally:
            self._sink = None

    def _take(self) -> bytes:
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return data

    def _pause(self) -> None:
        if not self._paused and self._connection is not None and self._connection.transport is not None:
            self._paused = True
            self._connection.transport.pause_reading()

    def _resume(self) -> None:
        if self._paused and self._connection is not None and self._connection.transport is not None:
            self._paused = False
            self._connection.transport.resume_reading()

    async def read(self) -> bytes:
        """The whole (rest of the) body."""
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.response = None
            connection.abort()  # mid-body: the upstream must see the client go

    async def _wait(self, until: float) -> None:
        """Until the connection has news for this response; TimeoutError at `until` (loop time). A future
        and the connection's timer (Connection.watch), not asyncio.timeout: every answer waits here."""
        loop = self._loop
        if until <= loop.time():
            raise TimeoutError
        self._wait_until = until
        self._waiter = waiter = loop.create_future()
        connection = self._connection
        if connection is not None and connection.response is self:
            connection.watch(until)
            try:
                await waiter
            finally:
                self._waiter = None
            return
        timer = loop.call_at(until, self._timed_out)  # released by its connection: nothing will come
        try:
            await waiter
        finally:
            self._waiter = None
            timer.cancel()

    def _timed_out(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(TimeoutError())

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- receiving (the connection's side) -----------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self.nothing_received = False
        if self._done:
            self._keep_alive = False  # bytes after the end: not the start of a next response
            return
        if not self._head_done:
            self._head_size += len(data)
        connection = self._connection
        if connection is None:  # closed meanwhile
            return
        try:
            connection.parser.feed_data(data)
            if not self._head_done and self._head_size > MAX_HEAD:
                raise UpstreamBroken(f"response head larger than {MAX_HEAD} bytes")
        except UpstreamBroken as exc:
            self._fail(exc)
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _HeadEnd):
                self._keep_alive = self._keep_alive and data.endswith(b"\r\n\r\n")  # nothing after the head
                if self._keep_alive:  # the parser stopped in error: the next answer gets a new one
                    connection.parser = httptools.HttpResponseParser(connection)
            elif isinstance(cause, _Trailing):
                self._keep_alive = False  # bytes after the end: not the start of a next response
            elif isinstance(cause, UpstreamBroken):
                self._fail(cause)
                return
            else:
                self._fail(UpstreamBroken(f"invalid response from the upstream: {cause or exc}"))
                return
        except httptools.HttpParserError as exc:
            if not self._done:
                self._fail(UpstreamBroken(f"invalid response from the upstream: {exc}"))
                return
            self._keep_alive = False  # garbage after a complete answer: the connection is not reused
        if self._sink is not None and self._chunks and self._error is None:
            self._to_sink(self._sink)
            if not (self._done or self._sink_full or self._error is not None):
                return  # the piping caller sleeps on: nothing for it to do
        if self._done:
            self._finish()
        elif self._buffered > HIGH_WATER or self._sink_full:
            self._pause()
        self._wake()

    def _to_sink(self, sink: Sink) -> None:
        try:
            self._sink_full = sink(self._take())
        except Exception as exc:  # noqa: BLE001  (the receiver's failure, e.g. its client left: pipe() raises it)
            self._error = exc
        # Data is news: the silence the idle timeout measures starts again (the timer checks lazily).
        self._wait_until = self._loop.time() + self._idle_timeout

    def lost(self, exc: Exception | None) -> None:
        self._connection = None
        if self._done:
            return
        if self._head_done and self._until_close:
            self._done = True  # the body ends where the connection does
        else:
            reason = f": {exc}" if exc else ""
            where = "mid-response" if self._head_done else "before the response"
            self._error = UpstreamBroken(f"the upstream closed the connection {where}{reason}")
        self._wake()

    def _fail(self, error: UpstreamBroken) -> None:
        self._error = error
        self.close()  # what it sent cannot be trusted, nor anything after it
        self._wake()

    def _finish(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.finished(self._keep_alive)

    # -- the head, once llhttp has parsed it (Connection's callbacks) ---------------------------------------

    def _head_complete(self, parser: httptools.HttpResponseParser, fields: list[tuple[bytes, bytes]]) -> None:
        status = parser.get_status_code()
        if status < 200:  # an interim 1xx answer: the real one follows
            self._reason = b""
            return
        # The head lies within the bytes received so far: only when those are over the limit can it be.
        if self._head_size > MAX_HEAD and len(self._reason) + sum(
                len(name) + len(value) + 4 for name, value in fields) > MAX_HEAD:
            raise UpstreamBroken(f"response head larger than {MAX_HEAD} bytes")
        headers = self.headers
        by_name = self._fields
        for name, value in fields:
            if value[-1:] in (b" ", b"\t"):  # llhttp dropped the value's leading whitespace, not its trailing
                value = value.rstrip(b" \t")
            key = name.decode("latin-1")
            text = value.decode("ascii") if value.isascii() else _text(value)
            headers.append((key, text))
            lowered = key.lower()
            by_name[lowered] = f"{by_name[lowered]}, {text}" if lowered in by_name else text
        self.status = status
        self.reason = _text(self._reason.rstrip(b" \t"))
        self._keep_alive = parser.should_keep_alive()
        transfer = by_name.get("transfer-encoding")
        if not self._expect_body or status in NO_BODY_STATUSES:
            self.content_length = 0
            self._head_done = self._done = True
            if not self._expect_body:
                raise _HeadEnd
            return
        if transfer is not None:
            if transfer.lower().rsplit(",", 1)[-1].strip() != "chunked":
                raise UpstreamBroken(f"unsupported Transfer-Encoding: {transfer!r}")
        elif (length := by_name.get("content-length")) is not None:
            self.content_length = int(length)  # llhttp checked it: digits, one value
        else:
            self._until_close = True
            self._keep_alive = False
        self._head_done = True


def _text(raw: bytes) -> str:
    """A header value or reason phrase as text: ASCII as it is, UTF-8 decoded, anything else Latin-1 (every
    byte survives)."""
    if raw.isascii():
        return raw.decode("ascii")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")
