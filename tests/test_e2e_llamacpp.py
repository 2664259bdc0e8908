"""End to end with real parts: warmpool as a child process, managed llama-cpp-python servers with the gemma
270M model, real HTTP clients (aiohttp, the official ollama and openai packages)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import psutil
import pytest
import yaml

from tests.conftest import WarmpoolProcess, llama_models, wait_until

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def wp(tmp_path_factory: pytest.TempPathFactory, gguf_path: str) -> Iterator[WarmpoolProcess]:
    raw = {
        "listen": "127.0.0.1:0",
        "max_body_size": "1MiB",
        "backends": {"local": {"kind": "llamacpp", "max_resident": 1}},
        "models": llama_models(gguf_path, "planner", "coder", "verifier"),
        "phases": {"context": "planner", "execution": "coder", "verification": "verifier"},
    }
    path = tmp_path_factory.mktemp("wp") / "warmpool.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = WarmpoolProcess(path)
    proc.wait_ready()
    yield proc
    proc.stop()


def llama_servers(root_pid: int) -> list[psutil.Process]:
    """The llama.cpp worker processes under warmpool: children listening on a port (one per slot)."""
    found = []
    for child in psutil.Process(root_pid).children(recursive=True):
        try:
            if any(c.status == psutil.CONN_LISTEN for c in child.net_connections("tcp")):
                found.append(child)
        except psutil.Error:
            continue
    return found


async def post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as s:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with s.post(url, data=data, headers={"Content-Type": "application/json", **(headers or {})}) as r:
            return r.status, dict(r.headers), await r.read()


async def status(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(url + "/warmpool/status") as r:
        return await r.json()


CHAT = {"model": "anything", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}


async def test_openai_chat_non_streamed_by_phase(wp: WarmpoolProcess) -> None:
    code, headers, body = await post(wp.url + "/v1/chat/completions", CHAT, {"X-Warmpool-Phase": "context"})
    assert code == 200, body
    assert headers["X-Warmpool-Model"] == "planner" and headers["X-Warmpool-Phase"] == "context"
    data = json.loads(body)
    assert data["object"] == "chat.completion" and data["choices"][0]["finish_reason"] in ("stop", "length")


async def test_openai_chat_streamed_chunk_by_chunk(wp: WarmpoolProcess) -> None:
    events = []
    async with aiohttp.ClientSession() as s:
        async with s.post(wp.url + "/v1/chat/completions", json={**CHAT, "model": "planner", "stream": True}) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            async for line in r.content:
                if line.startswith(b"data: "):
                    events.append(line[6:].strip())
    assert events[-1] == b"[DONE]"
    finishes = [json.loads(e)["choices"][0].get("finish_reason") for e in events[:-1] if json.loads(e)["choices"]]
    assert finishes[-1] in ("stop", "length")


async def test_ollama_chat_translated_streamed(wp: WarmpoolProcess) -> None:
    body = {"model": "planner", "messages": [{"role": "user", "content": "Hi"}], "options": {"num_predict": 6}}
    code, headers, raw = await post(wp.url + "/api/chat", body)
    assert code == 200 and headers["Content-Type"].startswith("application/x-ndjson")
    lines = [json.loads(x) for x in raw.splitlines()]
    assert all(not x["done"] for x in lines[:-1]) and lines[-1]["done"] is True
    assert lines[-1]["done_reason"] in ("stop", "length") and lines[-1]["model"] == "planner"


async def test_ollama_generate_translated_not_streamed(wp: WarmpoolProcess) -> None:
    code, _, raw = await post(wp.url + "/api/generate",
                              {"model": "planner", "prompt": "Hi", "stream": False, "options": {"num_predict": 5}})
    data = json.loads(raw)
    assert code == 200 and data["done"] is True and isinstance(data["response"], str)


async def test_phase_switch_swaps_with_one_resident(wp: WarmpoolProcess) -> None:
    for phase, model in (("context", "planner"), ("execution", "coder"), ("context", "planner")):
        code, headers, body = await post(wp.url + "/v1/chat/completions", CHAT, {"X-Warmpool-Phase": phase})
        assert code == 200, body
        assert headers["X-Warmpool-Model"] == model
        pool = (await status(wp.url))["pools"][0]
        assert pool["resident"] == [model]
        assert len(llama_servers(wp.proc.pid)) == 1
    swaps = (await status(wp.url))["pools"][0]["swaps"]
    assert [s["model"] for s in swaps[:2]] == ["planner", "coder"] and all(s["ok"] for s in swaps)


@pytest.mark.parametrize("dialect", ["/api/chat", "/v1/chat/completions"])
async def test_errors_in_the_clients_dialect(wp: WarmpoolProcess, dialect: str) -> None:
    url = wp.url + dialect
    cases = [
        (b"{not json", {}, 400, "invalid JSON"),
        ({"messages": []}, {}, 400, "model is required"),
        ({"model": "nope", "messages": []}, {}, 404, "model 'nope' not found"),
        ({"model": "planner", "messages": []}, {"X-Warmpool-Phase": "review"}, 400,
         "known phases: context, execution, verification"),
        ({"model": "planner", "pad": "x" * (2 << 20)}, {}, 413, "exceeds the limit"),
    ]
    for body, headers, code, text in cases:
        got, _, raw = await post(url, body, headers)
        data = json.loads(raw)
        message = data["error"] if dialect.startswith("/api") else data["error"]["message"]
        assert got == code and text in message, (body, got, data)
    assert (await post(url, {**CHAT, "model": "planner", "messages": CHAT["messages"]}))[0] == 200


async def test_ollama_preload_request_loads_a_llamacpp_model(wp: WarmpoolProcess) -> None:
    code, _, raw = await post(wp.url + "/api/generate", {"model": "verifier"})
    assert code == 200 and json.loads(raw)["done_reason"] == "load"
    assert (await status(wp.url))["pools"][0]["resident"] == ["verifier"]


async def test_listings_cover_every_configured_model(wp: WarmpoolProcess) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(wp.url + "/api/tags") as r:
            tags = [m["name"] for m in (await r.json())["models"]]
        async with s.get(wp.url + "/v1/models") as r:
            ids = [m["id"] for m in (await r.json())["data"]]
        async with s.get(wp.url + "/api/ps") as r:
            ps = [m["name"] for m in (await r.json())["models"]]
    assert sorted(tags) == ["coder:latest", "planner:latest", "verifier:latest"]
    assert sorted(ids) == ["coder", "planner", "verifier"]
    assert len(ps) == 1


async def test_official_clients(wp: WarmpoolProcess) -> None:
    import ollama
    import openai

    oc = ollama.AsyncClient(host=wp.url)
    reply = await oc.chat(model="planner", messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 4})
    assert reply.done and reply.message.role == "assistant"
    parts = [p async for p in await oc.generate(model="planner", prompt="Hi", stream=True, options={"num_predict": 4})]
    assert parts[-1].done
    assert {m.model for m in (await oc.list()).models} == {"planner:latest", "coder:latest", "verifier:latest"}
    assert (await oc.ps()).models
    ai = openai.AsyncOpenAI(base_url=wp.url + "/v1", api_key="unused")
    done = await ai.chat.completions.create(model="planner", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert done.choices[0].message.role == "assistant"
    stream = await ai.chat.completions.create(model="planner", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=4, stream=True)
    assert [c async for c in stream]
    assert {m.id for m in (await ai.models.list()).data} == {"planner", "coder", "verifier"}


async def stream_chat(url: str, phase: str) -> tuple[str, list[dict[str, Any]]]:
    """One streamed chat; returns the model that served it and the parsed SSE events before [DONE]."""
    body = {**CHAT, "stream": True, "max_tokens": 6}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
        async with s.post(url + "/v1/chat/completions", json=body, headers={"X-Warmpool-Phase": phase}) as r:
            assert r.status == 200, await r.text()
            raw = [line[6:].strip() async for line in r.content if line.startswith(b"data: ")]
            model = r.headers["X-Warmpool-Model"]
    assert raw[-1] == b"[DONE]", f"stream cut before [DONE]: {raw[-1]!r}"
    return model, [json.loads(e) for e in raw[:-1]]


async def test_sixteen_agents_three_phases_one_slot(wp: WarmpoolProcess) -> None:
    phases = {"context": "planner", "execution": "coder", "verification": "verifier"}
    before = len((await status(wp.url))["pools"][0]["swaps"])

    async def agent(i: int) -> list[str]:
        order = list(phases)[i % 3:] + list(phases)[: i % 3]
        served = []
        for phase in order:
            model, events = await stream_chat(wp.url, phase)
            assert model == phases[phase]
            finishes = [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")]
            assert finishes and finishes[-1] in ("stop", "length"), "no finish_reason: stream cut"
            served.append(model)
        return served

    results = await asyncio.wait_for(asyncio.gather(*(agent(i) for i in range(16))), timeout=400)
    assert all(len(r) == 3 for r in results)
    pool = (await status(wp.url))["pools"][0]
    swaps = len(pool["swaps"]) - before
    # 48 requests over 3 models: naive FIFO alternation would swap up to 47 times; batching must do far
    # better. Each agent's three phases force at least 2 swaps overall.
    assert 2 <= swaps <= 24, pool["swaps"]
    assert all(s["ok"] for s in pool["swaps"]) and pool["queue"] == {}
    assert len(llama_servers(wp.proc.pid)) == 1


def test_no_child_left_after_shutdown(tmp_path: Any, gguf_path: str) -> None:
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump({
        "listen": "127.0.0.1:0", "backends": {"local": {"kind": "llamacpp"}},
        "models": llama_models(gguf_path, "planner"), "preload": ["planner"],
    }))
    proc = WarmpoolProcess(path)
    try:
        proc.wait_ready()
        assert wait_until(lambda: len(llama_servers(proc.proc.pid)) == 1, timeout=120)
        children = psutil.Process(proc.proc.pid).children(recursive=True)
    finally:
        assert proc.stop() == 0
    assert wait_until(lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children), 20)
