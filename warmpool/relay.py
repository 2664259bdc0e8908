"""Relaying an upstream response to the client: status, headers and body chunk by chunk, unbuffered,
optionally translated (OpenAI → Ollama). A failure after the headers went out is reported inside the
stream in the client's dialect, since the status can no longer change. A body whose first read is the
whole of it (a typical non-streamed answer) goes out with its headers in a single write.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from aiohttp import web

from warmpool.backends.http1 import Response, UpstreamBroken
from warmpool.errors import BackendError, BackendTimeout, WarmpoolError
from warmpool.transforms import Streamer, Transform

SKIP_RESPONSE_HEADERS = frozenset({
    "connection", "keep-alive", "transfer-encoding", "content-length", "date", "server", "upgrade",
    "proxy-authenticate", "trailer", "te",
})
STREAM_TYPES = ("application/x-ndjson", "text/event-stream")


Tagger = Callable[[web.StreamResponse], None]


async def relay(request: web.Request, upstream: Response, backend: str, tag: Tagger,
                transform: Transform | None, on_first_byte: Callable[[], None]) -> web.StreamResponse:
    """Copy `upstream` to the client; always releases the upstream connection (closing it early cancels the
    upstream's work when the client went away)."""
    try:
        if transform is None:
            return await _pass_through(request, upstream, backend, tag, on_first_byte)
        return await _translated(request, upstream, backend, tag, transform, on_first_byte)
    finally:
        upstream.close()


async def _pass_through(request: web.Request, upstream: Response, backend: str, tag: Tagger,
                        on_first_byte: Callable[[], None]) -> web.StreamResponse:
    first = b""
    if upstream.content_length is not None:
        first = await _first_chunk(upstream, backend)
        if len(first) == upstream.content_length:
            return await _send_whole(request, upstream, first, tag, on_first_byte)
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    copy_headers(upstream, response)
    if upstream.content_length is not None:
        response.content_length = upstream.content_length
    tag(response)
    await response.prepare(request)
    on_first_byte()
    if first:
        await response.write(first)
    await _copy_chunks(upstream, response, backend)
    await response.write_eof()
    return response


async def _first_chunk(upstream: Response, backend: str) -> bytes:
    """What the upstream has sent of its body so far (at least one byte, unless the body is empty). No
    byte has gone to the client yet, so a failure here is still an ordinary error response."""
    try:
        return await upstream.readany()
    except (UpstreamBroken, TimeoutError) as exc:
        raise upstream_failure(backend, exc) from exc


async def _send_whole(request: web.Request, upstream: Response, body: bytes, tag: Tagger,
                      on_first_byte: Callable[[], None]) -> web.Response:
    """A body that is already all here (the usual non-streamed answer) goes out in one write with its
    headers; a StreamResponse sends its headers on their own, one more syscall and one more wake-up of
    the client per request. Nothing is held back: this is only what one read returned. Sent here rather
    than by aiohttp after the handler returns, which comes later (after the accounting, a task switch)."""
    response = web.Response(status=upstream.status, reason=upstream.reason, body=body)
    copy_headers(upstream, response)
    tag(response)
    await response.prepare(request)
    await response.write_eof()
    on_first_byte()
    return response


async def _copy_chunks(upstream: Response, response: web.StreamResponse, backend: str) -> None:
    try:
        while chunk := await upstream.readany():
            await response.write(chunk)
    except (UpstreamBroken, TimeoutError) as exc:
        await _report_mid_stream(response, upstream_failure(backend, exc))


async def _translated(request: web.Request, upstream: Response, backend: str, tag: Tagger,
                      transform: Transform, on_first_byte: Callable[[], None]) -> web.StreamResponse:
    if upstream.status >= 300 or not transform.stream:
        raw = await _read_all(upstream, backend)
        body = transform.error_body(raw, upstream.status) if upstream.status >= 300 else _whole(transform, raw, backend)
        response = web.Response(status=upstream.status, body=body, content_type="application/json")
        tag(response)
        on_first_byte()
        return response
    response = web.StreamResponse(status=200, headers={"Content-Type": transform.content_type})
    tag(response)
    await response.prepare(request)
    on_first_byte()
    await _translate_chunks(upstream, response, backend, transform.streamer())
    await response.write_eof()
    return response


async def _translate_chunks(upstream: Response, response: web.StreamResponse, backend: str,
                            streamer: Streamer) -> None:
    try:
        while chunk := await upstream.readany():
            for line in streamer.feed(chunk):
                await response.write(line)
        for line in streamer.finish():
            await response.write(line)
    except (UpstreamBroken, TimeoutError) as exc:
        await _report_mid_stream(response, upstream_failure(backend, exc))


def _whole(transform: Transform, raw: bytes, backend: str) -> bytes:
    try:
        return transform.whole_body(raw)
    except (ValueError, KeyError, TypeError) as exc:
        raise BackendError(backend, f"upstream sent an answer warmpool cannot translate: {exc}") from exc


async def _read_all(upstream: Response, backend: str) -> bytes:
    try:
        return await upstream.read()
    except (UpstreamBroken, TimeoutError) as exc:
        raise upstream_failure(backend, exc) from exc


def upstream_failure(backend: str, exc: BaseException) -> BackendError:
    if isinstance(exc, TimeoutError):
        return BackendTimeout(backend, "upstream went silent mid-response (timeouts.idle)")
    return BackendError(backend, f"upstream dropped the connection mid-response: {exc}")


async def _report_mid_stream(response: web.StreamResponse, error: WarmpoolError) -> None:
    """The status is already sent: end the stream with an error in the dialect's streaming shape
    (Ollama: a final {"error"} line; OpenAI SSE: a data: {"error": {...}} event)."""
    if response.content_type not in STREAM_TYPES:
        raise error  # a truncated JSON body: drop the connection so the client cannot mistake it for whole
    if response.content_type == "application/x-ndjson":
        await response.write(json.dumps(error.ollama_body()).encode() + b"\n")
    else:
        await response.write(b"data: " + json.dumps(error.openai_body()).encode() + b"\n\n")


def copy_headers(upstream: Response, response: web.StreamResponse) -> None:
    for name, value in upstream.headers:
        if name.lower() not in SKIP_RESPONSE_HEADERS:
            response.headers.add(name, value)


async def relay_into(response: web.StreamResponse, upstream: Response, backend: str,
                     transform: Transform | None) -> None:
    """Continue a stream whose headers already went out (loading feedback): the upstream's status can no
    longer be passed on, so a failure ends the stream with an error in its shape."""
    try:
        if upstream.status >= 300:
            raw = await _read_all(upstream, backend)
            reason = f"answered HTTP {upstream.status}: {raw[:500].decode(errors='replace')}"
            await _report_mid_stream(response, BackendError(backend, reason))
        elif transform is None:
            await _copy_chunks(upstream, response, backend)
        else:
            await _translate_chunks(upstream, response, backend, transform.streamer())
        await response.write_eof()
    finally:
        upstream.close()


async def report_in_stream(response: web.StreamResponse, error: WarmpoolError) -> None:
    """End an already-open stream with `error` in its shape."""
    await _report_mid_stream(response, error)
    await response.write_eof()
