"""Answers warmpool gives itself: the model listings across all backends (/api/tags, /api/ps, /v1/models),
Ollama's root and version, and show/pull/copy/delete for models that do not live on an Ollama server.

Listings show every name a client may use (naming.py). /api/ps passes an Ollama server's own facts
through (details, digest, size, size_vram, context length) and fills them for llama.cpp models from the
GGUF header; its `expires_at` is warmpool's: when warmpool itself would unload the model if it stays idle
(a client's keep_alive, else the model's; never for a pinned one or one kept while in budget), not the
lease warmpool keeps re-arming on the Ollama server.
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

from warmpool.backends.base import Backend, ResidentModel
from warmpool.backends.gguf_header import GgufError, GgufFacts, read_facts
from warmpool.config import Config, ModelConfig
from warmpool.dialects import ollama_from_openai
from warmpool.errors import BackendError, BadRequest, ModelNotFound
from warmpool.http.exchange import Answer
from warmpool.proxy.naming import listed_names
from warmpool.proxy.routing import model_aliases
from warmpool.scheduling.pool import Pool, Scheduler

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
        return Answer.json({"models": await _ps(cfg, backends, scheduler)})
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
    return [_tag_entry(name, m, upstream.get(m.name)) for name, m in listed_names(cfg.models.values())]


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


def _tag_entry(name: str, model: ModelConfig, upstream: dict[str, Any] | None) -> dict[str, Any]:
    """`name`'s entry: the Ollama server's own for a model it holds, else from the weight file."""
    tagged = ollama_from_openai.with_default_tag(name)
    if upstream is not None:
        return {**upstream, "name": tagged, "model": tagged}
    size, modified = file_facts(model.gguf)
    facts = gguf_facts(model)
    return ollama_from_openai.ollama_tag_entry(
        name, size=size, modified_at=modified, digest=digest_of(model), family=facts.architecture if facts else "",
        quantization=facts.quantization if facts else "", parameter_size=facts.parameter_size if facts else "")


async def _ps(cfg: Config, backends: dict[str, Backend], scheduler: Scheduler) -> list[dict[str, Any]]:
    managed = [b for b in backends.values() if b.managed]
    results = await asyncio.gather(*(_bounded(b.resident()) for b in managed), return_exceptions=True)
    entries = []
    for result in results:
        for resident in result if isinstance(result, list) else []:
            model = cfg.models[resident.name]
            entries.append(_ps_entry(model, resident, _expires_at(scheduler.pool_of(model.name), model.name)))
    return sorted(entries, key=lambda e: e["expires_at"], reverse=True)


def _ps_entry(model: ModelConfig, resident: ResidentModel, expires_at: str) -> dict[str, Any]:
    """Ollama's /api/ps entry under the configured name: an Ollama server's own facts where it gave them,
    else the weight file's (a llama.cpp model)."""
    facts = None if resident.details else gguf_facts(model)
    size = resident.size or file_facts(model.gguf)[0]
    entry = ollama_from_openai.ollama_ps_entry(
        model.name, size=size, expires_at=expires_at, digest=resident.digest or digest_of(model),
        context_length=resident.context_length or _n_ctx(model) or (facts.context_length if facts else 0) or 0,
        family=facts.architecture if facts else "", quantization=facts.quantization if facts else "",
        parameter_size=facts.parameter_size if facts else "")
    if resident.details:
        entry["details"] = resident.details
    entry["size_vram"] = resident.size_vram if resident.details else _offloaded(model, size, facts)
    return entry


def _expires_at(pool: Pool, name: str) -> str:
    """When warmpool unloads `name` if it stays idle, as RFC 3339; Ollama's "forever" (now + 292 years)
    for a model that stays while in budget."""
    due = pool.idle_expiry(name)
    at = datetime.now(UTC) + (FOREVER if due is None else timedelta(seconds=due - pool.clock()))
    return at.isoformat().replace("+00:00", "Z")


def gguf_facts(model: ModelConfig) -> GgufFacts | None:
    """The configured GGUF's header facts (llama.cpp models); None without a readable file."""
    if not model.gguf:
        return None
    try:
        return read_facts(model.gguf)
    except (OSError, GgufError):
        return None


def _offloaded(model: ModelConfig, size: int, facts: GgufFacts | None) -> int:
    """The bytes of a llama.cpp model warmpool asked to offload to the GPU: none with n_gpu_layers 0,
    all with -1 (or at least every layer), else that share of its layers."""
    layers = model.llamacpp.n_gpu_layers if model.llamacpp is not None else 0
    blocks = facts.block_count if facts else None
    if layers == 0:
        return 0
    if layers < 0 or not blocks or layers >= blocks:
        return size
    return size * layers // blocks


def _openai_models(cfg: Config) -> list[dict[str, Any]]:
    created = int(time.time())
    entry = ollama_from_openai.openai_model_entry
    return [entry(name, created=created, owned_by=m.backend) for name, m in listed_names(cfg.models.values())]


def _openai_model(cfg: Config, requested: str) -> dict[str, Any]:
    """One model's entry, by any name a client may use for it (configured or upstream, with or without
    ':latest'), under the name asked for; a phase name is not a model."""
    name = model_aliases(cfg).get(requested)
    if name is None:
        raise ModelNotFound(f"model '{requested}' not found")
    return ollama_from_openai.openai_model_entry(requested, created=int(time.time()),
                                                 owned_by=cfg.models[name].backend)


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
    facts = gguf_facts(model)
    family = facts.architecture if facts else ""
    return {
        "license": "", "parameters": f"num_ctx {_n_ctx(model)}" if _n_ctx(model) else "",
        "template": "{{ .Prompt }}",
        "modelfile": f"# served by warmpool (backend {model.backend})\nFROM {model.gguf or model.upstream_name}\n",
        "details": {"parent_model": "", "format": "gguf", "family": family, "families": [family] if family else [],
                    "parameter_size": facts.parameter_size if facts else "",
                    "quantization_level": facts.quantization if facts else ""},
        "model_info": {"general.file_size": size, **_model_info(facts)},
        "capabilities": ["embedding"] if model.embedding else ["completion"],
        "modified_at": modified,
    }


def _model_info(facts: GgufFacts | None) -> dict[str, Any]:
    if facts is None:
        return {}
    info: dict[str, Any] = {"general.architecture": facts.architecture,
                            "general.parameter_count": facts.parameter_count}
    if facts.context_length:
        info[f"{facts.architecture}.context_length"] = facts.context_length
    return info


def _n_ctx(model: ModelConfig) -> int:
    """The context length warmpool configured for the model; 0 where the upstream decides it."""
    return model.llamacpp.n_ctx if model.llamacpp is not None else 0
