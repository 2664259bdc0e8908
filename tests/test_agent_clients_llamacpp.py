"""The official `anthropic` and `openai` (Responses) clients through warmpool to a managed llama.cpp model (the
demo GGUF), unchanged: messages create and stream, tool use, count_tokens by the model's own tokenizer;
responses.create whole and streamed with a function tool. The gemma model calls a tool only when the request
names one (llama-cpp-python then forces the call with a grammar), so the tool tests name it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import openai
import pytest
import yaml

from tests.conftest import WarmpoolProcess, llama_models

pytestmark = pytest.mark.timeout(600)

CITY = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}}, "required": ["city"]}
TOOLS = [{"name": "get_weather", "description": "Weather for a city", "input_schema": CITY}]
FUNCTIONS = [{"type": "function", "name": "get_weather", "description": "Weather for a city", "parameters": CITY}]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


@pytest.fixture(scope="module")
def wp(tmp_path_factory: pytest.TempPathFactory, gguf_path: str) -> Iterator[WarmpoolProcess]:
    raw = {
        "listen": "127.0.0.1:0",
        "backends": {"local": {"kind": "llamacpp", "max_resident": 1}},
        "models": llama_models(gguf_path, "coder"),
        "phases": {"execution": "coder"},
    }
    path = tmp_path_factory.mktemp("wp") / "warmpool.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = WarmpoolProcess(path)
    proc.wait_ready()
    yield proc
    proc.stop()


@pytest.fixture
async def claude(wp: WarmpoolProcess) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=wp.url, api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture
async def oai(wp: WarmpoolProcess) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=wp.url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


async def test_messages_create_and_stream(claude: anthropic.AsyncAnthropic) -> None:
    message = await claude.messages.create(model="execution", max_tokens=6, system="Answer briefly.",
                                           messages=[{"role": "user", "content": "Say hello."}])
    # Answers name the model as the client did (issue 15's naming rule), here by its phase.
    assert message.model == "execution" and message.stop_reason in ("end_turn", "max_tokens")
    assert message.content[0].type == "text" and message.content[0].text
    assert message.usage.input_tokens > 0 and 0 < message.usage.output_tokens <= 6
    async with claude.messages.stream(model="execution", max_tokens=6,
                                      messages=[{"role": "user", "content": "Say hello."}]) as stream:
        texts = [t async for t in stream.text_stream]
        final = await stream.get_final_message()
    assert texts and "".join(texts) == final.content[0].text
    assert final.stop_reason in ("end_turn", "max_tokens")
    # the worker gives a stream's last chunk a usage, so a streamed answer counts its prompt too
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0


@pytest.mark.parametrize("streamed", [False, True])
async def test_tool_use_round_trip(claude: anthropic.AsyncAnthropic, streamed: bool) -> None:
    ask: dict[str, Any] = {"model": "execution", "max_tokens": 40, "tools": TOOLS, "messages": QUESTION,
                           "tool_choice": {"type": "tool", "name": "get_weather"}}
    if streamed:
        async with claude.messages.stream(**ask) as stream:
            message = await stream.get_final_message()
    else:
        message = await claude.messages.create(**ask)
    assert message.stop_reason == "tool_use"
    use = next(b for b in message.content if b.type == "tool_use")
    assert use.name == "get_weather" and use.input["city"] in ("Paris", "Oslo")
    follow_up = [*QUESTION, {"role": "assistant", "content": [use.model_dump(exclude_none=True)]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18°C"}]}]
    answer = await claude.messages.create(model="execution", max_tokens=6, tools=TOOLS, messages=follow_up)
    assert answer.stop_reason in ("end_turn", "max_tokens") and answer.content[0].type == "text"


async def test_count_tokens_uses_the_models_tokenizer(claude: anthropic.AsyncAnthropic, gguf_path: str) -> None:
    from llama_cpp import Llama

    text = "Warm pools keep the next model ready: a swap costs a page-cache read, not a disk read."
    counted = await claude.messages.count_tokens(model="execution", messages=[{"role": "user", "content": text}])
    vocab = Llama(model_path=gguf_path, vocab_only=True, verbose=False)
    assert counted.input_tokens == len(vocab.tokenize(text.encode(), special=True))
    assert counted.input_tokens != -(-len(text) // 4)  # not the estimate


async def test_images_for_a_model_without_a_projector_are_a_400(claude: anthropic.AsyncAnthropic,
                                                                oai: openai.AsyncOpenAI) -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    with pytest.raises(anthropic.BadRequestError) as refused:
        await claude.messages.create(model="execution", max_tokens=4,
                                     messages=[{"role": "user", "content": [image, {"type": "text", "text": "?"}]}])
    assert refused.value.body["error"]["type"] == "invalid_request_error"
    assert "cannot read images" in refused.value.body["error"]["message"]
    part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}
    with pytest.raises(openai.BadRequestError, match="cannot read images"):
        await oai.chat.completions.create(model="execution", messages=[{"role": "user", "content": [part]}])


async def test_responses_whole_and_streamed(oai: openai.AsyncOpenAI) -> None:
    response = await oai.responses.create(model="execution", instructions="Answer briefly.", input="Say hello.",
                                          max_output_tokens=6)
    assert response.status in ("completed", "incomplete") and response.output_text
    events = [e async for e in await oai.responses.create(model="execution", input="Say hello.",
                                                          max_output_tokens=6, stream=True)]
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1].type in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas and deltas == events[-1].response.output_text


@pytest.mark.parametrize("streamed", [False, True])
async def test_responses_function_call_round_trip(oai: openai.AsyncOpenAI, streamed: bool) -> None:
    ask: dict[str, Any] = {"model": "execution", "input": QUESTION, "tools": FUNCTIONS, "max_output_tokens": 40,
                           "tool_choice": {"type": "function", "name": "get_weather"}}
    if streamed:
        events = [e async for e in await oai.responses.create(**ask, stream=True)]
        assert any(e.type == "response.function_call_arguments.delta" for e in events)
        response = events[-1].response
    else:
        response = await oai.responses.create(**ask)
    call = next(item for item in response.output if item.type == "function_call")
    assert call.name == "get_weather" and json.loads(call.arguments)["city"] in ("Paris", "Oslo")
    follow_up = [*QUESTION, call.model_dump(exclude_none=True),
                 {"type": "function_call_output", "call_id": call.call_id, "output": "18°C"}]
    answer = await oai.responses.create(model="execution", input=follow_up, tools=FUNCTIONS, max_output_tokens=6)
    assert answer.output_text


async def test_openai_chat_tool_history_and_json_schema_fit_llama_cpp_python(oai: openai.AsyncOpenAI) -> None:
    """Two things every OpenAI client sends that llama-cpp-python's request models reject as they are."""
    history: list[Any] = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18°C"}]
    answer = await oai.chat.completions.create(model="execution", messages=history, max_tokens=4)
    assert answer.choices[0].message.content
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    shaped = await oai.chat.completions.create(
        model="execution", messages=[{"role": "user", "content": "Is it fine? Answer in JSON."}], max_tokens=24,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    choice = shaped.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content or "")["ok"], bool)
    else:
        assert (choice.message.content or "").lstrip().startswith("{")
