"""The one naming rule: an answer carries the model name the client sent, in both dialects and in every
chunk of a stream; listings show every name a client may use for a model (its configured name, and its
upstream name where that differs).

Upstreams echo the name warmpool sent them (the upstream name), so a relayed answer has that name
replaced on its way out (`Renamer`): only the value of a `"model"` key is touched, on whole lines, so a
name split across two reads is still found. Pure: no I/O.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable

from warmpool.config import ModelConfig, names


def echo_name(sent: object, model: ModelConfig) -> str:
    """The name an answer about `model` carries: the body's model as the client spelled it, else (a phase
    header or the default phase chose the model) the configured name."""
    return sent if isinstance(sent, str) and sent else model.name


def client_names(model: ModelConfig) -> list[str]:
    """The names a listing shows for `model`: the configured one, then the upstream one if different."""
    return list(dict.fromkeys((model.name, model.upstream_name)))


def listed_names(models: Iterable[ModelConfig]) -> list[tuple[str, ModelConfig]]:
    """(name, model) for every name a client may use, each name once, for the model a request by that
    name reaches (config/names.py: a configured name wins over another model's upstream name)."""
    configured = {m.name: m for m in models}
    reaches = names.model_aliases(configured.values())
    seen: dict[str, ModelConfig] = dict(configured)
    for model in configured.values():
        if reaches[model.upstream_name] == model.name:
            seen.setdefault(model.upstream_name, model)
    return list(seen.items())


class Renamer:
    """Replaces the value of every `"model"` key equal to `old` with `new` in a relayed body: whole bodies
    at once, streams line by line (a partial line waits for its end, which a line-reading client does
    anyway)."""

    __slots__ = ("_marker", "_new", "_pattern", "_pending")

    def __init__(self, old: str, new: str) -> None:
        self._marker, self._pattern, self._new = _compiled(old, new)  # the same few names on every request
        self._pending = b""

    def whole(self, body: bytes) -> bytes:
        if body.find(self._marker) < 0:  # not `in`: with a bytes needle it first raises and drops a TypeError
            return body
        return self._pattern.sub(self._replace, body)

    def _replace(self, match: re.Match[bytes]) -> bytes:
        return match.group(1) + self._new

    def feed(self, chunk: bytes) -> bytes:
        """The complete lines of what arrived so far, renamed; the rest waits for its newline."""
        data = self._pending + chunk if self._pending else chunk
        cut = data.rfind(b"\n") + 1
        self._pending = data[cut:]
        return self.whole(data[:cut]) if cut else b""

    def finish(self) -> bytes:
        """What is left at the end of the body (a last line without its newline)."""
        rest, self._pending = self._pending, b""
        return self.whole(rest)


@functools.lru_cache(maxsize=256)
def _compiled(old: str, new: str) -> tuple[bytes, re.Pattern[bytes], bytes]:
    spelled = json.dumps(old, ensure_ascii=False).encode()
    # `spelled` is a cheap test before the regex (most chunks of a long answer lack it); any spacing
    # around the colon: Ollama writes "model":"x", llama-cpp-python "model": "x".
    pattern = re.compile(rb'("model"\s*:\s*)' + re.escape(spelled))
    return spelled, pattern, json.dumps(new, ensure_ascii=False).encode()


def renamer_for(sent_upstream: str, echo: str) -> Renamer | None:
    """A Renamer when the upstream will echo a name other than the one the client sent."""
    return None if sent_upstream == echo else Renamer(sent_upstream, echo)
