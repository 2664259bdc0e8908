"""Keeps warmpool's view of what an Ollama server has loaded true, and keeps pinned models loaded.

Every few seconds each managed Ollama pool reads /api/ps: a model that left without warmpool unloading
it (Ollama's own expiry, another client, a crash) is marked gone, so the next request reloads it; one
loaded by someone else is counted. A model that should stay loaded is re-armed before Ollama's
`expires_at` (Ollama frees it at that instant, whatever warmpool believes).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from datetime import datetime
from typing import Any

from warmpool.backends.ollama import OllamaBackend, ollama_keep_alive, tagged
from warmpool.errors import BackendError
from warmpool.metrics import Metrics
from warmpool.scheduling.pool import Pool

log = logging.getLogger("warmpool.residency")
POLL_INTERVAL = 2.0
REFRESH_FRACTION = 0.2  # re-arm when less than this share of the lease is left ...
REFRESH_POLLS = 3  # ... or less than this many polls


def parse_expiry(text: str | None) -> float | None:
    """Seconds since the epoch of an /api/ps `expires_at` (RFC 3339 with up to nanoseconds)."""
    if not text:
        return None
    trimmed = re.sub(r"(\.\d{6})\d+", r"\1", text).replace("Z", "+00:00")
    try:
        return datetime.fromisoformat(trimmed).timestamp()
    except ValueError:
        return None


def listed_models(backend: OllamaBackend, entries: list[dict[str, Any]]) -> dict[str, float | None]:
    """Configured model name -> expiry (epoch seconds) for each /api/ps entry warmpool knows."""
    by_upstream: dict[str, list[str]] = {}
    for model in backend.models.values():
        by_upstream.setdefault(tagged(model.upstream_name), []).append(model.name)
    found: dict[str, float | None] = {}
    for entry in entries:
        for name in by_upstream.get(tagged(str(entry.get("name", ""))), []):
            found[name] = parse_expiry(entry.get("expires_at"))
    return found


def due_for_refresh(pool: Pool, listed: dict[str, float | None], now: float, interval: float) -> list[str]:
    """Idle resident models meant to stay (no keep_alive of their own) whose Ollama lease runs out soon."""
    due = []
    for name, expires in listed.items():
        state, model = pool.models[name], pool.backend.models[name]
        if state.status != "resident" or state.inflight or model.keep_alive is not None or expires is None:
            continue
        margin = max(ollama_keep_alive(model) * REFRESH_FRACTION, interval * REFRESH_POLLS)
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


async def watch(pool: Pool, backend: OllamaBackend, metrics: Metrics | None,
                interval: float = POLL_INTERVAL) -> None:
    """Poll forever (cancelled at shutdown)."""
    while True:
        await poll_once(pool, backend, metrics, interval)
        await asyncio.sleep(interval)


async def poll_once(pool: Pool, backend: OllamaBackend, metrics: Metrics | None, interval: float) -> None:
    epoch = pool.epoch
    try:
        entries = await backend.ps_raw()
    except BackendError as exc:
        log.debug("backend %s: /api/ps failed: %s", backend.name, exc.reason)
        return
    if pool.epoch != epoch or pool.swap_task is not None:
        return  # a swap changed things while we asked: this answer may be stale
    listed = listed_models(backend, entries)
    reconcile(pool, listed)
    for name in due_for_refresh(pool, listed, time.time(), interval):
        await _refresh(pool, backend, name, metrics)


async def _refresh(pool: Pool, backend: OllamaBackend, name: str, metrics: Metrics | None) -> None:
    if pool.models[name].status != "resident" or name in pool.draining:
        return
    # Hold a lease while re-arming: a swap cannot unload the model under us, so this load request can
    # never bring back a model that was just evicted.
    async with pool.lease(name):
        try:
            await backend.load(backend.models[name])
            result = "ok"
        except BackendError as exc:
            result = "error"
            log.warning("re-arming %s on %s failed: %s", name, backend.name, exc.reason)
    if metrics:
        metrics.refreshes.labels(pool.name, name, result).inc()
