"""The overhead benchmark's lean load generator reads answers right, and never counts a bad one."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("overhead_bench", REPO / "benchmarks" / "overhead.py")
assert _spec is not None and _spec.loader is not None
overhead = importlib.util.module_from_spec(_spec)
sys.modules["overhead_bench"] = overhead  # dataclasses look their module up by name
_spec.loader.exec_module(overhead)

BODY = overhead.request_body("m", False)


@asynccontextmanager
async def app_server(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def raw_server(answer: Callable[[asyncio.StreamWriter], object]) -> AsyncIterator[str]:
    """A server that reads one request head and then lets `answer` write whatever bytes it likes."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                await reader.readexactly(len(BODY))
                await answer(writer)  # type: ignore[misc]
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client is done
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.close()


async def test_every_request_answered_by_the_fake_upstream_is_counted() -> None:
    async with app_server(overhead.fake_upstream(2, 0.001)) as url:
        run = await overhead.lean_requests(url, BODY, 40, 4)
    assert len(run.latencies) == 40 and all(latency > 0 for latency in run.latencies)
    assert run.rps > 0


async def test_an_answer_arriving_byte_by_byte_is_read_whole() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"

    async def dribble(writer: asyncio.StreamWriter) -> None:
        for index in range(len(answer)):
            writer.write(answer[index:index + 1])
            await writer.drain()

    async with raw_server(dribble) as url:
        run = await overhead.lean_requests(url, BODY, 3, 1)
    assert len(run.latencies) == 3


async def test_a_failed_answer_stops_the_run() -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": "no"}, status=503)

    app = web.Application()
    app.router.add_post(overhead.CHAT, refuse)
    async with app_server(app) as url:
        with pytest.raises(RuntimeError, match="unexpected answer"):
            await overhead.lean_requests(url, BODY, 5, 2)


async def test_a_body_cut_short_stops_the_run() -> None:
    async def cut(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        writer.close()

    async with raw_server(cut) as url:
        with pytest.raises(RuntimeError, match="connection closed"):
            await overhead.lean_requests(url, BODY, 2, 1)


async def test_the_stream_probe_reads_every_send_time_even_byte_by_byte() -> None:
    events = [overhead.sse_chunk(index) for index in range(3)] + [b"data: [DONE]\n\n"]
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n" + b"".join(events)

    async def dribble(writer: asyncio.StreamWriter) -> None:
        for index in range(len(answer)):
            writer.write(answer[index:index + 1])
            await writer.drain()

    firsts: list[int] = []
    async with raw_server(dribble) as url:
        host, port, request = overhead.raw_request(url, overhead.CHAT, BODY)
        probe = overhead.StreamProbe(request, lambda: firsts.append(1))
        await asyncio.get_running_loop().create_connection(lambda: probe, host, port)
        probe.start()
        await asyncio.wait_for(probe.done, 10)
    sent = [int(event[12:event.index(b",")]) for event in events[:3]]
    assert [pair[0] for pair in probe.arrivals] == sent
    assert all(arrived >= when for when, arrived in probe.arrivals) and firsts == [1]


async def test_the_stream_probe_fails_on_an_error_answer() -> None:
    async def refuse(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\nno")

    async with raw_server(refuse) as url:
        host, port, request = overhead.raw_request(url, overhead.CHAT, BODY)
        probe = overhead.StreamProbe(request, lambda: None)
        await asyncio.get_running_loop().create_connection(lambda: probe, host, port)
        probe.start()
        with pytest.raises(RuntimeError, match="unexpected answer"):
            await asyncio.wait_for(probe.done, 10)


async def test_steady_delays_count_only_chunks_while_every_stream_runs() -> None:
    body = overhead.request_body("m", True, chunks=30, gap=0.01, phase=True)
    async with app_server(overhead.fake_upstream(2, 0.001)) as url:
        run = await overhead.steady_chunk_delays(url, body, 8, None)
    # 8 streams of 30 chunks 10 ms apart, started within a gap of each other: the window holds most of
    # their chunks but never all of them (the first chunks come before it, the last after it).
    assert 8 * 10 < len(run.delays) < 8 * 30
    assert all(0 <= delay < 5 for delay in run.delays)
    assert 0.1 < run.seconds < 1 and run.cpu == 0
