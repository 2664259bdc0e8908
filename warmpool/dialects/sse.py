"""Server-sent events: decoding an upstream's byte stream into events (any chunk boundaries, LF or CRLF) and
framing events for a client. Pure; the translators build on it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Event:
    """One dispatched event: its `event:` name ("" when none was given) and its joined `data:` lines."""

    name: str
    data: str


class SSEDecoder:
    """Feeds bytes, yields whole events. Comments (": ping …"), `id:` and `retry:` are dropped. An `error:`
    field (how llama-server builds before PR #16109 framed a mid-stream error) counts as data of an event
    named "error"."""

    def __init__(self) -> None:
        self._buffer = b""
        self._name = ""
        self._data: list[str] = []

    def feed(self, data: bytes) -> list[Event]:
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        out: list[Event] = []
        for line in lines:
            out += self._line(line.removesuffix(b"\r"))
        return out

    def finish(self) -> list[Event]:
        """The events still due when the stream closed: a last line without its newline, and an event
        without its blank line, are taken as complete."""
        pending, self._buffer = self._buffer, b""
        out = self._line(pending.removesuffix(b"\r")) if pending else []
        return out + self._line(b"")

    def _line(self, line: bytes) -> list[Event]:
        if not line:
            return self._dispatch()
        field, _, value = line.decode("utf-8", "replace").partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._name = value.strip()
        elif field == "error":
            self._data.append(value)
            self._name = "error"
        return []

    def _dispatch(self) -> list[Event]:
        event = Event(self._name, "\n".join(self._data))
        self._name, self._data = "", []
        return [event] if event.data.strip() else []


def frame(obj: Any, name: str | None = None) -> bytes:
    """One SSE event carrying `obj` as JSON, named when `name` is given."""
    data = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {data}\n\n".encode()
