"""Slot workers: real long-lived llama-cpp-python worker processes with the real gemma-3 270M model on
loopback, driven through `Slot` as the managed backend drives them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from warmpool.backends.llamacpp_process import child_env, llama_settings, worker_argv
from warmpool.backends.llamacpp_slot import Slot
from warmpool.config import BackendConfig, LlamaCppModel, ModelConfig
from warmpool.errors import BackendUnavailable

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[1]
ALIAS = "gemma-270m"

# A warmpool stand-in that starts a slot (and loads a model into it, or not), prints the worker's pid,
# and waits to be killed.
PARENT_SCRIPT = """
import asyncio, sys, time
from warmpool.backends.llamacpp_slot import Slot
from warmpool.config import BackendConfig, LlamaCppModel, ModelConfig

async def main(mode: str, gguf: str) -> None:
    backend = BackendConfig(name="managed", kind="llamacpp", start_timeout=60)
    slot = Slot(0, backend, lambda slot, event: None, lambda slot, reason: None)
    await slot.spawn()
    if mode == "loaded":
        await slot.wait_ready(time.monotonic() + 60)
        model = ModelConfig(name="gemma", backend="managed", upstream_name="g",
                            llamacpp=LlamaCppModel(gguf=gguf, n_ctx=512))
        await slot.load(model, None, time.monotonic() + 60)
    print(slot.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture
def model(gguf_path: str) -> ModelConfig:
    # The GGUF carries no chat template llama-cpp-python recognises; its llama-2 fallback answers nothing.
    return ModelConfig(name="gemma", backend="managed", upstream_name=ALIAS,
                       llamacpp=LlamaCppModel(gguf=gguf_path, n_ctx=512, chat_format="gemma"))


@pytest.fixture
def backend() -> BackendConfig:
    return BackendConfig(name="managed", kind="llamacpp", start_timeout=60, stop_grace=5)


class Exits:
    """What a slot reported about its worker's unexpected exits."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def __call__(self, slot: Slot, reason: str) -> None:
        self.reasons.append(reason)


def deadline() -> float:
    return time.monotonic() + 60


@pytest.fixture
async def slot(backend: BackendConfig) -> AsyncIterator[Slot]:
    started = Slot(0, backend, lambda slot, event: None, Exits())
    await started.spawn()
    await started.wait_ready(deadline())
    try:
        yield started
    finally:
        await started.stop()


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


async def eventually(condition: Any, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.05)
    return True


def chat_body(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": ALIAS, "messages": [{"role": "user", "content": content}], "temperature": 0, **extra}


async def stream_chat(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                      chunks: list[dict[str, Any]]) -> None:
    """POST a streaming chat and append each SSE data object to `chunks` as it arrives."""
    async with session.post(url + "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.status == 200
        async for raw in response.content:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: "):]))


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with session.post(url, json=body) as response:
        return response.status, await response.json()


def mapped_files(pid: int) -> set[str]:
    return {m.path for m in psutil.Process(pid).memory_maps(grouped=True)}


# ---------------------------------------------------------------- pure pieces


def test_settings_keep_warmpools_contract_and_pass_the_rest(model: ModelConfig) -> None:
    extra = {"interrupt_requests": True, "port": 1, "host": "0.0.0.0", "n_ctx": 4096, "seed": 7}
    assert model.llamacpp is not None
    llama = replace(model.llamacpp, server_args=extra, use_mmap=False, use_mlock=True, n_gpu_layers=-1)
    settings = llama_settings(replace(model, llamacpp=llama))
    assert settings["interrupt_requests"] is False and "host" not in settings and "port" not in settings
    assert (settings["n_ctx"], settings["seed"], settings["model_alias"]) == (4096, 7, ALIAS)
    assert (settings["use_mmap"], settings["use_mlock"], settings["n_gpu_layers"]) == (False, True, -1)
    assert settings["chat_format"] == "gemma"
    assert "n_threads" not in settings  # unset: llama-cpp-python picks


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


# ---------------------------------------------------------------- serving and swapping in one process


async def test_a_slot_swaps_models_in_one_process(slot: Slot, model: ModelConfig) -> None:
    pid, url = slot.pid, slot.url
    assert slot.imports is not None and slot.model is None
    timings = await slot.load(model, None, deadline())
    assert timings["model_load"] > 0 and slot.model == "gemma"
    other = replace(model, name="other", upstream_name="other")
    timings = await slot.load(other, None, deadline())  # frees the first, loads the second
    assert "free" in timings and slot.model == "other"
    assert (slot.pid, slot.url) == (pid, url), "a swap must not start a process"
    async with aiohttp.ClientSession() as session:
        status, answer = await post(session, url + "/v1/chat/completions",
                                    {**chat_body("Hi", max_tokens=8), "model": "other"})
    assert status == 200 and answer["choices"][0]["finish_reason"] in ("stop", "length")
    assert answer["choices"][0]["message"]["content"]  # the gemma template: a llama-2 fallback says nothing
    await slot.free(deadline())
    assert slot.model is None and slot.pid == pid
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}) as response:
            assert response.status == 503  # nothing loaded, and the worker says so


async def test_embeddings(slot: Slot, model: ModelConfig) -> None:
    await slot.load(replace(model, embedding=True), None, deadline())
    async with aiohttp.ClientSession() as session:
        status, answer = await post(session, slot.url + "/v1/embeddings", {"model": ALIAS, "input": "hello"})
    assert status == 200
    embedding = answer["data"][0]["embedding"]
    vectors = embedding if isinstance(embedding[0], list) else [embedding]  # unpooled: one per token
    assert all(len(vector) == 640 for vector in vectors)  # gemma-3 270M's n_embd


async def test_settings_reach_the_model(slot: Slot, model: ModelConfig) -> None:
    assert model.llamacpp is not None and slot.pid is not None and model.gguf is not None
    await slot.load(replace(model, llamacpp=replace(model.llamacpp, n_ctx=64, use_mmap=False)), None, deadline())
    assert model.gguf not in mapped_files(slot.pid)  # use_mmap false: read into memory, not mapped
    async with aiohttp.ClientSession() as session:
        status, answer = await post(session, slot.url + "/v1/completions", {"prompt": "word " * 100, "max_tokens": 1})
        assert status >= 400, answer  # does not fit in n_ctx 64 (llama-cpp-python 0.3.36 answers 500)
        await slot.load(model, None, deadline())
        assert model.gguf in mapped_files(slot.pid)  # the default: mapped
        status, _ = await post(session, slot.url + "/v1/completions", {"prompt": "word " * 100, "max_tokens": 1})
        assert status == 200


async def test_stream_survives_a_concurrent_request(slot: Slot, model: ModelConfig) -> None:
    """With llama-cpp-python's default interrupt_requests=True, the second request would end the first
    stream early with [DONE] and no finish_reason."""
    await slot.load(model, None, deadline())
    body = chat_body("Count from 1 to 100.", max_tokens=48, min_tokens=48)
    chunks: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as session:
        stream = asyncio.create_task(stream_chat(session, slot.url, body, chunks))
        assert await eventually(lambda: len(chunks) >= 2, 30)
        other = asyncio.create_task(post(session, slot.url + "/v1/chat/completions", chat_body("Hi", max_tokens=2)))
        await asyncio.sleep(0.3)  # the second request is now queued on the model lock
        during = len(chunks)
        await asyncio.wait_for(stream, 60)
        assert (await asyncio.wait_for(other, 60))[0] == 200
    assert len(chunks) > during, "the stream ended while the other request waited"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


# ---------------------------------------------------------------- failures and process hygiene


async def test_a_failed_load_reports_why_and_the_worker_stays_up(slot: Slot, model: ModelConfig,
                                                                  tmp_path: Path) -> None:
    assert model.llamacpp is not None
    missing = replace(model, llamacpp=replace(model.llamacpp, gguf=str(tmp_path / "missing.gguf")))
    with pytest.raises(BackendUnavailable) as caught:
        await slot.load(missing, None, deadline())
    message = str(caught.value)
    assert "'managed'" in message and "gemma: load failed" in message and "missing.gguf" in message
    assert slot.model is None and slot.ready
    await slot.load(model, None, deadline())
    assert slot.model == "gemma"


async def test_stop_leaves_no_process(backend: BackendConfig, model: ModelConfig) -> None:
    slot = Slot(0, backend, lambda slot, event: None, Exits())
    await slot.spawn()
    await slot.wait_ready(deadline())
    await slot.load(model, None, deadline())
    pid = slot.pid
    assert pid is not None and running(pid) and os.getpgid(pid) == pid
    await slot.stop()
    await slot.stop()  # idempotent
    assert not slot.alive and not running(pid) and group_members(pid) == []


async def test_an_unexpected_exit_is_reported_once(backend: BackendConfig, model: ModelConfig,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    exits = Exits()
    slot = Slot(0, backend, lambda slot, event: None, exits)
    await slot.spawn()
    await slot.wait_ready(deadline())
    await slot.load(model, None, deadline())
    assert slot.pid is not None
    os.kill(slot.pid, signal.SIGKILL)
    assert await eventually(lambda: exits.reasons, 10)
    assert exits.reasons == ["killed by SIGKILL"] and not slot.alive
    assert "killed by SIGKILL" in caplog.text
    with pytest.raises(BackendUnavailable, match="killed by SIGKILL"):
        await slot.load(model, None, deadline())  # at once: nothing waits for a dead worker's answer
    await slot.stop()


async def test_a_worker_that_cannot_start_is_reported(model: ModelConfig, tmp_path: Path) -> None:
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\necho 'no llama_cpp here' >&2\nexit 3\n")
    python.chmod(0o755)
    backend = BackendConfig(name="managed", kind="llamacpp", start_timeout=30, python=str(python))
    slot = Slot(0, backend, lambda slot, event: None, Exits())
    await slot.spawn()
    with pytest.raises(BackendUnavailable, match=r"(?s)exited with code 3 before it was ready.*no llama_cpp here"):
        await slot.wait_ready(deadline())


@pytest.mark.parametrize("mode", ["idle", "loaded"])
async def test_workers_die_with_a_killed_parent(gguf_path: str, mode: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PARENT_SCRIPT, mode, gguf_path, stdout=asyncio.subprocess.PIPE, env=env)
    pid = 0
    try:
        assert parent.stdout is not None
        pid = int(await asyncio.wait_for(parent.stdout.readline(), 90))
        assert running(pid)
        parent.kill()  # SIGKILL: no cleanup code of warmpool runs
        await parent.wait()
        assert await eventually(lambda: not running(pid), 10), f"worker {pid} outlived its parent"
    finally:
        if parent.returncode is None:
            parent.kill()
        if pid and running(pid):
            os.killpg(pid, signal.SIGKILL)


async def test_a_foreign_interpreter_runs_the_worker_from_its_file(backend: BackendConfig, model: ModelConfig,
                                                                   tmp_path: Path) -> None:
    """An interpreter other than ours may lack warmpool: the worker (and its context module) then run from
    their files."""
    python = str(Path(sys.executable).parent / "." / Path(sys.executable).name)  # same venv, other path
    slot = Slot(0, replace(backend, python=python), lambda slot, event: None, Exits())
    await slot.spawn()
    try:
        await slot.wait_ready(deadline())
        context = {"tiers": [{"path": str(tmp_path / "ctx"), "budget": 10**8}], "min_tokens": 4}
        await slot.load(model, context, deadline())
        async with aiohttp.ClientSession() as session:
            body = chat_body("Hello there. " * 20, max_tokens=2)  # long enough to be saved
            status, _ = await post(session, slot.url + "/v1/chat/completions", body)
        assert status == 200
        await slot.free(deadline())
        assert list((tmp_path / "ctx").glob("*.kv")), "the context module did not run in the worker"
    finally:
        await slot.stop()
