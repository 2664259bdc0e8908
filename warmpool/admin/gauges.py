"""Gauges that describe live state, read at scrape time: resident models, queue depth, backend health, and the
RAM tier's page-cache residency and counters."""

from __future__ import annotations

from collections.abc import Iterable

from warmpool.backends.base import Backend
from warmpool.metrics import Sample
from warmpool.ramtier.tier import RamTier
from warmpool.scheduling.pool import Scheduler


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
    for backend in backends.values():
        yield from backend.state_metrics()  # e.g. managed llama.cpp's kept context


def ram_tier_metrics(tier: RamTier) -> Iterable[Sample]:
    """Page-cache residency per model (from the last scan: no syscall at scrape time) and the counters."""
    total, available = tier.memory()
    resident, ratio, size = [], [], []
    for name in tier.weights:
        measured = tier.model_residency(name)
        if measured is not None:
            resident.append(([name], float(measured.bytes_resident)))
            ratio.append(([name], measured.fraction))
            size.append(([name], float(measured.bytes_total)))
    yield ("warmpool_pagecache_resident_bytes", "Bytes of the model's weight files in the page cache.",
           ["model"], resident)
    yield ("warmpool_pagecache_resident_ratio", "Share of the model's weight files in the page cache (0-1).",
           ["model"], ratio)
    yield ("warmpool_weights_size_bytes", "Size of the model's weight files on disk.", ["model"], size)
    yield ("warmpool_ramtier_budget_bytes", "Bytes of weights the RAM tier may keep in the page cache.",
           [], [([], float(tier.cfg.budget.of(total)))])
    yield ("warmpool_host_memory_available_bytes", "The host's available memory (MemAvailable).",
           [], [([], float(available))])
    yield from _counters(tier)


COUNTERS = {
    "hits": "Swaps whose weights were in RAM (at least min_warm_fraction resident) when they started.",
    "misses": "Swaps whose weights had to come from disk.",
    "warmed_bytes": "Bytes the RAM tier read into the page cache.",
    "evictions": "Times the RAM tier dropped a model's files from the page cache.",
    "evicted_bytes": "Bytes of the model's weight files the RAM tier dropped from the page cache.",
    "warm_errors": "Warming attempts that failed (unreadable file, mlock refused, ...).",
}


def _counters(tier: RamTier) -> Iterable[Sample]:
    for field_name, doc in COUNTERS.items():
        values = getattr(tier.counters, field_name)
        samples = [([name], float(values.get(name, 0))) for name in tier.weights]
        yield (f"warmpool_ramtier_{field_name}_total", doc, ["model"], samples)
