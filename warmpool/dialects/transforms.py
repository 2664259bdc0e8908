"""Response transforms for translated requests: each turns one upstream dialect's answer (whole, error or
streamed) into the dialect the client spoke. The relay drives them; the translation itself is pure
(ollama_from_openai.py: OpenAI → Ollama, openai_from_ollama.py: Ollama → OpenAI, anthropic_from_openai.py and
responses_from_openai.py: OpenAI chat → Anthropic Messages and Responses). `chained` puts two in a row: an
Anthropic or Responses client on Ollama's native API reads Ollama → OpenAI chat → its own dialect."""

from __future__ import annotations

import json
import time
from typing import Any, Protocol

from warmpool.dialects import anthropic_from_openai, ollama_from_openai, openai_from_ollama, responses_from_openai


class Streamer(Protocol):
    def feed(self, data: bytes) -> list[bytes]: ...
    def finish(self) -> list[bytes]: ...
    def fail(self, status: int, message: str) -> list[bytes]:
        """End the stream with an error in its own shape (warmpool's failures: the upstream dropped or went
        silent); nothing after it."""
        ...


class Transform(Protocol):
    stream: bool  # whether the client gets a stream
    content_type: str  # of that stream
    error_dialect: str  # how to report a failure mid-stream

    def error_body(self, raw: bytes, status: int) -> bytes: ...
    def whole_body(self, raw: bytes) -> bytes: ...
    def streamer(self) -> Streamer: ...


class OllamaFromOpenAI:
    """An OpenAI upstream (llama.cpp) answering an Ollama client."""

    content_type = "application/x-ndjson"
    error_dialect = "ollama"

    def __init__(self, ollama_path: str, model: str, ollama_body: dict[str, Any]) -> None:
        self.path = ollama_path
        self.model = model
        self.kind = "chat" if ollama_path == "/api/chat" else "generate"
        self.embedding = ollama_path in ("/api/embed", "/api/embeddings")
        self.stream = bool(ollama_body.get("stream", True)) and not self.embedding
        self.started = time.monotonic()
        self.load_seconds = 0.0  # set by the proxy: the wait for the model (its load, when this caused one)

    def error_body(self, raw: bytes, status: int) -> bytes:
        return json.dumps(ollama_from_openai.openai_error_to_ollama(raw)).encode()

    def whole_body(self, raw: bytes) -> bytes:
        data = json.loads(raw)
        ns, load_ns = int((time.monotonic() - self.started) * 1e9), int(self.load_seconds * 1e9)
        if self.embedding:
            out = ollama_from_openai.openai_embeddings_to_ollama(self.path, self.model, data, total_duration_ns=ns,
                                                                 load_duration_ns=load_ns)
        else:
            out = ollama_from_openai.openai_response_to_ollama(self.kind, self.model, data, total_duration_ns=ns,
                                                               load_duration_ns=load_ns)
        return json.dumps(out).encode()

    def streamer(self) -> Streamer:
        return ollama_from_openai.OllamaStreamTranslator(self.kind, self.model, started=self.started,
                                                         load_ns=int(self.load_seconds * 1e9))


class OpenAIFromOllama:
    """Ollama's native API answering an OpenAI client (so the model's load-time options travel along)."""

    content_type = "text/event-stream"
    error_dialect = "openai"

    def __init__(self, openai_path: str, model: str, openai_body: dict[str, Any]) -> None:
        self.model = model
        self.kind = "chat" if openai_path == "/v1/chat/completions" else "completion"
        self.embedding = openai_path == "/v1/embeddings"
        self.stream = bool(openai_body.get("stream", False)) and not self.embedding
        self.include_usage = openai_from_ollama.wants_usage(openai_body)
        self.encoding = str(openai_body.get("encoding_format") or "float")

    def error_body(self, raw: bytes, status: int) -> bytes:
        try:
            body = json.loads(raw) if raw else {}
        except (ValueError, RecursionError):
            body = {"error": raw.decode(errors="replace")}
        error = ollama_from_openai.ollama_error_to_openai(body if isinstance(body, dict) else {}, status)
        return json.dumps(error).encode()

    def whole_body(self, raw: bytes) -> bytes:
        data = json.loads(raw)
        if self.embedding:
            out = openai_from_ollama.ollama_embed_to_openai(self.model, data, encoding_format=self.encoding)
        else:
            out = openai_from_ollama.ollama_response_to_openai(self.kind, self.model, data)
        return json.dumps(out).encode()

    def streamer(self) -> Streamer:
        return openai_from_ollama.OpenAIStreamTranslator(self.kind, self.model, include_usage=self.include_usage)


class AnthropicFromOpenAI:
    """An OpenAI chat upstream answering an Anthropic Messages client."""

    content_type = "text/event-stream"
    error_dialect = "anthropic"

    def __init__(self, model: str, anthropic_body: dict[str, Any]) -> None:
        self.model = model
        self.stream = anthropic_body.get("stream") is True

    def error_body(self, raw: bytes, status: int) -> bytes:
        return json.dumps(anthropic_from_openai.openai_error_to_anthropic(raw, status)).encode()

    def whole_body(self, raw: bytes) -> bytes:
        return json.dumps(anthropic_from_openai.openai_response_to_anthropic(json.loads(raw), self.model)).encode()

    def streamer(self) -> Streamer:
        return anthropic_from_openai.AnthropicStreamTranslator(self.model)


class ResponsesFromOpenAI:
    """An OpenAI chat upstream answering an OpenAI Responses client."""

    content_type = "text/event-stream"
    error_dialect = "openai"

    def __init__(self, model: str, responses_body: dict[str, Any]) -> None:
        self.model = model
        self.request = responses_body
        self.stream = responses_body.get("stream") is True

    def error_body(self, raw: bytes, status: int) -> bytes:
        return json.dumps(responses_from_openai.openai_error_to_responses(raw, status)).encode()

    def whole_body(self, raw: bytes) -> bytes:
        out = responses_from_openai.openai_response_to_responses(json.loads(raw), self.model, self.request)
        return json.dumps(out).encode()

    def streamer(self) -> Streamer:
        return responses_from_openai.ResponsesStreamTranslator(self.model, self.request)


class _Chain:
    """Two transforms in a row: `inner` reads the upstream, `outer` writes the client's dialect."""

    def __init__(self, outer: Transform, inner: Transform) -> None:
        self.outer, self.inner = outer, inner
        self.stream = outer.stream
        self.content_type = outer.content_type
        self.error_dialect = outer.error_dialect

    def error_body(self, raw: bytes, status: int) -> bytes:
        return self.outer.error_body(self.inner.error_body(raw, status), status)

    def whole_body(self, raw: bytes) -> bytes:
        return self.outer.whole_body(self.inner.whole_body(raw))

    def streamer(self) -> Streamer:
        return _ChainedStreamer(self.outer.streamer(), self.inner.streamer())


class _ChainedStreamer:
    def __init__(self, outer: Streamer, inner: Streamer) -> None:
        self.outer, self.inner = outer, inner

    def feed(self, data: bytes) -> list[bytes]:
        return self.outer.feed(b"".join(self.inner.feed(data)))

    def finish(self) -> list[bytes]:
        return self.outer.feed(b"".join(self.inner.finish())) + self.outer.finish()

    def fail(self, status: int, message: str) -> list[bytes]:
        return self.outer.fail(status, message)


def chained(outer: Transform, inner: Transform | None) -> Transform:
    """`outer` after `inner`, or `outer` alone when the upstream already speaks what `outer` reads."""
    return outer if inner is None else _Chain(outer, inner)
