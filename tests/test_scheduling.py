"""Scheduler behaviours over time, end to end: preload with retries, keep_alive, idle default, VRAM budget,
pins. warmpool in-process in front of the Ollama emulator on loopback."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import eventually, running_warmpool
from tests.ollama_emulator import EmulatedModel, OllamaEmulator

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def emu() -> AsyncIterator[OllamaEmulator]:
    emulator = OllamaEmulator([EmulatedModel("a", size=200_000_000), EmulatedModel("b", size=200_000_000),
                               EmulatedModel("big", size=400_000_000)], load_seconds_per_gb=0.25)
    await emulator.start()
    yield emulator
    await emulator.stop()


def config(url: str, backend: dict[str, Any] | None = None, **models: dict[str, Any]) -> dict[str, Any]:
    return {"backends": {"ol": {"kind": "ollama", "url": url, **(backend or {})}},
            "models": {name: {"backend": "ol", **m} for name, m in models.items()}}


async def status(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(url + "/warmpool/status") as r:
        return (await r.json())["pools"][0]


async def generate(url: str, model: str) -> int:
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/api/generate", json={"model": model, "prompt": "x", "stream": False}) as r:
            await r.read()
            return r.status



def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_preload_loads_what_fits_in_order(emu: OllamaEmulator) -> None:
    cfg = {**config(emu.url, {"max_resident": 2}, a={}, b={}, big={}), "preload": ["b", "big", "a"]}
    async with running_warmpool(cfg) as url:
        async def both_resident() -> bool:
            return sorted((await status(url))["resident"]) == ["b", "big"]
        await eventually(both_resident)
        assert emu.count("load_done", "a") == 0


async def test_preload_retries_until_the_backend_comes_up() -> None:
    port = free_port()
    cfg = {**config(f"http://127.0.0.1:{port}", a={}), "preload": ["a"]}
    async with running_warmpool(cfg) as url:
        await asyncio.sleep(1.5)  # at least one failed attempt
        late = OllamaEmulator([EmulatedModel("a", size=100_000_000)], load_seconds_per_gb=0.1)
        await late.start(port=port)
        try:
            await eventually(lambda: late.count("load_done", "a") == 1, timeout=30)
            await eventually(lambda: status(url), timeout=5)
            assert (await status(url))["resident"] == ["a"]
        finally:
            await late.stop()


async def test_keep_alive_unloads_an_idle_model(emu: OllamaEmulator) -> None:
    async with running_warmpool(config(emu.url, a={"keep_alive": "1s"})) as url:
        assert await generate(url, "a") == 200
        assert (await status(url))["resident"] == ["a"]
        await eventually(lambda: emu.count("unload", "a") == 1)
        assert (await status(url))["resident"] == []
        assert (await status(url))["swaps"][0]["reason"] == "keep_alive"


async def test_idle_pool_returns_to_its_default_model(emu: OllamaEmulator) -> None:
    backend = {"idle_default": "a", "idle_after": "1s"}
    async with running_warmpool(config(emu.url, backend, a={}, b={})) as url:
        assert await generate(url, "b") == 200
        await eventually(lambda: "a:latest" in emu.loaded() and "b:latest" not in emu.loaded())

        async def settled() -> bool:
            return (await status(url))["resident"] == ["a"]
        await eventually(settled)
        pool = await status(url)
        assert pool["resident"] == ["a"] and pool["swaps"][0]["reason"] == "idle_default"


async def test_vram_budget_uses_sizes_and_evicts_lru(emu: OllamaEmulator) -> None:
    backend = {"max_resident": 10, "vram_budget": "500MB"}
    async with running_warmpool(config(emu.url, backend, a={}, b={}, big={})) as url:
        assert await generate(url, "a") == 200
        assert await generate(url, "b") == 200
        assert sorted((await status(url))["resident"]) == ["a", "b"]  # 2 x 200 MB fit in 500 MB
        assert await generate(url, "big") == 200  # 400 MB: a (least recently used) and b must go
        pool = await status(url)
        assert pool["resident"] == ["big"]
        assert pool["swaps"][0]["evicted"] == ["a", "b"]
        assert pool["models"]["a"]["size"] == 200_000_000  # learned from /api/ps after the load


async def test_pinned_model_stays_and_others_rotate(emu: OllamaEmulator) -> None:
    async with running_warmpool(config(emu.url, {"max_resident": 2}, a={"pin": True}, b={}, big={})) as url:
        for model in ("a", "b", "big", "b"):
            assert await generate(url, model) == 200
        pool = await status(url)
        assert sorted(pool["resident"]) == ["a", "b"]
        assert all("a" not in s["evicted"] for s in pool["swaps"])


async def test_pool_full_of_pins_answers_503_naming_the_reason(emu: OllamaEmulator) -> None:
    async with running_warmpool(config(emu.url, {"max_resident": 1}, a={"pin": True}, b={})) as url:
        assert await generate(url, "a") == 200
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/api/generate", json={"model": "b", "prompt": "x"}) as r:
                assert r.status == 503 and "pinned" in (await r.json())["error"]
