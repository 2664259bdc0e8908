"""Tests of the Ollama emulator (tests/ollama_emulator.py) over real loopback HTTP.

Each test checks one behaviour of upstream_spec.md §0/§1 that warmpool's Ollama backend relies on.
Timing assertions are orderings and lower bounds, never tight wall-clock windows.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import pytest

from tests.ollama_emulator import ApiError, EmulatedModel, OllamaEmulator, parse_keep_alive, parse_model_spec

QWEN, LLAMA, NOMIC = "qwen2.5:7b", "llama3.2:latest", "nomic-embed-text:latest"
JSON_TYPE = "application/json; charset=utf-8"
USER = {"role": "user", "content": "hi"}
Make = Callable[..., Awaitable[OllamaEmulator]]
Connect = Callable[[OllamaEmulator], ollama.AsyncClient]


def catalog() -> list[EmulatedModel]:
    return [EmulatedModel(QWEN, size=1_000_000_000), EmulatedModel("llama3.2", size=500_000_000),
            EmulatedModel("nomic-embed-text", size=300_000_000, embedding=True, family="nomic-bert")]


@pytest.fixture
async def make_emulator() -> AsyncIterator[Make]:
    """Factory: start emulators on free loopback ports; stop them all afterwards."""
    started: list[OllamaEmulator] = []

    async def make(models: list[EmulatedModel] | None = None, **options: Any) -> OllamaEmulator:
        emulator = OllamaEmulator(models or catalog(), **{"load_seconds_per_gb": 0.05, **options})
        await emulator.start()
        started.append(emulator)
        return emulator

    yield make
    for emulator in started:
        await emulator.stop()


@pytest.fixture
async def emu(make_emulator: Make) -> OllamaEmulator:
    return await make_emulator()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Factory: official clients for an emulator, closed afterwards."""
    clients: list[ollama.AsyncClient] = []

    def open_client(emulator: OllamaEmulator) -> ollama.AsyncClient:
        clients.append(ollama.AsyncClient(host=emulator.url))
        return clients[-1]

    yield open_client
    for client in clients:
        await client.close()


@pytest.fixture
def client(emu: OllamaEmulator, connect: Connect) -> ollama.AsyncClient:
    return connect(emu)


async def call(http: aiohttp.ClientSession, emu: OllamaEmulator, path: str, body: Any = None,
               method: str = "POST", **kwargs: Any) -> tuple[int, Any]:
    """One request; returns (status, parsed JSON or text)."""
    async with http.request(method, emu.url + path, json=body, **kwargs) as response:
        text = await response.text()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text


async def ps_names(http: aiohttp.ClientSession, emu: OllamaEmulator) -> list[str]:
    return [m["name"] for m in (await call(http, emu, "/api/ps", method="GET"))[1]["models"]]


async def gone_from_ps(http: aiohttp.ClientSession, emu: OllamaEmulator, name: str) -> bool:
    return name not in await ps_names(http, emu)


async def wait_for(predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if await result if asyncio.iscoroutine(result) else result:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


# -- §1.6 keep_alive ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value, seconds", [
    (300, 300), (1.5, 1.5), (0, 0), (-1, math.inf), (-0.5, math.inf), ("5m", 300), ("1h30m", 5400),
    ("10s", 10), ("0", 0), ("-1m", math.inf), ("-1s", math.inf), (".5s", 0.5), ("1.5h", 5400),
    ("250ms", 0.25), ("+2m", 120), (None, None)])
def test_keep_alive_values(value: Any, seconds: float | None) -> None:
    assert parse_keep_alive({"keep_alive": value}) == seconds


@pytest.mark.parametrize("value, message", [
    ("-1", 'time: missing unit in duration "-1"'), ("300", 'time: missing unit in duration "300"'),
    ("5", 'time: missing unit in duration "5"'), ("abc", 'time: invalid duration "abc"'),
    ("", 'time: invalid duration ""'), ("5x", 'time: unknown unit "x" in duration "5x"'),
    (True, "Unsupported type: 'bool'"), ([1], "Unsupported type: '[]interface {}'"),
    ({}, "Unsupported type: 'map[string]interface {}'")])
def test_keep_alive_errors(value: Any, message: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_keep_alive({"keep_alive": value})
    assert (caught.value.status, caught.value.message) == (400, message)


@pytest.mark.parametrize("path", ["/api/generate", "/api/chat", "/api/embed"])
async def test_keep_alive_string_without_unit_is_400(http: aiohttp.ClientSession, emu: OllamaEmulator,
                                                     path: str) -> None:
    status, body = await call(http, emu, path, {"model": QWEN, "keep_alive": "-1", "messages": []})
    assert (status, body) == (400, {"error": 'time: missing unit in duration "-1"'})
    assert emu.count("load_start") == 0


async def test_absent_keep_alive_leaves_a_pin_alone(client: ollama.AsyncClient, emu: OllamaEmulator) -> None:
    await client.generate(QWEN, keep_alive=-1)
    assert (await client.ps()).models[0].expires_at.year > 2200  # §1.7: forever ≈ now + 292 years
    await client.generate(QWEN, "hello")
    assert (await client.ps()).models[0].expires_at.year > 2200  # §1.6: omitted → unchanged
    await client.generate(QWEN, "hello", keep_alive="1m")
    assert emu.loaded()[QWEN]["keep_alive"] == 60  # any keep_alive sent overwrites the pin


async def test_idle_timer_starts_when_the_request_finishes(make_emulator: Make, connect: Connect) -> None:
    emu = await make_emulator(token_delay=0.1)
    client = connect(emu)
    begun = time.monotonic()
    reply = await client.generate(QWEN, "slow", keep_alive=0.5, options={"num_predict": 8})  # ~0.8 s
    finished = time.monotonic()
    assert finished - begun > 0.5 and reply.eval_count == 8
    assert QWEN in emu.loaded()  # the request outlived keep_alive, yet the model is still there
    await wait_for(lambda: QWEN not in emu.loaded())
    unloaded = next(e for e in emu.events if e["event"] == "unload")
    # decoding took ≥ 0.8 s, so a timer started at completion fires ≥ 1.3 s after the request began
    assert unloaded["t"] - begun >= 1.29 and unloaded["t"] > finished and unloaded["reason"] == "expired"


async def test_keep_alive_zero_on_a_real_request_unloads_after(client: ollama.AsyncClient,
                                                               emu: OllamaEmulator) -> None:
    reply = await client.generate(QWEN, "hi", keep_alive=0)
    assert reply.done_reason == "stop"
    await wait_for(lambda: QWEN not in emu.loaded())
    assert emu.count("unload", QWEN) == 1


# -- §0.3 load / unload without generating --------------------------------------------------------

async def test_load_and_unload_done_reasons(client: ollama.AsyncClient, emu: OllamaEmulator,
                                            http: aiohttp.ClientSession) -> None:
    loaded = await client.generate(QWEN, keep_alive=-1)
    assert (loaded.done, loaded.done_reason, loaded.response) == (True, "load", "")
    assert loaded.total_duration is None  # §1.5: load/unload answers carry no durations
    chat = await client.chat(LLAMA, messages=[])
    assert chat.done_reason == "load" and chat.message.role == "assistant" and chat.message.content == ""
    assert set(await ps_names(http, emu)) == {QWEN, LLAMA}
    unloaded = await client.generate(QWEN, keep_alive=0)
    assert unloaded.done_reason == "unload"
    await wait_for(lambda: gone_from_ps(http, emu, QWEN))
    assert (await client.chat(LLAMA, messages=[], keep_alive=0)).done_reason == "unload"
    await wait_for(lambda: gone_from_ps(http, emu, LLAMA))
    assert emu.count("unload") == 2 and emu.count("load_start") == 2


async def test_unload_of_a_model_that_is_not_loaded(http: aiohttp.ClientSession, emu: OllamaEmulator) -> None:
    status, body = await call(http, emu, "/api/generate", {"model": "llama3.2", "keep_alive": 0})
    assert status == 200 and body["done_reason"] == "unload" and body["model"] == "llama3.2"
    assert emu.count("load_start") == 0


async def test_embedding_models_preload_through_embed(client: ollama.AsyncClient, emu: OllamaEmulator,
                                                      http: aiohttp.ClientSession) -> None:
    status, body = await call(http, emu, "/api/generate", {"model": "nomic-embed-text", "prompt": "x"})
    assert (status, body) == (400, {"error": '"nomic-embed-text" does not support generate'})
    status, body = await call(http, emu, "/api/chat", {"model": "nomic-embed-text", "messages": []})
    assert (status, body) == (400, {"error": '"nomic-embed-text" does not support chat'})
    assert await call(http, emu, "/api/embed", {"model": "nomic-embed-text", "input": []}) == (
        200, {"model": "nomic-embed-text", "embeddings": []})
    assert NOMIC in emu.loaded()
    assert await call(http, emu, "/api/embeddings", {"model": "nomic-embed-text", "prompt": ""}) == (
        200, {"embedding": []})
    assert (await client.generate("nomic-embed-text", keep_alive=0)).done_reason == "unload"  # §1.6
    await wait_for(lambda: NOMIC not in emu.loaded())
    assert emu.count("load_start", NOMIC) == 1


# -- §1.8 loading, joining, queueing --------------------------------------------------------------

async def test_load_delay_is_proportional_to_size(make_emulator: Make, connect: Connect) -> None:
    emu = await make_emulator([EmulatedModel("small", size=1_000_000_000),
                               EmulatedModel("big", size=4_000_000_000)], load_seconds_per_gb=0.1)
    client = connect(emu)
    await client.generate("small")
    assert (await client.generate("big")).load_duration is None  # §1.5: load answers carry no timing
    seconds = {e["model"]: e["seconds"] for e in emu.events if e["event"] == "load_done"}
    assert seconds["small:latest"] >= 0.099 and seconds["big:latest"] >= 0.399
    assert seconds["big:latest"] > seconds["small:latest"]
    reply = await client.generate("small", "hi", keep_alive=0)
    assert reply.load_duration < reply.total_duration  # already loaded: small but non-zero


async def test_load_duration_includes_waiting_for_the_load(make_emulator: Make, connect: Connect) -> None:
    emu = await make_emulator(load_seconds_per_gb=0.3)
    reply = await connect(emu).generate(QWEN, "hi")
    assert reply.load_duration >= 0.299e9 and reply.total_duration > reply.load_duration


async def test_requests_for_a_loading_model_join_its_load(make_emulator: Make, connect: Connect) -> None:
    emu = await make_emulator(load_seconds_per_gb=0.5)
    client = connect(emu)
    first = asyncio.create_task(client.generate(QWEN, "a"))
    await wait_for(lambda: emu.count("load_start") == 1)
    assert emu.loaded()[QWEN]["state"] == "loading"
    ps = await client.ps()  # §1.7: listed while still loading, expiring at now + duration
    assert ps.models[0].name == QWEN and ps.models[0].expires_at.timestamp() > time.time() + 250
    replies = await asyncio.gather(first, client.generate(QWEN, "b"), client.chat(QWEN, [USER]))
    assert all(r.done for r in replies)
    assert (emu.count("load_start"), emu.count("load_done")) == (1, 1)


async def test_queue_over_max_queue_is_503(make_emulator: Make, http: aiohttp.ClientSession) -> None:
    models = [EmulatedModel(n, size=1_000_000_000) for n in ("a", "b", "c")]
    emu = await make_emulator(models, load_seconds_per_gb=0.5, max_queue=1)
    loading = asyncio.create_task(call(http, emu, "/api/generate", {"model": "a"}))
    await wait_for(lambda: emu.count("load_start") == 1)
    waiting = asyncio.create_task(call(http, emu, "/api/generate", {"model": "b"}))
    await asyncio.sleep(0.05)
    busy = "server busy, please try again.  maximum pending requests exceeded"
    assert await call(http, emu, "/api/generate", {"model": "c"}) == (503, {"error": busy})
    status, body = await call(http, emu, "/v1/chat/completions", {"model": "c", "messages": [USER]})
    assert status == 503 and body["error"]["message"] == busy and body["error"]["type"] == "api_error"
    assert [(await loading)[0], (await waiting)[0]] == [200, 200]


async def test_client_disconnect_during_load_aborts_it(make_emulator: Make,
                                                      http: aiohttp.ClientSession) -> None:
    emu = await make_emulator(load_seconds_per_gb=1.0)
    request = asyncio.create_task(call(http, emu, "/api/generate", {"model": QWEN, "keep_alive": -1}))
    await wait_for(lambda: emu.count("load_start") == 1)
    request.cancel()  # §0.4: the client goes away mid-load
    await wait_for(lambda: emu.count("load_aborted", QWEN) == 1)
    assert emu.loaded() == {} and await ps_names(http, emu) == []
    assert emu.count("load_done") == 0
    assert (await call(http, emu, "/api/generate", {"model": QWEN}))[1]["done_reason"] == "load"
    assert (emu.count("load_start"), emu.count("load_done")) == (2, 1)


async def test_changed_load_options_reload_the_model(client: ollama.AsyncClient, emu: OllamaEmulator,
                                                     http: aiohttp.ClientSession) -> None:
    await client.generate(QWEN, options={"num_ctx": 8192})
    await client.generate(QWEN, "hi", options={"num_ctx": 8192, "temperature": 0.1})  # per-request option
    await client.generate(QWEN, "hi", options={"num_ctx": 8192, "num_gpu": -1})  # -1 = auto = default
    assert emu.count("load_start") == 1
    await client.generate(QWEN, "hi", options={"num_ctx": 2048})
    assert (await client.ps()).models[0].context_length == 2048
    status, _ = await call(http, emu, "/v1/chat/completions", {"model": QWEN, "messages": [USER]})
    assert status == 200 and (await client.ps()).models[0].context_length == 4096  # §1.9: /v1 = defaults
    reasons = [e["reason"] for e in emu.events if e["event"] == "unload"]
    assert emu.count("load_start") == 3 and reasons == ["reload", "reload"]


async def test_option_type_errors_are_500(http: aiohttp.ClientSession, emu: OllamaEmulator) -> None:
    body = {"model": QWEN, "prompt": "x", "options": {"num_ctx": "big"}}
    assert await call(http, emu, "/api/generate", body) == (
        500, {"error": 'option "num_ctx" must be of type integer'})
    body["options"] = {"use_mmap": 1}
    assert await call(http, emu, "/api/generate", body) == (
        500, {"error": 'option "use_mmap" must be of type boolean'})
    body["options"] = {"unknown_key": "ignored", "num_ctx": 4096.0}
    assert (await call(http, emu, "/api/generate", body))[0] == 200


async def test_max_loaded_evicts_the_idle_runner_with_the_shortest_duration(make_emulator: Make,
                                                                               connect: Connect) -> None:
    models = [EmulatedModel(n, size=100_000_000) for n in ("a", "b", "c", "d")]
    emu = await make_emulator(models, max_loaded=2, token_delay=0.1)
    client = connect(emu)
    await client.generate("a", keep_alive="10m")
    await client.generate("b", keep_alive="1m")
    await client.generate("c")  # default 5m; b has the shortest duration
    assert set(emu.loaded()) == {"a:latest", "c:latest"}
    assert [e["model"] for e in emu.events if e["event"] == "unload"] == ["b:latest"]
    await client.generate("a", keep_alive=-1)  # pinned: evicted last, but evictable
    streaming = asyncio.create_task(client.generate("c", "keep c busy"))
    await wait_for(lambda: emu.loaded()["c:latest"]["ref_count"] == 1)
    await client.generate("d")  # c is shorter but busy, so the first idle runner (a) goes
    assert set(emu.loaded()) == {"c:latest", "d:latest"} and not streaming.done()
    assert (await streaming).done_reason == "stop"


async def test_eviction_waits_for_a_busy_runner_to_drain(make_emulator: Make, connect: Connect) -> None:
    emu = await make_emulator(max_loaded=1, token_delay=0.05)
    client = connect(emu)
    streaming = asyncio.create_task(client.generate(QWEN, "long answer"))
    await wait_for(lambda: emu.count("load_done") == 1)
    loaded = await client.generate(LLAMA)
    assert loaded.done_reason == "load" and (await streaming).eval_count == 12
    order = [(e["event"], e["model"]) for e in emu.events if e["event"] != "request"]
    assert order == [("load_start", QWEN), ("load_done", QWEN), ("unload", QWEN),
                     ("load_start", LLAMA), ("load_done", LLAMA)]


async def test_expire_simulates_an_outside_unload(client: ollama.AsyncClient, emu: OllamaEmulator,
                                                  http: aiohttp.ClientSession) -> None:
    await client.generate(QWEN, keep_alive=-1)
    emu.expire("qwen2.5:7b")
    await wait_for(lambda: gone_from_ps(http, emu, QWEN))
    assert emu.events[-1]["event"] == "unload" and emu.events[-1]["reason"] == "expire"


async def test_copies_share_the_source_runner(client: ollama.AsyncClient, emu: OllamaEmulator) -> None:
    await client.copy(QWEN, "my-qwen")
    await client.generate(QWEN)
    await client.generate("my-qwen", "hi")  # §1.8: same blob → same slot, no second load
    assert emu.count("load_start") == 1 and list(emu.loaded()) == [QWEN]


# -- §1.1 Host check, §1.2 errors -----------------------------------------------------------------

@pytest.mark.parametrize("host, allowed", [
    ("localhost", True), ("localhost:11434", True), ("127.0.0.1:8", True), ("[::1]:11434", True),
    ("10.1.2.3", True), ("192.168.0.9:80", True), ("172.16.5.4", True), ("0.0.0.0", True),
    ("box.local", True), ("app.localhost", True), ("svc.internal:99", True), (socket.gethostname(), True),
    ("example.com", False), ("8.8.8.8", False), ("evil.localhost.com", False), ("warmpool:11434", False)])
async def test_host_check(http: aiohttp.ClientSession, emu: OllamaEmulator, host: str, allowed: bool) -> None:
    async with http.get(emu.url + "/api/tags", headers={"Host": host}) as response:
        body = await response.read()
    assert (response.status, body == b"") == ((200, False) if allowed else (403, True))


async def test_host_check_can_be_disabled(make_emulator: Make, http: aiohttp.ClientSession) -> None:
    emu = await make_emulator(host_check=False)
    async with http.get(emu.url + "/", headers={"Host": "example.com"}) as response:
        assert (response.status, await response.text()) == (200, "Ollama is running")


@pytest.mark.parametrize("method, path, body, status, error", [
    ("POST", "/api/generate", b"", 400, "missing request body"),
    ("POST", "/api/generate", b"{bad", 400, "invalid character 'b' looking for beginning of value"),
    ("POST", "/api/generate", b'{"prompt": "x"}', 400, "model is required"),
    ("POST", "/api/generate", b'{"model": "nope"}', 404, "model 'nope' not found"),
    ("POST", "/api/chat", b'{"model": "nope", "messages": []}', 404, "model 'nope' not found"),
    ("POST", "/api/embed", b'{"model": "nope", "input": "x"}', 404, "model 'nope' not found"),
    ("POST", "/api/embed", b'{"model": "nomic-embed-text", "input": 5}', 400, "invalid input type"),
    ("POST", "/api/show", b'{"model": "nope"}', 404, "model 'nope' not found"),
    ("DELETE", "/api/delete", b'{"model": "nope"}', 404, "model 'nope' not found"),
    ("POST", "/api/copy", b'{"source": "nope", "destination": "x"}', 404, 'model "nope" not found')])
async def test_native_error_shapes(http: aiohttp.ClientSession, emu: OllamaEmulator, method: str, path: str,
                                   body: bytes, status: int, error: str) -> None:
    async with http.request(method, emu.url + path, data=body) as response:
        assert (response.status, await response.json()) == (status, {"error": error})
        assert response.headers["Content-Type"] == JSON_TYPE


async def test_openai_error_shapes(http: aiohttp.ClientSession, emu: OllamaEmulator) -> None:
    def error(message: str, kind: str) -> dict[str, Any]:
        return {"error": {"message": message, "type": kind, "param": None, "code": None}}
    assert await call(http, emu, "/v1/chat/completions", {"model": QWEN, "messages": []}) == (
        400, error("[] is too short - 'messages'", "invalid_request_error"))
    assert await call(http, emu, "/v1/completions", {"model": "nope", "prompt": "x"}) == (
        404, error("model 'nope' not found", "not_found_error"))
    assert await call(http, emu, "/v1/embeddings", {"model": "nomic-embed-text"}) == (
        400, error("invalid input", "invalid_request_error"))


async def test_wrong_method_is_405(http: aiohttp.ClientSession, emu: OllamaEmulator) -> None:
    assert (await call(http, emu, "/api/generate", method="GET"))[0] == 405
    assert (await call(http, emu, "/api/tags", {}, method="POST"))[0] == 405
    assert (await call(http, emu, "/api/delete", {"model": QWEN}, method="POST"))[0] == 405


# -- §1.3/§1.4 wire formats -----------------------------------------------------------------------

async def test_root_version_and_head(http: aiohttp.ClientSession, emu: OllamaEmulator) -> None:
    async with http.get(emu.url + "/") as response:
        assert await response.text() == "Ollama is running"
        assert response.headers["Content-Type"].startswith("text/plain")
    for path in ("/", "/api/version", "/api/tags"):
        async with http.head(emu.url + path) as response:
            assert response.status == 200 and await response.read() == b""
    assert await call(http, emu, "/api/version", method="GET") == (200, {"version": "0.32.15"})


async def test_native_stream_is_ndjson_one_token_per_line(http: aiohttp.ClientSession,
                                                          emu: OllamaEmulator) -> None:
    body = {"model": QWEN, "prompt": "why is the sky blue", "options": {"num_predict": 3}}
    async with http.post(emu.url + "/api/generate", json=body) as response:
        assert response.headers["Content-Type"] == "application/x-ndjson"
        lines = [json.loads(line) async for line in response.content]
    assert [line["done"] for line in lines] == [False, False, False, True]
    final = lines[-1]
    assert final["done_reason"] == "length" and final["eval_count"] == 3 and final["prompt_eval_count"] == 5
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(final[key], int) and final[key] > 0
    assert all(isinstance(token, int) for token in final["context"])
    assert final["created_at"].endswith("Z")


async def test_non_stream_chat_is_one_object(http: aiohttp.ClientSession, emu: OllamaEmulator) -> None:
    body = {"model": QWEN, "messages": [USER], "stream": False}
    async with http.post(emu.url + "/api/chat", json=body) as response:
        assert response.headers["Content-Type"] == JSON_TYPE
        reply = await response.json()
    assert reply["done_reason"] == "stop" and len(reply["message"]["content"].split()) == 12
    again = await call(http, emu, "/api/chat", body)
    assert again[1]["message"] == reply["message"]  # deterministic


async def test_ps_entries(http: aiohttp.ClientSession, client: ollama.AsyncClient,
                          emu: OllamaEmulator) -> None:
    await client.generate(QWEN, keep_alive="10m")
    await client.generate("llama3.2", keep_alive="1m")
    _, body = await call(http, emu, "/api/ps", method="GET")
    assert [m["name"] for m in body["models"]] == [QWEN, LLAMA]  # expires_at descending
    entry = body["models"][1]
    assert entry["model"] == LLAMA and entry["size"] == 500_000_000 and entry["size_vram"] == 0
    assert entry["context_length"] == 4096 and entry["details"]["format"] == "gguf"
    expires = datetime.fromisoformat(entry["expires_at"].replace("Z", "+00:00")).timestamp()
    assert 50 < expires - time.time() <= 60


async def test_sse_chat_completions(http: aiohttp.ClientSession, emu: OllamaEmulator) -> None:
    body = {"model": QWEN, "messages": [USER], "stream": True,
            "max_tokens": 3, "stream_options": {"include_usage": True}}
    async with http.post(emu.url + "/v1/chat/completions", json=body) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        raw = (await response.read()).decode()
    frames = raw.split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""] and all(f.startswith("data: ") for f in frames[:-1])
    chunks = [json.loads(f.removeprefix("data: ")) for f in frames[:-2]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "role" not in chunks[1]["choices"][0]["delta"]
    assert chunks[-2]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "length"}]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["id"].startswith("chatcmpl-") and chunks[0]["system_fingerprint"] == "fp_ollama"


async def test_openai_non_stream_and_other_endpoints(http: aiohttp.ClientSession,
                                                     emu: OllamaEmulator) -> None:
    _, chat = await call(http, emu, "/v1/chat/completions", {"model": QWEN, "messages": [USER]})
    assert chat["object"] == "chat.completion" and chat["choices"][0]["finish_reason"] == "stop"
    assert chat["usage"]["completion_tokens"] == 12
    _, text = await call(http, emu, "/v1/completions", {"model": QWEN, "prompt": "once", "max_tokens": 2})
    assert text["object"] == "text_completion" and text["choices"][0]["finish_reason"] == "length"
    _, vectors = await call(http, emu, "/v1/embeddings", {"model": "nomic-embed-text", "input": ["a", "b"]})
    assert [d["index"] for d in vectors["data"]] == [0, 1] and len(vectors["data"][0]["embedding"]) == 8
    _, models = await call(http, emu, "/v1/models", method="GET")
    assert {m["id"] for m in models["data"]} == {QWEN, LLAMA, NOMIC}
    streamed = {"model": QWEN, "prompt": "x", "stream": True}
    async with http.post(emu.url + "/v1/completions", json=streamed) as response:
        assert (await response.read()).endswith(b"data: [DONE]\n\n")


# -- everyday calls through the official client ---------------------------------------------------

async def test_official_client_generate_chat_embed(client: ollama.AsyncClient) -> None:
    reply = await client.generate(QWEN, "hello")
    assert reply.done_reason == "stop" and len(reply.response.split()) == 12
    parts = [part async for part in await client.generate(QWEN, "hello", stream=True)]
    assert "".join(p.response for p in parts) == reply.response and parts[-1].done
    chat = await client.chat(QWEN, [USER])
    streamed = [p async for p in await client.chat(QWEN, [USER], stream=True)]
    assert "".join(p.message.content for p in streamed) == chat.message.content
    embedded = await client.embed("nomic-embed-text", ["a", "b"])
    assert len(embedded.embeddings) == 2 and math.isclose(sum(v * v for v in embedded.embeddings[0]), 1.0)
    assert embedded.embeddings[0] != embedded.embeddings[1]


async def test_official_client_model_management(client: ollama.AsyncClient, emu: OllamaEmulator) -> None:
    assert {m.model for m in (await client.list()).models} == {QWEN, LLAMA, NOMIC}
    shown = await client.show("nomic-embed-text")
    assert shown.capabilities == ["embedding"] and shown.modelinfo["general.architecture"] == "nomic-bert"
    digest = {m.model: m.digest for m in (await client.list()).models}[QWEN]
    assert f"FROM /root/.ollama/models/blobs/sha256-{digest}" in (await client.show(QWEN)).modelfile
    assert emu.loaded() == {}  # show does not load
    assert (await client.copy(QWEN, "mine")).status == "success"
    assert "mine:latest" in {m.model for m in (await client.list()).models}
    assert (await client.delete("mine")).status == "success"
    with pytest.raises(ollama.ResponseError) as caught:
        await client.delete("mine")
    assert caught.value.status_code == 404 and caught.value.error == "model 'mine' not found"


async def test_official_client_pull(client: ollama.AsyncClient, http: aiohttp.ClientSession,
                                    emu: OllamaEmulator) -> None:
    statuses = [p.status async for p in await client.pull(QWEN, stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert (await client.pull(QWEN)).status == "success"
    await client.delete(QWEN)
    await client.pull(QWEN)  # only models the emulator knows can be pulled back
    assert QWEN in {m.model for m in (await client.list()).models}
    with pytest.raises(ollama.ResponseError, match="file does not exist"):
        [p async for p in await client.pull("unknown", stream=True)]
    assert await call(http, emu, "/api/pull", {"model": "unknown", "stream": False}) == (
        500, {"error": "pull model manifest: file does not exist"})


# -- introspection and the standalone entry point -------------------------------------------------

async def test_http_introspection(http: aiohttp.ClientSession, client: ollama.AsyncClient,
                                  emu: OllamaEmulator) -> None:
    await client.generate(QWEN, keep_alive=-1)
    _, events = await call(http, emu, "/_emulator/events", method="GET", headers={"Host": "example.com"})
    assert [e["event"] for e in events] == ["request", "load_start", "load_done"]
    assert events[0]["path"] == "/api/generate" and events[0]["body"]["keep_alive"] == -1
    _, loaded = await call(http, emu, "/_emulator/loaded", method="GET")
    assert loaded[QWEN]["keep_alive"] == -1 and loaded[QWEN]["state"] == "ready"


def test_model_specs() -> None:
    model = parse_model_spec("nomic-embed-text=300MB:embed")
    assert (model.name, model.size, model.embedding) == (NOMIC, 300_000_000, True)
    assert parse_model_spec("qwen2.5:7b=4GB").size == 4_000_000_000
    assert parse_model_spec("x=1GiB").size == 2**30


def test_standalone_command_serves_until_sigterm() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "tests.ollama_emulator", "--port", str(port),
               "--model", "qwen2.5:7b=4GB", "--model", "nomic-embed-text=300MB:embed"]
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    with subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, text=True) as process:
        try:
            url = process.stdout.readline().strip()  # type: ignore[union-attr]
            assert url == f"http://127.0.0.1:{port}"
            sizes = {m["name"]: m["size"] for m in json.loads(_get(url + "/api/tags"))["models"]}
            assert sizes == {QWEN: 4_000_000_000, NOMIC: 300_000_000}
        finally:
            process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()
