"""The exception tree; each error knows its HTTP status and renders itself in every client dialect.

    WarmpoolError                      500
    ├── ConfigError                    (startup / check-config; carries every problem with its key path)
    ├── ListenError                    (startup: the listen address cannot be bound)
    ├── BadRequest                     400  malformed JSON, missing model, unknown phase, bad field
    ├── Unauthorized                   401  missing or wrong API / admin key
    ├── Forbidden                      403  an API key where an admin key is needed
    ├── ModelNotFound                  404
    ├── QueueFull                      503  (+ Retry-After)
    ├── ShuttingDown                   503  (+ Retry-After)
    ├── QueueTimeout                   504
    └── BackendError                   502  an upstream refused, dropped or broke the protocol
        ├── BackendTimeout             504  an upstream did not answer in time
        └── BackendUnavailable         503  an upstream (or its managed process) cannot be started
"""

from __future__ import annotations

from typing import Any, Literal

# The API family a client speaks, or a backend's inference endpoints (backends speak only the first two).
Dialect = Literal["ollama", "openai", "anthropic"]

OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
# Anthropic's error types by status (its SDK's error objects; 529 is its own "overloaded", which a full
# queue is too).
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error body: {"type": "error", "error": {"type", "message"}}."""
    kind = ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


class WarmpoolError(Exception):
    """Base class: `status` is the HTTP status a client sees; `headers` are extra response headers."""

    status = 500
    code: str | None = None

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})

    def ollama_body(self) -> dict[str, Any]:
        return {"error": self.message}

    def openai_body(self) -> dict[str, Any]:
        kind = OPENAI_TYPES.get(self.status, "api_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": None, "code": self.code}}

    def anthropic_body(self) -> dict[str, Any]:
        return anthropic_error(self.status, self.message)

    def body(self, dialect: Dialect) -> dict[str, Any]:
        """The JSON body for `dialect`."""
        if dialect == "anthropic":
            return self.anthropic_body()
        return self.ollama_body() if dialect == "ollama" else self.openai_body()


class ConfigError(WarmpoolError):
    """An invalid configuration; `problems` holds one "key.path: what is wrong" line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))
        self.problems = list(problems)


class ListenError(WarmpoolError):
    """warmpool cannot listen where it was told to (the port is taken, the address is not this host's)."""


class BadRequest(WarmpoolError):
    status = 400


class Unauthorized(WarmpoolError):
    status = 401
    code = "invalid_api_key"


class Forbidden(WarmpoolError):
    status = 403


class ModelNotFound(WarmpoolError):
    status = 404
    code = "model_not_found"


class QueueFull(WarmpoolError):
    status = 503

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, round(retry_after)))})


class ShuttingDown(WarmpoolError):
    status = 503

    def __init__(self, message: str = "warmpool is shutting down") -> None:
        super().__init__(message, headers={"Retry-After": "5"})


class QueueTimeout(WarmpoolError):
    status = 504


class BackendError(WarmpoolError):
    """An upstream failed; the message always names the backend."""

    status = 502

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(f"backend {backend!r}: {reason}")
        self.backend = backend
        self.reason = reason


class BackendTimeout(BackendError):
    status = 504


class BackendUnavailable(BackendError):
    status = 503
