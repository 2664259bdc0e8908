"""The listening socket's HTTP/1.1 server: it carries every route warmpool answers (proxied, admin, status
page, metrics) and owns each connection's whole life: parsing, timeouts, limits and shutdown.

Every byte a client sends is parsed by llhttp (Node.js's parser, through httptools, as uvicorn uses it) in
strict mode: a head it rejects (bare LF line ends, a space in a field name, a doubled Content-Length,
Transfer-Encoding with Content-Length, garbage) is answered 400 and the connection closed; a TLS
ClientHello is closed at once, since nothing HTTP can answer it. Answers are written straight to the
transport, one exchange at a time per connection; pipelined requests wait their turn, read ahead up to a
bound. The limits (`Limits`) apply to every connection the same way; what a client gets beyond each is in
the README's "Limits" section.
"""

from __future__ import annotations

import asyncio
import http
import logging
import resource
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any
from urllib.parse import unquote

import httptools

from warmpool.http.admission import Admission
from warmpool.http.exchange import Answer, Headers, Incoming, Reply, media_type
from warmpool.http.wire import encode_headers, fits_in_head

log = logging.getLogger("warmpool.frontdoor")

Handle = Callable[[Incoming, Reply], Awaitable[None]]
# The answer to a request refused before any handler saw it: (status, message, path or "") -> Answer.
Refusal = Callable[[int, str, str], Answer]

MAX_PIPELINED = 1 << 20  # bytes of requests read ahead behind a running exchange before reading pauses
TLS_HANDSHAKE = 0x16  # the first byte of a TLS record carrying a ClientHello
# The limits every connection gets (Limits.standard reads them when the server is built).
MAX_HEAD = 65536  # bytes of request line and header fields -> 431
MAX_FIELDS = 100  # header fields -> 431
KEEPALIVE_SECONDS = 75.0  # an idle connection is closed this long after its last answer
HEADER_TIMEOUT = 10.0  # seconds from a request's first byte to the end of its head -> 408
BODY_GRACE = 10.0  # seconds a request body may take ...
BODY_RATE = 16384.0  # ... plus one per this many bytes of it -> 408
MAX_CONNECTIONS = 0  # open client connections; 0: half the file-descriptor limit, at most 10,000 -> 503
# Connections the kernel holds until warmpool accepts them (the kernel caps it at net.core.somaxconn).
# asyncio's default, 100, made the rest of a burst of clients connecting at once wait 1 s or more for a
# SYN retry while the loop was busy; nginx takes 511, uvicorn 2048.
BACKLOG = 2048
# Requests that begin their work in one turn of the event loop (http/admission.py); the rest begin in the
# turns after, so a burst of new requests does not hold up the chunks of running streams. 8 halved the
# chunk delay p99 of 256 streams opened at once (benchmarks/overhead.py, burst rows) against no limit.
STARTS_PER_TURN = 8


def default_max_connections() -> int:
    """Half the process's file-descriptor limit (the rest is for upstream connections, model files and
    logs), at most 10,000: beyond it a new connection gets 503 instead of starving everyone of fds."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(10_000, soft // 2)) if soft != resource.RLIM_INFINITY else 10_000


@dataclass(frozen=True, slots=True)
class Limits:
    """What one connection may take; the same for every connection."""

    max_body: int  # bytes of request body (config: max_body_size) -> 413
    max_head: int = MAX_HEAD
    max_fields: int = MAX_FIELDS
    keepalive: float = KEEPALIVE_SECONDS
    header_timeout: float = HEADER_TIMEOUT
    body_grace: float = BODY_GRACE
    body_rate: float = BODY_RATE
    max_connections: int = MAX_CONNECTIONS
    starts_per_turn: int = STARTS_PER_TURN

    @classmethod
    def standard(cls, max_body: int) -> Limits:
        """The module's limits as they are now (tests shorten them)."""
        return cls(max_body, MAX_HEAD, MAX_FIELDS, KEEPALIVE_SECONDS, HEADER_TIMEOUT, BODY_GRACE, BODY_RATE,
                   MAX_CONNECTIONS, STARTS_PER_TURN)

    def connections_cap(self) -> int:
        return self.max_connections or default_max_connections()


class Fields:
    """A request's header fields by lower-case name (the first of repeated ones), looked up as text."""

    __slots__ = ("by_name",)

    def __init__(self, by_name: dict[bytes, bytes]) -> None:
        self.by_name = by_name

    def get(self, name: str, default: str | None = None, /) -> str | None:
        key = _KEYS.get(name) or _KEYS.setdefault(name, name.lower().encode("latin-1"))
        value = self.by_name.get(key)
        return default if value is None else value.decode("latin-1")


_KEYS: dict[str, bytes] = {}  # the few names looked up, lower-cased and encoded once


class Request:
    """`exchange.Incoming` for a request read whole (head and body)."""

    __slots__ = ("body", "content_length", "headers", "keep_alive", "method", "path", "peer", "query",
                 "raw_headers", "size", "version")

    def __init__(self, method: str, path: str, query: str, raw_headers: list[tuple[bytes, bytes]],
                 fields: Fields, content_length: int | None, body: bytes, peer: str, keep_alive: bool,
                 version: str) -> None:
        self.method, self.path, self.query = method, path, query
        self.raw_headers = raw_headers
        self.headers = fields
        self.content_length = content_length
        self.body = body
        self.peer = peer
        self.keep_alive = keep_alive
        self.version = version
        self.size = len(body)  # bytes it holds while it waits its turn (its head added by the server)

    async def read(self) -> bytes:
        return self.body


class Refused(Exception):
    """A request the server answers itself, with `status`, and then closes the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def plain_refusal(status: int, message: str, path: str) -> Answer:
    return Answer.json({"error": message}, status=status)


class Lane:
    """What the server's connections share: the handler they run, their limits, and the set of them (for
    the connection cap and shutdown)."""

    def __init__(self, handle: Handle, limits: Limits, refusal: Refusal = plain_refusal) -> None:
        self.handle = handle
        self.limits = limits
        self.cap = limits.connections_cap()
        self.refusal = refusal
        self.connections: set[Connection] = set()
        self.refused_over_cap = 0
        self.cap_logged_at = -1e9
        self.closing = False
        self._all_closed: asyncio.Event | None = None
        self.admission = Admission(limits.starts_per_turn)

    def protocol(self) -> Connection:
        """The protocol factory for loop.create_server."""
        return Connection(self)

    def close(self) -> None:
        """Shutdown, step one: idle connections close now, busy ones when their exchange ends, new ones at
        once."""
        if self.closing:
            return
        self.closing = True
        self._all_closed = asyncio.Event()
        for connection in list(self.connections):
            connection.close_if_idle()
        self._check_all_closed()

    async def drain(self, timeout: float) -> None:
        """Shutdown, step two: wait up to `timeout` for running exchanges, then drop what is left."""
        self.close()
        assert self._all_closed is not None
        try:
            await asyncio.wait_for(self._all_closed.wait(), max(0.0, timeout))
        except TimeoutError:
            log.warning("%d connection(s) still busy after %g s; dropping them", len(self.connections), timeout)
            for connection in list(self.connections):
                connection.abort()

    def forget(self, connection: Connection) -> None:
        self.connections.discard(connection)
        self._check_all_closed()

    def _check_all_closed(self) -> None:
        if self._all_closed is not None and not self.connections:
            self._all_closed.set()


# Where a connection's parser is between and within requests (what its one deadline measures).
IDLE, HEAD, BODY = 0, 1, 2


class Connection(asyncio.Protocol):
    """One client connection: llhttp parses what arrives; complete requests run one at a time."""

    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.limits = lane.limits
        self.transport: asyncio.Transport | None = None
        self.peer = ""  # the client's host, for the scheduler's sessions
        self.parser = httptools.HttpRequestParser(self)
        # The request being parsed.
        self.state = IDLE
        self.url = b""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0  # bytes received since the request began, while its head is incomplete
        self.head_bytes = 0  # bytes of its request target and fields, once the head is complete
        self.body_parts: list[bytes] = []
        self.body_size = 0
        self.body_started = 0.0
        self.request_keep_alive = True
        self.fields = Fields({})
        # Requests parsed and waiting for their turn, and the one running.
        self.waiting: deque[Request | Refused] = deque()
        self.waiting_bytes = 0
        self.exchange: asyncio.Task[None] | None = None
        self.stopped_parsing = False  # after an error or an upgrade: nothing more is read as HTTP
        self.reading_paused = False
        self.writing_paused = False
        self.drained: asyncio.Future[None] | None = None
        # One timer re-checking a moving deadline: a timer armed and cancelled per request costs more.
        self.deadline = 0.0
        self.period = min(self.limits.header_timeout, self.limits.body_grace, self.limits.keepalive)
        self.timer: asyncio.TimerHandle | None = None
        # Kept: on Python 3.11 every asyncio.get_running_loop() is a getpid() system call.
        self.loop = asyncio.get_running_loop()

    # -- asyncio.Protocol --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        lane = self.lane
        if lane.closing:  # arrived together with shutdown: closed at once, it holds nothing up
            self.transport = None
            transport.close()
            return
        if len(lane.connections) >= lane.cap:
            lane.refused_over_cap += 1
            now = self.loop.time()
            if now - lane.cap_logged_at >= 10.0:  # a flood is one line per 10 s, not one per connection
                lane.cap_logged_at = now
                log.warning("connections refused (503): %d open, the cap; %d refused so far", len(lane.connections),
                            lane.refused_over_cap)
            self.transport = None
            transport.write(self._refusal_bytes(503, "too many open connections; try again later"))  # type: ignore[attr-defined]
            transport.close()
            return
        self.peer = str((transport.get_extra_info("peername") or ("",))[0])
        lane.connections.add(self)
        self._set_deadline(self.limits.keepalive)

    def data_received(self, data: bytes) -> None:
        if self.stopped_parsing or self.transport is None:
            return
        if self.state == IDLE and not self.waiting and self.exchange is None and data[0] == TLS_HANDSHAKE:
            log.info("TLS handshake from %s on a plain-HTTP port; connection closed", self.peer)
            self.transport.abort()
            return
        if self.state != BODY:
            self.head_size += len(data)
        try:
            self.parser.feed_data(data)
            if self.state == HEAD and self.head_size > self.limits.max_head:
                raise Refused(431, f"request head larger than {self.limits.max_head} bytes")
        except httptools.HttpParserUpgrade:
            self.stopped_parsing = True  # the rest is not HTTP; the request itself is answered, then closed
        except Refused as refused:
            self._refuse(refused)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self._refuse(cause if isinstance(cause, Refused) else Refused(400, f"malformed request: {exc}"))
        except httptools.HttpParserError as exc:
            self._refuse(Refused(400, f"malformed request: {exc}"))
        if self.exchange is None:
            self._next()
        elif self.waiting_bytes > MAX_PIPELINED and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._cancel_timer()
        if self.exchange is not None:
            self.exchange.cancel()  # the client left: its upstream request is cancelled with it
        if self.drained is not None and not self.drained.done():
            self.drained.set_exception(ConnectionResetError("the client closed the connection"))
        self.lane.forget(self)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    # -- llhttp's callbacks ------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.state = HEAD
        self.url = b""
        self.raw_headers = []
        self.body_parts = []
        self.body_size = 0
        self.deadline = self.loop.time() + self.limits.header_timeout

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.limits.max_head:
            raise Refused(414, f"request target longer than {self.limits.max_head} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))
        if len(self.raw_headers) > self.limits.max_fields:
            raise Refused(431, f"more than {self.limits.max_fields} header fields")

    def on_headers_complete(self) -> None:
        limits = self.limits
        version = self.parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise Refused(505, f"HTTP/{version} is not supported; speak HTTP/1.1")
        by_name: dict[bytes, bytes] = {}
        hosts = 0
        size = len(self.url)
        for name, value in self.raw_headers:  # one pass: the head's size, the fields by name, the Host count
            size += len(name) + len(value) + 4
            key = name.lower()
            if key == b"host":
                hosts += 1
            by_name.setdefault(key, value)
        self.head_bytes = size
        if size > limits.max_head:
            raise Refused(431, f"request head larger than {limits.max_head} bytes")
        if hosts > 1 or (hosts == 0 and version == "1.1"):
            raise Refused(400, "an HTTP/1.1 request needs exactly one Host header")
        length = by_name.get(b"content-length")
        if length is not None and int(length) > limits.max_body:
            raise Refused(413, f"request body of {int(length)} bytes exceeds the limit of {limits.max_body}")
        expect = by_name.get(b"expect")
        if expect is not None:
            if expect.lower() != b"100-continue":
                raise Refused(417, "only Expect: 100-continue is understood")
            # Only at the head of the line: behind a running exchange it would land inside that answer
            # (the client sends the body anyway once its wait for 100 runs out).
            at_turn = self.exchange is None and not self.waiting
            if at_turn and self.transport is not None and (length is None or int(length) > 0):
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.fields = Fields(by_name)
        self.request_keep_alive = self.parser.should_keep_alive() and not self.parser.should_upgrade()
        self.state = BODY
        self.body_started = self.loop.time()
        self.deadline = self.body_started + limits.body_grace

    def on_body(self, body: bytes) -> None:
        self.body_parts.append(body)
        self.body_size += len(body)
        if self.body_size > self.limits.max_body:
            raise Refused(413, f"request body exceeds the limit of {self.limits.max_body} bytes")
        self.deadline = self.body_started + self.limits.body_grace + self.body_size / self.limits.body_rate

    def on_message_complete(self) -> None:
        target = self.url
        path, _, query = target.partition(b"?")
        if not path.startswith(b"/"):
            # absolute form (a proxy's request line): its path; anything else (authority form, "*") is
            # answered by the router as a path it does not know
            try:
                parsed = httptools.parse_url(target)
                path, query = parsed.path or b"/", parsed.query or b""
            except httptools.HttpParserInvalidURLError:
                path, query = target, b""
        body = self.body_parts[0] if len(self.body_parts) == 1 else b"".join(self.body_parts)
        length = len(body) if self.fields.by_name.get(b"transfer-encoding") is None else None
        request = Request(self.parser.get_method().decode("ascii"), _path(path), query.decode("latin-1"),
                          self.raw_headers, self.fields, length, body, self.peer, self.request_keep_alive,
                          self.parser.get_http_version())
        request.size += self.head_bytes
        self.waiting.append(request)
        self.waiting_bytes += request.size
        self.state = IDLE
        self.head_size = 0
        self.body_parts = []
        self.deadline = self.loop.time() + self.limits.keepalive

    # -- requests ----------------------------------------------------------------------------------------

    def _refuse(self, refused: Refused) -> None:
        """Stop reading: what came before the bad request is still answered, then the refusal, then close."""
        self.stopped_parsing = True
        self.waiting.append(refused)
        log.info("refused a request from %s: %d %s", self.peer or "?", refused.status, refused.message)

    def _next(self) -> None:
        """At a request boundary with nothing running: start the next parsed request, if any."""
        if not self.waiting:
            if self.stopped_parsing and self.transport is not None:
                self.transport.close()  # an upgrade's rest is not read as HTTP
            return
        item = self.waiting.popleft()
        if isinstance(item, Refused):
            self.waiting.clear()
            if self.transport is not None:
                path = self.url.partition(b"?")[0].decode("latin-1") if self.url.startswith(b"/") else ""
                self.transport.write(self._refusal_bytes(item.status, item.message, path))
                self.transport.close()
            return
        self.waiting_bytes -= item.size
        reply = SocketReply(self, keep_alive=item.keep_alive, head_only=item.method == "HEAD",
                            http10=item.version == "1.0")
        self.exchange = self.loop.create_task(self._run(item, reply))

    def _refusal_bytes(self, status: int, message: str, path: str = "") -> bytes:
        answer = self.lane.refusal(status, message, path)
        head = b"HTTP/1.1 %d %b\r\nContent-Length: %d\r\n%bConnection: close\r\n%b\r\n" % (
            status, _reason(status, ""), len(answer.body), _date_line(),
            encode_headers([("Content-Type", answer.content_type), *answer.headers]))
        return head + answer.body

    async def _run(self, request: Request, reply: SocketReply) -> None:
        lane = self.lane
        try:
            if not lane.admission.now():
                await lane.admission.wait()
            await lane.handle(request, reply)
        except (asyncio.CancelledError, ConnectionResetError):
            pass  # the client left
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
        finally:
            self.exchange = None
            self._exchange_done(reply)

    def _exchange_done(self, reply: SocketReply) -> None:
        transport = self.transport
        if transport is None:
            return
        if not reply.ended:
            transport.abort()  # an answer cut short must not pass for a whole one
        elif not reply.keep_alive or self.lane.closing:
            transport.close()
        else:
            if self.reading_paused and self.waiting_bytes <= MAX_PIPELINED:
                self.reading_paused = False
                transport.resume_reading()
            now = self.loop.time()
            if self.state == IDLE:
                self.deadline = now + self.limits.keepalive
            elif self.state == HEAD:
                self.deadline = max(self.deadline, now + self.limits.header_timeout)
            else:
                self.body_started = max(self.body_started, now - self.body_size / self.limits.body_rate)
                self.deadline = self.body_started + self.limits.body_grace + self.body_size / self.limits.body_rate
            self._arm()
            self._next()  # a pipelined request, or a refusal behind the answered ones

    # -- writing -----------------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        self.transport.write(data)

    async def drain(self) -> None:
        if self.writing_paused and self.transport is not None:
            self.drained = self.loop.create_future()
            await self.drained

    # -- lifetime ----------------------------------------------------------------------------------------

    def close_if_idle(self) -> None:
        if self.exchange is None and not self.waiting and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.exchange is not None:
            self.exchange.cancel()
        if self.transport is not None:
            self.transport.abort()

    def _set_deadline(self, seconds: float) -> None:
        self.deadline = self.loop.time() + seconds
        self._arm()

    def _arm(self) -> None:
        # At the deadline, or sooner: a request's head or body may begin meanwhile and bring the deadline
        # closer, and moving the timer at every request would cost more than an early wake-up.
        if self.timer is None:
            self.timer = self.loop.call_at(min(self.deadline, self.loop.time() + self.period), self._check_deadline)

    def _check_deadline(self) -> None:
        self.timer = None
        if self.exchange is not None or self.transport is None:
            return  # re-armed when the exchange ends
        if self.loop.time() < self.deadline:
            self._arm()
            return
        if self.state == IDLE:
            self.close_if_idle()
        else:
            what = "head" if self.state == HEAD else "body"
            log.info("request %s from %s too slow; connection closed", what, self.peer or "?")
            self.stopped_parsing = True
            self.transport.write(self._refusal_bytes(408, f"request {what} not received in time"))
            self.transport.close()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def _path(raw: bytes) -> str:
    """The path as routes see it: percent-escapes decoded (as aiohttp did), invalid UTF-8 replaced."""
    text = raw.decode("latin-1")
    return unquote(text, errors="replace") if "%" in text else text


class SocketReply:
    """`exchange.Reply` written straight to a connection."""

    __slots__ = ("chunked", "connection", "content_type", "ended", "head_only", "http10", "keep_alive",
                 "status", "until_close")

    def __init__(self, connection: Connection, keep_alive: bool, head_only: bool = False,
                 http10: bool = False) -> None:
        self.connection = connection
        self.keep_alive = keep_alive
        self.head_only = head_only  # a HEAD request: the head as for GET, no body
        self.http10 = http10  # an HTTP/1.0 client: no chunked coding, a body of unknown size ends at close
        self.status = 0
        self.content_type = ""
        self.chunked = False
        self.until_close = False
        self.ended = False

    @property
    def started(self) -> bool:
        return self.status != 0

    @property
    def length_framed(self) -> bool:
        """Whether the body's length went out in the head: such a body cannot carry an error after it."""
        return self.started and not self.chunked and not self.until_close

    async def whole(self, status: int, reason: str, headers: Headers, body: bytes) -> None:
        self._begin(status, headers)
        connection = self.connection
        if _bodiless(status):
            connection.write(self._head(status, reason, headers, b""))
        elif self.head_only:
            connection.write(self._head(status, reason, headers, b"Content-Length: %d\r\n" % len(body)))
        else:
            connection.write(self._head(status, reason, headers, b"Content-Length: %d\r\n" % len(body)) + body)
        self.ended = True
        if connection.writing_paused:
            await connection.drain()

    async def start(self, status: int, reason: str, headers: Headers, length: int | None) -> None:
        self._begin(status, headers)
        if _bodiless(status):
            framing, self.ended = b"", True
        elif length is not None:
            framing = b"Content-Length: %d\r\n" % length
        elif self.http10:
            framing, self.until_close, self.keep_alive = b"", True, False
        else:
            framing, self.chunked = b"Transfer-Encoding: chunked\r\n", True
        self.connection.write(self._head(status, reason, headers, framing))
        if self.head_only:
            self.ended = True
        if self.connection.writing_paused:
            await self.connection.drain()

    async def write(self, data: bytes) -> None:
        if self.write_now(data):
            await self.connection.drain()

    def write_now(self, data: bytes) -> bool:
        if data and not self.ended:  # an empty chunk would end a chunked body
            self.connection.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
        return self.connection.writing_paused

    async def drain(self) -> None:
        await self.connection.drain()

    async def end(self) -> None:
        if self.ended:
            return
        if self.chunked:
            self.connection.write(b"0\r\n\r\n")
        self.ended = True
        if self.connection.writing_paused:
            await self.connection.drain()

    def abort(self) -> None:
        self.keep_alive = False
        if self.connection.transport is not None:
            self.connection.transport.abort()

    def _begin(self, status: int, headers: Headers) -> None:
        if self.status:
            raise RuntimeError("a reply is sent once")
        self.status, self.content_type = status, media_type(headers)

    def _head(self, status: int, reason: str, headers: Headers, framing: bytes) -> bytes:
        if not self.keep_alive or self.connection.lane.closing:
            self.keep_alive = False
            connection = b"Connection: close\r\n"
        else:
            connection = b"Connection: keep-alive\r\n" if self.http10 else b""
        return b"HTTP/1.1 %d %b\r\n%b%b%b%b\r\n" % (status, _reason(status, reason), framing, _date_line(),
                                                    connection, encode_headers(headers))


def _bodiless(status: int) -> bool:
    return status < 200 or status in (204, 304)


_PHRASES = {status.value: status.phrase.encode() for status in http.HTTPStatus}


def _reason(status: int, given: str) -> bytes:
    if given and fits_in_head(given) and given.isprintable():
        return given.encode("utf-8", "replace")
    return _PHRASES.get(status, b"Unknown")


_date: list[Any] = [0, b""]


def _date_line() -> bytes:
    """The Date header, formatted once a second."""
    now = int(time.time())
    if now != _date[0]:
        _date[0], _date[1] = now, b"Date: %b\r\n" % formatdate(now, usegmt=True).encode()
    return bytes(_date[1])
