"""Which request goes upstream for the Anthropic Messages and OpenAI Responses endpoints, and how its answer
comes back (pure decisions on the backend's declared capabilities; the translations are in dialects/):

- an upstream that serves the endpoint itself (Ollama ≥ 0.14 for /v1/messages) gets it as it came, unless
  the model has load-time options, which only Ollama's native API carries;
- an OpenAI-speaking upstream (llama.cpp, any OpenAI-compatible server) gets a chat-completions request;
- Ollama otherwise gets a native /api/chat request, read back through two translations (Ollama → OpenAI
  chat → the client's dialect), so keep_alive and options travel as on the native endpoints.

Also fits any OpenAI chat body to what the upstream accepts (`fit_openai_body`).
"""

from __future__ import annotations

from typing import Any

from warmpool.backends.base import Backend
from warmpool.config import ModelConfig
from warmpool.dialects import anthropic_from_openai, openai_compat, openai_from_ollama, responses_from_openai
from warmpool.dialects.transforms import (
    AnthropicFromOpenAI,
    OpenAIFromOllama,
    ResponsesFromOpenAI,
    Transform,
    chained,
)
from warmpool.errors import BadRequest
from warmpool.proxy import routing

CHAT_PATH = "/v1/chat/completions"
UpstreamRequest = tuple[str, dict[str, Any], Transform | None]


def translated_request(path: str, body: dict[str, Any], model: ModelConfig, backend: Backend,
                       echo: str) -> UpstreamRequest:
    """(upstream path, body, transform) for a request on one of `routing.TRANSLATED`; answers name the
    model `echo` (the name the client sent)."""
    options = model.ollama.options if model.ollama is not None else {}
    if backend.serves_natively(path) and not options:
        return path, backend.rewrite_body(model, path, body), None
    outer: Transform
    if path == routing.MESSAGES:
        chat = anthropic_from_openai.anthropic_request_to_openai(body, model.upstream_name)
        outer = AnthropicFromOpenAI(echo, body)
    else:
        chat = responses_from_openai.responses_request_to_openai(body, model.upstream_name)
        outer = ResponsesFromOpenAI(echo, body)
    if backend.speaks == "ollama":
        native_path, native = openai_from_ollama.openai_request_to_ollama(
            CHAT_PATH, chat, model.upstream_name, options, backend.lease_seconds(model))
        return native_path, native, chained(outer, OpenAIFromOllama(CHAT_PATH, echo, chat))
    return CHAT_PATH, fit_openai_body(backend, model, CHAT_PATH, chat), outer


def fit_openai_body(backend: Backend, model: ModelConfig, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI body for `backend`: images refused where the model cannot read them (the upstream would drop
    them without a word), and chat fields rewritten to forms the server accepts."""
    if path != CHAT_PATH:
        return body
    if backend.reads_images(model) is False and openai_compat.has_images(body):
        raise BadRequest(f"model {model.name!r} cannot read images: its llama.cpp server has no multimodal "
                         "projector (set server_args.clip_model_path and a vision chat_format)")
    return openai_compat.fit(body, json_schema_format=backend.accepts_json_schema_format,
                             null_content=backend.accepts_null_content)
