"""Every agent client through warmpool to the Ollama emulator, with the official packages: Anthropic's Messages
API and OpenAI's Responses API beside Ollama's /api/chat and OpenAI's chat completions; tool calls and images
round-tripping through every pair of client dialect and upstream (Ollama's native API, Ollama's own /v1 and
/v1/messages, and an OpenAI-speaking upstream).

What reached the upstream is read from the emulator's log, so a test sees that a tool result came back tied to
the call that asked for it, and that an image arrived byte for byte.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import anthropic
import ollama
import openai
import pytest

from tests.conftest import running_warmpool
from tests.ollama_emulator import EmulatedModel, OllamaEmulator

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
CITY = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}}, "required": ["city"]}
QUESTION = "What is the weather in Paris?"
RESULT = "18 degrees and sunny"

# configured model → (backend, upstream name, load-time options)
MODELS = {
    "tooled": ("ollama", "llama3.2", {"num_ctx": 8192}),  # options: translated to the native API
    "plain": ("ollama", "qwen2.5:7b", {}),  # no options: Ollama's own /v1 and /v1/messages
    "remote": ("v1", "phi3:mini", {}),  # an OpenAI-speaking upstream (the emulator's /v1 layer)
    "see": ("ollama", "llava:7b", {"num_ctx": 8192}),
    "see-plain": ("ollama", "llava:13b", {}),
    "see-remote": ("v1", "bakllava", {}),
    "notools": ("ollama", "gemma3:4b", {}),
}
TOOL_UPSTREAMS = {"ollama-native": "tooled", "ollama-own-v1": "plain", "openai-upstream": "remote"}
IMAGE_UPSTREAMS = {"ollama-native": "see", "ollama-own-v1": "see-plain", "openai-upstream": "see-remote"}
CLIENTS = ["ollama", "openai-chat", "anthropic", "openai-responses"]


def store() -> list[EmulatedModel]:
    vision = {"llava:7b", "llava:13b", "bakllava"}
    return [EmulatedModel(upstream, size=100_000_000, vision=upstream in vision, tools=upstream != "gemma3:4b")
            for _, upstream, _ in MODELS.values()]


def config(url: str, **top: Any) -> dict[str, Any]:
    models = {}
    for name, (backend, upstream, options) in MODELS.items():
        models[name] = {"backend": backend, "upstream_name": upstream, **({"options": options} if options else {})}
    return {"backends": {"ollama": {"kind": "ollama", "url": url, "max_resident": 8},
                         "v1": {"kind": "openai", "url": url}},
            "models": models, "phases": {"execution": "plain", "planning": "tooled"}, **top}


@dataclass
class Stack:
    emu: OllamaEmulator
    url: str
    clients: list[Any]  # closed at teardown, in the event loop that made them

    def requests(self, path: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.emu.events if e["event"] == "request" and path in (None, e["path"])]

    def last(self) -> dict[str, Any]:
        return self.requests()[-1]

    def anthropic(self, **kwargs: Any) -> anthropic.AsyncAnthropic:
        client = anthropic.AsyncAnthropic(**{"base_url": self.url, "api_key": "unused", "max_retries": 0, **kwargs})
        self.clients.append(client)
        return client

    def openai(self) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)
        self.clients.append(client)
        return client

    def ollama(self) -> ollama.AsyncClient:
        client = ollama.AsyncClient(host=self.url)
        self.clients.append(client._client)
        return client


MakeStack = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def make_stack() -> AsyncIterator[MakeStack]:
    async with contextlib.AsyncExitStack() as exits:
        async def make(version: str = "0.32.15", **top: Any) -> Stack:
            emu = OllamaEmulator(store(), load_seconds_per_gb=0.1, token_delay=0.001, max_loaded=8,
                                 version=version)
            await emu.start()
            exits.push_async_callback(emu.stop)
            url = await exits.enter_async_context(running_warmpool(config(emu.url, **top)))
            stack = Stack(emu, url, [])
            exits.push_async_callback(close_all, stack.clients)
            return stack

        yield make


async def close_all(clients: list[Any]) -> None:
    for client in clients:
        await (client.aclose() if hasattr(client, "aclose") else client.close())


@pytest.fixture
async def stack(make_stack: MakeStack) -> Stack:
    return await make_stack()


# -- the four clients, asking for a tool and answering it ---------------------------------------------------

@dataclass
class Call:
    name: str
    arguments: dict[str, Any]
    id: str | None  # the Ollama client carries no call ids
    raw: Any  # what the client got, to send back in the follow-up


async def ollama_ask(stack: Stack, model: str, stream: bool) -> Call:
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": CITY}}]
    client = stack.ollama()
    messages = [{"role": "user", "content": QUESTION}]
    if stream:
        parts = [p async for p in await client.chat(model, messages=messages, tools=tools, stream=True)]
        calls = [c for p in parts for c in p.message.tool_calls or []]
    else:
        calls = list((await client.chat(model, messages=messages, tools=tools)).message.tool_calls or [])
    assert len(calls) == 1
    return Call(calls[0].function.name, dict(calls[0].function.arguments), None, tools)


async def ollama_answer(stack: Stack, model: str, stream: bool, call: Call) -> str:
    messages = [{"role": "user", "content": QUESTION},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"function": {"name": call.name, "arguments": call.arguments}}]},
                {"role": "tool", "content": RESULT, "tool_name": call.name}]
    client = stack.ollama()
    if stream:
        parts = [p async for p in await client.chat(model, messages=messages, tools=call.raw, stream=True)]
        return "".join(p.message.content or "" for p in parts)
    return (await client.chat(model, messages=messages, tools=call.raw)).message.content or ""


OPENAI_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": CITY}}]


async def chat_ask(stack: Stack, model: str, stream: bool) -> Call:
    client = stack.openai()
    messages = [{"role": "user", "content": QUESTION}]
    if not stream:
        answer = await client.chat.completions.create(model=model, messages=messages, tools=OPENAI_TOOLS)
        assert answer.choices[0].finish_reason == "tool_calls"
        calls = answer.choices[0].message.tool_calls or []
        assert len(calls) == 1
        return Call(calls[0].function.name, json.loads(calls[0].function.arguments), calls[0].id, None)
    found: dict[int, dict[str, str]] = {}
    finish = None
    async for chunk in await client.chat.completions.create(model=model, messages=messages, tools=OPENAI_TOOLS,
                                                            stream=True):
        if not chunk.choices:
            continue
        finish = chunk.choices[0].finish_reason or finish
        for fragment in chunk.choices[0].delta.tool_calls or []:
            call = found.setdefault(fragment.index, {"id": "", "name": "", "arguments": ""})
            call["id"] = fragment.id or call["id"]
            call["name"] = (fragment.function.name if fragment.function else None) or call["name"]
            call["arguments"] += (fragment.function.arguments if fragment.function else None) or ""
    assert finish == "tool_calls" and len(found) == 1
    call = found[0]
    return Call(call["name"], json.loads(call["arguments"]), call["id"], None)


async def chat_answer(stack: Stack, model: str, stream: bool, call: Call) -> str:
    messages: list[Any] = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": json.dumps(call.arguments)}}]},
        {"role": "tool", "tool_call_id": call.id, "content": RESULT}]
    client = stack.openai()
    if stream:
        chunks = [c async for c in await client.chat.completions.create(
            model=model, messages=messages, tools=OPENAI_TOOLS, stream=True)]
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    answer = await client.chat.completions.create(model=model, messages=messages, tools=OPENAI_TOOLS)
    return answer.choices[0].message.content or ""


ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "Weather", "input_schema": CITY}]


async def anthropic_message(stack: Stack, model: str, stream: bool, messages: list[Any]) -> Any:
    client = stack.anthropic()
    if stream:
        async with client.messages.stream(model=model, max_tokens=64, messages=messages, tools=ANTHROPIC_TOOLS) as s:
            return await s.get_final_message()
    return await client.messages.create(model=model, max_tokens=64, messages=messages, tools=ANTHROPIC_TOOLS)


async def anthropic_ask(stack: Stack, model: str, stream: bool) -> Call:
    message = await anthropic_message(stack, model, stream, [{"role": "user", "content": QUESTION}])
    assert message.stop_reason == "tool_use"
    uses = [b for b in message.content if b.type == "tool_use"]
    assert len(uses) == 1
    return Call(uses[0].name, dict(uses[0].input), uses[0].id, message)


async def anthropic_answer(stack: Stack, model: str, stream: bool, call: Call) -> str:
    messages = [{"role": "user", "content": QUESTION},
                {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in call.raw.content]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": RESULT}]}]
    message = await anthropic_message(stack, model, stream, messages)
    assert message.stop_reason in ("end_turn", "max_tokens")
    return "".join(b.text for b in message.content if b.type == "text")


RESPONSES_TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather", "parameters": CITY}]


async def responses_create(stack: Stack, model: str, stream: bool, given: Any) -> Any:
    client = stack.openai()
    if not stream:
        return await client.responses.create(model=model, input=given, tools=RESPONSES_TOOLS, max_output_tokens=64)
    events = [e async for e in await client.responses.create(model=model, input=given, tools=RESPONSES_TOOLS,
                                                             max_output_tokens=64, stream=True)]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    return events[-1].response


async def responses_ask(stack: Stack, model: str, stream: bool) -> Call:
    response = await responses_create(stack, model, stream, QUESTION)
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1
    return Call(calls[0].name, json.loads(calls[0].arguments), calls[0].call_id, calls[0])


async def responses_answer(stack: Stack, model: str, stream: bool, call: Call) -> str:
    given = [{"role": "user", "content": QUESTION}, call.raw.model_dump(exclude_none=True),
             {"type": "function_call_output", "call_id": call.id, "output": RESULT}]
    response = await responses_create(stack, model, stream, given)
    assert response.status == "completed"
    return str(response.output_text)


ASK = {"ollama": ollama_ask, "openai-chat": chat_ask, "anthropic": anthropic_ask, "openai-responses": responses_ask}
ANSWER = {"ollama": ollama_answer, "openai-chat": chat_answer, "anthropic": anthropic_answer,
          "openai-responses": responses_answer}


def tool_result_tied_to_its_call(path: str, body: dict[str, Any]) -> bool:
    """Whether the upstream got the tool result, tied to the call it answers, in the upstream's own shape."""
    if path == "/v1/messages":
        uses = [b["id"] for m in body["messages"] if isinstance(m["content"], list)
                for b in m["content"] if b.get("type") == "tool_use"]
        results = [(b["tool_use_id"], b["content"]) for m in body["messages"] if isinstance(m["content"], list)
                   for b in m["content"] if b.get("type") == "tool_result"]
        return len(uses) == 1 and results == [(uses[0], RESULT)]
    calls = [c for m in body["messages"] for c in m.get("tool_calls") or []]
    results = [m for m in body["messages"] if m["role"] == "tool"]
    if len(calls) != 1 or len(results) != 1 or results[0]["content"] != RESULT:
        return False
    if path == "/api/chat" and "tool_name" in results[0]:  # Ollama ties a result to its tool by name
        return bool(results[0]["tool_name"] == calls[0]["function"]["name"])
    return bool(results[0]["tool_call_id"] == calls[0]["id"])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("upstream", TOOL_UPSTREAMS)
@pytest.mark.parametrize("client", CLIENTS)
async def test_tool_call_round_trip(stack: Stack, client: str, upstream: str, stream: bool) -> None:
    model = TOOL_UPSTREAMS[upstream]
    call = await ASK[client](stack, model, stream)
    assert (call.name, call.arguments) == ("get_weather", {"city": "Paris"})  # the emulated model's call
    text = await ANSWER[client](stack, model, stream, call)
    assert text  # the model answered in prose once it had the result
    sent = stack.last()
    assert tool_result_tied_to_its_call(sent["path"], sent["body"]), sent


# -- images ----------------------------------------------------------------------------------------------

async def send_image(stack: Stack, client: str, model: str) -> str:
    """Ask about PNG in the client's own form; the answer's text."""
    if client == "ollama":
        question = {"role": "user", "content": "What is it?", "images": [PNG]}
        answer = await stack.ollama().chat(model, messages=[question])
        return answer.message.content or ""
    if client == "openai-chat":
        content = [{"type": "text", "text": "What is it?"},
                   {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]
        chat = await stack.openai().chat.completions.create(model=model,
                                                            messages=[{"role": "user", "content": content}])
        return chat.choices[0].message.content or ""
    if client == "anthropic":
        blocks = [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                  {"type": "text", "text": "What is it?"}]
        message = await stack.anthropic().messages.create(model=model, max_tokens=32,
                                                          messages=[{"role": "user", "content": blocks}])
        return "".join(b.text for b in message.content if b.type == "text")
    parts = [{"type": "input_text", "text": "What is it?"},
             {"type": "input_image", "image_url": f"data:image/png;base64,{PNG}"}]
    response = await stack.openai().responses.create(model=model, input=[{"role": "user", "content": parts}])
    return str(response.output_text)


def images_received(path: str, body: dict[str, Any]) -> list[str]:
    if path == "/v1/messages":
        return [b["source"]["data"] for m in body["messages"] if isinstance(m["content"], list)
                for b in m["content"] if b.get("type") == "image"]
    if path == "/v1/chat/completions":
        return [p["image_url"]["url"].partition(",")[2] for m in body["messages"] if isinstance(m["content"], list)
                for p in m["content"] if p.get("type") == "image_url"]
    return [image for m in body["messages"] for image in m.get("images") or []]


@pytest.mark.parametrize("upstream", IMAGE_UPSTREAMS)
@pytest.mark.parametrize("client", CLIENTS)
async def test_image_reaches_the_upstream_byte_for_byte(stack: Stack, client: str, upstream: str) -> None:
    assert await send_image(stack, client, IMAGE_UPSTREAMS[upstream])
    sent = stack.last()
    assert images_received(sent["path"], sent["body"]) == [PNG]


# -- what a model cannot do: the upstream's own error, in the client's dialect, not a 5xx ---------------

@pytest.mark.parametrize("model", ["notools", "remote"], ids=["tools-to-a-model-without", "images-to-a-model-without"])
@pytest.mark.parametrize("client", CLIENTS)
async def test_what_a_model_cannot_do_is_the_upstreams_400_in_the_clients_dialect(
        stack: Stack, client: str, model: str) -> None:
    expected = "does not support tools" if model == "notools" else "missing data required for image input"
    call = ASK[client](stack, model, False) if model == "notools" else send_image(stack, client, model)
    errors: tuple[type[BaseException], ...] = (ollama.ResponseError, openai.BadRequestError, anthropic.BadRequestError)
    with pytest.raises(errors) as info:
        await call
    error = info.value
    assert getattr(error, "status_code", None) == 400
    if isinstance(error, anthropic.BadRequestError):
        assert error.body["type"] == "error" and error.body["error"]["type"] == "invalid_request_error"
        assert expected in error.body["error"]["message"]
    elif isinstance(error, openai.BadRequestError):
        assert expected in error.message and error.type == "invalid_request_error"
    else:
        assert expected in error.error


# -- Anthropic Messages: native where Ollama serves it, translated where it does not ----------------------

@pytest.mark.parametrize(("version", "model", "path"), [
    ("0.32.15", "plain", "/v1/messages"),  # Ollama >= 0.14, no load-time options: forwarded as it came
    ("0.13.5", "plain", "/api/chat"),  # older Ollama: translated to its native chat
    ("0.32.15", "tooled", "/api/chat"),  # load-time options only travel on the native API
])
async def test_messages_are_forwarded_natively_only_where_ollama_serves_them(
        make_stack: MakeStack, version: str, model: str, path: str) -> None:
    stack = await make_stack(version)
    client = stack.anthropic()
    message = await client.messages.create(model=model, max_tokens=5, system="Be brief.",
                                           messages=[{"role": "user", "content": "Hi"}])
    assert message.type == "message" and message.role == "assistant" and message.stop_reason == "max_tokens"
    assert message.content[0].type == "text" and len(message.content[0].text.split()) == 5
    assert message.usage.output_tokens == 5 and message.usage.input_tokens > 0
    sent = stack.last()
    assert sent["path"] == path
    if path == "/api/chat":
        assert sent["body"]["messages"][0] == {"role": "system", "content": "Be brief."}
        assert sent["body"]["options"]["num_predict"] == 5 and "keep_alive" in sent["body"]
    async with client.messages.stream(model=model, max_tokens=5, messages=[{"role": "user", "content": "Hi"}]) as s:
        streamed = "".join([t async for t in s.text_stream])
        final = await s.get_final_message()
    assert streamed == final.content[0].text and final.stop_reason == "max_tokens"


async def test_messages_stream_event_by_event(stack: Stack) -> None:
    """The raw SSE: named events in Anthropic's order, every block opened and closed."""
    body = {"model": "tooled", "max_tokens": 4, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    async with aiohttp.ClientSession() as http, http.post(stack.url + "/v1/messages", json=body) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        names = [line[len(b"event: "):].strip().decode() async for line in r.content if line.startswith(b"event: ")]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert names.count("content_block_delta") == 4


async def test_phase_by_header_or_by_model_name(stack: Stack) -> None:
    client = stack.anthropic()
    raw = await client.messages.with_raw_response.create(
        model="claude-sonnet-4-5", max_tokens=3, messages=[{"role": "user", "content": "Hi"}],
        extra_headers={"X-Warmpool-Phase": "planning"})
    assert raw.headers["X-Warmpool-Model"] == "tooled" and raw.headers["X-Warmpool-Phase"] == "planning"
    response = await stack.openai().responses.with_raw_response.create(model="execution", input="Hi",
                                                                      max_output_tokens=3)
    assert response.headers["X-Warmpool-Model"] == "plain" and response.headers["X-Warmpool-Phase"] == "execution"
    assert response.parse().output_text
    async with aiohttp.ClientSession() as http, http.get(stack.url + "/metrics") as r:
        metrics = await r.text()
    # counted like every other request, under the client's dialect
    assert ('warmpool_requests_total{dialect="anthropic",model="tooled",phase="planning",priority="interactive",'
            'status="200"} 1.0') in metrics
    assert ('warmpool_requests_total{dialect="openai",model="plain",phase="execution",priority="interactive",'
            'status="200"} 1.0') in metrics


async def test_count_tokens_on_ollama_is_an_estimate_without_an_upstream_request(stack: Stack) -> None:
    before = len(stack.requests())
    text = "The quick brown fox jumps over the lazy dog. " * 8
    counted = await stack.anthropic().messages.count_tokens(model="plain", messages=[{"role": "user", "content": text}])
    assert counted.input_tokens == -(-len(text.rstrip()) // 4)  # four characters a token, rounded up
    assert len(stack.requests()) == before


async def test_errors_are_in_anthropics_shape(stack: Stack) -> None:
    client = stack.anthropic()
    with pytest.raises(anthropic.NotFoundError) as missing:
        await client.messages.create(model="nope", max_tokens=3, messages=[{"role": "user", "content": "Hi"}])
    assert missing.value.body == {"type": "error", "error": {"type": "not_found_error",
                                                             "message": "model 'nope' not found"}}
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.url + "/v1/messages", data=b"{not json") as r:
            assert r.status == 400
            bad_json = await r.json()
        no_limit = {"model": "tooled", "messages": [{"role": "user", "content": "Hi"}]}
        async with http.post(stack.url + "/v1/messages", json=no_limit) as r:
            assert r.status == 400
            missing_limit = await r.json()
    assert bad_json["type"] == "error" and bad_json["error"]["type"] == "invalid_request_error"
    assert "invalid JSON" in bad_json["error"]["message"]
    assert missing_limit["error"] == {"type": "invalid_request_error", "message": "max_tokens: Field required"}


async def test_api_keys_accept_x_api_key_and_bearer(make_stack: MakeStack) -> None:
    stack = await make_stack(auth={"api_keys": ["sekrit"]})
    message = {"model": "plain", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    assert (await stack.anthropic(api_key="sekrit").messages.create(**message)).content  # x-api-key
    bearer = stack.anthropic(api_key=None, auth_token="sekrit")
    assert (await bearer.messages.create(**message)).content  # Authorization: Bearer
    with pytest.raises(anthropic.AuthenticationError) as wrong:
        await stack.anthropic(api_key="wrong").messages.create(**message)
    assert wrong.value.body["error"]["type"] == "authentication_error"
    forwarded = stack.requests("/v1/messages")[-1]
    assert forwarded["body"]["model"] == "qwen2.5:7b"


# -- Responses ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["plain", "tooled", "remote"])
async def test_responses_whole_and_streamed(stack: Stack, model: str) -> None:
    client = stack.openai()
    response = await client.responses.create(model=model, instructions="Be brief.", input="Hi", max_output_tokens=4)
    assert response.object == "response" and response.status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    assert len(response.output_text.split()) == 4 and response.usage is not None and response.usage.output_tokens == 4
    sent = stack.last()["body"]
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    events = [e async for e in await client.responses.create(model=model, input="Hi", stream=True)]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].type == "response.completed" and events[-1].response.output_text == deltas
    assert events[-1].response.status == "completed"


async def test_responses_refuse_what_needs_state_or_hosted_tools(stack: Stack) -> None:
    client = stack.openai()
    with pytest.raises(openai.BadRequestError) as state:
        await client.responses.create(model="plain", input="Hi", previous_response_id="resp_123")
    assert "keeps no conversation state" in state.value.message
    with pytest.raises(openai.BadRequestError) as hosted:
        await client.responses.create(model="plain", input="Hi", tools=[{"type": "web_search"}])
    assert "web_search" in hosted.value.message


async def test_json_schema_reaches_ollama_as_its_format(stack: Stack) -> None:
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    await stack.openai().responses.create(model="tooled", input="Age?", text={
        "format": {"type": "json_schema", "name": "person", "schema": schema}})
    assert stack.last()["body"]["format"] == schema
    await stack.anthropic().messages.create(model="tooled", max_tokens=8,
                                            messages=[{"role": "user", "content": "Age?"}],
                                            output_config={"format": {"type": "json_schema", "schema": schema}})
    assert stack.last()["body"]["format"] == schema
    await stack.openai().chat.completions.create(model="tooled", messages=[{"role": "user", "content": "Age?"}],
                                                 response_format={"type": "json_object"})
    assert stack.last()["body"]["format"] == "json"


# -- an upstream that dies mid-stream ------------------------------------------------------------------

@pytest.mark.timeout(120)
async def test_upstream_dying_mid_stream_ends_each_stream_with_its_dialects_error(make_stack: MakeStack) -> None:
    stack = await make_stack()
    stack.emu.token_delay = 0.5
    question = [{"role": "user", "content": "Hi"}]
    requests = [  # Ollama's own /v1/messages passed through, the translated one, and a Responses stream
        ("/v1/messages", {"model": "plain", "max_tokens": 50, "stream": True, "messages": question}),
        ("/v1/messages", {"model": "tooled", "max_tokens": 50, "stream": True, "messages": question}),
        ("/v1/responses", {"model": "tooled", "input": "Hi", "stream": True}),
    ]
    async with aiohttp.ClientSession() as http:
        responses = [await http.post(stack.url + path, json=body) for path, body in requests]
        for response in responses:  # every stream has started
            assert response.status == 200 and (await response.content.readline()).startswith(b"event: ")
        await stack.emu.stop()
        bodies = [(await response.read()).decode() for response in responses]
    for (path, _), body in zip(requests, bodies, strict=True):
        events = [line[len("event: "):] for line in body.splitlines() if line.startswith("event: ")]
        last_data = json.loads([line for line in body.splitlines() if line.startswith("data: ")][-1][6:])
        if path == "/v1/messages":
            assert events[-1] == "error" and "message_stop" not in events
            assert last_data["type"] == "error" and "'ollama'" in last_data["error"]["message"]
        else:
            assert events[-2:] == ["error", "response.failed"] and "response.completed" not in events
            assert last_data["response"]["status"] == "failed"


# -- the naming rule on the new endpoints --------------------------------------------------------------------

@pytest.mark.parametrize("sent", ["tooled", "llama3.2", "remote", "phi3:mini", "plain", "qwen2.5:7b"])
async def test_anthropic_and_responses_answers_name_the_model_the_client_sent(stack: Stack, sent: str) -> None:
    """Translated (native API, OpenAI upstream) or passed through (Ollama's own /v1/messages): the answer
    names the model as the client did, configured name or upstream name, streamed or not."""
    message = await stack.anthropic().messages.create(
        model=sent, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert message.model == sent
    async with stack.anthropic().messages.stream(
            model=sent, max_tokens=8, messages=[{"role": "user", "content": "hi"}]) as events:
        assert (await events.get_final_message()).model == sent
    response = await stack.openai().responses.create(model=sent, input="hi", max_output_tokens=16)
    assert response.model == sent
