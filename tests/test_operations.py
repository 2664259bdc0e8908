"""Operating warmpool: auth, the admin API and CLI, health and readiness, metrics, drift and keep-alive
refresh, graceful shutdown. warmpool runs in-process in front of the Ollama emulator, on loopback."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import REPO, running_warmpool
from tests.ollama_emulator import DEFAULT_TOKENS, EmulatedModel, OllamaEmulator
from warmpool.backends.ollama import DEFAULT_LEASE

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def emu() -> AsyncIterator[OllamaEmulator]:
    emulator = OllamaEmulator([EmulatedModel("alpha", size=200_000_000), EmulatedModel("beta", size=200_000_000)],
                              load_seconds_per_gb=0.5, token_delay=0.01)
    await emulator.start()
    yield emulator
    await emulator.stop()


def ollama_config(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "backends": {"ol": {"kind": "ollama", "url": url, "max_resident": 1}},
        "models": {"alpha": {"backend": "ol"}, "beta": {"backend": "ol"}},
        "phases": {"plan": "alpha", "code": "beta"},
        **extra,
    }


async def request(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
                  ) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession() as s, s.request(method, url, json=body, headers=headers or {}) as r:
        raw = await r.read()
        try:
            data = json.loads(raw)
        except ValueError:
            data = raw.decode()
        return r.status, dict(r.headers), data


GEN = {"model": "alpha", "prompt": "hi", "stream": False}


async def test_api_keys_guard_proxied_requests_in_each_dialect(emu: OllamaEmulator) -> None:
    cfg = ollama_config(emu.url, auth={"api_keys": ["k1"]})
    async with running_warmpool(cfg) as url:
        code, _, data = await request("POST", url + "/api/generate", GEN)
        assert code == 401 and data == {"error": "missing or invalid API key"}
        code, _, data = await request("POST", url + "/v1/chat/completions", {"model": "alpha", "messages": []})
        assert code == 401 and data["error"]["type"] == "authentication_error"
        code, _, _ = await request("POST", url + "/api/generate", GEN, {"Authorization": "Bearer k1"})
        assert code == 200
        code, _, _ = await request("GET", url + "/api/tags", headers={"x-api-key": "k1"})
        assert code == 200
        assert (await request("GET", url + "/healthz"))[0] == 200  # liveness needs no key


async def test_admin_keys_guard_the_admin_api(emu: OllamaEmulator) -> None:
    async with running_warmpool(ollama_config(emu.url, auth={"admin_keys": ["adm"]})) as url:
        assert (await request("GET", url + "/warmpool/status"))[0] == 401
        assert (await request("POST", url + "/warmpool/models/alpha/load"))[0] == 401
        code, _, data = await request("GET", url + "/warmpool/status", headers={"Authorization": "Bearer adm"})
        assert code == 200 and data["pools"][0]["pool"] == "ol"


async def test_admin_load_and_unload_act_on_the_backend(emu: OllamaEmulator) -> None:
    async with running_warmpool(ollama_config(emu.url)) as url:
        code, _, data = await request("POST", url + "/warmpool/models/alpha/load")
        assert code == 200 and data["status"] == "resident"
        assert "alpha:latest" in emu.loaded()
        code, _, data = await request("POST", url + "/warmpool/models/alpha/unload")
        assert code == 200 and data["was_loaded"] is True
        assert "alpha:latest" not in emu.loaded()
        code, _, data = await request("POST", url + "/warmpool/models/alpha/unload")
        assert data["was_loaded"] is False
        assert (await request("POST", url + "/warmpool/models/nope/load"))[0] == 404


async def test_unload_waits_for_the_running_stream(emu: OllamaEmulator) -> None:
    async with running_warmpool(ollama_config(emu.url)) as url, aiohttp.ClientSession() as s:
        body = {"model": "alpha", "prompt": "hi", "options": {"num_predict": 30}}
        async with s.post(url + "/api/generate", json=body) as r:
            first = await r.content.readline()
            unload = asyncio.create_task(request("POST", url + "/warmpool/models/alpha/unload"))
            lines = [first] + [line async for line in r.content]
        assert json.loads(lines[-1])["done"] is True and len(lines) == DEFAULT_TOKENS + 1
        assert (await unload)[2]["was_loaded"] is True
        unloads = [e["t"] for e in emu.events if e["event"] == "unload"]
        requests_done = [e["t"] for e in emu.events if e["event"] == "request"]
        assert unloads and unloads[0] > requests_done[0]


async def cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "warmpool", *args, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_cli_status_load_unload(emu: OllamaEmulator) -> None:
    async with running_warmpool(ollama_config(emu.url)) as url:
        code, out, _ = await cli("load", "beta", "--url", url)
        assert code == 0 and out.startswith("beta: resident")
        code, out, _ = await cli("status", "--url", url)
        assert code == 0 and "pool ol (ollama, max_resident 1)" in out
        assert any(line.split()[:2] == ["beta", "resident"] for line in out.splitlines())
        code, out, _ = await cli("status", "--url", url, "--json")
        assert json.loads(out)["pools"][0]["resident"] == ["beta"]
        code, out, _ = await cli("unload", "beta", "--url", url)
        assert code == 0 and out.strip() == "beta: unloaded"
        code, _, err = await cli("load", "nope", "--url", url)
        assert code == 1 and err.strip() == "warmpool: model 'nope' not found"
    code, _, err = await cli("status", "--url", "http://127.0.0.1:9")
    assert code == 1 and "cannot reach warmpool" in err


async def test_check_config_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("backends: {o: {kind: ollama, url: 'http://127.0.0.1:1', api_key: x}}\n"
                    "models: {m: {backend: o}}\n".replace("ollama", "openai"))
    code, out, _ = await cli("check-config", str(good))
    assert code == 0 and "api_key: '***'" in out and "valid" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("backends: {o: {kind: ollama, url: 'http://x', max_resident: two}}\nmodels: {m: {backend: p}}\n")
    code, _, err = await cli("check-config", str(bad))
    assert code == 2 and "backends.o.max_resident" in err and "models.m.backend" in err


async def test_readyz_waits_for_a_backend_to_answer(emu: OllamaEmulator) -> None:
    down = ollama_config("http://127.0.0.1:9")
    async with running_warmpool(down) as url:
        code, _, data = await request("GET", url + "/readyz")
        assert code == 503 and data["backends_not_answered"] == ["ol"]
        assert (await request("GET", url + "/healthz"))[0] == 200
    async with running_warmpool(ollama_config(emu.url)) as url:
        for _ in range(100):
            if (await request("GET", url + "/readyz"))[0] == 200:
                break
            await asyncio.sleep(0.05)
        assert (await request("GET", url + "/readyz"))[0] == 200


async def test_metrics_record_requests_swaps_and_queue_wait(emu: OllamaEmulator) -> None:
    async with running_warmpool(ollama_config(emu.url)) as url:
        for phase in ("plan", "code"):
            assert (await request("POST", url + "/api/generate", {**GEN, "model": phase}))[0] == 200
        code, _, text = await request("GET", url + "/metrics")
    assert code == 200
    assert ('warmpool_requests_total{dialect="ollama",model="alpha",phase="plan",priority="interactive",'
            'status="200"} 1.0') in text
    assert 'warmpool_swaps_total{model="beta",pool="ol",reason="demand",result="ok"} 1.0' in text
    assert 'warmpool_evictions_total{model="alpha",pool="ol",reason="demand"} 1.0' in text
    assert 'warmpool_swap_duration_seconds_count{model="beta",pool="ol",source="unknown"} 1.0' in text
    assert 'warmpool_queue_wait_seconds_count{model="alpha",pool="ol",priority="interactive"} 1.0' in text


async def test_drift_an_outside_unload_is_noticed_and_reloaded(emu: OllamaEmulator) -> None:
    async with running_warmpool(ollama_config(emu.url)) as url:
        assert (await request("POST", url + "/api/generate", GEN))[0] == 200
        emu.expire("alpha")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            pool = (await request("GET", url + "/warmpool/status"))[2]["pools"][0]
            if pool["resident"] == []:
                break
            await asyncio.sleep(0.1)
        assert pool["resident"] == []
        assert (await request("POST", url + "/api/generate", GEN))[0] == 200
        assert emu.count("load_done", "alpha") == 2


async def test_drift_a_model_loaded_by_someone_else_is_counted_and_re_armed(emu: OllamaEmulator) -> None:
    async with running_warmpool(ollama_config(emu.url)) as url:
        # Another client loads beta with a short keep_alive; Ollama would drop it in 8 s.
        assert (await request("POST", emu.url + "/api/generate", {"model": "beta", "keep_alive": 8}))[0] == 200
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            pool = (await request("GET", url + "/warmpool/status"))[2]["pools"][0]
            if pool["resident"] == ["beta"] and emu.loaded()["beta:latest"]["keep_alive"] > 60:
                break
            await asyncio.sleep(0.1)
        assert pool["resident"] == ["beta"]
        assert emu.loaded()["beta:latest"]["keep_alive"] == DEFAULT_LEASE  # re-armed with warmpool's lease


async def test_shutdown_lets_a_running_stream_finish_and_refuses_new_work(emu: OllamaEmulator) -> None:
    cfg = ollama_config(emu.url)
    async with aiohttp.ClientSession() as s:
        async with running_warmpool(cfg) as url:
            body = {"model": "alpha", "prompt": "hi", "options": {"num_predict": 40}}
            response = await s.post(url + "/api/generate", json=body)
            first = await response.content.readline()
        # running_warmpool has returned: shutdown completed while the stream was running.
        lines = [first] + [line async for line in response.content]
        response.release()
    assert json.loads(lines[-1])["done"] is True and len(lines) == DEFAULT_TOKENS + 1
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as s2:
            await s2.get(url + "/healthz")


async def test_ollama_empty_requests_load_and_unload_through_the_scheduler(emu: OllamaEmulator) -> None:
    async with running_warmpool(ollama_config(emu.url)) as url:
        code, headers, data = await request("POST", url + "/api/generate", {"model": "code"})
        assert code == 200 and data["done_reason"] == "load" and headers["X-Warmpool-Model"] == "beta"
        assert "beta:latest" in emu.loaded()
        code, _, data = await request("POST", url + "/api/chat", {"model": "beta", "messages": [], "keep_alive": "0s"})
        assert code == 200 and data["done_reason"] == "unload"
        assert "beta:latest" not in emu.loaded()
        assert (await request("GET", url + "/warmpool/status"))[2]["pools"][0]["resident"] == []


async def test_state_gauges_are_read_at_scrape_time(emu: OllamaEmulator) -> None:
    async with running_warmpool(ollama_config(emu.url)) as url:
        assert (await request("POST", url + "/api/generate", GEN))[0] == 200
        _, _, text = await request("GET", url + "/metrics")
    assert 'warmpool_model_resident{model="alpha",pool="ol"} 1.0' in text
    assert 'warmpool_model_resident{model="beta",pool="ol"} 0.0' in text
    assert 'warmpool_queue_depth{model="alpha",pool="ol"} 0.0' in text
    assert 'warmpool_backend_up{backend="ol",kind="ollama"} 1.0' in text
    assert "warmpool_process_resident_memory_bytes" in text


@pytest.mark.parametrize("dialect", ["ollama", "openai"])
async def test_loading_feedback_tells_a_streaming_client_what_it_waits_for(dialect: str) -> None:
    import ollama
    import openai

    slow = OllamaEmulator([EmulatedModel("alpha", size=3_000_000_000)], load_seconds_per_gb=1.0)  # ~3 s load
    await slow.start()
    try:
        async with running_warmpool(ollama_config(slow.url, loading_feedback=True)) as url:
            if dialect == "ollama":
                client = ollama.AsyncClient(host=url)
                parts = [p async for p in await client.chat(model="alpha", messages=[{"role": "user", "content": "x"}],
                                                             stream=True)]
                assert parts[-1].done and "".join(p.message.content for p in parts).strip()
            else:
                ai = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x")
                stream = await ai.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x"}],
                                                          stream=True)
                chunks = [c async for c in stream]
                assert chunks[-1].choices[0].finish_reason == "stop"
            # the raw stream carries the feedback before the first token
            async with aiohttp.ClientSession() as s:
                await request("POST", url + "/warmpool/models/alpha/unload")
                path = "/api/chat" if dialect == "ollama" else "/v1/chat/completions"
                body = {"model": "alpha", "messages": [{"role": "user", "content": "x"}], "stream": True}
                async with s.post(url + path, json=body) as r:
                    first = await r.content.readline()
        status = json.loads(first)["warmpool"]["status"] if dialect == "ollama" else first.decode()
        assert "loading alpha" in status
    finally:
        await slow.stop()


async def test_loading_feedback_is_off_by_default_and_per_request(emu: OllamaEmulator) -> None:
    async with running_warmpool(ollama_config(emu.url)) as url, aiohttp.ClientSession() as s:
        body = {"model": "alpha", "prompt": "x"}
        async with s.post(url + "/api/generate", json=body) as r:
            lines = [json.loads(x) async for x in r.content]
        assert all("warmpool" not in x for x in lines)
        await request("POST", url + "/warmpool/models/alpha/unload")
        async with s.post(url + "/api/generate", json=body, headers={"X-Warmpool-Loading-Feedback": "1"}) as r:
            lines = [json.loads(x) async for x in r.content]
        assert lines[-1]["done"] is True
