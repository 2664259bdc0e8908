"""Preloading at start: the configured models that fit their pool's budget are loaded, in order, in the
background; serving starts at once. A failed load is logged and retried with backoff, never fatal."""

from __future__ import annotations

import asyncio
import logging

from warmpool.config import Config
from warmpool.errors import WarmpoolError
from warmpool.metrics import Metrics
from warmpool.scheduling.policy import fits
from warmpool.scheduling.pool import Scheduler

log = logging.getLogger("warmpool.preload")
FIRST_RETRY = 1.0
MAX_RETRY = 60.0


def fitting(cfg: Config) -> list[str]:
    """The preload list, minus the models that would not fit next to the earlier ones in their pool."""
    chosen: list[str] = []
    for name in dict.fromkeys(cfg.preload):
        backend = cfg.backend_of(name)
        sizes = [cfg.models[m].size or 0 for m in chosen if cfg.models[m].backend == backend.name]
        if fits(backend.max_resident, backend.vram_budget, sizes, cfg.models[name].size or 0):
            chosen.append(name)
    skipped = [m for m in cfg.preload if m not in chosen]
    if skipped:
        log.info("preload: %s do not fit their pool's budget next to %s; not preloaded", skipped, chosen)
    return chosen


async def preload(scheduler: Scheduler, cfg: Config, metrics: Metrics | None = None) -> list[str]:
    """Load each fitting model; pools work in parallel, one model at a time each. Returns the models
    preloaded (fewer than asked when warmpool shut down meanwhile)."""
    by_pool: dict[str, list[str]] = {}
    for name in fitting(cfg):
        by_pool.setdefault(cfg.models[name].backend, []).append(name)
    done = await asyncio.gather(*(_preload_pool(scheduler, names, metrics) for names in by_pool.values()))
    return [name for names in done for name in names]


async def _preload_pool(scheduler: Scheduler, names: list[str], metrics: Metrics | None) -> list[str]:
    return [name for name in names if await _load_with_retries(scheduler, name, metrics)]


async def _load_with_retries(scheduler: Scheduler, name: str, metrics: Metrics | None) -> bool:
    delay = FIRST_RETRY
    while True:
        try:
            async with scheduler.lease(name):
                log.info("preloaded %s", name)
            if metrics:
                metrics.preloads.labels(name, "ok").inc()
            return True
        except WarmpoolError as error:
            if scheduler.pool_of(name).closed:
                return False
            if metrics:
                metrics.preloads.labels(name, "error").inc()
            log.warning("preload of %s failed (%s); retrying in %.0f s", name, error.message, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, MAX_RETRY)
