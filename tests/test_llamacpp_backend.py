"""The managed llama.cpp backend under warmpool, with real slot workers and the demo model: swaps stay in
one process, a killed worker is noticed, restarted and its model reloaded on the next request, and the
first request after a load ends the swap's timing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import eventually, llama_models, running_warmpool
from warmpool.backends.llamacpp import LlamaCppBackend
from warmpool.config import config_from_mapping
from warmpool.scheduling.pool import Pool

pytestmark = pytest.mark.timeout(300)


def raw_config(gguf: str, **backend: Any) -> dict[str, Any]:
    return {
        "backends": {"local": {"kind": "llamacpp", "max_resident": 1, "start_timeout": 60, **backend}},
        "models": llama_models(gguf, "planner", "coder", n_ctx=512),
        "phases": {"context": "planner", "execution": "coder"},
    }


async def status(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url + "/warmpool/status") as response:
        return dict(await response.json())


def slots(state: dict[str, Any]) -> list[dict[str, Any]]:
    [local] = [b for b in state["backends"] if b["name"] == "local"]
    return list(local["slots"])


async def chat(session: aiohttp.ClientSession, url: str, model: str, content: str = "Say hello.",
               max_tokens: int = 4) -> tuple[int, str]:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0}
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        return response.status, await response.text()


async def stream_events(session: aiohttp.ClientSession, url: str, model: str, events: list[dict[str, Any]],
                        max_tokens: int) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "Count from 1 to 100."}], "stream": True,
            "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0}
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        assert response.status == 200
        async for line in response.content:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                events.append(json.loads(line[6:]))


@pytest.fixture
async def warmpool(gguf_path: str) -> AsyncIterator[str]:
    async with running_warmpool(raw_config(gguf_path)) as url:
        yield url


async def test_swaps_reuse_one_worker_process(warmpool: str) -> None:
    async with aiohttp.ClientSession() as session:
        assert (await chat(session, warmpool, "planner"))[0] == 200
        [before] = slots(await status(session, warmpool))
        assert before["model"] == "planner" and before["ready"]
        for model in ("coder", "planner", "coder"):
            code, text = await chat(session, warmpool, model)
            assert code == 200, text
            [now] = slots(await status(session, warmpool))
            assert now["model"] == model
            assert (now["pid"], now["url"]) == (before["pid"], before["url"]), "a swap started a process"
        state = await status(session, warmpool)
    swaps = state["pools"][0]["swaps"]
    assert [s["model"] for s in swaps] == ["coder", "planner", "coder", "planner"]
    assert all(s["ok"] for s in swaps)


async def test_a_worker_killed_while_idle_is_restarted_and_its_model_reloaded(warmpool: str) -> None:
    async with aiohttp.ClientSession() as session:
        assert (await chat(session, warmpool, "planner"))[0] == 200
        [before] = slots(await status(session, warmpool))
        os.kill(before["pid"], signal.SIGKILL)

        async def gone() -> bool:
            return (await status(session, warmpool))["pools"][0]["resident"] == []

        await eventually(gone, timeout=10)  # noticed at once, not at the next request
        code, text = await chat(session, warmpool, "planner")
        assert code == 200, text
        [after] = slots(await status(session, warmpool))
        assert after["model"] == "planner" and after["pid"] != before["pid"]
        async with session.get(warmpool + "/metrics") as response:
            assert 'warmpool_models_lost_total{model="planner",pool="local"} 1.0' in await response.text()


async def test_a_worker_killed_mid_stream_ends_the_stream_with_an_error(warmpool: str) -> None:
    events: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as session:
        assert (await chat(session, warmpool, "planner"))[0] == 200
        [before] = slots(await status(session, warmpool))
        stream = asyncio.create_task(stream_events(session, warmpool, "planner", events, max_tokens=200))
        await eventually(lambda: len(events) >= 3, timeout=60)
        os.kill(before["pid"], signal.SIGKILL)
        await asyncio.wait_for(stream, 30)
        assert "error" in events[-1], "the stream was cut without telling the client"
        assert not any(c.get("finish_reason") for e in events[:-1] for c in e["choices"])

        async def gone() -> bool:
            return (await status(session, warmpool))["pools"][0]["resident"] == []

        # The broken connection can reach the client a moment before the worker's exit reaches warmpool;
        # a request sent in that moment would still be routed to the dead worker (502).
        await eventually(gone, timeout=10)
        code, text = await chat(session, warmpool, "planner")
        assert code == 200, text
        [after] = slots(await status(session, warmpool))
        assert after["pid"] != before["pid"] and after["model"] == "planner"


async def test_the_first_request_after_a_load_ends_the_swap(gguf_path: str) -> None:
    """The load returns before the weights are read; the swap's record runs until the first answer."""
    cfg = config_from_mapping(raw_config(gguf_path), env={}, source="<test>")
    backend = LlamaCppBackend(cfg.backends["local"], cfg)
    pool = Pool(backend, cfg)
    await backend.start()
    try:
        lease = pool.lease("planner")
        assert not lease.try_now()
        await lease.wait()
        [record] = pool.history
        load_only = record.seconds
        assert pool.steps.open, "the swap was closed before its first request was answered"
        await asyncio.sleep(0.2)
        upstream = await backend.forward(cfg.models["planner"], "POST", "/v1/completions", [],
                                         b'{"prompt": "Hi", "max_tokens": 1}')
        assert await upstream.readany()
        upstream.close()
        lease.release()
        assert not pool.steps.open and record.seconds >= load_only + 0.2
    finally:
        await pool.close()
        await backend.close()


async def test_workers_are_started_with_the_backend_and_stopped_with_it(gguf_path: str) -> None:
    cfg = config_from_mapping(raw_config(gguf_path, max_resident=2), env={}, source="<test>")
    backend = LlamaCppBackend(cfg.backends["local"], cfg)
    await backend.start()
    pids = [slot.pid for slot in backend.slots]
    assert len(pids) == 2 and all(pids)
    deadline = time.monotonic() + 60
    for slot in backend.slots:
        await slot.wait_ready(deadline)  # imported before any request asked for a model
    await backend.close()
    assert all(not slot.alive for slot in backend.slots)
