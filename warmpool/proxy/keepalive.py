"""A client's `keep_alive`, read as Ollama reads it (upstream_spec.md §1.6, `api.Duration.UnmarshalJSON`):

- a JSON number is seconds (fractions allowed); a negative number means forever;
- a JSON string is a Go duration (`time.ParseDuration`: "5m", "1h30m", "0", "-1m"); a unit is required
  except for "0", so "300" and "-1" are errors; a negative duration means forever;
- null or absent means "not given": the model's expiry stays what it was;
- anything else (true, [], {}) is an error.

An invalid value is Ollama's own 400 with Go's message, e.g. `time: missing unit in duration "300"`.
Pure: no I/O.
"""

from __future__ import annotations

import math
from typing import Any

from warmpool.errors import BadRequest

FOREVER = math.inf
# Ollama's endpoints whose body carries a keep_alive (api.GenerateRequest, ChatRequest, EmbedRequest,
# EmbeddingRequest); the OpenAI-compatible ones have no such field.
ENDPOINTS = frozenset({"/api/generate", "/api/chat", "/api/embed", "/api/embeddings"})
# Go's time.unitMap, in nanoseconds; both micro signs (U+00B5, U+03BC) are accepted.
_UNITS: dict[bytes, int] = {
    b"ns": 1, b"us": 1_000, "µs".encode(): 1_000, "μs".encode(): 1_000, b"ms": 1_000_000,
    b"s": 1_000_000_000, b"m": 60_000_000_000, b"h": 3_600_000_000_000,
}
_MAX = 1 << 63  # Go durations are int64 nanoseconds
_DIGITS = b"0123456789"


def parse_keep_alive(value: Any) -> float | None:
    """Seconds (`FOREVER` for a negative value), or None when not given; BadRequest as Ollama words it."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadRequest(f"Unsupported type: '{_go_type(value)}'")
    if isinstance(value, str):
        try:
            nanoseconds = parse_go_duration(value)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return FOREVER if nanoseconds < 0 else nanoseconds / 1e9
    return FOREVER if value < 0 else float(value)


def parse_go_duration(text: str) -> int:
    """Go's time.ParseDuration in nanoseconds, with its error messages (ValueError); a port of the Go
    function, working on UTF-8 bytes as Go does."""
    orig, rest = text.encode(), text.encode()
    negative = False
    if rest[:1] in (b"-", b"+"):
        negative, rest = rest[:1] == b"-", rest[1:]
    if rest == b"0":
        return 0
    if not rest:
        raise ValueError(f"time: invalid duration {go_quote(orig)}")
    total = 0
    while rest:
        value, fraction, scale, rest = _number(rest, orig)
        unit_end = 0
        while unit_end < len(rest) and rest[unit_end] not in b"." + _DIGITS:
            unit_end += 1
        if unit_end == 0:
            raise ValueError(f"time: missing unit in duration {go_quote(orig)}")
        unit, rest = rest[:unit_end], rest[unit_end:]
        if unit not in _UNITS:
            raise ValueError(f"time: unknown unit {go_quote(unit)} in duration {go_quote(orig)}")
        size = _UNITS[unit]
        if value > _MAX // size:
            raise ValueError(f"time: invalid duration {go_quote(orig)}")
        value *= size
        if fraction:
            value += int(fraction * (size / scale))  # Go: uint64(float64(f) * (float64(unit) / scale))
        total += value
        if value > _MAX or total > _MAX:
            raise ValueError(f"time: invalid duration {go_quote(orig)}")
    if negative:
        return -total
    if total > _MAX - 1:
        raise ValueError(f"time: invalid duration {go_quote(orig)}")
    return total


def _number(rest: bytes, orig: bytes) -> tuple[int, int, float, bytes]:
    """[0-9]*(\\.[0-9]*)? at the start of `rest`: (integer part, fraction digits as an int, their scale,
    what follows)."""
    if rest[:1] not in (b".", *(bytes([d]) for d in _DIGITS)):
        raise ValueError(f"time: invalid duration {go_quote(orig)}")
    end = _digits_end(rest, 0)
    whole = rest[:end]
    value = int(whole) if whole else 0
    if value > _MAX:  # Go's leadingInt overflows
        raise ValueError(f"time: invalid duration {go_quote(orig)}")
    rest = rest[end:]
    fraction, scale, post = 0, 1.0, False
    if rest[:1] == b".":
        rest = rest[1:]
        end = _digits_end(rest, 0)
        post = end > 0
        for digit in rest[:end]:  # Go's leadingFraction stops adding digits once they would overflow
            if fraction > (_MAX - 1) // 10:
                continue
            fraction, scale = fraction * 10 + digit - 48, scale * 10
        rest = rest[end:]
    if not whole and not post:
        raise ValueError(f"time: invalid duration {go_quote(orig)}")
    return value, fraction, scale, rest


def _digits_end(data: bytes, start: int) -> int:
    end = start
    while end < len(data) and data[end] in _DIGITS:
        end += 1
    return end


def go_quote(raw: bytes) -> str:
    """Go's time.quote: double quotes, `"` and `\\` escaped, bytes of non-ASCII or control characters as
    \\xNN."""
    out = []
    for byte in raw:
        if byte >= 0x80 or byte < 0x20:
            out.append(f"\\x{byte:02x}")
        elif byte in (0x22, 0x5C):
            out.append("\\" + chr(byte))
        else:
            out.append(chr(byte))
    return '"' + "".join(out) + '"'


def _go_type(value: Any) -> str:
    """reflect.TypeOf of a decoded JSON value, as Go prints it."""
    if isinstance(value, bool):
        return "bool"
    return "[]interface {}" if isinstance(value, list) else "map[string]interface {}"


def is_unload(value: Any) -> bool:
    """Whether `value` is a valid keep_alive of zero (Ollama's unload with an empty request)."""
    try:
        return parse_keep_alive(value) == 0
    except BadRequest:
        return False
