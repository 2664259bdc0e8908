"""Ollama ⇄ OpenAI dialect translation for models that live on llama.cpp servers; pure functions, no I/O.

Owns the request mapping (/api/* → /v1/*), the SSE → NDJSON stream translator, the non-streamed
response, embedding and error mappings, and the Ollama/OpenAI listing entries for such models.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from warmpool.dialects.jsonfields import JSON, parse_arguments
from warmpool.dialects.jsonfields import as_object as _object
from warmpool.dialects.jsonfields import get as _get
from warmpool.dialects.jsonfields import object_at as _object_at
from warmpool.dialects.sse import Event, SSEDecoder
from warmpool.errors import BadRequest

Request = tuple[str, JSON]

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
EMBEDDINGS_PATH = "/v1/embeddings"

OLLAMA_TO_OPENAI_PATH: dict[str, str] = {
    "/api/chat": CHAT_PATH,
    "/api/generate": CHAT_PATH,  # raw or suffix requests go to COMPLETIONS_PATH instead
    "/api/embed": EMBEDDINGS_PATH,
    "/api/embeddings": EMBEDDINGS_PATH,
}

_FLOAT_OPTIONS = ("temperature", "top_p", "min_p", "typical_p", "repeat_penalty",
                  "presence_penalty", "frequency_penalty")
_INT_OPTIONS = ("top_k", "seed")
_IMAGE_MAGIC = (("/9j/", "image/jpeg"), ("iVBORw0KGgo", "image/png"), ("R0lGOD", "image/gif"),
                ("UklGR", "image/webp"))
_RAW_CONFLICT = "raw mode does not support template, system, or context"  # Ollama's own wording


# ---------------------------------------------------------------------------------------------------
# Requests: Ollama → OpenAI


def ollama_request_to_openai(path: str, body: JSON, upstream_model: str) -> Request:
    """Translate an Ollama request to (OpenAI path, OpenAI body) addressed to `upstream_model`.

    Preload requests (see `is_ollama_preload`) translate too, but upstreams reject some of them;
    answer those with `ollama_preload_response` instead.
    """
    builder = _REQUEST_BUILDERS.get(path)
    if builder is None:
        raise BadRequest(f"{path} cannot be translated to the OpenAI dialect")
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return builder(body, upstream_model)


def _chat_request(body: JSON, model: str) -> Request:
    messages = _get(body, "messages", "a list", [])
    fields: JSON = {"messages": _chat_messages(messages)}
    tools = _get(body, "tools", "a list", [])
    if tools:
        # Ollama's tool definitions are already in the OpenAI {"type":"function","function":{...}} shape
        fields["tools"] = [_object(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    return CHAT_PATH, _openai_body(body, fields, model)


def _generate_request(body: JSON, model: str) -> Request:
    prompt = _get(body, "prompt", "a string", "")
    suffix = _get(body, "suffix", "a string", "")
    raw = _get(body, "raw", "a boolean", False)
    _reject_untranslatable(body, raw)
    if raw or suffix:
        return COMPLETIONS_PATH, _completion_body(body, prompt, suffix, model)
    # a non-raw generate is templated by Ollama, so it becomes a chat request on llama.cpp
    return CHAT_PATH, _openai_body(body, {"messages": _generate_messages(body, prompt)}, model)


def _embed_request(body: JSON, model: str) -> Request:
    given = body.get("input", [])
    if not (isinstance(given, str) or (isinstance(given, list) and all(isinstance(s, str) for s in given))):
        raise BadRequest("input must be a string or a list of strings")
    fields: JSON = {"model": model, "input": given}
    dimensions = _get(body, "dimensions", "a number")
    if dimensions is not None:
        fields["dimensions"] = int(dimensions)
    return EMBEDDINGS_PATH, fields


def _embeddings_request(body: JSON, model: str) -> Request:
    return EMBEDDINGS_PATH, {"model": model, "input": _get(body, "prompt", "a string", "")}


_REQUEST_BUILDERS: dict[str, Callable[[JSON, str], Request]] = {
    "/api/chat": _chat_request,
    "/api/generate": _generate_request,
    "/api/embed": _embed_request,
    "/api/embeddings": _embeddings_request,
}


def _reject_untranslatable(body: JSON, raw: bool) -> None:
    if body.get("template"):
        raise BadRequest("template is not supported here: llama.cpp applies the model's own chat template")
    if body.get("context"):
        raise BadRequest("context (token ids) is not supported here; send the conversation to /api/chat")
    if raw and body.get("system"):
        raise BadRequest(_RAW_CONFLICT)


def _completion_body(body: JSON, prompt: str, suffix: str, model: str) -> JSON:
    if body.get("images"):
        raise BadRequest("images need the chat template, so they cannot be combined with raw or suffix")
    fields: JSON = {"prompt": prompt}
    if suffix:
        fields["suffix"] = suffix  # a fill-in-middle request; a system prompt has no place in it
    out = _openai_body(body, fields, model)
    # llama-cpp-python's /v1/completions stops after 16 tokens unless told; null means "no limit"
    out.setdefault("max_tokens", None)
    return out


def _generate_messages(body: JSON, prompt: str) -> list[JSON]:
    system = _get(body, "system", "a string", "")
    content = _message_content({"content": prompt, "images": body.get("images")}, "")
    user = {"role": "user", "content": content}
    return ([{"role": "system", "content": system}] if system else []) + [user]


def _openai_body(body: JSON, fields: JSON, model: str) -> JSON:
    """`fields` plus what chat and completions share: model, stream, format and sampling options."""
    stream = _get(body, "stream", "a boolean", True)  # Ollama streams unless told otherwise
    sampling = _sampling(_get(body, "options", "an object", {}))
    out: JSON = {"model": model, **fields, "stream": stream, **sampling}
    if stream:
        out["stream_options"] = {"include_usage": True}  # so the final line can report token counts
    response_format = _response_format(body.get("format"))
    if response_format:
        out["response_format"] = response_format
    return out


def _response_format(fmt: Any) -> JSON | None:
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        # {"type":"json_object","schema":…} is the one schema form both llama-server and
        # llama-cpp-python accept; the latter rejects "json_schema" with a 422
        return {"type": "json_object", "schema": fmt}
    raise BadRequest('format must be "json" or a JSON schema object')


def _sampling(options: JSON) -> JSON:
    """The per-request options llama.cpp understands; load-time ones (num_ctx, num_gpu…) can't apply."""
    out: JSON = {}
    for key in _FLOAT_OPTIONS + _INT_OPTIONS:
        value = _get(options, key, "a number", where="options.")
        if value is not None:
            out[key] = int(value) if key in _INT_OPTIONS else value
    stop = _stop(options.get("stop"))
    if stop:
        out["stop"] = stop
    num_predict = _get(options, "num_predict", "a number", where="options.")
    if num_predict is not None and num_predict >= 0:  # -1 (forever) and -2 (fill context) mean no limit
        out["max_tokens"] = int(num_predict)
    return out


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise BadRequest("options.stop must be a string or a list of strings")


# --- chat messages


class _ToolCallIds:
    """Gives Ollama tool calls the ids OpenAI requires and pairs tool results with them by tool name."""

    def __init__(self) -> None:
        self._open: dict[str, list[str]] = {}
        self._issued = 0

    def issue(self, name: str, given: Any) -> str:
        call_id = given if isinstance(given, str) and given else f"call_{self._issued}"
        self._issued += 1
        self._open.setdefault(name, []).append(call_id)
        return call_id

    def answer(self, name: str, given: Any) -> str:
        waiting = self._open.get(name, [])
        if isinstance(given, str) and given:
            if given in waiting:
                waiting.remove(given)
            return given
        return waiting.pop(0) if waiting else f"call_{name or 'unknown'}"


def _chat_messages(messages: list[Any]) -> list[JSON]:
    ids = _ToolCallIds()
    return [_chat_message(_object(msg, f"messages[{i}]"), f"messages[{i}].", ids)
            for i, msg in enumerate(messages)]


def _chat_message(msg: JSON, where: str, ids: _ToolCallIds) -> JSON:
    role = _get(msg, "role", "a string", "", where)
    if not role:
        raise BadRequest(f"{where}role is required")
    role = role.lower()  # Ollama lower-cases roles before templating
    out: JSON = {"role": role, "content": _message_content(msg, where)}
    calls = _get(msg, "tool_calls", "a list", [], where)
    if calls:
        out["tool_calls"] = [_openai_tool_call(call, f"{where}tool_calls[{j}]", ids)
                             for j, call in enumerate(calls)]
    if role == "tool":
        tool_name = _get(msg, "tool_name", "a string", "", where)
        out["tool_call_id"] = ids.answer(tool_name, msg.get("tool_call_id"))
    return out


def _message_content(msg: JSON, where: str) -> str | list[JSON]:
    text: str = _get(msg, "content", "a string", "", where)
    images = _get(msg, "images", "a list", [], where)
    if not images:
        return text
    # images first: llava-style handlers and most vision templates expect the picture before the question
    parts = [_image_part(image, f"{where}images[{k}]") for k, image in enumerate(images)]
    return [*parts, {"type": "text", "text": text}] if text else parts


def _image_part(image: Any, where: str) -> JSON:
    if not isinstance(image, str) or not image:
        raise BadRequest(f"{where} must be a base64-encoded image")
    url = image if image.startswith("data:") else f"data:{_image_mime(image)};base64,{image}"
    return {"type": "image_url", "image_url": {"url": url}}


def _image_mime(b64: str) -> str:
    return next((mime for magic, mime in _IMAGE_MAGIC if b64.startswith(magic)), "image/png")


def _openai_tool_call(call: Any, where: str, ids: _ToolCallIds) -> JSON:
    function = _object(call, where).get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise BadRequest(f"{where}.function.name must be a string")
    arguments = function.get("arguments", {})
    # OpenAI carries arguments as a JSON string, Ollama as an object
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    name = function["name"]
    return {"id": ids.issue(name, call.get("id")), "type": "function",
            "function": {"name": name, "arguments": text}}


# ---------------------------------------------------------------------------------------------------
# Responses: OpenAI → Ollama


@dataclass
class _Usage:
    """Token counts and timings gathered from OpenAI `usage` and llama-server `timings` objects."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_ns: int | None = None
    eval_ns: int | None = None

    def absorb(self, obj: JSON) -> None:
        timings = obj.get("timings")
        if isinstance(timings, dict):
            self.prompt_ns = _ms_to_ns(timings.get("prompt_ms"), self.prompt_ns)
            self.eval_ns = _ms_to_ns(timings.get("predicted_ms"), self.eval_ns)
            self.prompt_tokens = _count(timings.get("prompt_n"), self.prompt_tokens)
            self.completion_tokens = _count(timings.get("predicted_n"), self.completion_tokens)
        usage = obj.get("usage")
        if isinstance(usage, dict):  # usage wins over timings: it is what OpenAI clients would see
            self.prompt_tokens = _count(usage.get("prompt_tokens"), self.prompt_tokens)
            self.completion_tokens = _count(usage.get("completion_tokens"), self.completion_tokens)

    def metrics(self, *, total_ns: int, prompt_ns: int, eval_ns: int, eval_count: int, load_ns: int = 0) -> JSON:
        """Ollama's final-line metrics; the keyword values are fallbacks for what upstream didn't report;
        `load_ns` is the wait for the model, which Ollama counts as load_duration."""
        return {
            "total_duration": max(0, total_ns),
            "load_duration": max(0, load_ns),
            "prompt_eval_count": _first(self.prompt_tokens, 0),
            "prompt_eval_duration": max(0, _first(self.prompt_ns, prompt_ns)),
            "eval_count": _first(self.completion_tokens, eval_count),
            "eval_duration": max(0, _first(self.eval_ns, eval_ns)),
        }


def _count(value: Any, fallback: int | None) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else fallback


def _ms_to_ns(value: Any, fallback: int | None) -> int | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return round(value * 1_000_000)
    return fallback


def _first(value: int | None, fallback: int) -> int:
    return value if value is not None else fallback


def _envelope(kind: str, model: str, text: str, *, thinking: str = "", done: bool) -> JSON:
    """The part every chat/generate object shares; chat carries the text in `message`."""
    extra = {"thinking": thinking} if thinking else {}
    if kind == "chat":
        body: JSON = {"message": {"role": "assistant", "content": text, **extra}}
    else:
        body = {"response": text, **extra}
    return {"model": model, "created_at": rfc3339_now(), **body, "done": done}


def _done_reason(finish_reason: Any) -> str:
    # Ollama only knows stop and length; "tool_calls" is a stop that carries calls
    return "length" if finish_reason == "length" else "stop"


def _first_choice(obj: JSON) -> JSON | None:
    choices = obj.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    return None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _ollama_tool_call(name: str, arguments: Any, call_id: Any = None) -> JSON:
    out: JSON = {"function": {"name": name, "arguments": parse_arguments(arguments)}}
    if isinstance(call_id, str) and call_id:
        out["id"] = call_id
    return out


def openai_response_to_ollama(kind: str, model: str, resp: JSON, *, total_duration_ns: int,
                              load_duration_ns: int = 0) -> JSON:
    """A non-streamed chat.completion or text_completion as an Ollama chat/generate response."""
    choice = _first_choice(resp) or {}
    message = choice.get("message")
    if not isinstance(message, dict):
        message = {"content": choice.get("text")}  # a /v1/completions choice
    out = _envelope(kind, model, _text(message.get("content")),
                    thinking=_text(message.get("reasoning_content")), done=True)
    out["done_reason"] = _done_reason(choice.get("finish_reason"))
    calls = [c for c in message.get("tool_calls") or [] if isinstance(c, dict)]
    if kind == "chat" and calls:
        out["message"]["tool_calls"] = [_ollama_tool_call_from_openai(call) for call in calls]
    usage = _Usage()
    usage.absorb(resp)
    # without upstream timings the whole wall time is the best guess for generation time
    out.update(usage.metrics(total_ns=total_duration_ns, prompt_ns=0,
                             eval_ns=max(0, total_duration_ns - load_duration_ns), eval_count=0,
                             load_ns=load_duration_ns))
    return out


def _ollama_tool_call_from_openai(call: JSON) -> JSON:
    function = _object_at(call, "function")
    return _ollama_tool_call(_text(function.get("name")), function.get("arguments"), call.get("id"))


def openai_embeddings_to_ollama(path: str, model: str, resp: JSON, *, total_duration_ns: int,
                                load_duration_ns: int = 0) -> JSON:
    """An OpenAI embeddings list as the /api/embed or legacy /api/embeddings response."""
    vectors = _embedding_vectors(resp)
    if path == "/api/embeddings":
        return {"embedding": vectors[0] if vectors else []}
    usage = _object_at(resp, "usage")
    return {
        "model": model,
        "embeddings": [_l2_normalize(v) for v in vectors],  # /api/embed always returns unit vectors
        "total_duration": total_duration_ns,
        "load_duration": load_duration_ns,
        "prompt_eval_count": _first(_count(usage.get("prompt_tokens"), None), 0),
    }


def _embedding_vectors(resp: JSON) -> list[list[float]]:
    data = [d for d in resp.get("data") or [] if isinstance(d, dict)]
    data.sort(key=lambda d: d.get("index", 0))  # OpenAI doesn't promise order, only the index
    return [d.get("embedding") or [] for d in data]


def _l2_normalize(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm > 0 else vector


# ---------------------------------------------------------------------------------------------------
# Streaming: OpenAI SSE → Ollama NDJSON


class _ToolCallFragments:
    """Joins streamed OpenAI tool-call fragments, keyed by their index, into whole calls."""

    def __init__(self) -> None:
        self._calls: dict[int, JSON] = {}

    def __bool__(self) -> bool:
        return bool(self._calls)

    def add(self, fragments: Any) -> bool:
        """Absorb a delta's `tool_calls`; True if it carried any."""
        found = False
        for fragment in fragments if isinstance(fragments, list) else []:
            if isinstance(fragment, dict):
                self._add_one(fragment)
                found = True
        return found

    def _add_one(self, fragment: JSON) -> None:
        index = fragment.get("index")
        empty: JSON = {"id": "", "name": "", "arguments": ""}
        call = self._calls.setdefault(index if isinstance(index, int) else 0, empty)
        function = _object_at(fragment, "function")
        call["id"] = fragment.get("id") or call["id"]
        # OpenAI sends the name once, llama-cpp-python in every fragment: assign, never concatenate
        call["name"] = function.get("name") or call["name"]
        call["arguments"] += _text(function.get("arguments"))

    def ollama(self) -> list[JSON]:
        return [_ollama_tool_call(c["name"], c["arguments"], c["id"]) for _, c in sorted(self._calls.items())]


class OllamaStreamTranslator:
    """Feeds raw SSE bytes from the OpenAI upstream (arbitrary chunk boundaries) and yields Ollama
    NDJSON lines (bytes ending in b"\\n"): one per text delta, then a final done:true line with metrics.

    `kind` is "chat" or "generate" (the Ollama shape to produce; the upstream may be chat or
    completions either way); `model` is the client-facing name to echo; `started` is when the
    request arrived on `clock`'s scale.
    """

    def __init__(self, kind: str, model: str, *, clock: Callable[[], float] = time.monotonic,
                 started: float | None = None, load_ns: int = 0) -> None:
        if kind not in ("chat", "generate"):
            raise ValueError(f"kind must be 'chat' or 'generate', not {kind!r}")
        self.kind = kind
        self.model = model
        self.done = False
        self._clock = clock
        self._started = clock() if started is None else started
        self._load_ns = load_ns
        self._first_token_at: float | None = None
        self._sse = SSEDecoder()
        self._finish_reason: str | None = None
        self._deltas = 0
        self._usage = _Usage()
        self._tools = _ToolCallFragments()

    def __repr__(self) -> str:
        return (f"<OllamaStreamTranslator {self.kind} model={self.model!r} deltas={self._deltas} "
                f"finish_reason={self._finish_reason} done={self.done}>")

    def feed(self, data: bytes) -> list[bytes]:
        """Parse every complete SSE line in `data` (plus what was buffered); return the NDJSON lines due."""
        if self.done:
            return []
        return self._events(self._sse.feed(data))

    def finish(self) -> list[bytes]:
        """The final done:true line, if not yet sent (upstream ended without [DONE] or finish_reason)."""
        if self.done:
            return []
        # be lenient with an upstream that closed right after its last line, without the blank line
        out = self._events(self._sse.finish())
        return out if self.done else out + self._complete()

    def fail(self, status: int, message: str) -> list[bytes]:
        """End the stream with a final {"error"} line, as Ollama does mid-stream."""
        return [] if self.done else self._fail(message)

    # --- SSE events (dialects/sse.py decodes them: comments, id:, retry: are dropped, and an "error:"
    # field, which older llama-server builds framed mid-stream errors with, names the event "error")

    def _events(self, events: list[Event]) -> list[bytes]:
        out: list[bytes] = []
        for event in events:
            out += self._event(event.data, is_error=event.name == "error")
            if self.done:
                break  # nothing may follow the end of the stream
        return out

    def _event(self, data: str, *, is_error: bool) -> list[bytes]:
        if data.strip() == "[DONE]":
            return self._complete()
        try:
            event = json.loads(data)
        except (ValueError, RecursionError):  # not JSON, or nested too deep to read
            event = None
        if is_error or (isinstance(event, dict) and "error" in event):
            return self._fail(_error_message(event if event is not None else data))
        if not isinstance(event, dict):
            return self._fail(f"upstream sent a malformed stream event: {data[:200]!r}")
        return self._chunk(event)

    # --- chunks

    def _chunk(self, chunk: JSON) -> list[bytes]:
        self._usage.absorb(chunk)
        choice = _first_choice(chunk)
        if choice is None:  # the include_usage chunk has choices: []
            return []
        self._finish_reason = choice.get("finish_reason") or self._finish_reason
        delta = choice.get("delta") if "delta" in choice else {"content": choice.get("text")}
        delta = delta if isinstance(delta, dict) else {}
        if self._tools.add(delta.get("tool_calls")):
            self._mark_first_token()
        text, thinking = _text(delta.get("content")), _text(delta.get("reasoning_content"))
        if not (text or thinking):
            return []
        self._mark_first_token()
        self._deltas += 1
        return [_ndjson(_envelope(self.kind, self.model, text, thinking=thinking, done=False))]

    def _complete(self) -> list[bytes]:
        self.done = True
        return [_ndjson(self._final())]

    def _mark_first_token(self) -> None:
        if self._first_token_at is None:
            self._first_token_at = self._clock()

    def _final(self) -> JSON:
        end = self._clock()
        first = self._first_token_at if self._first_token_at is not None else end
        out = _envelope(self.kind, self.model, "", done=True)
        out["done_reason"] = _done_reason(self._finish_reason)
        if self.kind == "chat" and self._tools:
            out["message"]["tool_calls"] = self._tools.ollama()
        out.update(self._usage.metrics(total_ns=_ns(end - self._started),
                                       prompt_ns=max(0, _ns(first - self._started) - self._load_ns),
                                       eval_ns=_ns(end - first), eval_count=self._deltas, load_ns=self._load_ns))
        return out

    def _fail(self, message: str) -> list[bytes]:
        self.done = True
        return [_ndjson({"error": message})]


def _ndjson(obj: JSON) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _ns(seconds: float) -> int:
    return max(0, round(seconds * 1_000_000_000))


# ---------------------------------------------------------------------------------------------------
# Errors, both directions


def openai_error_to_ollama(body: bytes | JSON) -> JSON:
    """{"error": message} from an OpenAI error, a FastAPI {"detail": …} or a plain-text body."""
    if isinstance(body, (bytes, bytearray)):
        return {"error": _error_message(_decode(bytes(body)))}
    return {"error": _error_message(body)}


def ollama_error_to_openai(body: JSON, status: int) -> JSON:
    """The OpenAI error object for an Ollama {"error": …} body, typed by status like Ollama's /v1 layer."""
    message = _error_message(body) if body else f"upstream answered HTTP {status}"
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _decode(raw: bytes) -> Any:
    text = raw.decode("utf-8", "replace").strip()
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def _error_message(body: Any) -> str:
    if isinstance(body, dict):
        for key in ("error", "message", "detail"):
            if body.get(key):  # {"error": {"message": …}} nests; recurse until a string
                return _error_message(body[key])
        return json.dumps(body) if body else "upstream error"
    if isinstance(body, list):  # FastAPI validation errors: [{"loc": […], "msg": …}, …]
        return "; ".join(_validation_issue(item) for item in body) or "upstream error"
    return str(body) if body not in (None, "") else "upstream error"


def _validation_issue(item: Any) -> str:
    if isinstance(item, dict) and "msg" in item:
        loc = ".".join(str(part) for part in item.get("loc") or [])
        return f"{loc}: {item['msg']}" if loc else str(item["msg"])
    return _error_message(item)


# ---------------------------------------------------------------------------------------------------
# Preloads, timestamps and listing entries


def is_ollama_preload(path: str, body: JSON) -> bool:
    """True for Ollama's "load (or, with keep_alive 0, unload) without generating" requests."""
    if path == "/api/generate":
        return not body.get("prompt")  # Ollama checks the prompt alone
    if path == "/api/chat":
        return not body.get("messages")
    if path == "/api/embed":
        return not body.get("input")
    return path == "/api/embeddings" and not body.get("prompt")


def ollama_preload_response(path: str, model: str, *, unload: bool = False) -> JSON:
    """What Ollama answers to a preload request on `path` (done_reason "load" or "unload")."""
    if path == "/api/embed":
        return {"model": model, "embeddings": []}
    if path == "/api/embeddings":
        return {"embedding": []}
    out = _envelope("chat" if path == "/api/chat" else "generate", model, "", done=True)
    out["done_reason"] = "unload" if unload else "load"
    return out


def rfc3339_now(clock: Callable[[], float] = time.time) -> str:
    """`clock()` (epoch seconds, UTC) as Go's RFC3339Nano, like Ollama's created_at."""
    # a float epoch holds about a microsecond of precision; finer digits would be noise
    seconds, micros = divmod(round(clock() * 1_000_000), 1_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    fraction = f"{micros:06d}".rstrip("0")  # Go trims trailing zeros, and the dot with them
    return f"{stamp}.{fraction}Z" if fraction else f"{stamp}Z"


def with_default_tag(name: str) -> str:
    """Ollama's display form of a model name: ":latest" appended when there is no tag.

    A ':' before the last '/' belongs to a registry host:port, not to a tag.
    """
    return name if ":" in name.rpartition("/")[2] else f"{name}:latest"


def _details(family: str, quantization: str, parameter_size: str) -> JSON:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family] if family else None,
        "parameter_size": parameter_size,
        "quantization_level": quantization,
    }


def ollama_tag_entry(name: str, *, size: int, modified_at: str, digest: str, family: str = "",
                     quantization: str = "", parameter_size: str = "") -> JSON:
    """One model of GET /api/tags; `size` is the size on disk in bytes."""
    tagged = with_default_tag(name)
    return {"name": tagged, "model": tagged, "modified_at": modified_at, "size": size, "digest": digest,
            "details": _details(family, quantization, parameter_size)}


def ollama_ps_entry(name: str, *, size: int, expires_at: str, digest: str, context_length: int,
                    family: str = "", quantization: str = "", parameter_size: str = "") -> JSON:
    """One model of GET /api/ps; size_vram is 0 because warmpool can't see llama.cpp's GPU split."""
    tagged = with_default_tag(name)
    return {"name": tagged, "model": tagged, "size": size, "digest": digest,
            "details": _details(family, quantization, parameter_size), "expires_at": expires_at,
            "size_vram": 0, "context_length": context_length}


def openai_model_entry(name: str, *, created: int, owned_by: str) -> JSON:
    """One model of GET /v1/models."""
    return {"id": name, "object": "model", "created": created, "owned_by": owned_by}
