"""Connects the RAM tier to the rest: finds each model's weight files, lets the scheduler ask where a
swap's weights come from and report use, and exports the tier's state as metrics."""

from __future__ import annotations

from collections.abc import Iterable

from warmpool.config import Config
from warmpool.metrics import Sample
from warmpool.ramtier import RamTier
from warmpool.scheduler import Scheduler
from warmpool.weights import SearchRoots, discover_all


def build_ram_tier(cfg: Config, scheduler: Scheduler) -> RamTier | None:
    """The RAM tier for `cfg`, hooked into every pool; None when `ram_tier.enabled` is false."""
    rt = cfg.ram_tier
    if not rt.enabled:
        return None
    roots = SearchRoots.from_settings(rt.ollama_models, rt.models_dirs, rt.hf_cache)
    tier = RamTier(rt, discover_all(cfg, roots), preload=cfg.preload, phases=cfg.phases,
                   in_backend=lambda: occupying(scheduler))
    for pool in scheduler.pools.values():
        pool.source_probe = tier.swap_source
        pool.on_use = tier.record_use
    return tier


def occupying(scheduler: Scheduler) -> set[str]:
    """Models loaded (or on their way in or out) in any backend: their files are never dropped."""
    return {name for pool in scheduler.pools.values() for name, s in pool.models.items() if s.occupies}


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
