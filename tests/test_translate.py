"""warmpool.dialects.ollama_from_openai: Ollama ⇄ OpenAI mapping, fed payloads shaped like llama.cpp servers
emit them."""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import Any

import pytest
from ollama import (
    ChatResponse,
    EmbeddingsResponse,
    EmbedResponse,
    GenerateResponse,
    ListResponse,
    ProcessResponse,
)

from tests.splits import Split, bytewise, sized, whole
from warmpool.dialects import ollama_from_openai as translate
from warmpool.dialects.ollama_from_openai import OllamaStreamTranslator
from warmpool.errors import BadRequest

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
JPEG = "/9j/4AAQSkZJRgABAQEASABIAAD/2wBDAP"
MODEL = "qwen2.5:7b"
RFC3339_NANO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")


def table(rows: list[tuple[Any, ...]]) -> list[Any]:
    """Parametrize rows whose first item names the case."""
    return [pytest.param(*row[1:], id=row[0]) for row in rows]


# ---------------------------------------------------------------------------------------------------
# fixtures: SSE in the shapes llama-cpp-python (sse-starlette, sep="\n") and llama-server emit


def chat_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-5e1d", "object": "chat.completion.chunk", "created": 1717512000,
            "model": "/models/qwen2.5-7b-instruct-q4_k_m.gguf",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def text_chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    return {"id": "cmpl-77a0", "object": "text_completion", "created": 1717512000, "model": "m",
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(prompt: int, completion: int) -> dict[str, Any]:
    return {"id": "chatcmpl-5e1d", "object": "chat.completion.chunk", "created": 1717512000, "model": "m",
            "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                     "total_tokens": prompt + completion}}


def sse(*events: dict[str, Any] | str, done: bool = True) -> bytes:
    frames = [e if isinstance(e, str) else f"data: {json.dumps(e)}\n\n" for e in events]
    return "".join(frames + (["data: [DONE]\n\n"] if done else [])).encode()


def chat_stream(*pieces: str, finish: str = "stop", usage: tuple[int, int] | None = (12, 3)) -> bytes:
    events: list[dict[str, Any] | str] = [chat_chunk({"role": "assistant"})]
    events += [chat_chunk({"content": p}) for p in pieces]
    events.append(chat_chunk({}, finish))
    if usage:
        events.append(usage_chunk(*usage))
    return sse(*events)


PING = ": ping - 2024-06-04 14:38:31.837530+00:00\n\n"





def mid_line(data: bytes) -> list[bytes]:
    """Cut inside every `data:` line, right after the colon and in the middle of the JSON."""
    cuts = sorted({i + 5 for i in _finds(data, b"data:")} | {i + 20 for i in _finds(data, b"data:")})
    edges = [0, *[c for c in cuts if c < len(data)], len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


def _finds(data: bytes, needle: bytes) -> list[int]:
    return [m.start() for m in re.finditer(re.escape(needle), data)]


def crlf(data: bytes) -> list[bytes]:
    return sized(5)(data.replace(b"\n", b"\r\n"))


SPLITS = [whole, bytewise, sized(3), sized(7), sized(64), mid_line, crlf]


def run(translator: OllamaStreamTranslator, data: bytes, split: Split,
        *, finish: bool = True) -> list[dict[str, Any]]:
    lines: list[bytes] = []
    for piece in split(data):
        lines += translator.feed(piece)
    if finish:
        lines += translator.finish()
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in lines)
    return [json.loads(line) for line in lines]


class FakeClock:
    def __init__(self, start: float = 100.0, step: float = 0.25) -> None:
        self.now, self.step = start, step

    def __call__(self) -> float:
        value = self.now
        self.now += self.step
        return value


def chat_text(objs: list[dict[str, Any]]) -> str:
    return "".join(o["message"]["content"] for o in objs if "message" in o)


# ---------------------------------------------------------------------------------------------------
# requests


def req(path: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return translate.ollama_request_to_openai(path, body, "upstream-alias")


REQUEST_CASES: list[tuple[str, str, dict[str, Any], str, dict[str, Any]]] = [
    ("chat streams by default and asks for usage",
     "/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
     "/v1/chat/completions",
     {"model": "upstream-alias", "messages": [{"role": "user", "content": "hi"}], "stream": True,
      "stream_options": {"include_usage": True}}),
    ("chat stream false, roles lower-cased",
     "/api/chat", {"model": MODEL, "stream": False, "messages": [{"role": "System", "content": "be brief"}]},
     "/v1/chat/completions",
     {"model": "upstream-alias", "messages": [{"role": "system", "content": "be brief"}], "stream": False}),
    ("options map, runner options dropped, num_predict → max_tokens",
     "/api/chat", {"model": MODEL, "stream": False, "messages": [],
                   "options": {"temperature": 0.2, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 7,
                               "num_predict": 128, "stop": ["</s>", "###"], "repeat_penalty": 1.1,
                               "presence_penalty": 0.5, "frequency_penalty": 0.25, "typical_p": 0.95,
                               "num_ctx": 8192, "num_gpu": 99, "num_thread": 8}},
     "/v1/chat/completions",
     {"model": "upstream-alias", "messages": [], "stream": False, "temperature": 0.2, "top_p": 0.9,
      "top_k": 40, "min_p": 0.05, "seed": 7, "max_tokens": 128, "stop": ["</s>", "###"],
      "repeat_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.25, "typical_p": 0.95}),
    ("num_predict -1 is no limit", "/api/chat",
     {"model": MODEL, "stream": False, "messages": [], "options": {"num_predict": -1, "stop": "\n"}},
     "/v1/chat/completions",
     {"model": "upstream-alias", "messages": [], "stream": False, "stop": ["\n"]}),
    ("num_predict -2 is no limit", "/api/chat",
     {"model": MODEL, "stream": False, "messages": [], "options": {"num_predict": -2, "top_k": 40.0}},
     "/v1/chat/completions",
     {"model": "upstream-alias", "messages": [], "stream": False, "top_k": 40}),
    ("format json", "/api/chat", {"model": MODEL, "stream": False, "messages": [], "format": "json"},
     "/v1/chat/completions",
     {"model": "upstream-alias", "messages": [], "stream": False,
      "response_format": {"type": "json_object"}}),
    ("format schema", "/api/chat",
     {"model": MODEL, "stream": False, "messages": [],
      "format": {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}},
     "/v1/chat/completions",
     {"model": "upstream-alias", "messages": [], "stream": False,
      "response_format": {"type": "json_object", "schema": {"type": "object", "properties": {
          "age": {"type": "integer"}}, "required": ["age"]}}}),
    ("chat images become content parts, image first",
     "/api/chat", {"model": MODEL, "stream": False,
                   "messages": [{"role": "user", "content": "what is this?", "images": [PNG, JPEG]}]},
     "/v1/chat/completions",
     {"model": "upstream-alias", "stream": False, "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
         {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{JPEG}"}},
         {"type": "text", "text": "what is this?"}]}]}),
    ("generate is templated: system + prompt become chat messages",
     "/api/generate", {"model": MODEL, "prompt": "Why is the sky blue?", "system": "Answer in one line.",
                       "options": {"num_predict": 64}},
     "/v1/chat/completions",
     {"model": "upstream-alias", "messages": [{"role": "system", "content": "Answer in one line."},
                                              {"role": "user", "content": "Why is the sky blue?"}],
      "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 64}),
    ("generate with images",
     "/api/generate", {"model": MODEL, "prompt": "describe", "images": [PNG], "stream": False},
     "/v1/chat/completions",
     {"model": "upstream-alias", "stream": False, "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
         {"type": "text", "text": "describe"}]}]}),
    ("generate raw goes to completions as-is, unlimited by default",
     "/api/generate", {"model": MODEL, "prompt": "<|im_start|>user\nhi<|im_end|>\n", "raw": True,
                       "stream": False},
     "/v1/completions",
     {"model": "upstream-alias", "prompt": "<|im_start|>user\nhi<|im_end|>\n", "stream": False,
      "max_tokens": None}),
    ("generate raw keeps an explicit num_predict",
     "/api/generate", {"model": MODEL, "prompt": "x", "raw": True, "options": {"num_predict": 5}},
     "/v1/completions",
     {"model": "upstream-alias", "prompt": "x", "stream": True, "stream_options": {"include_usage": True},
      "max_tokens": 5}),
    ("generate suffix is fill-in-middle on completions",
     "/api/generate", {"model": MODEL, "prompt": "def add(a, b):\n", "suffix": "\n    return c",
                       "stream": False, "options": {"temperature": 0}},
     "/v1/completions",
     {"model": "upstream-alias", "prompt": "def add(a, b):\n", "suffix": "\n    return c", "stream": False,
      "temperature": 0, "max_tokens": None}),
    ("embed string", "/api/embed", {"model": MODEL, "input": "hello", "truncate": True, "keep_alive": "5m"},
     "/v1/embeddings", {"model": "upstream-alias", "input": "hello"}),
    ("embed list with dimensions", "/api/embed", {"model": MODEL, "input": ["a", "b"], "dimensions": 256},
     "/v1/embeddings", {"model": "upstream-alias", "input": ["a", "b"], "dimensions": 256}),
    ("legacy embeddings prompt → input", "/api/embeddings", {"model": MODEL, "prompt": "hello"},
     "/v1/embeddings", {"model": "upstream-alias", "input": "hello"}),
]


@pytest.mark.parametrize(("path", "body", "want_path", "want"), table(REQUEST_CASES))
def test_request_translation(path: str, body: dict[str, Any], want_path: str, want: dict[str, Any]) -> None:
    assert req(path, body) == (want_path, want)


def test_path_table_matches_templated_translation() -> None:
    assert translate.OLLAMA_TO_OPENAI_PATH == {
        "/api/chat": "/v1/chat/completions", "/api/generate": "/v1/chat/completions",
        "/api/embed": "/v1/embeddings", "/api/embeddings": "/v1/embeddings"}


def test_tool_round_trip_gets_ids_and_string_arguments() -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    messages = [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "18°C"},
        {"role": "tool", "tool_name": "get_weather", "content": "4°C"},
    ]
    _, body = req("/api/chat", {"model": MODEL, "messages": messages, "tools": tools, "stream": False})
    assert body["tools"] == tools
    calls = body["messages"][1]["tool_calls"]
    assert [c["function"] for c in calls] == [
        {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"name": "get_weather", "arguments": '{"city": "Oslo"}'}]
    assert all(c["type"] == "function" for c in calls)
    # each result answers the calls in order, matched by tool name
    assert [m["tool_call_id"] for m in body["messages"][2:]] == [calls[0]["id"], calls[1]["id"]]
    assert body["messages"][2] == {"role": "tool", "content": "18°C", "tool_call_id": calls[0]["id"]}


def test_tool_call_ids_given_by_the_client_are_kept() -> None:
    messages = [
        {"role": "assistant",
         "tool_calls": [{"id": "call_abc", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "ok"},
        {"role": "tool", "tool_name": "g", "content": "orphan"},
    ]
    _, body = req("/api/chat", {"model": MODEL, "messages": messages, "stream": False})
    assert body["messages"][0]["tool_calls"][0]["id"] == "call_abc"
    assert body["messages"][0]["tool_calls"][0]["function"]["arguments"] == "{}"
    assert body["messages"][1]["tool_call_id"] == "call_abc"
    assert body["messages"][2]["tool_call_id"] == "call_g"


def test_request_body_is_not_mutated() -> None:
    body = {"model": MODEL, "messages": [{"role": "USER", "content": "x", "images": [PNG]}],
            "options": {"stop": "x"}}
    before = json.dumps(body)
    req("/api/chat", body)
    assert json.dumps(body) == before


BAD_REQUESTS: list[tuple[str, str, Any, str]] = [
    ("unknown path", "/api/pull", {"model": MODEL}, "/api/pull cannot be translated"),
    ("body not an object", "/api/chat", ["x"], "request body must be a JSON object"),
    ("messages not a list", "/api/chat", {"messages": "hi"}, "messages must be a list"),
    ("message not an object", "/api/chat", {"messages": ["hi"]}, "messages[0] must be an object"),
    ("role missing", "/api/chat", {"messages": [{"content": "x"}]}, "messages[0].role is required"),
    ("content not a string", "/api/chat", {"messages": [{"role": "user", "content": 5}]},
     "messages[0].content must be a string"),
    ("images not a list", "/api/chat", {"messages": [{"role": "user", "images": PNG}]},
     "messages[0].images must be a list"),
    ("image not a string", "/api/chat", {"messages": [{"role": "user", "images": [b"x".hex(), 3]}]},
     "messages[0].images[1] must be a base64-encoded image"),
    ("tool call without function", "/api/chat",
     {"messages": [{"role": "assistant", "tool_calls": [{"name": "f"}]}]},
     "messages[0].tool_calls[0].function.name must be a string"),
    ("tools not a list", "/api/chat", {"messages": [], "tools": {"type": "function"}},
     "tools must be a list"),
    ("stream not a boolean", "/api/chat", {"messages": [], "stream": "yes"}, "stream must be a boolean"),
    ("options not an object", "/api/chat", {"messages": [], "options": [1]}, "options must be an object"),
    ("option of the wrong type", "/api/chat", {"messages": [], "options": {"temperature": "hot"}},
     "options.temperature must be a number"),
    ("boolean is not a number", "/api/chat", {"messages": [], "options": {"seed": True}},
     "options.seed must be a number"),
    ("stop of the wrong type", "/api/chat", {"messages": [], "options": {"stop": [1]}},
     "options.stop must be a string or a list of strings"),
    ("bad format", "/api/chat", {"messages": [], "format": "yaml"}, 'format must be "json"'),
    ("prompt not a string", "/api/generate", {"prompt": ["a"]}, "prompt must be a string"),
    ("system not a string", "/api/generate", {"prompt": "a", "system": 1}, "system must be a string"),
    ("raw not a boolean", "/api/generate", {"prompt": "a", "raw": "true"}, "raw must be a boolean"),
    ("raw with system", "/api/generate", {"prompt": "a", "raw": True, "system": "s"},
     "raw mode does not support template, system, or context"),
    ("custom template", "/api/generate", {"prompt": "a", "template": "{{ .Prompt }}"},
     "template is not supported"),
    ("context tokens", "/api/generate", {"prompt": "a", "context": [1, 2, 3]},
     "context (token ids) is not supported"),
    ("images with raw", "/api/generate", {"prompt": "a", "raw": True, "images": [PNG]},
     "images need the chat template"),
    ("embed input of numbers", "/api/embed", {"input": [1, 2]},
     "input must be a string or a list of strings"),
    ("embed input object", "/api/embed", {"input": {"text": "x"}},
     "input must be a string or a list of strings"),
    ("embeddings prompt not a string", "/api/embeddings", {"prompt": 3}, "prompt must be a string"),
]


@pytest.mark.parametrize(("path", "body", "message"), table(BAD_REQUESTS))
def test_bad_requests(path: str, body: Any, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        req(path, body)
    assert message in info.value.message
    assert info.value.status == 400


# ---------------------------------------------------------------------------------------------------
# streaming


@pytest.mark.parametrize("split", SPLITS)
def test_chat_stream_any_chunking(split: Split) -> None:
    data = chat_stream("Bonjour", " le monde", " — ça va? 🌍", usage=(12, 3))
    translator = OllamaStreamTranslator("chat", MODEL)
    objs = run(translator, data, split)
    assert translator.done
    assert [o["done"] for o in objs] == [False, False, False, True]
    assert chat_text(objs) == "Bonjour le monde — ça va? 🌍"
    for obj in objs:
        assert obj["model"] == MODEL and RFC3339_NANO.match(obj["created_at"])
        assert obj["message"]["role"] == "assistant"
        ChatResponse.model_validate(obj)
    final = objs[-1]
    assert final["message"] == {"role": "assistant", "content": ""}
    assert final["done_reason"] == "stop"
    assert (final["prompt_eval_count"], final["eval_count"], final["load_duration"]) == (12, 3, 0)


@pytest.mark.parametrize("split", SPLITS)
def test_generate_stream_from_completions_chunks(split: Split) -> None:
    data = sse(text_chunk("def"), text_chunk(" add"), text_chunk("", "length"), usage_chunk(5, 2))
    objs = run(OllamaStreamTranslator("generate", MODEL), data, split)
    assert [o["response"] for o in objs] == ["def", " add", ""]
    assert objs[-1]["done_reason"] == "length"
    assert (objs[-1]["prompt_eval_count"], objs[-1]["eval_count"]) == (5, 2)
    for obj in objs:
        assert "message" not in obj
        GenerateResponse.model_validate(obj)


def test_generate_stream_from_chat_chunks() -> None:
    objs = run(OllamaStreamTranslator("generate", MODEL), chat_stream("Because", " Rayleigh."), whole)
    assert [o["response"] for o in objs] == ["Because", " Rayleigh.", ""]
    assert objs[-1]["done"] is True


STREAM_ENDINGS: list[tuple[str, bytes, str, int]] = [
    ("finish stop", chat_stream("a", "b", usage=None), "stop", 2),
    ("finish length", chat_stream("a", "b", "c", finish="length", usage=None), "length", 3),
    ("finish tool_calls is a stop", chat_stream("a", finish="tool_calls", usage=None), "stop", 1),
    # llama-cpp-python's interrupt_requests: [DONE] with no finish_reason at all
    ("interrupted", sse(chat_chunk({"role": "assistant"}), chat_chunk({"content": "a"})), "stop", 1),
]


@pytest.mark.parametrize(("data", "reason", "count"), table(STREAM_ENDINGS))
def test_done_reason_and_counted_deltas(data: bytes, reason: str, count: int) -> None:
    objs = run(OllamaStreamTranslator("chat", MODEL), data, bytewise)
    assert objs[-1]["done_reason"] == reason
    assert objs[-1]["eval_count"] == count  # no usage chunk: counted deltas
    assert objs[-1]["prompt_eval_count"] == 0


@pytest.mark.parametrize("split", [whole, bytewise, crlf])
def test_pings_and_other_fields_are_ignored(split: Split) -> None:
    data = sse(PING, chat_chunk({"role": "assistant"}), PING, "event: message\nid: 7\nretry: 1500\n\n",
               chat_chunk({"content": "x"}), ":keepalive\n", "\n\n", chat_chunk({}, "stop"), PING)
    objs = run(OllamaStreamTranslator("chat", MODEL), data, split)
    assert chat_text(objs) == "x"
    assert len(objs) == 2


def test_several_events_in_one_chunk_and_one_event_over_several_data_lines() -> None:
    multi = "data: " + json.dumps(chat_chunk({"content": "two"}), indent=1).replace("\n", "\ndata: ") + "\n\n"
    data = sse(chat_chunk({"content": "one "}), multi, chat_chunk({}, "stop"))
    translator = OllamaStreamTranslator("chat", MODEL)
    lines = translator.feed(data)
    assert translator.done
    assert chat_text([json.loads(line) for line in lines]) == "one two"
    assert translator.finish() == []


def test_finish_without_done_emits_final_once() -> None:
    translator = OllamaStreamTranslator("chat", MODEL)
    objs = run(translator, sse(chat_chunk({"content": "partial"}), done=False), sized(4), finish=False)
    assert [o["done"] for o in objs] == [False]
    final = [json.loads(line) for line in translator.finish()]
    assert final[0]["done"] is True and final[0]["done_reason"] == "stop"
    assert translator.finish() == []
    assert translator.feed(sse(chat_chunk({"content": "late"}))) == []


def test_finish_flushes_an_unterminated_last_event() -> None:
    translator = OllamaStreamTranslator("generate", MODEL)
    lines = translator.feed(b"data: " + json.dumps(text_chunk("tail")).encode())
    assert lines == []
    objs = [json.loads(line) for line in translator.finish()]
    assert [o["response"] for o in objs] == ["tail", ""]


def test_nothing_after_done_is_parsed() -> None:
    translator = OllamaStreamTranslator("chat", MODEL)
    lines = translator.feed(chat_stream("a") + b"data: {garbage")
    assert [json.loads(line)["done"] for line in lines] == [False, True]
    assert translator.finish() == []


TOOL_STREAMS: list[tuple[str, bytes]] = [
    # OpenAI / llama-server: name and id once, arguments in fragments
    ("openai fragments", sse(
        chat_chunk({"role": "assistant", "content": None}),
        chat_chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                    "function": {"name": "get_weather", "arguments": ""}}]}),
        chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
        chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chat_chunk({"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                                    "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}}]}),
        chat_chunk({}, "tool_calls"), usage_chunk(40, 18))),
    # llama-cpp-python chatml-function-calling: name repeated in every fragment, legacy function_call too
    ("llama-cpp-python fragments", sse(
        chat_chunk({"role": "assistant", "content": None, "function_call": None, "tool_calls": None}),
        *[chat_chunk({"role": None, "content": None, "function_call": {"name": name, "arguments": part},
                      "tool_calls": [{"index": idx, "id": cid, "type": "function",
                                      "function": {"name": name, "arguments": part}}]})
          for idx, cid, name, part in [(0, "call_1", "get_weather", '{"city"'),
                                       (0, "call_1", "get_weather", ': "Paris"}'),
                                       (1, "call_2", "get_time", '{"tz": "CET"}')]],
        chat_chunk({"role": None, "content": None, "function_call": None, "tool_calls": None}, "tool_calls"),
        usage_chunk(40, 18))),
]


@pytest.mark.parametrize("data", [c[1] for c in TOOL_STREAMS], ids=[c[0] for c in TOOL_STREAMS])
@pytest.mark.parametrize("split", [whole, bytewise, mid_line])
def test_tool_calls_arrive_whole_in_the_final_message(data: bytes, split: Split) -> None:
    objs = run(OllamaStreamTranslator("chat", MODEL), data, split)
    assert len(objs) == 1
    final = objs[0]
    assert final["done_reason"] == "stop"
    assert final["message"]["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}, "id": "call_1"},
        {"function": {"name": "get_time", "arguments": {"tz": "CET"}}, "id": "call_2"}]
    response = ChatResponse.model_validate(final)
    assert response.message.tool_calls
    assert response.message.tool_calls[0].function.arguments == {"city": "Paris"}


def test_malformed_tool_arguments_stay_visible() -> None:
    data = sse(chat_chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{oops"}}]}),
               chat_chunk({"tool_calls": [{"index": 1, "function": {"name": "g", "arguments": ""}}]}))
    final = run(OllamaStreamTranslator("chat", MODEL), data, whole)[-1]
    arguments = [c["function"]["arguments"] for c in final["message"]["tool_calls"]]
    assert arguments == [{"arguments": "{oops"}, {}]
    ChatResponse.model_validate(final)


ERROR_STREAMS: list[tuple[str, bytes, str]] = [
    ("openai error object", sse(chat_chunk({"content": "a"}),
                                {"error": {"message": "context length exceeded",
                                           "type": "invalid_request_error",
                                           "code": "context_length_exceeded"}}),
     "context length exceeded"),
    ("error string", sse({"error": "out of memory"}), "out of memory"),
    ("event: error", sse("event: error\ndata: {\"code\": 500, \"message\": \"slot unavailable\"}\n\n"),
     "slot unavailable"),
    ("older llama-server error: field",
     b'error: {"code":500,"message":"kv cache full","type":"server_error"}\n\n',
     "kv cache full"),
    ("malformed json", b"data: {not json\n\n", "malformed stream event"),
    ("json that is not an object", b"data: [1, 2]\n\n", "malformed stream event: '[1, 2]'"),
    ("error field with plain text", b"error: upstream crashed\n\n", "upstream crashed"),
]


@pytest.mark.parametrize(("data", "message"), table(ERROR_STREAMS))
@pytest.mark.parametrize("split", [whole, bytewise])
def test_upstream_errors_end_the_stream(data: bytes, message: str, split: Split) -> None:
    translator = OllamaStreamTranslator("chat", MODEL)
    objs = run(translator, data + sse(chat_chunk({"content": "after"})), split)
    assert translator.done
    assert set(objs[-1]) == {"error"} and message in objs[-1]["error"]
    assert all("error" not in o for o in objs[:-1])
    assert sum("error" in o for o in objs) == 1


def test_durations_from_the_clock() -> None:
    clock = FakeClock(start=100.0, step=0.5)
    translator = OllamaStreamTranslator("chat", MODEL, clock=clock, started=99.0)
    objs = run(translator, chat_stream("a", "b", usage=None), whole)
    final = objs[-1]
    # first token at 100.0, end at 100.5
    assert final["total_duration"] == 1_500_000_000
    assert final["prompt_eval_duration"] == 1_000_000_000
    assert final["eval_duration"] == 500_000_000
    assert all(isinstance(final[k], int) for k in ("total_duration", "prompt_eval_duration", "eval_duration"))


def test_llama_server_timings_win_over_the_clock() -> None:
    finish = chat_chunk({}, "stop") | {"timings": {"prompt_n": 9, "prompt_ms": 12.5, "predicted_n": 2,
                                                   "predicted_ms": 40.25, "predicted_per_second": 49.7}}
    data = sse(chat_chunk({"content": "a"}), chat_chunk({"content": "b"}), finish)
    final = run(OllamaStreamTranslator("chat", MODEL, clock=FakeClock()), data, whole)[-1]
    assert (final["prompt_eval_count"], final["prompt_eval_duration"]) == (9, 12_500_000)
    assert (final["eval_count"], final["eval_duration"]) == (2, 40_250_000)


def test_reasoning_content_becomes_thinking() -> None:
    data = sse(chat_chunk({"reasoning_content": "Let me think."}), chat_chunk({"content": "42"}),
               chat_chunk({}, "stop"))
    chat = run(OllamaStreamTranslator("chat", MODEL), data, whole)
    assert chat[0]["message"] == {"role": "assistant", "content": "", "thinking": "Let me think."}
    generate = run(OllamaStreamTranslator("generate", MODEL), data, whole)
    assert (generate[0]["thinking"], generate[1]["response"]) == ("Let me think.", "42")
    for obj in chat:
        ChatResponse.model_validate(obj)
    for obj in generate:
        GenerateResponse.model_validate(obj)


def test_translator_rejects_unknown_kind_and_shows_state() -> None:
    with pytest.raises(ValueError):
        OllamaStreamTranslator("embed", MODEL)
    translator = OllamaStreamTranslator("chat", MODEL)
    translator.feed(chat_stream("a"))
    assert repr(translator) == ("<OllamaStreamTranslator chat model='qwen2.5:7b' deltas=1 "
                                "finish_reason=stop done=True>")


# ---------------------------------------------------------------------------------------------------
# non-streamed responses and embeddings


CHAT_COMPLETION = {
    "id": "chatcmpl-9f2c", "object": "chat.completion", "created": 1717512000, "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "logprobs": None,
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 20, "completion_tokens": 4, "total_tokens": 24},
}
TOOL_COMPLETION = {
    "id": "chatcmpl-9f2d", "object": "chat.completion", "created": 1717512000, "model": "m",
    "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None, "message": {
        "role": "assistant", "content": None, "function_call": {"name": "f", "arguments": '{"x": 1}'},
        "tool_calls": [{"id": "call_f", "type": "function",
                        "function": {"name": "f", "arguments": '{"x": 1}'}}]}}],
    "usage": {"prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39},
}
TEXT_COMPLETION = {
    "id": "cmpl-1", "object": "text_completion", "created": 1717512000, "model": "m",
    "choices": [{"text": "    c = a + b", "index": 0, "logprobs": None, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 8, "completion_tokens": 16, "total_tokens": 24},
}


NON_STREAM_CASES: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    ("chat", "chat", CHAT_COMPLETION,
     {"message": {"role": "assistant", "content": "Hello!"}, "done": True, "done_reason": "stop",
      "prompt_eval_count": 20, "eval_count": 4}),
    ("chat with tool calls", "chat", TOOL_COMPLETION,
     {"message": {"role": "assistant", "content": "",
                  "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}, "id": "call_f"}]},
      "done": True, "done_reason": "stop", "prompt_eval_count": 30, "eval_count": 9}),
    ("generate from chat completion", "generate", CHAT_COMPLETION,
     {"response": "Hello!", "done": True, "done_reason": "stop", "prompt_eval_count": 20, "eval_count": 4}),
    ("generate from text completion", "generate", TEXT_COMPLETION,
     {"response": "    c = a + b", "done": True, "done_reason": "length", "prompt_eval_count": 8,
      "eval_count": 16}),
    ("no choices at all", "generate", {"object": "text_completion"},
     {"response": "", "done": True, "done_reason": "stop", "prompt_eval_count": 0, "eval_count": 0}),
]


@pytest.mark.parametrize(("kind", "resp", "want"), table(NON_STREAM_CASES))
def test_non_streamed_response(kind: str, resp: dict[str, Any], want: dict[str, Any]) -> None:
    out = translate.openai_response_to_ollama(kind, MODEL, resp, total_duration_ns=2_000_000_000)
    assert {k: out[k] for k in want} == want
    assert out["model"] == MODEL and RFC3339_NANO.match(out["created_at"])
    durations = (out["total_duration"], out["load_duration"], out["eval_duration"])
    assert durations == (2_000_000_000, 0, 2_000_000_000)
    model = ChatResponse if kind == "chat" else GenerateResponse
    model.model_validate(out)


def test_non_streamed_response_with_llama_server_timings() -> None:
    timings = {"prompt_n": 20, "prompt_ms": 100.0, "predicted_n": 4, "predicted_ms": 80}
    resp = CHAT_COMPLETION | {"timings": timings}
    out = translate.openai_response_to_ollama("chat", MODEL, resp, total_duration_ns=300_000_000)
    assert (out["prompt_eval_duration"], out["eval_duration"], out["total_duration"]) == (
        100_000_000, 80_000_000, 300_000_000)


EMBEDDINGS = {
    "object": "list", "model": "m", "usage": {"prompt_tokens": 6, "total_tokens": 6},
    "data": [{"object": "embedding", "embedding": [0.0, 2.0], "index": 1},
             {"object": "embedding", "embedding": [3.0, 4.0], "index": 0}],
}


def test_embed_response_is_ordered_and_normalised() -> None:
    out = translate.openai_embeddings_to_ollama("/api/embed", MODEL, EMBEDDINGS, total_duration_ns=5)
    assert out == {"model": MODEL, "embeddings": [[0.6, 0.8], [0.0, 1.0]], "total_duration": 5,
                   "load_duration": 0, "prompt_eval_count": 6}
    assert all(math.isclose(sum(x * x for x in v), 1.0) for v in out["embeddings"])
    EmbedResponse.model_validate(out)


def test_legacy_embeddings_response_keeps_the_raw_vector() -> None:
    out = translate.openai_embeddings_to_ollama("/api/embeddings", MODEL, EMBEDDINGS, total_duration_ns=5)
    assert out == {"embedding": [3.0, 4.0]}
    EmbeddingsResponse.model_validate(out)
    empty = translate.openai_embeddings_to_ollama("/api/embeddings", MODEL, {"data": []}, total_duration_ns=5)
    assert empty == {"embedding": []}


def test_embed_response_tolerates_zero_vectors_and_missing_usage() -> None:
    resp = {"data": [{"embedding": [0.0, 0.0], "index": 0}]}
    out = translate.openai_embeddings_to_ollama("/api/embed", MODEL, resp, total_duration_ns=1)
    assert (out["embeddings"], out["prompt_eval_count"]) == ([[0.0, 0.0]], 0)


# ---------------------------------------------------------------------------------------------------
# errors


OPENAI_ERRORS: list[tuple[str, Any, str]] = [
    ("openai error dict", {"error": {"message": "Requested tokens exceed context window",
                                     "type": "invalid_request_error", "code": "context_length_exceeded"}},
     "Requested tokens exceed context window"),
    ("openai error bytes", b'{"error":{"message":"Model not found","type":"invalid_request_error"}}',
     "Model not found"),
    ("fastapi detail", b'{"detail":"Invalid API key"}', "Invalid API key"),
    ("fastapi validation", {"detail": [{"type": "missing", "loc": ["body", "messages", 0, "role"],
                                        "msg": "Field required", "input": {}},
                                       {"type": "float_parsing", "loc": ["body", "temperature"],
                                        "msg": "Input should be a valid number"}]},
     "body.messages.0.role: Field required; body.temperature: Input should be a valid number"),
    ("llama-server error", {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}},
     "Loading model"),
    ("ollama-shaped error", {"error": "model 'x' not found"}, "model 'x' not found"),
    ("plain text", b"Internal Server Error\n", "Internal Server Error"),
    ("html", b"<html><body>502 Bad Gateway</body></html>", "<html><body>502 Bad Gateway</body></html>"),
    ("empty body", b"", "upstream error"),
    ("unknown json", {"status": "weird"}, '{"status": "weird"}'),
]


@pytest.mark.parametrize(("body", "message"), table(OPENAI_ERRORS))
def test_openai_error_to_ollama(body: Any, message: str) -> None:
    assert translate.openai_error_to_ollama(body) == {"error": message}


@pytest.mark.parametrize(("status", "kind"), [(400, "invalid_request_error"), (404, "not_found_error"),
                                              (500, "api_error"), (503, "api_error"), (499, "api_error")])
def test_ollama_error_to_openai(status: int, kind: str) -> None:
    assert translate.ollama_error_to_openai({"error": "boom"}, status) == {
        "error": {"message": "boom", "type": kind, "param": None, "code": None}}


def test_ollama_error_to_openai_with_empty_body() -> None:
    assert translate.ollama_error_to_openai({}, 403)["error"]["message"] == "upstream answered HTTP 403"


# ---------------------------------------------------------------------------------------------------
# preloads, timestamps, listings


PRELOADS: list[tuple[str, dict[str, Any], bool]] = [
    ("/api/generate", {"model": MODEL}, True),
    ("/api/generate", {"model": MODEL, "prompt": "", "keep_alive": 0}, True),
    ("/api/generate", {"model": MODEL, "prompt": "hi"}, False),
    ("/api/chat", {"model": MODEL, "messages": []}, True),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, False),
    ("/api/embed", {"model": MODEL, "input": []}, True),
    ("/api/embed", {"model": MODEL, "input": ["a"]}, False),
    ("/api/embeddings", {"model": MODEL, "prompt": ""}, True),
    ("/api/embeddings", {"model": MODEL, "prompt": "a"}, False),
    ("/api/show", {"model": MODEL}, False),
]


@pytest.mark.parametrize(("path", "body", "want"), PRELOADS)
def test_is_ollama_preload(path: str, body: dict[str, Any], want: bool) -> None:
    assert translate.is_ollama_preload(path, body) is want


def test_preload_responses() -> None:
    chat = translate.ollama_preload_response("/api/chat", MODEL)
    assert chat["message"] == {"role": "assistant", "content": ""}
    assert (chat["done"], chat["done_reason"]) == (True, "load")
    ChatResponse.model_validate(chat)
    generate = translate.ollama_preload_response("/api/generate", MODEL, unload=True)
    assert (generate["response"], generate["done_reason"]) == ("", "unload")
    GenerateResponse.model_validate(generate)
    assert translate.ollama_preload_response("/api/embed", MODEL) == {"model": MODEL, "embeddings": []}
    assert translate.ollama_preload_response("/api/embeddings", MODEL) == {"embedding": []}


@pytest.mark.parametrize(("epoch", "want"), [
    (1717511911.837530123, "2024-06-04T14:38:31.83753Z"),  # a float epoch holds about microseconds
    (1717511911.5, "2024-06-04T14:38:31.5Z"),
    (1717511911.0, "2024-06-04T14:38:31Z"),
    (0.000123, "1970-01-01T00:00:00.000123Z"),
])
def test_rfc3339_now(epoch: float, want: str) -> None:
    assert translate.rfc3339_now(lambda: epoch) == want


def test_rfc3339_now_defaults_to_wall_clock() -> None:
    assert RFC3339_NANO.match(translate.rfc3339_now())


@pytest.mark.parametrize(("name", "want"), [
    ("llama3.2", "llama3.2:latest"),
    ("qwen2.5:7b", "qwen2.5:7b"),
    ("hf.co/org/model", "hf.co/org/model:latest"),
    ("localhost:5000/lib/model", "localhost:5000/lib/model:latest"),
    ("localhost:5000/model:q4", "localhost:5000/model:q4"),
])
def test_with_default_tag(name: str, want: str) -> None:
    assert translate.with_default_tag(name) == want


def test_tag_entry_validates_as_an_ollama_listing() -> None:
    entry = translate.ollama_tag_entry("gemma3-270m", size=253_000_000, modified_at="2026-11-22T10:00:00.5Z",
                                       digest="sha256:" + "ab" * 32, family="gemma3", quantization="Q4_K_M",
                                       parameter_size="270M")
    assert entry["name"] == entry["model"] == "gemma3-270m:latest"
    assert entry["details"] == {"parent_model": "", "format": "gguf", "family": "gemma3",
                                "families": ["gemma3"], "parameter_size": "270M",
                                "quantization_level": "Q4_K_M"}
    listing = ListResponse.model_validate({"models": [entry]})
    assert listing.models[0].size == 253_000_000


def test_ps_entry_validates_as_an_ollama_process_list() -> None:
    entry = translate.ollama_ps_entry("coder:q4", size=5_137_025_024, expires_at="2026-11-22T10:05:00Z",
                                      digest="sha256:" + "cd" * 32, context_length=8192)
    assert (entry["name"], entry["size_vram"], entry["context_length"]) == ("coder:q4", 0, 8192)
    assert entry["details"]["families"] is None
    ProcessResponse.model_validate({"models": [entry]})


def test_openai_model_entry() -> None:
    assert translate.openai_model_entry("coder", created=1717512000, owned_by="warmpool") == {
        "id": "coder", "object": "model", "created": 1717512000, "owned_by": "warmpool"}
