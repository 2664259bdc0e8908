"""Getting the next model ready and priority classes, end to end: warmpool in-process in front of the Ollama
emulator on loopback. The emulator's event log (load_start, unload) says what it held at each instant, so
the pool's budget is checked as the backend saw it, not as warmpool believed it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import eventually, running_warmpool
from tests.ollama_emulator import EmulatedModel, OllamaEmulator
from warmpool.backends.base import NOT_FORWARDED_RAW
from warmpool.http.wire import forwardable

pytestmark = pytest.mark.timeout(120)
LOOP = ("ctx", "exe", "ver")  # an agent's phases, mapped to models a, b, c


@pytest.fixture
async def emu(request: pytest.FixtureRequest) -> AsyncIterator[OllamaEmulator]:
    # It may hold three models: a pool that overshot its budget of one or two would show in its log.
    # An answer is 12 tokens (the emulator's default length), token_delay seconds each.
    token_delay = getattr(request, "param", 0.01)
    emulator = OllamaEmulator([EmulatedModel(name, size=200_000_000) for name in "abc"],
                              load_seconds_per_gb=0.25, token_delay=token_delay, max_loaded=3)
    await emulator.start()
    yield emulator
    await emulator.stop()


def config(url: str, max_resident: int = 1, **scheduler: Any) -> dict[str, Any]:
    return {"backends": {"ol": {"kind": "ollama", "url": url, "max_resident": max_resident}},
            "models": {name: {"backend": "ol"} for name in "abc"},
            "phases": dict(zip(LOOP, "abc", strict=True)),
            "scheduler": {"queue_timeout": "60s", **scheduler}}


async def generate(url: str, phase: str, *, session: str | None = None, priority: str | None = None,
                   tokens: int = 5) -> tuple[int, Any]:
    headers = {"X-Warmpool-Phase": phase}
    if session is not None:
        headers["X-Warmpool-Session"] = session
    if priority is not None:
        headers["X-Warmpool-Priority"] = priority
    body = {"model": "ignored", "prompt": f"{phase} {session}", "stream": False,
            "options": {"num_predict": tokens}}
    async with aiohttp.ClientSession() as s, s.post(url + "/api/generate", json=body, headers=headers) as r:
        return r.status, await r.json()


async def status(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(url + "/warmpool/status") as r:
        data: dict[str, Any] = await r.json()
        return data


async def metrics(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        return await r.text()


async def unload(url: str, model: str) -> None:
    async with aiohttp.ClientSession() as s, s.post(f"{url}/warmpool/models/{model}/unload") as r:
        assert r.status == 200, await r.text()


def most_held_at_once(events: list[dict[str, Any]]) -> int:
    """The most models the emulator held at one instant: from a load's start to its unload."""
    held: set[str] = set()
    most = 0
    for event in sorted(events, key=lambda e: e["t"]):
        if event["event"] == "load_start":
            held.add(event["model"])
        elif event["event"] in ("unload", "load_aborted"):
            held.discard(event["model"])
        most = max(most, len(held))
    return most


def first(events: list[dict[str, Any]], kind: str, model: str, after: float = 0.0) -> float | None:
    times = [e["t"] for e in events if e["event"] == kind and e["model"] == f"{model}:latest" and e["t"] >= after]
    return min(times) if times else None


async def agent(url: str, session: str, rounds: int, think: float = 0.02) -> None:
    for _ in range(rounds):
        for phase in LOOP:
            assert (await generate(url, phase, session=session))[0] == 200
            await asyncio.sleep(think)


async def test_a_learned_next_model_is_loaded_into_a_free_slot_within_the_budget(emu: OllamaEmulator) -> None:
    async with running_warmpool(config(emu.url, max_resident=2, prefetch_threshold=0.6)) as url:
        await asyncio.gather(agent(url, "agent-1", 4), agent(url, "agent-2", 3, think=0.05))
        for model in "bc":  # room for one more beside `a`
            await unload(url, model)
        loads_of_b = emu.count("load_done", "b")
        assert (await generate(url, "ctx", session="agent-1"))[0] == 200  # ends on `a`: `b` is next

        async def b_loaded_ahead() -> bool:
            return "b" in (await status(url))["pools"][0]["resident"]
        await eventually(b_loaded_ahead)
        assert emu.count("load_done", "b") == loads_of_b + 1
        assert (await generate(url, "exe", session="agent-1"))[0] == 200  # finds it resident
        assert emu.count("load_done", "b") == loads_of_b + 1
        swaps = (await status(url))["pools"][0]["swaps"]
        prefetch = (await status(url))["prefetch"]
        text = await metrics(url)
    assert most_held_at_once(emu.events) == 2  # the budget, never more, as the emulator saw it
    assert any(s["reason"] == "prefetch" and s["model"] == "b" for s in swaps)
    assert prefetch["enabled"] and prefetch["predictions"] > 0 and prefetch["hits"] > 0
    assert 'warmpool_swaps_total{model="b",pool="ol",reason="prefetch",result="ok"}' in text
    assert 'warmpool_predictions_total{model="b"}' in text and 'warmpool_prediction_hits_total{model="b"}' in text


@pytest.mark.parametrize("emu", [0.08], indirect=True)  # an answer streams for about a second
async def test_the_next_model_loads_beside_one_still_streaming(emu: OllamaEmulator) -> None:
    async with running_warmpool(config(emu.url, max_resident=2)) as url:
        assert (await generate(url, "ctx"))[0] == 200
        assert (await generate(url, "ver"))[0] == 200  # `c` idle and used last; `a` is about to stream
        streaming = asyncio.create_task(generate(url, "ctx", tokens=12))
        await eventually(lambda: status_inflight(url, "a"))
        assert (await generate(url, "exe"))[0] == 200  # `c` makes room while `a` streams
        assert not streaming.done()
        assert (await streaming)[0] == 200
        ended = time.monotonic()
    assert (first(emu.events, "load_done", "b") or ended) < ended  # b was loaded before `a` was done
    assert emu.count("unload", "a") == 0 and emu.count("unload", "c") == 1
    assert most_held_at_once(emu.events) == 2


async def status_inflight(url: str, model: str) -> bool:
    return bool((await status(url))["pools"][0]["models"][model]["inflight"])


async def batch_worker(url: str, requests: int, done: list[float]) -> None:
    for _ in range(requests):
        assert (await generate(url, "ctx", priority="batch", tokens=15))[0] == 200
        done.append(time.monotonic())


async def test_an_interactive_request_is_served_before_queued_batch_work(emu: OllamaEmulator) -> None:
    # Two batch workers keep `a` busy back to back. Without classes, each of their requests finds `a`
    # resident and is served at once, so `b` would wait for all of them (or max_wait).
    async with running_warmpool(config(emu.url, max_wait="60s", interactive_max_wait="300ms")) as url:
        done: list[float] = []
        workers = [asyncio.create_task(batch_worker(url, 8, done)) for _ in range(2)]
        await eventually(lambda: len(done) >= 2)
        asked = time.monotonic()
        assert (await generate(url, "exe", priority="interactive"))[0] == 200
        answered = time.monotonic()
        await asyncio.gather(*workers)
        text = await metrics(url)
    b_loaded = first(emu.events, "load_start", "b", after=asked)
    assert b_loaded is not None and b_loaded < done[-1]  # it cut in while batch work remained ...
    assert sum(1 for t in done if asked < t < answered) <= 2  # ... after the two running batch requests
    assert first(emu.events, "load_start", "a", after=b_loaded) is not None  # then `a` came back for batch
    assert 'warmpool_queue_wait_seconds_count{model="b",pool="ol",priority="interactive"} 1.0' in text
    assert 'dialect="ollama",model="a",phase="ctx",priority="batch",status="200"} 16.0' in text


async def test_batch_never_swaps_away_from_a_model_an_interactive_agent_is_using(emu: OllamaEmulator) -> None:
    cfg = config(emu.url, max_wait="200ms", interactive_max_wait="1s")
    async with running_warmpool(cfg) as url:
        assert (await generate(url, "ctx", priority="interactive"))[0] == 200
        batch = asyncio.create_task(generate(url, "exe", priority="batch"))
        last_interactive = 0.0
        for _ in range(6):  # an interactive agent on `a`: short requests with short gaps between them
            await asyncio.sleep(0.1)
            assert (await generate(url, "ctx", priority="interactive"))[0] == 200
            last_interactive = time.monotonic()
        assert not batch.done()  # past its max_wait, yet `a` was in use all along
        assert (await batch)[0] == 200
    b_loaded = first(emu.events, "load_start", "b")
    assert b_loaded is not None and b_loaded > last_interactive


async def test_a_phase_default_class_and_a_bad_priority_header(emu: OllamaEmulator) -> None:
    async with running_warmpool(config(emu.url, priorities={"ver": "batch"})) as url:
        assert (await generate(url, "ver"))[0] == 200
        code, body = await generate(url, "ctx", priority="urgent")
        assert code == 400 and "X-Warmpool-Priority" in body["error"]
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/v1/chat/completions", headers={"X-Warmpool-Priority": "soon"},
                              json={"model": "a", "messages": [{"role": "user", "content": "x"}]}) as r:
                assert r.status == 400 and (await r.json())["error"]["message"].startswith("X-Warmpool-Priority")
        text = await metrics(url)
    assert 'model="c",phase="ver",priority="batch",status="200"} 1.0' in text


def test_warmpools_scheduling_headers_are_not_sent_upstream() -> None:
    raw = [(b"X-Warmpool-Session", b"agent-7"), (b"x-warmpool-priority", b"batch"), (b"Accept", b"*/*")]
    assert forwardable(raw, NOT_FORWARDED_RAW) == b"Accept: */*\r\n"
