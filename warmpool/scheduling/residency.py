"""Keeps warmpool's view of what each backend has loaded true, and keeps pinned models loaded.

At start every managed backend is asked what it already has loaded (`sync_residency`). A backend that
unloads models on its own (Ollama) is then polled: every few seconds its pool reads /api/ps: a model that
left without warmpool unloading it (Ollama's own expiry, another client, a crash) is marked gone, so the
next request reloads it; one loaded by someone else is counted. A model that should stay loaded is
re-armed before Ollama's `expires_at` (Ollama frees it at that instant, whatever warmpool believes).
"""

from __future__ import annotations

import asyncio
import logging
import time

from warmpool.backends.base import Backend
from warmpool.errors import BackendError
from warmpool.metrics import Metrics
from warmpool.scheduling.pool import Pool, Scheduler

log = logging.getLogger("warmpool.residency")
STARTUP_SYNC_TIMEOUT = 3.0
POLL_INTERVAL = 2.0
REFRESH_FRACTION = 0.2  # re-arm when less than this share of the lease is left ...
REFRESH_POLLS = 3  # ... or less than this many polls


def due_for_refresh(pool: Pool, listed: dict[str, float | None], now: float, interval: float) -> list[str]:
    """Idle resident models whose Ollama lease runs out soon while warmpool means to keep them longer
    (no keep_alive, or a client's keep_alive that outlasts the lease warmpool sends)."""
    due = []
    for name, expires in listed.items():
        state, model = pool.models[name], pool.backend.models[name]
        if state.status != "resident" or state.inflight or expires is None:
            continue
        own = pool.idle_expiry(name)
        if own is not None and now + (own - pool.clock()) <= expires:
            continue  # warmpool unloads it itself by then
        margin = max((pool.backend.lease_seconds(model) or 0.0) * REFRESH_FRACTION, interval * REFRESH_POLLS)
        if expires - now < margin:
            due.append(name)
    return due


def reconcile(pool: Pool, listed: dict[str, float | None]) -> None:
    """Correct the pool's view: gone models are marked lost, newly seen ones resident."""
    for name, state in pool.models.items():
        if state.status == "resident" and name not in listed:
            pool.mark_lost(name, "no longer listed in /api/ps")
        elif state.status == "absent" and name in listed:
            pool.mark_resident(name)


async def watch(pool: Pool, backend: Backend, metrics: Metrics | None,
                interval: float = POLL_INTERVAL) -> None:
    """Poll forever (cancelled at shutdown)."""
    while True:
        await poll_once(pool, backend, metrics, interval)
        await asyncio.sleep(interval)


async def poll_once(pool: Pool, backend: Backend, metrics: Metrics | None, interval: float) -> None:
    epoch = pool.epoch
    try:
        listed = await backend.loaded_expiries()
    except BackendError as exc:
        log.debug("backend %s: /api/ps failed: %s", backend.name, exc.reason)
        return
    if pool.epoch != epoch or pool.swap_task is not None:
        return  # a swap changed things while we asked: this answer may be stale
    reconcile(pool, listed)
    for name in due_for_refresh(pool, listed, time.time(), interval):
        await _refresh(pool, backend, name, metrics)


async def _refresh(pool: Pool, backend: Backend, name: str, metrics: Metrics | None) -> None:
    if pool.models[name].status != "resident" or name in pool.draining:
        return
    # Hold a lease while re-arming: a swap cannot unload the model under us, so this load request can
    # never bring back a model that was just evicted. Not a use: the model's idle time goes on.
    async with pool.lease(name, use=False):
        try:
            await backend.load(backend.models[name])
            result = "ok"
        except BackendError as exc:
            result = "error"
            log.warning("re-arming %s on %s failed: %s", name, backend.name, exc.reason)
    if metrics:
        metrics.refreshes.labels(pool.name, name, result).inc()


async def sync_residency(scheduler: Scheduler, backends: dict[str, Backend]) -> None:
    """At start: learn what each managed backend already has loaded, all at once and each within
    STARTUP_SYNC_TIMEOUT, so a hung backend cannot hold up listening; one that does not answer is
    learned later (the residency poller, or the first swap)."""
    managed = {name: b for name, b in backends.items() if b.managed}
    await asyncio.gather(*(_sync_one(scheduler, name, b) for name, b in managed.items()))


async def _sync_one(scheduler: Scheduler, name: str, backend: Backend) -> None:
    try:
        async with asyncio.timeout(STARTUP_SYNC_TIMEOUT):
            residents = await backend.resident()
    except TimeoutError:
        log.warning("backend %s: no answer about its loaded models within %g s", name, STARTUP_SYNC_TIMEOUT)
        return
    except BackendError as exc:
        log.warning("backend %s: cannot read its loaded models yet: %s", name, exc.reason)
        return
    for resident in residents:
        scheduler.pools[name].mark_resident(resident.name)
