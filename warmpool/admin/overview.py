"""What the status API shows beside the pools: the phase map, and each backend's health as a probe found it
a moment ago (probes are shared and at most one per backend every few seconds, so a status page polling
every second costs the backends nothing much)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

from warmpool.backends.base import Backend
from warmpool.config import Config

PROBE_EVERY = 5.0  # seconds a backend's last probe stands for its health
PROBE_TIMEOUT = 2.0  # a backend that does not answer within this is down for the status page


def phase_map(cfg: Config) -> dict[str, Any]:
    """Which model serves each phase, and the phase of requests that name none."""
    return {"phases": dict(cfg.phases), "default_phase": cfg.default_phase}


class BackendHealth:
    """Each backend's last health probe: {name, kind, url, healthy, answered_once, checked_at}."""

    def __init__(self, backends: dict[str, Backend], clock: Callable[[], float] = time.monotonic) -> None:
        self.backends = backends
        self.clock = clock
        self._last: dict[str, tuple[float, bool, float]] = {}  # name -> (monotonic, healthy, wall clock)
        self._probing: dict[str, asyncio.Task[bool]] = {}

    async def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        stale = [b for b in self.backends.values() if self._age(b.name, now) >= PROBE_EVERY]
        await asyncio.gather(*(self._probe(b) for b in stale))
        return {"backends": [self._entry(b) for b in self.backends.values()]}

    def _age(self, name: str, now: float) -> float:
        last = self._last.get(name)
        return math.inf if last is None else now - last[0]

    async def _probe(self, backend: Backend) -> None:
        task = self._probing.get(backend.name)
        if task is None:  # concurrent status requests share one probe
            task = self._probing[backend.name] = asyncio.ensure_future(self._bounded(backend))
            task.add_done_callback(lambda _: self._probing.pop(backend.name, None))
        healthy = await asyncio.shield(task)
        self._last[backend.name] = (self.clock(), healthy, time.time())

    @staticmethod
    async def _bounded(backend: Backend) -> bool:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                return await backend.health()
        except (TimeoutError, OSError):
            return False

    def _entry(self, backend: Backend) -> dict[str, Any]:
        _, healthy, at = self._last.get(backend.name, (0.0, False, 0.0))
        return {"name": backend.name, "kind": backend.config.kind, "url": backend.config.url,
                "healthy": healthy, "answered_once": backend.healthy_once, "checked_at": at}
