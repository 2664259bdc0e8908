"""What warmpool costs on the data path: direct to a fast upstream versus through warmpool.

Three processes on loopback: a fake OpenAI/Ollama upstream (aiohttp + uvloop, answers at once), warmpool
itself (`python -m warmpool serve`, log level warning) and this client (uvloop). Requests are sent by a lean
load generator (`KeepAlive`: a bare asyncio protocol, 30–60 µs of CPU per request), so that direct runs
measure the upstream, not the client; the c=16 run is repeated with aiohttp's client as the load generator
(250–300 µs per request: it, not the upstream, limits the direct run) and reported beside it, and streams
are read with aiohttp's client. Two warmpool routes to the same upstream are measured:

- `openai`: an openai-kind backend, forward only (no scheduling);
- `ollama`: an ollama-kind backend whose model the fake lists in /api/ps, so every request takes the
  scheduler's lease fast path (acquire, release, re-plan).

For reference, a proxy with no logic at all is measured beside them (`--no-reference` skips it): warmpool's
front door (warmpool/http/server.py) and its upstream client (warmpool/http/client.py) with nothing in
between (no routing,
leases, metrics or rewriting; a stream relayed with the client's `pipe` where the checkout has it,
else chunk by chunk with `readany`); aiohttp's server in place of the front door for a `--source` checkout
that has none. It is the floor of warmpool's stack; what warmpool adds above it is its own logic.

Measured, in rounds that interleave direct and proxied runs (the machine is shared, so medians over the
rounds are reported): requests per second and latency p50/p99 of small non-streamed chat completions at
concurrency 1 and 16, warmpool's CPU time per request at concurrency 16 (from /proc; steadier than
throughput on a busy machine), and the delay of each streamed SSE chunk from the moment the upstream
sent it (every chunk carries its send time, `time.time_ns()`). "added" is proxied minus direct, paired
within each round.

    .venv/bin/python benchmarks/overhead.py [--quick] [--rounds N] [--only openai|ollama] [--json]
    .venv/bin/python benchmarks/overhead.py --source /path/to/other/checkout   # compare a change
    .venv/bin/python benchmarks/overhead.py --baseline /path/to/main --nginx   # before/after and nginx, side by side
    .venv/bin/python benchmarks/overhead.py --upstream   # just the fake upstream, for profiling
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

REPO = Path(__file__).resolve().parents[1]
CHAT = "/v1/chat/completions"
ROUTES = {"openai": "fwd-model", "ollama": "pool-model"}  # route -> model name in warmpool's config
UPSTREAM_MODEL = "bench:latest"
TARGETS = {"added_p50_c1_ms": 0.5, "chunk_added_ms": 0.5, "rps_ratio_c16": 0.5, "streams_vs_nginx": 2.0}
START_TIMEOUT = 30.0
CHUNKS = 20  # per stream
GAP = 0.005  # seconds between two streamed chunks
# The steady rows: many streams running together at a token rate a GPU decodes at, each stream's ticks at a
# random phase (real streams do not tick in step). 256 streams at 50 chunks a second is 12,800 chunks a
# second: about the load issue 14's figures were taken at (nginx at 0.18 of a core).
STEADY_CHUNKS = 100
# Every server here (the fake upstream, the no-logic proxy, nginx) queues as many connections as warmpool
# does (warmpool/http/server.py BACKLOG): with asyncio's default of 100, opening 256 streams cost a 1 s SYN retry.
BACKLOG = 2048
STEADY_GAP = 0.02


@dataclass(frozen=True, slots=True)
class Settings:
    """How much to measure; the defaults keep a full run under about two minutes on two cores."""

    rounds: int = 5
    requests_c1: int = 1500
    requests_c16: int = 3000
    warmup: int = 200
    streams: int = 15
    chunks: int = CHUNKS
    gap: float = GAP
    wide: int = 256  # streams opened at once for the burst chunk-delay rows; 0 skips them
    steady: int = 256  # streams running together for the steady chunk-delay rows; 0 skips them
    steady_chunks: int = STEADY_CHUNKS


QUICK = Settings(rounds=2, requests_c1=500, requests_c16=1000, warmup=100, streams=5, wide=64, steady=64,
                 steady_chunks=40)


# -- the fake upstream (its own process) ---------------------------------------------------------------------

COMPLETION = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": UPSTREAM_MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there!"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
}).encode()
PS = json.dumps({"models": [{
    "name": UPSTREAM_MODEL, "model": UPSTREAM_MODEL, "size": 1000, "digest": "0" * 64,
    "expires_at": "2099-01-01T00:00:00Z", "size_vram": 0, "context_length": 2048, "details": {},
}]}).encode()


def sse_chunk(index: int) -> bytes:
    """One OpenAI stream event; `ts` is first so a reader finds it without parsing the rest."""
    return b'data: {"ts":%d,"id":"chatcmpl-bench","object":"chat.completion.chunk","choices":' \
           b'[{"index":0,"delta":{"content":"tok%d"},"finish_reason":null}]}\n\n' % (time.time_ns(), index)


def fake_upstream(chunks: int, gap: float) -> web.Application:
    """An OpenAI + Ollama server that answers at once: completions, SSE streams with send times, and
    the Ollama calls warmpool's ollama backend makes (version, ps, load). A streamed request may set its own
    `bench_chunks` and `bench_gap`, and `bench_phase: true` to wait a random part of the gap before its
    first chunk."""

    async def chat(request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        if not body.get("stream"):
            return web.Response(body=COMPLETION, content_type="application/json")
        count, pause = int(body.get("bench_chunks", chunks)), float(body.get("bench_gap", gap))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if body.get("bench_phase"):
            await asyncio.sleep(random.uniform(0, pause))
        for index in range(count):
            await response.write(sse_chunk(index))
            await asyncio.sleep(pause)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def constant(body: bytes) -> Callable[[web.Request], object]:
        async def answer(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(body=body, content_type="application/json")
        return answer

    app = web.Application()
    app.router.add_post(CHAT, chat)
    app.router.add_get("/v1/models", constant(b'{"object":"list","data":[{"id":"bench:latest"}]}'))
    app.router.add_get("/api/version", constant(b'{"version":"0.6.0"}'))
    app.router.add_get("/api/ps", constant(PS))
    app.router.add_post("/api/generate", constant(b'{"model":"bench:latest","response":"","done":true}'))
    return app


# -- the reference proxy with no logic (its own process) ----------------------------------------------------

def reference_proxy(upstream: str) -> web.Application:
    """Forward every request to `upstream` and relay the answer: whole when its length is known, else
    chunk by chunk. Nothing else."""
    Origin = checkout_module("warmpool.http.client", "warmpool.backends.http1").Origin

    origin = Origin(upstream, connect_timeout=5.0, idle_timeout=60.0)
    json_type = b"Content-Type: application/json\r\n"

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        answer = await origin.request(request.method, request.path, json_type, body, timeout=60.0)
        headers = {"Content-Type": answer.header("Content-Type") or "application/json"}
        try:
            if answer.content_length is not None:
                return web.Response(status=answer.status, body=await answer.read(), headers=headers)
            response = web.StreamResponse(status=answer.status, headers=headers)
            await response.prepare(request)
            while chunk := await answer.readany():
                await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            answer.close()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def checkout_module(*names: str) -> Any:
    """The first of `names` the checkout under test has (module paths moved with the package layout)."""
    for name in names[:-1]:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return importlib.import_module(names[-1])


def reference_front_door(upstream: str) -> Callable[..., object] | None:
    """The same forwarding behind warmpool's front door; None for a checkout without one."""
    import warmpool

    try:
        frontdoor = checkout_module("warmpool.http.server", "warmpool.frontdoor")
    except ImportError:
        return None
    if not Path(frontdoor.__file__).is_relative_to(Path(warmpool.__file__).parent):
        return None  # found beside the checkout under test (an editable install), not in it
    Origin = checkout_module("warmpool.http.client", "warmpool.backends.http1").Origin

    origin = Origin(upstream, connect_timeout=5.0, idle_timeout=60.0)
    json_type = b"Content-Type: application/json\r\n"

    async def forward(request: Any, reply: Any) -> None:
        answer = await origin.request(request.method, request.path, json_type, await request.read(), timeout=60.0)
        headers = [("Content-Type", answer.header("Content-Type") or "application/json")]
        try:
            if answer.content_length is not None:
                await reply.whole(answer.status, "", headers, await answer.read())
                return
            await reply.start(answer.status, "", headers, None)
            if hasattr(answer, "pipe"):  # chunks written from the connection's callback, as warmpool does now
                while not await answer.pipe(reply.write_now):
                    await reply.drain()
            else:
                while chunk := await answer.readany():
                    await reply.write(chunk)
            await reply.end()
        finally:
            answer.close()

    if hasattr(frontdoor, "Limits"):  # the server that serves every route itself
        return frontdoor.Lane(forward, frontdoor.Limits(max_body=1 << 20)).protocol
    return frontdoor.Lane(forward, lambda path: True, 1 << 20).protocol  # the front door beside aiohttp


async def serve_protocol(factory: Callable[..., object]) -> None:
    """Serve a protocol factory like serve_app does an application."""
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0,  # type: ignore[arg-type]
                                                            backlog=BACKLOG)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"listening on http://{host}:{port}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    server.close()


async def serve_app(app: web.Application) -> None:
    """Serve on an ephemeral port, print the URL, and stop when stdin closes (the parent went away)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=BACKLOG)
    await site.start()
    host, port = runner.addresses[0][:2]
    print(f"listening on http://{host}:{port}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runner.cleanup()


# -- child processes -----------------------------------------------------------------------------------------

class Child:
    """A child process that is stopped (SIGTERM, then SIGKILL) when the benchmark ends, however it ends."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None,
                 cwd: Path = REPO) -> None:
        self.name = name
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.output: list[str] = []
        self.url = ""

    def first_line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        self.drain()
        return line

    def drain(self) -> None:
        """Keep reading the child's output in the background so it never blocks on a full pipe."""
        for stream in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=self._collect, args=(stream,), daemon=True).start()

    def _collect(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.output.append(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdin is not None:
            self.proc.stdin.close()


@contextmanager
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    try:
        yield started
    finally:
        for child in reversed(started):
            child.stop()


def start_upstream(started: list[Child], settings: Settings) -> str:
    argv = [sys.executable, str(Path(__file__).resolve()), "--upstream", "--chunks", str(settings.chunks),
            "--gap", str(settings.gap)]
    return start_server(started, Child("upstream", argv)).url


def start_reference(started: list[Child], upstream: str, source: Path) -> Child:
    env = {**os.environ, "PYTHONPATH": str(source)}
    argv = [sys.executable, str(Path(__file__).resolve()), "--reference", upstream]
    return start_server(started, Child("reference proxy", argv, env))


NGINX_CONF = """
master_process off; daemon off; worker_processes 1; pid {dir}/nginx.pid; error_log stderr error;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests 1000000; keepalive_timeout 75s;
  client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir}; uwsgi_temp_path {dir};
  scgi_temp_path {dir};
  upstream fake {{ server {upstream}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port} backlog={backlog};
    location / {{ proxy_pass http://fake; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_buffering off; }}
  }}
}}
"""


def start_nginx(started: list[Child], upstream: str, workdir: Path) -> Child:
    """nginx as a plain reverse proxy (one process, so its pid is the one doing the work; unbuffered, with
    keep-alive to the upstream): the reference for what a reverse proxy adds to each chunk."""
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=workdir, upstream=upstream.removeprefix("http://"), port=port,
                                      backlog=BACKLOG))
    child = Child("nginx", ["nginx", "-c", str(conf), "-p", str(workdir)])
    child.url = f"http://127.0.0.1:{port}"
    started.append(child)
    child.drain()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RuntimeError("nginx exited:\n" + "".join(child.output))
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return child
        time.sleep(0.05)
    raise RuntimeError("nginx did not start:\n" + "".join(child.output))


def start_server(started: list[Child], child: Child) -> Child:
    """Wait for a child started with --upstream or --reference to print its URL."""
    started.append(child)
    line = child.first_line()
    if not line.startswith("listening on "):
        child.stop()
        raise RuntimeError(f"{child.name} did not start: {line!r} {''.join(child.output)}")
    child.url = line.removeprefix("listening on ")
    return child


def warmpool_config(upstream: str, port: int) -> dict[str, object]:
    return {
        "listen": f"127.0.0.1:{port}",
        "log": {"level": "warning"},
        "backends": {"fwd": {"kind": "openai", "url": upstream},
                     "pool": {"kind": "ollama", "url": upstream, "max_resident": 1}},
        "models": {"fwd-model": {"backend": "fwd", "upstream_name": UPSTREAM_MODEL},
                   "pool-model": {"backend": "pool", "upstream_name": UPSTREAM_MODEL}},
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_warmpool(started: list[Child], upstream: str, workdir: Path, source: Path = REPO) -> Child:
    """`python -m warmpool serve` from `source` on a free port (at log level warning it does not print its
    address, so the port is chosen here)."""
    port = free_port()
    path = workdir / "warmpool.yaml"
    path.write_text(yaml.safe_dump(warmpool_config(upstream, port)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARMPOOL_")}
    env["PYTHONPATH"] = str(source)
    argv = [sys.executable, "-m", "warmpool", "serve", "--config", str(path)]
    child = Child("warmpool", argv, env, cwd=source)
    child.url = f"http://127.0.0.1:{port}"
    started.append(child)
    child.drain()
    asyncio.run(wait_resident(child.url, child))
    return child


async def wait_resident(url: str, child: Child) -> None:
    """Until warmpool answers and the ollama pool's model is resident (read from the fake's /api/ps)."""
    deadline = time.monotonic() + START_TIMEOUT
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if child.proc.poll() is not None:
                raise RuntimeError("warmpool exited:\n" + "".join(child.output[-30:]))
            try:
                async with session.get(url + "/warmpool/status") as resp:
                    status = await resp.json()
                if any(ROUTES["ollama"] in p["resident"] for p in status["pools"]):
                    return
            except (aiohttp.ClientError, ValueError, KeyError):
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("warmpool did not get ready:\n" + "".join(child.output[-30:]))


# -- the client ----------------------------------------------------------------------------------------------

@dataclass(slots=True)
class Run:
    """One timed batch of requests: per-request latencies (seconds) and the wall time of the batch."""

    latencies: list[float]
    seconds: float

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds


def request_body(model: str, stream: bool, **bench: object) -> bytes:
    """A small chat request; `bench` adds the fake upstream's `bench_*` fields (a proxy passes them on)."""
    return json.dumps({"model": model, "stream": stream, "max_tokens": 8,
                       "messages": [{"role": "user", "content": "Say hello."}],
                       **{f"bench_{name}": value for name, value in bench.items()}}).encode()


class KeepAlive(asyncio.Protocol):
    """The load generator's connection: sends one fixed request at a time and reads its answer, which must
    be a 200 with a Content-Length (every non-streamed answer here has one). 30–60 µs of CPU per request,
    against 250–300 µs for aiohttp's client: with aiohttp's client as the load generator, direct runs
    measured the client (a whole core at c=16, while the upstream idled at ~60%), and on two cores the
    client then took CPU the proxy needs. This one leaves the cores to the servers being measured."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.buffer = bytearray()
        self.answer: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def ask(self) -> asyncio.Future[None]:
        assert self.transport is not None
        self.answer = asyncio.get_running_loop().create_future()
        self.transport.write(self.request)
        return self.answer

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.answer is None:
            return
        head = bytes(self.buffer[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if not head.startswith(b"http/1.1 200 ") or at < 0:
            self._fail(f"unexpected answer: {bytes(self.buffer[:end + 200])!r}")
            return
        line_end = head.find(b"\r\n", at + 17)
        length = int(head[at + 17:line_end if line_end > 0 else len(head)])
        if len(self.buffer) >= end + 4 + length:
            del self.buffer[:end + 4 + length]
            answer, self.answer = self.answer, None
            answer.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection closed: {exc}")

    def _fail(self, why: str) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(RuntimeError(why))


def raw_request(url: str, path: str, body: bytes) -> tuple[str, int, bytes]:
    """Host, port and the bytes of a POST with the headers aiohttp's client sends."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: */*\r\n"
            f"Accept-Encoding: gzip, deflate\r\nUser-Agent: warmpool-bench\r\n"
            f"Content-Length: {len(body)}\r\nContent-Type: application/json\r\n\r\n")
    return host, int(port), head.encode() + body


async def lean_requests(url: str, body: bytes, total: int, concurrency: int) -> Run:
    """`total` requests from `concurrency` keep-alive connections of the lean load generator."""
    host, port, request = raw_request(url, CHAT, body)
    loop = asyncio.get_running_loop()
    connections = [(await loop.create_connection(lambda: KeepAlive(request), host, port))[1]
                   for _ in range(concurrency)]
    latencies: list[float] = []
    remaining = [total]

    async def worker(connection: KeepAlive) -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            started = time.perf_counter()
            await connection.ask()
            latencies.append(time.perf_counter() - started)

    try:
        started = time.perf_counter()
        await asyncio.gather(*(worker(connection) for connection in connections))
        return Run(latencies, time.perf_counter() - started)
    finally:
        for connection in connections:
            if connection.transport is not None:
                connection.transport.close()


async def timed_requests(session: aiohttp.ClientSession, url: str, body: bytes, total: int,
                         concurrency: int) -> Run:
    """`total` requests from `concurrency` workers of aiohttp's client over keep-alive connections."""
    latencies: list[float] = []
    remaining = [total]
    headers = {"Content-Type": "application/json"}

    async def worker() -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            started = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{url} answered {resp.status}")
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Run(latencies, time.perf_counter() - started)


async def chunk_delays(session: aiohttp.ClientSession, url: str, body: bytes, streams: int,
                       first_bytes: list[float] | None = None) -> list[float]:
    """Seconds from each chunk's send time (the upstream's clock is ours) to its arrival here, one stream
    at a time; `first_bytes` gets each stream's wait from asking to its first chunk."""
    delays: list[float] = []
    for _ in range(streams):
        asked = time.time_ns()
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            async for line in resp.content:
                arrived = time.time_ns()
                if line.startswith(b'data: {"ts":'):
                    sent = int(line[12:line.index(b",", 12)])
                    delays.append((arrived - sent) / 1e9)
                    if first_bytes is not None and asked:
                        first_bytes.append((arrived - asked) / 1e9)
                        asked = 0
    return delays


async def wide_chunk_delays(url: str, body: bytes, streams: int,
                            first_bytes: list[float] | None = None) -> list[float]:
    """Chunk delays of `streams` streams running at once, each on its own connection (and into
    `first_bytes`, each stream's wait for its first chunk)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        runs = await asyncio.gather(*(chunk_delays(session, url, body, 1, first_bytes) for _ in range(streams)))
    return [delay for run in runs for delay in run]


class StreamProbe(asyncio.Protocol):
    """One streamed request on a connection of its own, read without an HTTP client: each chunk's send time
    (the `"ts":` the fake upstream puts first in every event) against the moment its bytes arrived. The
    framing between events (chunk sizes, blank lines) is skipped, not parsed; a few µs a chunk, so that
    256 streams read at once leave the cores to the servers being measured. `arrivals` holds (sent, arrived)
    in ns; `done` ends with the stream ([DONE]) or fails on anything but a 200 or a connection closed early."""

    MARK = b'{"ts":'

    def __init__(self, request: bytes, on_first_chunk: Callable[[], None]) -> None:
        self.request = request
        self.on_first_chunk = on_first_chunk
        self.buffer = bytearray()
        self.arrivals: list[tuple[int, int]] = []
        self.head_checked = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def start(self) -> None:
        """Send the request (connections are opened first, then every request goes at once: 256 connects
        while streams already run overflowed a server's accept queue and cost a 1 s SYN retry)."""
        self.transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        arrived = time.time_ns()
        buffer = self.buffer
        buffer += data
        if not self.head_checked:
            if len(buffer) < 13:
                return
            if not buffer.startswith(b"HTTP/1.1 200 "):
                self._fail(f"unexpected answer: {bytes(buffer[:200])!r}")
                return
            self.head_checked = True
        had, at = len(self.arrivals), 0
        while (start := buffer.find(self.MARK, at)) >= 0 and (comma := buffer.find(b",", start)) >= 0:
            self.arrivals.append((int(buffer[start + len(self.MARK):comma]), arrived))
            at = comma
        if had == 0 and self.arrivals:
            self.on_first_chunk()
        if buffer.find(b"data: [DONE]", at) >= 0:
            self.transport.close()
            if not self.done.done():
                self.done.set_result(None)
            return
        del buffer[:max(at, len(buffer) - 16)]  # keep what may be the start of a mark cut by the read

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection closed before the stream ended: {exc}")

    def _fail(self, why: str) -> None:
        if not self.done.done():
            self.done.set_exception(RuntimeError(why))


@dataclass(slots=True)
class Steady:
    """The steady part of a run of streams: from the moment every stream has its first chunk until the first
    stream ends. Delays in seconds; the proxy's CPU seconds and the window's length."""

    delays: list[float]
    cpu: float
    seconds: float


async def steady_chunk_delays(url: str, body: bytes, streams: int, pid: int | None) -> Steady:
    """Chunk delays of `streams` streams running together, each on its own connection, counted only while
    all of them run (so neither their requests nor their ends are in the figures), and the proxy's CPU
    (`pid`) over that window."""
    host, port, request = raw_request(url, CHAT, body)
    loop = asyncio.get_running_loop()
    marks: dict[str, tuple[int, float]] = {}  # "start"/"end" of the window: (time_ns, proxy CPU seconds)
    running = [0]

    def first_chunk() -> None:
        running[0] += 1
        if running[0] == streams and "end" not in marks:
            marks["start"] = (time.time_ns(), cpu_seconds(pid))

    probes = [StreamProbe(request, first_chunk) for _ in range(streams)]
    try:
        for probe in probes:
            await loop.create_connection(lambda probe=probe: probe, host, port)  # type: ignore[misc]
        for probe in probes:
            probe.start()
        await asyncio.wait([probe.done for probe in probes], return_when=asyncio.FIRST_COMPLETED)
        marks["end"] = (time.time_ns(), cpu_seconds(pid))
        await asyncio.gather(*(probe.done for probe in probes))
    finally:
        for probe in probes:
            if hasattr(probe, "transport"):
                probe.transport.close()
    if "start" not in marks:
        raise RuntimeError("a stream ended before every stream had its first chunk: make the streams longer")
    (start, cpu_start), (end, cpu_end) = marks["start"], marks["end"]
    delays = [(arrived - sent) / 1e9 for probe in probes for sent, arrived in probe.arrivals
              if start <= arrived <= end]
    return Steady(delays, cpu_end - cpu_start, (end - start) / 1e9)


# -- rounds and statistics -----------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


@dataclass(slots=True)
class Samples:
    """Per-round figures of one target (direct, or a warmpool route), keyed by measurement name."""

    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.values.setdefault(key, []).append(value)

    def median(self, key: str) -> float:
        return statistics.median(self.values[key])


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time a process has used so far (0 where /proc is not available)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure_target(url: str, model: str, settings: Settings, into: Samples, pid: int | None) -> None:
    """One round for one target: c=1, c=16, then streams; figures in milliseconds and requests/s, and the
    proxy's CPU time per request at c=16 (`pid`: the proxy's process, None for direct)."""
    plain, streamed = request_body(model, False), request_body(model, True)
    for concurrency, total in ((1, settings.requests_c1), (16, settings.requests_c16)):
        await lean_requests(url, plain, settings.warmup, concurrency)
        cpu_before = cpu_seconds(pid)
        run = await lean_requests(url, plain, total, concurrency)
        cpu_used = cpu_seconds(pid) - cpu_before
        into.add(f"rps_c{concurrency}", run.rps)
        into.add(f"p50_c{concurrency}", percentile(run.latencies, 50) * 1e3)
        into.add(f"p99_c{concurrency}", percentile(run.latencies, 99) * 1e3)
        if pid is not None and concurrency == 16:
            into.add("cpu_us_c16", cpu_used / total * 1e6)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)) as session:
        # The same c=16 run with aiohttp's client as the load generator, reported beside the lean one.
        await timed_requests(session, url + CHAT, plain, settings.warmup, 16)
        run = await timed_requests(session, url + CHAT, plain, settings.requests_c16, 16)
        into.add("rps_c16_aiohttp", run.rps)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        await chunk_delays(session, url + CHAT, streamed, 1)
        delays = await chunk_delays(session, url + CHAT, streamed, settings.streams)
    into.add("chunk_p50", percentile(delays, 50) * 1e3)
    into.add("chunk_p99", percentile(delays, 99) * 1e3)
    if settings.wide:
        cpu_before = cpu_seconds(pid)
        first_bytes: list[float] = []
        delays = await wide_chunk_delays(url + CHAT, streamed, settings.wide, first_bytes)
        cpu_used = cpu_seconds(pid) - cpu_before
        into.add("wide_p50", percentile(delays, 50) * 1e3)
        into.add("wide_p99", percentile(delays, 99) * 1e3)
        into.add("wide_first_p50", percentile(first_bytes, 50) * 1e3)
        into.add("wide_first_p99", percentile(first_bytes, 99) * 1e3)
        if pid is not None:
            # The proxy's CPU for the chunks alone: its time for the streams' requests (at the c=16 rate
            # of this round) is taken off. Steadier than the delays, which three processes on two cores
            # turn into a measure of who the kernel ran when.
            requests = settings.wide * into.values["cpu_us_c16"][-1] / 1e6
            into.add("wide_cpu_us_chunk", max(0.0, cpu_used - requests) / len(delays) * 1e6)
    if settings.steady:
        steady = request_body(model, True, chunks=settings.steady_chunks, gap=STEADY_GAP, phase=True)
        run = await steady_chunk_delays(url, steady, settings.steady, pid)
        into.add("steady_p50", percentile(run.delays, 50) * 1e3)
        into.add("steady_p99", percentile(run.delays, 99) * 1e3)
        if pid is not None:
            into.add("steady_cpu_us_chunk", run.cpu / len(run.delays) * 1e6)
            into.add("steady_cores", run.cpu / run.seconds)


async def measure(direct: str, targets: dict[str, tuple[Child, str]], settings: Settings,
                  progress: Callable[[str], None]) -> dict[str, Samples]:
    """Interleaved rounds: direct, then each target (a warmpool route, the reference proxy, nginx, and the
    same from a baseline checkout), `settings.rounds` times; the proxied targets take turns going first, so
    none always runs right after direct."""
    results = {name: Samples() for name in ["direct", *targets]}
    order = list(targets)
    for index in range(settings.rounds):
        await measure_target(direct, ROUTES["openai"], settings, results["direct"], None)
        for name in order[index % len(order):] + order[:index % len(order)]:
            child, model = targets[name]
            await measure_target(child.url, model, settings, results[name], child.proc.pid)
        progress(f"round {index + 1}/{settings.rounds} done")
    for route in [name for name in results if name != "direct"]:
        add_differences(results["direct"], results[route])
    return results


def add_differences(direct: Samples, proxied: Samples) -> None:
    """Per-round proxied-minus-direct figures (pairing rounds cancels slow drifts of the machine)."""
    for key in ("p50_c1", "p99_c1", "p50_c16", "p99_c16", "chunk_p50", "chunk_p99", "wide_p50", "wide_p99",
                "steady_p50", "steady_p99"):
        if key not in direct.values:
            continue
        for ours, theirs in zip(proxied.values[key], direct.values[key], strict=True):
            proxied.add(f"added_{key}", ours - theirs)
    for ours, theirs in zip(proxied.values["rps_c16"], direct.values["rps_c16"], strict=True):
        proxied.add("ratio_c16", ours / theirs)
    for ours, theirs in zip(proxied.values["rps_c16_aiohttp"], direct.values["rps_c16_aiohttp"], strict=True):
        proxied.add("ratio_c16_aiohttp", ours / theirs)
    for ours, theirs in zip(proxied.values["rps_c1"], direct.values["rps_c1"], strict=True):
        proxied.add("ratio_c1", ours / theirs)


# -- report --------------------------------------------------------------------------------------------------

ROWS = [
    ("c=1   requests/s", "rps_c1", "{:.0f}"),
    ("c=1   ratio to direct", "ratio_c1", "{:.2f}x"),
    ("c=1   latency p50 (ms)", "p50_c1", "{:.3f}"),
    ("c=1   latency p99 (ms)", "p99_c1", "{:.3f}"),
    ("c=1   added p50 (ms)", "added_p50_c1", "{:+.3f}"),
    ("c=1   added p99 (ms)", "added_p99_c1", "{:+.3f}"),
    ("c=16  requests/s", "rps_c16", "{:.0f}"),
    ("c=16  ratio to direct", "ratio_c16", "{:.2f}x"),
    ("c=16  latency p50 (ms)", "p50_c16", "{:.3f}"),
    ("c=16  latency p99 (ms)", "p99_c16", "{:.3f}"),
    ("c=16  added p50 (ms)", "added_p50_c16", "{:+.3f}"),
    ("c=16  added p99 (ms)", "added_p99_c16", "{:+.3f}"),
    ("c=16  proxy CPU/request (us)", "cpu_us_c16", "{:.0f}"),
    ("c=16  aiohttp client: req/s", "rps_c16_aiohttp", "{:.0f}"),
    ("c=16  aiohttp client: ratio", "ratio_c16_aiohttp", "{:.2f}x"),
    ("chunk delay p50 (ms)", "chunk_p50", "{:.3f}"),
    ("chunk delay p99 (ms)", "chunk_p99", "{:.3f}"),
    ("chunk added p50 (ms)", "added_chunk_p50", "{:+.3f}"),
    ("chunk added p99 (ms)", "added_chunk_p99", "{:+.3f}"),
    ("burst streams chunk p50 (ms)", "wide_p50", "{:.3f}"),
    ("burst streams chunk p99 (ms)", "wide_p99", "{:.3f}"),
    ("burst streams added p50 (ms)", "added_wide_p50", "{:+.3f}"),
    ("burst streams added p99 (ms)", "added_wide_p99", "{:+.3f}"),
    ("burst streams CPU/chunk (us)", "wide_cpu_us_chunk", "{:.1f}"),
    ("burst streams first chunk p50 (ms)", "wide_first_p50", "{:.3f}"),
    ("burst streams first chunk p99 (ms)", "wide_first_p99", "{:.3f}"),
    ("steady streams chunk p50 (ms)", "steady_p50", "{:.3f}"),
    ("steady streams chunk p99 (ms)", "steady_p99", "{:.3f}"),
    ("steady streams added p50 (ms)", "added_steady_p50", "{:+.3f}"),
    ("steady streams added p99 (ms)", "added_steady_p99", "{:+.3f}"),
    ("steady streams CPU/chunk (us)", "steady_cpu_us_chunk", "{:.1f}"),
    ("steady streams proxy cores", "steady_cores", "{:.2f}"),
]
HEADINGS = {"direct": "direct", "openai": "via openai", "ollama": "via ollama", "reference": "no logic",
            "nginx": "nginx"}
BEFORE = "@before"  # the suffix of a baseline checkout's targets (--baseline)


def heading(name: str) -> str:
    if name.endswith(BEFORE):
        return HEADINGS[name.removesuffix(BEFORE)].removeprefix("via ") + " before"
    return HEADINGS[name]


def table(results: dict[str, Samples]) -> str:
    names = list(results)
    lines = [f"{'median of rounds':<29}" + "".join(f"{heading(n):>16}" for n in names)]
    for label, key, fmt in ROWS:
        cells = [fmt.format(r.median(key)) if key in r.values else "-" for r in results.values()]
        lines.append(f"{label:<29}" + "".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def verdicts(results: dict[str, Samples]) -> list[str]:
    lines = []
    for route in (r for r in results if r in ROUTES):
        s = results[route]
        checks = [
            ("added p50 latency at c=1", s.median("added_p50_c1"), TARGETS["added_p50_c1_ms"], "ms", True),
            ("streamed chunk added delay p50", s.median("added_chunk_p50"), TARGETS["chunk_added_ms"], "ms",
             True),
            ("throughput at c=16, ratio to direct", s.median("ratio_c16"), TARGETS["rps_ratio_c16"], "x",
             False),
        ]
        for name, value, target, unit, at_most in checks:
            met = value <= target if at_most else value >= target
            bound = "<=" if at_most else ">="
            lines.append(f"{heading(route):<11} {name:<38} {'met' if met else 'NOT MET':<8}"
                         f"{value:.3f} {unit} (target {bound} {target:g} {unit})")
        # Issue 14: with many streams, warmpool adds at most twice the chunk delay nginx adds.
        for kind, key in (("steady", "steady"), ("burst", "wide")):
            if "nginx" not in results or f"added_{key}_p50" not in s.values:
                continue
            for q in ("p50", "p99"):
                ours, theirs = s.median(f"added_{key}_{q}"), results["nginx"].median(f"added_{key}_{q}")
                met = ours <= TARGETS["streams_vs_nginx"] * max(theirs, 0.0)
                lines.append(f"{heading(route):<11} {kind + ' streams added ' + q + ' vs nginx':<38} "
                             f"{'met' if met else 'NOT MET':<8}{ours:+.3f} ms against {theirs:+.3f} ms "
                             f"(target <= {TARGETS['streams_vs_nginx']:g}x nginx's)")
    return lines


# -- entry point ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and requests (about 20 s)")
    parser.add_argument("--rounds", type=int, help="rounds (default 5, quick 2)")
    parser.add_argument("--only", choices=sorted(ROUTES), help="measure one warmpool route only")
    parser.add_argument("--source", type=Path, default=REPO,
                        help="run warmpool from this checkout, e.g. to compare a change (default: this one)")
    parser.add_argument("--json", action="store_true", help="also print every per-round figure as JSON")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference proxy with no logic")
    parser.add_argument("--nginx", action="store_true", help="also measure nginx (proxy_buffering off) as a column")
    parser.add_argument("--baseline", type=Path,
                        help="also run warmpool from this checkout, in the same rounds (a before/after table)")
    parser.add_argument("--wide", type=int,
                        help="streams opened at once for the burst chunk-delay rows (default 256; 0: none)")
    parser.add_argument("--steady", type=int,
                        help="streams running together for the steady chunk-delay rows (default 256; 0: none)")
    parser.add_argument("--upstream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reference", metavar="UPSTREAM", help=argparse.SUPPRESS)
    parser.add_argument("--chunks", type=int, default=CHUNKS, help=argparse.SUPPRESS)
    parser.add_argument("--gap", type=float, default=GAP, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    base = QUICK if args.quick else Settings()
    rounds = args.rounds if args.rounds is not None else base.rounds
    return Settings(rounds=max(1, rounds), requests_c1=base.requests_c1, requests_c16=base.requests_c16,
                    warmup=base.warmup, streams=base.streams, chunks=args.chunks, gap=args.gap,
                    wide=base.wide if args.wide is None else max(0, args.wide),
                    steady=base.steady if args.steady is None else max(0, args.steady),
                    steady_chunks=base.steady_chunks)


def event_loop_runner() -> Callable[..., object]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


def raise_on_sigterm() -> None:
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def benchmark(settings: Settings, routes: list[str], source: Path, as_json: bool,
              with_reference: bool, with_nginx: bool = False, baseline: Path | None = None) -> int:
    def progress(text: str) -> None:
        print(f"  {text} ({time.monotonic() - began:.0f} s)", file=sys.stderr, flush=True)

    began = time.monotonic()
    with children() as started, tempfile.TemporaryDirectory(prefix="warmpool-bench-") as workdir:
        upstream = start_upstream(started, settings)
        targets: dict[str, tuple[Child, str]] = {}
        for tree, suffix in [(source, ""), *([(baseline, BEFORE)] if baseline is not None else [])]:
            place = Path(workdir) / (suffix or "now")
            place.mkdir()
            proxy = start_warmpool(started, upstream, place, tree)
            progress(f"warmpool {proxy.url} from {tree}")
            targets.update({route + suffix: (proxy, ROUTES[route]) for route in routes})
            if with_reference:
                targets["reference" + suffix] = (start_reference(started, upstream, tree), ROUTES["openai"])
        if with_nginx:
            targets["nginx"] = (start_nginx(started, upstream, Path(workdir)), ROUTES["openai"])
        progress(f"upstream {upstream}; {settings.rounds} rounds")
        run = event_loop_runner()
        results = run(measure(upstream, targets, settings, progress))
    print(f"\nwarmpool overhead, {os.cpu_count()} CPUs, {settings.rounds} rounds, "
          f"c=1: {settings.requests_c1} "
          f"requests, c=16: {settings.requests_c16}, streams: {settings.streams} x {settings.chunks} chunks "
          f"{settings.gap * 1e3:g} ms apart; burst: {settings.wide} streams opened at once; steady: "
          f"{settings.steady} streams x {settings.steady_chunks} chunks {STEADY_GAP * 1e3:g} ms apart\n")
    print(table(results))
    print()
    print("\n".join(verdicts(results)))
    if as_json:
        print(json.dumps({name: s.values for name, s in results.items()}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    if args.upstream:
        event_loop_runner()(serve_app(fake_upstream(settings.chunks, settings.gap)))
        return 0
    if args.reference:
        door = reference_front_door(args.reference)
        event_loop_runner()(serve_protocol(door) if door else serve_app(reference_proxy(args.reference)))
        return 0
    raise_on_sigterm()
    routes = [args.only] if args.only else list(ROUTES)
    try:
        return benchmark(settings, routes, args.source.resolve(), args.json, not args.no_reference, args.nginx,
                         args.baseline.resolve() if args.baseline else None)
    except KeyboardInterrupt:
        print("interrupted; child processes stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
