"""Pure request routing: which dialect a path speaks, what kind of endpoint it is, and which model serves it.

No I/O here: everything takes the parsed request and the config and returns a decision or raises a
`WarmpoolError` that the proxy renders in the client's dialect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from warmpool.config import Config, names
from warmpool.errors import BadRequest, Dialect, ModelNotFound

PHASE_HEADER = "X-Warmpool-Phase"

# Client endpoints that warmpool translates to the upstream's chat API (or forwards, where the upstream serves
# them itself): Anthropic's Messages API and OpenAI's Responses API.
MESSAGES = "/v1/messages"
RESPONSES = "/v1/responses"
TRANSLATED = frozenset({MESSAGES, RESPONSES})
# Anthropic's token counter: the model's own tokenizer where the upstream has one, else an estimate.
COUNT_TOKENS = "/v1/messages/count_tokens"
# Endpoints that run a model: they take a lease and may cause a swap.
INFERENCE = frozenset({
    "/api/generate", "/api/chat", "/api/embed", "/api/embeddings",
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
}) | TRANSLATED
# Endpoints that name a model but never load it (Ollama's model store operations).
MODEL_ADMIN = frozenset({"/api/show", "/api/pull", "/api/delete", "/api/copy"})
# Those of them that change a backend's model store: admin-grade (http/auth.py).
MODEL_MANAGEMENT = MODEL_ADMIN - {"/api/show"}
# Endpoints warmpool answers itself from the config and the backends' state.
LISTINGS = frozenset({"/", "/api/tags", "/api/ps", "/api/version", "/v1/models"})
MODEL_ENTRY_PREFIX = "/v1/models/"
ALLOWED_METHODS = {
    "/": ("GET", "HEAD"), "/api/version": ("GET", "HEAD"), "/api/tags": ("GET", "HEAD"),
    "/api/ps": ("GET",), "/v1/models": ("GET",), "/api/delete": ("DELETE",),
}


def dialect_of(path: str) -> Dialect:
    """"anthropic" for /v1/messages*, "openai" for the rest of /v1/*, "ollama" for everything else (Ollama's
    native API and its root)."""
    if path == MESSAGES or path.startswith(MESSAGES + "/"):
        return "anthropic"
    return "openai" if path.startswith("/v1/") else "ollama"


def allowed_methods(path: str) -> tuple[str, ...]:
    if is_model_entry(path):
        return ("GET",)
    return ALLOWED_METHODS.get(path, ("POST",))


def is_known_path(path: str) -> bool:
    return (path in INFERENCE or path in MODEL_ADMIN or path in LISTINGS or path == COUNT_TOKENS
            or is_model_entry(path))


def is_model_entry(path: str) -> bool:
    """GET /v1/models/{id}: one model's OpenAI entry (the id may contain slashes)."""
    return path.startswith(MODEL_ENTRY_PREFIX) and len(path) > len(MODEL_ENTRY_PREFIX)


@dataclass(frozen=True, slots=True)
class Choice:
    """The model that serves a request, and the phase that chose it (None when the body's model did)."""

    model: str
    phase: str | None


def model_field(path: str) -> str:
    """The body field that names the model: `source` for /api/copy, else `model`."""
    return "source" if path == "/api/copy" else "model"


def body_model(path: str, body: dict[str, Any]) -> str | None:
    """The model a body names; Ollama's legacy `name` field counts too."""
    value = body.get(model_field(path))
    if value is None and path in MODEL_ADMIN:
        value = body.get("name")
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"'{model_field(path)}' must be a string")
    return value or None


def choose_model(cfg: Config, aliases: dict[str, str], phase: str | None, requested: str | None) -> Choice:
    """Apply the routing rules: the phase header wins, then the body's model (a model or a phase name),
    then the default phase; otherwise the request is missing its model."""
    if phase:
        return _by_phase(cfg, phase)
    if requested:
        if requested in cfg.phases and requested not in aliases:
            return _by_phase(cfg, requested)
        if requested in aliases:
            return Choice(aliases[requested], None)
        raise ModelNotFound(f"model '{requested}' not found")
    if cfg.default_phase:
        return _by_phase(cfg, cfg.default_phase)
    raise BadRequest("model is required")


def _by_phase(cfg: Config, phase: str) -> Choice:
    model = cfg.phases.get(phase)
    if model is None:
        known = ", ".join(sorted(cfg.phases)) or "(none configured)"
        raise BadRequest(f"unknown phase '{phase}'; known phases: {known}")
    return Choice(model, phase)


def model_aliases(cfg: Config) -> dict[str, str]:
    """Every name a client may use for a configured model → its configured name (config/names.py has
    the rule: a configured name always wins over another model's upstream name)."""
    return names.model_aliases(cfg.models.values())
