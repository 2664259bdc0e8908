"""When the managed llama.cpp backend replaces the spare worker a load took: once no request runs on the
backend (a Python process starting beside a generating llama.cpp server slows that generation sharply),
or at the latest SPARE_REFILL_LATEST seconds after the load. Real llama-cpp-python processes, driven
through the scheduler's pool as the proxy drives it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.conftest import eventually, llama_models
from warmpool.backends import llamacpp
from warmpool.backends.llamacpp import LlamaCppBackend
from warmpool.config import config_from_mapping
from warmpool.scheduling.pool import Lease, Pool

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def managed(gguf_path: str) -> AsyncIterator[tuple[LlamaCppBackend, Pool]]:
    cfg = config_from_mapping({
        "backends": {"local": {"kind": "llamacpp", "max_resident": 1, "spare": True}},
        "models": llama_models(gguf_path, "planner", "coder"),
    }, env={}, source="<test>")
    backend = LlamaCppBackend(cfg.backends["local"], cfg)
    pool = Pool(backend, cfg)
    await backend.start()
    try:
        yield backend, pool
    finally:
        await pool.close()
        await backend.close()


async def hold(pool: Pool, model: str) -> Lease:
    """A request's lease on `model`, taken (after a swap when needed) and not yet released."""
    lease = pool.lease(model)
    if not lease.try_now():
        await lease.wait()
    return lease


async def test_the_spare_is_replaced_once_no_request_runs(managed: tuple[LlamaCppBackend, Pool]) -> None:
    backend, pool = managed
    await eventually(lambda: backend.spares.idle is not None)  # the one started with the backend
    first = await hold(pool, "planner")  # the swap's load takes the spare; the request now runs
    assert "planner" in backend.servers and backend.spares.idle is None
    await asyncio.sleep(1.0)  # a refill would have spawned its process by now
    assert backend.spares.idle is None, "a spare started beside the running request"
    second = await hold(pool, "planner")
    first.release()  # one of two requests ended: the backend is still busy
    await asyncio.sleep(0.5)
    assert backend.spares.idle is None
    second.release()  # the last one ended
    await eventually(lambda: backend.spares.idle is not None)
    spare = backend.spares.idle
    assert spare is not None and await spare.wait_ready(60)


async def test_a_backend_that_never_idles_gets_its_spare_later(
        managed: tuple[LlamaCppBackend, Pool], monkeypatch: pytest.MonkeyPatch) -> None:
    backend, pool = managed
    monkeypatch.setattr(llamacpp, "SPARE_REFILL_LATEST", 1.0)
    await eventually(lambda: backend.spares.idle is not None)
    lease = await hold(pool, "planner")
    assert backend.spares.idle is None
    await eventually(lambda: backend.spares.idle is not None, timeout=10)  # while the request still runs
    lease.release()


async def test_the_next_swap_takes_the_spare_started_when_the_backend_went_idle(
        managed: tuple[LlamaCppBackend, Pool]) -> None:
    backend, pool = managed
    (await hold(pool, "planner")).release()
    await eventually(lambda: backend.spares.idle is not None)
    spare = backend.spares.idle
    lease = await hold(pool, "coder")  # evicts the planner, loads the coder from that spare
    assert backend.servers["coder"].pid == spare.pid
    lease.release()
