"""Hostile input from clients (issue 14): bodies no parser should take, keys that are not UTF-8, model names
that shadow each other, and admin-grade actions under the wrong key. warmpool runs in-process in front of
the Ollama emulator; every request is raw bytes on a loopback socket, so what is checked is what a client
gets on the wire, whichever code inside warmpool frames the request.

Each request goes twice where framing matters: with Content-Length and chunked (a server may take the two
down different paths; before issue 14 they reached different HTTP servers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.conftest import REPO, running_warmpool
from tests.ollama_emulator import EmulatedModel, OllamaEmulator
from warmpool.config import config_from_mapping, config_warnings
from warmpool.http import auth

pytestmark = pytest.mark.timeout(120)

FRAMINGS = ["length", "chunked"]
ANTHROPIC_VERSION = [(b"anthropic-version", b"2023-06-01")]


# -- a client that sends exactly the bytes it is given ---------------------------------------------------

@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def send(url: str, method: str, path: str, body: bytes = b"", *, framing: str = "length",
               headers: list[tuple[bytes, bytes]] | None = None) -> Answer:
    """One request on its own connection (`Connection: close`), its answer read to the end."""
    where = urlsplit(url)
    assert where.hostname and where.port
    reader, writer = await asyncio.open_connection(where.hostname, where.port)
    head = [f"{method} {path} HTTP/1.1".encode(), f"Host: {where.netloc}".encode(), b"Connection: close"]
    if body or method in ("POST", "DELETE"):
        head.append(b"Content-Type: application/json")
        head.append(b"Transfer-Encoding: chunked" if framing == "chunked" else b"Content-Length: %d" % len(body))
    head += [name + b": " + value for name, value in headers or []]
    payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if framing == "chunked" and body else body
    if framing == "chunked" and not body and method in ("POST", "DELETE"):
        payload = b"0\r\n\r\n"
    writer.write(b"\r\n".join(head) + b"\r\n\r\n" + payload)
    try:
        raw = await asyncio.wait_for(reader.read(-1), 30)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return parse_answer(raw)


def parse_answer(raw: bytes) -> Answer:
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = b""
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body, rest = body + rest[:size], rest[size + 2:]
    else:
        body = rest[: int(headers[b"content-length"])] if b"content-length" in headers else rest
    return Answer(int(status_line.split()[1]), headers, body)


def dialect_error(answer: Answer, dialect: str) -> str:
    """The error message, after checking the body has the dialect's error shape."""
    data = answer.json()
    if dialect == "ollama":
        assert set(data) == {"error"} and isinstance(data["error"], str), data
        return str(data["error"])
    if dialect == "openai":
        assert set(data["error"]) >= {"message", "type"}, data
        assert data["error"]["type"] == {400: "invalid_request_error", 401: "authentication_error",
                                         403: "permission_error"}[answer.status]
        return str(data["error"]["message"])
    assert data["type"] == "error" and set(data["error"]) == {"type", "message"}, data
    return str(data["error"]["message"])


# -- warmpool in front of the emulator ------------------------------------------------------------------

@pytest.fixture
async def emu() -> AsyncIterator[OllamaEmulator]:
    emulator = OllamaEmulator([EmulatedModel("alpha", size=100_000_000), EmulatedModel("beta", size=100_000_000)],
                              load_seconds_per_gb=0.1, token_delay=0.001)
    await emulator.start()
    yield emulator
    await emulator.stop()


def config(url: str, **extra: Any) -> dict[str, Any]:
    # "tuned" carries load-time options, so an OpenAI request for it is translated to Ollama's native API.
    return {"backends": {"ol": {"kind": "ollama", "url": url, "max_resident": 1}},
            "models": {"m1": {"backend": "ol", "upstream_name": "alpha"},
                       "tuned": {"backend": "ol", "upstream_name": "beta", "options": {"num_ctx": 512}}},
            **extra}


def received(emu: OllamaEmulator, path: str) -> list[dict[str, Any]]:
    return [e["body"] for e in emu.events if e["event"] == "request" and e["path"] == path]


# Where each dialect's client sends a body; `%s` is where the hostile value goes.
DIALECT_REQUESTS = [
    ("ollama", "/api/generate", '{"model": "m1", "prompt": "hi", "stream": false, "x": %s}'),
    ("ollama", "/api/chat", '{"model": "m1", "messages": [{"role": "user", "content": "hi"}], "stream": false,'
                            ' "x": %s}'),
    ("openai", "/v1/chat/completions", '{"model": "tuned", "messages": [{"role": "user", "content": "hi"}],'
                                       ' "x": %s}'),
    ("anthropic", "/v1/messages", '{"model": "m1", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],'
                                  ' "metadata": %s}'),
]


# -- defect 4: deep nesting is a 400 in the client's dialect, never a 500 --------------------------------

@pytest.mark.parametrize("framing", FRAMINGS)
async def test_deep_json_nesting_is_a_400_in_the_clients_dialect(emu: OllamaEmulator, framing: str) -> None:
    async with running_warmpool(config(emu.url)) as url:
        # 5000 levels: past what Python's parser can take. 980: parsed, but too deep to serialise again.
        for depth in (5000, 980):
            nested = "[" * depth + "]" * depth
            for dialect, path, template in DIALECT_REQUESTS:
                answer = await send(url, "POST", path, (template % nested).encode(), framing=framing,
                                    headers=ANTHROPIC_VERSION)
                assert answer.status == 400, (depth, path, answer)
                assert "nested too deeply" in dialect_error(answer, dialect)
        # The exact body of the report.
        body = b'{"model":"m1","x":' + b"[" * 5000 + b"]" * 5000 + b"}"
        answer = await send(url, "POST", "/api/generate", body, framing=framing)
        assert answer.status == 400 and "nested too deeply" in dialect_error(answer, "ollama")
        # Nesting a client may mean is still served.
        ok = DIALECT_REQUESTS[0][2] % ("[" * 100 + "]" * 100)
        assert (await send(url, "POST", "/api/generate", ok.encode(), framing=framing)).status == 200


# -- defect 10: NaN and Infinity are not JSON ------------------------------------------------------------

@pytest.mark.parametrize("framing", FRAMINGS)
async def test_nan_and_infinity_are_a_400_in_the_clients_dialect(emu: OllamaEmulator, framing: str) -> None:
    async with running_warmpool(config(emu.url)) as url:
        for value in ("NaN", "Infinity", "-Infinity", "1e400", '{"temperature": NaN}'):
            for dialect, path, template in DIALECT_REQUESTS:
                answer = await send(url, "POST", path, (template % value).encode(), framing=framing,
                                    headers=ANTHROPIC_VERSION)
                assert answer.status == 400, (value, path, answer)
                assert "invalid JSON" in dialect_error(answer, dialect)
        # JSON text inside the body (OpenAI's tool-call arguments) is held to the same rule.
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": NaN}'}}
        body = {"model": "tuned", "messages": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": None, "tool_calls": [call]}]}
        answer = await send(url, "POST", "/v1/chat/completions", json.dumps(body).encode(), framing=framing)
        assert answer.status == 400 and "arguments" in dialect_error(answer, "openai")
    assert not any("NaN" in json.dumps(b) or "Infinity" in json.dumps(b) for b in received(emu, "/api/chat"))


# -- defect 5: a key that is not UTF-8 is a wrong key (401), on every lane and admin endpoint -------------

ADMIN_ENDPOINTS = [("GET", "/warmpool/status"), ("GET", "/warmpool/models"), ("GET", "/warmpool/residency"),
                   ("POST", "/warmpool/models/m1/load"), ("POST", "/warmpool/models/m1/unload"),
                   ("POST", "/warmpool/models/m1/warm"), ("POST", "/warmpool/models/m1/evict")]
NOT_UTF8 = [(b"Authorization", b"Bearer caf\xe9"), (b"X-Api-Key", b"caf\xe9"),
            (b"Authorization", b"Bearer \xff\xfe\x80")]


@pytest.mark.parametrize("framing", FRAMINGS)
async def test_a_key_that_is_not_utf8_is_a_401(emu: OllamaEmulator, framing: str) -> None:
    async with running_warmpool(config(emu.url, auth={"api_keys": ["café"], "admin_keys": ["adm"]})) as url:
        generate = b'{"model": "m1", "prompt": "hi", "stream": false}'
        chat = b'{"model": "m1", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}'
        for header in NOT_UTF8:
            answer = await send(url, "POST", "/api/generate", generate, framing=framing, headers=[header])
            assert answer.status == 401 and dialect_error(answer, "ollama") == "missing or invalid API key"
            answer = await send(url, "POST", "/v1/messages", chat, framing=framing, headers=[header])
            assert answer.status == 401 and dialect_error(answer, "anthropic") == "missing or invalid API key"
            for method, path in ADMIN_ENDPOINTS:
                answer = await send(url, method, path, framing=framing, headers=[header])
                assert answer.status == 401, (header, path, answer)
        # The configured key, sent as its UTF-8 bytes (what a client that sends UTF-8 sends), is accepted.
        answer = await send(url, "POST", "/api/generate", generate, framing=framing,
                            headers=[(b"Authorization", "Bearer café".encode())])
        assert answer.status == 200, answer


# -- defect 6: a configured name always wins over another model's upstream name --------------------------

@pytest.fixture
async def second_emu() -> AsyncIterator[OllamaEmulator]:
    emulator = OllamaEmulator([EmulatedModel("coder", size=100_000_000)], load_seconds_per_gb=0.1,
                              token_delay=0.001)
    await emulator.start()
    yield emulator
    await emulator.stop()


def clashing(url_a: str, url_b: str, *, remote_first: bool = False) -> dict[str, Any]:
    """`coder` on backend a (upstream "alpha"), and `remote` on backend b whose upstream name is "coder"
    (in the order of the report, or the other way round: the order must not matter)."""
    models = {"coder": {"backend": "a", "upstream_name": "alpha"}, "remote": {"backend": "b", "upstream_name": "coder"}}
    if remote_first:
        models = dict(reversed(models.items()))
    return {"backends": {"a": {"kind": "ollama", "url": url_a}, "b": {"kind": "ollama", "url": url_b}},
            "models": models}


@pytest.mark.parametrize("remote_first", [False, True])
async def test_a_configured_name_wins_over_another_models_upstream_name(
        emu: OllamaEmulator, second_emu: OllamaEmulator, remote_first: bool) -> None:
    async with running_warmpool(clashing(emu.url, second_emu.url, remote_first=remote_first)) as url:
        for name in ("coder", "coder:latest"):
            body = json.dumps({"model": name, "prompt": "hi", "stream": False}).encode()
            answer = await send(url, "POST", "/api/generate", body)
            assert answer.status == 200 and answer.headers[b"x-warmpool-model"] == b"coder", (name, answer)
            assert answer.json()["model"] == name
        answer = await send(url, "POST", "/api/generate", b'{"model": "remote", "prompt": "hi", "stream": false}')
        assert answer.status == 200 and answer.headers[b"x-warmpool-model"] == b"remote"
        tags = (await send(url, "GET", "/api/tags")).json()["models"]
        assert sorted(t["name"] for t in tags) == ["alpha:latest", "coder:latest", "remote:latest"]
    prompted = [[b["model"] for b in received(e, "/api/generate") if b.get("prompt")] for e in (emu, second_emu)]
    assert prompted == [["alpha", "alpha"], ["coder"]]  # (warmpool's own loads carry no prompt)


CLASH_WARNING = ("models.remote.upstream_name: 'coder' is the configured name of model 'coder', so a request "
                 "for 'coder' goes to 'coder', never to 'remote' (ask for 'remote')")


async def test_check_config_reports_the_name_clash(tmp_path: Path) -> None:
    cfg = clashing("http://127.0.0.1:1", "http://127.0.0.1:2")
    assert config_warnings(config_from_mapping(cfg, env={})) == [CLASH_WARNING]
    other_way = clashing("http://127.0.0.1:1", "http://127.0.0.1:2", remote_first=True)
    assert config_warnings(config_from_mapping(other_way, env={})) == [CLASH_WARNING]
    path = tmp_path / "clash.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "warmpool", "check-config", str(path), cwd=REPO,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 0 and f"warmpool: warning: {CLASH_WARNING}" in err.decode()
    # Two models with the same upstream name on different backends: the first configured gets the name.
    twins = {"backends": cfg["backends"], "models": {"one": {"backend": "a", "upstream_name": "llama3"},
                                                     "two": {"backend": "b", "upstream_name": "llama3:latest"}}}
    assert config_warnings(config_from_mapping(twins, env={})) == [
        "models.two.upstream_name: 'llama3:latest' is also the upstream name of model 'one', so a request for "
        "'llama3:latest' goes to 'one', never to 'two' (ask for 'two')"]


# -- defect 10: model management needs the admin key when one is set -----------------------------------

MANAGEMENT = [("DELETE", "/api/delete", b'{"model": "m1"}'),
              ("POST", "/api/pull", b'{"model": "m1", "stream": false}'),
              ("POST", "/api/copy", b'{"source": "m1", "destination": "m1-copy"}'),
              ("POST", "/api/generate", b'{"model": "m1", "keep_alive": 0}')]  # Ollama's unload


def bearer(key: str) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", b"Bearer " + key.encode())]


def store_changes(emu: OllamaEmulator) -> list[str]:
    return [e["path"] for e in emu.events if e["event"] == "request" and e["path"] in ("/api/delete", "/api/pull",
                                                                                        "/api/copy")]


async def test_model_management_needs_the_admin_key_when_only_admin_keys_are_set(emu: OllamaEmulator) -> None:
    async with running_warmpool(config(emu.url, auth={"admin_keys": ["adm"]})) as url:
        await send(url, "POST", "/api/generate", b'{"model": "m1"}')  # loaded (inference needs no key here)
        assert "alpha:latest" in emu.loaded()
        for method, path, body in MANAGEMENT:
            for headers in ([], bearer("wrong")):
                answer = await send(url, method, path, body, headers=headers)
                assert answer.status == 401, (path, headers, answer)
                assert dialect_error(answer, "ollama") == "missing or invalid admin key"
        assert store_changes(emu) == [] and "alpha:latest" in emu.loaded()
        for method, path, body in MANAGEMENT:
            assert (await send(url, method, path, body, headers=bearer("adm"))).status == 200, path
        assert store_changes(emu) == ["/api/delete", "/api/pull", "/api/copy"]
        assert "alpha:latest" not in emu.loaded()
        # /api/show only reads, and a keep_alive that is not 0 only loads: no key needed.
        assert (await send(url, "POST", "/api/show", b'{"model": "m1"}')).status == 200
        assert (await send(url, "POST", "/api/generate", b'{"model": "m1", "keep_alive": "5m"}')).status == 200


async def test_model_management_refuses_an_api_key_when_an_admin_key_is_set(emu: OllamaEmulator) -> None:
    async with running_warmpool(config(emu.url, auth={"api_keys": ["api"], "admin_keys": ["adm"]})) as url:
        for method, path, body in MANAGEMENT:
            answer = await send(url, method, path, body, headers=bearer("api"))
            assert answer.status == 403 and "admin key" in dialect_error(answer, "ollama"), (path, answer)
            assert (await send(url, method, path, body)).status == 401
        assert store_changes(emu) == []
        for method, path in ADMIN_ENDPOINTS:
            assert (await send(url, method, path, headers=bearer("api"))).status == 403, path
        # An API key still does what API keys are for; the admin key does too.
        generate = b'{"model": "m1", "prompt": "hi", "stream": false}'
        for key in ("api", "adm"):
            assert (await send(url, "POST", "/api/generate", generate, headers=bearer(key))).status == 200
            assert (await send(url, "POST", "/api/show", b'{"model": "m1"}', headers=bearer(key))).status == 200
        assert (await send(url, "DELETE", "/api/delete", b'{"model": "m1"}', headers=bearer("adm"))).status == 200


async def test_without_admin_keys_an_api_key_manages_models_and_the_admin_api(emu: OllamaEmulator) -> None:
    async with running_warmpool(config(emu.url, auth={"api_keys": ["api"]})) as url:
        for method, path in ADMIN_ENDPOINTS:  # before: open to anyone once api_keys were set
            answer = await send(url, method, path)
            assert answer.status == 401 and answer.json() == {"error": "missing or invalid API key"}, path
        assert (await send(url, "GET", "/warmpool/status", headers=bearer("api"))).status == 200
        assert (await send(url, "DELETE", "/api/delete", b'{"model": "m1"}')).status == 401
        assert (await send(url, "DELETE", "/api/delete", b'{"model": "m1"}', headers=bearer("api"))).status == 200
        assert (await send(url, "GET", "/healthz")).status == 200  # liveness never needs a key


# The rule itself, every case (http/auth.py): configured (api, admin) keys × presented key → verdicts for a
# proxied request and for an admin-grade action.
RULE = [
    ((), (), b"", "allowed", "allowed"),
    (("api",), (), b"", "unauthorized", "unauthorized"),
    (("api",), (), b"api", "allowed", "allowed"),
    ((), ("adm",), b"", "allowed", "unauthorized"),
    ((), ("adm",), b"adm", "allowed", "allowed"),
    (("api",), ("adm",), b"api", "allowed", "forbidden"),
    (("api",), ("adm",), b"adm", "allowed", "allowed"),
    (("api",), ("adm",), b"wrong", "unauthorized", "unauthorized"),
    (("café",), (), "café".encode(), "allowed", "allowed"),
    (("café",), (), b"caf\xe9", "unauthorized", "unauthorized"),  # the same text, not the same bytes
]


@pytest.mark.parametrize(("api", "admin", "presented", "request_verdict", "admin_verdict"), RULE)
def test_the_key_rule(api: tuple[str, ...], admin: tuple[str, ...], presented: bytes, request_verdict: str,
                      admin_verdict: str) -> None:
    keys = auth.Keys.of(api, admin)
    assert (keys.for_request(presented).value, keys.for_admin(presented).value) == (request_verdict, admin_verdict)
