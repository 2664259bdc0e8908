"""Answers warmpool gives itself: the model listings across all backends (/api/tags, /api/ps, /v1/models),
Ollama's root and version, and show/pull/copy/delete for models that do not live on an Ollama server.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from warmpool.backends.base import Backend
from warmpool.config import Config, ModelConfig
from warmpool.dialects import ollama_from_openai
from warmpool.errors import BackendError, BadRequest, ModelNotFound
from warmpool.http.exchange import Answer
from warmpool.proxy.routing import model_aliases
from warmpool.scheduling.pool import Scheduler

# The Ollama API version warmpool reports when no Ollama backend answers for itself.
OLLAMA_API_VERSION = "0.32.15"
# Listings are warmpool's own answers; upstream facts only enrich them, so a backend that accepts the
# connection but never answers may not hold one up for the backend's full request timeout.
UPSTREAM_LISTING_TIMEOUT = 5.0
FOREVER = timedelta(days=365 * 292)
T = TypeVar("T")


async def answer(path: str, cfg: Config, backends: dict[str, Backend], scheduler: Scheduler) -> Answer:
    if path == "/":
        return Answer.text("Ollama is running")
    if path == "/api/version":
        return Answer.json({"version": await _ollama_version(backends)})
    if path == "/api/tags":
        return Answer.json({"models": await _tags(cfg, backends)})
    if path == "/api/ps":
        return Answer.json({"models": await _ps(cfg, backends)})
    if path.startswith("/v1/models/"):
        return Answer.json(_openai_model(cfg, path[len("/v1/models/"):]))
    return Answer.json({"object": "list", "data": _openai_models(cfg)})


async def _ollama_version(backends: dict[str, Backend]) -> str:
    for backend in backends.values():
        try:
            version = await _bounded(backend.ollama_version())
        except (BackendError, TimeoutError, KeyError, TypeError):
            continue
        if version is not None:
            return version
    return OLLAMA_API_VERSION


async def _tags(cfg: Config, backends: dict[str, Backend]) -> list[dict[str, Any]]:
    upstream = await _catalogs(backends)
    return [_tag_entry(m, upstream.get(m.name)) for m in cfg.models.values()]


async def _catalogs(backends: dict[str, Backend]) -> dict[str, dict[str, Any]]:
    """Every backend's own listing entries (Ollama's /api/tags) by configured model name; an unreachable
    backend, or one without a catalog, adds none."""
    results = await asyncio.gather(*(_bounded(b.catalog()) for b in backends.values()), return_exceptions=True)
    found: dict[str, dict[str, Any]] = {}
    for result in results:
        if isinstance(result, dict):
            found.update(result)
    return found


async def _bounded(awaitable: Awaitable[T]) -> T:
    async with asyncio.timeout(UPSTREAM_LISTING_TIMEOUT):
        return await awaitable


def _tag_entry(model: ModelConfig, upstream: dict[str, Any] | None) -> dict[str, Any]:
    if upstream is not None:
        tagged = ollama_from_openai.with_default_tag(model.name)
        return {**upstream, "name": tagged, "model": tagged}
    size, modified = file_facts(model.gguf)
    return ollama_from_openai.ollama_tag_entry(model.name, size=size, modified_at=modified, digest=digest_of(model))


async def _ps(cfg: Config, backends: dict[str, Backend]) -> list[dict[str, Any]]:
    managed = [b for b in backends.values() if b.managed]
    results = await asyncio.gather(*(_bounded(b.resident()) for b in managed), return_exceptions=True)
    entries = []
    for result in results:
        for resident in result if isinstance(result, list) else []:
            model = cfg.models[resident.name]
            entries.append(_ps_entry(model, resident.size, resident.expires_at, resident.context_length))
    return sorted(entries, key=lambda e: e["expires_at"], reverse=True)


def _ps_entry(model: ModelConfig, size: int, expires_at: str | None, context_length: int) -> dict[str, Any]:
    expires = expires_at or (datetime.now(UTC) + FOREVER).isoformat().replace("+00:00", "Z")
    return ollama_from_openai.ollama_ps_entry(model.name, size=size or file_facts(model.gguf)[0], expires_at=expires,
                                     digest=digest_of(model), context_length=context_length or _n_ctx(model))


def _openai_models(cfg: Config) -> list[dict[str, Any]]:
    created = int(time.time())
    entry = ollama_from_openai.openai_model_entry
    return [entry(m.name, created=created, owned_by=m.backend) for m in cfg.models.values()]


def _openai_model(cfg: Config, requested: str) -> dict[str, Any]:
    """One model's entry, by any name a client may use for it (configured or upstream, with or without
    ':latest'); a phase name is not a model."""
    name = model_aliases(cfg).get(requested)
    if name is None:
        raise ModelNotFound(f"model '{requested}' not found")
    return ollama_from_openai.openai_model_entry(name, created=int(time.time()), owned_by=cfg.models[name].backend)


def file_facts(path: str | None) -> tuple[int, str]:
    """Size and modification time (RFC 3339) of a configured weight file; zeros when unknown."""
    try:
        st = os.stat(path) if path else None
    except OSError:
        st = None
    if st is None:
        return 0, datetime.fromtimestamp(0, UTC).isoformat()
    return st.st_size, datetime.fromtimestamp(st.st_mtime, UTC).isoformat()


def digest_of(model: ModelConfig) -> str:
    # A stable identifier, not a content hash: hashing gigabytes on every listing would be absurd.
    return hashlib.sha256(f"{model.backend}/{model.upstream_name}/{model.gguf}".encode()).hexdigest()


def model_admin_answer(path: str, model: ModelConfig, body: dict[str, Any]) -> Answer:
    """show / pull / copy / delete for a model that is not on an Ollama server."""
    if path == "/api/show":
        return Answer.json(_show(model))
    if path == "/api/pull":
        done = {"status": "success"}
        if body.get("stream", True) is False:
            return Answer.json(done)
        return Answer(translate_line(done), "application/x-ndjson")
    verb = path.rsplit("/", 1)[-1]
    raise BadRequest(f"model '{model.name}' is served from a {model.backend!r} backend that warmpool manages; "
                     f"{verb} works only for models on an Ollama server")


def translate_line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _show(model: ModelConfig) -> dict[str, Any]:
    size, modified = file_facts(model.gguf)
    return {
        "license": "", "parameters": f"num_ctx {_n_ctx(model)}" if _n_ctx(model) else "",
        "template": "{{ .Prompt }}",
        "modelfile": f"# served by warmpool (backend {model.backend})\nFROM {model.gguf or model.upstream_name}\n",
        "details": {"parent_model": "", "format": "gguf", "family": "", "families": [],
                    "parameter_size": "", "quantization_level": ""},
        "model_info": {"general.file_size": size},
        "capabilities": ["embedding"] if model.embedding else ["completion"],
        "modified_at": modified,
    }


def _n_ctx(model: ModelConfig) -> int:
    """The context length warmpool configured for the model; 0 where the upstream decides it."""
    return model.llamacpp.n_ctx if model.llamacpp is not None else 0
