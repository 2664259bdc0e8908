"""Reading an OpenAI chat-completions answer (whole, or streamed as SSE chunks) into neutral parts that the
Anthropic and Responses translators render in their own shapes. Pure.

The upstreams differ in small ways this module absorbs: llama-cpp-python repeats a tool call's id and name
in every fragment, OpenAI sends them once; reasoning arrives as `reasoning_content` (llama-server) or
`reasoning` (Ollama's /v1); usage comes in a last `choices: []` chunk (stream_options.include_usage), in
llama-server's `timings`, or not at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from warmpool.dialects.jsonfields import JSON, object_at
from warmpool.dialects.ollama_from_openai import openai_error_to_ollama
from warmpool.dialects.sse import SSEDecoder

CUT_SHORT = "upstream closed the stream before the answer was complete"


@dataclass(frozen=True, slots=True)
class Text:
    text: str


@dataclass(frozen=True, slots=True)
class Reasoning:
    text: str


@dataclass(frozen=True, slots=True)
class ToolStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class ToolArguments:
    index: int
    fragment: str


@dataclass(frozen=True, slots=True)
class Failure:
    message: str
    status: int = 500


@dataclass(frozen=True, slots=True)
class End:
    """The answer is complete: why it stopped (an OpenAI finish_reason) and the token counts."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


Part = Text | Reasoning | ToolStart | ToolArguments | Failure | End


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str = ""


@dataclass(slots=True)
class Answer:
    """A whole chat completion's first choice, read leniently."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0


def read_completion(resp: JSON) -> Answer:
    """The parts of a non-streamed chat.completion."""
    choice = first_choice(resp) or {}
    message = object_at(choice, "message")
    calls = [c for c in message.get("tool_calls") or [] if isinstance(c, dict)]
    answer = Answer(text=text_of(message.get("content")), reasoning=reasoning_of(message),
                    finish_reason=text_of(choice.get("finish_reason")) or "stop")
    for i, call in enumerate(calls):
        function = object_at(call, "function")
        arguments = function.get("arguments")
        answer.tool_calls.append(ToolCall(
            id=text_of(call.get("id")) or f"call_{i}", name=text_of(function.get("name")),
            arguments=arguments if isinstance(arguments, str) else json.dumps(arguments or {})))
    answer.prompt_tokens, answer.completion_tokens = _counts(resp, (0, 0))
    return answer


class ChatStreamReader:
    """Feeds an OpenAI chat-completions SSE stream (any chunk boundaries), yields its parts in order; the
    last part is always one `End` or one `Failure`, and nothing follows it."""

    def __init__(self) -> None:
        self._sse = SSEDecoder()
        self._calls: dict[int, ToolCall] = {}
        self._finish: str | None = None
        self._counts: tuple[int, int] = (0, 0)
        self._deltas = 0
        self.done = False

    def feed(self, data: bytes) -> list[Part]:
        if self.done:
            return []
        return self._events(self._sse.feed(data))

    def finish(self) -> list[Part]:
        """The upstream closed. A stream that gave a finish_reason but no [DONE] is whole (some servers
        omit it); one that gave neither was cut short."""
        if self.done:
            return []
        out = self._events(self._sse.finish())
        if self.done:
            return out
        if self._finish is None:
            return out + self._fail(CUT_SHORT, 502)
        return out + self._end()

    def _events(self, events: list[Any]) -> list[Part]:
        out: list[Part] = []
        for event in events:
            out += self._event(event.name, event.data)
            if self.done:
                break
        return out

    def _event(self, name: str, data: str) -> list[Part]:
        if data.strip() == "[DONE]":
            return self._end()
        try:
            chunk = json.loads(data)
        except (ValueError, RecursionError):  # not JSON, or nested too deep to read
            chunk = None
        if name == "error" or (isinstance(chunk, dict) and "error" in chunk):
            return self._fail(error_message(chunk if isinstance(chunk, dict) else data.encode()), 500)
        if not isinstance(chunk, dict):
            return self._fail(f"upstream sent a malformed stream event: {data[:200]!r}", 502)
        return self._chunk(chunk)

    def _chunk(self, chunk: JSON) -> list[Part]:
        self._counts = _counts(chunk, self._counts)
        choice = first_choice(chunk)
        if choice is None:  # the include_usage chunk has choices: []
            return []
        self._finish = text_of(choice.get("finish_reason")) or self._finish
        delta = object_at(choice, "delta")
        out: list[Part] = []
        reasoning = reasoning_of(delta)
        if reasoning:
            out.append(Reasoning(reasoning))
        text = text_of(delta.get("content"))
        if text:
            out.append(Text(text))
        for fragment in delta.get("tool_calls") or []:
            if isinstance(fragment, dict):
                out += self._tool_fragment(fragment)
        self._deltas += len(out)
        return out

    def _tool_fragment(self, fragment: JSON) -> list[Part]:
        index = fragment.get("index")
        index = index if isinstance(index, int) else len(self._calls)
        function = object_at(fragment, "function")
        arguments = function.get("arguments")
        text = arguments if isinstance(arguments, str) else json.dumps(arguments) if arguments else ""
        out: list[Part] = []
        if index not in self._calls:
            call_id = text_of(fragment.get("id")) or f"call_{index}"
            self._calls[index] = ToolCall(call_id, text_of(function.get("name")))
            out.append(ToolStart(index, call_id, self._calls[index].name))
        elif text and index != max(self._calls):
            # Anthropic and Responses streams close a call before the next one opens; no upstream warmpool
            # knows interleaves parallel calls, and one that does is refused rather than garbled
            return self._fail("upstream interleaved the arguments of parallel tool calls, which cannot be "
                              "streamed in this dialect; ask without stream", 502)
        if text:
            self._calls[index].arguments += text
            out.append(ToolArguments(index, text))
        return out

    def _end(self) -> list[Part]:
        self.done = True
        prompt, completion = self._counts
        # without usage from upstream, the deltas are the best count of generated tokens there is
        reason = self._finish or "stop"
        return [End(reason, prompt, completion or self._deltas)]

    def _fail(self, message: str, status: int) -> list[Part]:
        self.done = True
        return [Failure(message, status)]


def _counts(obj: JSON, fallback: tuple[int, int]) -> tuple[int, int]:
    usage, timings = object_at(obj, "usage"), object_at(obj, "timings")
    prompt = _int(usage.get("prompt_tokens"), _int(timings.get("prompt_n"), fallback[0]))
    completion = _int(usage.get("completion_tokens"), _int(timings.get("predicted_n"), fallback[1]))
    return prompt, completion


def _int(value: Any, fallback: int) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else fallback


def first_choice(obj: JSON) -> JSON | None:
    choices = obj.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    return None


def reasoning_of(message: JSON) -> str:
    return text_of(message.get("reasoning_content")) or text_of(message.get("reasoning"))


def text_of(value: Any) -> str:
    return value if isinstance(value, str) else ""


def error_message(body: bytes | JSON) -> str:
    """The message of an upstream error body in any shape (OpenAI, Ollama, FastAPI, plain text)."""
    return str(openai_error_to_ollama(body)["error"])
