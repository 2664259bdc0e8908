"""Warnings about a valid configuration that will behave in a way its author likely did not mean: pure
checks over a `Config`, printed by `check-config` and logged at start-up (never errors: the config works).
"""

from __future__ import annotations

from warmpool.config.model import Config


def config_warnings(cfg: Config) -> list[str]:
    """One line per surprise, naming the keys involved."""
    return _min_residency_stalls(cfg)


def _min_residency_stalls(cfg: Config) -> list[str]:
    """On a pool that holds one model, a model's min_residency longer than scheduler.max_wait makes the
    first request for any other model of that pool wait the whole max_wait after the model loads (a
    preloaded one: right at start)."""
    found = []
    max_wait = cfg.scheduler.max_wait
    for backend in cfg.backends.values():
        models = [m for m in cfg.models.values() if m.backend == backend.name]
        if backend.max_resident != 1 or len(models) < 2:
            continue
        for model in models:
            own = model.min_residency is not None
            min_residency = model.min_residency if model.min_residency is not None else cfg.scheduler.min_residency
            if min_residency > max_wait and not model.pin:
                where = f"models.{model.name}.min_residency" if own else "scheduler.min_residency"
                found.append(
                    f"{where} ({min_residency:g} s) is longer than scheduler.max_wait ({max_wait:g} s) on backend "
                    f"{backend.name!r}, which holds one model: once {model.name} is loaded, a request for another "
                    f"of its models waits max_wait ({max_wait:g} s); keep min_residency below max_wait")
    return found
