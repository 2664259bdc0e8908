"""OpenAI Responses API ⇄ OpenAI chat completions, for every upstream (none that warmpool manages serves
/v1/responses with the same behaviour, and Ollama's is stateless too); pure functions, no I/O.

Owns the request mapping (/v1/responses → /v1/chat/completions: instructions, input items, function tools and
their outputs, text.format, reasoning.effort), the whole response object, and the streamed events
(response.created, response.in_progress, output items with their content parts and deltas,
response.completed or response.incomplete; an upstream failure ends with `error` and response.failed).

warmpool keeps no conversation state: previous_response_id, conversation and background mode are refused with
a 400 saying so, as are hosted tools (web search, file search, computer use, MCP).
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from warmpool.dialects import openai_chat as chat
from warmpool.dialects.jsonfields import JSON, as_object, get, object_at
from warmpool.dialects.sse import frame
from warmpool.errors import OPENAI_TYPES, BadRequest

CHAT_PATH = "/v1/chat/completions"
RESPONSES_PATH = "/v1/responses"

_STATELESS = ("previous_response_id", "conversation")
_INPUT_ROLES = ("user", "system", "developer", "assistant")
# fields echoed into the response object as the client sent them (or their documented defaults)
_ECHOED: JSON = {"instructions": None, "max_output_tokens": None, "metadata": {}, "parallel_tool_calls": True,
                 "temperature": None, "tool_choice": "auto", "tools": [], "top_p": None, "truncation": "disabled",
                 "user": None, "reasoning": None}


# ---------------------------------------------------------------------------------------------------
# Requests: Responses → chat


def responses_request_to_openai(body: JSON, upstream_model: str) -> JSON:
    """The chat-completions body for a Responses API request, addressed to `upstream_model`."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    for key in _STATELESS:
        if body.get(key):
            raise BadRequest(f"{key} is not supported: warmpool keeps no conversation state; send the whole "
                             "conversation in input")
    if body.get("background") is True:
        raise BadRequest("background is not supported: answers are streamed or returned directly")
    stream = get(body, "stream", "a boolean", False)
    out: JSON = {"model": upstream_model, "messages": _messages(body), "stream": stream}
    if stream:
        out["stream_options"] = {"include_usage": True}
    limit = get(body, "max_output_tokens", "a number")
    if limit is not None:
        out["max_tokens"] = int(limit)
    for key in ("temperature", "top_p"):
        value = get(body, key, "a number")
        if value is not None:
            out[key] = value
    parallel = get(body, "parallel_tool_calls", "a boolean")
    if parallel is not None:
        out["parallel_tool_calls"] = parallel
    out.update(_tools(body))
    fmt = _format(object_at(body, "text").get("format"))
    if fmt is not None:
        out["response_format"] = fmt
    effort = object_at(body, "reasoning").get("effort")
    if isinstance(effort, str):
        out["reasoning_effort"] = effort
    return out


def _messages(body: JSON) -> list[JSON]:
    instructions = get(body, "instructions", "a string", "")
    out: list[JSON] = [{"role": "system", "content": instructions}] if instructions else []
    given = body.get("input")
    if isinstance(given, str):
        return [*out, {"role": "user", "content": given}]
    if not isinstance(given, list) or not given:
        raise BadRequest("input must be a string or a non-empty list of input items")
    pending_reasoning = ""
    for i, item in enumerate(given):
        item = as_object(item, f"input[{i}]")
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            message = _message(item, where)
            if message["role"] == "assistant" and pending_reasoning:
                message["reasoning_content"], pending_reasoning = pending_reasoning, ""
            out.append(message)
        elif kind == "function_call":
            _add_call(out, _function_call(item, where), pending_reasoning)
            pending_reasoning = ""
        elif kind == "function_call_output":
            out.append(_function_output(item, where))
        elif kind == "reasoning":  # the model's earlier reasoning goes back with the assistant turn after it
            pending_reasoning += _reasoning_text(item)
        else:
            raise BadRequest(f"{where}.type {kind!r} is not supported here (message, function_call, "
                             "function_call_output and reasoning are)")
    return out


def _message(item: JSON, where: str) -> JSON:
    role = get(item, "role", "a string", "", f"{where}.")
    if role not in _INPUT_ROLES:
        raise BadRequest(f"{where}.role must be one of {', '.join(_INPUT_ROLES)}")
    content = item.get("content")
    role = "system" if role == "developer" else role
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content must be a string or a list of content parts")
    parts = [_part(as_object(p, f"{where}.content[{k}]"), f"{where}.content[{k}]") for k, p in enumerate(content)]
    if role != "user" or all(p["type"] == "text" for p in parts):
        if any(p["type"] != "text" for p in parts):
            raise BadRequest(f"{where}: only user messages may carry images")
        return {"role": role, "content": "".join(p["text"] for p in parts)}
    return {"role": role, "content": parts}


def _part(part: JSON, where: str) -> JSON:
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": get(part, "text", "a string", "", f"{where}.")}
    if kind == "refusal":
        return {"type": "text", "text": get(part, "refusal", "a string", "", f"{where}.")}
    if kind == "input_image":
        url = get(part, "image_url", "a string", "", f"{where}.")
        if not url:
            raise BadRequest(f"{where}.image_url is required (a data: URL or an http(s) URL; file_id is not "
                             "supported)")
        image: JSON = {"url": url}
        if isinstance(part.get("detail"), str):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    raise BadRequest(f"{where}.type {kind!r} is not supported here (input_text, output_text and input_image are)")


def _function_call(item: JSON, where: str) -> JSON:
    call_id = get(item, "call_id", "a string", "", f"{where}.")
    name = get(item, "name", "a string", "", f"{where}.")
    if not call_id or not name:
        raise BadRequest(f"{where} needs a call_id and a name")
    arguments = get(item, "arguments", "a string", "{}", f"{where}.")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _add_call(messages: list[JSON], call: JSON, reasoning: str) -> None:
    """Consecutive function calls are one assistant turn in the chat API; so is a call right after text."""
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant" and not reasoning:
        last.setdefault("tool_calls", []).append(call)
        return
    turn: JSON = {"role": "assistant", "content": "", "tool_calls": [call]}
    if reasoning:
        turn["reasoning_content"] = reasoning
    messages.append(turn)


def _function_output(item: JSON, where: str) -> JSON:
    call_id = get(item, "call_id", "a string", "", f"{where}.")
    if not call_id:
        raise BadRequest(f"{where}.call_id is required")
    output = item.get("output")
    if isinstance(output, list):  # a list of input_text parts
        parts = [_part(as_object(p, f"{where}.output[{k}]"), f"{where}.output[{k}]") for k, p in enumerate(output)]
        if any(p["type"] != "text" for p in parts):
            raise BadRequest(f"{where}.output: only text can be returned to the model from a function call here")
        output = "".join(p["text"] for p in parts)
    if not isinstance(output, str):
        raise BadRequest(f"{where}.output must be a string or a list of input_text parts")
    return {"role": "tool", "tool_call_id": call_id, "content": output}


def _reasoning_text(item: JSON) -> str:
    texts = [p.get("text") for key in ("content", "summary") for p in item.get(key) or [] if isinstance(p, dict)]
    return "".join(t for t in texts if isinstance(t, str))


def _tools(body: JSON) -> JSON:
    out: JSON = {}
    tools = get(body, "tools", "a list", [])
    if tools:
        out["tools"] = [_tool(as_object(tool, f"tools[{i}]"), f"tools[{i}]") for i, tool in enumerate(tools)]
    choice = body.get("tool_choice")
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise BadRequest('tool_choice must be "auto", "none", "required" or a function')
        out["tool_choice"] = choice
    elif isinstance(choice, dict):
        name = choice.get("name")
        if choice.get("type") != "function" or not isinstance(name, str) or not name:
            raise BadRequest('tool_choice must name a function: {"type": "function", "name": …}')
        out["tool_choice"] = {"type": "function", "function": {"name": name}}
    elif choice is not None:
        raise BadRequest("tool_choice must be a string or an object")
    return out


def _tool(tool: JSON, where: str) -> JSON:
    if tool.get("type") != "function":
        raise BadRequest(f"{where}: tool type {tool.get('type')!r} is not supported here; only function tools "
                         "are (hosted tools need OpenAI's servers)")
    name = get(tool, "name", "a string", "", f"{where}.")
    if not name:
        raise BadRequest(f"{where}.name is required")
    function: JSON = {"name": name, "parameters": get(tool, "parameters", "an object", {}, f"{where}.")
                      or {"type": "object", "properties": {}}}
    description = get(tool, "description", "a string", "", f"{where}.")
    if description:
        function["description"] = description
    strict = get(tool, "strict", "a boolean", None, f"{where}.")
    if strict is not None:
        function["strict"] = strict
    return {"type": "function", "function": function}


def _format(fmt: Any) -> JSON | None:
    if fmt is None:
        return None
    fmt = as_object(fmt, "text.format")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise BadRequest("text.format.schema must be an object")
        inner: JSON = {"name": fmt.get("name") or "output", "schema": schema}
        if isinstance(fmt.get("strict"), bool):
            inner["strict"] = fmt["strict"]
        return {"type": "json_schema", "json_schema": inner}
    raise BadRequest('text.format.type must be "text", "json_object" or "json_schema"')


# ---------------------------------------------------------------------------------------------------
# Answers: chat → Responses


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class _Envelope:
    """The response object around the output: what the request asked for, echoed, and the status."""

    def __init__(self, model: str, request: JSON, *, id: str | None, created: int | None) -> None:
        self.id = id or _id("resp")
        self.model = model
        self.created = int(time.time()) if created is None else created
        self.echo = {key: request.get(key, default) for key, default in _ECHOED.items()}
        fmt = object_at(request, "text").get("format")
        self.text = {"format": fmt if isinstance(fmt, dict) else {"type": "text"}}

    def response(self, status: str, output: list[JSON], *, usage: JSON | None = None, error: JSON | None = None,
                 incomplete: str | None = None) -> JSON:
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "error": error, "incomplete_details": {"reason": incomplete} if incomplete else None,
                "model": self.model, "output": output, **self.echo, "text": self.text, "store": False,
                "usage": usage}


def _usage(prompt: int, completion: int) -> JSON:
    details = {"cached_tokens": 0, "cache_write_tokens": 0}
    return {"input_tokens": prompt, "input_tokens_details": details, "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + completion}


def _finished(finish_reason: str) -> tuple[str, str | None]:
    """(status, incomplete reason) for an OpenAI finish_reason."""
    if finish_reason == "length":
        return "incomplete", "max_output_tokens"
    if finish_reason == "content_filter":
        return "incomplete", "content_filter"
    return "completed", None


def _reasoning_item(item_id: str, text: str) -> JSON:
    return {"type": "reasoning", "id": item_id, "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]}


def _text_part(text: str) -> JSON:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, text: str, status: str) -> JSON:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [_text_part(text)] if status == "completed" else []}


def _call_item(item_id: str, call: chat.ToolCall, status: str) -> JSON:
    return {"type": "function_call", "id": item_id, "call_id": call.id, "name": call.name,
            "arguments": call.arguments, "status": status}


def openai_response_to_responses(resp: JSON, model: str, request: JSON, *, id: str | None = None,
                                 created: int | None = None) -> JSON:
    """A non-streamed chat.completion as a Responses API response object."""
    answer = chat.read_completion(resp)
    output: list[JSON] = []
    if answer.reasoning:
        output.append(_reasoning_item(_id("rs"), answer.reasoning))
    if answer.text or not answer.tool_calls:
        output.append(_message_item(_id("msg"), answer.text, "completed"))
    output += [_call_item(_id("fc"), call, "completed") for call in answer.tool_calls]
    status, incomplete = _finished(answer.finish_reason)
    envelope = _Envelope(model, request, id=id, created=created)
    return envelope.response(status, output, usage=_usage(answer.prompt_tokens, answer.completion_tokens),
                             incomplete=incomplete)


def openai_error_to_responses(raw: bytes, status: int) -> JSON:
    kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": chat.error_message(raw), "type": kind, "param": None, "code": None}}


class ResponsesStreamTranslator:
    """Feeds OpenAI chat SSE bytes, yields Responses API events with increasing sequence numbers: created and
    in_progress first; then each output item (reasoning, message, function call) added, its deltas and done
    events; then completed (or incomplete). An upstream error ends the stream with `error` and failed."""

    def __init__(self, model: str, request: JSON, *, id: str | None = None, created: int | None = None) -> None:
        self._envelope = _Envelope(model, request, id=id, created=created)
        self._reader = chat.ChatStreamReader()
        self._sequence = 0
        self._started = False
        self._output: list[JSON] = []  # finished items
        self._open: JSON | None = None  # the item being streamed, as it will be when done
        self._open_key: tuple[str, int] | None = None
        self._calls: dict[int, chat.ToolCall] = {}
        self.done = False

    def __repr__(self) -> str:
        return f"<ResponsesStreamTranslator items={len(self._output)} sequence={self._sequence} done={self.done}>"

    @property
    def id(self) -> str:
        return self._envelope.id

    def feed(self, data: bytes) -> list[bytes]:
        return self._render(self._reader.feed(data))

    def finish(self) -> list[bytes]:
        return self._render(self._reader.finish())

    def fail(self, status: int, message: str) -> list[bytes]:
        if self.done:
            return []
        self.done = True
        code = "server_error" if status >= 500 else "invalid_request"
        out = self._start()
        out.append(self._event("error", {"code": code, "message": message, "param": None}))
        failed = self._envelope.response("failed", self._output, error={"code": code, "message": message})
        return [*out, self._event("response.failed", {"response": failed})]

    # --- events

    def _event(self, kind: str, fields: JSON) -> bytes:
        event = {"type": kind, **fields, "sequence_number": self._sequence}
        self._sequence += 1
        return frame(event, kind)

    def _render(self, parts: list[chat.Part]) -> list[bytes]:
        if self.done:
            return []
        out = self._start()
        for part in parts:
            out += self._part(part)
        return out

    def _start(self) -> list[bytes]:
        if self._started:
            return []
        self._started = True
        response = self._envelope.response("in_progress", [])
        return [self._event("response.created", {"response": response}),
                self._event("response.in_progress", {"response": response})]

    def _part(self, part: chat.Part) -> list[bytes]:
        if isinstance(part, chat.Reasoning):
            return self._text_delta(("reasoning", -1), part.text)
        if isinstance(part, chat.Text):
            return self._text_delta(("message", -1), part.text)
        if isinstance(part, chat.ToolStart):
            call = self._calls[part.index] = chat.ToolCall(part.id, part.name)
            return self._add(("function_call", part.index), _call_item(_id("fc"), call, "in_progress"))
        if isinstance(part, chat.ToolArguments):
            return self._arguments_delta(part)
        if isinstance(part, chat.Failure):
            return self.fail(part.status, part.message)
        return self._end(part)

    def _add(self, key: tuple[str, int], item: JSON) -> list[bytes]:
        out = self._close()
        self._open, self._open_key = item, key
        added = {**item, "content": []} if item["type"] in ("message", "reasoning") else dict(item)
        out.append(self._event("response.output_item.added", {"output_index": len(self._output), "item": added}))
        if item["type"] == "message":
            out.append(self._event("response.content_part.added", {**self._at(), "content_index": 0,
                                                                   "part": _text_part("")}))
        return out

    def _at(self) -> JSON:
        assert self._open is not None
        return {"item_id": self._open["id"], "output_index": len(self._output)}

    def _text_delta(self, key: tuple[str, int], text: str) -> list[bytes]:
        out: list[bytes] = []
        if self._open_key != key:
            if key[0] == "reasoning":
                fresh = _reasoning_item(_id("rs"), "")
            else:
                fresh = {**_message_item(_id("msg"), "", "in_progress"), "content": [_text_part("")]}
            out += self._add(key, fresh)
        assert self._open is not None
        self._open["content"][0]["text"] += text
        kind = "response.reasoning_text.delta" if key[0] == "reasoning" else "response.output_text.delta"
        extra: JSON = {} if key[0] == "reasoning" else {"logprobs": []}
        return [*out, self._event(kind, {**self._at(), "content_index": 0, "delta": text, **extra})]

    def _arguments_delta(self, part: chat.ToolArguments) -> list[bytes]:
        if self._open_key != ("function_call", part.index):  # the reader refuses interleaved calls
            return self.fail(502, "upstream sent tool-call arguments for a call that was already closed")
        assert self._open is not None
        self._calls[part.index].arguments += part.fragment
        self._open["arguments"] += part.fragment
        return [self._event("response.function_call_arguments.delta", {**self._at(), "delta": part.fragment})]

    def _close(self) -> list[bytes]:
        item, self._open, self._open_key = self._open, None, None
        if item is None:
            return []
        self._open = item  # for _at()
        out: list[bytes] = []
        if item["type"] == "message":
            part = item["content"][0]
            out.append(self._event("response.output_text.done", {**self._at(), "content_index": 0,
                                                                  "text": part["text"], "logprobs": []}))
            out.append(self._event("response.content_part.done", {**self._at(), "content_index": 0, "part": part}))
            item["status"] = "completed"
        elif item["type"] == "reasoning":
            out.append(self._event("response.reasoning_text.done", {**self._at(), "content_index": 0,
                                                                     "text": item["content"][0]["text"]}))
        else:
            out.append(self._event("response.function_call_arguments.done",
                                   {**self._at(), "name": item["name"], "arguments": item["arguments"]}))
            item["status"] = "completed"
        out.append(self._event("response.output_item.done", {"output_index": len(self._output), "item": item}))
        self._open = None
        self._output.append(item)
        return out

    def _end(self, end: chat.End) -> list[bytes]:
        self.done = True
        out = self._close()
        status, incomplete = _finished(end.finish_reason)
        response = self._envelope.response(status, self._output, incomplete=incomplete,
                                           usage=_usage(end.prompt_tokens, end.completion_tokens))
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return [*out, self._event(kind, {"response": response})]
