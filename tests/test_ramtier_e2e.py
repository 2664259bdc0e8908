"""The RAM tier in the swap path, with real llama.cpp servers: the swap histogram's `source` is `ram`
after warming and `disk` after evicting; the admin API and CLI show and act on page-cache residency."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import REPO, running_warmpool
from warmpool.ramtier import pagecache

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def private_gguf(tmp_path: Path, gguf_path: str) -> str:
    """A copy of the demo model that no other process maps, so its page-cache state is ours to set."""
    copy = tmp_path / "private.gguf"
    shutil.copyfile(gguf_path, copy)
    return str(copy)


def config(private: str, shared: str) -> dict[str, Any]:
    model = {"backend": "local", "n_ctx": 512, "chat_format": "gemma"}
    return {
        "backends": {"local": {"kind": "llamacpp", "max_resident": 1}},
        "models": {"cold": {**model, "gguf": private}, "other": {**model, "gguf": shared}},
        "phases": {"a": "cold", "b": "other"},
        "ram_tier": {"interval": "60s", "top_n": 0},  # no background re-warming during the test
    }


async def call(method: str, url: str, body: Any = None) -> Any:
    async with aiohttp.ClientSession() as s, s.request(method, url, json=body) as r:
        assert r.status < 300, await r.text()
        return await r.json()


async def chat(url: str, model: str) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    await call("POST", url + "/v1/chat/completions", body)


async def last_swap(url: str, model: str) -> dict[str, Any]:
    swaps = (await call("GET", url + "/warmpool/status"))["pools"][0]["swaps"]
    return next(s for s in swaps if s["model"] == model)


async def test_swap_source_is_ram_after_warming_and_disk_after_evicting(private_gguf: str, gguf_path: str) -> None:
    pagecache.drop(private_gguf)  # the copy left it in the page cache: start cold, so warmpool warms it
    async with running_warmpool(config(private_gguf, gguf_path)) as url:
        warmed = await call("POST", url + "/warmpool/models/cold/warm")
        assert warmed["percent_in_ram"] >= 90.0  # warmed now, or already by the tier at start (a phase model)
        await chat(url, "cold")
        assert (await last_swap(url, "cold"))["source"] == "ram"

        await chat(url, "other")  # swaps cold out: its files are now droppable
        dropped = await call("POST", url + "/warmpool/models/cold/evict")
        assert dropped["bytes_dropped"] > 0 and dropped["percent_in_ram"] < 10.0
        assert pagecache.residency(private_gguf).fraction < 0.1
        await chat(url, "cold")
        assert (await last_swap(url, "cold"))["source"] == "disk"

        async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
            text = await r.text()
    assert 'warmpool_swap_duration_seconds_count{model="cold",pool="local",source="ram"} 1.0' in text
    assert 'warmpool_swap_duration_seconds_count{model="cold",pool="local",source="disk"} 1.0' in text
    assert 'warmpool_ramtier_hits_total{model="cold"} 1.0' in text
    assert 'warmpool_ramtier_misses_total{model="cold"} 1.0' in text
    assert 'warmpool_pagecache_resident_bytes{model="cold"}' in text


async def test_a_loaded_models_files_are_never_evicted(private_gguf: str, gguf_path: str) -> None:
    pagecache.drop(private_gguf)
    async with running_warmpool(config(private_gguf, gguf_path)) as url:
        await call("POST", url + "/warmpool/models/cold/warm")
        await chat(url, "cold")
        dropped = await call("POST", url + "/warmpool/models/cold/evict")
        assert dropped["bytes_dropped"] == 0 and pagecache.residency(private_gguf).fraction > 0.9


async def test_models_view_and_cli(private_gguf: str, gguf_path: str) -> None:
    async with running_warmpool(config(private_gguf, gguf_path)) as url:
        await asyncio.to_thread(pagecache.drop, private_gguf)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "warmpool", "warm", "cold", "--url", url, cwd=REPO,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode == 0, err
        assert out.decode().startswith("cold: warmed") and "in RAM" in out.decode()
        models = {m["name"]: m for m in (await call("GET", url + "/warmpool/models"))["models"]}
        cold = models["cold"]
        assert cold["percent_in_ram"] >= 90.0 and cold["files"][0]["path"] == str(Path(private_gguf).resolve())
        assert cold["size"] == Path(private_gguf).stat().st_size and cold["resident"] is False
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "warmpool", "models", "--url", url, cwd=REPO, stdout=asyncio.subprocess.PIPE)
        table = (await proc.communicate())[0].decode()
        assert table.splitlines()[0].split()[:4] == ["MODEL", "BACKEND", "STATUS", "TIER"]
        assert any(line.split()[:4] == ["cold", "local", "absent", "warm"] for line in table.splitlines())


async def test_missing_weights_are_served_without_a_ram_tier_and_say_why(gguf_path: str) -> None:
    cfg = {"backends": {"o": {"kind": "ollama", "url": "http://127.0.0.1:9"}}, "models": {"ghost": {"backend": "o"}}}
    async with running_warmpool(cfg) as url:
        ghost = (await call("GET", url + "/warmpool/models"))["models"][0]
        assert ghost["files"] == [] and "no manifest" in ghost["reason"]
        async with aiohttp.ClientSession() as s, s.post(url + "/warmpool/models/ghost/warm") as r:
            assert r.status == 409 and "no RAM tier" in json.loads(await r.text())["error"]
