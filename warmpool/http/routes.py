"""warmpool's own endpoints on the front door: a small table of (method, path pattern) -> handler, and the
request and answer shapes those handlers use. Whatever path the table does not hold goes to the proxy.

A pattern is a path whose segments in braces match any one segment: `/warmpool/models/{name}/load`.
A path the table holds under another method gets 405 with Allow; HEAD is served by a GET route.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import cached_property
from urllib.parse import parse_qsl

from warmpool.http.exchange import Answer, HeaderLookup, Incoming, Reply


class Failure(Exception):
    """An endpoint's answer given by raising (401, 404, 409 ...): sent as it is."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.body.decode("utf-8", "replace"))
        self.answer = answer

    @classmethod
    def json(cls, status: int, message: str, headers: dict[str, str] | None = None) -> Failure:
        return cls(Answer(json.dumps({"error": message}).encode(), status=status,
                          headers=tuple((headers or {}).items())))


@dataclass  # not slots: `query` is a cached_property
class Call:
    """One request to an endpoint: the request, where its answer goes, and what the pattern matched."""

    incoming: Incoming
    reply: Reply
    match_info: dict[str, str] = field(default_factory=dict)

    @property
    def headers(self) -> HeaderLookup:
        return self.incoming.headers

    @cached_property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(self.incoming.query, keep_blank_values=True))


# An endpoint answers with an Answer, or None when it wrote to `call.reply` itself (a stream).
Endpoint = Callable[[Call], Awaitable[Answer | None]]
Handle = Callable[[Incoming, Reply], Awaitable[None]]


class Routes:
    """The endpoint table; calling it serves one request, the proxy (`fallback`) taking what is not here."""

    def __init__(self, fallback: Handle) -> None:
        self.fallback = fallback
        self.fixed: dict[str, dict[str, Endpoint]] = {}  # path -> method -> endpoint
        self.patterns: list[tuple[tuple[str, ...], dict[str, Endpoint]]] = []

    def add(self, method: str, pattern: str, endpoint: Endpoint) -> None:
        if "{" not in pattern:
            self.fixed.setdefault(pattern, {})[method] = endpoint
            return
        segments = tuple(pattern.split("/"))
        for known, methods in self.patterns:
            if known == segments:
                methods[method] = endpoint
                return
        self.patterns.append((segments, {method: endpoint}))

    def add_get(self, pattern: str, endpoint: Endpoint) -> None:
        self.add("GET", pattern, endpoint)

    def add_post(self, pattern: str, endpoint: Endpoint) -> None:
        self.add("POST", pattern, endpoint)

    def __call__(self, incoming: Incoming, reply: Reply) -> Awaitable[None]:
        """The coroutine that serves the request: the proxy's own for a path not in the table (not wrapped
        in one more coroutine: every proxied request passes here)."""
        path = incoming.path
        methods = self.fixed.get(path)
        match_info: dict[str, str] = {}
        if methods is None and self.patterns and path.startswith("/warmpool/"):
            methods, match_info = self._match(path)
        if methods is None:
            return self.fallback(incoming, reply)
        return self._serve(incoming, reply, path, methods, match_info)

    async def _serve(self, incoming: Incoming, reply: Reply, path: str, methods: dict[str, Endpoint],
                     match_info: dict[str, str]) -> None:
        method = incoming.method
        endpoint = methods.get("GET" if method == "HEAD" else method)
        if endpoint is None:
            allowed = ", ".join(sorted({*methods, *(("HEAD",) if "GET" in methods else ())}))
            await Answer.json({"error": f"method {method} not allowed on {path}"}, status=405,
                              headers={"Allow": allowed}).send(reply, [])
            return
        try:
            answer = await endpoint(Call(incoming, reply, match_info))
        except Failure as failure:
            answer = failure.answer
        if answer is not None and not reply.started:
            await answer.send(reply, [])

    def _match(self, path: str) -> tuple[dict[str, Endpoint] | None, dict[str, str]]:
        parts = path.split("/")
        for segments, methods in self.patterns:
            if len(segments) != len(parts):
                continue
            found: dict[str, str] = {}
            for want, got in zip(segments, parts, strict=True):
                if want.startswith("{"):
                    if not got:
                        break
                    found[want[1:-1]] = got
                elif want != got:
                    break
            else:
                return methods, found
        return None, {}
