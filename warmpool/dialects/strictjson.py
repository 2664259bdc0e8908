"""The one way warmpool reads JSON a client sent (request bodies, and JSON text inside them such as OpenAI's
tool-call arguments) or a model wrote (tool-call arguments in an answer): strict RFC 8259 JSON, or
`BadRequest`, which the proxy renders as a 400 in the client's dialect. Pure: no I/O.

Python's json module is lenient where a proxy must not be: it takes NaN, Infinity and -Infinity (and turns
1e400 into an infinity), which no other JSON parser accepts, so forwarding them would break the upstream
or come back as an answer the client cannot read; and deep nesting raises RecursionError, not ValueError.
"""

from __future__ import annotations

import json
import math
from typing import Any

from warmpool.errors import BadRequest


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


TOO_DEEP = "invalid JSON in request body: nested too deeply"
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def loads(text: str | bytes) -> Any:
    """`text` parsed, or BadRequest naming what is wrong. Bytes may be UTF-8, -16 or -32, as RFC 8259 allows
    (and json.loads guesses)."""
    try:
        if isinstance(text, bytes):
            text = text.decode(json.detect_encoding(text))
        return _DECODER.decode(text)
    except RecursionError:
        raise BadRequest(TOO_DEEP) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and the two rejections above
        raise BadRequest(f"invalid JSON in request body: {exc}") from None


def loads_object(raw: bytes) -> dict[str, Any]:
    """A request body: a JSON object, or BadRequest (empty, not JSON, or not an object)."""
    if not raw or raw.isspace():
        raise BadRequest("missing request body")
    data = loads(raw)
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data
