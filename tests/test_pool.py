"""The pool's effects in memory: leases, the queue, swaps and hooks against a fake backend whose loads and
unloads the test completes by hand, with the pool's state asserted through `repr(pool)` (as httpcore's
connection pool tests do). No sockets, no processes: every interleaving is chosen by the test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from warmpool.backends.base import Backend, LoadResult, ResidentModel
from warmpool.config import Config, ModelConfig, config_from_mapping
from warmpool.errors import BackendError, QueueTimeout, ShuttingDown
from warmpool.scheduling.pool import Lease, Pool

pytestmark = pytest.mark.timeout(20)


class FakeBackend(Backend):
    """Loads and unloads wait until the test resolves them: `backend.finish("load", "a")`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg.backends["gpu"], cfg)
        self.calls: list[tuple[str, str]] = []
        self.pending: dict[tuple[str, str], asyncio.Future[None]] = {}
        self.idled = 0

    async def _step(self, kind: str, model: ModelConfig) -> None:
        self.calls.append((kind, model.name))
        future = self.pending.setdefault((kind, model.name), asyncio.get_running_loop().create_future())
        try:
            await future
        finally:
            self.pending.pop((kind, model.name), None)

    async def load(self, model: ModelConfig) -> LoadResult:
        await self._step("load", model)
        return LoadResult(0.0)

    async def unload(self, model: ModelConfig) -> None:
        await self._step("unload", model)

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

    async def swap_source(self, model: str) -> str:
        return "ram"

    def record_use(self, model: str) -> None:
        self.used.append(model)


def config(max_resident: int = 1, **scheduler: Any) -> Config:
    return config_from_mapping({
        "backends": {"gpu": {"kind": "ollama", "url": "http://127.0.0.1:9", "max_resident": max_resident}},
        "models": {name: {"backend": "gpu"} for name in ("a", "b", "c")},
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
