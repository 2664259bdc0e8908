"""The placeholders of a `kind: command` model's template (`${PORT}`, `${MODEL}`, `${GGUF}`, `${SLOT_DIR}`):
which keys hold a template, which names warmpool fills in at each start, and filling them in (pure).

A config file's `${VAR}`s are the environment's, expanded when the file loads (load.py). In a template key
the four names below are warmpool's instead: load.py leaves them, and `$${`, for `fill` to handle when the
server starts (the port is only known then). Every other `${VAR}` there is still the environment's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

PLACEHOLDERS = frozenset({"PORT", "MODEL", "GGUF", "SLOT_DIR"})
TEMPLATE_KEYS = frozenset({"command", "env"})  # the model keys whose values are templates

_PLACEHOLDER = re.compile(r"(?P<escape>\$\$\{)|\$\{(?P<name>PORT|MODEL|GGUF|SLOT_DIR)\}")


def is_template_key(keys: tuple[str, ...]) -> bool:
    """Whether the value at `keys` (the path from the file's top) is a command template: models.<name>.command
    or models.<name>.env, and anything under them."""
    return len(keys) >= 3 and keys[0] == "models" and keys[2] in TEMPLATE_KEYS


def used(text: str) -> set[str]:
    """The placeholders `text` mentions (an escaped `$${PORT}` is not one)."""
    return {match["name"] for match in _PLACEHOLDER.finditer(text) if match["name"]}


def fill(text: str, values: Mapping[str, str]) -> str:
    """`text` with each placeholder replaced by its value and `$${` by a literal `${`; raises KeyError for a
    placeholder `values` lacks (the config check makes sure that cannot happen)."""
    return _PLACEHOLDER.sub(lambda match: "${" if match["escape"] else values[match["name"]], text)
