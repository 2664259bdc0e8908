"""Warnings about a valid configuration that will behave in a way its author likely did not mean: pure
checks over a `Config`, printed by `check-config` and logged at start-up (never errors: the config works).
"""

from __future__ import annotations

from warmpool.config.model import Config
from warmpool.config.names import name_clashes


def config_warnings(cfg: Config) -> list[str]:
    """One line per surprise, naming the keys involved."""
    return _interactive_wait_past_max_wait(cfg) + name_clashes(cfg.models.values())


def _interactive_wait_past_max_wait(cfg: Config) -> list[str]:
    """An interactive request cuts a batch model's residency short after interactive_max_wait, meant to be
    the shorter wait; past max_wait, max_wait (which applies to every request) comes first. (A
    min_residency longer than max_wait is no longer worth a warning: it holds a model only while a
    request for it is queued or expected sooner than a swap back costs.)"""
    sched = cfg.scheduler
    if sched.interactive_max_wait <= sched.max_wait:
        return []
    return [f"scheduler.interactive_max_wait ({sched.interactive_max_wait:g} s) is longer than "
            f"scheduler.max_wait ({sched.max_wait:g} s): interactive requests then get no earlier cut of a "
            f"batch model's residency than any request; keep it below max_wait"]
