"""Who may do what: the key a request presents, and the rule for proxied requests (`auth.api_keys`) and for
admin-grade actions (`auth.admin_keys`). Pure: headers in, a decision out.

Keys are compared as the bytes the client sent against the UTF-8 bytes of the configured keys, in
constant time: a header value is bytes on the wire (a key that is not UTF-8 is simply a wrong key, never
an error), and decoding it first would make the answer depend on which decoding a server picked.

The rule (README, "Operating it"):
- a proxied request needs an API key when `api_keys` is set (an admin key also does);
- an admin-grade action (the admin API, changing a backend's model store, unloading a model) needs an
  admin key when `admin_keys` is set; without admin keys, an API key when `api_keys` is set; with
  neither, nothing (warmpool listens on loopback unless told otherwise).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

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


def matches(presented: bytes, keys: list[bytes]) -> bool:
    """Whether `presented` is one of `keys`; every key is compared, so the time does not tell which."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented, key)
    return found


class Verdict(Enum):
    ALLOWED = "allowed"
    UNAUTHORIZED = "unauthorized"  # no key, or not one of the keys: 401
    FORBIDDEN = "forbidden"  # a valid API key where an admin key is needed: 403


@dataclass(frozen=True, slots=True)
class Keys:
    """The configured keys, as bytes."""

    api: list[bytes]
    admin: list[bytes]

    @classmethod
    def of(cls, api_keys: Iterable[str], admin_keys: Iterable[str]) -> Keys:
        return cls([k.encode() for k in api_keys], [k.encode() for k in admin_keys])

    @property
    def open(self) -> bool:
        """No keys at all: every request is allowed (checked first, so an open proxy pays nothing)."""
        return not self.api and not self.admin

    def for_request(self, presented: bytes) -> Verdict:
        """A proxied request: an API key when API keys are set; an admin key does too."""
        if not self.api or matches(presented, self.api) or matches(presented, self.admin):
            return Verdict.ALLOWED
        return Verdict.UNAUTHORIZED

    def for_admin(self, presented: bytes) -> Verdict:
        """An admin-grade action: the admin key when admin keys are set, else what a proxied request needs."""
        if not self.admin:
            return self.for_request(presented)
        if matches(presented, self.admin):
            return Verdict.ALLOWED
        return Verdict.FORBIDDEN if self.api and matches(presented, self.api) else Verdict.UNAUTHORIZED
