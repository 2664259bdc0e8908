"""Anthropic Messages API ⇄ OpenAI chat completions, for upstreams that do not serve /v1/messages themselves
(llama.cpp servers, any OpenAI-compatible server, Ollama before 0.14); pure functions, no I/O.

Owns the request mapping (/v1/messages → /v1/chat/completions), the whole and streamed answers (OpenAI SSE →
Anthropic's message_start, content_block_*, message_delta, message_stop and ping events), the error body, and
the text that a tokenizer counts for /v1/messages/count_tokens.

What has no counterpart is refused with a 400 naming it, never dropped: server tools (web search, code
execution), document and search-result blocks. `cache_control` and `metadata` are hints with no effect on
the answer and are ignored; `tool_choice` becomes OpenAI's, which llama.cpp honours only when it names one
tool (a grammar then forces the call).
"""

from __future__ import annotations

import json
import math
import secrets
from typing import Any

from warmpool.dialects import openai_chat as chat
from warmpool.dialects.jsonfields import JSON, as_object, get, object_at, parse_arguments
from warmpool.dialects.sse import frame
from warmpool.errors import BadRequest, anthropic_error

CHAT_PATH = "/v1/chat/completions"
MESSAGES_PATH = "/v1/messages"
COUNT_TOKENS_PATH = "/v1/messages/count_tokens"

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                 "function_call": "tool_use", "content_filter": "refusal"}
_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}
_CUSTOM_TOOL_TYPES = (None, "custom")


# ---------------------------------------------------------------------------------------------------
# Requests: Anthropic → OpenAI


def anthropic_request_to_openai(body: JSON, upstream_model: str) -> JSON:
    """The chat-completions body for an Anthropic Messages request, addressed to `upstream_model`."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    max_tokens = get(body, "max_tokens", "a number")
    if max_tokens is None:
        raise BadRequest("max_tokens: Field required")
    stream = get(body, "stream", "a boolean", False)
    out: JSON = {"model": upstream_model, "messages": openai_messages(body), "max_tokens": int(max_tokens),
                 "stream": stream}
    if stream:
        out["stream_options"] = {"include_usage": True}
    for key in ("temperature", "top_p", "top_k"):  # top_k: llama.cpp's servers and Ollama both take it
        value = get(body, key, "a number")
        if value is not None:
            out[key] = value
    stops = get(body, "stop_sequences", "a list", [])
    if stops:
        if not all(isinstance(s, str) for s in stops):
            raise BadRequest("stop_sequences must be a list of strings")
        out["stop"] = stops
    out.update(_tools(body))
    out.update(_output(body))
    return out


def openai_messages(body: JSON) -> list[JSON]:
    """The system prompt and every turn as OpenAI chat messages (shared with count_tokens)."""
    messages = get(body, "messages", "a list", [])
    if not messages:
        raise BadRequest("messages: at least one message is required")
    out = [{"role": "system", "content": text} for text in [_system(body.get("system"))] if text]
    for i, message in enumerate(messages):
        out += _turn(as_object(message, f"messages[{i}]"), f"messages[{i}].")
    return out


def _system(system: Any) -> str:
    if system is None or isinstance(system, str):
        return system or ""
    if not isinstance(system, list):
        raise BadRequest("system must be a string or a list of text blocks")
    texts = []
    for i, block in enumerate(system):
        block = as_object(block, f"system[{i}]")
        if block.get("type") != "text":
            raise BadRequest(f"system[{i}].type must be \"text\"")
        texts.append(get(block, "text", "a string", "", f"system[{i}]."))
    return "\n\n".join(texts)


def _turn(message: JSON, where: str) -> list[JSON]:
    role = get(message, "role", "a string", "", where)
    if role not in ("user", "assistant"):
        raise BadRequest(f"{where}role must be \"user\" or \"assistant\"")
    blocks = _blocks(message.get("content"), f"{where}content")
    return _assistant(blocks, where) if role == "assistant" else _user(blocks, where)


def _blocks(content: Any, where: str) -> list[JSON]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise BadRequest(f"{where} must be a string or a list of content blocks")
    return [as_object(block, f"{where}[{k}]") for k, block in enumerate(content)]


def _user(blocks: list[JSON], where: str) -> list[JSON]:
    """Tool results become `tool` messages, which OpenAI wants right after the calls they answer; the rest
    of the turn (text, images, and images a tool returned) follows as one user message."""
    results: list[JSON] = []
    parts: list[JSON] = []
    for k, block in enumerate(blocks):
        at = f"{where}content[{k}]"
        kind = block.get("type")
        if kind == "tool_result":
            text, images = _tool_result(block, at)
            results.append({"role": "tool", "tool_call_id": _tool_use_id(block, at), "content": text})
            parts += images
        elif kind in ("text", "image"):
            parts.append(_part(block, at))
        else:
            raise BadRequest(f"{at}.type {kind!r} is not supported here (text, image and tool_result are)")
    if not parts:
        return results
    only_text = all(p["type"] == "text" for p in parts)
    content: str | list[JSON] = "\n\n".join(p["text"] for p in parts) if only_text else parts
    return [*results, {"role": "user", "content": content}]


def _assistant(blocks: list[JSON], where: str) -> list[JSON]:
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[JSON] = []
    for k, block in enumerate(blocks):
        at = f"{where}content[{k}]"
        kind = block.get("type")
        if kind == "text":
            texts.append(get(block, "text", "a string", "", f"{at}."))
        elif kind == "tool_use":
            calls.append(_tool_call(block, at))
        elif kind == "thinking":
            reasoning.append(get(block, "thinking", "a string", "", f"{at}."))
        elif kind != "redacted_thinking":  # encrypted by Anthropic: nothing a local model could read
            raise BadRequest(f"{at}.type {kind!r} is not supported here (text, tool_use and thinking are)")
    # a string, never null: llama-cpp-python rejects an assistant message whose content is null
    out: JSON = {"role": "assistant", "content": "".join(texts)}
    if reasoning:
        out["reasoning_content"] = "".join(reasoning)
    if calls:
        out["tool_calls"] = calls
    return [out]


def _part(block: JSON, where: str) -> JSON:
    if block.get("type") == "text":
        return {"type": "text", "text": get(block, "text", "a string", "", f"{where}.")}
    return {"type": "image_url", "image_url": {"url": _image_url(object_at(block, "source"), where)}}


def _image_url(source: JSON, where: str) -> str:
    kind = source.get("type")
    if kind == "base64":
        media = get(source, "media_type", "a string", "", f"{where}.source.")
        data = get(source, "data", "a string", "", f"{where}.source.")
        if not media or not data:
            raise BadRequest(f"{where}.source needs media_type and data")
        return f"data:{media};base64,{data}"
    if kind == "url":
        url = get(source, "url", "a string", "", f"{where}.source.")
        if url:
            return str(url)
    raise BadRequest(f"{where}.source must be a base64 or url image source")


def _tool_use_id(block: JSON, where: str) -> str:
    tool_use_id = get(block, "tool_use_id", "a string", "", f"{where}.")
    if not tool_use_id:
        raise BadRequest(f"{where}.tool_use_id is required")
    return str(tool_use_id)


def _tool_result(block: JSON, where: str) -> tuple[str, list[JSON]]:
    """The text of a tool result, and the images it carries (OpenAI tool messages hold text only)."""
    content = block.get("content")
    parts = [] if content is None else _blocks(content, f"{where}.content")
    texts: list[str] = []
    images: list[JSON] = []
    for k, part in enumerate(parts):
        kind = part.get("type")
        if kind == "text":
            texts.append(get(part, "text", "a string", "", f"{where}.content[{k}]."))
        elif kind == "image":
            images.append(_part(part, f"{where}.content[{k}]"))
        else:
            raise BadRequest(f"{where}.content[{k}].type {kind!r} is not supported in a tool result")
    text = "\n\n".join(texts)
    if block.get("is_error") is True:
        text = f"Error: {text}"  # OpenAI has no error flag on a tool message; the model still learns it
    return text, images


def _tool_call(block: JSON, where: str) -> JSON:
    call_id = get(block, "id", "a string", "", f"{where}.")
    name = get(block, "name", "a string", "", f"{where}.")
    if not call_id or not name:
        raise BadRequest(f"{where} needs an id and a name")
    arguments = block.get("input", {})
    if not isinstance(arguments, dict):
        raise BadRequest(f"{where}.input must be an object")
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _tools(body: JSON) -> JSON:
    tools = get(body, "tools", "a list", [])
    out: JSON = {}
    if tools:
        out["tools"] = [_tool(as_object(tool, f"tools[{i}]"), f"tools[{i}]") for i, tool in enumerate(tools)]
    choice = body.get("tool_choice")
    if choice is not None:
        out.update(_tool_choice(as_object(choice, "tool_choice")))
    return out


def _tool(tool: JSON, where: str) -> JSON:
    if tool.get("type") not in _CUSTOM_TOOL_TYPES:
        raise BadRequest(f"{where}: server tool {tool.get('type')!r} is not supported here; only custom "
                         "(client) tools are")
    name = get(tool, "name", "a string", "", f"{where}.")
    if not name:
        raise BadRequest(f"{where}.name is required")
    function: JSON = {"name": name, "parameters": get(tool, "input_schema", "an object", {}, f"{where}.")
                      or {"type": "object", "properties": {}}}
    description = get(tool, "description", "a string", "", f"{where}.")
    if description:
        function["description"] = description
    return {"type": "function", "function": function}


def _tool_choice(choice: JSON) -> JSON:
    kind = choice.get("type")
    out: JSON = {}
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "none":
        out["tool_choice"] = "none"
    elif kind == "tool":
        name = get(choice, "name", "a string", "", "tool_choice.")
        if not name:
            raise BadRequest("tool_choice.name is required when tool_choice.type is \"tool\"")
        out["tool_choice"] = {"type": "function", "function": {"name": name}}
    else:
        raise BadRequest('tool_choice.type must be "auto", "any", "tool" or "none"')
    if choice.get("disable_parallel_tool_use") is True:
        out["parallel_tool_calls"] = False
    return out


def _output(body: JSON) -> JSON:
    """Structured output (output_config.format) and effort (output_config.effort, thinking)."""
    config = get(body, "output_config", "an object", {})
    out: JSON = {}
    fmt = config.get("format")
    if fmt is not None:
        fmt = as_object(fmt, "output_config.format")
        schema = fmt.get("schema")
        if fmt.get("type") != "json_schema" or not isinstance(schema, dict):
            raise BadRequest('output_config.format must be {"type": "json_schema", "schema": {…}}')
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    effort = config.get("effort")
    thinking = get(body, "thinking", "an object", {})
    if isinstance(effort, str) and effort in _EFFORTS:
        out["reasoning_effort"] = _EFFORTS[effort]
    elif thinking.get("type") == "disabled":
        out["reasoning_effort"] = "none"
    return out


# ---------------------------------------------------------------------------------------------------
# Answers: OpenAI → Anthropic


def message_id() -> str:
    return f"msg_{secrets.token_hex(12)}"


def stop_reason(finish_reason: str, *, tool_calls: bool) -> str:
    return "tool_use" if tool_calls else _STOP_REASONS.get(finish_reason, "end_turn")


def openai_response_to_anthropic(resp: JSON, model: str, *, id: str | None = None) -> JSON:
    """A non-streamed chat.completion as an Anthropic message; `model` is the client-facing name."""
    answer = chat.read_completion(resp)
    content: list[JSON] = []
    if answer.reasoning:
        content.append({"type": "thinking", "thinking": answer.reasoning, "signature": ""})
    if answer.text or not answer.tool_calls:
        content.append({"type": "text", "text": answer.text})
    for call in answer.tool_calls:
        content.append({"type": "tool_use", "id": call.id, "name": call.name,
                        "input": parse_arguments(call.arguments)})
    return {"id": id or message_id(), "type": "message", "role": "assistant", "model": model,
            "content": content,
            "stop_reason": stop_reason(answer.finish_reason, tool_calls=bool(answer.tool_calls)),
            "stop_sequence": None,
            "usage": {"input_tokens": answer.prompt_tokens, "output_tokens": answer.completion_tokens}}


def openai_error_to_anthropic(raw: bytes, status: int) -> JSON:
    return anthropic_error(status, chat.error_message(raw))


class AnthropicStreamTranslator:
    """Feeds OpenAI chat SSE bytes, yields Anthropic SSE events: message_start and a ping first, then one
    content block per thinking run, text run or tool call (start, deltas, stop), then message_delta (stop
    reason and usage) and message_stop. An upstream error or a cut stream ends it with an `error` event,
    which the official SDK raises."""

    def __init__(self, model: str, *, id: str | None = None) -> None:
        self.model = model
        self.id = id or message_id()
        self._reader = chat.ChatStreamReader()
        self._started = False
        self._block: tuple[str, int] | None = None  # the open block: (kind, upstream tool index or -1)
        self._index = -1
        self._tool_use = False
        self.done = False

    def __repr__(self) -> str:
        return f"<AnthropicStreamTranslator model={self.model!r} blocks={self._index + 1} done={self.done}>"

    def feed(self, data: bytes) -> list[bytes]:
        return self._render(self._reader.feed(data))

    def finish(self) -> list[bytes]:
        return self._render(self._reader.finish())

    def fail(self, status: int, message: str) -> list[bytes]:
        """End the stream with an error event (the relay's own failures: upstream dropped or silent)."""
        if self.done:
            return []
        self.done = True
        return [*self._start(), frame(anthropic_error(status, message), "error")]

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
        message: JSON = {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}
        return [frame({"type": "message_start", "message": message}, "message_start"),
                frame({"type": "ping"}, "ping")]

    def _part(self, part: chat.Part) -> list[bytes]:
        if isinstance(part, chat.Reasoning):
            return self._delta(("thinking", -1), {"type": "thinking_delta", "thinking": part.text})
        if isinstance(part, chat.Text):
            return self._delta(("text", -1), {"type": "text_delta", "text": part.text})
        if isinstance(part, chat.ToolStart):
            self._tool_use = True
            block = {"type": "tool_use", "id": part.id, "name": part.name, "input": {}}
            return self._open(("tool_use", part.index), block)
        if isinstance(part, chat.ToolArguments):
            return self._delta(("tool_use", part.index), {"type": "input_json_delta", "partial_json": part.fragment})
        if isinstance(part, chat.Failure):
            return self.fail(part.status, part.message)
        return self._end(part)

    def _delta(self, block: tuple[str, int], delta: JSON) -> list[bytes]:
        out = [] if self._block == block else self._open(block, _empty_block(block[0]))
        return [*out, frame({"type": "content_block_delta", "index": self._index, "delta": delta},
                            "content_block_delta")]

    def _open(self, block: tuple[str, int], content_block: JSON) -> list[bytes]:
        out = self._close()
        self._block = block
        self._index += 1
        start = {"type": "content_block_start", "index": self._index, "content_block": content_block}
        return [*out, frame(start, "content_block_start")]

    def _close(self) -> list[bytes]:
        if self._block is None:
            return []
        self._block = None
        return [frame({"type": "content_block_stop", "index": self._index}, "content_block_stop")]

    def _end(self, end: chat.End) -> list[bytes]:
        self.done = True
        delta = {"stop_reason": stop_reason(end.finish_reason, tool_calls=self._tool_use), "stop_sequence": None}
        usage = {"input_tokens": end.prompt_tokens, "output_tokens": end.completion_tokens}
        return [*self._close(), frame({"type": "message_delta", "delta": delta, "usage": usage}, "message_delta"),
                frame({"type": "message_stop"}, "message_stop")]


def _empty_block(kind: str) -> JSON:
    if kind == "thinking":
        return {"type": "thinking", "thinking": "", "signature": ""}
    return {"type": "text", "text": ""}


# ---------------------------------------------------------------------------------------------------
# count_tokens


def count_tokens_text(body: JSON) -> str:
    """The text a tokenizer counts for a count_tokens request: the system prompt, each turn's text, tool calls
    and results, and the tool definitions as JSON. The chat template's few framing tokens per turn are not
    in it, and images count nothing."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    pieces: list[str] = []
    for message in openai_messages(body):
        content = message.get("content")
        if isinstance(content, str):
            pieces.append(content)
        else:
            pieces += [p["text"] for p in content or [] if p.get("type") == "text"]
        pieces += [c["function"]["name"] + c["function"]["arguments"] for c in message.get("tool_calls", [])]
    tools = body.get("tools")
    if tools:  # as sent: a server tool is counted too, though /v1/messages would refuse it
        pieces.append(json.dumps(tools, ensure_ascii=False))
    return "\n".join(p for p in pieces if p)


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate: about four characters a token, the rule of thumb for English text and
    code with BPE vocabularies (and Ollama's own estimate for its Anthropic layer)."""
    return max(1, math.ceil(len(text) / 4)) if text else 0
