"""Loading feedback for streaming clients: while a streamed request waits for its model, warmpool opens
the stream and says what it waits for ("loading coder (from RAM) 1.2 s"), in a form the official clients
ignore: an SSE comment for OpenAI clients, an empty chunk with an extra `warmpool` field for Ollama ones.

Off by default; a request turns it on with `X-Warmpool-Loading-Feedback: 1` (or off with 0), and
`loading_feedback: true` in the config turns it on for every streamed request.
"""

from __future__ import annotations

import json
from typing import Any

from warmpool.dialects.ollama_from_openai import rfc3339_now
from warmpool.errors import Dialect

HEADER = "X-Warmpool-Loading-Feedback"
INTERVAL = 1.0  # seconds between feedback lines


def wanted(header: str | None, default: bool) -> bool:
    if header is None:
        return default
    return header.strip().lower() in ("1", "true", "yes", "on")


def streams(path: str, body: dict[str, Any]) -> bool:
    """Whether the client asked for a stream (Ollama streams unless told not to; OpenAI the reverse)."""
    if path in ("/api/chat", "/api/generate"):
        return body.get("stream", True) is not False
    if path in ("/v1/chat/completions", "/v1/completions"):
        return body.get("stream") is True
    return False


def content_type(dialect: Dialect) -> str:
    return "application/x-ndjson" if dialect == "ollama" else "text/event-stream"


def line(path: str, model: str, text: str, seconds: float) -> bytes:
    """One feedback line for `path`'s dialect."""
    if path.startswith("/v1/"):
        return f": warmpool {text} {seconds:.1f} s\n\n".encode()
    chunk: dict[str, Any] = {"model": model, "created_at": rfc3339_now(), "done": False,
                             "warmpool": {"status": text, "seconds": round(seconds, 1)}}
    if path == "/api/chat":
        chunk["message"] = {"role": "assistant", "content": ""}
    else:
        chunk["response"] = ""
    return json.dumps(chunk).encode() + b"\n"
