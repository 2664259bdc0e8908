"""The Anthropic Messages and OpenAI Responses translations (dialects/anthropic_from_openai.py,
responses_from_openai.py, openai_chat.py, openai_compat.py), fed OpenAI chat payloads in the shapes llama.cpp
servers and Ollama's /v1 emit, and checked against the official SDKs' own models: every event validates as the
SDK's event type, and the SDK's stream accumulator rebuilds the same message the non-streamed path gives."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.splits import Split, bytewise, sized, whole
from warmpool.dialects import anthropic_from_openai as anth
from warmpool.dialects import openai_compat
from warmpool.dialects import responses_from_openai as resp
from warmpool.dialects.sse import SSEDecoder
from warmpool.dialects.transforms import AnthropicFromOpenAI, OpenAIFromOllama, ResponsesFromOpenAI, chained
from warmpool.errors import BadRequest, QueueFull, anthropic_error
from warmpool.proxy import routing, tokens

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
SPLITS = [whole, bytewise, sized(5), sized(64)]
ANTHROPIC_EVENT: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
RESPONSES_EVENT: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


# -- upstream payloads ---------------------------------------------------------------------------------------

def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


def sse(*events: dict[str, Any] | str, done: bool = True) -> bytes:
    frames = [e if isinstance(e, str) else f"data: {json.dumps(e)}\n\n" for e in events]
    return "".join([*frames, "data: [DONE]\n\n" if done else ""]).encode()


def llama_tool_fragments(name: str, *pieces: str) -> list[dict[str, Any]]:
    """llama-cpp-python's forced tool call: id and name repeated in every fragment."""
    return [chunk({"tool_calls": [{"index": 0, "id": "call__0_x", "type": "function",
                                   "function": {"name": name, "arguments": p}}]}) for p in pieces]


TEXT_STREAM = sse(chunk({"role": "assistant"}), chunk({"reasoning_content": "Think."}), chunk({"content": "Hel"}),
                  chunk({"content": "lo"}), chunk({}, "stop"), usage(12, 3))
TOOL_STREAM = sse(chunk({"role": "assistant", "content": "Let me look."}),
                  *llama_tool_fragments("get_weather", '{"ci', 'ty": "Par', 'is"}'), chunk({}, "tool_calls"))
WHOLE_TEXT = {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
              "choices": [{"index": 0, "finish_reason": "length",
                           "message": {"role": "assistant", "content": "Hello", "reasoning_content": "Think."}}],
              "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}
WHOLE_TOOL = {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
              "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                  "role": "assistant", "content": None,
                  "tool_calls": [{"id": "call_1", "type": "function",
                                  "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}}],
              "usage": {"prompt_tokens": 20, "completion_tokens": 7, "total_tokens": 27}}


def events_of(frames: list[bytes]) -> list[tuple[str, dict[str, Any]]]:
    decoder = SSEDecoder()
    out = [(e.name, json.loads(e.data)) for e in decoder.feed(b"".join(frames))]
    return out + [(e.name, json.loads(e.data)) for e in decoder.finish()]


def run(translator: Any, data: bytes, split: Split) -> list[tuple[str, dict[str, Any]]]:
    frames: list[bytes] = []
    for piece in split(data):
        frames += translator.feed(piece)
    frames += translator.finish()
    assert translator.finish() == [] and translator.feed(b"data: {}\n\n") == []  # nothing after the end
    return events_of(frames)


# -- Anthropic: requests --------------------------------------------------------------------------------------

def anthropic_request(**fields: Any) -> dict[str, Any]:
    return anth.anthropic_request_to_openai({"model": "x", "max_tokens": 16, **fields}, "up")


def test_system_turns_tools_and_results_map_to_chat_messages() -> None:
    out = anthropic_request(
        system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind.", "cache_control": {}}],
        stop_sequences=["END"], temperature=0.2, top_k=20, stream=True,
        tools=[{"name": "get_weather", "description": "Weather", "input_schema": CITY}],
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Use the tool.", "signature": "sig"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18°C"}]},
                {"type": "text", "text": "And Oslo?"}]}])
    assert out == {
        "model": "up", "max_tokens": 16, "stream": True, "stream_options": {"include_usage": True},
        "temperature": 0.2, "top_k": 20, "stop": ["END"],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": CITY,
                                                    "description": "Weather"}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "parallel_tool_calls": False,
        "messages": [
            {"role": "system", "content": "Be brief.\n\nBe kind."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "Checking.", "reasoning_content": "Use the tool.",
             "tool_calls": [{"id": "toolu_1", "type": "function",
                             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "18°C"},
            {"role": "user", "content": "And Oslo?"}]}


def test_images_become_image_url_parts_and_tool_result_images_follow_the_result() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    linked = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
    out = anthropic_request(messages=[{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "is_error": True,
         "content": [image, {"type": "text", "text": "x"}]},
        linked, {"type": "text", "text": "What?"}]}])
    assert out["messages"] == [
        {"role": "tool", "tool_call_id": "t", "content": "Error: x"},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            {"type": "text", "text": "What?"}]}]


@pytest.mark.parametrize(("choice", "want"), [
    ({"type": "auto"}, "auto"), ({"type": "any"}, "required"), ({"type": "none"}, "none")])
def test_tool_choice(choice: dict[str, Any], want: str) -> None:
    assert anthropic_request(messages=[{"role": "user", "content": "x"}], tool_choice=choice)["tool_choice"] == want


def test_structured_output_and_effort() -> None:
    out = anthropic_request(messages=[{"role": "user", "content": "x"}],
                            output_config={"effort": "max", "format": {"type": "json_schema", "schema": CITY}})
    assert out["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": CITY}}
    assert out["reasoning_effort"] == "high"
    off = anthropic_request(messages=[{"role": "user", "content": "x"}], thinking={"type": "disabled"})
    assert off["reasoning_effort"] == "none"


@pytest.mark.parametrize(("fields", "message"), [
    ({"max_tokens": None, "messages": [{"role": "user", "content": "x"}]}, "max_tokens: Field required"),
    ({"messages": []}, "at least one message"),
    ({"messages": [{"role": "system", "content": "x"}]}, 'role must be "user" or "assistant"'),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "'document' is not supported"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web_search_20250305", "name": "w"}]},
     "server tool 'web_search_20250305' is not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file"}}]}]},
     "base64 or url image source"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}, "tool_use_id is required"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": []}]}]},
     "input must be an object"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "tool"}}, "tool_choice.name is required"),
    ({"messages": [{"role": "user", "content": "x"}], "system": 5}, "system must be a string"),
    ({"messages": [{"role": "user", "content": "x"}], "output_config": {"format": {"type": "xml"}}}, "json_schema"),
])
def test_bad_anthropic_requests_are_400s_naming_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest) as info:
        anthropic_request(**fields)
    assert message in info.value.message


# -- Anthropic: answers ---------------------------------------------------------------------------------------

def test_whole_answers_validate_as_anthropic_messages() -> None:
    text = Message.model_validate(anth.openai_response_to_anthropic(WHOLE_TEXT, "coder", id="msg_1"))
    assert [b.type for b in text.content] == ["thinking", "text"] and text.content[1].text == "Hello"
    assert (text.stop_reason, text.usage.input_tokens, text.usage.output_tokens) == ("max_tokens", 12, 3)
    tool = Message.model_validate(anth.openai_response_to_anthropic(WHOLE_TOOL, "coder"))
    assert tool.stop_reason == "tool_use" and tool.content[0].type == "tool_use"
    assert (tool.content[0].id, tool.content[0].input) == ("call_1", {"city": "Paris"})


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize(("data", "whole_answer"), [(TEXT_STREAM, WHOLE_TEXT), (TOOL_STREAM, WHOLE_TOOL)],
                         ids=["text", "tool"])
def test_stream_events_validate_and_accumulate_to_the_message(data: bytes, whole_answer: dict[str, Any],
                                                              split: Split) -> None:
    events = run(anth.AnthropicStreamTranslator("coder", id="msg_1"), data, split)
    assert all(name == body["type"] for name, body in events)
    snapshot = None
    buffers: dict[int, bytes] = {}
    for name, body in events:
        if name == "ping":  # the SDK skips pings by their event name; they are not message events
            continue
        event = ANTHROPIC_EVENT.validate_python(body)
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=buffers)
    assert snapshot is not None
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
    assert names.count("content_block_start") == names.count("content_block_stop")
    if data is TEXT_STREAM:
        assert [(b.type, getattr(b, "text", None) or getattr(b, "thinking", None)) for b in snapshot.content] == [
            ("thinking", "Think."), ("text", "Hello")]
        assert (snapshot.stop_reason, snapshot.usage.input_tokens, snapshot.usage.output_tokens) == ("end_turn", 12, 3)
    else:
        assert [b.type for b in snapshot.content] == ["text", "tool_use"]
        assert (snapshot.content[1].name, snapshot.content[1].input) == ("get_weather", {"city": "Paris"})
        assert snapshot.stop_reason == "tool_use"


@pytest.mark.parametrize(("data", "message"), [
    (sse(chunk({"content": "a"}), {"error": {"message": "kv cache full", "type": "server_error"}}), "kv cache full"),
    (sse(chunk({"content": "a"}), done=False), "closed the stream before the answer was complete"),
    (b"data: {not json\n\n", "malformed stream event"),
    (sse(*llama_tool_fragments("f", "{"), chunk({"tool_calls": [{"index": 1, "id": "b", "function": {"name": "g"}}]}),
         *llama_tool_fragments("f", "}")), "interleaved the arguments of parallel tool calls"),
])
def test_upstream_failures_end_the_stream_with_an_error_event_the_sdk_raises(data: bytes, message: str) -> None:
    events = run(anth.AnthropicStreamTranslator("coder"), data, whole)
    name, body = events[-1]
    assert name == "error" and body["type"] == "error" and message in body["error"]["message"]
    assert sum(n == "error" for n, _ in events) == 1 and events[0][0] == "message_start"


def test_finish_reason_without_done_is_a_whole_answer() -> None:
    events = run(anth.AnthropicStreamTranslator("coder"), sse(chunk({"content": "a"}), chunk({}, "stop"), done=False),
                 whole)
    assert events[-1][0] == "message_stop"


def test_relay_failure_after_the_start_is_one_error_event() -> None:
    translator = anth.AnthropicStreamTranslator("coder")
    started = translator.feed(sse(chunk({"content": "a"}), done=False))
    failed = translator.fail(504, "upstream went silent")
    assert events_of(failed) == [("error", {"type": "error", "error": {"type": "timeout_error",
                                                                      "message": "upstream went silent"}})]
    assert events_of(started)[0][0] == "message_start" and translator.fail(500, "again") == []


def test_error_bodies() -> None:
    raw = b'{"error": {"message": "context length exceeded", "type": "invalid_request_error"}}'
    assert anth.openai_error_to_anthropic(raw, 400) == {
        "type": "error", "error": {"type": "invalid_request_error", "message": "context length exceeded"}}
    assert QueueFull("full").body("anthropic") == {"type": "error", "error": {"type": "overloaded_error",
                                                                               "message": "full"}}
    assert anthropic_error(502, "x")["error"]["type"] == "api_error"
    assert anthropic_error(413, "x")["error"]["type"] == "request_too_large"


# -- Anthropic through Ollama's native API: two transforms in a row -------------------------------------------

def test_chained_transform_reads_ollama_ndjson_into_anthropic_events() -> None:
    body = {"model": "coder", "max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    chat = anth.anthropic_request_to_openai(body, "up")
    transform = chained(AnthropicFromOpenAI("coder", body), OpenAIFromOllama("/v1/chat/completions", "coder", chat))
    lines = [{"model": "up", "message": {"role": "assistant", "content": "Hi"}, "done": False},
             {"model": "up", "message": {"role": "assistant", "content": "", "tool_calls": [
                 {"id": "call_9", "function": {"index": 0, "name": "f", "arguments": {"a": 1}}}]}, "done": False},
             {"model": "up", "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop",
              "prompt_eval_count": 5, "eval_count": 2}]
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    streamer = transform.streamer()
    frames = [f for piece in bytewise(data) for f in streamer.feed(piece)] + streamer.finish()
    snapshot = None
    for name, event in events_of(frames):
        if name == "ping":
            continue
        snapshot = accumulate_event(event=ANTHROPIC_EVENT.validate_python(event), current_snapshot=snapshot,
                                    json_bufs={})
    assert snapshot is not None and snapshot.stop_reason == "tool_use"
    assert [b.type for b in snapshot.content] == ["text", "tool_use"] and snapshot.content[1].input == {"a": 1}
    assert (snapshot.usage.input_tokens, snapshot.usage.output_tokens) == (5, 2)
    error = json.loads(transform.error_body(b'{"error": "model \\"x\\" not found"}', 404))
    assert error == {"type": "error", "error": {"type": "not_found_error", "message": 'model "x" not found'}}


# -- count_tokens ---------------------------------------------------------------------------------------------

def test_count_tokens_text_and_estimate() -> None:
    body = {"model": "x", "system": "Sys.", "tools": [{"name": "f", "input_schema": CITY}], "messages": [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "cold"}]}]}
    text = anth.count_tokens_text(body)
    assert text.split("\n")[:4] == ["Sys.", "Hello", 'f{"city": "Oslo"}', "cold"] and '"name": "f"' in text
    server_tool = {**body, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}
    assert "web_search_20250305" in anth.count_tokens_text(server_tool)  # counted, not refused
    assert anth.estimate_tokens("abcdefghi") == 3 and anth.estimate_tokens("") == 0


def test_tokenizer_request_and_answer_shapes() -> None:
    assert tokens.tokenize_body("/extras/tokenize/count", "m", "hi") == {"model": "m", "input": "hi"}
    assert tokens.tokenize_body("/tokenize", "m", "hi") == {"content": "hi"}
    assert tokens.read_count(b'{"count": 7}') == 7
    assert tokens.read_count(b'{"tokens": [1, 2, 3]}') == 3
    assert tokens.read_count(b"[1]") is None and tokens.read_count(b"nope") is None


# -- Responses: requests --------------------------------------------------------------------------------------

def responses_request(**fields: Any) -> dict[str, Any]:
    return resp.responses_request_to_openai({"model": "x", **fields}, "up")


def test_responses_input_items_map_to_chat_messages() -> None:
    out = responses_request(
        instructions="Be brief.", max_output_tokens=32, temperature=0.5, parallel_tool_calls=False,
        tools=[{"type": "function", "name": "get_weather", "parameters": CITY, "strict": True}],
        tool_choice={"type": "function", "name": "get_weather"}, reasoning={"effort": "low"},
        text={"format": {"type": "json_schema", "name": "w", "schema": CITY}},
        input=[{"role": "developer", "content": "Use tools."},
               {"type": "message", "role": "user", "content": [
                   {"type": "input_text", "text": "Weather here?"},
                   {"type": "input_image", "image_url": f"data:image/png;base64,{PNG}", "detail": "low"}]},
               {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Call it."}]},
               {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
               {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city":"Oslo"}'},
               {"type": "function_call_output", "call_id": "call_1", "output": "18°C"},
               {"type": "function_call_output", "call_id": "call_2",
                "output": [{"type": "input_text", "text": "4°C"}]},
               {"role": "assistant", "content": [{"type": "output_text", "text": "Paris is warmer."}]}])
    assert out == {
        "model": "up", "stream": False, "max_tokens": 32, "temperature": 0.5, "parallel_tool_calls": False,
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": CITY, "strict": True}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "reasoning_effort": "low",
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": CITY}},
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": [{"type": "text", "text": "Weather here?"}, {
                "type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "low"}}]},
            {"role": "assistant", "content": "", "reasoning_content": "Call it.", "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
                {"id": "call_2", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18°C"},
            {"role": "tool", "tool_call_id": "call_2", "content": "4°C"},
            {"role": "assistant", "content": "Paris is warmer."}]}


@pytest.mark.parametrize(("fields", "message"), [
    ({"input": "x", "previous_response_id": "resp_1"}, "keeps no conversation state"),
    ({"input": "x", "conversation": "conv_1"}, "keeps no conversation state"),
    ({"input": "x", "background": True}, "background is not supported"),
    ({"input": []}, "input must be a string or a non-empty list"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "'item_reference' is not supported"),
    ({"input": "x", "tools": [{"type": "file_search"}]}, "tool type 'file_search' is not supported"),
    ({"input": "x", "tool_choice": "sometimes"}, "tool_choice must be"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "'input_file' is not supported"),
    ({"input": [{"role": "assistant", "content": [{"type": "input_image", "image_url": "data:x"}]}]},
     "only user messages may carry images"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format.type must be"),
])
def test_bad_responses_requests_are_400s(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest) as info:
        responses_request(**fields)
    assert message in info.value.message


# -- Responses: answers ---------------------------------------------------------------------------------------

def test_whole_responses_validate_as_the_sdks_response() -> None:
    request = {"model": "x", "input": "Hi", "max_output_tokens": 3, "metadata": {"k": "v"}}
    text = Response.model_validate(resp.openai_response_to_responses(WHOLE_TEXT, "coder", request))
    assert (text.status, text.incomplete_details and text.incomplete_details.reason) == ("incomplete",
                                                                                        "max_output_tokens")
    assert text.output_text == "Hello" and [i.type for i in text.output] == ["reasoning", "message"]
    assert text.usage is not None and (text.usage.input_tokens, text.usage.output_tokens) == (12, 3)
    assert (text.model, text.max_output_tokens, text.metadata) == ("coder", 3, {"k": "v"})
    tool = Response.model_validate(resp.openai_response_to_responses(WHOLE_TOOL, "coder", request))
    assert tool.status == "completed" and tool.output[0].type == "function_call"
    assert (tool.output[0].call_id, tool.output[0].arguments) == ("call_1", '{"city": "Paris"}')


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("data", [TEXT_STREAM, TOOL_STREAM], ids=["text", "tool"])
def test_responses_stream_events_validate_and_end_with_the_whole_response(data: bytes, split: Split) -> None:
    events = run(resp.ResponsesStreamTranslator("coder", {"input": "x"}), data, split)
    parsed = [RESPONSES_EVENT.validate_python(body) for _, body in events]
    assert [e.sequence_number for e in parsed] == list(range(len(parsed)))
    assert all(name == body["type"] for name, body in events)
    final = parsed[-1]
    assert final.type == "response.completed" and parsed[0].type == "response.created"
    adds = [e for e in parsed if e.type == "response.output_item.added"]
    dones = [e for e in parsed if e.type == "response.output_item.done"]
    assert [e.output_index for e in adds] == [e.output_index for e in dones] == list(range(len(final.response.output)))
    assert [d.item.model_dump() for d in dones] == [item.model_dump() for item in final.response.output]
    if data is TEXT_STREAM:
        assert final.response.output_text == "Hello" and final.response.output[0].type == "reasoning"
        assert final.response.usage is not None and final.response.usage.total_tokens == 15
    else:
        call = final.response.output[1]
        assert call.type == "function_call" and (call.name, call.arguments) == ("get_weather", '{"city": "Paris"}')
        deltas = "".join(e.delta for e in parsed if e.type == "response.function_call_arguments.delta")
        assert deltas == call.arguments


def test_responses_stream_failure_is_error_then_failed() -> None:
    translator = resp.ResponsesStreamTranslator("coder", {"input": "x"})
    events = run(translator, sse(chunk({"content": "a"}), {"error": {"message": "boom"}}), whole)
    kinds = [RESPONSES_EVENT.validate_python(body).type for _, body in events]
    assert kinds[-2:] == ["error", "response.failed"] and events[-1][1]["response"]["error"]["message"] == "boom"


def test_responses_transform_error_body_is_openais() -> None:
    transform = ResponsesFromOpenAI("coder", {"input": "x"})
    body = json.loads(transform.error_body(b'{"detail": "Invalid API key"}', 401))
    assert body == {"error": {"message": "Invalid API key", "type": "authentication_error", "param": None,
                              "code": None}}


# -- fitting OpenAI bodies, routing --------------------------------------------------------------------------

def test_fit_for_a_server_without_json_schema_or_null_content() -> None:
    body = {"messages": [{"role": "assistant", "content": None, "tool_calls": []}, {"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": CITY}}}
    fitted = openai_compat.fit(body, json_schema_format=False, null_content=False)
    assert fitted["response_format"] == {"type": "json_object", "schema": CITY}
    assert fitted["messages"][0]["content"] == "" and body["messages"][0]["content"] is None  # not mutated
    assert openai_compat.fit(body, json_schema_format=True, null_content=True) is body
    plain = {"messages": [{"role": "user", "content": "x"}]}
    assert openai_compat.fit(plain, json_schema_format=False, null_content=False) is plain


def test_has_images() -> None:
    assert openai_compat.has_images({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    assert not openai_compat.has_images({"messages": [{"role": "user", "content": "x"}]})


@pytest.mark.parametrize(("path", "dialect"), [
    ("/v1/messages", "anthropic"), ("/v1/messages/count_tokens", "anthropic"), ("/v1/responses", "openai"),
    ("/v1/messagesx", "openai"), ("/api/chat", "ollama")])
def test_dialect_of(path: str, dialect: str) -> None:
    assert routing.dialect_of(path) == dialect
    assert anthropic.__name__  # the SDK these shapes are checked against is installed
