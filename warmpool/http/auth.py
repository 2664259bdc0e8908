"""Key checks for proxied requests (`auth.api_keys`) and the admin API (`auth.admin_keys`). Pure: headers
in, a decision out.

Keys are compared as the bytes the client sent against the UTF-8 bytes of the configured keys, in
constant time: a header value is bytes on the wire (a key that is not UTF-8 is simply a wrong key, never
an error), and decoding it first would make the answer depend on which decoding a server picked.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

RawHeaders = Sequence[tuple[bytes, bytes]]


def presented_key(raw_headers: RawHeaders, *, x_api_key: bool = False) -> bytes:
    """The key a request presents: `Authorization: Bearer KEY`, or (for API clients that use it)
    `x-api-key`; the first of repeated headers; b"" when none."""
    authorization = _first(raw_headers, b"authorization")
    if authorization is not None and authorization[:7].lower() == b"bearer ":
        return authorization[7:].strip(b" \t")
    api_key = _first(raw_headers, b"x-api-key") if x_api_key else None
    return api_key.strip(b" \t") if api_key is not None else b""


def _first(raw_headers: RawHeaders, name: bytes) -> bytes | None:
    for field, value in raw_headers:
        if len(field) == len(name) and field.lower() == name:
            return value
    return None


def accepted(presented: bytes, keys: list[bytes]) -> bool:
    """True when no keys are configured, or the presented one matches one of them (in constant time)."""
    return not keys or matches(presented, keys)


def matches(presented: bytes, keys: list[bytes]) -> bool:
    """Whether `presented` is one of `keys`; every key is compared, so the time does not tell which."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented, key)
    return found
