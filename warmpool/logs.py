"""Logging: text or JSON lines, each carrying the id of the request it belongs to."""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import secrets
import sys
import time

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("warmpool_request_id", default="-")
# Ids are this process's random prefix and a counter: unique across restarts, and no random bytes
# (a getrandom call) per request.
_ID_PREFIX = secrets.token_hex(3)
_ID_COUNTER = itertools.count(1)
# Fields a log call may pass through `extra=` that belong in a JSON line.
EXTRA_FIELDS = ("model", "phase", "status", "queue_wait_s", "duration_s", "backend", "swap_s", "pool")


def new_request_id(given: str | None = None) -> str:
    """Start a request's context: reuse a sane client-given X-Request-Id, else make one."""
    rid = given if given and len(given) <= 64 and given.isprintable() else f"{_ID_PREFIX}{next(_ID_COUNTER):06x}"
    REQUEST_ID.set(rid)
    return rid


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name,
            "request_id": getattr(record, "request_id", "-"), "msg": record.getMessage(),
        }
        line.update({k: getattr(record, k) for k in EXTRA_FIELDS if hasattr(record, k)})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s"


def configure(level: str = "info", fmt: str = "text") -> None:
    """Send warmpool's logs to stderr, one line per record."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger("warmpool")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    logging.getLogger("aiohttp.access").disabled = True  # warmpool writes its own access line
