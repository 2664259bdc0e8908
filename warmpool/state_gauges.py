"""Gauges that describe live state, read at scrape time: resident models, queue depth, backend health."""

from __future__ import annotations

from collections.abc import Iterable

from warmpool.backends.base import Backend
from warmpool.metrics import Sample
from warmpool.scheduler import Scheduler


def scheduler_gauges(scheduler: Scheduler) -> Iterable[Sample]:
    resident, depth, loading = [], [], []
    for pool in scheduler.pools.values():
        queued = pool.queue_counts()
        for name, state in pool.models.items():
            resident.append(([pool.name, name], 1.0 if state.status == "resident" else 0.0))
            loading.append(([pool.name, name], 1.0 if state.status == "loading" else 0.0))
            depth.append(([pool.name, name], float(queued.get(name, 0))))
    yield ("warmpool_model_resident", "1 if the model is loaded in its backend, else 0.", ["pool", "model"], resident)
    yield ("warmpool_model_loading", "1 while the model is being loaded, else 0.", ["pool", "model"], loading)
    yield ("warmpool_queue_depth", "Requests waiting for the model to be resident.", ["pool", "model"], depth)


def backend_gauges(backends: dict[str, Backend]) -> Iterable[Sample]:
    up = [([b.name, b.config.kind], 1.0 if b.healthy_once else 0.0) for b in backends.values()]
    yield ("warmpool_backend_up", "1 once the backend answered its health probe.", ["backend", "kind"], up)
