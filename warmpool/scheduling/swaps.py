"""Carrying out one swap on a backend: unload the victims in order, then load the target until it has
produced a token, each step timed, logged and counted. The pool decides (policy.plan) and keeps the
queue; this module only acts on the backend and on the models' states.

A backend may end a load before the model produced a token (`LoadResult.answered` false: its first
request reads the weights, which is faster than a separate warm-up). The swap then stays open until the
backend reports that first answer (`on_answered`), and its duration, in the histogram and in the pool's
history, runs to that moment: what the client waited for. A swap nobody is waiting on when it ends is
closed at once.
"""

from __future__ import annotations

import asyncio
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
        self.unanswered: set[str] = set()  # loaded with answered=False; the swap's record not finished yet
        self.open: dict[str, tuple[SwapRecord, float]] = {}  # finished swaps waiting for the first answer
        backend.report_answers_to(self.answered)

    async def unload(self, name: str, reason: str) -> None:
        self.answered(name, waited=False)  # leaving before it answered: what was measured stands
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
            self.metrics.swaps.labels(self.pool, name, reason, "ok").inc()
        if result.answered:
            if self.metrics:
                self.metrics.load_duration.labels(self.pool, name, source).observe(result.seconds)
        else:
            self.unanswered.add(name)
        return self.clock() - started

    def load_failed(self, name: str, reason: str) -> None:
        self.models[name].status = "absent"
        self.unload_requested.discard(name)
        if self.metrics:
            self.metrics.swaps.labels(self.pool, name, reason, "error").inc()

    def finished(self, record: SwapRecord) -> None:
        """The swap's steps are done; record it now, or once its model answers (see the module docstring)."""
        model = record.model
        if model is not None and model in self.unanswered:
            self.unanswered.discard(model)
            if record.ok:
                self.open[model] = (record, self.clock())
                # After the pool's re-plan has granted the waiters (it runs right after this call).
                asyncio.get_running_loop().call_soon(self._close_if_unwanted, model)
                return
        self._observe_swap(record)

    def answered(self, model: str, *, waited: bool = True) -> None:
        """`model`'s first request after its load got its first bytes (or ended): its swap is over. With
        `waited` false the swap is closed as it was when its steps ended."""
        found = self.open.pop(model, None)
        if found is None:
            return
        record, finished_at = found
        waited_s = self.clock() - finished_at if waited else 0.0
        record.seconds += waited_s
        record.load_seconds = (record.load_seconds or 0.0) + waited_s
        log.info("%s on %s answered %.3f s after its load; swap %.3f s", model, self.pool, waited_s, record.seconds)
        self._observe_swap(record)
        if self.metrics:
            self.metrics.load_duration.labels(self.pool, model, record.source).observe(record.load_seconds)

    def _close_if_unwanted(self, model: str) -> None:
        state = self.models.get(model)
        if state is not None and state.inflight == 0:
            self.answered(model)  # nobody was waiting: the swap ends with the load

    def _observe_swap(self, record: SwapRecord) -> None:
        if self.metrics and record.ok and record.model:
            self.metrics.swap_duration.labels(self.pool, record.model, record.source).observe(record.seconds)
