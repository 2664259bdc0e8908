"""`kind: command` end to end with real servers: llama.cpp's llama-server (built from the sources the
llama-cpp-python sdist vendors, tests/build_llama_server.py) and llama-cpp-python's own server, each started
by warmpool from a command template, serving the demo GGUF to the official openai, ollama and anthropic
clients."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import ollama
import openai
import psutil
import pytest
import yaml

from tests.conftest import WarmpoolProcess, eventually, wait_until

pytestmark = pytest.mark.timeout(600)

# The gemma chat template by name (the demo GGUF does not carry one llama-server's Jinja engine renders
# well); -np 1: one slot, so the saved slot is the one the next request lands on; --swa-full: Gemma 3 uses
# sliding-window attention, whose in-memory context checkpoints a slot file does not hold, so without a
# full-size SWA cache llama-server re-evaluates a restored prompt (see the README's kind: command section).
SERVER_ARGS = ["-c", "1024", "-np", "1", "--swa-full", "--no-jinja", "--chat-template", "gemma", "-t", "2"]
# Long enough that recomputing it costs far more than the one token a restored slot leaves to evaluate.
SYSTEM = ("You answer questions about warmpool, a proxy that keeps local language models warm. It sits in "
          "front of Ollama and llama.cpp servers, routes each agent phase to its model, swaps models on a "
          "small GPU in batches, and keeps weight files in the page cache. Answer in one short sentence.")
QUESTION = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What does warmpool do?"}]


def llama_server_model(binary: str, gguf: str, *, slots: bool = False) -> dict[str, Any]:
    command = [binary, "-m", "${GGUF}", "--host", "127.0.0.1", "--port", "${PORT}", "--alias", "${MODEL}",
               *SERVER_ARGS, *(["--slot-save-path", "${SLOT_DIR}"] if slots else [])]
    return {"backend": "cmd", "command": command, "gguf": gguf, "health": "/health"}


@pytest.fixture(scope="module")
def wp(tmp_path_factory: pytest.TempPathFactory, llama_server_bin: str, gguf_path: str) -> Iterator[WarmpoolProcess]:
    root = tmp_path_factory.mktemp("command")
    raw = {
        "listen": "127.0.0.1:0",
        "backends": {"cmd": {"kind": "command", "max_resident": 1, "start_timeout": "2m", "stop_grace": "5s",
                             "context_dir": str(root / "contexts"), "context_budget": "64MiB"}},
        "models": {
            "planner": llama_server_model(llama_server_bin, gguf_path, slots=True),
            "coder": llama_server_model(llama_server_bin, gguf_path, slots=True),
            "plain": llama_server_model(llama_server_bin, gguf_path),
        },
        "phases": {"context": "planner", "execution": "coder"},
    }
    path = root / "warmpool.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = WarmpoolProcess(path)
    proc.wait_ready()
    yield proc
    proc.stop()


def servers(root_pid: int, name: str = "llama-server") -> list[psutil.Process]:
    found = []
    for child in psutil.Process(root_pid).children(recursive=True):
        try:
            if child.name() == name and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.Error:
            continue
    return found


def client(wp: WarmpoolProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=wp.url + "/v1", api_key="unused", max_retries=0, timeout=300)


async def ask(wp: WarmpoolProcess, model: str, messages: list[dict[str, str]] = QUESTION,
              max_tokens: int = 12) -> dict[str, Any]:
    """A chat completion with temperature 0, as llama-server's JSON (its `timings` included)."""
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens, "seed": 1}
    async with aiohttp.ClientSession() as session, session.post(wp.url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        answer: dict[str, Any] = await r.json()
        return answer


async def status(wp: WarmpoolProcess) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(wp.url + "/warmpool/status") as r:
        pools: list[dict[str, Any]] = (await r.json())["pools"]
        return pools[0]


async def test_openai_ollama_and_anthropic_clients_through_llama_server(wp: WarmpoolProcess) -> None:
    openai_client = client(wp)
    reply = await openai_client.chat.completions.create(
        model="planner", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0)
    assert reply.choices[0].message.content and reply.model == "planner"
    stream = await openai_client.chat.completions.create(
        model="planner", messages=[{"role": "user", "content": "Count to five."}], max_tokens=8, stream=True)
    pieces = [chunk.choices[0].delta.content async for chunk in stream
              if chunk.choices and chunk.choices[0].delta.content]
    assert len(pieces) >= 2  # relayed chunk by chunk
    ollama_reply = await ollama.AsyncClient(host=wp.url).chat(
        model="planner", messages=[{"role": "user", "content": "Say hello."}], options={"num_predict": 8})
    assert ollama_reply.message.content and ollama_reply.done
    claude = anthropic.AsyncAnthropic(base_url=wp.url, api_key="unused", max_retries=0)
    message = await claude.messages.create(model="planner", max_tokens=8,
                                           messages=[{"role": "user", "content": "Say hello."}])
    assert message.content and message.content[0].type == "text" and message.usage.output_tokens > 0
    assert len(servers(wp.proc.pid)) == 1


async def test_swap_between_two_models_on_one_slot(wp: WarmpoolProcess) -> None:
    before = len((await status(wp))["swaps"])
    pids = []
    for model in ["planner", "coder", "planner"]:
        await ask(wp, model, max_tokens=2)
        running = servers(wp.proc.pid)
        assert len(running) == 1, running  # max_resident 1: the other server was stopped first
        pids.append(running[0].pid)
    pool = await status(wp)
    assert pool["resident"] == ["planner"] and len(set(pids)) == 3  # a fresh process for each load
    swaps = pool["swaps"][: len(pool["swaps"]) - before]
    assert [s["model"] for s in reversed(swaps)][-2:] == ["coder", "planner"] and all(s["ok"] for s in swaps)


async def test_context_survives_a_swap(wp: WarmpoolProcess) -> None:
    first = await ask(wp, "planner")  # the whole prompt evaluated (or reused from an earlier test's slot)
    await ask(wp, "coder", max_tokens=2)  # planner's slot saved, its server stopped
    again = await ask(wp, "planner")  # a new server, the saved slot restored
    # Recomputed from nothing for comparison: the same prompt on a model that keeps no context.
    await ask(wp, "coder", max_tokens=2)
    recomputed = await ask(wp, "plain")

    assert again["choices"][0]["message"]["content"] == recomputed["choices"][0]["message"]["content"]
    assert first["choices"][0]["message"]["content"] == recomputed["choices"][0]["message"]["content"]
    full = recomputed["timings"]["prompt_n"]
    assert recomputed["timings"]["cache_n"] == 0 and full == recomputed["usage"]["prompt_tokens"] > 60
    assert again["timings"]["prompt_n"] <= 2 and again["timings"]["cache_n"] >= full - 2, again["timings"]


async def test_a_killed_server_is_noticed_and_the_model_reloaded(wp: WarmpoolProcess) -> None:
    await ask(wp, "coder", max_tokens=2)
    (victim,) = servers(wp.proc.pid)
    victim.send_signal(signal.SIGKILL)
    async def coder_gone() -> bool:
        return "coder" not in (await status(wp))["resident"]

    await eventually(coder_gone, timeout=20)
    assert any("killed by SIGKILL" in line for line in wp.log), "".join(wp.log[-20:])
    reply = await ask(wp, "coder", max_tokens=2)  # loaded again, on a new process
    assert reply["choices"][0]["message"]["content"] is not None
    (revived,) = servers(wp.proc.pid)
    assert revived.pid != victim.pid


async def test_a_server_that_cannot_start_is_an_error_with_its_stderr(warmpool_process: Any,
                                                                       llama_server_bin: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF this is not a model")
    wp = warmpool_process({"backends": {"cmd": {"kind": "command"}},
                           "models": {"broken": llama_server_model(llama_server_bin, str(broken))}})
    with pytest.raises(openai.APIStatusError) as info:
        await client(wp).chat.completions.create(model="broken", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 503
    message = str(info.value)
    assert "before it was healthy" in message and "stderr tail" in message and "broken.gguf" in message, message


def test_no_server_outlives_a_killed_warmpool(warmpool_process: Any, llama_server_bin: str, gguf_path: str) -> None:
    wp = warmpool_process({"backends": {"cmd": {"kind": "command"}},
                           "models": {"planner": llama_server_model(llama_server_bin, gguf_path)},
                           "preload": ["planner"]})
    assert wait_until(lambda: len(servers(wp.proc.pid)) == 1, timeout=120)
    (server,) = servers(wp.proc.pid)
    wp.proc.kill()  # SIGKILL: none of warmpool's cleanup runs; the parent-death signal does the work
    wp.proc.wait()
    assert wait_until(lambda: not server.is_running() or server.status() == psutil.STATUS_ZOMBIE, timeout=20)


async def test_llama_cpp_python_server_through_kind_command(warmpool_process: Any, gguf_path: str) -> None:
    command = [sys.executable, "-m", "llama_cpp.server", "--model", "${GGUF}", "--model_alias", "${MODEL}",
               "--host", "127.0.0.1", "--port", "${PORT}", "--n_ctx", "1024", "--chat_format", "gemma",
               "--interrupt_requests", "false"]
    wp = warmpool_process({
        "backends": {"py": {"kind": "command", "start_timeout": "3m"}},
        "models": {"helper": {"backend": "py", "command": command, "gguf": gguf_path, "health": "/openapi.json"}},
    }, extra_env={"PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    reply = await client(wp).chat.completions.create(
        model="helper", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0)
    assert reply.choices[0].message.content and reply.model == "helper"
    ollama_reply = await ollama.AsyncClient(host=wp.url).generate(model="helper", prompt="Hello",
                                                                  options={"num_predict": 4})
    assert ollama_reply.done
    assert len([p for p in psutil.Process(wp.proc.pid).children(recursive=True)
                if "llama_cpp.server" in " ".join(p.cmdline())]) == 1


async def test_a_slot_file_the_server_refuses_is_dropped_and_the_load_goes_on(
        warmpool_process: Any, llama_server_bin: str, gguf_path: str, tmp_path: Path) -> None:
    contexts = tmp_path / "contexts"
    wp = warmpool_process({"backends": {"cmd": {"kind": "command", "context_dir": str(contexts)}},
                           "models": {"planner": llama_server_model(llama_server_bin, gguf_path, slots=True)}})
    await ask(wp, "planner", max_tokens=2)  # creates the model's slot directory
    (directory,) = contexts.iterdir()
    await wp_unload(wp, "planner")  # saves the slot
    saved = directory / "slot0.bin"
    assert saved.stat().st_size > 0
    saved.write_bytes(b"not a llama.cpp state file")
    reply = await ask(wp, "planner", max_tokens=2)  # the restore fails; the model serves anyway
    assert reply["timings"]["cache_n"] == 0
    assert not saved.exists() or saved.read_bytes() != b"not a llama.cpp state file"
    assert any("could not restore" in line for line in wp.log), "".join(wp.log[-20:])


async def wp_unload(wp: WarmpoolProcess, model: str) -> None:
    async with aiohttp.ClientSession() as session, \
            session.post(f"{wp.url}/warmpool/models/{model}/unload") as response:
        assert response.status == 200, await response.text()
