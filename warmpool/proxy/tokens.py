"""POST /v1/messages/count_tokens: the request's tokens by the model's own tokenizer where the upstream has one
(llama-cpp-python's /extras/tokenize/count, under a lease like any request for the model, so it may load it);
elsewhere (Ollama has no tokenizer endpoint, and documents count_tokens as unsupported) an estimate of four
characters a token, answered without touching the upstream.

What is counted is the text of the request (`anthropic_from_openai.count_tokens_text`); the chat template's
framing tokens are not in it, so the real prompt is a few tokens a turn longer.
"""

from __future__ import annotations

import json
from typing import Any

from warmpool.backends.base import Backend
from warmpool.config import ModelConfig
from warmpool.dialects.anthropic_from_openai import count_tokens_text, estimate_tokens
from warmpool.errors import BackendError
from warmpool.scheduling.pool import Scheduler


async def count_tokens(body: dict[str, Any], model: ModelConfig, backend: Backend,
                       scheduler: Scheduler) -> tuple[dict[str, int], float]:
    """({"input_tokens": n}, seconds waited for the model)."""
    text = count_tokens_text(body)
    path = backend.tokenize_path
    if path is None:
        return {"input_tokens": estimate_tokens(text)}, 0.0
    lease = scheduler.lease(model.name)
    waited = 0.0 if lease.try_now() else await lease.wait()
    try:
        return {"input_tokens": await _tokenize(backend, model, path, text)}, waited
    finally:
        lease.release()


async def _tokenize(backend: Backend, model: ModelConfig, path: str, text: str) -> int:
    request = json.dumps(tokenize_body(path, model.upstream_name, text)).encode()
    upstream = await backend.forward(model, "POST", path, [], request)
    try:
        raw = await upstream.read()
    finally:
        upstream.close()
    if upstream.status >= 300:
        reason = f"{path} answered HTTP {upstream.status}: {raw[:300].decode(errors='replace')}"
        raise BackendError(backend.name, reason)
    count = read_count(raw)
    if count is None:
        raise BackendError(backend.name, f"{path} sent no token count: {raw[:300].decode(errors='replace')}")
    return count


def tokenize_body(path: str, model: str, text: str) -> dict[str, Any]:
    """llama-server's /tokenize takes `content`; llama-cpp-python's /extras/tokenize[/count] take `input`."""
    return {"content": text} if path == "/tokenize" else {"model": model, "input": text}


def read_count(raw: bytes) -> int | None:
    """{"count": n} (llama-cpp-python) or {"tokens": [...]} (llama-server, llama-cpp-python's /extras/tokenize)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("count"), int):
        return int(data["count"])
    tokens = data.get("tokens")
    return len(tokens) if isinstance(tokens, list) else None
