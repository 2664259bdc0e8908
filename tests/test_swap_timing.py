"""When a swap is over: for a backend whose load ends before the model produced a token (managed llama.cpp:
the first request reads the weights), the swap's record and histograms run until that first answer. In
memory, with a fake backend and a clock the test moves, so every duration is exact."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from warmpool.backends.base import Backend, LoadResult, ResidentModel
from warmpool.config import Config, ModelConfig, config_from_mapping
from warmpool.metrics import Metrics
from warmpool.scheduling.pool import Pool

pytestmark = pytest.mark.timeout(20)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class LoadsWithoutAToken(Backend):
    """Each load takes `load_seconds` on the test's clock and ends before the model answered."""

    def __init__(self, cfg: Config, clock: Clock, answered: bool = False) -> None:
        super().__init__(cfg.backends["gpu"], cfg)
        self.clock, self.answered = clock, answered

    async def load(self, model: ModelConfig) -> LoadResult:
        self.clock.now += 0.5
        return LoadResult(0.5, answered=self.answered)

    async def unload(self, model: ModelConfig) -> None:
        self.clock.now += 0.25

    async def resident(self) -> list[ResidentModel]:
        return []

    async def health(self) -> bool:
        return True


def histogram(metrics: Metrics, name: str, model: str) -> tuple[float, float]:
    """(count, sum) of a pool histogram for `model`."""
    labels = {"pool": "gpu", "model": model, "source": "unknown"}
    count = metrics.registry.get_sample_value(f"{name}_count", labels)
    return (count or 0.0, metrics.registry.get_sample_value(f"{name}_sum", labels) or 0.0)


@pytest.fixture
async def made() -> AsyncIterator[tuple[Pool, LoadsWithoutAToken, Metrics, Clock]]:
    cfg = config_from_mapping({
        "backends": {"gpu": {"kind": "ollama", "url": "http://127.0.0.1:9"}},
        "models": {"a": {"backend": "gpu"}, "b": {"backend": "gpu"}},
        "ram_tier": {"enabled": False},
    }, env={})
    clock = Clock()
    backend, metrics = LoadsWithoutAToken(cfg, clock), Metrics(CollectorRegistry())
    pool = Pool(backend, cfg, metrics, clock=clock)
    yield pool, backend, metrics, clock
    await pool.close()


Made = tuple[Pool, LoadsWithoutAToken, Metrics, Clock]


async def test_the_swap_ends_at_the_first_answer_after_the_load(made: Made) -> None:
    pool, backend, metrics, clock = made
    lease = pool.lease("a")
    assert not lease.try_now()
    await lease.wait()  # the swap loaded "a" (0.5 s) and granted this request
    assert histogram(metrics, "warmpool_swap_duration_seconds", "a") == (0, 0)  # not over: no token yet
    clock.now += 2.0  # the request is forwarded; its prompt reads the weights
    backend.on_answered("a")
    assert histogram(metrics, "warmpool_swap_duration_seconds", "a") == (1, pytest.approx(2.5))
    assert histogram(metrics, "warmpool_load_duration_seconds", "a") == (1, pytest.approx(2.5))
    record = pool.snapshot()["swaps"][0]
    assert (record["seconds"], record["load_seconds"]) == (pytest.approx(2.5), pytest.approx(2.5))
    clock.now += 5.0
    backend.on_answered("a")  # a later answer changes nothing
    assert histogram(metrics, "warmpool_swap_duration_seconds", "a") == (1, pytest.approx(2.5))
    lease.release()


async def test_a_swap_nobody_waits_for_ends_with_its_load(made: Made) -> None:
    pool, backend, metrics, clock = made
    lease = pool.lease("a")
    assert not lease.try_now()
    waiting = asyncio.create_task(lease.wait())
    await asyncio.sleep(0)
    waiting.cancel()  # the client left while the model loaded: the load goes on, nobody waits for it
    with pytest.raises(asyncio.CancelledError):
        await waiting
    for _ in range(5):
        await asyncio.sleep(0)
    assert pool.models["a"].status == "resident"
    assert histogram(metrics, "warmpool_swap_duration_seconds", "a") == (1, pytest.approx(0.5))
    clock.now += 3.0
    backend.on_answered("a")  # a request much later is no part of the swap
    assert histogram(metrics, "warmpool_swap_duration_seconds", "a") == (1, pytest.approx(0.5))


async def test_evictions_count_toward_the_swap(made: Made) -> None:
    pool, backend, metrics, clock = made
    async with pool.lease("a"):
        backend.on_answered("a")
    lease = pool.lease("b")
    assert not lease.try_now()
    await lease.wait()  # unloads a (0.25 s), loads b (0.5 s)
    clock.now += 1.0
    backend.on_answered("b")
    assert histogram(metrics, "warmpool_swap_duration_seconds", "b") == (1, pytest.approx(1.75))
    assert histogram(metrics, "warmpool_load_duration_seconds", "b") == (1, pytest.approx(1.5))
    lease.release()


async def test_a_backend_that_answers_in_its_load_is_recorded_at_once() -> None:
    cfg = config_from_mapping({"backends": {"gpu": {"kind": "ollama", "url": "http://127.0.0.1:9"}},
                               "models": {"a": {"backend": "gpu"}}, "ram_tier": {"enabled": False}}, env={})
    clock, metrics = Clock(), Metrics(CollectorRegistry())
    pool = Pool(LoadsWithoutAToken(cfg, clock, answered=True), cfg, metrics, clock=clock)
    async with pool.lease("a"):
        assert histogram(metrics, "warmpool_swap_duration_seconds", "a") == (1, pytest.approx(0.5))
        assert histogram(metrics, "warmpool_load_duration_seconds", "a") == (1, pytest.approx(0.5))
    await pool.close()
