"""Fitting an OpenAI chat request to what a particular OpenAI-compatible server accepts; pure functions.

llama-cpp-python's request models reject two things every OpenAI client sends: `response_format` of type
json_schema (it takes {"type": "json_object", "schema": …}, which llama-server accepts too), and an assistant
message whose content is null because it only calls tools. Both are rewritten to the accepted form, which
means the same; the body is left as it came when nothing needs it.
"""

from __future__ import annotations

from typing import Any

from warmpool.dialects.jsonfields import JSON


def has_images(body: JSON) -> bool:
    """Whether a chat request carries an image part in any message."""
    messages = body.get("messages")
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list)
        and any(isinstance(p, dict) and p.get("type") == "image_url" for p in m["content"])
        for m in messages)


def fit(body: JSON, *, json_schema_format: bool, null_content: bool) -> JSON:
    """`body` with what the server does not accept rewritten; `body` itself when nothing had to change."""
    out = body
    if not json_schema_format:
        fmt = _json_schema_as_json_object(body.get("response_format"))
        if fmt is not None:
            out = {**out, "response_format": fmt}
    if not null_content:
        messages = body.get("messages")
        if isinstance(messages, list) and any(_null_assistant(m) for m in messages):
            out = {**out, "messages": [{**m, "content": ""} if _null_assistant(m) else m for m in messages]}
    return out


def _json_schema_as_json_object(fmt: Any) -> JSON | None:
    if not (isinstance(fmt, dict) and fmt.get("type") == "json_schema"):
        return None
    inner = fmt.get("json_schema")
    schema = inner.get("schema") if isinstance(inner, dict) else None
    return {"type": "json_object", "schema": schema} if isinstance(schema, dict) else {"type": "json_object"}


def _null_assistant(message: Any) -> bool:
    return isinstance(message, dict) and message.get("role") == "assistant" and message.get("content") is None
