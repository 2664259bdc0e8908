"""The pure scheduling decision for one pool: who is served now, what is evicted, what is loaded next.

`plan(view, now)` takes a snapshot of the pool and returns a `Plan`; it does no I/O and keeps no state,
so every rule below is tested alone (tests/test_policy.py):

- a request for a resident model that nothing is draining is served at once (requests for the resident
  model are served before a swap away from it: A A B B, not A B A B);
- one swap at a time; requests for a model that is loading wait for that load;
- the next model to load is the one the oldest waiting request wants (FIFO, so nothing starves);
- the victim is the least recently used unpinned resident model that is idle and past its minimum
  residency; pinned models are never evicted, busy ones never cut: they are drained first;
- once the oldest waiter has waited `max_wait`, fairness wins over batching and minimum residency: the
  victims stop taking new requests and are evicted as soon as their running requests end;
- an idle model past its `keep_alive` is unloaded; an idle pool goes back to its default model;
- a model an operator asked to unload takes no new requests and goes as soon as it is idle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

# absent → loading → resident → unloading → absent; `occupies` while loading, resident or unloading.
ModelStatus = Literal["absent", "loading", "resident", "unloading"]


@dataclass(slots=True)
class ModelState:
    name: str
    status: ModelStatus = "absent"
    inflight: int = 0
    last_used: float = 0.0
    loaded_at: float = 0.0
    size: int = 0
    pinned: bool = False
    min_residency: float = 0.0
    keep_alive: float | None = None  # idle seconds before unloading; None = stay while in budget

    @property
    def occupies(self) -> bool:
        return self.status in ("loading", "resident", "unloading")


@dataclass(frozen=True, slots=True)
class Waiter:
    id: int
    model: str
    since: float


@dataclass(slots=True)
class PoolView:
    models: dict[str, ModelState]
    waiters: list[Waiter]  # oldest first
    swapping: bool = False
    max_resident: int = 1
    vram_budget: int | None = None
    max_wait: float = 30.0
    idle_default: str | None = None  # model to return to when the pool is idle
    idle_after: float | None = None  # seconds of idleness before returning to it
    unload_requested: set[str] = field(default_factory=set)  # operator unloads still to do


@dataclass(slots=True)
class Plan:
    grant: list[int] = field(default_factory=list)  # waiter ids to serve now
    evict: list[str] = field(default_factory=list)  # idle models to unload first, in order
    load: str | None = None  # model to load after the evictions
    reason: str = ""  # why this swap: demand | max_wait | keep_alive | idle_default
    draining: set[str] = field(default_factory=set)  # resident models that take no new requests
    fail: list[tuple[int, str]] = field(default_factory=list)  # waiters that can never be served
    wake_at: float | None = None  # when to plan again even if nothing happens

    @property
    def swaps(self) -> bool:
        return bool(self.evict) or self.load is not None


def plan(view: PoolView, now: float) -> Plan:
    """Decide what the pool does next. See the module docstring for the rules."""
    result = Plan(draining={m for m in view.unload_requested if view.models[m].status == "resident"})
    target = None if view.swapping else _next_target(view)
    if target is not None and _overdue(view, target, now):
        result.draining |= {m.name for m in _needed_victims(view, view.models[target.model]) or []}
    granted = [w for w in view.waiters if _servable(view.models[w.model], result.draining)]
    result.grant = [w.id for w in granted]
    # A model whose waiters are served now is busy, even though their requests have not started yet.
    busy = {w.model for w in granted}
    if not view.swapping and not _plan_requested_unload(view, result) and target is not None:
        _plan_swap(view, target, now, result, busy)
    if not view.swapping and not result.swaps and not view.waiters:
        _plan_idle(view, now, result)
    return result


def _plan_requested_unload(view: PoolView, result: Plan) -> bool:
    for name in sorted(result.draining & view.unload_requested):
        if not view.models[name].inflight:
            result.evict, result.reason = [name], "admin"
            return True
    return False


def _servable(model: ModelState, draining: set[str]) -> bool:
    return model.status == "resident" and model.name not in draining


def _next_target(view: PoolView) -> Waiter | None:
    """The oldest waiter whose model is not loaded and not on its way in."""
    for waiter in view.waiters:
        if not view.models[waiter.model].occupies:
            return waiter
    return None


def _overdue(view: PoolView, target: Waiter, now: float) -> bool:
    return now - target.since >= view.max_wait


def _needed_victims(view: PoolView, wanted: ModelState) -> list[ModelState] | None:
    return _victims_needed(view, wanted, _victim_candidates(view, wanted))


def victims_for(view: PoolView, model: str) -> list[ModelState] | None:
    """The models that must go before `model` can load (none when it fits); None if it never can."""
    return _needed_victims(view, view.models[model])


def _plan_swap(view: PoolView, target: Waiter, now: float, result: Plan, busy: set[str]) -> None:
    overdue = _overdue(view, target, now)
    wanted = view.models[target.model]
    needed = _needed_victims(view, wanted)
    if needed is None:
        _fail_model(view, wanted, result)
        return
    if all(_evictable_now(m, now, overdue) and m.name not in busy for m in needed):
        result.evict = [m.name for m in needed]
        result.load = wanted.name
        result.reason = "max_wait" if overdue and needed else "demand"
        return
    wake = _earliest([target.since + view.max_wait] + [m.loaded_at + m.min_residency for m in needed])
    result.wake_at = wake if wake is not None and wake > now else None


def _victim_candidates(view: PoolView, wanted: ModelState) -> list[ModelState]:
    """Unpinned resident models, least recently used first."""
    pool = [m for m in view.models.values() if m.status == "resident" and not m.pinned and m is not wanted]
    return sorted(pool, key=lambda m: (m.last_used, m.name))


def _victims_needed(view: PoolView, wanted: ModelState, candidates: list[ModelState]) -> list[ModelState] | None:
    """The fewest LRU-first victims that make room for `wanted`, or None if it can never fit."""
    occupying = [m for m in view.models.values() if m.occupies]
    victims: list[ModelState] = []
    for victim in [None, *candidates]:
        if victim is not None:
            victims.append(victim)
        remaining = [m for m in occupying if m not in victims]
        if _fits(view, remaining, wanted):
            return victims
    return None


def _fits(view: PoolView, resident: list[ModelState], wanted: ModelState) -> bool:
    return fits(view.max_resident, view.vram_budget, [m.size for m in resident], wanted.size)


def fits(max_resident: int, vram_budget: int | None, resident_sizes: Sequence[int], wanted_size: int) -> bool:
    """The pool's budget rule: one more model beside `resident_sizes` within `max_resident` models and,
    when set, `vram_budget` bytes."""
    if len(resident_sizes) + 1 > max_resident:
        return False
    return vram_budget is None or sum(resident_sizes) + wanted_size <= vram_budget


def _evictable_now(model: ModelState, now: float, overdue: bool) -> bool:
    if model.inflight:
        return False
    return overdue or now - model.loaded_at >= model.min_residency


def _fail_model(view: PoolView, wanted: ModelState, result: Plan) -> None:
    if view.vram_budget is not None and wanted.size > view.vram_budget:
        reason = f"model '{wanted.name}' ({wanted.size} bytes) is larger than the pool's vram_budget"
    else:
        reason = f"model '{wanted.name}' cannot be loaded: the pool is full of pinned models"
    result.fail = [(w.id, reason) for w in view.waiters if w.model == wanted.name]


def _plan_idle(view: PoolView, now: float, result: Plan) -> None:
    """With nothing waiting: unload models idle past their keep_alive, or return to the default model."""
    expired, wake = _expired(view, now)
    if expired:
        result.evict, result.reason = [expired.name], "keep_alive"
        return
    default_wake = _plan_idle_default(view, now, result)
    result.wake_at = _earliest([wake, default_wake])


def _expired(view: PoolView, now: float) -> tuple[ModelState | None, float | None]:
    wake: float | None = None
    for m in sorted(view.models.values(), key=lambda m: (m.last_used, m.name)):
        if m.status != "resident" or m.pinned or m.inflight or m.keep_alive is None:
            continue
        due = max(m.last_used, m.loaded_at) + m.keep_alive
        if due <= now:
            return m, None
        wake = _earliest([wake, due])
    return None, wake


def _plan_idle_default(view: PoolView, now: float, result: Plan) -> float | None:
    default = view.models.get(view.idle_default or "")
    if default is None or default.occupies or view.idle_after is None:
        return None
    if any(m.inflight for m in view.models.values()):
        return None
    quiet_since = max((max(m.last_used, m.loaded_at) for m in view.models.values()), default=0.0)
    if now - quiet_since < view.idle_after:
        return quiet_since + view.idle_after
    wanted = Waiter(id=-1, model=default.name, since=now)
    probe = Plan()
    _plan_swap(view, wanted, now, probe, set())
    if probe.swaps:
        result.evict, result.load, result.reason = probe.evict, probe.load, "idle_default"
    return probe.wake_at


def _earliest(times: Sequence[float | None]) -> float | None:
    known = [t for t in times if t is not None]
    return min(known) if known else None
