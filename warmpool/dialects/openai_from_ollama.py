"""OpenAI → Ollama-native translation for Ollama models with configured load-time `options`; pure functions.

Ollama's own /v1 layer cannot carry `options` such as num_ctx, so a /v1 request would make Ollama reload
a model warmpool preloaded with them, and the next native request would reload it again. This module owns
the request mapping (/v1/* → /api/*), the NDJSON → SSE stream translator and the non-streamed response and
embedding mappings that let warmpool serve such a model's OpenAI clients through the native API instead.
"""

from __future__ import annotations

import base64
import json
import secrets
import struct
import time
from collections.abc import Callable
from typing import Any

from warmpool.dialects import strictjson
from warmpool.dialects.jsonfields import JSON
from warmpool.dialects.jsonfields import as_object as _object
from warmpool.dialects.jsonfields import get as _get
from warmpool.dialects.jsonfields import object_at as _object_at
from warmpool.dialects.ollama_from_openai import ollama_error_to_openai
from warmpool.errors import BadRequest

Request = tuple[str, JSON]

CHAT_API = "/api/chat"
GENERATE_API = "/api/generate"
EMBED_API = "/api/embed"

OPENAI_TO_OLLAMA_PATH: dict[str, str] = {
    "/v1/chat/completions": CHAT_API,
    "/v1/completions": GENERATE_API,
    "/v1/embeddings": EMBED_API,
}

_FLOAT_OPTIONS = ("temperature", "top_p", "frequency_penalty", "presence_penalty")
# Ollama's /v1 layer sends OpenAI's defaults, not the Modelfile's; keep the answers clients already get
_OPENAI_DEFAULTS: JSON = {"temperature": 1.0, "top_p": 1.0}
_EFFORTS: dict[str, str | bool] = {"low": "low", "medium": "medium", "high": "high", "none": False}
_FINISH_REASONS = ("stop", "length")
_ENCODINGS = ("float", "base64")
FINGERPRINT = "fp_ollama"  # what Ollama's /v1 layer reports, so clients see no difference
DONE_FRAME = b"data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------------
# Requests: OpenAI → Ollama


def openai_request_to_ollama(path: str, body: JSON, upstream_model: str, options: JSON,
                             keep_alive: float | None) -> Request:
    """Translate an OpenAI request to (Ollama path, native body) addressed to `upstream_model`.

    `options` are the model's configured Ollama options; they win over the ones derived from the
    client's sampling fields, because load-time options (num_ctx…) must match the preload exactly.
    """
    build = _REQUEST_BUILDERS.get(path)
    if build is None:
        raise BadRequest(f"{path} cannot be translated to Ollama's native API")
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    ollama_path, fields = build(body)
    merged = {**fields.pop("options", {}), **options}
    out: JSON = {"model": upstream_model, **fields}
    if merged:
        out["options"] = merged
    if keep_alive is not None:
        out["keep_alive"] = keep_alive  # a number: Ollama rejects unit-less duration strings
    return ollama_path, out


def wants_usage(body: JSON) -> bool:
    """Whether an OpenAI streaming request asked for the final usage chunk (stream_options.include_usage)."""
    return _object_at(body, "stream_options").get("include_usage") is True


def _chat_request(body: JSON) -> Request:
    _reject_several_choices(body)
    fields: JSON = {"messages": _ollama_messages(_get(body, "messages", "a list", []))}
    tools = _tools(body)
    if tools:
        fields["tools"] = tools  # OpenAI's {"type":"function","function":{…}} is Ollama's shape too
    fmt = _format(body.get("response_format"))
    if fmt is not None:
        fields["format"] = fmt
    think = _think(body)
    if think is not None:
        fields["think"] = think
    return CHAT_API, _generation(body, fields)


def _completion_request(body: JSON) -> Request:
    _reject_several_choices(body)
    fields: JSON = {"prompt": _prompt(body.get("prompt"))}
    suffix = _get(body, "suffix", "a string", "")
    if suffix:
        # fill-in-middle: only the model's template can place the suffix; raw mode would drop it
        fields["suffix"] = suffix
    else:
        fields["raw"] = True  # OpenAI completions continue the prompt as-is, untemplated
    return GENERATE_API, _generation(body, fields)


def _embed_request(body: JSON) -> Request:
    fields: JSON = {"input": _embed_input(body.get("input"))}
    dimensions = _get(body, "dimensions", "a number")
    if dimensions is not None:
        fields["dimensions"] = int(dimensions)
    _encoding(body.get("encoding_format"))  # validated here; applied by ollama_embed_to_openai
    return EMBED_API, fields


_REQUEST_BUILDERS: dict[str, Callable[[JSON], Request]] = {
    "/v1/chat/completions": _chat_request,
    "/v1/completions": _completion_request,
    "/v1/embeddings": _embed_request,
}


def _generation(body: JSON, fields: JSON) -> JSON:
    """`fields` plus what chat and completions share: stream and the client's sampling options."""
    stream = _get(body, "stream", "a boolean", False)  # OpenAI answers in one piece unless told
    return {**fields, "stream": stream, "options": _sampling(body)}


def _reject_several_choices(body: JSON) -> None:
    n = _get(body, "n", "a number", 1)
    if n != 1:
        raise BadRequest("n must be 1: Ollama generates a single choice")


def _sampling(body: JSON) -> JSON:
    """Ollama options for the OpenAI sampling fields (max_completion_tokens is the newer max_tokens)."""
    out: JSON = dict(_OPENAI_DEFAULTS)
    for key in _FLOAT_OPTIONS:
        value = _get(body, key, "a number")
        if value is not None:
            out[key] = value
    for key in ("seed", "top_k"):  # top_k: not OpenAI's, but llama.cpp's servers and Anthropic clients send it
        value = _get(body, key, "a number")
        if value is not None:
            out[key] = int(value)
    limit = _first_given(body, "max_completion_tokens", "max_tokens")
    if limit is not None:
        out["num_predict"] = int(limit)
    return out | _stop(body.get("stop"))


def _first_given(body: JSON, *keys: str) -> Any:
    values = (_get(body, key, "a number") for key in keys)
    return next((v for v in values if v is not None), None)


def _stop(stop: Any) -> JSON:
    if stop is None or stop == []:
        return {}
    if isinstance(stop, str):
        return {"stop": [stop]}
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return {"stop": stop}
    raise BadRequest("stop must be a string or a list of strings")


def _format(response_format: Any) -> str | JSON | None:
    """Ollama's `format` for an OpenAI response_format: "json", a JSON schema, or None for plain text."""
    if response_format is None:
        return None
    kind = _object(response_format, "response_format").get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        # llama.cpp's servers take a schema beside json_object; warmpool's own translations may send one
        schema = response_format.get("schema")
        return schema if isinstance(schema, dict) else "json"
    if kind == "json_schema":
        schema = _object_at(response_format, "json_schema").get("schema")
        if not isinstance(schema, dict):
            raise BadRequest("response_format.json_schema.schema must be an object")
        return schema
    raise BadRequest('response_format.type must be "text", "json_object" or "json_schema"')


def _think(body: JSON) -> str | bool | None:
    """Ollama's `think` for reasoning_effort (or the newer reasoning.effort), as Ollama's /v1 maps it."""
    effort = _object_at(body, "reasoning").get("effort") or body.get("reasoning_effort")
    if effort is None:
        return None
    if not isinstance(effort, str) or effort not in _EFFORTS:
        raise BadRequest('reasoning_effort must be "low", "medium", "high" or "none"')
    return _EFFORTS[effort]


def _tools(body: JSON) -> list[JSON]:
    tools = _get(body, "tools", "a list", [])
    if body.get("tool_choice") == "none":
        return []  # Ollama has no tool_choice; withholding the tools is how to forbid calls
    return [_object(tool, f"tools[{i}]") for i, tool in enumerate(tools)]


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]  # the OpenAI SDK sends a batch of one as a list
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string or a list of one string; token ids and batches "
                         "are not supported")
    if not prompt:
        raise BadRequest("prompt must not be empty: Ollama treats an empty prompt as a load request")
    return prompt


def _embed_input(given: Any) -> str | list[str]:
    if isinstance(given, str):
        return given or [""]  # a bare "" would make /api/embed a load request; Ollama's /v1 does this too
    if isinstance(given, list) and given and all(isinstance(s, str) for s in given):
        return given
    if isinstance(given, list) and given and all(isinstance(s, (int, list)) for s in given):
        raise BadRequest("input as token ids is not supported here; send text")
    raise BadRequest("input must be a string or a non-empty list of strings")


def _encoding(encoding_format: Any) -> str:
    if encoding_format is None:
        return "float"
    if not isinstance(encoding_format, str) or encoding_format.lower() not in _ENCODINGS:
        raise BadRequest('encoding_format must be "float" or "base64"')
    return encoding_format.lower()


# --- chat messages


def _ollama_messages(messages: list[Any]) -> list[JSON]:
    if not messages:
        raise BadRequest("messages must not be empty")  # an empty /api/chat would only load the model
    names: dict[str, str] = {}  # tool_call_id → function name, filled in as assistant turns go by
    return [_ollama_message(_object(msg, f"messages[{i}]"), f"messages[{i}].", names)
            for i, msg in enumerate(messages)]


def _ollama_message(msg: JSON, where: str, names: dict[str, str]) -> JSON:
    role = _role(msg, where)
    text, images = _content(msg.get("content"), f"{where}content")
    out: JSON = {"role": role, "content": text}
    if images:
        out["images"] = images
    thinking = msg.get("reasoning") or msg.get("reasoning_content")  # Ollama's /v1 name, llama.cpp's
    if isinstance(thinking, str):
        out["thinking"] = thinking
    calls = _get(msg, "tool_calls", "a list", [], where)
    if calls:
        out["tool_calls"] = [_ollama_tool_call(c, f"{where}tool_calls[{j}]", names)
                             for j, c in enumerate(calls)]
    return (out | _tool_result(msg, where, names)) if role == "tool" else out


def _role(msg: JSON, where: str) -> str:
    role = _get(msg, "role", "a string", "", where).lower()
    if not role:
        raise BadRequest(f"{where}role is required")
    # OpenAI's newer name for system; Ollama templates only know "system"
    return "system" if role == "developer" else role


def _content(content: Any, where: str) -> tuple[str, list[str]]:
    """(text, base64 images) of a message's content: a string, null, or a list of content parts."""
    if content is None:
        return "", []  # an assistant turn that only calls tools
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise BadRequest(f"{where} must be a string or a list of content parts")
    texts: list[str] = []
    images: list[str] = []
    for k, part in enumerate(content):
        kind, value = _part(_object(part, f"{where}[{k}]"), f"{where}[{k}]")
        (texts if kind == "text" else images).append(value)
    return "\n".join(texts), images


def _part(part: JSON, where: str) -> tuple[str, str]:
    kind = part.get("type")
    if kind == "text":
        return "text", _get(part, "text", "a string", "", f"{where}.")
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image  # some clients send the bare URL
        return "image", _image_data(url, f"{where}.image_url")
    raise BadRequest(f"{where}.type must be \"text\" or \"image_url\", not {kind!r}")


def _image_data(url: Any, where: str) -> str:
    """The base64 payload of a data: URL; Ollama takes images as bare base64 and fetches nothing."""
    if isinstance(url, str) and url.startswith(("http://", "https://")):
        raise BadRequest(f"{where}: remote image URLs are not supported; send the image inline as a "
                         "base64 data: URL")
    header, _, data = url.partition(",") if isinstance(url, str) else ("", "", "")
    if not (header.startswith("data:") and header.endswith(";base64") and data):
        raise BadRequest(f"{where} must be a base64 data: URL such as data:image/png;base64,…")
    return data


def _ollama_tool_call(call: Any, where: str, names: dict[str, str]) -> JSON:
    function = _object(_object(call, where).get("function"), f"{where}.function")
    name = _get(function, "name", "a string", "", f"{where}.function.")
    if not name:
        raise BadRequest(f"{where}.function.name is required")
    arguments = _arguments(function.get("arguments"), f"{where}.function.arguments")
    out: JSON = {"function": {"name": name, "arguments": arguments}}
    call_id = call.get("id")
    if isinstance(call_id, str) and call_id:
        names[call_id] = name  # later tool results name their tool only by this id
        out["id"] = call_id
    return out


def _arguments(value: Any, where: str) -> JSON:
    """OpenAI carries tool arguments as a JSON string, Ollama as an object."""
    if isinstance(value, dict):
        return value
    if value is None or value == "":
        return {}
    try:
        parsed = strictjson.loads(value) if isinstance(value, str) else None
    except BadRequest:
        parsed = None
    if not isinstance(parsed, dict):
        raise BadRequest(f"{where} must be a JSON object encoded as a string")
    return parsed


def _tool_result(msg: JSON, where: str, names: dict[str, str]) -> JSON:
    """tool_name for a tool message: templates show the result under the name of the tool that ran."""
    call_id = _get(msg, "tool_call_id", "a string", "", where)
    name = _get(msg, "name", "a string", "", where) or names.get(call_id, "")
    out: JSON = {"tool_call_id": call_id} if call_id else {}
    return (out | {"tool_name": name}) if name else out


# ---------------------------------------------------------------------------------------------------
# Responses: Ollama → OpenAI


def ollama_response_to_openai(kind: str, model: str, resp: JSON, *, created: int | None = None,
                              id: str | None = None) -> JSON:
    """A non-streamed Ollama /api/chat or /api/generate answer as an OpenAI chat.completion
    (`kind` "chat") or text_completion (`kind` "completion"); `model` is the client-facing name."""
    envelope = _Envelope(kind, model, created=created, id=id)
    if kind == "chat":
        message, calls = _chat_message(resp)
        choice: JSON = {"index": 0, "message": message, "logprobs": None}
    else:
        calls = []
        choice = {"index": 0, "text": _text(resp.get("response")), "logprobs": None}
    choice["finish_reason"] = _finish_reason(resp.get("done_reason"), tool_calls=bool(calls))
    return envelope.frame([choice]) | {"usage": _usage(resp)}


def _chat_message(resp: JSON) -> tuple[JSON, list[JSON]]:
    message = _object_at(resp, "message")
    out: JSON = {"role": "assistant", "content": _text(message.get("content"))}
    thinking = _text(message.get("thinking"))
    if thinking:
        out["reasoning"] = thinking  # the field Ollama's /v1 layer uses
    calls = _openai_tool_calls(message.get("tool_calls"))
    if calls:
        out["tool_calls"] = calls
    return out, calls


def ollama_embed_to_openai(model: str, resp: JSON, *, encoding_format: str = "float") -> JSON:
    """An /api/embed answer as an OpenAI embeddings list; `encoding_format` is the client's
    (the official SDKs ask for "base64" unless told otherwise)."""
    encode = _base64_floats if _encoding(encoding_format) == "base64" else list
    vectors = [v for v in resp.get("embeddings") or [] if isinstance(v, list)]
    tokens = _count(resp.get("prompt_eval_count"))
    return {
        "object": "list",
        "data": [{"object": "embedding", "embedding": encode(v), "index": i} for i, v in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _base64_floats(vector: list[float]) -> str:
    # OpenAI's base64 format: little-endian float32s, which the SDKs decode with numpy or struct
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


class _Envelope:
    """The fields every response and chunk of one OpenAI answer shares."""

    def __init__(self, kind: str, model: str, *, created: int | None, id: str | None) -> None:
        if kind not in ("chat", "completion"):
            raise ValueError(f"kind must be 'chat' or 'completion', not {kind!r}")
        self.kind = kind
        self.model = model
        self.created = int(time.time()) if created is None else created
        self.id = id or f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(12)}"

    def frame(self, choices: list[JSON], *, chunk: bool = False) -> JSON:
        if self.kind == "completion":
            obj = "text_completion"  # OpenAI names completion chunks like the whole answer
        else:
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": FINGERPRINT, "choices": choices}


def _openai_tool_calls(calls: Any) -> list[JSON]:
    found = [c for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []
    return [_openai_tool_call(call) for call in found]


def _openai_tool_call(call: JSON) -> JSON:
    function = _object_at(call, "function")
    arguments = function.get("arguments", {})
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    given = call.get("id")
    # older Ollama builds send no id, but OpenAI clients need one to answer the call
    call_id = given if isinstance(given, str) and given else _call_id()
    return {"id": call_id, "type": "function", "function": {"name": _text(function.get("name")),
                                                             "arguments": text}}


def _call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def _finish_reason(done_reason: Any, *, tool_calls: bool) -> str:
    if tool_calls:
        return "tool_calls"  # Ollama says "stop"; OpenAI clients look for "tool_calls"
    return done_reason if done_reason in _FINISH_REASONS else "stop"


def _usage(resp: JSON) -> JSON:
    prompt, completion = _count(resp.get("prompt_eval_count")), _count(resp.get("eval_count"))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _count(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


# ---------------------------------------------------------------------------------------------------
# Streaming: Ollama NDJSON → OpenAI SSE


class OpenAIStreamTranslator:
    """Feeds Ollama NDJSON bytes (arbitrary chunk boundaries), yields OpenAI SSE frames
    (b"data: {...}\\n\\n"), ending with b"data: [DONE]\\n\\n".

    `kind` is "chat" (chat.completion.chunk) or "completion" (text_completion); `model` is the
    client-facing name. An Ollama {"error": …} line becomes one data: {"error": {…}} frame and ends
    the stream without [DONE], as newer llama-server builds do and the OpenAI SDKs raise on.
    """

    def __init__(self, kind: str, model: str, *, include_usage: bool = False, created: int | None = None,
                 id: str | None = None) -> None:
        self._envelope = _Envelope(kind, model, created=created, id=id)
        self.kind = kind
        self.model = model
        self.include_usage = include_usage
        self.done = False
        self._buffer = b""
        self._started = False
        self._tool_calls = 0
        self._finish_reason: str | None = None

    def __repr__(self) -> str:
        return (f"<OpenAIStreamTranslator {self.kind} model={self.model!r} tool_calls={self._tool_calls} "
                f"finish_reason={self._finish_reason} done={self.done}>")

    @property
    def id(self) -> str:
        return self._envelope.id

    def feed(self, data: bytes) -> list[bytes]:
        """Translate every complete NDJSON line in `data` (plus what was buffered); return the frames due."""
        if self.done:
            return []
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        out: list[bytes] = []
        for line in lines:
            out += self._line(line)
            if self.done:
                self._buffer = b""  # nothing may follow the end of the stream
                break
        return out

    def finish(self) -> list[bytes]:
        """Call when upstream closed: the frames still due. Ollama always ends with a done:true line,
        so a stream that closed without one was cut short, and the client is told so."""
        if self.done:
            return []
        pending, self._buffer = self._buffer, b""
        out = self._line(pending)  # an upstream may close right after its last line, without "\n"
        if self.done:
            return out
        return out + self._fail({"error": "upstream closed the stream before the answer was complete"})

    def fail(self, status: int, message: str) -> list[bytes]:
        """End the stream with a data: {"error": {…}} frame, which the OpenAI SDKs raise on."""
        return [] if self.done else self._fail({"error": message}, status)

    # --- lines

    def _line(self, line: bytes) -> list[bytes]:
        if not line.strip():
            return []
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):  # not JSON, or nested too deep to read
            obj = None
        if not isinstance(obj, dict):
            return self._fail({"error": f"upstream sent a malformed stream line: {line[:200]!r}"})
        if "error" in obj:
            return self._fail(obj)
        return self._chat(obj) if self.kind == "chat" else self._completion(obj)

    def _chat(self, obj: JSON) -> list[bytes]:
        message, calls = _chat_message(obj)
        out = [] if self._started else [self._chunk({"role": "assistant", "content": ""})]
        self._started = True
        delta = {key: message[key] for key in ("content", "reasoning") if message.get(key)}
        if delta:
            out.append(self._chunk(delta))
        if calls:  # Ollama may send calls before the final line; index them across the whole stream
            calls = [{"index": self._tool_calls + i, **call} for i, call in enumerate(calls)]
            self._tool_calls += len(calls)
            out.append(self._chunk({"tool_calls": calls}))
        return (out + self._end(obj, {})) if obj.get("done") else out

    def _completion(self, obj: JSON) -> list[bytes]:
        text = _text(obj.get("response"))
        out = [self._chunk(text)] if text else []
        return (out + self._end(obj, "")) if obj.get("done") else out

    def _end(self, obj: JSON, empty: JSON | str) -> list[bytes]:
        self.done = True
        self._finish_reason = _finish_reason(obj.get("done_reason"), tool_calls=self._tool_calls > 0)
        out = [self._chunk(empty, finish_reason=self._finish_reason)]
        if self.include_usage:
            out.append(_sse(self._envelope.frame([], chunk=True) | {"usage": _usage(obj)}))
        return [*out, DONE_FRAME]

    def _fail(self, body: JSON, status: int = 500) -> list[bytes]:
        self.done = True
        return [_sse(ollama_error_to_openai(body, status))]

    # --- frames

    def _chunk(self, payload: JSON | str, *, finish_reason: str | None = None) -> bytes:
        """A chunk carrying `payload`: the delta for chat, the text for completions."""
        key = "delta" if self.kind == "chat" else "text"
        choice = {"index": 0, key: payload, "logprobs": None, "finish_reason": finish_reason}
        return _sse(self._envelope.frame([choice], chunk=True))


def _sse(obj: JSON) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
