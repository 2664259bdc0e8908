"""Ollama fidelity for managed llama.cpp models, with real parts: warmpool as a child process, real
llama-cpp-python servers with the gemma 270M model, the official `ollama` and `openai` clients.

- answers carry the name the client sent (the configured one, or the upstream name);
- /api/ps fills Ollama's fields from the GGUF (family, parameter size, quantization, context length);
- the Ollama dialect reports prompt_eval_count (streamed too) and load_duration (the wait for the swap
  this request caused).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import ollama
import openai
import pytest
import yaml

from tests.conftest import WarmpoolProcess

pytestmark = pytest.mark.timeout(600)
USER = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def wp(tmp_path_factory: pytest.TempPathFactory, gguf_path: str) -> Iterator[WarmpoolProcess]:
    model = {"backend": "local", "gguf": gguf_path, "n_ctx": 1024, "chat_format": "gemma"}
    raw = {
        "listen": "127.0.0.1:0",
        "backends": {"local": {"kind": "llamacpp", "max_resident": 1, "spare": True}},
        "models": {"planner": {**model, "upstream_name": "gemma-up"}, "coder": dict(model)},
    }
    path = tmp_path_factory.mktemp("wp") / "warmpool.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = WarmpoolProcess(path)
    proc.wait_ready()
    yield proc
    proc.stop()


async def test_answers_echo_the_name_sent_in_both_dialects(wp: WarmpoolProcess) -> None:
    client = ollama.AsyncClient(host=wp.url)
    async with openai.AsyncOpenAI(base_url=wp.url + "/v1", api_key="-", max_retries=0) as ai:
        for name in ("planner", "gemma-up"):
            done = await ai.chat.completions.create(model=name, messages=USER, max_tokens=3)  # type: ignore[arg-type]
            assert done.model == name
            stream = await ai.chat.completions.create(model=name, messages=USER, max_tokens=3,  # type: ignore[arg-type]
                                                      stream=True)
            assert {chunk.model async for chunk in stream} == {name}
            assert (await client.chat(name, USER, options={"num_predict": 3})).model == name
            parts = [p async for p in await client.generate(name, "Hi", stream=True, options={"num_predict": 3})]
            assert {p.model for p in parts} == {name}
        assert "gemma-up" in {m.id async for m in ai.models.list()}
    assert "gemma-up:latest" in {m.model for m in (await client.list()).models}


async def test_ps_shows_what_the_gguf_says(wp: WarmpoolProcess, gguf_path: str) -> None:
    client = ollama.AsyncClient(host=wp.url)
    await client.generate("coder", "Hi", options={"num_predict": 1})
    running = (await client.ps()).models
    assert [m.model for m in running] == ["coder:latest"]
    entry = running[0]
    assert entry.details is not None
    assert (entry.details.format, entry.details.family, entry.details.families) == ("gguf", "gemma3", ["gemma3"])
    assert (entry.details.parameter_size, entry.details.quantization_level) == ("268.10M", "Q4_K_M")
    assert (entry.size, entry.size_vram, entry.context_length) == (os.path.getsize(gguf_path), 0, 1024)
    shown = await client.show("coder")
    assert shown.details is not None and shown.details.quantization_level == "Q4_K_M"
    listed = {m.model: m for m in (await client.list()).models}
    assert listed["coder:latest"].details.family == "gemma3"


async def test_token_counts_and_load_duration(wp: WarmpoolProcess) -> None:
    client = ollama.AsyncClient(host=wp.url)
    await client.generate("coder", "Hi", options={"num_predict": 1})  # the coder is resident
    swapped: Any = await client.chat("planner", USER, options={"num_predict": 4})  # a swap to the planner
    again: Any = await client.chat("planner", USER, options={"num_predict": 4})
    streamed = [p async for p in await client.chat("planner", USER, stream=True, options={"num_predict": 4})]
    final = streamed[-1]
    assert final.done
    assert swapped.prompt_eval_count and swapped.prompt_eval_count == again.prompt_eval_count
    assert final.prompt_eval_count == swapped.prompt_eval_count  # the stream knows it too
    assert final.eval_count and final.eval_count <= 4
    # load_duration: the wait for the model (Ollama's definition); the swap to the planner took a load
    assert swapped.load_duration > 0.2e9 and swapped.load_duration < swapped.total_duration
    assert again.load_duration < 0.05e9 and final.load_duration < 0.05e9
