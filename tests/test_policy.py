"""The pure scheduling policy, scenario by scenario: no I/O, no event loop, no clock but the one passed in."""

from __future__ import annotations

from warmpool.scheduling.policy import ModelState, Plan, PoolView, Waiter, plan


def pool(*models: ModelState, waiters: list[Waiter] | None = None, **kw: object) -> PoolView:
    return PoolView(models={m.name: m for m in models}, waiters=waiters or [], **kw)  # type: ignore[arg-type]


def resident(name: str, *, inflight: int = 0, last_used: float = 0.0, loaded_at: float = 0.0,
             **kw: object) -> ModelState:
    return ModelState(name, "resident", inflight=inflight, last_used=last_used, loaded_at=loaded_at, **kw)  # type: ignore[arg-type]


def absent(name: str, **kw: object) -> ModelState:
    return ModelState(name, "absent", **kw)  # type: ignore[arg-type]


def w(i: int, model: str, since: float = 0.0) -> Waiter:
    return Waiter(i, model, since)


def test_resident_model_is_served_at_once() -> None:
    p = plan(pool(resident("a"), waiters=[w(1, "a")]), now=1.0)
    assert p.grant == [1] and not p.swaps


def test_absent_model_with_room_loads_without_eviction() -> None:
    p = plan(pool(resident("a"), absent("b"), waiters=[w(1, "b")], max_resident=2), now=1.0)
    assert (p.evict, p.load, p.grant) == ([], "b", [])


def test_full_pool_evicts_idle_lru_then_loads() -> None:
    view = pool(resident("a", last_used=5.0), resident("c", last_used=2.0), absent("b"),
                waiters=[w(1, "b")], max_resident=2)
    p = plan(view, now=10.0)
    assert (p.evict, p.load, p.reason) == (["c"], "b", "demand")


def test_busy_victim_is_drained_not_cut() -> None:
    p = plan(pool(resident("a", inflight=1), absent("b"), waiters=[w(1, "b", since=0.0)]), now=1.0)
    assert not p.swaps and p.grant == []


def test_batching_serves_resident_model_before_swapping_away() -> None:
    # A is streaming; queue is B, A, B, A: the A requests are served now (A A B B, not A B A B).
    view = pool(resident("a", inflight=1), absent("b"),
                waiters=[w(1, "b", 0.0), w(2, "a", 0.1), w(3, "b", 0.2), w(4, "a", 0.3)])
    p = plan(view, now=1.0)
    assert p.grant == [2, 4] and not p.swaps


def test_max_wait_drains_the_victim_and_stops_new_grants() -> None:
    view = pool(resident("a", inflight=1), absent("b"), waiters=[w(1, "b", 0.0), w(2, "a", 25.0)], max_wait=30.0)
    p = plan(view, now=31.0)
    assert p.draining == {"a"} and p.grant == [] and not p.swaps


def test_max_wait_swaps_as_soon_as_the_victim_is_idle() -> None:
    view = pool(resident("a", loaded_at=30.0, min_residency=60.0), absent("b"),
                waiters=[w(1, "b", 0.0)], max_wait=30.0)
    p = plan(view, now=31.0)
    assert (p.evict, p.load, p.reason) == (["a"], "b", "max_wait")


def test_min_residency_holds_a_fresh_model_and_sets_a_wake_up() -> None:
    view = pool(resident("a", loaded_at=10.0, min_residency=5.0), absent("b"),
                waiters=[w(1, "b", 11.0)], max_wait=30.0)
    p = plan(view, now=12.0)
    assert not p.swaps and p.wake_at == 15.0


def test_min_residency_over_allows_the_swap() -> None:
    view = pool(resident("a", loaded_at=10.0, min_residency=5.0), absent("b"), waiters=[w(1, "b", 11.0)])
    assert plan(view, now=15.0).load == "b"


def test_pinned_model_is_never_evicted() -> None:
    view = pool(resident("pin", pinned=True, last_used=0.0), resident("x", last_used=5.0), absent("b"),
                waiters=[w(1, "b")], max_resident=2)
    assert plan(view, now=10.0).evict == ["x"]


def test_pool_full_of_pinned_models_fails_the_waiters() -> None:
    view = pool(resident("pin", pinned=True), absent("b"), waiters=[w(1, "b"), w(2, "b")])
    p = plan(view, now=10.0)
    assert [i for i, _ in p.fail] == [1, 2] and "pinned" in p.fail[0][1] and not p.swaps


def test_one_swap_at_a_time() -> None:
    view = pool(ModelState("a", "loading"), absent("b"), waiters=[w(1, "b")], swapping=True, max_resident=2)
    p = plan(view, now=1.0)
    assert not p.swaps and p.grant == []


def test_requests_for_a_loading_model_wait_for_that_load() -> None:
    view = pool(ModelState("a", "loading"), waiters=[w(1, "a"), w(2, "a")], swapping=True)
    assert plan(view, now=1.0).grant == []


def test_fifo_target_is_oldest_waiters_model() -> None:
    view = pool(resident("a"), absent("b"), absent("c"), waiters=[w(1, "c", 0.0), w(2, "b", 0.5)])
    assert plan(view, now=1.0).load == "c"


def test_waiters_for_model_being_unloaded_wait() -> None:
    view = pool(ModelState("a", "unloading"), ModelState("b", "loading"), waiters=[w(1, "a")], swapping=True)
    p = plan(view, now=1.0)
    assert p.grant == [] and not p.swaps


def test_vram_budget_evicts_as_many_as_needed() -> None:
    view = pool(resident("a", size=4, last_used=1.0), resident("c", size=4, last_used=2.0),
                resident("d", size=4, last_used=3.0), absent("big", size=10),
                waiters=[w(1, "big")], max_resident=10, vram_budget=14)
    p = plan(view, now=5.0)
    assert (p.evict, p.load) == (["a", "c"], "big")


def test_vram_budget_model_larger_than_budget_fails() -> None:
    view = pool(absent("huge", size=100), waiters=[w(1, "huge")], vram_budget=10, max_resident=4)
    p = plan(view, now=0.0)
    assert p.fail and "larger than" in p.fail[0][1]


def test_keep_alive_unloads_an_idle_model() -> None:
    view = pool(resident("a", last_used=10.0, loaded_at=5.0, keep_alive=30.0))
    assert plan(view, now=39.0).wake_at == 40.0
    p = plan(view, now=40.0)
    assert (p.evict, p.load, p.reason) == (["a"], None, "keep_alive")


def test_keep_alive_never_unloads_a_busy_or_pinned_model() -> None:
    busy = pool(resident("a", last_used=0.0, keep_alive=1.0, inflight=1))
    pinned = pool(resident("a", last_used=0.0, keep_alive=1.0, pinned=True))
    assert not plan(busy, now=100.0).swaps and not plan(pinned, now=100.0).swaps


def test_idle_pool_returns_to_its_default_model() -> None:
    view = pool(resident("coder", last_used=10.0, loaded_at=1.0), absent("chat"),
                idle_default="chat", idle_after=60.0)
    assert plan(view, now=50.0).wake_at == 70.0
    p = plan(view, now=71.0)
    assert (p.evict, p.load, p.reason) == (["coder"], "chat", "idle_default")


def test_idle_default_waits_while_anything_runs() -> None:
    view = pool(resident("coder", inflight=1), absent("chat"), idle_default="chat", idle_after=1.0)
    assert not plan(view, now=100.0).swaps


def test_idle_default_already_resident_does_nothing() -> None:
    view = pool(resident("chat"), idle_default="chat", idle_after=1.0)
    assert plan(view, now=100.0) == Plan()


def test_three_models_one_slot_agent_cycle() -> None:
    # An agent cycle context -> execution -> verification with max_resident 1: each step one swap.
    models = {"ctx": resident("ctx", last_used=1.0), "exe": absent("exe"), "ver": absent("ver")}
    view = PoolView(models=models, waiters=[w(1, "exe", 2.0)])
    p = plan(view, now=2.0)
    assert (p.evict, p.load) == (["ctx"], "exe")


def test_operator_unload_drains_then_evicts_even_a_pinned_model() -> None:
    busy = pool(resident("a", inflight=1, pinned=True), waiters=[w(1, "a")], unload_requested={"a"})
    p = plan(busy, now=1.0)
    assert p.draining == {"a"} and p.grant == [] and not p.swaps
    idle = pool(resident("a", pinned=True), unload_requested={"a"})
    p = plan(idle, now=1.0)
    assert (p.evict, p.load, p.reason) == (["a"], None, "admin")


def test_a_victim_whose_waiters_are_served_now_is_not_evicted_in_the_same_plan() -> None:
    # A just loaded and idle, B waited first, A's request queued behind: A's request is granted (batching),
    # so A is busy and must not be evicted by this very plan (that would cut the granted stream).
    view = pool(resident("a", loaded_at=1.0), absent("b"), waiters=[w(1, "b", 0.0), w(2, "a", 0.5)])
    p = plan(view, now=2.0)
    assert p.grant == [2] and not p.swaps
