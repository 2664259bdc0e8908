"""The Ollama backend: forwards both dialects to an Ollama server; loads, unloads and lists its models.

Ollama's rules that shape this module (research/upstream_spec.md §0, §1.6-§1.7):
- load = an empty /api/generate (or /api/embed for embedding models) with the same `options` real traffic
  uses, else the first real request reloads; the connection stays open until the load is done, because
  Ollama aborts a load whose client leaves;
- unload = `keep_alive: 0`, which Ollama answers before the runner is gone: confirm it via /api/ps;
- `keep_alive` is sent as a JSON number: numeric strings are a 400 there;
- what a model can do is in /api/show's `capabilities` (Ollama 0.6.4+): an embedding-only model refuses
  /api/generate ("does not support generate"), so it is loaded through /api/embed. warmpool asks at start
  and before a model's first load; where Ollama does not say, the request that causes the load decides.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from datetime import datetime
from typing import Any

from warmpool.backends.base import Backend, LoadResult, ResidentModel
from warmpool.backends.control import read_json, send
from warmpool.config import BackendConfig, Config, ModelConfig
from warmpool.dialects.ollama_from_openai import with_default_tag
from warmpool.errors import BackendError, BadRequest

log = logging.getLogger("warmpool.backends.ollama")
UNLOAD_CONFIRM_TIMEOUT = 30.0
UNLOAD_POLL_INTERVAL = 0.1
# What warmpool asks Ollama to keep an idle model for, when the model's config sets no keep_alive.
# Finite on purpose: if warmpool dies, Ollama frees the memory on its own; the refresher re-arms it.
DEFAULT_LEASE = 600.0
# Client endpoints Ollama serves itself, and since which version (research/upstream_spec.md §1.3: /v1/messages
# came with v0.14); warmpool forwards those instead of translating them.
NATIVE_SINCE = {"/v1/messages": (0, 14, 0)}
EMBEDDING_PATHS = frozenset({"/api/embed", "/api/embeddings", "/v1/embeddings"})
REFUSES_GENERATE = "does not support generate"  # Ollama's 400 for an embedding model on /api/generate


def ollama_keep_alive(model: ModelConfig) -> float:
    return model.keep_alive if model.keep_alive is not None else DEFAULT_LEASE


class OllamaBackend(Backend):
    speaks = "ollama"
    expires_models = True  # Ollama frees a model when its keep_alive runs out, whatever warmpool believes

    def __init__(self, config: BackendConfig, app_config: Config) -> None:
        super().__init__(config, app_config)
        self.disk_sizes: dict[str, int] = {}  # filled from /api/tags once the server answers
        self.version: str | None = None  # from /api/version, learned when the server first answers
        self.capabilities: dict[str, frozenset[str]] = {}  # configured name -> what /api/show says
        self.silent: set[str] = set()  # models /api/show answered for without `capabilities` (Ollama < 0.6.4)
        self.last_request_embeds: dict[str, bool] = {}  # configured name -> its latest request was an embedding

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
            if not self.healthy_once:
                await self._learn_disk_sizes()
        except BackendError:
            return False
        if not self.healthy_once:
            self.healthy_once = True
            await asyncio.gather(*(self.learn_capabilities(m) for m in self.models.values()))
        return True

    async def _learn_disk_sizes(self) -> None:
        """Model file sizes from /api/tags: the best estimate of a model's footprint before its first load."""
        entries = (await self.get_json("/api/tags") or {}).get("models") or []
        on_disk = {with_default_tag(str(e.get("name", ""))): int(e.get("size") or 0) for e in entries}
        self.disk_sizes = {m.name: on_disk.get(with_default_tag(m.upstream_name), 0) for m in self.models.values()}

    def size_hint(self, model: ModelConfig) -> int:
        return model.size or self.disk_sizes.get(model.name, 0)

    def embedding_only(self, model: ModelConfig) -> bool:
        """Configured so (`embedding: true`), or /api/show lists "embedding" and not "completion"."""
        capabilities = self.capabilities.get(model.name)
        return model.embedding or (capabilities is not None and "embedding" in capabilities
                                   and "completion" not in capabilities)

    def note_request(self, model: ModelConfig, path: str) -> None:
        self.last_request_embeds[model.name] = path in EMBEDDING_PATHS

    async def learn_capabilities(self, model: ModelConfig) -> frozenset[str] | None:
        """What /api/show says `model` can do (asked once, then remembered); None where it does not say:
        an Ollama older than 0.6.4, a model not pulled yet, a server that does not answer."""
        known = self.capabilities.get(model.name)
        if known is not None or model.name in self.silent:
            return known
        try:
            shown = await self._post("/api/show", {"model": model.upstream_name})
        except BackendError as exc:
            log.debug("backend %s: /api/show %s: %s", self.name, model.upstream_name, exc.reason)
            return None
        listed = shown.get("capabilities") if isinstance(shown, dict) else None
        if not isinstance(listed, list):
            self.silent.add(model.name)  # it will not say later either: do not ask before every load
            return None
        self.capabilities[model.name] = frozenset(str(c) for c in listed)
        return self.capabilities[model.name]

    def _loads_through_embed(self, model: ModelConfig) -> bool:
        if model.name in self.capabilities or model.embedding:
            return self.embedding_only(model)
        return self.last_request_embeds.get(model.name, False)  # Ollama does not say: the request decides

    async def load(self, model: ModelConfig) -> LoadResult:
        await self.learn_capabilities(model)  # before its first load
        started = time.monotonic()
        try:
            data = await self._post(*load_request(model, embedding=self._loads_through_embed(model)))
        except BackendError as exc:
            if REFUSES_GENERATE not in exc.reason:
                raise
            # An embedding model nothing told warmpool about: Ollama refused the generate, so it says so.
            log.info("backend %s: %s is an embedding model; loading it through /api/embed", self.name, model.name)
            self.capabilities[model.name] = frozenset({"embedding"})
            data = await self._post(*load_request(model, embedding=True))
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


def load_request(model: ModelConfig, *, embedding: bool | None = None) -> tuple[str, dict[str, Any]]:
    """The empty request that makes Ollama load `model` with the options its traffic uses; an embedding
    model (`embedding`, else its config) through /api/embed, which is the one that loads it."""
    body: dict[str, Any] = {"model": model.upstream_name, "keep_alive": ollama_keep_alive(model)}
    if load_options(model):
        body["options"] = dict(load_options(model))
    if model.embedding if embedding is None else embedding:
        return "/api/embed", {**body, "input": []}
    return "/api/generate", body


def _resident_from_ps(name: str, entry: dict[str, Any]) -> ResidentModel:
    details = entry.get("details")
    return ResidentModel(
        name=name,
        size=_int(entry.get("size")),
        expires_at=entry.get("expires_at"),
        context_length=_int(entry.get("context_length")),
        details=details if isinstance(details, dict) else {},
        digest=entry.get("digest") if isinstance(entry.get("digest"), str) else None,
        size_vram=_int(entry.get("size_vram")),
    )


def _int(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0
