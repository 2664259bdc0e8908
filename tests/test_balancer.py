"""What a load balancer is told about one host: the weight from its load window (pure), the agent-check
answers on a real TCP port, `GET /warmpool/residency`, and the drain on SIGTERM (agent says drain and
/readyz says 503 before the listener closes, while requests are still served). Real warmpool on loopback in
front of the Ollama emulator; HAProxy itself reading these answers is tested in test_multihost.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import eventually
from tests.ollama_emulator import EmulatedModel, OllamaEmulator
from warmpool.admin.balancer import HostLoad, LoadWindow, Sample, agent_line, weight_percent
from warmpool.app import serve
from warmpool.config import config_from_mapping

# -- the weight (pure) --------------------------------------------------------------------------------


@pytest.mark.parametrize(("swap_share", "queue_mean", "weight"), [
    (0.0, 0.0, 100),  # idle
    (0.1, 0.5, 100),  # one swap now and then, a short queue: full weight, so the hash ring stays put
    (0.3, 0.0, 75),
    (0.5, 0.0, 75),  # 62.5 rounds to 75 (steps of 25)
    (0.7, 0.0, 50),
    (1.0, 0.0, 25),  # swapping all the time: the floor, never 0 (that would be a drain)
    (0.0, 4.0, 75),  # half of saturation in the queue
    (0.0, 8.0, 25),
    (0.0, 80.0, 25),
    (0.2, 6.0, 50),  # the worse of the two counts
])
def test_weight_falls_in_steps_with_swap_share_and_queue(swap_share: float, queue_mean: float, weight: int) -> None:
    assert weight_percent(HostLoad(swap_share, queue_mean)) == weight


def test_load_window_keeps_only_the_last_samples() -> None:
    window = LoadWindow(size=4)
    assert window.load() == HostLoad(0.0, 0.0)
    window.add(Sample(True, 8))
    assert window.load() == HostLoad(0.25, 2.0)  # the window's time before the first sample was idle
    for sample in [Sample(True, 8)] * 3 + [Sample(False, 0)] * 2:
        window.add(sample)
    assert window.load() == HostLoad(0.5, 4.0)
    assert "swap_share=0.50" in repr(window)


def test_agent_lines_follow_haproxy_agent_check_words() -> None:
    assert agent_line(False, 75) == b"up ready 75%\n"  # "ready" undoes a drain the agent set earlier
    assert agent_line(True, 75) == b"drain\n"


# -- a real warmpool ----------------------------------------------------------------------------------

MODELS = {"planner": "qwen2.5:7b", "coder": "llama3.2"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def agent_says(port: int) -> bytes:
    """One agent check as HAProxy makes it: connect, (send its agent-send string), read a line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"be_warmpool/gpu1\n")
        return await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()


class Host:
    """warmpool (in this loop) in front of an emulator, stopped by `stop()` as SIGTERM would."""

    def __init__(self, emu: OllamaEmulator, url: str, agent_port: int, stop: asyncio.Event,
                 task: asyncio.Task[None], http: aiohttp.ClientSession) -> None:
        self.emu, self.url, self.agent_port, self._stop, self.task, self.http = emu, url, agent_port, stop, task, http

    async def residency(self, **headers: str) -> tuple[int, Any]:
        async with self.http.get(self.url + "/warmpool/residency", headers=headers) as r:
            return r.status, await r.json()

    async def model(self, name: str) -> dict[str, Any]:
        status, body = await self.residency()
        assert status == 200, body
        return dict(body["models"][name])

    async def chat(self, model: str, **body: Any) -> tuple[int, bytes]:
        payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False, **body}
        async with self.http.post(self.url + "/api/chat", json=payload) as r:
            return r.status, await r.read()

    def stop(self) -> None:
        self._stop.set()


@contextlib.asynccontextmanager
async def host(**top: Any) -> AsyncIterator[Host]:
    emu = OllamaEmulator([EmulatedModel(MODELS["planner"], size=1_000_000_000),
                          EmulatedModel(MODELS["coder"], size=1_000_000_000)],
                         load_seconds_per_gb=0.5, token_delay=0.05)
    await emu.start()
    agent_port = free_port()
    raw = {"listen": "127.0.0.1:0", "backends": {"ollama": {"kind": "ollama", "url": emu.url, "max_resident": 1}},
           "models": {name: {"backend": "ollama", "upstream_name": up} for name, up in MODELS.items()},
           "ram_tier": {"enabled": False}, "balancer": {"agent_port": agent_port, **top.pop("balancer", {})},
           **top}
    cfg = config_from_mapping(raw, env={}, source="<test>")
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(cfg, shutdown_trigger=stop.wait, on_ready=ready.set_result))
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    try:
        async with aiohttp.ClientSession() as http:
            yield Host(emu, ready.result(), agent_port, stop, task, http)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await emu.stop()


async def test_residency_lists_each_model_state_and_load_through_a_swap() -> None:
    async with host() as h:
        status, body = await h.residency()
        assert status == 200
        assert body["draining"] is False and body["weight"] == 100 and body["agent"] == "up ready 100%"
        assert body["models"]["planner"] == {"pool": "ollama", "state": "cold", "inflight": 0, "queued": 0,
                                             "load": 0}
        # A long answer from the planner, then a coder request that must wait for it and then swap.
        planner = asyncio.create_task(h.chat("planner", options={"num_predict": 40}))
        await eventually(lambda: _state(h, "planner", "inflight", 1))
        assert (await h.model("planner"))["state"] == "resident"
        coder = asyncio.create_task(h.chat("coder"))
        await eventually(lambda: _state(h, "coder", "queued", 1))
        assert (await h.model("coder"))["load"] == 1
        assert (await h.residency())[1]["load"]["queued"] == 1
        await eventually(lambda: _state(h, "coder", "state", "loading"))
        assert (await h.residency())[1]["load"]["swapping"] is True
        assert [(await planner)[0], (await coder)[0]] == [200, 200]
        after = (await h.residency())[1]["models"]
        assert (after["coder"]["state"], after["planner"]["state"]) == ("resident", "cold")


async def _state(h: Host, model: str, key: str, value: Any) -> bool:
    return (await h.model(model))[key] == value


async def test_residency_needs_the_admin_key_when_one_is_set() -> None:
    async with host(auth={"admin_keys": ["sekrit"]}) as h:
        assert (await h.residency())[0] == 401
        status, body = await h.residency(Authorization="Bearer sekrit")
        assert status == 200 and set(body["models"]) == set(MODELS)


async def test_agent_answers_up_ready_with_the_weight_on_its_own_port() -> None:
    async with host() as h:
        assert await agent_says(h.agent_port) == b"up ready 100%\n"
        # Many checks at once (several balancers, several backends): each gets its line.
        lines = await asyncio.gather(*(agent_says(h.agent_port) for _ in range(20)))
        assert set(lines) == {b"up ready 100%\n"}


async def test_sigterm_says_drain_at_once_and_serves_until_the_listener_closes() -> None:
    async with host(balancer={"drain_delay": "1.5s"}) as h:
        assert (await h.chat("planner"))[0] == 200
        h.stop()  # what SIGTERM does (the serve() trigger returns)
        await eventually(lambda: _agent_is(h, b"drain\n"), timeout=5)
        async with h.http.get(h.url + "/readyz") as r:
            assert (r.status, await r.json()) == (503, {"status": "draining"})
        # Still within the drain delay: a request that reaches this host now is served, not refused.
        assert (await h.chat("planner"))[0] == 200
        assert (await h.residency())[1]["draining"] is True
        await asyncio.wait_for(h.task, 30)
        with pytest.raises(aiohttp.ClientConnectionError):
            await h.chat("planner")


async def _agent_is(h: Host, line: bytes) -> bool:
    return await agent_says(h.agent_port) == line


async def test_agent_is_off_by_default_and_readyz_is_unchanged() -> None:
    cfg = config_from_mapping({"backends": {"o": {"kind": "ollama", "url": "http://127.0.0.1:9"}},
                               "models": {"m": {"backend": "o"}}}, env={})
    assert cfg.balancer.agent_port is None and cfg.balancer.agent_host == "127.0.0.1"
    assert cfg.balancer.drain_seconds == 0.0
