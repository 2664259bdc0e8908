"""`GET /warmpool/residency`: what a balancer or an operator needs to place requests on this host, cheaply
(no upstream call, no file measurement: the scheduler's state and the RAM tier's last measurement).

Per model: its state on this host (resident, loading, unloading, or not loaded and then warm in RAM or
cold: cold also where the RAM tier cannot tell), its running (inflight) and waiting (queued) requests,
and their sum as its load. For the host: whether it is draining, its weight and agent-check line, and
the load window the weight comes from (admin/balancer.py).
"""

from __future__ import annotations

import socket
from typing import Any

from warmpool.admin.agent import Agent
from warmpool.admin.models import require_admin
from warmpool.http import auth
from warmpool.http.exchange import Answer
from warmpool.http.routes import Call, Routes
from warmpool.ramtier.tier import RamTier
from warmpool.scheduling.pool import Scheduler

LOADED_STATES = frozenset({"resident", "loading", "unloading"})


def model_state(status: str, ram_source: str) -> str:
    """A model's state on this host from its pool status and its RAM tier source ("ram", "disk", "unknown")."""
    if status in LOADED_STATES:
        return status
    return "warm" if ram_source == "ram" else "cold"


def residency_view(scheduler: Scheduler, tier: RamTier | None, agent: Agent) -> dict[str, Any]:
    """The JSON answer: every model of every pool, and the host's load, weight and draining flag."""
    models: dict[str, Any] = {}
    inflight = queued = 0
    for pool in scheduler.pools.values():
        waiting = pool.queue_counts()
        for name, state in pool.models.items():
            queue = waiting.get(name, 0)
            source = tier.source_for(name) if tier is not None else "unknown"
            models[name] = {"pool": pool.name, "state": model_state(state.status, source),
                            "inflight": state.inflight, "queued": queue, "load": state.inflight + queue}
            inflight, queued = inflight + state.inflight, queued + queue
    load = agent.load()
    return {
        "host": socket.gethostname(), "draining": agent.draining, "weight": agent.weight(),
        "agent": agent.line().decode().strip(),
        "load": {"inflight": inflight, "queued": queued,
                 "swapping": any(p.swap_task is not None for p in scheduler.pools.values()),
                 "swap_share": round(load.swap_share, 3), "queue_mean": round(load.queue_mean, 3)},
        "models": models,
    }


def add_residency_route(routes: Routes, scheduler: Scheduler, tier: RamTier | None, agent: Agent,
                        keys: auth.Keys) -> None:
    async def residency(request: Call) -> Answer:
        require_admin(request, keys)
        return Answer.json(residency_view(scheduler, tier, agent))

    routes.add_get("/warmpool/residency", residency)
