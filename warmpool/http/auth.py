"""Key checks for proxied requests (`auth.api_keys`) and the admin API (`auth.admin_keys`)."""

from __future__ import annotations

import hmac

from warmpool.http.exchange import HeaderLookup


def bearer(headers: HeaderLookup, *, x_api_key: bool = False) -> bytes:
    """The key a request presents: `Authorization: Bearer KEY`, or (for API clients that use it) `x-api-key`."""
    auth = headers.get("Authorization") or ""
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip().encode()
    return (headers.get("x-api-key") or "").encode() if x_api_key else b""


def accepted(presented: bytes, keys: list[bytes]) -> bool:
    """True when no keys are configured, or the presented one matches one of them (in constant time)."""
    return not keys or any(hmac.compare_digest(presented, k) for k in keys)
