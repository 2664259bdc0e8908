"""The pool's effects in memory: leases, the queue, swaps and hooks against a fake backend whose loads and
unloads the test completes by hand, with the pool's state asserted through `repr(pool)` (as httpcore's
connection pool tests do). No sockets, no processes: every interleaving is chosen by the test.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from warmpool.backends.base import Backend, LoadResult, ResidentModel
from warmpool.config import Config, ModelConfig, config_from_mapping
from warmpool.errors import BackendError, QueueTimeout, ShuttingDown
from warmpool.scheduling.phase_order import PhaseOrder, Prediction
from warmpool.scheduling.pool import Lease, Pool, Scheduler

pytestmark = pytest.mark.timeout(20)


class FakeBackend(Backend):
    """Loads and unloads wait until the test resolves them: `backend.finish("load", "a")`. It keeps what it
    holds at each instant, as a real server would see it: a model from the moment its load starts until
    its unload has finished, and the most bytes and models it ever held at once."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg.backends["gpu"], cfg)
        self.calls: list[tuple[str, str]] = []
        self.pending: dict[tuple[str, str], asyncio.Future[None]] = {}
        self.idled = 0
        self.holding: set[str] = set()
        self.most_models = 0
        self.most_bytes = 0

    def _holds(self, name: str, held: bool) -> None:
        if held:
            self.holding.add(name)
        else:
            self.holding.discard(name)
        self.most_models = max(self.most_models, len(self.holding))
        self.most_bytes = max(self.most_bytes, sum(self.models[m].size or 0 for m in self.holding))

    async def _step(self, kind: str, model: ModelConfig) -> None:
        self.calls.append((kind, model.name))
        future = self.pending.setdefault((kind, model.name), asyncio.get_running_loop().create_future())
        try:
            await future
        finally:
            self.pending.pop((kind, model.name), None)

    async def load(self, model: ModelConfig) -> LoadResult:
        self._holds(model.name, True)
        try:
            await self._step("load", model)
        except BaseException:
            self._holds(model.name, False)
            raise
        return LoadResult(0.0)

    async def unload(self, model: ModelConfig) -> None:
        await self._step("unload", model)
        self._holds(model.name, False)

    async def resident(self) -> list[ResidentModel]:
        return []

    async def health(self) -> bool:
        return True

    def idle(self) -> None:
        self.idled += 1

    async def finish(self, kind: str, name: str, error: Exception | None = None, *, settle: bool = True) -> None:
        """Complete the pending `kind` call for `name` (waiting until the pool has made it); with `settle`,
        let the swap task and the waiters it grants run too."""
        while (kind, name) not in self.pending:  # noqa: ASYNC110 - one loop iteration at a time, on purpose
            await asyncio.sleep(0)
        future = self.pending[(kind, name)]
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
        if settle:
            await settle_loop()


class Hooks:
    def __init__(self) -> None:
        self.used: list[str] = []
        self.prepared: list[str] = []

    async def swap_source(self, model: str) -> str:
        return "ram"

    def record_use(self, model: str) -> None:
        self.used.append(model)

    async def prepare(self, model: str) -> int:
        self.prepared.append(model)
        return 1000


def config(max_resident: int = 1, sizes: dict[str, str] | None = None, vram_budget: str | None = None,
           **scheduler: Any) -> Config:
    budget = {"vram_budget": vram_budget} if vram_budget else {}
    return config_from_mapping({
        "backends": {"gpu": {"kind": "ollama", "url": "http://127.0.0.1:9", "max_resident": max_resident,
                             **budget}},
        "models": {name: {"backend": "gpu", **({"size": sizes[name]} if sizes else {})} for name in ("a", "b", "c")},
        "scheduler": {"queue_timeout": "5s", **scheduler},
        "ram_tier": {"enabled": False},
    }, env={})


@pytest.fixture
async def made() -> AsyncIterator[tuple[Pool, FakeBackend, Hooks]]:
    cfg = config()
    backend, hooks = FakeBackend(cfg), Hooks()
    pool = Pool(backend, cfg, hooks=hooks)
    yield pool, backend, hooks
    await pool.close()


async def settle_loop() -> None:
    for _ in range(5):  # the swap task, then the waiters it granted
        await asyncio.sleep(0)





def preloaded(pool: Pool, backend: FakeBackend, name: str) -> None:
    """`name` loaded before the pool started (as the residency sync reports it)."""
    backend._holds(name, True)
    pool.mark_resident(name)


async def taken(lease: Lease) -> Lease:
    if not lease.try_now():
        await lease.wait()
    return lease


async def test_a_request_for_an_absent_model_queues_and_causes_one_load(made: tuple[Pool, FakeBackend, Hooks]) -> None:
    pool, backend, _ = made
    assert repr(pool) == "<Pool gpu [a:absent/0, b:absent/0, c:absent/0] waiting=0 swapping=None>"
    lease = pool.lease("a")
    assert not lease.try_now() and not lease.held
    waiting = asyncio.create_task(lease.wait())
    await settle_loop()
    assert repr(pool) == "<Pool gpu [a:loading/0, b:absent/0, c:absent/0] waiting=1 swapping=a>"
    second = asyncio.create_task(taken(pool.lease("a")))  # joins the load, causes no second one
    await settle_loop()
    assert "waiting=2" in repr(pool)
    await backend.finish("load", "a")
    await asyncio.gather(waiting, second)
    assert repr(pool) == "<Pool gpu [a:resident/2, b:absent/0, c:absent/0] waiting=0 swapping=None>"
    assert backend.calls == [("load", "a")]
    assert pool.history[-1].source == "ram" and pool.history[-1].ok


async def test_a_lease_on_a_resident_model_is_taken_at_once_and_released_once(
        made: tuple[Pool, FakeBackend, Hooks]) -> None:
    pool, _, hooks = made
    pool.mark_resident("a")
    lease = pool.lease("a")
    assert lease.try_now() and repr(lease) == "<Lease a held>"
    assert repr(pool) == "<Pool gpu [a:resident/1, b:absent/0, c:absent/0] waiting=0 swapping=None>"
    lease.release()
    lease.release()  # a second release does nothing
    assert repr(pool) == "<Pool gpu [a:resident/0, b:absent/0, c:absent/0] waiting=0 swapping=None>"
    assert hooks.used == ["a"]


async def test_a_busy_model_is_drained_never_cut_and_its_queue_served_first(
        made: tuple[Pool, FakeBackend, Hooks]) -> None:
    pool, backend, _ = made
    pool.mark_resident("a")
    running = await taken(pool.lease("a"))
    wants_b = asyncio.create_task(taken(pool.lease("b")))
    await settle_loop()
    assert repr(pool) == "<Pool gpu [a:resident/1, b:absent/0, c:absent/0] waiting=1 swapping=None>"
    more_a = await taken(pool.lease("a"))  # batching: a second request for the resident model is served
    running.release()
    await settle_loop()
    assert backend.calls == []  # `a` still streams: nothing is unloaded under it
    more_a.release()
    await backend.finish("unload", "a")
    assert repr(pool) == "<Pool gpu [a:absent/0, b:loading/0, c:absent/0] waiting=1 swapping=b>"
    await backend.finish("load", "b")
    (await wants_b).release()
    assert backend.calls == [("unload", "a"), ("load", "b")]


async def test_a_request_that_leaves_the_queue_causes_no_load(made: tuple[Pool, FakeBackend, Hooks]) -> None:
    pool, backend, _ = made
    pool.mark_resident("a")
    running = await taken(pool.lease("a"))
    waiting = asyncio.create_task(taken(pool.lease("b")))
    await settle_loop()
    waiting.cancel()
    await settle_loop()
    running.release()
    await settle_loop()
    assert repr(pool) == "<Pool gpu [a:resident/0, b:absent/0, c:absent/0] waiting=0 swapping=None>"
    assert backend.calls == []


async def test_a_grant_that_races_with_the_clients_departure_is_handed_back(
        made: tuple[Pool, FakeBackend, Hooks]) -> None:
    pool, backend, _ = made
    lease = pool.lease("a")
    waiting = asyncio.create_task(lease.wait())
    await settle_loop()
    await backend.finish("load", "a", settle=False)
    while pool.models["a"].inflight == 0:  # noqa: ASYNC110 - the swap ends and grants the lease ...
        await asyncio.sleep(0)
    waiting.cancel()  # ... and the client leaves before its waiter ran
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not lease.held
    assert repr(pool) == "<Pool gpu [a:resident/0, b:absent/0, c:absent/0] waiting=0 swapping=None>"


async def test_the_tick_runs_while_waiting_and_a_failing_tick_leaves_the_queue(
        made: tuple[Pool, FakeBackend, Hooks]) -> None:
    pool, backend, _ = made
    ticks: list[str] = []

    async def tick() -> None:
        ticks.append(pool.describe_wait("a"))
        if len(ticks) == 3:
            raise ConnectionResetError("the client left")

    with pytest.raises(ConnectionResetError):
        await pool.lease("a").wait(every=0.01, tick=tick)
    assert ticks == ["loading a (from RAM)"] * 3
    assert "waiting=0" in repr(pool)
    await backend.finish("load", "a")  # the load that had started still ends; nobody holds the model
    assert repr(pool) == "<Pool gpu [a:resident/0, b:absent/0, c:absent/0] waiting=0 swapping=None>"


async def test_a_failed_load_fails_its_waiters_and_leaves_the_model_absent(
        made: tuple[Pool, FakeBackend, Hooks]) -> None:
    pool, backend, _ = made
    waiting = asyncio.create_task(taken(pool.lease("a")))
    await settle_loop()
    await backend.finish("load", "a", BackendError("gpu", "out of memory"))
    with pytest.raises(BackendError, match="out of memory"):
        await waiting
    assert repr(pool) == "<Pool gpu [a:absent/0, b:absent/0, c:absent/0] waiting=0 swapping=None>"
    assert not pool.history[-1].ok


async def test_a_model_the_backend_lost_is_reloaded_by_the_next_request(
        made: tuple[Pool, FakeBackend, Hooks]) -> None:
    pool, backend, _ = made
    pool.mark_resident("a")
    backend.on_lost("a", "server process exited")  # how the backend reports it (subscribed by the pool)
    assert repr(pool) == "<Pool gpu [a:absent/0, b:absent/0, c:absent/0] waiting=0 swapping=None>"
    waiting = asyncio.create_task(taken(pool.lease("a")))
    await backend.finish("load", "a")
    (await waiting).release()
    assert backend.calls == [("load", "a")]


async def test_an_operator_unload_waits_for_the_running_request_then_the_backend(
        made: tuple[Pool, FakeBackend, Hooks]) -> None:
    pool, backend, _ = made
    pool.mark_resident("a")
    running = await taken(pool.lease("a"))
    unloading = asyncio.create_task(pool.unload("a", timeout=5))
    await settle_loop()
    assert repr(pool) == "<Pool gpu [a:resident/1, b:absent/0, c:absent/0] waiting=0 swapping=None>"
    assert pool.draining == {"a"}
    running.release()
    await backend.finish("unload", "a")
    assert await unloading is True
    assert repr(pool) == "<Pool gpu [a:absent/0, b:absent/0, c:absent/0] waiting=0 swapping=None>"


async def test_the_queue_timeout_ends_the_wait_and_hands_back_nothing(made: tuple[Pool, FakeBackend, Hooks]) -> None:
    cfg = config(queue_timeout="50ms")
    backend = FakeBackend(cfg)
    pool = Pool(backend, cfg)
    with pytest.raises(QueueTimeout):
        await taken(pool.lease("a"))
    assert "waiting=0" in repr(pool)
    await pool.close()


async def test_closing_fails_the_waiters_and_refuses_new_leases(made: tuple[Pool, FakeBackend, Hooks]) -> None:
    pool, _, _ = made
    waiting = asyncio.create_task(taken(pool.lease("a")))
    await settle_loop()
    await pool.close()
    with pytest.raises(ShuttingDown):
        await waiting
    with pytest.raises(ShuttingDown):
        pool.lease("b").try_now()


async def test_the_backend_hears_when_nothing_runs_on_it(made: tuple[Pool, FakeBackend, Hooks]) -> None:
    pool, backend, _ = made
    pool.mark_resident("a")
    first, second = await taken(pool.lease("a")), await taken(pool.lease("a"))
    first.release()
    assert backend.idled == 0
    second.release()
    assert backend.idled == 1


# -- getting the next model ready, priorities, the budget ------------------------------------------------

async def test_the_next_model_is_warmed_while_the_current_one_drains(made: tuple[Pool, FakeBackend, Hooks]) -> None:
    pool, backend, hooks = made
    pool.mark_resident("a")
    running = await taken(pool.lease("a"))
    wants_b = asyncio.create_task(taken(pool.lease("b")))
    await settle_loop()
    assert hooks.prepared == ["b"] and backend.calls == []  # read into RAM now, loaded once `a` is done
    more_a = await taken(pool.lease("a"))
    more_a.release()  # re-plans while `b` still waits: it is not warmed a second time
    assert hooks.prepared == ["b"]
    running.release()
    await backend.finish("unload", "a")
    await backend.finish("load", "b")
    (await wants_b).release()
    assert backend.calls == [("unload", "a"), ("load", "b")]


async def test_make_before_break_loads_the_next_model_beside_one_still_streaming() -> None:
    cfg = config(max_resident=2)
    backend = FakeBackend(cfg)
    pool = Pool(backend, cfg)
    preloaded(pool, backend, "a")
    streaming = await taken(pool.lease("a"))
    preloaded(pool, backend, "c")  # idle, and used more recently than `a` was released
    wants_b = asyncio.create_task(taken(pool.lease("b")))
    await backend.finish("unload", "c")
    assert repr(pool) == "<Pool gpu [a:resident/1, b:loading/0, c:absent/0] waiting=1 swapping=b>"
    await backend.finish("load", "b")
    (await wants_b).release()
    assert repr(pool) == "<Pool gpu [a:resident/1, b:resident/0, c:absent/0] waiting=0 swapping=None>"
    streaming.release()
    assert backend.most_models == 2
    await pool.close()


async def test_a_batch_request_waits_instead_of_keeping_a_model_an_interactive_one_needs_gone() -> None:
    cfg = config(interactive_max_wait="10ms")
    backend = FakeBackend(cfg)
    pool = Pool(backend, cfg)
    pool.mark_resident("a")
    batch_job = await taken(pool.lease("a", "batch"))
    wants_b = asyncio.create_task(taken(pool.lease("b", "interactive")))
    await settle_loop()
    late_batch = pool.lease("a", "batch")
    assert not late_batch.try_now()  # it would keep `a` busy for the interactive request's whole wait
    late_waiting = asyncio.create_task(late_batch.wait())
    await settle_loop()
    late_interactive = pool.lease("a", "interactive")
    assert late_interactive.try_now()  # interactive requests for `a` are still batched (A A B B)
    assert repr(pool) == "<Pool gpu [a:resident/2, b:absent/0, c:absent/0] waiting=2 swapping=None>"
    assert pool.models["a"].interactive == 1
    batch_job.release()
    late_interactive.release()
    await backend.finish("unload", "a")
    await backend.finish("load", "b")
    (await wants_b).release()
    await backend.finish("unload", "b")  # then the batch request gets its model back
    await backend.finish("load", "a")
    await late_waiting
    late_batch.release()
    assert backend.calls == [("unload", "a"), ("load", "b"), ("unload", "b"), ("load", "a")]
    assert pool.models["a"].interactive == 0
    await pool.close()


async def session_request(scheduler: Scheduler, backend: FakeBackend, session: str, model: str) -> None:
    """One request of `session` for `model`, completing whatever the backend is asked meanwhile."""
    lease = scheduler.lease(model, session=session, step=model)
    if not lease.try_now():
        waiting = asyncio.create_task(lease.wait())
        while not waiting.done():
            for future in list(backend.pending.values()):
                if not future.done():
                    future.set_result(None)
            await asyncio.sleep(0)
        await waiting
    lease.release()
    await settle_loop()


async def test_a_learned_phase_order_warms_and_loads_the_next_model_into_a_free_slot() -> None:
    cfg = config(max_resident=2, prefetch_threshold=0.6)
    backend, hooks = FakeBackend(cfg), Hooks()
    scheduler = Scheduler({"gpu": backend}, cfg, hooks=hooks)
    pool = scheduler.pools["gpu"]
    for model in ("a", "b") * 4:  # the session's loop a -> b -> a ...; both stay resident
        await session_request(scheduler, backend, "agent", model)
    assert scheduler.counts.predictions >= 1 and scheduler.counts.hits >= 1
    # Make room: `b` goes (an operator unload); the session's next request ends on `a`: `b` is predicted.
    unloading = asyncio.create_task(pool.unload("b", timeout=5))
    await backend.finish("unload", "b")
    await unloading
    hooks.prepared.clear()
    lease = scheduler.lease("a", session="agent", step="a")
    assert lease.try_now()
    lease.release()
    await settle_loop()
    assert hooks.prepared == ["b"]  # warmed, and loaded into the free slot before anyone asks
    assert repr(pool) == "<Pool gpu [a:resident/0, b:loading/0, c:absent/0] waiting=0 swapping=b>"
    await backend.finish("load", "b")
    assert pool.history[-1].reason == "prefetch"
    lease = scheduler.lease("b", session="agent", step="b")
    assert lease.try_now()  # the session's request finds it resident: no wait, a hit
    lease.release()
    assert scheduler.snapshot()["prefetch"]["hits"] == scheduler.counts.predictions - 1
    await scheduler.close()


async def test_with_prefetch_off_nothing_is_learned_or_loaded_ahead() -> None:
    cfg = config(max_resident=2, prefetch=False)
    backend, hooks = FakeBackend(cfg), Hooks()
    scheduler = Scheduler({"gpu": backend}, cfg, hooks=hooks)
    for model in ("a", "b", "a", "b", "a"):
        await session_request(scheduler, backend, "agent", model)
    assert scheduler.phase_order is None and scheduler.counts.predictions == 0
    assert [call for call in backend.calls if call[0] == "load"] == [("load", "a"), ("load", "b")]
    await scheduler.close()


async def test_a_failed_prefetch_load_is_not_retried_at_once() -> None:
    cfg = config(max_resident=2)
    backend = FakeBackend(cfg)
    order = PhaseOrder(threshold=0.5)
    pool = Pool(backend, cfg, phase_order=order)
    order.open["s"] = Prediction("s", "b", 1.0, expected_at=0.0)
    pool.replan()
    await backend.finish("load", "b", BackendError("gpu", "out of memory"))
    assert repr(pool) == "<Pool gpu [a:absent/0, b:absent/0, c:absent/0] waiting=0 swapping=None>"
    pool.replan()
    await settle_loop()
    assert backend.calls == [("load", "b")] and pool.history[-1].reason == "prefetch"
    await pool.close()


async def test_min_residency_sees_the_learned_expectations_and_the_measured_swap_cost() -> None:
    cfg = config(min_residency="10s")
    backend = FakeBackend(cfg)
    order = PhaseOrder(threshold=0.5)
    pool = Pool(backend, cfg, phase_order=order)
    waiting = asyncio.create_task(taken(pool.lease("a")))
    await backend.finish("load", "a")
    (await waiting).release()
    assert pool.models["a"].reload_cost > 0  # measured on the swap that loaded it
    order.open["s"] = Prediction("s", "a", 1.0, expected_at=pool.clock() + 0.5)
    pool.models["a"].reload_cost = 5.0  # a swap back would cost more than waiting for the expected request
    wants_b = asyncio.create_task(taken(pool.lease("b")))
    await settle_loop()
    assert backend.calls == [("load", "a")] and pool.models["a"].expected_at is not None  # held
    order.open.clear()  # the session went elsewhere: nothing justifies the hold any more
    pool.replan()
    await backend.finish("unload", "a")
    await backend.finish("load", "b")
    (await wants_b).release()
    await pool.close()


async def test_the_budget_is_never_exceeded_while_loading_ahead_and_prefetching() -> None:
    """Random sessions over three models with learned predictions, loads ahead, drains, operator unloads,
    interactive and batch requests; loads and unloads finish in random order. The backend never holds
    more than the budget, counted from the start of a load to the end of an unload."""
    reasons: set[str] = set()
    for seed in range(12):
        reasons |= await random_run(random.Random(seed))
    assert {"demand", "prefetch"} <= reasons  # both kinds of load were exercised


async def random_run(rng: random.Random) -> set[str]:
    cfg = config(max_resident=3, sizes={"a": "4GB", "b": "5GB", "c": "3GB"}, vram_budget="9GB",
                 prefetch_threshold=0.5, interactive_max_wait="1ms")
    backend = FakeBackend(cfg)
    scheduler = Scheduler({"gpu": backend}, cfg, hooks=Hooks())
    pool = scheduler.pools["gpu"]

    async def agent(name: str, steps: int) -> None:
        for i in range(steps):
            model = "abc"[i % 3] if rng.random() < 0.8 else rng.choice("abc")
            lease = scheduler.lease(model, rng.choice(["interactive", "batch"]), session=name, step=model)
            if not lease.try_now():
                await lease.wait()
            for _ in range(rng.randrange(1, 6)):
                await asyncio.sleep(0)
            lease.release()

    async def backend_worker() -> None:
        while True:
            for future in list(backend.pending.values()):
                if rng.random() < 0.5 and not future.done():
                    future.set_result(None)
            await asyncio.sleep(0)

    async def operator() -> None:  # frees room now and then, so that predictions find some
        while True:
            for _ in range(rng.randrange(5, 40)):
                await asyncio.sleep(0)
            await pool.unload(rng.choice("abc"), timeout=5)

    helpers = [asyncio.create_task(backend_worker()), asyncio.create_task(operator())]
    await asyncio.gather(*(agent(f"agent-{n}", 20) for n in range(rng.choice([1, 2, 3]))))
    for helper in helpers:
        helper.cancel()
    assert backend.most_bytes <= 9_000_000_000 and backend.most_models <= 3
    await scheduler.close()
    return {r.reason for r in pool.history}
