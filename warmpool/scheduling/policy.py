"""The pure scheduling decision for one pool: who is served now, what is evicted, what is loaded next.

`plan(view, now)` takes a snapshot of the pool and returns a `Plan`; it does no I/O and keeps no state,
so every rule below is tested alone (tests/test_policy.py):

- a request for a resident model that nothing is draining is served at once (requests for the resident
  model are served before a swap away from it: A A B B, not A B A B);
- one swap at a time; requests for a model that is loading wait for that load;
- the next model to load is the one the oldest waiting interactive request wants, else the one the
  oldest batch request wants (FIFO within a class, so nothing of a class starves);
- the victims are the fewest unpinned resident models, least recently used first, that make room; a
  model in use (running or queued requests) counts as the most recently used, so with `load_ahead` the
  next model is loaded beside one still draining its last streams when an idle one makes room (make
  before break); pinned models are never evicted, busy ones never cut: they are drained first;
- `min_residency` is no fixed toll: within it a model is kept only while keeping it saves work
  (`holds`): requests for it are queued, or one is expected (learned phase order) sooner than a swap
  back to it would cost;
- while an interactive request waits for a swap, batch requests are not served on the models it needs
  gone; once it has waited `interactive_max_wait`, the victims stop taking new requests and go as soon
  as their running ones end, unless interactive requests use them (then `max_wait` applies);
- a batch request never causes a swap away from a model in interactive use: interactive requests run
  on it or wait for it, or one ended on it less than `interactive_max_wait` ago (an agent between two
  requests still uses its model);
- once the target has waited `max_wait`, fairness wins over batching and minimum residency: the
  victims stop taking new requests and are evicted as soon as their running requests end;
- an idle model past its `keep_alive` is unloaded; an idle pool goes back to its default model;
- with `load_ahead`, a model predicted next (`predicted`) is loaded where it fits without evicting
  anything (reason "prefetch"), and only while no request runs in the pool;
- a model an operator asked to unload takes no new requests and goes as soon as it is idle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from warmpool.config import Priority

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
    interactive: int = 0  # of `inflight`, the interactive requests
    interactive_at: float = float("-inf")  # when an interactive request last ended on it
    expected_at: float | None = None  # when a request for it is next expected (learned phase order)
    reload_cost: float = 0.0  # seconds a swap back to it would cost (measured; 0 = not known)

    @property
    def occupies(self) -> bool:
        return self.status in ("loading", "resident", "unloading")


@dataclass(frozen=True, slots=True)
class Waiter:
    id: int
    model: str
    since: float
    priority: Priority = "interactive"


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
    interactive_max_wait: float = 5.0  # an interactive waiter's own, shorter max wait (batch victims)
    load_ahead: bool = True  # load the next model beside the current one where the budget has room
    predicted: tuple[str, ...] = ()  # models a session is expected to ask for next, soonest first


@dataclass(slots=True)
class Plan:
    grant: list[int] = field(default_factory=list)  # waiter ids to serve now
    evict: list[str] = field(default_factory=list)  # idle models to unload first, in order
    load: str | None = None  # model to load after the evictions
    reason: str = ""  # why this swap: demand | max_wait | keep_alive | idle_default | admin | prefetch
    draining: set[str] = field(default_factory=set)  # resident models that take no new requests
    batch_held: set[str] = field(default_factory=set)  # resident models that take no new batch requests
    prepare: str | None = None  # the next model, decided but waiting for room: warm its files meanwhile
    fail: list[tuple[int, str]] = field(default_factory=list)  # waiters that can never be served
    wake_at: float | None = None  # when to plan again even if nothing happens

    @property
    def swaps(self) -> bool:
        return bool(self.evict) or self.load is not None


def plan(view: PoolView, now: float) -> Plan:
    """Decide what the pool does next. See the module docstring for the rules."""
    result = Plan(draining={m for m in view.unload_requested if view.models[m].status == "resident"})
    target = None if view.swapping else _next_target(view)
    if target is not None:
        victims = _needed_victims(view, view.models[target.model]) or []
        if target.priority == "interactive":
            result.batch_held = {m.name for m in victims}
        if _overdue(view, target, victims, now):
            result.draining |= {m.name for m in victims}
    granted = [w for w in view.waiters if _servable(view.models[w.model], result.draining)
               and not (w.priority == "batch" and w.model in result.batch_held)]
    result.grant = [w.id for w in granted]
    # A model whose waiters are served now is busy, even though their requests have not started yet.
    busy = {w.model for w in granted}
    if not view.swapping and not _plan_requested_unload(view, result) and target is not None:
        _plan_swap(view, target, now, result, busy)
        if not result.swaps and not result.fail:
            result.prepare = target.model
    if not view.swapping and not result.swaps and not view.waiters:
        _plan_idle(view, now, result)
    if not view.swapping and not result.swaps and target is None and view.load_ahead and not _running(view):
        _plan_load_ahead(view, result)
    return result


def holds(model: ModelState, now: float, queued: bool) -> bool:
    """Whether `min_residency` keeps `model` from being evicted now. Only within its min_residency, and
    only while keeping it saves work: requests for it are queued (`queued`), or one is expected sooner
    than a swap back to it would cost. A model nobody is expected to use soon is never held: a fixed
    hold while other phases queue made a measured workload 3x slower."""
    if now - model.loaded_at >= model.min_residency:
        return False
    if queued:
        return True
    expected = model.expected_at
    return expected is not None and now <= expected <= now + model.reload_cost


def held_until(model: ModelState, queued: bool) -> float:
    """When a hold by `holds` ends at the latest, if nothing changes meanwhile."""
    end = model.loaded_at + model.min_residency
    if queued or model.expected_at is None:
        return end
    return min(end, model.expected_at)


def _plan_requested_unload(view: PoolView, result: Plan) -> bool:
    for name in sorted(result.draining & view.unload_requested):
        if not view.models[name].inflight:
            result.evict, result.reason = [name], "admin"
            return True
    return False


def _servable(model: ModelState, draining: set[str]) -> bool:
    return model.status == "resident" and model.name not in draining


def _next_target(view: PoolView) -> Waiter | None:
    """The oldest interactive waiter whose model is not loaded and not on its way in; else the oldest
    such batch waiter."""
    first_batch = None
    for waiter in view.waiters:
        if view.models[waiter.model].occupies:
            continue
        if waiter.priority == "interactive":
            return waiter
        first_batch = first_batch or waiter
    return first_batch


def in_interactive_use(view: PoolView, model: ModelState, now: float) -> bool:
    """Interactive requests run on `model` or wait for it, or one ended on it less than
    `interactive_max_wait` ago."""
    return (model.interactive > 0 or now - model.interactive_at < view.interactive_max_wait
            or any(w.model == model.name and w.priority == "interactive" for w in view.waiters))


def _drain_after(view: PoolView, target: Waiter, victims: list[ModelState], now: float) -> float | None:
    """Seconds the target may wait before its victims are drained; None: never (a batch request never
    drains a model in interactive use)."""
    interactive_victims = any(in_interactive_use(view, m, now) for m in victims)
    if target.priority == "batch":
        return None if interactive_victims else view.max_wait
    return view.max_wait if interactive_victims else min(view.interactive_max_wait, view.max_wait)


def _overdue(view: PoolView, target: Waiter, victims: list[ModelState], now: float) -> bool:
    limit = _drain_after(view, target, victims, now)
    return limit is not None and now - target.since >= limit


def _batch_blocked(view: PoolView, target: Waiter, victims: list[ModelState], now: float) -> float | None:
    """For a batch target whose victims are in interactive use: when to look again (inf: once their
    running requests end); None when nothing blocks it."""
    if target.priority != "batch":
        return None
    blocked = [m for m in victims if in_interactive_use(view, m, now)]
    if not blocked:
        return None
    if any(m.interactive > 0 for m in blocked):
        return float("inf")
    return max(m.interactive_at + view.interactive_max_wait for m in blocked)


def _needed_victims(view: PoolView, wanted: ModelState) -> list[ModelState] | None:
    return _victims_needed(view, wanted, _victim_candidates(view, wanted))


def victims_for(view: PoolView, model: str) -> list[ModelState] | None:
    """The models that must go before `model` can load (none when it fits); None if it never can."""
    return _needed_victims(view, view.models[model])


def _plan_swap(view: PoolView, target: Waiter, now: float, result: Plan, busy: set[str]) -> None:
    wanted = view.models[target.model]
    needed = _needed_victims(view, wanted)
    if needed is None:
        _fail_model(view, wanted, result)
        return
    blocked_until = _batch_blocked(view, target, needed, now)
    if blocked_until is not None:  # a batch request never swaps away from a model in interactive use
        result.wake_at = blocked_until if blocked_until != float("inf") else None
        return
    overdue = _overdue(view, target, needed, now)
    # Requests that would be served on a victim hold it within its min_residency; batch ones held back
    # for an interactive target do not.
    queued = {w.model for w in view.waiters if not (w.priority == "batch" and w.model in result.batch_held)}
    if all(_evictable_now(m, now, overdue, m.name in queued) and m.name not in busy for m in needed):
        result.evict = [m.name for m in needed]
        result.load = wanted.name
        waited_out = overdue and not all(_evictable_now(m, now, False, m.name in queued) for m in needed)
        result.reason = "max_wait" if waited_out else "demand"
        return
    limit = _drain_after(view, target, needed, now)
    wakes = [None if limit is None else target.since + limit]
    wakes += [held_until(m, m.name in queued) for m in needed if not m.inflight and m.name not in busy]
    wake = _earliest(wakes)
    result.wake_at = wake if wake is not None and wake > now else None


def _victim_candidates(view: PoolView, wanted: ModelState) -> list[ModelState]:
    """Unpinned resident models, least recently used first; with `load_ahead`, models in use (running or
    queued requests) last: they are the most recently used, and an idle victim lets the next model load
    while they drain."""
    pool = [m for m in view.models.values() if m.status == "resident" and not m.pinned and m is not wanted]
    if not view.load_ahead:
        return sorted(pool, key=lambda m: (m.last_used, m.name))
    queued = {w.model for w in view.waiters}
    return sorted(pool, key=lambda m: (m.inflight > 0 or m.name in queued, m.last_used, m.name))


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


def _evictable_now(model: ModelState, now: float, overdue: bool, queued: bool) -> bool:
    if model.inflight:
        return False
    return overdue or not holds(model, now, queued)


def _fail_model(view: PoolView, wanted: ModelState, result: Plan) -> None:
    if view.vram_budget is not None and wanted.size > view.vram_budget:
        reason = f"model '{wanted.name}' ({wanted.size} bytes) is larger than the pool's vram_budget"
    else:
        reason = f"model '{wanted.name}' cannot be loaded: the pool is full of pinned models"
    result.fail = [(w.id, reason) for w in view.waiters if w.model == wanted.name]


def _running(view: PoolView) -> bool:
    """Whether a request runs on any model of the pool. A predicted model is loaded only when none does:
    a load beside a running answer competes with it for the processor (CPU inference) or the memory bus
    (loaded that way, prefetch made the agent workload 6-8% slower in wall time, medians of two runs of
    benchmarks/phases.py --max-resident 2 on two cores); in a gap between requests it competes with nothing."""
    return any(m.inflight for m in view.models.values())


def _plan_load_ahead(view: PoolView, result: Plan) -> None:
    """Load the soonest predicted model that fits beside the others without evicting anything."""
    occupying = [m for m in view.models.values() if m.occupies]
    for name in view.predicted:
        model = view.models.get(name)
        if model is not None and not model.occupies and _fits(view, occupying, model):
            result.load, result.reason = name, "prefetch"
            return


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
