"""Value parsers: each takes a raw value (from YAML, the environment or a flag) and returns the typed one or
raises ValueError with a message; durations and sizes in the forms the config file accepts."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeGuard
from urllib.parse import urlsplit

import yaml


class _Text(str):
    """Text that came from the environment (a ${VAR} or a WARMPOOL_* variable) or a command-line flag:
    where a number, boolean, duration or size is expected it is read like a YAML scalar, so
    `max_resident: ${N}` works although the substitution is a string."""

    __slots__ = ()



# Value parsers: each takes a raw value and returns the typed one or raises ValueError(message) ------

Parser = Callable[[Any], Any]
_INVALID = object()  # what a parse that failed (and was reported) yields


def _show(value: Any) -> str:
    """A value for an error message, YAML-flavoured and cut short."""
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    text = repr(str(value)) if isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _expect(what: str, value: Any) -> ValueError:
    return ValueError(f"expected {what}, got {_show(value)}")


def _scalar(value: Any) -> Any:
    """Text from the environment read as a YAML scalar ("8" → 8, "true" → True); anything else as is."""
    if not isinstance(value, _Text):
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return str(value)
    return parsed if parsed is None or isinstance(parsed, (bool, int, float, str)) else str(value)


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, _Text) and value.strip() in ("", "~", "null", "Null", "NULL"))


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML's `true` is an int to Python


def _nullable(parse: Parser) -> Parser:
    """`parse`, except that null (or an empty environment value) means "not set"."""
    def parse_or_none(value: Any) -> Any:
        return None if _is_null(value) else parse(value)
    return parse_or_none


def _nonzero(parse: Parser) -> Parser:
    def parse_nonzero(value: Any) -> Any:
        result = parse(value)
        if not result:
            raise ValueError(f"must be greater than 0, got {_show(_scalar(value))}")
        return result
    return parse_nonzero


def _int(minimum: int) -> Parser:
    def parse_int(value: Any) -> int:
        value = _scalar(value)
        if not _is_int(value) or value < minimum:
            raise _expect(f"an integer >= {minimum}", value)
        return int(value)
    return parse_int


def _port(value: Any) -> int:
    """A TCP port; 0 picks a free one (the log line names it)."""
    port: int = _int(0)(value)
    if port > 65535:
        raise _expect("a port number 0-65535", value)
    return port


def _bool(value: Any) -> bool:
    value = _scalar(value)
    if not isinstance(value, bool):
        raise _expect("true or false", value)
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _expect("a non-empty string", value)
    return str(value)  # a plain str, not _Text: yaml.safe_dump refuses str subclasses


def _secret(value: Any) -> str:
    """Like _str, but an error never echoes the value: it may be a key."""
    if not isinstance(value, str) or not value:
        shown = "an empty string" if value == "" else type(value).__name__
        raise ValueError(f"expected a non-empty string, got {shown} (quote keys in YAML)")
    return str(value)


def _secret_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of strings, got {type(value).__name__}")
    for index, item in enumerate(value):
        try:
            _secret(item)
        except ValueError as exc:
            raise ValueError(f"item {index}: {exc}") from None
    return tuple(str(item) for item in value)


def _name_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise _expect("a list of names", value)
    return tuple(str(item) for item in value)


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise _expect("a fraction in (0, 1]", value)
    return float(value)


def _path_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise _expect("a list of paths", value)
    return tuple(_path(item) for item in value)


def _choice(*options: str) -> Parser:
    def parse_choice(value: Any) -> str:
        text = value.lower() if isinstance(value, str) else value
        if text not in options:
            raise _expect("one of " + ", ".join(options), value)
        return str(text)
    return parse_choice


_LISTEN = re.compile(r"(?:\[(?P<ipv6>[^\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d{1,5})")


def _listen(value: Any) -> tuple[str, int]:
    match = _LISTEN.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None or int(match["port"]) > 65535:
        raise _expect('"host:port" (IPv6 as "[::1]:port"; port 0-65535, 0 picks a free one)', value)
    return match["ipv6"] or match["host"], int(match["port"])


def _url(value: Any) -> str:
    if not isinstance(value, str) or not _is_http_url(value):
        raise _expect("an http:// or https:// URL", value)
    return str(value)


def _is_http_url(text: str) -> bool:
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _path(value: Any) -> str:
    return os.path.expanduser(_str(value))


def _file_path(value: Any) -> str:
    # Absolute, because the managed server process may run in another directory.
    return os.path.abspath(_path(value))


def _plain(value: Any) -> Any:
    """Plain YAML data: tuples become lists and environment text becomes the scalar it spells."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return _scalar(value)


def _mapping(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise _expect("a mapping with string keys", value)
    return _plain(value)  # type: ignore[no-any-return]


def _scalar_mapping(value: Any) -> dict[str, Any]:
    args = _mapping(value)
    for key, item in args.items():
        if isinstance(item, (dict, list)):
            raise ValueError(f"expected scalar values (string, number, boolean), {key!r} is {_show(item)}")
    return args


def _timeout(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds == 0:
        raise ValueError("expected a duration greater than 0, got 0")
    return seconds


def _keep_alive(value: Any) -> float | None:
    """A duration; as in Ollama, a negative one (-1, "-1m") means "keep it loaded" (None), as does null."""
    value = _scalar(value)
    if isinstance(value, str) and value.strip().startswith("-"):
        parse_duration(value.strip()[1:])  # still reject "-banana"
        return None
    if value is None or (_number(value) or 0.0) < 0:
        return None
    return parse_duration(value)


# Durations and sizes -------------------------------------------------------------------------------

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a string such as "500ms", "30s", "5m", "1h30m", "2h".
    Negative values are rejected; raises ValueError."""
    value = _scalar(value)
    seconds = _duration_text(value) if isinstance(value, str) else _number(value)
    if seconds is None or seconds < 0 or not math.isfinite(seconds):
        raise _expect("a duration (seconds, or e.g. '500ms', '30s', '5m', '1h30m')", value)
    return float(seconds)


def _duration_text(text: str) -> float | None:
    compact = text.replace(" ", "").lower()
    if _NUMBER.fullmatch(compact):
        return float(compact)
    if not _DURATION.fullmatch(compact):
        return None
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in _DURATION_PART.findall(compact))


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _size_units() -> dict[str, int]:
    units = {"": 1, "b": 1}
    for power, prefix in enumerate("kmgtp", start=1):
        units.update({prefix: 1000**power, prefix + "b": 1000**power})
        units.update({prefix + "i": 1024**power, prefix + "ib": 1024**power})
    return units


_SIZE_UNITS = _size_units()
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")


def parse_size(value: object) -> int:
    """Bytes from an integer or a string such as "512MB", "1.5GB", "800M", "4GiB": K/M/G/T(B) are powers
    of 1000, Ki/Mi/Gi/Ti(B) powers of 1024. Negatives and percentages are rejected; raises ValueError."""
    value = _scalar(value)
    if isinstance(value, str) and value.strip().endswith("%"):
        raise ValueError(f"expected a size in bytes (e.g. '4GiB'), got {_show(value)}: no percentages here")
    size = _size_text(value) if isinstance(value, str) else value if _is_int(value) else None
    if size is None or size < 0:
        raise _expect("a size (bytes, or e.g. '512MB', '1.5GB', '4GiB')", value)
    return size


def _size_text(text: str) -> int | None:
    match = _SIZE.fullmatch(text.strip().lower())
    if match is None or match[2] not in _SIZE_UNITS:
        return None
    number = float(match[1]) if "." in match[1] else int(match[1])  # big integers stay exact
    return round(number * _SIZE_UNITS[match[2]])

