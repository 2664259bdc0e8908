"""Relaying an upstream response to the client: status, headers and body chunk by chunk, unbuffered,
optionally translated (dialects/transforms.py). A failure after the headers went out is reported inside the
stream in the client's dialect, since the status can no longer change (a chunked stream only: a body
framed by Content-Length is cut by closing the connection). A body whose first read is the whole of it
(a typical non-streamed answer) goes out with its headers in a single write.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from warmpool.backends.base import Upstream, UpstreamBroken
from warmpool.dialects.sse import frame
from warmpool.dialects.transforms import Streamer, Transform
from warmpool.errors import BackendError, BackendTimeout, WarmpoolError
from warmpool.http.exchange import Headers, Reply
from warmpool.proxy.naming import Renamer

SKIP_RESPONSE_HEADERS = frozenset({
    "connection", "keep-alive", "transfer-encoding", "content-length", "date", "server", "upgrade",
    "proxy-authenticate", "trailer", "te",
})
STREAM_TYPES = ("application/x-ndjson", "text/event-stream")


async def relay(reply: Reply, upstream: Upstream, backend: str, tags: Headers,
                transform: Transform | None, on_first_byte: Callable[[], None], error_dialect: str = "",
                rename: Renamer | None = None) -> None:
    """Copy `upstream` to the client, with `tags` added to its headers and, with `rename`, the model name
    the client sent in place of the upstream's; always releases the upstream connection (closing it
    early cancels the upstream's work when the client went away). `error_dialect` shapes an error inside
    a stream passed through as it came ("anthropic": an `error` event)."""
    try:
        if transform is None:
            await _pass_through(reply, upstream, backend, tags, on_first_byte, error_dialect, rename)
        else:
            await _translated(reply, upstream, backend, tags, transform, on_first_byte)
    finally:
        upstream.close()


async def _pass_through(reply: Reply, upstream: Upstream, backend: str, tags: Headers,
                        on_first_byte: Callable[[], None], error_dialect: str, rename: Renamer | None) -> None:
    first = b""
    headers = passed_headers(upstream) + tags
    if upstream.content_length is not None:
        try:  # no byte has gone to the client yet, so a failure here is still an ordinary error answer
            first = await upstream.readany()
        except (UpstreamBroken, TimeoutError) as exc:
            raise upstream_failure(backend, exc) from exc
        if len(first) == upstream.content_length:
            # A body that is already all here (the usual non-streamed answer) goes out in one write with
            # its headers: one syscall and one wake-up of the client fewer. Nothing is held back: this is
            # only what one read returned.
            await reply.whole(upstream.status, upstream.reason, headers, rename.whole(first) if rename else first)
            on_first_byte()
            return
    # A renamed body's length changes, so it cannot be announced before the body is all here.
    await reply.start(upstream.status, upstream.reason, headers, None if rename else upstream.content_length)
    on_first_byte()
    await _copy_chunks(upstream, reply, backend, rename, first, error_dialect)
    await reply.end()


async def _copy_chunks(upstream: Upstream, reply: Reply, backend: str, rename: Renamer | None,
                       first: bytes = b"", error_dialect: str = "") -> None:
    # Chunks go to the client from the upstream connection's callback (Upstream.pipe): this coroutine
    # wakes only when the client is full, and at the end.
    sink: Callable[[bytes], bool] = reply.write_now
    if rename is not None:
        def renamed(chunk: bytes) -> bool:
            return reply.write_now(rename.feed(chunk))
        sink = renamed
    try:
        if first and sink(first):
            await reply.drain()
        while not await upstream.pipe(sink):
            await reply.drain()
        if rename is not None and (rest := rename.finish()):
            await reply.write(rest)
    except (UpstreamBroken, TimeoutError) as exc:
        await _report_mid_stream(reply, upstream_failure(backend, exc), error_dialect)


async def _translated(reply: Reply, upstream: Upstream, backend: str, tags: Headers,
                      transform: Transform, on_first_byte: Callable[[], None]) -> None:
    if upstream.status >= 300 or not transform.stream:
        raw = await _read_all(upstream, backend)
        body = transform.error_body(raw, upstream.status) if upstream.status >= 300 else _whole(transform, raw, backend)
        await reply.whole(upstream.status, "", [("Content-Type", "application/json"), *tags], body)
        on_first_byte()
        return
    await reply.start(200, "", [("Content-Type", transform.content_type), *tags], None)
    on_first_byte()
    await _translate_chunks(upstream, reply, backend, transform.streamer())
    await reply.end()


async def _translate_chunks(upstream: Upstream, reply: Reply, backend: str, streamer: Streamer) -> None:
    def sink(chunk: bytes) -> bool:
        full = False
        for line in streamer.feed(chunk):
            full = reply.write_now(line)
        return full

    try:
        while not await upstream.pipe(sink):
            await reply.drain()
        for line in streamer.finish():
            await reply.write(line)
    except (UpstreamBroken, TimeoutError) as exc:
        error = upstream_failure(backend, exc)
        for line in streamer.fail(error.status, error.message):  # the translator knows its stream's shape
            await reply.write(line)


def _whole(transform: Transform, raw: bytes, backend: str) -> bytes:
    try:
        return transform.whole_body(raw)
    except (ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: JSON nested too deep
        raise BackendError(backend, f"upstream sent an answer warmpool cannot translate: {exc}") from exc


async def _read_all(upstream: Upstream, backend: str) -> bytes:
    try:
        return await upstream.read()
    except (UpstreamBroken, TimeoutError) as exc:
        raise upstream_failure(backend, exc) from exc


def upstream_failure(backend: str, exc: BaseException) -> BackendError:
    if isinstance(exc, TimeoutError):
        return BackendTimeout(backend, "upstream went silent mid-response (timeouts.idle)")
    return BackendError(backend, f"upstream dropped the connection mid-response: {exc}")


async def _report_mid_stream(reply: Reply, error: WarmpoolError, dialect: str = "") -> None:
    """The status is already sent: end the stream with an error in the dialect's streaming shape
    (Ollama: a final {"error"} line; OpenAI SSE: a data: {"error": {...}} event; Anthropic: an `error`
    event, the only one its SDK raises on). A body whose length the head announced cannot carry it: the
    error is raised and the proxy drops the connection, so the client sees a body cut short."""
    if reply.content_type not in STREAM_TYPES or reply.length_framed:
        raise error  # a truncated body: the proxy drops the connection so it cannot pass for whole
    if reply.content_type == "application/x-ndjson":
        await reply.write(json.dumps(error.ollama_body()).encode() + b"\n")
    elif dialect == "anthropic":
        await reply.write(frame(error.anthropic_body(), "error"))
    else:
        await reply.write(b"data: " + json.dumps(error.openai_body()).encode() + b"\n\n")


def passed_headers(upstream: Upstream) -> Headers:
    """The upstream's headers a client gets: all but hop-by-hop ones and those the server sets itself."""
    return [(name, value) for name, value in upstream.headers if name.lower() not in SKIP_RESPONSE_HEADERS]


async def relay_into(reply: Reply, upstream: Upstream, backend: str, transform: Transform | None,
                     rename: Renamer | None = None) -> None:
    """Continue a stream whose headers already went out (loading feedback): the upstream's status can no
    longer be passed on, so a failure ends the stream with an error in its shape."""
    try:
        if upstream.status >= 300:
            raw = await _read_all(upstream, backend)
            reason = f"answered HTTP {upstream.status}: {raw[:500].decode(errors='replace')}"
            await _report_mid_stream(reply, BackendError(backend, reason))
        elif transform is None:
            await _copy_chunks(upstream, reply, backend, rename)
        else:
            await _translate_chunks(upstream, reply, backend, transform.streamer())
        await reply.end()
    finally:
        upstream.close()


async def report_in_stream(reply: Reply, error: WarmpoolError) -> None:
    """End an already-open stream with `error` in its shape."""
    await _report_mid_stream(reply, error)
    await reply.end()
