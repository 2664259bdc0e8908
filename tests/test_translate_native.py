"""warmpool.dialects.openai_from_ollama: OpenAI requests served through Ollama's native API, fed payloads shaped
like Ollama emits them and checked against the official `openai` SDK's models and stream reader."""

from __future__ import annotations

import base64
import importlib
import itertools
import json
import struct
import time
from typing import Any

import openai
import pytest
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.splits import Split, bytewise, sized, whole
from warmpool.dialects import openai_from_ollama as native
from warmpool.dialects.openai_from_ollama import OpenAIStreamTranslator
from warmpool.errors import BadRequest

MODEL = "coder"  # the client-facing name
UPSTREAM = "qwen2.5-coder:7b"
CREATED_AT = "2026-11-22T10:00:00.123456789Z"
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
DEFAULTS = {"temperature": 1.0, "top_p": 1.0}
# openai ≥ 3 builds on the httpx2 fork, older releases on httpx; both have MockTransport
http: Any = importlib.import_module("httpx2" if importlib.util.find_spec("httpx2") else "httpx")


def table(rows: list[tuple[Any, ...]]) -> list[Any]:
    """Parametrize rows whose first item names the case."""
    return [pytest.param(*row[1:], id=row[0]) for row in rows]


# ---------------------------------------------------------------------------------------------------
# fixtures: Ollama NDJSON as /api/chat and /api/generate stream it


METRICS = {"total_duration": 5_043_500_667, "load_duration": 5_025_959, "prompt_eval_count": 26,
           "prompt_eval_duration": 325_953_000, "eval_count": 3, "eval_duration": 1_533_000}


def chat_line(content: str = "", *, done: bool = False, reason: str | None = "stop",
              **message: Any) -> dict[str, Any]:
    line: dict[str, Any] = {"model": UPSTREAM, "created_at": CREATED_AT,
                            "message": {"role": "assistant", "content": content, **message}, "done": done}
    return line | ({"done_reason": reason} | METRICS if done else {})


def generate_line(response: str = "", *, done: bool = False, reason: str | None = "stop") -> dict[str, Any]:
    line: dict[str, Any] = {"model": UPSTREAM, "created_at": CREATED_AT, "response": response, "done": done}
    return line | ({"done_reason": reason, "context": [1, 2, 3]} | METRICS if done else {})


def ndjson(*lines: dict[str, Any] | str) -> bytes:
    return b"".join((line if isinstance(line, str) else json.dumps(line)).encode() + b"\n" for line in lines)


def chat_stream(*pieces: str, reason: str | None = "stop") -> bytes:
    return ndjson(*[chat_line(p) for p in pieces], chat_line(done=True, reason=reason))


WEATHER_CALL = {"id": "call_k3j2x9", "function": {"index": 0, "name": "get_weather",
                                                  "arguments": {"city": "Paris", "unit": "celsius"}}}
TIME_CALL = {"function": {"index": 1, "name": "get_time", "arguments": {"tz": "Europe/Paris"}}}





def mid_line(data: bytes) -> list[bytes]:
    """Cut every line twice: right after its opening brace and in its middle."""
    starts = [0, *[i + 1 for i, byte in enumerate(data) if byte == ord("\n")]][:-1]
    ends = [*starts[1:], len(data)]
    cuts = sorted({s + 1 for s in starts} | {(s + e) // 2 for s, e in zip(starts, ends, strict=True)})
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


def crlf(data: bytes) -> list[bytes]:
    return sized(5)(data.replace(b"\n", b"\r\n"))


SPLITS = [whole, bytewise, sized(3), sized(7), sized(64), mid_line, crlf]


def run(translator: OpenAIStreamTranslator, data: bytes, split: Split = whole,
        *, finish: bool = True) -> list[Any]:
    """Frames the translator yields for `data` cut by `split`: parsed JSON, or the string "[DONE]"."""
    frames: list[bytes] = []
    for piece in split(data):
        frames += translator.feed(piece)
    if finish:
        frames += translator.finish()
    return parse(frames)


def parse(frames: list[bytes]) -> list[Any]:
    assert all(f.startswith(b"data: ") and f.endswith(b"\n\n") and f.count(b"\n") == 2 for f in frames)
    payloads = [f[len(b"data: "):-2].decode() for f in frames]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


def deltas(frames: list[Any]) -> list[dict[str, Any]]:
    return [f["choices"][0]["delta"] for f in frames if isinstance(f, dict) and f.get("choices")]


def chat_text(frames: list[Any]) -> str:
    return "".join(d.get("content") or "" for d in deltas(frames))


# ---------------------------------------------------------------------------------------------------
# requests


def req(path: str, body: Any, options: dict[str, Any] | None = None,
        keep_alive: float = -1) -> tuple[str, dict[str, Any]]:
    return native.openai_request_to_ollama(path, body, UPSTREAM, options or {}, keep_alive)


USER = [{"role": "user", "content": "hi"}]

REQUEST_CASES: list[tuple[str, str, dict[str, Any], str, dict[str, Any]]] = [
    ("chat: OpenAI does not stream unless told; OpenAI's sampling defaults",
     "/v1/chat/completions", {"model": MODEL, "messages": USER},
     "/api/chat",
     {"model": UPSTREAM, "messages": USER, "stream": False, "options": DEFAULTS, "keep_alive": -1}),
    ("chat: sampling fields become options",
     "/v1/chat/completions",
     {"model": MODEL, "messages": USER, "stream": True, "stream_options": {"include_usage": True},
      "temperature": 0.2, "top_p": 0.9, "seed": 7.0, "max_tokens": 128, "stop": ["</s>", "###"],
      "frequency_penalty": 0.25, "presence_penalty": 0.5, "user": "u-1", "logit_bias": {}},
     "/api/chat",
     {"model": UPSTREAM, "messages": USER, "stream": True, "keep_alive": -1,
      "options": {"temperature": 0.2, "top_p": 0.9, "seed": 7, "num_predict": 128, "stop": ["</s>", "###"],
                  "frequency_penalty": 0.25, "presence_penalty": 0.5}}),
    ("chat: max_completion_tokens wins over max_tokens; a stop string becomes a list",
     "/v1/chat/completions",
     {"model": MODEL, "messages": USER, "max_completion_tokens": 64, "max_tokens": 999, "stop": "\n"},
     "/api/chat",
     {"model": UPSTREAM, "messages": USER, "stream": False, "keep_alive": -1,
      "options": DEFAULTS | {"num_predict": 64, "stop": ["\n"]}}),
    ("chat: null fields are absent fields",
     "/v1/chat/completions",
     {"model": MODEL, "messages": USER, "temperature": None, "max_tokens": None, "stop": None,
      "response_format": None, "tools": None, "n": None, "stream": None},
     "/api/chat",
     {"model": UPSTREAM, "messages": USER, "stream": False, "options": DEFAULTS, "keep_alive": -1}),
    ("chat: roles lower-cased, developer is system, null content is empty",
     "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "Developer", "content": "be brief"},
                                   {"role": "user", "content": None, "name": "alice"}]},
     "/api/chat",
     {"model": UPSTREAM, "messages": [{"role": "system", "content": "be brief"},
                                      {"role": "user", "content": ""}],
      "stream": False, "options": DEFAULTS, "keep_alive": -1}),
    ("chat: content parts, text joined, data URL images in base64",
     "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": [
         {"type": "text", "text": "What is in this image?"},
         {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "low"}},
         {"type": "text", "text": "Answer in French."},
         {"type": "image_url", "image_url": f"data:;base64,{PNG}"}]}]},
     "/api/chat",
     {"model": UPSTREAM, "messages": [{"role": "user", "content": "What is in this image?\nAnswer in French.",
                                       "images": [PNG, PNG]}],
      "stream": False, "options": DEFAULTS, "keep_alive": -1}),
    ("chat: json_object is format json",
     "/v1/chat/completions",
     {"model": MODEL, "messages": USER, "response_format": {"type": "json_object"}},
     "/api/chat",
     {"model": UPSTREAM, "messages": USER, "format": "json", "stream": False, "options": DEFAULTS,
      "keep_alive": -1}),
    ("chat: json_schema is format = the schema",
     "/v1/chat/completions",
     {"model": MODEL, "messages": USER, "response_format": {"type": "json_schema", "json_schema": {
         "name": "person", "strict": True,
         "schema": {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}}}},
     "/api/chat",
     {"model": UPSTREAM, "messages": USER, "stream": False, "options": DEFAULTS, "keep_alive": -1,
      "format": {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}}),
    ("chat: text response_format is no format",
     "/v1/chat/completions", {"model": MODEL, "messages": USER, "response_format": {"type": "text"}},
     "/api/chat",
     {"model": UPSTREAM, "messages": USER, "stream": False, "options": DEFAULTS, "keep_alive": -1}),
    ("chat: reasoning_effort is think",
     "/v1/chat/completions", {"model": MODEL, "messages": USER, "reasoning_effort": "high"},
     "/api/chat",
     {"model": UPSTREAM, "messages": USER, "think": "high", "stream": False, "options": DEFAULTS,
      "keep_alive": -1}),
    ("chat: reasoning.effort none turns thinking off",
     "/v1/chat/completions", {"model": MODEL, "messages": USER, "reasoning": {"effort": "none"}},
     "/api/chat",
     {"model": UPSTREAM, "messages": USER, "think": False, "stream": False, "options": DEFAULTS,
      "keep_alive": -1}),
    ("chat: tool_choice none withholds the tools",
     "/v1/chat/completions",
     {"model": MODEL, "messages": USER, "tool_choice": "none",
      "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
     "/api/chat",
     {"model": UPSTREAM, "messages": USER, "stream": False, "options": DEFAULTS, "keep_alive": -1}),
    ("completions: raw, the prompt as-is",
     "/v1/completions",
     {"model": MODEL, "prompt": "<|im_start|>user\nhi<|im_end|>\n", "max_tokens": 16, "stream": True,
      "echo": False, "logprobs": None},
     "/api/generate",
     {"model": UPSTREAM, "prompt": "<|im_start|>user\nhi<|im_end|>\n", "raw": True, "stream": True,
      "options": DEFAULTS | {"num_predict": 16}, "keep_alive": -1}),
    ("completions: a list of one prompt, as the SDK sends a batch of one",
     "/v1/completions", {"model": MODEL, "prompt": ["Once upon a time"], "temperature": 0},
     "/api/generate",
     {"model": UPSTREAM, "prompt": "Once upon a time", "raw": True, "stream": False,
      "options": {"temperature": 0, "top_p": 1.0}, "keep_alive": -1}),
    ("completions: a suffix is fill-in-middle through the model's template",
     "/v1/completions", {"model": MODEL, "prompt": "def add(a, b):\n", "suffix": "\n    return c"},
     "/api/generate",
     {"model": UPSTREAM, "prompt": "def add(a, b):\n", "suffix": "\n    return c", "stream": False,
      "options": DEFAULTS, "keep_alive": -1}),
    ("embeddings: a string",
     "/v1/embeddings", {"model": MODEL, "input": "hello", "encoding_format": "float"},
     "/api/embed", {"model": UPSTREAM, "input": "hello", "keep_alive": -1}),
    ("embeddings: a list with dimensions",
     "/v1/embeddings", {"model": MODEL, "input": ["a", "b"], "dimensions": 256, "encoding_format": "base64"},
     "/api/embed", {"model": UPSTREAM, "input": ["a", "b"], "dimensions": 256, "keep_alive": -1}),
    ("embeddings: an empty string is a list of one, not a load request",
     "/v1/embeddings", {"model": MODEL, "input": ""},
     "/api/embed", {"model": UPSTREAM, "input": [""], "keep_alive": -1}),
]


@pytest.mark.parametrize(("path", "body", "want_path", "want"), table(REQUEST_CASES))
def test_request_translation(path: str, body: dict[str, Any], want_path: str, want: dict[str, Any]) -> None:
    assert req(path, body) == (want_path, want)


CONFIGURED = {"num_ctx": 8192, "num_gpu": 99, "temperature": 0.6, "top_p": 0.95, "seed": 42}

OPTION_CASES: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    ("chat", "/v1/chat/completions",
     {"messages": USER, "temperature": 0.2, "max_tokens": 50, "seed": 1, "presence_penalty": 0.5},
     CONFIGURED | {"num_predict": 50, "presence_penalty": 0.5}),
    ("completions", "/v1/completions", {"prompt": "x", "top_p": 0.5, "stop": "x"},
     CONFIGURED | {"stop": ["x"]}),
    ("chat with OpenAI's defaults", "/v1/chat/completions", {"messages": USER},
     CONFIGURED),
]


@pytest.mark.parametrize(("path", "body", "want"), table(OPTION_CASES))
def test_configured_options_win_over_the_clients(path: str, body: dict[str, Any],
                                                 want: dict[str, Any]) -> None:
    # load-time options must reach Ollama exactly as the preload sent them, or Ollama reloads the model;
    # what the client asked for and nothing configured overrides still applies
    _, out = req(path, body, CONFIGURED, keep_alive=1800.0)
    assert (out["options"], out["keep_alive"]) == (want, 1800.0)


def test_embeddings_carry_the_configured_options() -> None:
    # /api/embed reloads on a num_ctx mismatch too (ollama#6148)
    _, out = req("/v1/embeddings", {"input": "x"}, {"num_ctx": 8192}, keep_alive=300)
    assert out == {"model": UPSTREAM, "input": "x", "options": {"num_ctx": 8192}, "keep_alive": 300}


def test_configured_options_are_not_mutated() -> None:
    configured = {"num_ctx": 8192}
    _, out = req("/v1/chat/completions", {"messages": USER, "max_tokens": 5}, configured)
    out["options"]["extra"] = 1
    assert configured == {"num_ctx": 8192}


def test_tool_conversation() -> None:
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    messages = [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18°C"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "4°C"}]},
        {"role": "tool", "tool_call_id": "call_unknown", "content": "?"},
        {"role": "tool", "tool_call_id": "call_9", "name": "legacy_name", "content": "!"},
    ]
    path, body = req("/v1/chat/completions", {"messages": messages, "tools": tools, "tool_choice": "auto"})
    assert path == "/api/chat"
    assert body["tools"] == tools
    assert body["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"id": "call_2", "function": {"name": "get_weather", "arguments": {}}}]}
    assert body["messages"][2:] == [
        {"role": "tool", "content": "18°C", "tool_call_id": "call_1", "tool_name": "get_weather"},
        {"role": "tool", "content": "4°C", "tool_call_id": "call_2", "tool_name": "get_weather"},
        {"role": "tool", "content": "?", "tool_call_id": "call_unknown"},
        {"role": "tool", "content": "!", "tool_call_id": "call_9", "tool_name": "legacy_name"}]


def test_tool_names_come_from_earlier_turns_only() -> None:
    messages = [
        {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "first", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "1"},
        {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "second", "arguments": {}}}]},
        {"role": "tool", "tool_call_id": "c", "content": "2"},
    ]
    _, body = req("/v1/chat/completions", {"messages": messages})
    assert [m.get("tool_name") for m in body["messages"]] == [None, "first", None, "second"]


def test_assistant_reasoning_is_passed_back_as_thinking() -> None:
    messages = [*USER, {"role": "assistant", "content": "42", "reasoning": "6 * 7"}, *USER]
    _, body = req("/v1/chat/completions", {"messages": messages})
    assert body["messages"][1] == {"role": "assistant", "content": "42", "thinking": "6 * 7"}


def test_request_body_is_not_mutated() -> None:
    body = {"model": MODEL, "messages": [{"role": "USER", "content": [
        {"type": "text", "text": "x"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]}],
        "stop": "x", "max_tokens": 3}
    before = json.dumps(body)
    req("/v1/chat/completions", body, {"num_ctx": 4096})
    assert json.dumps(body) == before


def test_path_table() -> None:
    assert native.OPENAI_TO_OLLAMA_PATH == {"/v1/chat/completions": "/api/chat",
                                            "/v1/completions": "/api/generate",
                                            "/v1/embeddings": "/api/embed"}
    assert all(req(path, {"messages": USER, "prompt": "x", "input": "x"})[0] == want
               for path, want in native.OPENAI_TO_OLLAMA_PATH.items())


@pytest.mark.parametrize(("body", "want"), [
    ({"stream": True, "stream_options": {"include_usage": True}}, True),
    ({"stream": True, "stream_options": {"include_usage": False}}, False),
    ({"stream": True, "stream_options": None}, False),
    ({"stream": True}, False),
])
def test_wants_usage(body: dict[str, Any], want: bool) -> None:
    assert native.wants_usage(body) is want


CHAT = "/v1/chat/completions"
BAD_REQUESTS: list[tuple[str, str, Any, str]] = [
    ("unknown path", "/v1/responses", {"input": "x"}, "/v1/responses cannot be translated"),
    ("body not an object", CHAT, ["x"], "request body must be a JSON object"),
    ("messages missing", CHAT, {}, "messages must not be empty"),
    ("messages empty", CHAT, {"messages": []}, "messages must not be empty"),
    ("messages not a list", CHAT, {"messages": "hi"}, "messages must be a list"),
    ("message not an object", CHAT, {"messages": ["hi"]}, "messages[0] must be an object"),
    ("role missing", CHAT, {"messages": [{"content": "x"}]}, "messages[0].role is required"),
    ("content of the wrong type", CHAT, {"messages": [{"role": "user", "content": 5}]},
     "messages[0].content must be a string or a list of content parts"),
    ("content part not an object", CHAT, {"messages": [{"role": "user", "content": ["x"]}]},
     "messages[0].content[0] must be an object"),
    ("content part of an unknown type", CHAT,
     {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "messages[0].content[0].type must be \"text\" or \"image_url\", not 'input_audio'"),
    ("text part text not a string", CHAT,
     {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
     "messages[0].content[0].text must be a string"),
    ("remote image URL", CHAT,
     {"messages": [{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "https://example.com/cat.png"}}]}]},
     "messages[0].content[0].image_url: remote image URLs are not supported"),
    ("data URL that is not base64", CHAT,
     {"messages": [{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "data:image/svg+xml,<svg/>"}}]}]},
     "messages[0].content[0].image_url must be a base64 data: URL"),
    ("image_url without a url", CHAT,
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].image_url must be a base64 data: URL"),
    ("tool call without function", CHAT,
     {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]}]},
     "messages[0].tool_calls[0].function must be an object"),
    ("tool call without a name", CHAT,
     {"messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]},
     "messages[0].tool_calls[0].function.name is required"),
    ("tool call arguments not JSON", CHAT,
     {"messages": [{"role": "assistant",
                    "tool_calls": [{"function": {"name": "f", "arguments": "{city:"}}]}]},
     "messages[0].tool_calls[0].function.arguments must be a JSON object encoded as a string"),
    ("tool call arguments a JSON list", CHAT,
     {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}]},
     "messages[0].tool_calls[0].function.arguments must be a JSON object"),
    ("tool_call_id not a string", CHAT, {"messages": [{"role": "tool", "tool_call_id": 3, "content": "x"}]},
     "messages[0].tool_call_id must be a string"),
    ("tools not a list", CHAT, {"messages": USER, "tools": {"type": "function"}}, "tools must be a list"),
    ("tool not an object", CHAT, {"messages": USER, "tools": ["f"]}, "tools[0] must be an object"),
    ("stream not a boolean", CHAT, {"messages": USER, "stream": "yes"}, "stream must be a boolean"),
    ("temperature not a number", CHAT, {"messages": USER, "temperature": "hot"},
     "temperature must be a number"),
    ("boolean is not a number", CHAT, {"messages": USER, "seed": True}, "seed must be a number"),
    ("max_tokens not a number", CHAT, {"messages": USER, "max_tokens": "10"}, "max_tokens must be a number"),
    ("stop of the wrong type", CHAT, {"messages": USER, "stop": [1]},
     "stop must be a string or a list of strings"),
    ("several choices", CHAT, {"messages": USER, "n": 2}, "n must be 1"),
    ("response_format not an object", CHAT, {"messages": USER, "response_format": "json"},
     "response_format must be an object"),
    ("response_format of an unknown type", CHAT, {"messages": USER, "response_format": {"type": "yaml"}},
     'response_format.type must be "text", "json_object" or "json_schema"'),
    ("json_schema without a schema", CHAT,
     {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema must be an object"),
    ("unknown reasoning effort", CHAT, {"messages": USER, "reasoning_effort": "extreme"},
     'reasoning_effort must be "low", "medium", "high" or "none"'),
    ("prompt missing", "/v1/completions", {}, "prompt must be a string or a list of one string"),
    ("prompt empty", "/v1/completions", {"prompt": ""}, "prompt must not be empty"),
    ("prompt token ids", "/v1/completions", {"prompt": [1, 2, 3]},
     "token ids and batches are not supported"),
    ("prompt batch", "/v1/completions", {"prompt": ["a", "b"]}, "token ids and batches are not supported"),
    ("suffix not a string", "/v1/completions", {"prompt": "a", "suffix": 1}, "suffix must be a string"),
    ("several completions", "/v1/completions", {"prompt": "a", "n": 3}, "n must be 1"),
    ("embeddings token ids", "/v1/embeddings", {"input": [1, 2]}, "input as token ids is not supported"),
    ("embeddings token id batches", "/v1/embeddings", {"input": [[1, 2], [3]]},
     "input as token ids is not supported"),
    ("embeddings input missing", "/v1/embeddings", {}, "input must be a string or a non-empty list"),
    ("embeddings input empty list", "/v1/embeddings", {"input": []},
     "input must be a string or a non-empty list"),
    ("embeddings input object", "/v1/embeddings", {"input": {"text": "x"}},
     "input must be a string or a non-empty list"),
    ("embeddings dimensions not a number", "/v1/embeddings", {"input": "x", "dimensions": "256"},
     "dimensions must be a number"),
    ("embeddings unknown encoding", "/v1/embeddings", {"input": "x", "encoding_format": "int8"},
     'encoding_format must be "float" or "base64"'),
]


@pytest.mark.parametrize(("path", "body", "message"), table(BAD_REQUESTS))
def test_bad_requests(path: str, body: Any, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        req(path, body)
    assert message in info.value.message
    assert info.value.status == 400
    assert info.value.openai_body()["error"]["type"] == "invalid_request_error"


# ---------------------------------------------------------------------------------------------------
# streaming


@pytest.mark.parametrize("split", SPLITS)
def test_chat_stream_any_chunking(split: Split) -> None:
    translator = OpenAIStreamTranslator("chat", MODEL, created=1_790_000_000, id="chatcmpl-fixed")
    frames = run(translator, chat_stream("Bonjour", " le monde", " — ça va? 🌍"), split)
    assert translator.done
    assert frames[-1] == "[DONE]" and frames.count("[DONE]") == 1
    chunks = frames[:-1]
    assert deltas(chunks) == [{"role": "assistant", "content": ""}, {"content": "Bonjour"},
                              {"content": " le monde"}, {"content": " — ça va? 🌍"}, {}]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, None, "stop"]
    for chunk in chunks:
        assert (chunk["id"], chunk["created"], chunk["model"]) == ("chatcmpl-fixed", 1_790_000_000, MODEL)
        assert (chunk["object"], chunk["system_fingerprint"]) == ("chat.completion.chunk", "fp_ollama")
        assert "usage" not in chunk
        ChatCompletionChunk.model_validate(chunk)


def test_finish_reads_a_last_line_without_newline() -> None:
    translator = OpenAIStreamTranslator("chat", MODEL)
    fed = parse(translator.feed(chat_stream("a", "b", "c").rstrip(b"\n")))
    assert chat_text(fed) == "abc" and not translator.done
    assert parse(translator.finish())[-1] == "[DONE]"


@pytest.mark.parametrize("split", [whole, bytewise, mid_line])
def test_usage_chunk(split: Split) -> None:
    translator = OpenAIStreamTranslator("chat", MODEL, include_usage=True)
    frames = run(translator, chat_stream("Hi", "!"), split)
    usage_chunk = frames[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 26, "completion_tokens": 3, "total_tokens": 29}
    assert usage_chunk["id"] == frames[0]["id"] == translator.id
    ChatCompletionChunk.model_validate(usage_chunk)
    assert frames[-3]["choices"][0]["finish_reason"] == "stop"


def test_usage_chunk_without_metrics_counts_zero() -> None:
    data = ndjson(chat_line("x"), {"model": UPSTREAM, "message": {"role": "assistant", "content": ""},
                                   "done": True, "done_reason": "stop"})
    frames = run(OpenAIStreamTranslator("chat", MODEL, include_usage=True), data)
    assert frames[-2]["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


@pytest.mark.parametrize(("reason", "want"), [("stop", "stop"), ("length", "length"), ("", "stop"),
                                              ("load", "stop"), (None, "stop")])
def test_finish_reasons(reason: str | None, want: str) -> None:
    frames = run(OpenAIStreamTranslator("chat", MODEL), chat_stream("a", reason=reason))
    assert frames[-2]["choices"][0]["finish_reason"] == want
    ChatCompletionChunk.model_validate(frames[-2])


TOOL_STREAMS: list[tuple[str, bytes]] = [
    # Ollama ≥ 0.8 sends parsed calls as soon as they are complete, before the done line
    ("calls before the done line",
     ndjson(chat_line(tool_calls=[WEATHER_CALL]), chat_line(tool_calls=[TIME_CALL]), chat_line(done=True))),
    # older builds (and stream:false collected into one line) put them in the final message
    ("calls in the done line", ndjson(chat_line(done=True, tool_calls=[WEATHER_CALL, TIME_CALL]))),
]


@pytest.mark.parametrize("split", [whole, bytewise, mid_line])
@pytest.mark.parametrize("data", table(TOOL_STREAMS))
def test_tool_call_stream(data: bytes, split: Split) -> None:
    translator = OpenAIStreamTranslator("chat", MODEL)
    frames = run(translator, data, split)
    calls = [c for d in deltas(frames) for c in d.get("tool_calls", [])]
    assert [c["index"] for c in calls] == [0, 1]
    assert calls[0] == {"index": 0, "id": "call_k3j2x9", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    assert json.loads(calls[1]["function"]["arguments"]) == {"tz": "Europe/Paris"}
    assert calls[1]["id"].startswith("call_") and len(calls[1]["id"]) > len("call_")
    assert frames[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": "tool_calls"}
    for chunk in frames[:-1]:
        ChatCompletionChunk.model_validate(chunk)
    assert repr(translator).endswith("tool_calls=2 finish_reason=tool_calls done=True>")


def test_tool_call_with_text_and_string_arguments() -> None:
    call = {"function": {"name": "f", "arguments": '{"x": 1}'}}
    frames = run(OpenAIStreamTranslator("chat", MODEL), ndjson(chat_line("Let me check."),
                                                               chat_line(tool_calls=[call]),
                                                               chat_line(done=True)))
    assert deltas(frames)[1] == {"content": "Let me check."}
    assert deltas(frames)[2]["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x": 1}'}


def test_thinking_becomes_reasoning_deltas() -> None:
    data = ndjson(chat_line(thinking="Let me think."), chat_line("42"), chat_line(done=True))
    frames = run(OpenAIStreamTranslator("chat", MODEL), data)
    assert deltas(frames)[1:3] == [{"reasoning": "Let me think."}, {"content": "42"}]
    for chunk in frames[:-1]:
        ChatCompletionChunk.model_validate(chunk)


def test_text_on_the_done_line_is_not_lost() -> None:
    frames = run(OpenAIStreamTranslator("chat", MODEL), ndjson(chat_line("a"), chat_line("b", done=True)))
    assert deltas(frames)[1:] == [{"content": "a"}, {"content": "b"}, {}]


@pytest.mark.parametrize("split", SPLITS)
def test_completion_stream(split: Split) -> None:
    data = ndjson(generate_line("def"), generate_line(" add"), generate_line("(a, b)"),
                  generate_line(done=True, reason="length"))
    translator = OpenAIStreamTranslator("completion", MODEL, include_usage=True, id="cmpl-fixed")
    frames = run(translator, data, split)
    assert frames[-1] == "[DONE]"
    texts = [f["choices"][0] for f in frames[:-2]]
    assert [(c["text"], c["finish_reason"]) for c in texts] == [
        ("def", None), (" add", None), ("(a, b)", None), ("", "length")]
    for frame in frames[:-1]:
        assert (frame["object"], frame["id"], frame["model"]) == ("text_completion", "cmpl-fixed", MODEL)
        assert "delta" not in str(frame)
    # the SDK reads completion chunks as Completion, whose finish_reason may not be null
    Completion.model_validate(frames[-3])
    Completion.model_validate(frames[-2])
    assert frames[-2]["usage"] == {"prompt_tokens": 26, "completion_tokens": 3, "total_tokens": 29}


def test_default_ids_and_created() -> None:
    chat = OpenAIStreamTranslator("chat", MODEL)
    completion = OpenAIStreamTranslator("completion", MODEL)
    assert chat.id.startswith("chatcmpl-") and completion.id.startswith("cmpl-")
    assert chat.id != OpenAIStreamTranslator("chat", MODEL).id
    frames = run(chat, chat_stream("x"))
    assert abs(frames[0]["created"] - time.time()) < 60


def test_unknown_kind() -> None:
    with pytest.raises(ValueError):
        OpenAIStreamTranslator("embed", MODEL)
    with pytest.raises(ValueError):
        native.ollama_response_to_openai("generate", MODEL, {})


AFTER = ndjson(chat_line("after"), chat_line(done=True))

ERROR_STREAMS: list[tuple[str, bytes, str]] = [
    # what Ollama writes when a runner fails mid-generation (HTTP status stays 200)
    ("error after some text", ndjson(chat_line("partial"), {"error": "llama runner process has terminated"})
     + AFTER, "llama runner process has terminated"),
    ("error as the first line", ndjson({"error": "model requires more system memory"}) + AFTER,
     "model requires more system memory"),
    ("malformed json", ndjson(chat_line("a")) + b"{not json\n" + AFTER, "malformed stream line"),
    ("json that is not an object", ndjson(chat_line("a")) + b"[1, 2]\n" + AFTER,
     "malformed stream line: b'[1, 2]'"),
    ("closed before done", ndjson(chat_line("a"), chat_line("b")), "upstream closed the stream before"),
    ("closed mid-line", ndjson(chat_line("a")) + b'{"model":"x","mess', "malformed stream line"),
]


@pytest.mark.parametrize("split", [whole, bytewise])
@pytest.mark.parametrize(("data", "message"), table(ERROR_STREAMS))
def test_upstream_errors_end_the_stream(data: bytes, message: str, split: Split) -> None:
    translator = OpenAIStreamTranslator("chat", MODEL)
    frames = run(translator, data, split)
    assert translator.done
    assert "[DONE]" not in frames  # as llama-server does; the OpenAI SDKs raise on the error event
    error = frames[-1]
    assert set(error) == {"error"} and message in error["error"]["message"]
    assert error["error"] | {"message": ""} == {"message": "", "type": "api_error", "param": None,
                                                 "code": None}
    assert all("error" not in f for f in frames[:-1])
    assert "after" not in chat_text(frames)


def test_nothing_after_the_end() -> None:
    translator = OpenAIStreamTranslator("chat", MODEL)
    run(translator, chat_stream("a"), finish=False)
    assert translator.done
    assert translator.feed(ndjson({"error": "late"}, chat_line("late"))) == []
    assert translator.finish() == []


def test_finish_on_an_empty_stream_reports_the_cut() -> None:
    frames = run(OpenAIStreamTranslator("completion", MODEL), b"")
    assert len(frames) == 1 and "before the answer was complete" in frames[0]["error"]["message"]


# ---------------------------------------------------------------------------------------------------
# non-streamed responses and embeddings


NON_STREAM_CASES: list[tuple[str, str, dict[str, Any], dict[str, Any], str]] = [
    ("chat", "chat", chat_line("Hello!", done=True),
     {"role": "assistant", "content": "Hello!"}, "stop"),
    ("chat cut by num_predict", "chat", chat_line("Once upon", done=True, reason="length"),
     {"role": "assistant", "content": "Once upon"}, "length"),
    ("chat with thinking", "chat", chat_line("42", done=True, thinking="6 * 7"),
     {"role": "assistant", "content": "42", "reasoning": "6 * 7"}, "stop"),
    ("chat with tool calls", "chat", chat_line(done=True, tool_calls=[WEATHER_CALL]),
     {"role": "assistant", "content": "", "tool_calls": [
         {"id": "call_k3j2x9", "type": "function",
          "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
     "tool_calls"),
]


@pytest.mark.parametrize(("kind", "resp", "message", "finish"), table(NON_STREAM_CASES))
def test_non_streamed_chat(kind: str, resp: dict[str, Any], message: dict[str, Any], finish: str) -> None:
    out = native.ollama_response_to_openai(kind, MODEL, resp, created=1_790_000_000, id="chatcmpl-x")
    assert out == {"id": "chatcmpl-x", "object": "chat.completion", "created": 1_790_000_000, "model": MODEL,
                   "system_fingerprint": "fp_ollama",
                   "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                   "usage": {"prompt_tokens": 26, "completion_tokens": 3, "total_tokens": 29}}
    ChatCompletion.model_validate(out)


@pytest.mark.parametrize(("reason", "want"), [("stop", "stop"), ("length", "length"), (None, "stop")])
def test_non_streamed_completion(reason: str | None, want: str) -> None:
    resp = generate_line("    return a + b", done=True, reason=reason)
    out = native.ollama_response_to_openai("completion", MODEL, resp)
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert out["choices"] == [{"index": 0, "text": "    return a + b", "logprobs": None,
                               "finish_reason": want}]
    assert out["usage"]["total_tokens"] == 29
    Completion.model_validate(out)


def test_non_streamed_response_tolerates_a_sparse_body() -> None:
    out = native.ollama_response_to_openai("chat", MODEL, {"done": True})
    assert out["choices"][0]["message"] == {"role": "assistant", "content": ""}
    assert out["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    ChatCompletion.model_validate(out)


EMBED: dict[str, Any] = {
    "model": UPSTREAM,
    "embeddings": [[0.010071029, -0.0017594862, 0.05007221], [-0.0098027075, 0.06042469, 0.025695015]],
    "total_duration": 14143917, "load_duration": 1019500, "prompt_eval_count": 8}


def test_embeddings_as_floats() -> None:
    out = native.ollama_embed_to_openai(MODEL, EMBED)
    assert out == {"object": "list", "model": MODEL, "usage": {"prompt_tokens": 8, "total_tokens": 8},
                   "data": [{"object": "embedding", "embedding": EMBED["embeddings"][0], "index": 0},
                            {"object": "embedding", "embedding": EMBED["embeddings"][1], "index": 1}]}
    CreateEmbeddingResponse.model_validate(out)
    assert native.ollama_embed_to_openai(MODEL, EMBED, encoding_format="FLOAT") == out


def test_embeddings_as_base64_float32() -> None:
    out = native.ollama_embed_to_openai(MODEL, EMBED, encoding_format="base64")
    encoded = out["data"][1]["embedding"]
    decoded = struct.unpack("<3f", base64.b64decode(encoded))
    assert decoded == pytest.approx(EMBED["embeddings"][1], rel=1e-6)


def test_embeddings_tolerate_a_sparse_body() -> None:
    out = native.ollama_embed_to_openai(MODEL, {"embeddings": [[1.0], None]})
    assert (out["data"], out["usage"]) == ([{"object": "embedding", "embedding": [1.0], "index": 0}],
                                           {"prompt_tokens": 0, "total_tokens": 0})


# ---------------------------------------------------------------------------------------------------
# the official SDK reads what we produce


def sdk_client(body: bytes, content_type: str, *, strict: bool = False) -> openai.OpenAI:
    """An SDK client whose every request is answered with `body`; `strict` validates responses."""
    def handler(request: Any) -> Any:
        return http.Response(200, headers={"content-type": content_type}, content=body)
    return openai.OpenAI(api_key="sk-test", base_url="http://warmpool.test/v1", max_retries=0,
                         http_client=http.Client(transport=http.MockTransport(handler)),
                         _strict_response_validation=strict)


def translated(translator: OpenAIStreamTranslator, data: bytes) -> bytes:
    return b"".join(translator.feed(data) + translator.finish())


def test_sdk_reads_a_chat_stream_with_tool_calls_and_usage() -> None:
    data = ndjson(chat_line("Checking"), chat_line(tool_calls=[WEATHER_CALL, TIME_CALL]),
                  chat_line(done=True))
    sse = translated(OpenAIStreamTranslator("chat", MODEL, include_usage=True), data)
    client = sdk_client(sse, "text/event-stream", strict=True)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Checking"
    names = [t.function.name for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []
             if t.function]
    assert names == ["get_weather", "get_time"]
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 29


def test_sdk_raises_on_a_mid_stream_error() -> None:
    data = ndjson(chat_line("par"), {"error": "runner died"})
    sse = translated(OpenAIStreamTranslator("chat", MODEL), data)
    stream = sdk_client(sse, "text/event-stream").chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True)
    seen: list[str] = []
    with pytest.raises(openai.APIError, match="runner died"):
        seen.extend(c.choices[0].delta.content or "" for c in stream)
    assert "".join(seen) == "par"


def test_sdk_reads_a_completion_stream() -> None:
    data = ndjson(generate_line("Once"), generate_line(" upon"), generate_line(done=True, reason="length"))
    sse = translated(OpenAIStreamTranslator("completion", MODEL), data)
    stream = sdk_client(sse, "text/event-stream").completions.create(model=MODEL, prompt="x", stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == "Once upon"
    assert chunks[-1].choices[0].finish_reason == "length"


def test_sdk_reads_a_non_streamed_chat_completion_strictly() -> None:
    body = json.dumps(native.ollama_response_to_openai("chat", MODEL, chat_line(done=True,
                                                                                tool_calls=[WEATHER_CALL])))
    client = sdk_client(body.encode(), "application/json", strict=True)
    completion = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    call = completion.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}  # type: ignore[union-attr]


def test_sdk_decodes_base64_embeddings_its_default() -> None:
    _, request = req("/v1/embeddings", {"model": MODEL, "input": ["a", "b"], "encoding_format": "base64"})
    body = json.dumps(native.ollama_embed_to_openai(MODEL, EMBED, encoding_format="base64"))
    # the SDK asks for base64 unless told otherwise and decodes it back to floats
    result = sdk_client(body.encode(), "application/json").embeddings.create(model=MODEL, input=["a", "b"])
    assert [d.embedding for d in result.data] == [pytest.approx(v, rel=1e-6) for v in EMBED["embeddings"]]
    assert request["input"] == ["a", "b"]

