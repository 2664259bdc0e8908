"""Carrying out one swap on a backend: unload the victims in order, then load the target until it has
produced a token, each step timed, logged and counted. The pool decides (policy.plan) and keeps the
queue; this module only acts on the backend and on the models' states.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from warmpool.backends.base import Backend
from warmpool.metrics import Metrics
from warmpool.scheduling.policy import ModelState

log = logging.getLogger("warmpool.scheduler")


@dataclass(slots=True)
class SwapRecord:
    """One finished swap, for the status API."""

    model: str | None
    evicted: list[str]
    reason: str
    started: float  # wall clock
    seconds: float
    load_seconds: float | None
    source: str
    ok: bool
    error: str | None = None


class SwapSteps:
    """The backend calls of a swap, with the state changes, logs and metrics that go with them."""

    def __init__(self, pool: str, backend: Backend, models: dict[str, ModelState], unload_requested: set[str],
                 metrics: Metrics | None, clock: Callable[[], float]) -> None:
        self.pool = pool
        self.backend = backend
        self.models = models
        self.unload_requested = unload_requested
        self.metrics = metrics
        self.clock = clock

    async def unload(self, name: str, reason: str) -> None:
        started = self.clock()
        try:
            await self.backend.unload(self.backend.models[name])
        except BaseException:
            # Not confirmed gone (e.g. still in /api/ps): it still occupies the budget, so stay resident
            # and load nothing beside it; the residency watcher corrects this if it did leave.
            self.models[name].status = "resident"
            raise
        finally:
            self.unload_requested.discard(name)
        self.models[name].status = "absent"
        seconds = self.clock() - started
        log.info("unloaded %s from %s in %.3f s (%s)", name, self.pool, seconds, reason)
        if self.metrics:
            self.metrics.unload_duration.labels(self.pool, name).observe(seconds)
            self.metrics.evictions.labels(self.pool, name, reason).inc()

    async def load(self, name: str, reason: str, source: str) -> float:
        """Load `name`; returns the seconds it took, as warmpool saw them."""
        started = self.clock()
        result = await self.backend.load(self.backend.models[name])
        state = self.models[name]
        state.status, state.loaded_at = "resident", self.clock()
        state.keep_alive = self.backend.models[name].keep_alive  # as in Ollama, a load resets a client's keep_alive
        state.last_used = max(state.last_used, state.loaded_at)
        if result.size and not self.backend.models[name].size:
            state.size = result.size  # measured beats unknown; a configured size is the operator's word
        log.info("loaded %s on %s in %.3f s (%s, from %s) %s", name, self.pool, result.seconds, reason, source,
                 {k: round(v, 3) for k, v in result.details.items()})
        if self.metrics:
            self.metrics.load_duration.labels(self.pool, name, source).observe(result.seconds)
            self.metrics.swaps.labels(self.pool, name, reason, "ok").inc()
        return self.clock() - started

    def load_failed(self, name: str, reason: str) -> None:
        self.models[name].status = "absent"
        self.unload_requested.discard(name)
        if self.metrics:
            self.metrics.swaps.labels(self.pool, name, reason, "error").inc()

    def finished(self, record: SwapRecord) -> None:
        if self.metrics and record.ok and record.model:
            self.metrics.swap_duration.labels(self.pool, record.model, record.source).observe(record.seconds)
