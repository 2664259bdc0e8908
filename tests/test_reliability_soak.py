"""A short soak and a SIGTERM under load (issue 14's reliability tests), both bounded in time:

- 240 requests, 24 at a time, over three models that cannot all be resident (the Ollama emulator holds
  one), streamed and whole, in Ollama's and OpenAI's dialects: every one completes well-formed while
  the pool swaps models under them;
- `warmpool serve` as a process with streams running, an idle connection and an HTTP/1.0 stream: after
  SIGTERM it exits 0 within timeouts.shutdown plus a small margin.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import running_warmpool
from tests.ollama_emulator import EmulatedModel, OllamaEmulator

MODELS = {"a": "soak-a:latest", "b": "soak-b:latest", "c": "soak-c:latest"}
REQUESTS = 240
CONCURRENCY = 24


async def test_a_soak_with_swaps_loses_no_stream_and_breaks_no_answer() -> None:
    emu = OllamaEmulator([EmulatedModel(name, size=50_000_000) for name in MODELS.values()],
                         load_seconds_per_gb=0.2, token_delay=0.002, max_loaded=1)
    await emu.start()
    raw = {"backends": {"ollama": {"kind": "ollama", "url": emu.url, "max_resident": 1}},
           "models": {name: {"backend": "ollama", "upstream_name": upstream} for name, upstream in MODELS.items()},
           "log": {"level": "warning"}}
    rng = random.Random(14)
    plan = [(rng.choice(sorted(MODELS)), rng.choice(["ollama", "openai"]), rng.random() < 0.6)
            for _ in range(REQUESTS)]
    began = time.monotonic()
    try:
        async with running_warmpool(raw) as url, aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as http:
            results = await _run_all(http, url, plan)
    finally:
        await emu.stop()
    failures = [result for result in results if result]
    assert not failures, failures[:5]
    assert emu.count("load_start") >= 10  # it did swap, under load
    assert time.monotonic() - began < 60


async def _run_all(http: aiohttp.ClientSession, url: str, plan: list[tuple[str, str, bool]]) -> list[str]:
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(model: str, dialect: str, stream: bool) -> str:
        async with limit:
            return await _one(http, url, model, dialect, stream)

    return await asyncio.gather(*(one(*step) for step in plan))


async def _one(http: aiohttp.ClientSession, url: str, model: str, dialect: str, stream: bool) -> str:
    """"" when the answer was whole and well-formed, else what was wrong."""
    messages = [{"role": "user", "content": f"soak {model}"}]
    path = "/api/chat" if dialect == "ollama" else "/v1/chat/completions"
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": stream}
    async with http.post(url + path, json=body) as response:
        data = await response.read()  # aiohttp raises on a body cut short or badly framed
        if response.status != 200:
            return f"{path} {model}: HTTP {response.status}: {data[:200]!r}"
    if not stream:
        answer = json.loads(data)
        ok = answer.get("done") is True if dialect == "ollama" else bool(answer.get("choices"))
        return "" if ok else f"{path} {model}: {data[:200]!r}"
    if dialect == "ollama":
        lines = [json.loads(line) for line in data.splitlines() if line.strip()]
        ok = lines and lines[-1].get("done") is True and not any("error" in line for line in lines)
    else:
        events = [line for line in data.decode().split("\n\n") if line.strip()]
        ok = bool(events) and events[-1] == "data: [DONE]" and not any('"error"' in e for e in events)
    return "" if ok else f"{path} {model} stream: {data[-200:]!r}"


# -- SIGTERM within the grace ------------------------------------------------------------------------------------

class _Stalling(socketserver.BaseRequestHandler):
    """An upstream that answers /v1/models, and starts every other answer as a stream it never ends."""

    def handle(self) -> None:
        sock = self.request
        sock.settimeout(30)
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                if head.startswith(b"GET /v1/models"):
                    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"
                                 b'{"data":[]}')
                    continue
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n3\r\n{}\n\r\n")
                while sock.recv(65536):
                    pass
                return
        except OSError:
            return


@pytest.fixture
def stalling_upstream() -> Iterator[str]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Stalling)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_sigterm_with_streams_running_exits_within_the_grace(warmpool_process: Any, stalling_upstream: str) -> None:
    grace = 2.0
    proc = warmpool_process({"backends": {"up": {"kind": "openai", "url": stalling_upstream}},
                             "models": {"m": {"backend": "up"}}, "timeouts": {"shutdown": grace}})
    host, port = proc.url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"model": "m", "messages": [], "stream": True}).encode()
    clients = []
    for head in (b"POST /v1/chat/completions HTTP/1.1\r\nHost: w\r\n", b"POST /v1/chat/completions HTTP/1.0\r\n"):
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(head + b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        received = b""
        while b"{}\n" not in received:
            received += sock.recv(65536)  # the stream is running
        clients.append(sock)
    idle = socket.create_connection((host, int(port)), timeout=10)
    idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: w\r\n\r\n")
    assert idle.recv(65536).startswith(b"HTTP/1.1 200 OK")
    clients.append(idle)
    started = time.monotonic()
    assert proc.stop(timeout=grace + 10) == 0
    assert time.monotonic() - started < grace + 1.5
    for sock in clients:
        sock.close()
