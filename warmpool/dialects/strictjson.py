"""The one way warmpool reads JSON a client sent (request bodies, and JSON text inside them such as OpenAI's
tool-call arguments) or a model wrote (tool-call arguments in an answer): JSON, or
`BadRequest`, which the proxy renders as a 400 in the client's dialect. Pure: no I/O.

Deep nesting makes Python's json module raise RecursionError, not ValueError: caught here too.
"""

from __future__ import annotations

import json
from typing import Any

from warmpool.errors import BadRequest

TOO_DEEP = "invalid JSON in request body: nested too deeply"
_DECODER = json.JSONDecoder()


def loads(text: str | bytes) -> Any:
    """`text` parsed, or BadRequest naming what is wrong. Bytes may be UTF-8, -16 or -32, as RFC 8259 allows
    (and json.loads guesses)."""
    try:
        if isinstance(text, bytes):
            text = text.decode(json.detect_encoding(text))
        return _DECODER.decode(text)
    except RecursionError:
        raise BadRequest(TOO_DEEP) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise BadRequest(f"invalid JSON in request body: {exc}") from None


def loads_object(raw: bytes) -> dict[str, Any]:
    """A request body: a JSON object, or BadRequest (empty, not JSON, or not an object)."""
    if not raw or raw.isspace():
        raise BadRequest("missing request body")
    data = loads(raw)
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data
