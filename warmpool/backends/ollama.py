"""The Ollama backend: forwards both dialects to an Ollama server; loads, unloads and lists its models.

Ollama's rules that shape this module (research/upstream_spec.md §0, §1.6-§1.7):
- load = an empty /api/generate (or /api/embed for embedding models) with the same `options` real traffic
  uses, else the first real request reloads; the connection stays open until the load is done, because
  Ollama aborts a load whose client leaves;
- unload = `keep_alive: 0`, which Ollama answers before the runner is gone: confirm it via /api/ps;
- `keep_alive` is sent as a JSON number: numeric strings are a 400 there.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import datetime
from typing import Any

from warmpool.backends.base import Backend, LoadResult, ResidentModel
from warmpool.backends.control import read_json, send
from warmpool.config import BackendConfig, Config, ModelConfig
from warmpool.dialects.ollama_from_openai import with_default_tag
from warmpool.errors import BackendError, BadRequest

UNLOAD_CONFIRM_TIMEOUT = 30.0
UNLOAD_POLL_INTERVAL = 0.1
# What warmpool asks Ollama to keep an idle model for, when the model's config sets no keep_alive.
# Finite on purpose: if warmpool dies, Ollama frees the memory on its own; the refresher re-arms it.
DEFAULT_LEASE = 600.0
# Client endpoints Ollama serves itself, and since which version (research/upstream_spec.md §1.3: /v1/messages
# came with v0.14); warmpool forwards those instead of translating them.
NATIVE_SINCE = {"/v1/messages": (0, 14, 0)}


def ollama_keep_alive(model: ModelConfig) -> float:
    return model.keep_alive if model.keep_alive is not None else DEFAULT_LEASE


class OllamaBackend(Backend):
    speaks = "ollama"
    expires_models = True  # Ollama frees a model when its keep_alive runs out, whatever warmpool believes

    def __init__(self, config: BackendConfig, app_config: Config) -> None:
        super().__init__(config, app_config)
        self.disk_sizes: dict[str, int] = {}  # filled from /api/tags once the server answers
        self.version: str | None = None  # from /api/version, learned when the server first answers

    def base_url(self, model: ModelConfig | None) -> str:
        return self.config.url.rstrip("/")  # type: ignore[union-attr]

    def rewrite_body(self, model: ModelConfig, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """On Ollama's native API warmpool owns residency: a client's keep_alive would break pins and
        schedules (anything-llm#1588), and differing load-time options would force a reload (ollama#7773)."""
        out = super().rewrite_body(model, path, body)
        if path.startswith("/api/"):
            out["keep_alive"] = ollama_keep_alive(model)
            options = body.get("options") or {}
            if not isinstance(options, dict):
                raise BadRequest("'options' must be an object")
            if load_options(model):
                out["options"] = {**options, **load_options(model)}
        return out

    async def health(self) -> bool:
        try:
            answer = await self.get_json("/api/version")
            self.version = str(answer["version"]) if isinstance(answer, dict) and answer.get("version") else None
            await self._learn_disk_sizes()
        except BackendError:
            return False
        self.healthy_once = True
        return True

    async def _learn_disk_sizes(self) -> None:
        """Model file sizes from /api/tags: the best estimate of a model's footprint before its first load."""
        entries = (await self.get_json("/api/tags") or {}).get("models") or []
        on_disk = {with_default_tag(str(e.get("name", ""))): int(e.get("size") or 0) for e in entries}
        self.disk_sizes = {m.name: on_disk.get(with_default_tag(m.upstream_name), 0) for m in self.models.values()}

    def size_hint(self, model: ModelConfig) -> int:
        return model.size or self.disk_sizes.get(model.name, 0)

    async def load(self, model: ModelConfig) -> LoadResult:
        path, body = load_request(model)
        started = time.monotonic()
        data = await self._post(path, body)
        if isinstance(data, dict) and data.get("error"):
            raise BackendError(self.name, f"loading {model.upstream_name!r} failed: {data['error']}")
        seconds = time.monotonic() - started
        return LoadResult(seconds, size=await self._loaded_size(model))

    async def _loaded_size(self, model: ModelConfig) -> int | None:
        """The runner's footprint from /api/ps (weights + KV + graph), Ollama's own number."""
        for entry in await self.ps_raw():
            if with_default_tag(str(entry.get("name", ""))) == with_default_tag(model.upstream_name):
                return int(entry.get("size") or 0) or None
        return None

    async def unload(self, model: ModelConfig) -> None:
        await self._post("/api/generate", {"model": model.upstream_name, "keep_alive": 0})
        deadline = time.monotonic() + UNLOAD_CONFIRM_TIMEOUT
        while with_default_tag(model.upstream_name) in await self._loaded_names():
            if time.monotonic() > deadline:
                raise BackendError(self.name, f"{model.upstream_name!r} still in /api/ps after unload")
            await asyncio.sleep(UNLOAD_POLL_INTERVAL)

    async def resident(self) -> list[ResidentModel]:
        entries = (await self.get_json("/api/ps") or {}).get("models") or []
        by_upstream = self._configured_by_upstream()
        found = []
        for entry in entries:
            for name in by_upstream.get(with_default_tag(str(entry.get("name", ""))), []):
                found.append(_resident_from_ps(name, entry))
        return found

    async def loaded_expiries(self) -> dict[str, float | None]:
        """Configured name -> expiry (epoch seconds) for each /api/ps entry warmpool knows."""
        by_upstream = self._configured_by_upstream()
        found: dict[str, float | None] = {}
        for entry in await self.ps_raw():
            for name in by_upstream.get(with_default_tag(str(entry.get("name", ""))), []):
                found[name] = parse_expiry(entry.get("expires_at"))
        return found

    def lease_seconds(self, model: ModelConfig) -> float | None:
        return ollama_keep_alive(model)

    async def ollama_version(self) -> str | None:
        self.version = str((await self.get_json("/api/version"))["version"])
        return self.version

    def serves_natively(self, path: str) -> bool:
        since = NATIVE_SINCE.get(path)
        return since is not None and self.version is not None and version_tuple(self.version) >= since

    async def catalog(self) -> dict[str, dict[str, Any]] | None:
        entries = (await self.get_json("/api/tags") or {}).get("models") or []
        by_upstream = self._configured_by_upstream()
        found: dict[str, dict[str, Any]] = {}
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict):
                for name in by_upstream.get(with_default_tag(str(entry.get("name", ""))), []):
                    found[name] = entry
        return found

    async def ps_raw(self) -> list[dict[str, Any]]:
        return list((await self.get_json("/api/ps") or {}).get("models") or [])

    def _configured_by_upstream(self) -> dict[str, list[str]]:
        index: dict[str, list[str]] = {}
        for m in self.models.values():
            index.setdefault(with_default_tag(m.upstream_name), []).append(m.name)
        return index

    async def _loaded_names(self) -> set[str]:
        return {with_default_tag(str(e.get("name", ""))) for e in await self.ps_raw()}

    async def get_json(self, path: str) -> Any:
        resp = await send(self.session, self.name, "GET", self.base_url(None) + path, {}, None,
                          self.app_config.timeouts.connect + 20)
        return await read_json(resp, self.name)

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        # A load may take minutes; first_byte bounds it, and the connection stays open throughout.
        resp = await send(self.session, self.name, "POST", self.base_url(None) + path,
                          {"Content-Type": "application/json"}, json.dumps(body).encode(),
                          self.app_config.timeouts.first_byte)
        return await read_json(resp, self.name)


def version_tuple(version: str) -> tuple[int, ...]:
    """(0, 14, 2) for "0.14.2" or "v0.14.2-rc1"; what does not parse counts as (0,), older than any release."""
    numbers = re.findall(r"\d+", version.split("-")[0])
    return tuple(int(n) for n in numbers) or (0,)


def parse_expiry(text: str | None) -> float | None:
    """Seconds since the epoch of an /api/ps `expires_at` (RFC 3339 with up to nanoseconds)."""
    if not text:
        return None
    trimmed = re.sub(r"(\.\d{6})\d+", r"\1", text).replace("Z", "+00:00")
    try:
        return datetime.fromisoformat(trimmed).timestamp()
    except ValueError:
        return None


def load_options(model: ModelConfig) -> dict[str, Any]:
    """The load-time options configured for `model` (num_ctx, ...): sent with every request for it."""
    return model.ollama.options if model.ollama is not None else {}


def load_request(model: ModelConfig) -> tuple[str, dict[str, Any]]:
    """The empty request that makes Ollama load `model` with the options its traffic uses."""
    body: dict[str, Any] = {"model": model.upstream_name, "keep_alive": ollama_keep_alive(model)}
    if load_options(model):
        body["options"] = dict(load_options(model))
    if model.embedding:
        return "/api/embed", {**body, "input": []}
    return "/api/generate", body


def _resident_from_ps(name: str, entry: dict[str, Any]) -> ResidentModel:
    return ResidentModel(
        name=name,
        size=int(entry.get("size") or 0),
        expires_at=entry.get("expires_at"),
        context_length=int(entry.get("context_length") or 0),
        details=entry,
    )
