"""warmpool's own endpoint table (http/routes.py): fixed paths and {name} patterns, HEAD served by GET,
405 with Allow for a known path under another method, the proxy for every other path, answers given by
raising, and the query string read once."""

from __future__ import annotations

import json
from typing import Any

from warmpool.http.exchange import Answer, Headers
from warmpool.http.routes import Call, Failure, Routes
from warmpool.http.server import Fields


class FakeRequest:
    def __init__(self, method: str, path: str, query: str = "") -> None:
        self.method, self.path, self.query = method, path, query
        self.headers = Fields({})
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.content_length = 0
        self.peer = ""

    async def read(self) -> bytes:
        return b""


class FakeReply:
    def __init__(self) -> None:
        self.status = 0
        self.content_type = ""
        self.headers: Headers = []
        self.body = b""

    @property
    def started(self) -> bool:
        return self.status != 0

    @property
    def length_framed(self) -> bool:
        return True

    async def whole(self, status: int, reason: str, headers: Headers, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    async def start(self, status: int, reason: str, headers: Headers, length: int | None) -> None:
        self.status, self.headers = status, headers

    async def write(self, data: bytes) -> None:
        self.body += data

    def write_now(self, data: bytes) -> bool:
        self.body += data
        return False

    async def drain(self) -> None:
        pass

    async def end(self) -> None:
        pass

    def abort(self) -> None:
        pass


async def serve(routes: Routes, method: str, path: str, query: str = "") -> FakeReply:
    reply = FakeReply()
    await routes(FakeRequest(method, path, query), reply)
    return reply


def table() -> tuple[Routes, list[str]]:
    proxied: list[str] = []

    async def proxy(request: Any, reply: Any) -> None:
        proxied.append(request.path)
        await reply.whole(200, "", [], b"proxy")

    async def model(call: Call) -> Answer:
        if call.match_info["name"] == "missing":
            raise Failure.json(404, "model 'missing' not found")
        return Answer.json({"name": call.match_info["name"], "query": call.query})

    async def streamed(call: Call) -> None:
        await call.reply.start(200, "", [("Content-Type", "application/x-ndjson")], None)
        await call.reply.write(b"{}\n")

    routes = Routes(proxy)
    routes.add_get("/healthz", lambda call: _ok())
    routes.add_post("/warmpool/models/{name}/load", model)
    routes.add_post("/warmpool/models/{name}/warm", streamed)
    return routes, proxied


async def _ok() -> Answer:
    return Answer.json({"status": "ok"})


async def test_fixed_paths_patterns_and_the_proxy() -> None:
    routes, proxied = table()
    assert json.loads((await serve(routes, "GET", "/healthz")).body) == {"status": "ok"}
    answer = await serve(routes, "POST", "/warmpool/models/coder/load", "progress=1&x=")
    assert json.loads(answer.body) == {"name": "coder", "query": {"progress": "1", "x": ""}}
    assert (await serve(routes, "POST", "/warmpool/models/missing/load")).status == 404
    assert (await serve(routes, "POST", "/warmpool/models//load")).body == b"proxy"  # an empty name is no match
    assert (await serve(routes, "POST", "/api/chat")).body == b"proxy"
    assert proxied == ["/warmpool/models//load", "/api/chat"]


async def test_head_is_get_and_another_method_is_405_with_allow() -> None:
    routes, _ = table()
    assert (await serve(routes, "HEAD", "/healthz")).status == 200
    refused = await serve(routes, "DELETE", "/healthz")
    assert refused.status == 405 and ("Allow", "GET, HEAD") in refused.headers
    assert ("Allow", "POST") in (await serve(routes, "GET", "/warmpool/models/a/load")).headers


async def test_an_endpoint_may_stream_into_the_reply() -> None:
    routes, _ = table()
    answer = await serve(routes, "POST", "/warmpool/models/a/warm")
    assert answer.status == 200 and answer.body == b"{}\n"
