"""The body sent upstream, made from the client's own bytes where possible: passed on as it came, or with
only the top-level "model" value replaced. A long conversation is then never re-serialised (json.dumps of
a 100 KB chat costs about a millisecond), and every other byte reaches the upstream exactly as sent.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

# A "model" key at any depth. Inside a JSON string every quote is escaped, so an unescaped `"model"`
# followed by a colon is always a key, never text.
_MODEL_KEY = re.compile(rb'(?<!\\)"model"\s*:\s*')
_COLON = re.compile(rb"\s*:\s*")


def upstream_body(body: dict[str, Any], client_body: dict[str, Any], raw: bytes) -> bytes:
    """`body` as bytes, given that the client sent `raw`, which parsed to `client_body`."""
    if plain_utf8(raw):
        if body == client_body:
            return raw
        old, new = client_body.get("model"), body.get("model")
        if isinstance(old, str) and isinstance(new, str) and _only_model_differs(body, client_body):
            renamed = with_model(raw, old, new)
            if renamed is not None:
                return renamed
    return json.dumps(body).encode()


def with_model(raw: bytes, old: str, new: str) -> bytes | None:
    """`raw`, a JSON object whose top-level "model" is `old`, with that value replaced by `new`; None
    when that cannot be done safely on the bytes: "model" is a key more than once (a tool schema may
    have one), or the value is not spelled the way json.dumps spells it (escapes)."""
    at = raw.find(b'"model"')
    if at >= 0 and raw.find(b'"model"', at + 7) < 0:  # the usual case, found without a regex
        colon = _COLON.match(raw, at + 7)
        if colon is None:
            return None  # the one "model" is a value, the key must be spelled with escapes
        start = colon.end()
    else:
        keys = list(_MODEL_KEY.finditer(raw))
        if len(keys) != 1:
            return None
        start = keys[0].end()
    spelled = _spelled(old)
    if not raw.startswith(spelled, start):
        return None
    return b"%s%s%s" % (raw[:start], _spelled(new), raw[start + len(spelled):])


@functools.lru_cache(maxsize=256)
def _spelled(name: str) -> bytes:
    """A model name as json.dumps writes it (the same few names, on every request)."""
    return json.dumps(name).encode()


def _only_model_differs(body: dict[str, Any], client_body: dict[str, Any]) -> bool:
    # Values are the very objects of the client's body (a shallow copy), so identity is the test.
    if body.keys() != client_body.keys():
        return False
    return all(value is client_body[key] or key == "model" for key, value in body.items())


def plain_utf8(raw: bytes) -> bool:
    """No BOM and not UTF-16/32 (which json.loads accepts but an upstream may not)."""
    return raw[:1] not in (b"\xef", b"\xfe", b"\xff") and b"\x00" not in raw[:4]
