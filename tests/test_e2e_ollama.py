"""End to end over loopback: warmpool (in-process) in front of the Ollama emulator, spoken to by real HTTP
clients (aiohttp, and the official `ollama` and `openai` packages).

What the upstream saw is read from the emulator's event log (`emu.events`): every request body it received,
every load, unload and abort. Timing assertions are orderings, counts and generous bounds, never tight
wall-clock windows: the machine is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import ollama
import openai
import pytest
from aiohttp import web

from tests.conftest import eventually, running_warmpool
from tests.ollama_emulator import EmulatedModel, OllamaEmulator, normalize

# Configured names (what clients say) and the Ollama names they are served under.
PLANNER, CODER, REVIEWER, EMBEDDER = "planner", "coder", "reviewer", "embedder"
UPSTREAM = {PLANNER: "qwen2.5:7b", CODER: "llama3.2", REVIEWER: "phi3:mini", EMBEDDER: "nomic-embed-text"}
PHASES = {"context": PLANNER, "execution": CODER, "review": REVIEWER, "retrieval": EMBEDDER}
PLANNER_CTX = 8192  # the planner's configured load-time options: {"num_ctx": 8192}
CODER_KEEP_ALIVE = 900.0  # the coder's configured keep_alive ("15m")
DEFAULT_LEASE = 600.0  # what warmpool asks Ollama to keep a model without a configured keep_alive
USER = {"role": "user", "content": "Plan the next step."}
CODER_GENERATE = {"model": CODER, "prompt": "hi", "stream": False}
PHASE = "X-Warmpool-Phase"
MODEL = "X-Warmpool-Model"


# -- configuration ------------------------------------------------------------------------------------

def emulated_store() -> list[EmulatedModel]:
    """The emulator's model store; loading costs load_seconds_per_gb × size."""
    return [
        EmulatedModel(UPSTREAM[PLANNER], size=1_000_000_000, family="qwen2"),
        EmulatedModel(UPSTREAM[CODER], size=500_000_000),
        EmulatedModel(UPSTREAM[REVIEWER], size=500_000_000, family="phi3"),
        EmulatedModel(UPSTREAM[EMBEDDER], size=300_000_000, embedding=True, family="nomic-bert"),
    ]


def model_entries(backend: str = "ollama") -> dict[str, Any]:
    return {
        PLANNER: {"backend": backend, "upstream_name": UPSTREAM[PLANNER],
                  "options": {"num_ctx": PLANNER_CTX}},
        CODER: {"backend": backend, "upstream_name": UPSTREAM[CODER], "keep_alive": "15m"},
        REVIEWER: {"backend": backend, "upstream_name": UPSTREAM[REVIEWER]},
        EMBEDDER: {"backend": backend, "upstream_name": UPSTREAM[EMBEDDER], "embedding": True},
    }


def warmpool_config(ollama_url: str, *, max_resident: int = 1, **top: Any) -> dict[str, Any]:
    """One Ollama backend named "ollama" holding the four models; `top` adds or replaces top-level keys
    (scheduler, timeouts, preload, default_phase, phases, and `backends`/`models` merged in)."""
    backends = {"ollama": {"kind": "ollama", "url": ollama_url, "max_resident": max_resident},
                **top.pop("backends", {})}
    models = {**model_entries(), **top.pop("models", {})}
    return {"backends": backends, "models": models, "phases": dict(PHASES), **top}


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the stack under test -----------------------------------------------------------------------------

@dataclass
class Reply:
    status: int
    headers: Any  # CIMultiDictProxy
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Stack:
    """An emulator, warmpool in front of it, and an aiohttp session for the tests' own requests."""

    emu: OllamaEmulator
    url: str  # warmpool's base URL
    http: aiohttp.ClientSession

    async def post(self, path: str, body: Any, headers: dict[str, str] | None = None) -> Reply:
        async with self.http.post(self.url + path, json=body, headers=headers) as r:
            return Reply(r.status, r.headers, await r.read())

    async def get(self, path: str, headers: dict[str, str] | None = None) -> Reply:
        async with self.http.get(self.url + path, headers=headers) as r:
            return Reply(r.status, r.headers, await r.read())

    async def pool(self) -> dict[str, Any]:
        """The "ollama" pool's snapshot from the status API."""
        reply = await self.get("/warmpool/status")
        assert reply.status == 200, reply.body
        return next(p for p in reply.json()["pools"] if p["pool"] == "ollama")

    def ollama(self, **kwargs: Any) -> ollama.AsyncClient:
        return ollama.AsyncClient(host=self.url, **kwargs)

    def openai(self, **kwargs: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, **kwargs)

    # What the emulator saw.

    def received(self, path: str | None = None) -> list[dict[str, Any]]:
        """Bodies of the requests the emulator received (on `path`; without one, all but /api/show, which
        warmpool asks at start to learn what each model can do), in order."""
        return [e["body"] for e in self.emu.events if e["event"] == "request"
                and (e["path"] == path if path else e["path"] != "/api/show")]

    def timeline(self, *kinds: str) -> list[tuple[str, str]]:
        """(event, model) pairs of the given kinds, in order; "unload_request" is a keep_alive-0 request."""
        out = []
        for e in self.emu.events:
            kind = e["event"]
            if kind == "request" and e["body"].get("keep_alive") == 0:
                kind = "unload_request"
            if kind in kinds:
                out.append((kind, e["model"]))
        return out

    def loads(self, configured: str | None = None) -> int:
        return self.emu.count("load_start", None if configured is None else UPSTREAM[configured])


MakeStack = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def make_stack() -> AsyncIterator[MakeStack]:
    """Factory: `await make_stack(emulator={...}, models=[...], **warmpool_config_keys)`. Teardown stops
    warmpool first, then the emulators."""
    async with contextlib.AsyncExitStack() as exits:
        http = await exits.enter_async_context(aiohttp.ClientSession())

        async def make(*, emulator: dict[str, Any] | None = None, store: list[EmulatedModel] | None = None,
                       **config: Any) -> Stack:
            options = {"load_seconds_per_gb": 0.2, "token_delay": 0.005, **(emulator or {})}
            emu = OllamaEmulator(store or emulated_store(), **options)
            await emu.start()
            exits.push_async_callback(emu.stop)
            url = await exits.enter_async_context(running_warmpool(warmpool_config(emu.url, **config)))
            return Stack(emu, url, http)

        yield make


@pytest.fixture
async def stack(make_stack: MakeStack) -> Stack:
    return await make_stack()



async def read_lines(response: aiohttp.ClientResponse) -> list[tuple[float, bytes]]:
    """Every non-empty line of a streamed body with the moment it arrived."""
    lines = []
    async for line in response.content:
        if line.strip():
            lines.append((time.monotonic(), line.strip()))
    return lines


async def pool_matches(stack: Stack, predicate: Callable[[dict[str, Any]], bool]) -> bool:
    return predicate(await stack.pool())


async def queue_is(stack: Stack, expected: dict[str, int]) -> bool:
    return (await stack.pool())["queue"] == expected


def queued(pool: dict[str, Any], model: str) -> int:
    return int(pool["queue"].get(model, 0))


def error_message(reply: Reply) -> str:
    """The error text in either dialect: Ollama {"error": "..."}, OpenAI {"error": {"message": "..."}}."""
    error = reply.json()["error"]
    return error if isinstance(error, str) else error["message"]


def sse_events(lines: list[tuple[float, bytes]]) -> list[tuple[float, bytes]]:
    return [(t, line[len(b"data: "):]) for t, line in lines if line.startswith(b"data: ")]


async def native_stream(stack: Stack, phase: str) -> tuple[str, list[dict[str, Any]]]:
    body = {"messages": [USER]}
    async with stack.http.post(stack.url + "/api/chat", json=body, headers={PHASE: phase}) as r:
        assert r.status == 200, await r.read()
        return r.headers[MODEL], [json.loads(line) for _, line in await read_lines(r)]


async def openai_stream(stack: Stack, phase: str) -> tuple[str, list[dict[str, Any]]]:
    async with stack.http.post(stack.url + "/v1/chat/completions", headers={PHASE: phase},
                               json={"model": "x", "messages": [USER], "stream": True}) as r:
        assert r.status == 200, await r.read()
        events = sse_events(await read_lines(r))
        assert events[-1][1] == b"[DONE]"
        return r.headers[MODEL], [json.loads(data) for _, data in events[:-1]]


# -- 1. both dialects through an ollama backend -------------------------------------------------------

INFERENCE = [  # path, body without its model, which model serves it, check of the answer
    ("/api/generate", {"prompt": "hi", "stream": False}, PLANNER, lambda d: d["done"] and d["response"]),
    ("/api/chat", {"messages": [USER], "stream": False}, CODER,
     lambda d: d["done"] and d["message"]["content"]),
    ("/api/embed", {"input": ["a", "b"]}, EMBEDDER, lambda d: len(d["embeddings"]) == 2),
    ("/api/embeddings", {"prompt": "a"}, EMBEDDER, lambda d: len(d["embedding"]) == 8),
    ("/v1/chat/completions", {"messages": [USER]}, CODER,
     lambda d: d["object"] == "chat.completion" and d["choices"][0]["message"]["content"]),
    ("/v1/completions", {"prompt": "hi"}, CODER,
     lambda d: d["object"] == "text_completion" and d["choices"][0]["text"]),
    ("/v1/embeddings", {"input": "a"}, EMBEDDER, lambda d: len(d["data"][0]["embedding"]) == 8),
]


@pytest.mark.parametrize("by", ["model", "phase"])
@pytest.mark.parametrize(("path", "body", "model", "check"), INFERENCE, ids=[e[0] for e in INFERENCE])
async def test_inference_endpoint_is_forwarded_under_the_upstream_name(
        stack: Stack, path: str, body: dict[str, Any], model: str, check: Callable[[Any], Any],
        by: str) -> None:
    phase = next(p for p, m in PHASES.items() if m == model)
    if by == "model":
        reply = await stack.post(path, {**body, "model": model})
    else:
        reply = await stack.post(path, body, headers={PHASE: phase})
    assert reply.status == 200, reply.body
    assert check(reply.json())
    assert reply.headers[MODEL] == model
    assert reply.headers.get(PHASE) == (phase if by == "phase" else None)
    assert stack.received(path)[-1]["model"] == UPSTREAM[model]


@pytest.mark.parametrize(("path", "body"), [
    ("/api/generate", {"model": CODER, "prompt": "Write a poem."}),
    ("/api/chat", {"model": CODER, "messages": [USER]}),
])
async def test_native_stream_arrives_line_by_line(
        make_stack: MakeStack, path: str, body: dict[str, Any]) -> None:
    stack = await make_stack(emulator={"token_delay": 0.05})
    async with stack.http.post(stack.url + path, json=body) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("application/x-ndjson")
        assert r.headers[MODEL] == CODER
        lines = await read_lines(r)
    chunks = [json.loads(line) for _, line in lines]
    assert len(chunks) == 13 and [c["done"] for c in chunks] == [False] * 12 + [True]
    # 12 tokens 0.05 s apart: relayed unbuffered, the first line lands long before the last.
    assert lines[-1][0] - lines[0][0] > 0.25


async def test_native_streams_through_the_ollama_client(stack: Stack) -> None:
    async with stack.ollama() as client:
        parts = [p async for p in await client.generate(model=PLANNER, prompt="hi", stream=True)]
        assert parts[-1].done and not any(p.done for p in parts[:-1])
        assert "".join(p.response for p in parts).strip()
        messages = [m async for m in await client.chat(model=CODER, messages=[USER], stream=True)]
        assert messages[-1].done and "".join(m.message.content or "" for m in messages).strip()
        whole = await client.chat(model=CODER, messages=[USER])
    assert whole.done and whole.message.content == "".join(m.message.content or "" for m in messages)


async def test_embeddings_through_the_ollama_client(stack: Stack) -> None:
    async with stack.ollama() as client:
        embedded = await client.embed(model=EMBEDDER, input=["one", "two"])
        legacy = await client.embeddings(model="retrieval", prompt="one")  # a phase name as the model
    assert len(embedded.embeddings) == 2
    assert legacy.embedding == pytest.approx(embedded.embeddings[0])
    assert {b["model"] for b in stack.received("/api/embed")} == {UPSTREAM[EMBEDDER]}


async def test_openai_chat_streams_sse_event_by_event(make_stack: MakeStack) -> None:
    stack = await make_stack(emulator={"token_delay": 0.05})
    body = {"model": CODER, "messages": [USER], "stream": True}
    async with stack.http.post(stack.url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers[MODEL] == CODER
        events = sse_events(await read_lines(r))
    assert events[-1][1] == b"[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert events[-1][0] - events[0][0] > 0.25  # 12 tokens 0.05 s apart, relayed as they came


async def test_openai_dialect_through_the_openai_client(stack: Stack) -> None:
    async with stack.openai(default_headers={PHASE: "execution"}) as client:
        stream = await client.chat.completions.create(model="overruled", messages=[USER], stream=True)
        deltas = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        whole = await client.chat.completions.create(model=CODER, messages=[USER])
        completion = await client.completions.create(model=CODER, prompt="hi", max_tokens=4)
        vectors = await client.embeddings.create(model=EMBEDDER, input=["a", "b"])
    assert "".join(deltas) == whole.choices[0].message.content
    assert completion.choices[0].finish_reason == "length" and completion.choices[0].text
    assert [len(d.embedding) for d in vectors.data] == [8, 8]
    assert {b["model"] for b in stack.received("/v1/chat/completions")} == {UPSTREAM[CODER]}


# -- 2. phase routing ---------------------------------------------------------------------------------

async def test_phase_header_wins_over_the_body_model(stack: Stack) -> None:
    reply = await stack.post("/api/generate", {"model": CODER, "prompt": "hi", "stream": False},
                             headers={PHASE: "context"})
    assert reply.status == 200
    assert (reply.headers[MODEL], reply.headers[PHASE]) == (PLANNER, "context")
    assert stack.received("/api/generate")[-1]["model"] == UPSTREAM[PLANNER]


async def test_body_model_naming_a_phase_selects_it(stack: Stack) -> None:
    reply = await stack.post("/v1/chat/completions", {"model": "execution", "messages": [USER]})
    assert reply.status == 200
    assert (reply.headers[MODEL], reply.headers[PHASE]) == (CODER, "execution")


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
async def test_unknown_phase_is_400_listing_the_phases(stack: Stack, path: str) -> None:
    reply = await stack.post(path, {"model": CODER, "messages": [USER]}, headers={PHASE: "deploy"})
    assert reply.status == 400
    message = error_message(reply)
    assert "deploy" in message and all(phase in message for phase in PHASES)
    if path.startswith("/v1/"):
        assert reply.json()["error"]["type"] == "invalid_request_error"
    assert stack.received(path) == []


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
async def test_unknown_model_is_404(stack: Stack, path: str) -> None:
    reply = await stack.post(path, {"model": "gpt-9", "messages": [USER]})
    assert reply.status == 404
    assert "gpt-9" in error_message(reply)
    assert stack.received(path) == []


async def test_missing_model_without_default_phase_is_400(stack: Stack) -> None:
    reply = await stack.post("/api/chat", {"messages": [USER]})
    assert reply.status == 400 and "model" in error_message(reply)
    openai_reply = await stack.post("/v1/chat/completions", {"messages": [USER]})
    assert openai_reply.status == 400 and openai_reply.json()["error"]["type"] == "invalid_request_error"


async def test_default_phase_serves_requests_without_a_model(make_stack: MakeStack) -> None:
    stack = await make_stack(default_phase="review")
    reply = await stack.post("/api/chat", {"messages": [USER], "stream": False})
    assert reply.status == 200
    assert (reply.headers[MODEL], reply.headers[PHASE]) == (REVIEWER, "review")
    assert stack.received("/api/chat")[-1]["model"] == UPSTREAM[REVIEWER]


# -- 3. swapping with max_resident 1 ------------------------------------------------------------------

def max_loaded_at_once(stack: Stack) -> int:
    """The most models the emulator ever had loaded (or loading) at the same time."""
    loaded: set[str] = set()
    most = 0
    for kind, model in stack.timeline("load_start", "unload", "load_aborted"):
        if kind == "load_start":
            loaded.add(model)
        else:
            loaded.discard(model)
        most = max(most, len(loaded))
    return most


async def test_swap_unloads_and_confirms_before_loading_the_next(stack: Stack) -> None:
    for model in (PLANNER, CODER, EMBEDDER, PLANNER):
        if model == EMBEDDER:
            reply = await stack.post("/api/embed", {"model": model, "input": "x"})
        else:
            reply = await stack.post("/api/generate", {"model": model, "prompt": "x", "stream": False})
        assert reply.status == 200, reply.body
    qwen, llama, nomic = (normalize(UPSTREAM[m]) for m in (PLANNER, CODER, EMBEDDER))
    # The emulator could hold three; warmpool keeps one, and each unload is confirmed (the runner is gone
    # from /api/ps, the emulator's "unload" event) before the next load is even requested.
    assert stack.timeline("unload_request", "unload", "load_start") == [
        ("load_start", qwen),
        ("unload_request", qwen), ("unload", qwen), ("load_start", llama),
        ("unload_request", llama), ("unload", llama), ("load_start", nomic),
        ("unload_request", nomic), ("unload", nomic), ("load_start", qwen),
    ]
    assert max_loaded_at_once(stack) == 1
    assert list(stack.emu.loaded()) == [qwen]
    newest_first = [s["model"] for s in (await stack.pool())["swaps"]]
    assert newest_first == [PLANNER, EMBEDDER, CODER, PLANNER]


async def test_preload_uses_the_configured_options_so_traffic_does_not_reload(make_stack: MakeStack) -> None:
    stack = await make_stack(preload=[PLANNER])
    await eventually(lambda: stack.emu.count("load_done", UPSTREAM[PLANNER]) == 1)
    preload = stack.received()[0]
    assert preload == {"model": UPSTREAM[PLANNER], "keep_alive": DEFAULT_LEASE,
                       "options": {"num_ctx": PLANNER_CTX}}
    assert isinstance(preload["keep_alive"], (int, float))  # a JSON number: Ollama rejects "600"
    async with stack.ollama() as client:
        await client.generate(model=PLANNER, prompt="hi")
        await client.chat(model=PLANNER, messages=[USER], options={"num_ctx": 2048, "temperature": 0})
        await client.generate(model=PLANNER, prompt="hi", stream=False, options={"num_ctx": 512})
    assert stack.emu.count("load_start", UPSTREAM[PLANNER]) == 1
    assert stack.emu.count("unload") == 0
    assert stack.emu.loaded()[normalize(UPSTREAM[PLANNER])]["options"]["num_ctx"] == PLANNER_CTX
    # the configured options win over the client's; its other options pass through
    assert stack.received("/api/chat")[-1]["options"] == {"num_ctx": PLANNER_CTX, "temperature": 0}


async def test_openai_dialect_does_not_reload_a_model_with_options(make_stack: MakeStack) -> None:
    stack = await make_stack(preload=[PLANNER])
    await eventually(lambda: stack.emu.count("load_done", UPSTREAM[PLANNER]) == 1)
    async with stack.openai() as client:
        await client.chat.completions.create(model=PLANNER, messages=[USER])
    assert stack.emu.count("load_start", UPSTREAM[PLANNER]) == 1


@pytest.mark.parametrize(("path", "body"), [
    ("/api/generate", {"prompt": "hi"}),
    ("/api/chat", {"messages": [USER]}),
])
@pytest.mark.parametrize("client_keep_alive", [-1, "5m", "-1m", 3600.5])
async def test_client_keep_alive_is_replaced_on_native_endpoints(
        stack: Stack, path: str, body: dict[str, Any], client_keep_alive: Any) -> None:
    """warmpool keeps sending its own keep_alive upstream, so Ollama never unloads behind its back; the
    client's becomes warmpool's idle expiry for the model (tests/test_keep_alive.py)."""
    reply = await stack.post(path, {**body, "model": CODER, "stream": False, "keep_alive": client_keep_alive})
    assert reply.status == 200, reply.body
    assert stack.received(path)[-1]["keep_alive"] == CODER_KEEP_ALIVE
    llama = normalize(UPSTREAM[CODER])
    assert stack.emu.loaded()[llama]["keep_alive"] == CODER_KEEP_ALIVE  # a 0 would have unloaded it
    assert stack.emu.count("unload") == 0


async def test_embedding_model_preloads_through_embed(make_stack: MakeStack) -> None:
    stack = await make_stack(preload=[EMBEDDER])
    await eventually(lambda: stack.emu.count("load_done", UPSTREAM[EMBEDDER]) == 1)
    assert stack.received() == [{"model": UPSTREAM[EMBEDDER], "keep_alive": DEFAULT_LEASE, "input": []}]
    assert stack.received("/api/embed")[0]["input"] == []
    reply = await stack.post("/v1/embeddings", {"model": EMBEDDER, "input": ["a"]})
    assert reply.status == 200
    assert stack.loads(EMBEDDER) == 1


# -- 4. the Host header -------------------------------------------------------------------------------

async def test_host_header_is_rewritten_for_ollama(stack: Stack) -> None:
    evil = {"Host": "evil.example"}
    async with stack.http.get(stack.emu.url + "/api/version", headers=evil) as direct:
        assert direct.status == 403  # the emulator's Host check is on
    for path, body in [("/api/generate", {"model": PLANNER, "prompt": "hi", "stream": False}),
                       ("/v1/chat/completions", {"model": CODER, "messages": [USER]}),
                       ("/api/show", {"model": CODER})]:
        reply = await stack.post(path, body, headers=evil)
        assert reply.status == 200, (path, reply.status, reply.body)
    for path in ("/api/tags", "/api/ps", "/api/version"):
        reply = await stack.get(path, headers=evil)
        assert reply.status == 200, (path, reply.status, reply.body)


# -- 5. listings and model management ----------------------------------------------------------------

async def test_tags_lists_every_name_a_client_may_use(stack: Stack) -> None:
    async with stack.ollama() as client:
        listed = await client.list()
    by_name = {m.model: m for m in listed.models}
    configured = {f"{m}:latest" for m in (PLANNER, CODER, REVIEWER, EMBEDDER)}
    assert set(by_name) == configured | {normalize(n) for n in UPSTREAM.values()}
    assert by_name["planner:latest"].size == 1_000_000_000  # facts from the upstream's own entry
    assert by_name["embedder:latest"].details.family == "nomic-bert"
    assert by_name["qwen2.5:7b"].digest == by_name["planner:latest"].digest


async def test_ps_shows_what_is_loaded_under_configured_names(stack: Stack) -> None:
    async with stack.ollama() as client:
        assert (await client.ps()).models == []
        await client.generate(model=CODER, prompt="hi")
        running = (await client.ps()).models
    assert [m.model for m in running] == ["coder:latest"]
    assert running[0].size == 500_000_000


async def test_v1_models_lists_every_name_a_client_may_use(stack: Stack) -> None:
    async with stack.openai() as client:
        ids = [m.id async for m in client.models.list()]
    assert sorted(ids) == sorted([PLANNER, CODER, REVIEWER, EMBEDDER, *UPSTREAM.values()])


async def test_v1_models_retrieves_one_model(stack: Stack) -> None:
    async with stack.openai() as client:
        model = await client.models.retrieve(PLANNER)
    assert (model.id, model.owned_by) == (PLANNER, "ollama")
    missing = await stack.get("/v1/models/gpt-9")
    assert missing.status == 404 and "gpt-9" in error_message(missing)


async def test_show_is_forwarded_under_the_upstream_name(stack: Stack) -> None:
    async with stack.ollama() as client:
        shown = await client.show(PLANNER)
    digest = next(m.digest for m in emulated_store() if m.name == normalize(UPSTREAM[PLANNER]))
    assert f"blobs/sha256-{digest}" in (shown.modelfile or "")
    assert shown.details.family == "qwen2"
    assert stack.received("/api/show")[-1] == {"model": UPSTREAM[PLANNER]}
    assert stack.loads() == 0  # show never loads


async def test_pull_copy_and_delete_are_forwarded(stack: Stack) -> None:
    async with stack.ollama() as client:
        progress = [p.status async for p in await client.pull(CODER, stream=True)]
        assert progress[0] == "pulling manifest" and progress[-1] == "success"
        assert (await client.pull(CODER)).status == "success"
        assert (await client.copy(PLANNER, "planner-backup")).status == "success"
        assert (await client.delete(CODER)).status == "success"
    assert stack.received("/api/copy") == [{"source": UPSTREAM[PLANNER], "destination": "planner-backup"}]
    assert stack.received("/api/delete") == [{"model": UPSTREAM[CODER]}]
    async with stack.http.get(stack.emu.url + "/api/tags") as r:
        upstream_names = {m["name"] for m in (await r.json())["models"]}
    assert "planner-backup:latest" in upstream_names
    assert normalize(UPSTREAM[CODER]) not in upstream_names
    assert stack.loads() == 0


async def test_root_and_version(make_stack: MakeStack) -> None:
    stack = await make_stack(emulator={"version": "0.99.1"})
    root = await stack.get("/")
    assert root.status == 200 and root.body == b"Ollama is running"
    version = await stack.get("/api/version")
    assert version.json() == {"version": "0.99.1"}


# -- 6. upstream failures -----------------------------------------------------------------------------


def one_more_backend(name: str, url: str, model: str) -> dict[str, Any]:
    """Config keys that add backend `name` at `url` serving `model` (upstream name "llama3.2")."""
    return {"backends": {name: {"kind": "ollama", "url": url}},
            "models": {model: {"backend": name, "upstream_name": UPSTREAM[CODER]}}}


CHAT_PATHS = ["/api/chat", "/v1/chat/completions"]


@dataclass
class Hanging:
    """An HTTP server on loopback that accepts every request and never answers, except that until
    `stalled` is set it answers the GETs warmpool makes at start-up (/api/version, /api/ps) like an idle
    Ollama."""

    url: str
    stalled: asyncio.Event


@pytest.fixture
async def hanging() -> AsyncIterator[Hanging]:
    stalled = asyncio.Event()
    canned = {"/api/version": {"version": "0.32.15"}, "/api/ps": {"models": []}, "/api/tags": {"models": []}}

    async def handle(request: web.Request) -> web.Response:
        if request.method == "GET" and request.path in canned and not stalled.is_set():
            return web.json_response(canned[request.path])
        await asyncio.sleep(3600)
        return web.Response()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield Hanging(f"http://127.0.0.1:{runner.addresses[0][1]}", stalled)
    await runner.cleanup()


@pytest.mark.timeout(120)
async def test_unreachable_backend_is_502_naming_it(make_stack: MakeStack) -> None:
    stack = await make_stack(**one_more_backend("nowhere", f"http://127.0.0.1:{free_port()}", "ghost"))
    for path in CHAT_PATHS:
        reply = await stack.post(path, {"model": "ghost", "messages": [USER], "stream": False})
        assert reply.status == 502, reply.body
        assert "'nowhere'" in error_message(reply)
        assert reply.headers[MODEL] == "ghost"
        good = await stack.post(path, {"model": CODER, "messages": [USER], "stream": False})
        assert good.status == 200, good.body
    tags = (await stack.get("/api/tags")).json()["models"]  # an unreachable backend hides no model
    assert "ghost:latest" in {m["name"] for m in tags}


@pytest.mark.timeout(120)
async def test_silent_backend_is_504_after_the_first_byte_timeout(
        hanging: Hanging, make_stack: MakeStack) -> None:
    stack = await make_stack(**one_more_backend("mute", hanging.url, "hush"), timeouts={"first_byte": "1s"})
    for path in CHAT_PATHS:
        reply = await asyncio.wait_for(stack.post(path, {"model": "hush", "messages": [USER]}), 30)
        assert reply.status == 504, reply.body
        assert "'mute'" in error_message(reply)
        good = await stack.post(path, {"model": CODER, "messages": [USER], "stream": False})
        assert good.status == 200, good.body


@pytest.mark.timeout(120)
async def test_listings_answer_while_a_backend_hangs(hanging: Hanging, make_stack: MakeStack) -> None:
    stack = await make_stack(**one_more_backend("mute", hanging.url, "hush"))
    hanging.stalled.set()
    for path in ("/api/tags", "/api/ps", "/api/version", "/v1/models"):
        started = time.monotonic()
        reply = await asyncio.wait_for(stack.get(path), 60)
        assert reply.status == 200, (path, reply.body)
        assert time.monotonic() - started < 15, path  # not held up for the hung backend's full timeout
    tags = {m["name"] for m in (await stack.get("/api/tags")).json()["models"]}
    assert {"hush:latest", "planner:latest"} <= tags


@pytest.mark.timeout(120)
async def test_warmpool_starts_promptly_while_a_backend_hangs(
        hanging: Hanging, make_stack: MakeStack) -> None:
    hanging.stalled.set()
    started = time.monotonic()
    stack = await make_stack(**one_more_backend("mute", hanging.url, "hush"), timeouts={"connect": "1s"})
    assert time.monotonic() - started < 10  # the bug costs 21 s here
    reply = await stack.post("/api/chat", {"model": CODER, "messages": [USER], "stream": False})
    assert reply.status == 200


@pytest.mark.timeout(120)
async def test_upstream_dying_mid_stream_ends_the_stream_with_an_error(make_stack: MakeStack) -> None:
    stack = await make_stack(emulator={"token_delay": 0.5})
    native = await stack.http.post(stack.url + "/api/chat", json={"model": CODER, "messages": [USER]})
    sse = await stack.http.post(stack.url + "/v1/chat/completions",
                                json={"model": CODER, "messages": [USER], "stream": True})
    assert json.loads(await native.content.readline())["done"] is False
    await stack.emu.stop()  # the upstream goes away with both streams half sent
    native_lines = [json.loads(line) for _, line in await asyncio.wait_for(read_lines(native), 30)]
    sse_data = [data for _, data in sse_events(await asyncio.wait_for(read_lines(sse), 30))]
    native.release()
    sse.release()
    assert "'ollama'" in native_lines[-1]["error"] and not any(c.get("done") for c in native_lines)
    assert "'ollama'" in json.loads(sse_data[-1])["error"]["message"]
    assert b"[DONE]" not in sse_data  # the client must not take a cut stream for a whole one
    assert (await stack.get("/api/tags")).status == 200  # warmpool itself goes on


@pytest.mark.timeout(120)
async def test_upstream_going_silent_mid_stream_is_cut_after_the_idle_timeout(make_stack: MakeStack) -> None:
    # tokens 4 s apart; warmpool tolerates 1 s of silence
    stack = await make_stack(emulator={"token_delay": 4.0}, timeouts={"idle": "1s"})
    async with stack.http.post(stack.url + "/api/generate", json={"model": CODER, "prompt": "hi"}) as r:
        assert r.status == 200
        lines = [json.loads(line) for _, line in await asyncio.wait_for(read_lines(r), 30)]
    assert len(lines) == 1 and "idle" in lines[0]["error"]
    llama = normalize(UPSTREAM[CODER])
    # the upstream request ended with the cut
    await eventually(lambda: stack.emu.loaded()[llama]["ref_count"] == 0, timeout=15)
    follow = await stack.post("/api/show", {"model": CODER})
    assert follow.status == 200


# -- 7. clients that go away --------------------------------------------------------------------------

@pytest.mark.timeout(120)
async def test_client_disconnect_mid_stream_cancels_the_upstream_request(make_stack: MakeStack) -> None:
    stack = await make_stack(emulator={"token_delay": 2.0})
    llama = normalize(UPSTREAM[CODER])
    body = {"model": CODER, "prompt": "Tell me everything.", "options": {"num_predict": 100_000}}
    async with aiohttp.ClientSession() as own:
        response = await own.post(stack.url + "/api/generate", json=body)
        first = json.loads(await response.content.readline())
        assert first["done"] is False and stack.emu.loaded()[llama]["ref_count"] == 1
        response.close()  # hang up mid-stream
    # Eleven more tokens 2 s apart were due (22 s): the runner is released long before, so the upstream
    # request ended when the client left.
    await eventually(lambda: stack.emu.loaded()[llama]["ref_count"] == 0, timeout=10)
    await eventually(lambda: pool_matches(stack, lambda pool: pool["models"][CODER]["inflight"] == 0))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("blocker", ["stream", "load"])
async def test_client_that_leaves_the_queue_causes_no_load(make_stack: MakeStack, blocker: str) -> None:
    # The planner is busy (streaming, or loading for 3 s); a coder request waits for the swap, then its
    # client gives up.
    load_seconds_per_gb = 3.0 if blocker == "load" else 0.2
    stack = await make_stack(emulator={"token_delay": 0.3, "load_seconds_per_gb": load_seconds_per_gb})
    qwen = normalize(UPSTREAM[PLANNER])
    running = asyncio.create_task(native_stream(stack, "context"))
    if blocker == "stream":
        await eventually(lambda: stack.emu.loaded().get(qwen, {}).get("ref_count") == 1)
    else:
        await eventually(lambda: stack.emu.loaded().get(qwen, {}).get("state") == "loading")
    waiting = asyncio.create_task(stack.post("/api/chat", {"model": CODER, "messages": [USER]}))
    await eventually(lambda: pool_matches(stack, lambda pool: queued(pool, CODER) == 1))
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    await eventually(lambda: pool_matches(stack, lambda pool: queued(pool, CODER) == 0))
    model, chunks = await asyncio.wait_for(running, 60)
    assert model == PLANNER and chunks[-1]["done"] is True
    await asyncio.sleep(1.0)  # time for a wrongly remembered waiter to start its swap
    assert stack.loads(CODER) == 0
    assert stack.timeline("unload_request", "unload") == []
    pool = await stack.pool()
    assert pool["resident"] == [PLANNER] and pool["queue"] == {}


def unload_gaps(stack: Stack) -> list[float]:
    """For each unload request, the seconds since the emulator received the last inference request for
    that model. Each inference request here streams for at least 12 token delays, and warmpool may only
    unload a model once its streams are over: so no gap may be shorter than that."""
    last: dict[str, float] = {}
    gaps = []
    for e in stack.emu.events:
        body = e.get("body") or {}
        work = body.get("prompt") or body.get("messages") or body.get("input")
        if e["event"] == "request" and body.get("keep_alive") == 0 and not work and e["model"] in last:
            gaps.append(e["t"] - last[e["model"]])
        elif e["event"] == "request" and work:
            last[e["model"]] = e["t"]
    return gaps


# -- 8. many clients, one slot ------------------------------------------------------------------------

SUBMISSION = ["context", "execution", "review", "context", "execution", "context", "review", "review",
              "execution", "context", "review", "execution", "context", "review", "execution", "context"]


@pytest.mark.timeout(180)
async def test_sixteen_clients_over_three_phases_are_batched(make_stack: MakeStack) -> None:
    stack = await make_stack(emulator={"token_delay": 0.02})
    # a few clients speak OpenAI
    clients = [(openai_stream if i % 3 == 1 and phase != "context" else native_stream)(stack, phase)
               for i, phase in enumerate(SUBMISSION)]
    answers = await asyncio.wait_for(asyncio.gather(*clients), 120)
    for phase, (model, chunks), client in zip(SUBMISSION, answers, clients, strict=True):
        assert model == PHASES[phase]
        if "openai" in client.__qualname__:
            assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        else:
            assert chunks[-1]["done"] is True and not any(c["done"] for c in chunks[:-1])
    changes = 1 + sum(a != b for a, b in itertools.pairwise(SUBMISSION))
    loads = stack.loads()
    assert 3 <= loads <= changes
    assert loads <= 4  # batched: A A B B, not A B A B
    assert max_loaded_at_once(stack) == 1
    assert min(unload_gaps(stack)) >= 11 * 0.02  # no stream had its model unloaded under it
    assert (await stack.pool())["queue"] == {}


@pytest.mark.timeout(120)
async def test_requests_queued_behind_a_load_are_served_before_swapping_away(make_stack: MakeStack) -> None:
    # the planner takes 2 s to load; two requests for it and then one for the coder queue up meanwhile
    stack = await make_stack(emulator={"token_delay": 0.1, "load_seconds_per_gb": 2.0})
    planners = [asyncio.create_task(native_stream(stack, "context")) for _ in range(2)]
    await eventually(lambda: queue_is(stack, {PLANNER: 2}))
    coder = asyncio.create_task(native_stream(stack, "execution"))
    await eventually(lambda: queue_is(stack, {PLANNER: 2, CODER: 1}))
    answers = await asyncio.wait_for(asyncio.gather(*planners, coder), 60)
    assert [model for model, _ in answers] == [PLANNER, PLANNER, CODER]
    assert all(chunks[-1]["done"] for _, chunks in answers)
    qwen, llama = normalize(UPSTREAM[PLANNER]), normalize(UPSTREAM[CODER])
    assert stack.timeline("unload_request", "unload", "load_start") == [
        ("load_start", qwen), ("unload_request", qwen), ("unload", qwen), ("load_start", llama)]
    assert min(unload_gaps(stack)) >= 11 * 0.1  # the planner's streams ran whole before it went


@pytest.mark.timeout(120)
async def test_swap_waits_for_the_running_stream(make_stack: MakeStack) -> None:
    stack = await make_stack(emulator={"token_delay": 0.2})
    qwen, llama = normalize(UPSTREAM[PLANNER]), normalize(UPSTREAM[CODER])
    chunks = []
    body = {"model": PLANNER, "messages": [USER]}
    async with stack.http.post(stack.url + "/api/chat", json=body) as running:
        chunks.append(json.loads(await running.content.readline()))
        other = asyncio.create_task(stack.post("/api/generate", CODER_GENERATE))
        await eventually(lambda: queue_is(stack, {CODER: 1}))
        async for line in running.content:
            chunks.append(json.loads(line))
            if len(chunks) < 12:  # a token is still to come (0.2 s away): the stream is certainly running
                assert stack.timeline("unload_request", "unload", "load_start") == [("load_start", qwen)]
    assert len(chunks) == 13 and chunks[-1]["done"] is True  # the stream was not cut
    reply = await asyncio.wait_for(other, 60)
    assert reply.status == 200 and reply.headers[MODEL] == CODER
    assert stack.timeline("unload_request", "unload", "load_start") == [
        ("load_start", qwen), ("unload_request", qwen), ("unload", qwen), ("load_start", llama)]
    assert min(unload_gaps(stack)) >= 11 * 0.2


# -- 9. queue limits ----------------------------------------------------------------------------------

@pytest.mark.timeout(120)
async def test_full_queue_is_503_with_retry_after(make_stack: MakeStack) -> None:
    stack = await make_stack(emulator={"token_delay": 0.2}, scheduler={"max_queue": 2})
    body = {"model": PLANNER, "prompt": "x"}
    async with stack.http.post(stack.url + "/api/generate", json=body) as running:
        await running.content.readline()
        waiting = [asyncio.create_task(stack.post("/api/generate", CODER_GENERATE)) for _ in range(2)]
        await eventually(lambda: queue_is(stack, {CODER: 2}))
        for path in ("/api/generate", "/v1/completions"):
            refused = await stack.post(path, {"model": REVIEWER, "prompt": "hi", "stream": False})
            assert refused.status == 503, refused.body
            assert int(refused.headers["Retry-After"]) >= 1 and refused.headers[MODEL] == REVIEWER
            assert "waiting" in error_message(refused)
        # the resident model is still served: a full queue only refuses requests that would wait
        served = await stack.post("/api/generate", {"model": PLANNER, "prompt": "hi", "stream": False})
        assert served.status == 200
        await read_lines(running)
    replies = await asyncio.wait_for(asyncio.gather(*waiting), 60)
    assert [r.status for r in replies] == [200, 200]
    assert stack.loads(REVIEWER) == 0


@pytest.mark.timeout(120)
async def test_queue_timeout_is_504_and_the_load_goes_on(make_stack: MakeStack) -> None:
    # the planner (1 GB) takes 8 s to load; a request may wait 1 s
    stack = await make_stack(emulator={"load_seconds_per_gb": 8.0}, scheduler={"queue_timeout": "1s"})
    native = await stack.post("/api/generate", {"model": PLANNER, "prompt": "hi", "stream": False})
    assert native.status == 504, native.body
    assert "1 s" in error_message(native) and native.headers[MODEL] == PLANNER
    behind = await stack.post("/v1/chat/completions", {"model": REVIEWER, "messages": [USER]})
    assert behind.status == 504 and behind.json()["error"]["type"] == "server_error"
    assert await queue_is(stack, {})
    await eventually(lambda: stack.emu.count("load_done", UPSTREAM[PLANNER]) == 1, timeout=60)
    after = await stack.post("/api/generate", {"model": PLANNER, "prompt": "hi", "stream": False})
    assert after.status == 200
    assert stack.loads() == 1  # the load outlived its impatient client; nobody loaded the reviewer


# -- 10. drift: the model left Ollama without warmpool unloading it ----------------------------------

@pytest.mark.timeout(120)
async def test_request_after_an_outside_unload_succeeds(make_stack: MakeStack) -> None:
    stack = await make_stack(preload=[PLANNER])
    qwen = normalize(UPSTREAM[PLANNER])
    await eventually(lambda: stack.emu.count("load_done", qwen) == 1)
    stack.emu.expire(qwen)
    await eventually(lambda: qwen not in stack.emu.loaded())
    reply = await stack.post("/api/generate", {"model": PLANNER, "prompt": "hi", "stream": False})
    assert reply.status == 200, reply.body
    assert stack.emu.loaded()[qwen]["options"]["num_ctx"] == PLANNER_CTX  # reloaded as configured
    coder = await stack.post("/api/chat", {"model": CODER, "messages": [USER], "stream": False})
    assert coder.status == 200
    assert max_loaded_at_once(stack) == 1


@pytest.mark.timeout(120)
async def test_outside_unload_is_noticed_and_reloaded_as_a_swap(make_stack: MakeStack) -> None:
    stack = await make_stack(preload=[PLANNER])
    qwen = normalize(UPSTREAM[PLANNER])
    await eventually(lambda: stack.emu.count("load_done", qwen) == 1)
    stack.emu.expire(qwen)
    await eventually(lambda: qwen not in stack.emu.loaded())
    await eventually(lambda: pool_matches(stack, lambda pool: PLANNER not in pool["resident"]), timeout=15)
    reply = await stack.post("/api/generate", {"model": PLANNER, "prompt": "hi", "stream": False})
    assert reply.status == 200
    assert [s["model"] for s in (await stack.pool())["swaps"]] == [PLANNER, PLANNER]
