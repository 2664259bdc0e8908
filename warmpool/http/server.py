"""The listening socket's own HTTP/1.1 server for the proxied routes.

aiohttp's server (request and response objects, router, a task per request) cost about as much CPU per
request as all of warmpool's own logic; the front door parses request heads itself and writes answers
straight to the transport. It takes only requests it fully understands: HTTP/1.1, a proxied path in plain
form, GET, POST or DELETE, a body framed by one Content-Length within the size limit, no
Transfer-Encoding, Expect or Upgrade, a clean head. At the first request it does not take, it hands the
connection (with every byte it has buffered) to aiohttp's server, which serves it from then on: so the
front door only ever declines, never refuses, and anything unusual is parsed, answered or rejected by
aiohttp as before.
"""

from __future__ import annotations

import asyncio
import http
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

from warmpool.http.exchange import Headers, Incoming, Reply, media_type
from warmpool.http.wire import encode_headers, fits_in_head

log = logging.getLogger("warmpool.frontdoor")

Handle = Callable[[Incoming, Reply], Awaitable[None]]

MAX_HEAD = 65536  # bytes; a longer head goes to aiohttp, which answers it (431/400)
MAX_FIELDS = 100
MAX_PIPELINED = 1 << 20  # bytes buffered behind a running exchange before reading pauses
KEEPALIVE_SECONDS = 75.0  # aiohttp's default: an idle connection is closed after this long
# Headers whose presence means a request the front door does not take (aiohttp handles them).
DECLINED_FIELDS = frozenset({b"transfer-encoding", b"expect", b"upgrade"})
# The whole head in one match: a request line with a method it takes and a target in origin form with no
# percent-escapes in its path (aiohttp decodes those; the query passes on as sent), then fields that are
# a token, a colon and a value of tabs, visible ASCII and obs-text (so no obs-fold, no bare CR or LF, no
# control characters). Groups: method, path, query, fields.
HEAD_SHAPE = re.compile(
    rb"(GET|POST|DELETE) (/[A-Za-z0-9._~!$&'()*+,;=:@/-]*)(?:\?([A-Za-z0-9._~!$&'()*+,;=:@/?%-]*))? HTTP/1\.1"
    rb"((?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*)*)")
# One field of a head HEAD_SHAPE accepted: its name and its value without surrounding whitespace.
FIELD = re.compile(rb"\r\n([^:]+):[ \t]*((?:[^\r]*[^\r \t])?)[ \t]*")
INCOMPLETE = "incomplete"


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


@dataclass(slots=True)
class Head:
    """A request head the front door takes."""

    method: str
    path: str
    query: str
    raw_headers: list[tuple[bytes, bytes]]
    fields: Fields
    content_length: int
    close: bool  # the client asked to close after this exchange
    size: int  # bytes of the head, blank line included


def parse_head(buffer: bytes | bytearray, takes: Callable[[str], bool], limit: int) -> Head | str | None:
    """The head at the start of `buffer`: a `Head` the front door takes, INCOMPLETE when more bytes are
    needed to tell, or None when aiohttp should have the request."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None if len(buffer) > MAX_HEAD else INCOMPLETE
    shape = HEAD_SHAPE.fullmatch(bytes(memoryview(buffer)[:end])) if end <= MAX_HEAD else None
    if shape is None:
        return None
    method, target_path, query, fields = shape.groups(b"")
    if b"//" in target_path or b"/." in target_path or not takes(path := target_path.decode("ascii")):
        return None
    raw: list[tuple[bytes, bytes]] = FIELD.findall(fields)
    by_name = {name.lower(): value for name, value in reversed(raw)}  # the first of repeated fields wins
    if len(raw) > MAX_FIELDS or (len(by_name) < len(raw) and _repeats_framing(raw)):
        return None
    # A malformed Content-Length, or one over the limit, goes to aiohttp (which answers 400 or 413).
    length = by_name.get(b"content-length", b"0")
    if not length.isdigit() or len(length) > 18 or int(length) > limit or not DECLINED_FIELDS.isdisjoint(by_name):
        return None
    connection = by_name.get(b"connection", b"").lower()
    if b"upgrade" in connection:
        return None
    return Head(method.decode("ascii"), path, query.decode("ascii"), raw, Fields(by_name), int(length),
                b"close" in connection, end + 4)


def _repeats_framing(raw: list[tuple[bytes, bytes]]) -> bool:
    """Whether Content-Length or Host is given twice (which one would the upstream believe?)."""
    names = [name.lower() for name, _ in raw]
    return names.count(b"content-length") > 1 or names.count(b"host") > 1


class Request:
    """`exchange.Incoming` for a request the front door read whole."""

    __slots__ = ("body", "content_length", "headers", "method", "path", "peer", "query", "raw_headers")

    def __init__(self, head: Head, body: bytes, peer: str = "") -> None:
        self.peer = peer
        self.method, self.path, self.query = head.method, head.path, head.query
        self.headers = head.fields
        self.raw_headers = head.raw_headers
        self.content_length = head.content_length
        self.body = body

    async def read(self) -> bytes:
        return self.body


class Lane:
    """What the front door's connections share: the handler they run, aiohttp's server they hand over
    to, and the set of them (for shutdown)."""

    def __init__(self, handle: Handle, takes: Callable[[str], bool], limit: int) -> None:
        self.handle = handle
        self.takes = takes
        self.limit = limit
        self.fallback: Callable[[], asyncio.Protocol] | None = None  # aiohttp's server, once it is set up
        self.connections: set[Connection] = set()
        self.closing = False
        self._all_closed: asyncio.Event | None = None

    def protocol(self) -> Connection:
        """The protocol factory for loop.create_server."""
        return Connection(self)

    def close(self) -> None:
        """Shutdown, step one: idle connections close now, busy ones when their exchange ends."""
        self.closing = True
        self._all_closed = asyncio.Event()
        for connection in list(self.connections):
            connection.close_if_idle()
        self._check_all_closed()

    async def drain(self, timeout: float) -> None:
        """Shutdown, step two: wait up to `timeout` for running exchanges, then drop what is left."""
        if self._all_closed is None:
            self.close()
        assert self._all_closed is not None
        try:
            await asyncio.wait_for(self._all_closed.wait(), timeout)
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


class Connection(asyncio.Protocol):
    """One client connection: reads a request, runs it, and reads the next only once it is answered."""

    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.transport: asyncio.Transport | None = None
        self.peer = ""  # the client's host, for the scheduler's sessions
        self.buffer = bytearray()
        self.pending: Head | None = None  # a head whose body is still arriving
        self.exchange: asyncio.Task[None] | None = None
        self.reading_paused = False
        self.writing_paused = False
        self.drained: asyncio.Future[None] | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.idle_deadline = 0.0
        # Kept: on Python 3.11 every asyncio.get_running_loop() is a getpid() system call.
        self.loop = asyncio.get_running_loop()

    # -- asyncio.Protocol --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = str((transport.get_extra_info("peername") or ("",))[0])
        self.lane.connections.add(self)
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.exchange is None:
            self._next()
        elif len(self.buffer) > MAX_PIPELINED and not self.reading_paused:
            self._pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._cancel_idle_timer()
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

    # -- requests ----------------------------------------------------------------------------------------

    def _next(self) -> None:
        """At a request boundary with nothing running: start the buffered request, if it is all here."""
        head = self.pending or parse_head(self.buffer, self.lane.takes, self.lane.limit)
        if head is INCOMPLETE:
            return
        if head is None:
            return self._hand_over()
        assert isinstance(head, Head)
        end = head.size + head.content_length
        if len(self.buffer) < end:
            self.pending = head
            self._arm_idle_timer()  # a body still arriving is not idleness; a head never finished is
            return
        self.pending = None
        body = bytes(memoryview(self.buffer)[head.size:end])
        del self.buffer[:end]
        reply = SocketReply(self, keep_alive=not head.close)
        self.exchange = self.loop.create_task(self._run(Request(head, body, self.peer), reply))

    async def _run(self, request: Request, reply: SocketReply) -> None:
        try:
            await self.lane.handle(request, reply)
        except (asyncio.CancelledError, ConnectionResetError):
            pass  # the client left
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
        finally:
            self.exchange = None
            self._exchange_done(reply)

    def _exchange_done(self, reply: SocketReply) -> None:
        if self.transport is None:
            return
        if not reply.ended:
            self.transport.abort()  # an answer cut short must not pass for a whole one
        elif not reply.keep_alive or self.lane.closing:
            self.transport.close()
        else:
            if self.reading_paused:
                self.reading_paused = False
                self.transport.resume_reading()
            self._arm_idle_timer()
            if self.buffer:
                self._next()  # a pipelined request

    def _hand_over(self) -> None:
        """Give the connection, and what it has buffered, to aiohttp's server for good."""
        transport, fallback = self.transport, self.lane.fallback
        assert transport is not None and fallback is not None
        self._cancel_idle_timer()
        self.lane.forget(self)
        if self.reading_paused:
            transport.resume_reading()
        protocol = fallback()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        data, self.buffer, self.transport = bytes(self.buffer), bytearray(), None
        protocol.data_received(data)

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
        if self.exchange is None and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.exchange is not None:
            self.exchange.cancel()
        if self.transport is not None:
            self.transport.abort()

    def _pause_reading(self) -> None:
        assert self.transport is not None
        self.reading_paused = True
        self.transport.pause_reading()

    def _arm_idle_timer(self) -> None:
        # One timer that re-checks a moving deadline: a timer armed and cancelled per request costs more.
        loop = self.loop
        self.idle_deadline = loop.time() + KEEPALIVE_SECONDS
        if self.idle_timer is None:
            self.idle_timer = loop.call_at(self.idle_deadline, self._idle_check)

    def _idle_check(self) -> None:
        self.idle_timer = None
        if self.exchange is not None:
            return  # re-armed when the exchange ends
        if self.loop.time() >= self.idle_deadline:
            self.close_if_idle()
        else:
            self.idle_timer = self.loop.call_at(self.idle_deadline, self._idle_check)

    def _cancel_idle_timer(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None


class SocketReply:
    """`exchange.Reply` written straight to a front-door connection."""

    __slots__ = ("chunked", "connection", "content_type", "ended", "keep_alive", "status")

    def __init__(self, connection: Connection, keep_alive: bool) -> None:
        self.connection = connection
        self.keep_alive = keep_alive
        self.status = 0
        self.content_type = ""
        self.chunked = False
        self.ended = False

    @property
    def started(self) -> bool:
        return self.status != 0

    async def whole(self, status: int, reason: str, headers: Headers, body: bytes) -> None:
        self._begin(status, headers)
        if _bodiless(status):
            self.connection.write(self._head(status, reason, headers, b""))
        else:
            self.connection.write(self._head(status, reason, headers, b"Content-Length: %d\r\n" % len(body)) + body)
        self.ended = True
        if self.connection.writing_paused:
            await self.connection.drain()

    async def start(self, status: int, reason: str, headers: Headers, length: int | None) -> None:
        self._begin(status, headers)
        if _bodiless(status):
            framing, self.ended = b"", True
        elif length is not None:
            framing = b"Content-Length: %d\r\n" % length
        else:
            framing, self.chunked = b"Transfer-Encoding: chunked\r\n", True
        self.connection.write(self._head(status, reason, headers, framing))
        if self.connection.writing_paused:
            await self.connection.drain()

    async def write(self, data: bytes) -> None:
        if not data or self.ended:
            return  # an empty chunk would end a chunked body
        self.connection.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
        if self.connection.writing_paused:
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
        close = b"" if self.keep_alive and not self.connection.lane.closing else b"Connection: close\r\n"
        if close:
            self.keep_alive = False
        return b"HTTP/1.1 %d %b\r\n%b%b%b%b\r\n" % (status, _reason(status, reason), framing, _date_line(),
                                                    close, encode_headers(headers))


def _bodiless(status: int) -> bool:
    return status < 200 or status in (204, 304)


_PHRASES = {status.value: status.phrase.encode() for status in http.HTTPStatus}


def _reason(status: int, given: str) -> bytes:
    if given and fits_in_head(given):
        return given.encode("utf-8", "replace")
    return _PHRASES.get(status, b"Unknown")


_date: list[Any] = [0, b""]


def _date_line() -> bytes:
    """The Date header, formatted once a second."""
    now = int(time.time())
    if now != _date[0]:
        _date[0], _date[1] = now, b"Date: %b\r\n" % formatdate(now, usegmt=True).encode()
    return bytes(_date[1])
