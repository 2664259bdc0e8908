"""Residency, leases and queues: one `Pool` per backend, acting on the pure `policy.plan`.

Every proxied request holds a `Lease` on its model for as long as its response streams: the one way in.
A lease on a resident model is taken at once, with no coroutine (`try_now`); otherwise the request waits
in its pool's queue (`wait`). After any change (a request arrives, leaves or is cancelled; a swap ends;
a timer fires) the pool re-plans and carries out the plan: grants waiters, fails the unservable, starts
at most one swap. Swaps run as tasks (swaps.py) that unload the victims, then load the target (a load
ends when the model produced a token).

What the pool needs from outside comes in at construction: the backend (which reports models it lost)
and `PoolHooks` (where a swap's weights come from, each use of a model, and warming a model's weights
ahead of its swap: the RAM tier). Its state shows in `repr(pool)`, which the in-memory tests assert on.

Getting the next model ready: when the plan has decided the next model but must wait (its victims drain
their last streams), the pool warms that model's weights meanwhile (`PoolHooks.prepare`). The
`Scheduler` learns each session's phase order (phase_order.py); when a request ends and the session's
next model is likely, that model's pool warms its weights and, with `load_ahead` and a free slot, the
plan loads it (reason "prefetch"). The same expectations tell `min_residency` whether keeping a model
saves a swap back (policy.holds).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from warmpool.backends.base import Backend
from warmpool.config import Config, ModelConfig, Priority
from warmpool.errors import (
    BackendError,
    BackendUnavailable,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
    WarmpoolError,
)
from warmpool.metrics import Metrics
from warmpool.scheduling.phase_order import PhaseOrder, Prediction, Settled
from warmpool.scheduling.policy import ModelState, PoolView, Waiter, held_until, holds, plan, victims_for
from warmpool.scheduling.swaps import SwapRecord, SwapSteps

log = logging.getLogger("warmpool.scheduler")
SWAP_HISTORY = 50
COST_WEIGHT = 0.5  # weight of the newest swap in a model's running swap cost
PREFETCH_RETRY = 30.0  # seconds before a model whose prefetch load failed is prefetched again


class PoolHooks(Protocol):
    """What a pool asks of the rest of warmpool (the RAM tier implements it)."""

    async def swap_source(self, model: str) -> str:
        """Where `model`'s weights would come from now: "ram", "disk" or "unknown"."""
        ...

    def record_use(self, model: str) -> None:
        """A request on `model` ended."""
        ...

    async def prepare(self, model: str) -> int:
        """`model` is expected to be loaded soon: warm its weights into RAM if they are not there.
        Returns the bytes read in."""
        ...


class NoHooks:
    """For a pool without a RAM tier."""

    async def swap_source(self, model: str) -> str:
        return "unknown"

    def record_use(self, model: str) -> None:
        pass

    async def prepare(self, model: str) -> int:
        return 0


class Lease:
    """One request's hold on a model: `lease = pool.lease(model)`, then `try_now()` (granted at once when
    the model is resident, the usual case: no coroutine) or `await wait()` (queued), and `release()` once
    the answer is sent. `async with pool.lease(model) as lease:` does all three. A class rather than an
    asynccontextmanager: every proxied request takes one, and the generator form costs several times more.
    """

    __slots__ = ("held", "model", "on_release", "pool", "priority", "use", "waited")

    def __init__(self, pool: Pool, model: str, priority: Priority = "interactive",
                 on_release: Callable[[], None] | None = None, use: bool = True) -> None:
        self.pool = pool
        self.model = model
        self.priority = priority
        self.on_release = on_release  # told when the request ends (the phase-order learner)
        self.use = use  # whether it counts as a use of the model (its idle clock, the RAM tier's counts)
        self.held = False
        self.waited = 0.0  # seconds spent in the queue

    def __repr__(self) -> str:
        return f"<Lease {self.model} {'held' if self.held else 'not held'}>"

    def try_now(self) -> bool:
        """Take the lease if that needs no wait; False when `wait` is needed."""
        self.held = self.pool._admit_now(self.model, self.priority)
        return self.held

    async def wait(self, *, every: float = 1.0, tick: Callable[[], Awaitable[object]] | None = None) -> float:
        """Queue until the lease is granted; returns the seconds waited. With `tick`, it is awaited every
        `every` seconds while waiting (loading feedback). Whatever ends the wait early (cancellation, the
        queue timeout, a failing tick) leaves the queue, and a grant that came in that same instant is
        handed back, so a request that left never holds a model or causes a load."""
        self.waited = await self.pool._queue_for(self.model, self.priority, every, tick)
        self.held = True
        return self.waited

    def release(self) -> None:
        """Give the lease back (once; later calls do nothing)."""
        if self.held:
            self.held = False
            if self.on_release is not None:
                self.on_release()
            self.pool._release(self.model, self.priority, self.use)

    async def __aenter__(self) -> Lease:
        if not self.try_now():
            await self.wait()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()


class Pool:
    """One backend's residency: its models' states, the queue of waiting requests, the running swap."""

    def __init__(self, backend: Backend, cfg: Config, metrics: Metrics | None = None,
                 hooks: PoolHooks | None = None, clock: Callable[[], float] = time.monotonic,
                 phase_order: PhaseOrder | None = None) -> None:
        self.backend = backend
        self.name = backend.name
        self.cfg = cfg
        self.metrics = metrics
        self.clock = clock
        self.models = {m.name: self._initial_state(m) for m in backend.models.values()}
        self.waiters: dict[int, tuple[Waiter, asyncio.Future[None]]] = {}
        self.draining: set[str] = set()
        self.batch_held: set[str] = set()  # resident models that take no new batch requests now
        self.unload_requested: set[str] = set()
        self.epoch = 0  # bumped on every residency change, so pollers can tell a stale answer
        self.history: list[SwapRecord] = []
        self.swap_task: asyncio.Task[None] | None = None
        self.swap_target: str | None = None
        self.swap_source: str | None = None  # the running swap's source tier, once measured
        self.closed = False
        self._ids = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._change_waits: list[asyncio.Future[None]] = []  # operator unloads waiting for the model to go
        self.hooks: PoolHooks = hooks or NoHooks()
        self.phase_order = phase_order  # expectations of the next requests (shared by the scheduler's pools)
        self.warmed_ahead: set[str] = set()  # models warmed for a swap to come, until that swap starts
        self._warming: set[asyncio.Task[None]] = set()
        self._prefetch_failed: dict[str, float] = {}  # model -> when it may be prefetched again
        self.steps = SwapSteps(self.name, backend, self.models, self.unload_requested, metrics, clock)
        backend.report_losses_to(self.mark_lost)

    def __repr__(self) -> str:
        states = ", ".join(f"{m.name}:{m.status}/{m.inflight}" for m in self.models.values())
        return f"<Pool {self.name} [{states}] waiting={len(self.waiters)} swapping={self.swap_target}>"

    def _initial_state(self, model: ModelConfig) -> ModelState:
        sched = self.cfg.scheduler
        min_res = model.min_residency if model.min_residency is not None else sched.min_residency
        return ModelState(name=model.name, size=self.backend.size_hint(model), pinned=model.pin, min_residency=min_res,
                          keep_alive=model.keep_alive)

    # -- leases -------------------------------------------------------------------------------------

    def lease(self, model: str, priority: Priority = "interactive",
              on_release: Callable[[], None] | None = None, *, use: bool = True) -> Lease:
        """A lease on `model`, not yet taken: see `Lease`. With `use=False` (warmpool re-arming Ollama's
        keep_alive) its release neither restarts the model's idle time nor counts as a use."""
        return Lease(self, model, priority, on_release, use)

    def _admit_now(self, model: str, priority: Priority) -> bool:
        if self.closed:
            raise ShuttingDown()
        if self.available(model) and not (priority == "batch" and model in self.batch_held):
            self._hold(self.models[model], priority)
            return True
        return False

    @staticmethod
    def _hold(state: ModelState, priority: Priority) -> None:
        state.inflight += 1
        if priority == "interactive":
            state.interactive += 1

    def set_keep_alive(self, model: str, seconds: float | None) -> None:
        """A client's keep_alive, as Ollama takes it: the model's idle expiry from now until it is next
        loaded (a load starts from the configured one); None (not sent) leaves it; infinite: no expiry.
        Set while the request holds its lease: the release re-plans."""
        if seconds is not None:
            self.models[model].keep_alive = None if math.isinf(seconds) else seconds

    def idle_expiry(self, model: str) -> float | None:
        """When (on `clock`) warmpool unloads `model` if it stays idle: its keep_alive after its last use;
        None when it stays while in budget (no keep_alive, or pinned)."""
        state = self.models[model]
        if state.pinned or state.keep_alive is None:
            return None
        return max(state.last_used, state.loaded_at) + state.keep_alive

    def available(self, model: str) -> bool:
        """Whether a lease on `model` would be granted without waiting."""
        state = self.models[model]
        return not self.backend.managed or (state.status == "resident" and model not in self.draining)

    def describe_wait(self, model: str) -> str:
        """What a request for `model` is waiting for, in words (for loading feedback)."""
        if self.swap_target == model:
            source = f" (from {'RAM' if self.swap_source == 'ram' else self.swap_source})" if self.swap_source else ""
            return f"loading {model}{source}"
        if self.swap_task is not None:
            return f"waiting for a swap to {self.swap_target or 'free room'} before loading {model}"
        return self._blocked_by(model) or f"queued for {model}"

    def _blocked_by(self, model: str) -> str | None:
        """Why no swap to `model` starts yet: a victim still serving requests, or one its min_residency
        keeps because a request for it is expected (until then, or until the oldest waiter's max_wait,
        whichever comes first)."""
        now, view = self.clock(), self.view()
        victims = victims_for(view, model) or []
        busy = [v for v in victims if v.inflight]
        if busy:
            v = busy[0]
            return f"waiting for {v.name}'s {v.inflight} running request{'s' if v.inflight > 1 else ''} to finish"
        queued = {w.model for w in view.waiters}
        held = [v for v in victims if holds(v, now, v.name in queued)]
        if not held:
            return None
        v = max(held, key=lambda m: held_until(m, m.name in queued))
        oldest = min((w.since for w in view.waiters), default=now)
        left = min(held_until(v, v.name in queued), oldest + view.max_wait) - now
        return f"waiting for {v.name}'s min_residency (a request for it is expected), {max(0.0, left):.0f} s left"

    def _release(self, model: str, priority: Priority, use: bool = True) -> None:
        state = self.models[model]
        state.inflight -= 1
        now = self.clock()
        if use:
            state.last_used = now
            self.hooks.record_use(model)
        if priority == "interactive":
            state.interactive -= 1
            state.interactive_at = now
        # While the model stays busy and nobody waits, a new plan would decide what the last one did.
        if self.backend.managed and (state.inflight == 0 or self.waiters or self.unload_requested):
            self.replan()
        if state.inflight == 0:
            self._tell_if_idle()

    def _tell_if_idle(self) -> None:
        if not self.closed and not any(m.inflight for m in self.models.values()):
            self.backend.idle()

    async def _queue_for(self, model: str, priority: Priority, every: float,
                         tick: Callable[[], Awaitable[object]] | None) -> float:
        if len(self.waiters) >= self.cfg.scheduler.max_queue:
            raise QueueFull(f"pool {self.name!r}: {len(self.waiters)} requests already waiting",
                            retry_after=self._retry_after())
        started = self.clock()
        waiter = Waiter(next(self._ids), model, started, priority)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters[waiter.id] = (waiter, future)
        self.replan()
        try:
            async with asyncio.timeout(self.cfg.scheduler.queue_timeout):
                await _granted(future, every, tick)
        except TimeoutError:
            self._return_if_granted(model, priority, future)
            raise QueueTimeout(f"pool {self.name!r}: model {model!r} was not ready within "
                               f"{self.cfg.scheduler.queue_timeout:g} s") from None
        except BaseException:
            self._return_if_granted(model, priority, future)
            raise
        finally:
            if self.waiters.pop(waiter.id, None) is not None:
                self.replan()  # left the queue (cancelled or timed out): it must cause no load
        return self.clock() - started

    def _return_if_granted(self, model: str, priority: Priority, future: asyncio.Future[None]) -> None:
        # Granted in the same instant the client gave up: hand the lease back.
        if future.done() and not future.cancelled() and future.exception() is None:
            self._release(model, priority)

    def _retry_after(self) -> float:
        recent = [r.seconds for r in self.history[-5:] if r.ok]
        return max(1.0, sum(recent) / len(recent)) if recent else 5.0

    # -- planning -----------------------------------------------------------------------------------

    def view(self) -> PoolView:
        sched = self.cfg.scheduler
        return PoolView(
            models=self.models, waiters=[w for w, _ in self.waiters.values()],
            swapping=self.swap_task is not None, max_resident=self.backend.config.max_resident,
            vram_budget=self.backend.config.vram_budget, max_wait=sched.max_wait,
            idle_default=self.backend.config.idle_default, idle_after=self.backend.config.idle_after,
            unload_requested=self.unload_requested, interactive_max_wait=sched.interactive_max_wait,
            load_ahead=sched.load_ahead, predicted=self._expectations(),
        )

    def _expectations(self) -> tuple[str, ...]:
        """Set each model's `expected_at` from the open predictions; returns the predicted models that may
        be loaded ahead, soonest first."""
        expected = self.phase_order.expected() if self.phase_order is not None else {}
        for state in self.models.values():
            state.expected_at = expected.get(state.name)
        if not expected:
            return ()
        now = self.clock()
        ours = [m for m in expected if m in self.models and self._prefetch_failed.get(m, 0.0) <= now]
        return tuple(sorted(ours, key=expected.__getitem__))

    def replan(self) -> None:
        if self._change_waits:
            self._wake_change_waits()  # every change ends in a replan
        if self.closed:
            return
        for state in self.models.values():
            if not state.size:  # a size may become known after start (e.g. Ollama's /api/tags)
                state.size = self.backend.size_hint(self.backend.models[state.name])
        decision = plan(self.view(), self.clock())
        self.draining, self.batch_held = decision.draining, decision.batch_held
        for waiter_id in decision.grant:
            self._grant(waiter_id)
        for waiter_id, reason in decision.fail:
            self._fail(waiter_id, BackendUnavailable(self.name, reason))
        if decision.swaps:
            self._start_swap(decision.evict, decision.load, decision.reason)
        elif decision.prepare is not None:
            self._warm_ahead(decision.prepare)  # its victims still drain: read its weights meanwhile
        self._arm_timer(decision.wake_at)

    # -- getting the next model ready ---------------------------------------------------------------

    def expect(self, prediction: Prediction) -> None:
        """A session is expected to ask for `prediction.model` next: warm its weights, and plan again (a
        free slot may take it now)."""
        if not self.backend.managed or self.models[prediction.model].occupies:
            return
        self._warm_ahead(prediction.model, prediction)
        self.replan()

    def _warm_ahead(self, model: str, prediction: Prediction | None = None) -> None:
        if model in self.warmed_ahead or self.closed:
            return
        self.warmed_ahead.add(model)
        task = asyncio.get_running_loop().create_task(self._warm(model, prediction), name=f"warm:{model}")
        self._warming.add(task)
        task.add_done_callback(self._warming.discard)

    async def _warm(self, model: str, prediction: Prediction | None) -> None:
        try:
            warmed = await self.hooks.prepare(model)
        except Exception:  # warming ahead is an optimisation: it must never fail a request
            log.exception("warming %s ahead of its swap failed", model)
            return
        if prediction is not None:
            prediction.warmed_bytes += warmed
        if warmed and self.metrics:
            self.metrics.prefetch_warmed.labels(model).inc(warmed)
        if warmed:
            log.info("warmed %s ahead of its swap: %d bytes read into RAM", model, warmed)

    def _grant(self, waiter_id: int) -> None:
        waiter, future = self.waiters.pop(waiter_id)
        if not future.done():
            self._hold(self.models[waiter.model], waiter.priority)
            future.set_result(None)

    def _fail(self, waiter_id: int, error: WarmpoolError) -> None:
        _, future = self.waiters.pop(waiter_id)
        if not future.done():
            future.set_exception(error)

    def _arm_timer(self, wake_at: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if wake_at is not None:
            delay = max(0.0, wake_at - self.clock()) + 0.001
            self._timer = asyncio.get_running_loop().call_later(delay, self.replan)

    # -- swaps --------------------------------------------------------------------------------------

    def _start_swap(self, evict: list[str], load: str | None, reason: str) -> None:
        self.epoch += 1
        for name in evict:
            self.models[name].status = "unloading"
        if load is not None:
            self.models[load].status = "loading"
            self.warmed_ahead.discard(load)
        self.swap_target = load
        self.swap_task = asyncio.create_task(self._swap(evict, load, reason), name=f"swap:{self.name}")

    async def _swap(self, evict: list[str], load: str | None, reason: str) -> None:
        started, wall = self.clock(), time.time()
        source = await self._probe_source(load) if load else "unknown"
        self.swap_source = source
        record = SwapRecord(load, list(evict), reason, wall, 0.0, None, source, ok=True)
        try:
            for name in evict:
                await self.steps.unload(name, reason)
            if load is not None:
                record.load_seconds = await self.steps.load(load, reason, source)
        except Exception as exc:  # noqa: BLE001 - every failure is reported to the waiters, never lost
            record.ok, record.error = False, str(exc)
            self._swap_failed(load, exc, reason)
        finally:
            record.seconds = self.clock() - started
            self._finish_swap(record)

    async def _probe_source(self, name: str) -> str:
        try:
            return await self.hooks.swap_source(name)
        except Exception:  # a failed measurement must not fail the swap
            log.exception("measuring the source tier of %s failed", name)
            return "unknown"

    def _swap_failed(self, load: str | None, exc: Exception, reason: str) -> None:
        error = exc if isinstance(exc, WarmpoolError) else BackendError(self.name, f"swap failed: {exc}")
        log.warning("swap on %s to %s failed: %s", self.name, load, error.message)
        if load is None:
            return
        if reason == "prefetch":
            self._prefetch_failed[load] = self.clock() + PREFETCH_RETRY
        self.steps.load_failed(load, reason)
        for waiter_id, (waiter, _) in list(self.waiters.items()):
            if waiter.model == load:
                self._fail(waiter_id, error)

    def _finish_swap(self, record: SwapRecord) -> None:
        if record.ok and record.model is not None:  # what a swap back to it would cost, for min_residency
            state = self.models[record.model]
            cost = state.reload_cost
            state.reload_cost = record.seconds if not cost else cost + COST_WEIGHT * (record.seconds - cost)
        self.epoch += 1
        self.history = [*self.history[-(SWAP_HISTORY - 1):], record]
        self.steps.finished(record)
        self.swap_task, self.swap_target, self.swap_source = None, None, None
        self.replan()  # grants the waiters
        self._tell_if_idle()

    # -- operator actions ---------------------------------------------------------------------------

    async def load(self, model: str) -> float:
        """Make `model` resident (through the queue, like any request); returns the seconds it took."""
        started = self.clock()
        async with self.lease(model):
            return self.clock() - started

    async def unload(self, model: str, timeout: float) -> bool:
        """Unload `model` once its running requests end (new ones wait); False if it was not loaded."""
        state = self.models[model]
        if state.status == "absent" and model != self.swap_target:
            return False
        self.unload_requested.add(model)
        self.replan()
        async with asyncio.timeout(timeout):
            while state.status != "absent" or model in self.unload_requested:
                changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._change_waits.append(changed)
                await changed
        return True

    def _wake_change_waits(self) -> None:
        waits, self._change_waits = self._change_waits, []
        for changed in waits:
            if not changed.done():
                changed.set_result(None)

    # -- outside events -----------------------------------------------------------------------------

    def mark_resident(self, name: str, loaded_at: float | None = None) -> None:
        """The backend reports `name` loaded (at start-up, or loaded by someone else)."""
        state = self.models[name]
        if state.status == "absent":
            state.status, state.loaded_at = "resident", loaded_at or self.clock()
            self.epoch += 1
            self.replan()

    def mark_lost(self, name: str, reason: str) -> None:
        """`name` left the backend without warmpool unloading it (expiry, crash, another client)."""
        state = self.models.get(name)
        if state is None or state.status != "resident":
            return
        log.warning("model %s vanished from %s: %s", name, self.name, reason)
        state.status = "absent"
        self.epoch += 1
        self.unload_requested.discard(name)
        if self.metrics:
            self.metrics.lost.labels(self.name, name).inc()
        self.replan()

    async def close(self) -> None:
        """Stop admitting: waiters get 503; a running swap and any warming ahead are cancelled."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._warming):
            task.cancel()
        for waiter_id in list(self.waiters):
            self._fail(waiter_id, ShuttingDown())
        if self.swap_task is not None:
            self.swap_task.cancel()
            with contextlib.suppress(BaseException):
                await self.swap_task

    def queue_counts(self) -> dict[str, int]:
        """Waiting requests by model."""
        counts: dict[str, int] = {}
        for waiter, _ in self.waiters.values():
            counts[waiter.model] = counts.get(waiter.model, 0) + 1
        return counts

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready picture of the pool for the status API and the tests."""
        return {
            "pool": self.name, "kind": self.backend.config.kind, "managed": self.backend.managed,
            "max_resident": self.backend.config.max_resident, "vram_budget": self.backend.config.vram_budget,
            "resident": [m.name for m in self.models.values() if m.status == "resident"],
            "loading": [m.name for m in self.models.values() if m.status == "loading"],
            "unloading": [m.name for m in self.models.values() if m.status == "unloading"],
            "draining": sorted(self.draining),
            "models": {m.name: _model_snapshot(m) for m in self.models.values()},
            "queue": self.queue_counts(),
            "swaps": [_swap_snapshot(r) for r in reversed(self.history)],
        }


async def _granted(future: asyncio.Future[None], every: float, tick: Callable[[], Awaitable[object]] | None) -> None:
    """Until `future` is resolved (raising its error), awaiting `tick` every `every` seconds meanwhile."""
    if tick is None:
        return await future
    while not (await asyncio.wait({future}, timeout=every))[0]:
        await tick()
    return future.result()


def _model_snapshot(m: ModelState) -> dict[str, Any]:
    return {"status": m.status, "inflight": m.inflight, "pinned": m.pinned, "size": m.size}


def _swap_snapshot(r: SwapRecord) -> dict[str, Any]:
    return {
        "model": r.model, "evicted": r.evicted, "reason": r.reason, "source": r.source, "ok": r.ok,
        "error": r.error, "started_at": r.started, "seconds": round(r.seconds, 4),
        "load_seconds": None if r.load_seconds is None else round(r.load_seconds, 4),
    }


@dataclass(slots=True)
class PrefetchCounts:
    """The phase-order learner's tallies, for the status API (Prometheus has them by model)."""

    predictions: int = 0
    hits: int = 0
    misses: int = 0
    wasted_bytes: int = 0  # warmed for a prediction that missed


class Scheduler:
    """All pools, by backend name; the proxy asks it for leases by model. It also learns each client
    session's phase order (`scheduler.prefetch`) and tells the pool of a likely next model."""

    def __init__(self, backends: dict[str, Backend], cfg: Config, metrics: Metrics | None = None,
                 hooks: PoolHooks | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.clock = clock
        sched = cfg.scheduler
        self.phase_order = PhaseOrder(sched.prefetch_threshold) if sched.prefetch else None
        self.counts = PrefetchCounts()
        self.pools = {name: Pool(b, cfg, metrics, hooks, clock, self.phase_order) for name, b in backends.items()}

    def pool_of(self, model: str) -> Pool:
        return self.pools[self.cfg.models[model].backend]

    def lease(self, model: str, priority: Priority = "interactive", session: str | None = None,
              step: str | None = None) -> Lease:
        """A lease on `model` for a request of `priority`; with a `session` (and the request's `step`: its
        phase, else the model), the request also teaches the phase-order learner."""
        pool = self.pool_of(model)
        if self.phase_order is None or session is None:
            return pool.lease(model, priority)
        settled = self.phase_order.arrived(session, step or model, model, self.clock())
        if settled is not None:
            self._settle(settled)
        return pool.lease(model, priority, on_release=lambda: self._finished(session))

    def _finished(self, session: str) -> None:
        assert self.phase_order is not None
        now = self.clock()
        for stale in self.phase_order.expire(now):
            self._settle(Settled(stale, hit=False))
        prediction = self.phase_order.finished(session, now)
        if prediction is None:
            return
        self.counts.predictions += 1
        if self.metrics:
            self.metrics.predictions.labels(prediction.model).inc()
        self.pool_of(prediction.model).expect(prediction)

    def _settle(self, settled: Settled) -> None:
        model = settled.prediction.model
        if settled.hit:
            self.counts.hits += 1
            if self.metrics:
                self.metrics.prediction_hits.labels(model).inc()
            return
        self.counts.misses += 1
        self.counts.wasted_bytes += settled.prediction.warmed_bytes
        if self.metrics and settled.prediction.warmed_bytes:
            self.metrics.prefetch_wasted.labels(model).inc(settled.prediction.warmed_bytes)

    async def close(self) -> None:
        for pool in self.pools.values():
            await pool.close()

    def snapshot(self) -> dict[str, Any]:
        prefetch = {"enabled": self.phase_order is not None, **asdict(self.counts)}
        return {"pools": [p.snapshot() for p in self.pools.values()], "prefetch": prefetch}
