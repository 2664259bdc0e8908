"""The pure scheduling policy, scenario by scenario: no I/O, no event loop, no clock but the one passed in."""

from __future__ import annotations

from warmpool.scheduling.policy import ModelState, Plan, PoolView, Waiter, held_until, holds, plan


def pool(*models: ModelState, waiters: list[Waiter] | None = None, **kw: object) -> PoolView:
    return PoolView(models={m.name: m for m in models}, waiters=waiters or [], **kw)  # type: ignore[arg-type]


def resident(name: str, *, inflight: int = 0, last_used: float = 0.0, loaded_at: float = 0.0,
             **kw: object) -> ModelState:
    return ModelState(name, "resident", inflight=inflight, last_used=last_used, loaded_at=loaded_at, **kw)  # type: ignore[arg-type]


def absent(name: str, **kw: object) -> ModelState:
    return ModelState(name, "absent", **kw)  # type: ignore[arg-type]


def w(i: int, model: str, since: float = 0.0) -> Waiter:
    return Waiter(i, model, since)


def batch(i: int, model: str, since: float = 0.0) -> Waiter:
    return Waiter(i, model, since, "batch")


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
    # `a` is held (a request for it is expected within a swap's cost), but `b` has waited max_wait.
    view = pool(resident("a", loaded_at=30.0, min_residency=60.0, expected_at=32.0, reload_cost=5.0),
                absent("b"), waiters=[w(1, "b", 0.0)], max_wait=30.0)
    p = plan(view, now=31.0)
    assert (p.evict, p.load, p.reason) == (["a"], "b", "max_wait")


def test_min_residency_is_no_toll_a_fresh_model_nobody_expects_goes_at_once() -> None:
    # The measured regression: min_residency 5s held a model nobody was waiting for while others queued.
    view = pool(resident("a", loaded_at=10.0, min_residency=5.0), absent("b"),
                waiters=[w(1, "b", 11.0)], max_wait=30.0)
    p = plan(view, now=12.0)
    assert (p.evict, p.load, p.reason) == (["a"], "b", "demand")


def test_min_residency_holds_a_model_expected_back_sooner_than_a_swap_costs() -> None:
    view = pool(resident("a", loaded_at=10.0, min_residency=5.0, expected_at=12.5, reload_cost=1.0),
                absent("b"), waiters=[w(1, "b", 11.0)], max_wait=30.0)
    p = plan(view, now=12.0)
    assert not p.swaps and p.wake_at == 12.5 and p.prepare == "b"  # b's files are warmed meanwhile


def test_min_residency_does_not_hold_for_a_request_expected_later_than_a_swap_back_costs() -> None:
    view = pool(resident("a", loaded_at=10.0, min_residency=5.0, expected_at=14.0, reload_cost=1.0),
                absent("b"), waiters=[w(1, "b", 11.0)])
    assert plan(view, now=12.0).load == "b"


def test_min_residency_does_not_hold_once_the_expected_request_is_late() -> None:
    view = pool(resident("a", loaded_at=10.0, min_residency=5.0, expected_at=12.5, reload_cost=1.0),
                absent("b"), waiters=[w(1, "b", 11.0)])
    assert plan(view, now=12.6).load == "b"


def test_min_residency_over_allows_the_swap() -> None:
    view = pool(resident("a", loaded_at=10.0, min_residency=5.0, expected_at=15.5, reload_cost=1.0),
                absent("b"), waiters=[w(1, "b", 11.0)])
    assert plan(view, now=15.0).load == "b"


def test_holds_only_within_min_residency_and_only_while_it_saves_work() -> None:
    fresh = resident("a", loaded_at=0.0, min_residency=10.0)
    assert not holds(fresh, 1.0, queued=False)  # nobody waits for it, nobody is expected
    assert holds(fresh, 1.0, queued=True)  # requests for it are queued
    assert not holds(fresh, 10.0, queued=True)  # min_residency is the longest it is ever held
    expected = resident("a", loaded_at=0.0, min_residency=10.0, expected_at=3.0, reload_cost=2.0)
    assert holds(expected, 1.0, queued=False) and held_until(expected, queued=False) == 3.0
    assert not holds(expected, 0.5, queued=False)  # expected in 2.5 s, a swap back costs 2 s
    assert not holds(expected, 3.5, queued=False)  # it did not come
    unknown_cost = resident("a", loaded_at=0.0, min_residency=10.0, expected_at=1.0)
    assert not holds(unknown_cost, 0.9, queued=False)  # no measured swap cost: never held on a guess


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


def test_load_ahead_loads_the_next_model_beside_one_still_draining() -> None:
    # `a` streams (the least recently released, but in use now), `c` is idle: make room with `c`, so `b`
    # loads while `a` drains, instead of waiting for `a` to be dropped.
    view = pool(resident("a", inflight=1, last_used=1.0), resident("c", last_used=5.0), absent("b"),
                waiters=[w(1, "b", 6.0)], max_resident=2)
    assert (plan(view, now=7.0).evict, plan(view, now=7.0).load) == (["c"], "b")
    view.load_ahead = False
    p = plan(view, now=7.0)
    assert not p.swaps and p.prepare == "b"  # the old order waits for `a`; b's files are warmed meanwhile


def test_a_predicted_model_is_loaded_into_a_free_slot() -> None:
    view = pool(resident("a"), absent("b"), absent("c"), max_resident=2, predicted=("c", "b"))
    p = plan(view, now=1.0)
    assert (p.evict, p.load, p.reason) == ([], "c", "prefetch")


def test_a_predicted_model_waits_until_no_request_runs_in_the_pool() -> None:
    # A load beside a running answer competes with it for the processor: it waits for a gap.
    busy = pool(resident("a", inflight=1), absent("c"), max_resident=2, predicted=("c",))
    assert plan(busy, now=1.0) == Plan()
    busy.models["a"].inflight = 0
    assert plan(busy, now=1.0).load == "c"


def test_a_prediction_never_evicts_and_respects_the_vram_budget() -> None:
    full = pool(resident("a"), absent("b"), max_resident=1, predicted=("b",))
    assert plan(full, now=1.0) == Plan()
    tight = pool(resident("a", size=6), absent("big", size=5), absent("small", size=3),
                 max_resident=3, vram_budget=10, predicted=("big", "small"))
    assert plan(tight, now=1.0).load == "small"


def test_a_prediction_waits_behind_demand_and_is_off_without_load_ahead() -> None:
    demand = pool(resident("a"), absent("b"), absent("c"), waiters=[w(1, "b", 0.0)],
                  max_resident=2, predicted=("c",))
    assert plan(demand, now=1.0).load == "b"
    off = pool(resident("a"), absent("c"), max_resident=2, predicted=("c",), load_ahead=False)
    assert not plan(off, now=1.0).swaps


def test_interactive_waiters_are_served_before_older_batch_ones() -> None:
    view = pool(resident("a"), absent("b"), absent("c"), waiters=[batch(1, "b", 0.0), w(2, "c", 1.0)])
    assert plan(view, now=2.0).load == "c"


def test_batch_requests_are_not_served_on_a_model_an_interactive_waiter_needs_gone() -> None:
    # `a` streams a batch request; more batch requests for `a` wait behind an interactive request for `b`.
    view = pool(resident("a", inflight=1), absent("b"),
                waiters=[w(1, "b", 0.0), batch(2, "a", 0.5), w(3, "a", 0.6)], interactive_max_wait=5.0)
    p = plan(view, now=1.0)
    assert p.grant == [3] and p.batch_held == {"a"} and not p.swaps  # interactive batching still works


def test_an_interactive_waiter_cuts_a_batch_models_residency_short_after_its_own_max_wait() -> None:
    view = pool(resident("a", inflight=1, loaded_at=0.0, min_residency=60.0), absent("b"),
                waiters=[w(1, "b", 0.0), batch(2, "a", 0.5)], interactive_max_wait=5.0, max_wait=30.0)
    assert plan(view, now=4.0).draining == set() and plan(view, now=4.0).wake_at == 5.0
    p = plan(view, now=5.0)
    assert p.draining == {"a"} and p.grant == [] and not p.swaps  # its running stream ends first
    view.models["a"].inflight = 0
    assert (plan(view, now=5.1).evict, plan(view, now=5.1).load) == (["a"], "b")


def test_interactive_requests_using_a_model_keep_it_until_max_wait() -> None:
    view = pool(resident("a", inflight=1, interactive=1), absent("b"), waiters=[w(1, "b", 0.0)],
                interactive_max_wait=5.0, max_wait=30.0)
    assert plan(view, now=6.0).draining == set()
    assert plan(view, now=30.0).draining == {"a"}


def test_batch_never_drains_a_model_interactive_requests_use() -> None:
    view = pool(resident("a", inflight=1, interactive=1), absent("b"), waiters=[batch(1, "b", 0.0)],
                max_wait=30.0)
    p = plan(view, now=100.0)
    assert p.draining == set() and not p.swaps and p.wake_at is None
    view.models["a"].interactive = 0  # only batch requests on it now: max_wait applies as always
    assert plan(view, now=100.0).draining == {"a"}


def test_batch_swaps_away_from_an_idle_model() -> None:
    view = pool(resident("a"), absent("b"), waiters=[batch(1, "b", 0.0)])
    assert plan(view, now=1.0).load == "b"


def test_batch_does_not_swap_away_from_a_model_an_agent_used_interactively_a_moment_ago() -> None:
    # Between two requests of an interactive agent the model is idle, but still in use.
    view = pool(resident("a", interactive_at=9.0), absent("b"), waiters=[batch(1, "b", 5.0)],
                interactive_max_wait=5.0)
    p = plan(view, now=10.0)
    assert not p.swaps and p.wake_at == 14.0
    assert plan(view, now=14.0).load == "b"
    interactive = pool(resident("a", interactive_at=9.0), absent("b"), waiters=[w(1, "b", 5.0)])
    assert plan(interactive, now=10.0).load == "b"  # among interactive requests nothing changes
