"""Checked reads of JSON request fields, shared by both translation directions: a wrong type is a 400
naming the field, never a crash deeper down."""

from __future__ import annotations

from typing import Any

from warmpool.dialects import strictjson
from warmpool.errors import BadRequest

JSON = dict[str, Any]
KINDS: dict[str, tuple[type, ...]] = {
    "a string": (str,),
    "a list": (list,),
    "an object": (dict,),
    "a boolean": (bool,),
    "a number": (int, float),
}


def get(body: JSON, key: str, kind: str, default: Any = None, where: str = "") -> Any:
    """body[key] checked against `kind` (a KINDS name); absent or null gives `default`."""
    value = body.get(key)
    if value is None:
        return default
    # bool is an int subclass in Python, but JSON true is never a number
    if (isinstance(value, bool) and kind != "a boolean") or not isinstance(value, KINDS[kind]):
        raise BadRequest(f"{where}{key} must be {kind}")
    return value


def object_at(obj: JSON, key: str) -> JSON:
    """obj[key] when it is an object, else {}: for optional objects and upstream payloads, read leniently."""
    value = obj.get(key)
    return value if isinstance(value, dict) else {}


def as_object(value: Any, where: str) -> JSON:
    if not isinstance(value, dict):
        raise BadRequest(f"{where} must be an object")
    return value


def parse_arguments(arguments: Any) -> JSON:
    """Tool-call arguments as an object: OpenAI sends a JSON string, Ollama and Anthropic an object. Text that
    is not a JSON object (a model cut off mid-call) stays visible under "arguments" rather than lost."""
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        parsed = strictjson.loads(arguments)
    except BadRequest:  # not JSON, NaN, nested too deeply: kept as the text it is
        parsed = None
    return parsed if isinstance(parsed, dict) else {"arguments": arguments}
