"""Tests for warmpool.ramtier.tier: the pure plan over many scenarios, priorities, the state file, and the RamTier
service on real files in tmp_path, with the memory numbers injected."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from warmpool.ramtier import pagecache
from warmpool.ramtier.tier import (
    FileWarmth,
    MemoryAmount,
    ModelWarmth,
    RamTier,
    RamTierConfig,
    RamTierError,
    Usage,
    UsageState,
    plan_warmth,
    rank_models,
)
from warmpool.ramtier.weights import WeightFiles

MiB = 1 << 20
GiB = 1 << 30
BIG = 1 << 50  # a budget or an amount of memory that never limits


# -- the pure plan ---------------------------------------------------------------------------------

def m(name: str, size: int = 100, resident: int = 0, *, priority: int | None = None, ours: bool = False,
      loaded: bool = False, used: float = 0.0, files: tuple[FileWarmth, ...] | None = None) -> ModelWarmth:
    """A model with one file named after it (unless `files` is given)."""
    return ModelWarmth(name, files or (FileWarmth(f"/{name}", size, resident, ours),), priority, loaded, used)


def test_everything_fits_so_everything_wanted_is_warmed_in_priority_order() -> None:
    plan = plan_warmth([m("b", priority=1), m("a", priority=0), m("c")], BIG, BIG, 0)
    assert (plan.warm, plan.drop, plan.evict, plan.held) == (["a", "b"], [], [], {})


def test_fully_resident_models_are_kept_but_not_warmed() -> None:
    plan = plan_warmth([m("a", resident=100, priority=0), m("b", resident=40, priority=1)], BIG, BIG, 0)
    assert plan.keep == ["a", "b"] and plan.warm == ["b"]


def test_the_budget_limits_what_is_kept() -> None:
    plan = plan_warmth([m("a", priority=0), m("b", priority=1), m("c", priority=2)], 250, BIG, 0)
    assert plan.warm == ["a", "b"] and plan.room == 250
    assert plan.held == {"c": "no room: more wanted models fill the budget (250 bytes)"}


def test_the_reserve_limits_what_is_kept() -> None:
    plan = plan_warmth([m("a", priority=0), m("b", priority=1)], BIG, 1150, 1000)
    assert plan.warm == ["a"] and plan.room == 150
    assert "available memory less the reserve" in plan.held["b"]


def test_available_below_the_reserve_means_no_room() -> None:
    plan = plan_warmth([m("a", priority=0)], BIG, 500, 1000)
    assert plan.room == 0 and plan.warm == [] and "more than the RAM tier's room (0)" in plan.held["a"]


def test_a_model_too_big_is_passed_over_and_smaller_ones_still_fit() -> None:
    plan = plan_warmth([m("huge", 1000, priority=0), m("small", 100, priority=1)], 500, BIG, 0)
    assert plan.warm == ["small"]
    assert plan.held["huge"] == "needs 1000 bytes, more than the RAM tier's room (500)"


def test_models_not_wanted_or_loaded_are_not_warmed() -> None:
    plan = plan_warmth([m("idle"), m("loaded", priority=0, loaded=True)], BIG, BIG, 0)
    assert plan.warm == [] and plan.keep == []


def test_our_least_recently_used_files_go_first_and_only_as_many_as_needed() -> None:
    models = [m("new", priority=0),
              m("old", resident=100, ours=True, used=1.0),
              m("older", resident=100, ours=True, used=0.5),
              m("recent", resident=100, ours=True, used=3.0)]
    plan = plan_warmth(models, 300, BIG, 0)
    assert plan.drop == ["/older"] and plan.evict == ["older"] and plan.warm == ["new"]


def test_files_we_did_not_warm_are_never_dropped_and_take_room() -> None:
    models = [m("wanted", priority=0), m("someone_elses", resident=100, used=0.0)]
    plan = plan_warmth(models, 150, BIG, 0)
    assert plan.drop == [] and plan.warm == []
    assert "wanted" in plan.held


def test_files_of_a_loaded_model_are_never_dropped() -> None:
    models = [m("wanted", priority=0), m("loaded", resident=100, ours=True, loaded=True)]
    plan = plan_warmth(models, 150, BIG, 0)
    assert plan.drop == [] and plan.warm == []


def test_a_file_shared_with_a_loaded_model_is_protected() -> None:
    shared = FileWarmth("/shared", 100, 100, True)
    models = [m("wanted", priority=0), m("a", files=(shared,)), m("b", loaded=True, files=(shared,))]
    assert plan_warmth(models, 150, BIG, 0).drop == []


def test_a_file_shared_with_a_kept_model_is_not_dropped() -> None:
    shared = FileWarmth("/shared", 100, 100, True)
    models = [m("kept", priority=0, files=(shared,)), m("unwanted", files=(shared,)), m("other", priority=1)]
    plan = plan_warmth(models, 150, BIG, 0)
    assert plan.drop == [] and plan.keep == ["kept"] and plan.warm == []


def test_a_shared_file_counts_once() -> None:
    shared = FileWarmth("/shared", 100, 0, False)
    models = [m("a", priority=0, files=(shared,)), m("b", priority=1, files=(shared,))]
    plan = plan_warmth(models, 100, BIG, 0)
    assert plan.keep == ["a", "b"] and plan.warm == ["a", "b"]


def test_dropping_makes_room_for_a_more_wanted_model() -> None:
    models = [m("hot", priority=0), m("cold", resident=100, ours=True, priority=1, used=5.0)]
    plan = plan_warmth(models, 150, BIG, 0)
    assert plan.warm == ["hot"] and plan.drop == ["/cold"] and "cold" in plan.held


def test_nothing_is_dropped_while_there_is_room() -> None:
    models = [m("a", priority=0), m("spare", resident=100, ours=True)]
    assert plan_warmth(models, 1000, BIG, 0).drop == []


def test_under_pressure_our_files_go_even_with_nothing_to_warm() -> None:
    models = [m("a", resident=100, ours=True, used=2.0), m("b", resident=100, ours=True, used=1.0)]
    plan = plan_warmth(models, BIG, 1150, 1000)
    assert plan.drop == ["/b"] and plan.evict == ["b"]


def test_partially_resident_files_count_their_resident_bytes() -> None:
    models = [m("a", priority=0), m("half", resident=50)]
    assert plan_warmth(models, 150, BIG, 0).warm == ["a"]
    assert plan_warmth(models, 149, BIG, 0).warm == []


def test_equal_priority_prefers_recent_use() -> None:
    plan = plan_warmth([m("a", priority=0, used=1.0), m("b", priority=0, used=2.0)], 100, BIG, 0)
    assert plan.warm == ["b"]


# -- priorities ------------------------------------------------------------------------------------

def test_rank_preload_first_then_recent_use_then_count() -> None:
    usage = {"x": Usage(10, 5.0), "y": Usage(50, 1.0), "z": Usage(1, 0.5), "gone": Usage(99, 9.0)}
    ranks = rank_models(["p2", "p1", "x", "y", "z", "phase", "idle"], preload=["p1", "p2"],
                        phase_models=["phase"], usage=usage, session={"z": 7.0}, top_n=2)
    assert sorted(ranks, key=ranks.__getitem__) == ["p1", "p2", "z", "x", "y", "phase"]


def test_rank_top_n_by_count_only() -> None:
    usage = {"a": Usage(5, 1.0), "b": Usage(9, 2.0), "c": Usage(1, 3.0)}
    assert set(rank_models("abc", usage=usage, top_n=2)) == {"a", "b"}
    assert rank_models("abc", usage=usage, top_n=0) == {}


def test_rank_leaves_out_unwanted() -> None:
    assert rank_models(["a", "b"], preload=["a", "b"], unwanted={"a"}) == {"b": 0}


# -- configuration and state -----------------------------------------------------------------------

@pytest.mark.parametrize(("value", "total", "expected"), [
    ("50%", 24 * GiB, 12 * GiB), ("8GiB", 24 * GiB, 8 * GiB), (1000, 1, 1000), ("12.5%", 800, 100),
])
def test_memory_amounts(value: object, total: int, expected: int) -> None:
    assert MemoryAmount.parse(value).of(total) == expected


@pytest.mark.parametrize("value", ["150%", "-5%", "lots", -1, "x%"])
def test_bad_memory_amounts(value: object) -> None:
    with pytest.raises(ValueError):
        MemoryAmount.parse(value)


def test_state_file_round_trip(tmp_path: Path) -> None:
    state = UsageState(tmp_path / "state" / "usage.json")
    state.record("a", 10.0)
    state.record("a", 20.0)
    state.warmed.add("/w.gguf")
    state.save()
    loaded = UsageState.load(tmp_path / "state" / "usage.json")
    assert loaded.models == {"a": Usage(2, 20.0)} and loaded.warmed == {"/w.gguf"} and not state.dirty


def test_missing_or_corrupt_state_file_is_empty(tmp_path: Path) -> None:
    assert UsageState.load(tmp_path / "none.json").models == {}
    (tmp_path / "bad.json").write_text("{oops")
    assert UsageState.load(tmp_path / "bad.json").models == {}


# -- the service on real files ---------------------------------------------------------------------

BLOCK = os.urandom(4 * MiB)


def cold_file(path: Path, size: int = 16 * MiB) -> Path:
    with open(path, "wb") as f:
        for offset in range(0, size, len(BLOCK)):
            f.write(BLOCK[:min(len(BLOCK), size - offset)])
        f.flush()
        os.fsync(f.fileno())
    pagecache.drop(path)
    return path


@dataclass
class FakeMemory:
    """psutil's (total, available), as the test says."""

    total: int = 64 * GiB
    available: int = 32 * GiB

    def __call__(self) -> tuple[int, int]:
        return self.total, self.available


class Loaded:
    """The scheduler's view of which models a backend holds."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def __call__(self) -> set[str]:
        return self.names


TierFactory = Callable[..., RamTier]


@pytest.fixture
def make_tier(tmp_path: Path) -> Iterator[TierFactory]:
    """RamTier over models named by their files (one 16 MiB file each unless given), cold at start."""
    made: list[RamTier] = []

    def factory(models: dict[str, list[Path]] | list[str], *, memory: FakeMemory | None = None,
                loaded: Loaded | None = None, preload: tuple[str, ...] = (), **settings: Any) -> RamTier:
        if isinstance(models, list):
            models = {name: [cold_file(tmp_path / f"{name}.gguf")] for name in models}
        defaults = {"rate": 0, "state_file": str(tmp_path / "usage.json"), "budget": MemoryAmount(BIG),
                    "reserve": MemoryAmount(0)}
        cfg = RamTierConfig(**{**defaults, **settings})
        weights = {n: WeightFiles(tuple(p.resolve() for p in ps)) for n, ps in models.items()}
        clock = itertools.count(1000.0)
        tier = RamTier(cfg, weights, preload=preload, in_backend=loaded or Loaded(),
                       memory=memory or FakeMemory(), clock=lambda: float(next(clock)))
        made.append(tier)
        return tier

    yield factory
    for tier in made:
        for pin in tier.pins.values():
            pin.close()


def resident(path: Path) -> float:
    return pagecache.residency(path).fraction


async def test_source_is_measured_not_assumed(make_tier: TierFactory) -> None:
    tier = make_tier(["a"])
    assert tier.source_for("a") == "unknown"
    assert await tier.swap_source("a") == "disk"
    await tier.warm("a")
    assert await tier.swap_source("a") == "ram"
    assert (tier.counters.hits["a"], tier.counters.misses["a"]) == (1, 1)


async def test_warm_reads_the_model_into_ram(make_tier: TierFactory) -> None:
    tier = make_tier(["a"])
    seen: list[int] = []
    result = await tier.warm("a", progress=seen.append)
    path = tier.files_of("a")[0]
    assert result.bytes_warmed == 16 * MiB
    assert result.residency is not None and result.residency.fraction > 0.99
    assert resident(path) > 0.99 and seen[-1] == 16 * MiB
    assert tier.counters.warmed_bytes["a"] == 16 * MiB and str(path) in tier.state.warmed
    assert tier.source_for("a") == "ram"


async def test_warming_a_warm_model_reads_nothing(make_tier: TierFactory) -> None:
    tier = make_tier(["a"])
    await tier.warm("a")
    again = await tier.warm("a")
    assert again.bytes_warmed == 0 and again.held == "already in RAM"


async def test_prepare_warms_a_cold_model_ahead_of_its_swap_and_nothing_else(make_tier: TierFactory) -> None:
    # The pools' hook: a model the scheduler expects to load soon.
    tier = make_tier(["a"])
    tier.set_weights("remote", WeightFiles(reason="no weight files found"))
    assert await tier.prepare("a") == 16 * MiB and resident(tier.files_of("a")[0]) > 0.99
    assert await tier.prepare("a") == 0  # already in RAM
    assert await tier.prepare("remote") == 0  # no files: nothing to warm, and no error for the pool


async def test_a_model_without_files_has_no_ram_tier(make_tier: TierFactory) -> None:
    tier = make_tier([])
    tier.set_weights("remote", WeightFiles(reason="no manifest for library/x:latest under /m/manifests"))
    with pytest.raises(RamTierError, match="no manifest for library/x:latest"):
        await tier.warm("remote")
    with pytest.raises(RamTierError, match="not a configured model"):
        await tier.evict("nobody")
    await tier.tick()
    assert tier.source_for("remote") == "unknown" and await tier.swap_source("remote") == "unknown"
    assert tier.snapshot()["models"]["remote"]["reason"].startswith("no manifest")


async def test_evict_drops_what_we_warmed(make_tier: TierFactory) -> None:
    tier = make_tier(["a"])
    await tier.warm("a")
    assert await tier.evict("a") == 16 * MiB
    assert resident(tier.files_of("a")[0]) < 0.01
    assert tier.counters.evictions["a"] == 1 and tier.counters.evicted_bytes["a"] == 16 * MiB
    assert str(tier.files_of("a")[0]) not in tier.state.warmed


async def test_evict_leaves_files_someone_else_warmed(make_tier: TierFactory) -> None:
    tier = make_tier(["a"])
    pagecache.warm_read(tier.files_of("a")[0])  # as a backend loading it would
    assert await tier.evict("a") == 0
    assert resident(tier.files_of("a")[0]) > 0.99


async def test_evict_spares_a_file_a_loaded_model_uses(tmp_path: Path, make_tier: TierFactory) -> None:
    shared = cold_file(tmp_path / "shared.gguf")
    loaded = Loaded()
    tier = make_tier({"a": [shared], "b": [shared]}, loaded=loaded)
    await tier.warm("a")
    loaded.names.add("b")
    assert await tier.evict("a") == 0
    assert resident(shared) > 0.99


async def test_an_evicted_model_stays_cold_until_used(make_tier: TierFactory) -> None:
    tier = make_tier(["a"], preload=("a",))
    await tier.tick()
    await tier.wait_idle()
    await tier.evict("a")
    await tier.tick()
    await tier.wait_idle()
    assert resident(tier.files_of("a")[0]) < 0.01
    assert tier.snapshot()["models"]["a"]["reason"] == "evicted on request; warmed again once used"
    tier.record_use("a")
    await tier.tick()
    await tier.wait_idle()
    assert resident(tier.files_of("a")[0]) > 0.99


async def test_tick_fills_the_budget_in_priority_order(make_tier: TierFactory) -> None:
    tier = make_tier(["a", "b", "c"], preload=("c", "a", "b"), budget=MemoryAmount(40 * MiB))
    plan = await tier.tick()
    await tier.wait_idle()
    assert plan.warm == ["c", "a"] and "budget" in plan.held["b"]
    assert [tier.source_for(n) for n in "abc"] == ["ram", "disk", "ram"]
    assert tier.snapshot()["models"]["b"]["reason"].startswith("no room")


async def test_tick_keeps_the_reserve(make_tier: TierFactory) -> None:
    memory = FakeMemory(available=1 * GiB + 20 * MiB)
    tier = make_tier(["a", "b"], preload=("a", "b"), memory=memory, reserve=MemoryAmount(1 * GiB))
    plan = await tier.tick()
    await tier.wait_idle()
    assert plan.warm == ["a"] and plan.room == 20 * MiB
    assert [tier.source_for(n) for n in "ab"] == ["ram", "disk"]


async def test_reserve_as_a_percentage(make_tier: TierFactory) -> None:
    memory = FakeMemory(total=1000 * MiB, available=120 * MiB)
    tier = make_tier(["a", "b"], preload=("a", "b"), memory=memory, reserve=MemoryAmount(percent=10))
    assert (await tier.tick()).warm == ["a"]  # room: 120 - 100 MiB
    await tier.wait_idle()


async def test_warming_stops_when_available_memory_reaches_the_reserve(make_tier: TierFactory) -> None:
    memory = FakeMemory(available=2 * GiB)
    tier = make_tier(["a"], memory=memory, reserve=MemoryAmount(1 * GiB))

    def squeeze(done: int) -> None:  # another process takes the memory while we read
        if done >= 4 * MiB:
            memory.available = 1 * GiB

    result = await tier.warm("a", progress=squeeze)
    assert 4 * MiB <= result.bytes_warmed < 16 * MiB
    assert resident(tier.files_of("a")[0]) < 0.9


async def test_least_recently_used_goes_out_first(make_tier: TierFactory) -> None:
    tier = make_tier(["a", "b", "c"], budget=MemoryAmount(40 * MiB))
    tier.record_use("a")
    tier.record_use("b")
    await tier.tick()
    await tier.wait_idle()
    assert [tier.source_for(n) for n in "abc"] == ["ram", "ram", "disk"]
    tier.record_use("c")
    plan = await tier.tick()
    await tier.wait_idle()
    assert plan.evict == ["a"] and plan.warm == ["c"]
    assert [tier.source_for(n) for n in "abc"] == ["disk", "ram", "ram"]
    assert tier.counters.evictions["a"] == 1


async def test_what_the_kernel_evicts_is_warmed_again(make_tier: TierFactory) -> None:
    tier = make_tier(["a"], preload=("a",))
    await tier.tick()
    await tier.wait_idle()
    pagecache.drop(tier.files_of("a")[0])  # memory pressure, as far as the tier can tell
    await tier.tick()
    await tier.wait_idle()
    assert tier.source_for("a") == "ram" and resident(tier.files_of("a")[0]) > 0.99
    assert tier.counters.warmed_bytes["a"] == 32 * MiB and tier.counters.evictions["a"] == 0


async def test_the_most_used_models_are_warmed_at_start(tmp_path: Path, make_tier: TierFactory) -> None:
    (tmp_path / "usage.json").write_text(json.dumps({"models": {
        "a": {"count": 5, "last_used": 1.0}, "b": {"count": 9, "last_used": 2.0},
        "c": {"count": 1, "last_used": 3.0}}}))
    tier = make_tier(["a", "b", "c"], top_n=2)
    await tier.start()
    await tier.wait_idle()
    assert [tier.source_for(n) for n in "abc"] == ["ram", "ram", "disk"]
    tier.record_use("c")
    await tier.close()
    saved = json.loads((tmp_path / "usage.json").read_text())
    assert saved["models"]["c"]["count"] == 2
    assert saved["warmed"] == sorted(str(tier.files_of(n)[0]) for n in "ab")


async def test_disabled_tier_does_nothing(make_tier: TierFactory) -> None:
    tier = make_tier(["a"], enabled=False, preload=("a",))
    await tier.start()
    assert tier.snapshot() == {"enabled": False}
    assert resident(tier.files_of("a")[0]) < 0.01


async def test_madvise_strategy(make_tier: TierFactory) -> None:
    tier = make_tier(["a"], strategy="madvise")
    result = await tier.warm("a")
    assert result.bytes_warmed == 16 * MiB
    for _ in range(200):
        if await tier.swap_source("a") == "ram":
            break
        await asyncio.sleep(0.02)
    assert tier.source_for("a") == "ram"


async def test_mlock_strategy_pins_until_evicted(tmp_path: Path, make_tier: TierFactory) -> None:
    tier = make_tier({"a": [cold_file(tmp_path / "a.gguf", 2 * MiB)]}, strategy="mlock")
    await tier.warm("a")
    path = tier.files_of("a")[0]
    assert path in tier.pins and resident(path) == 1.0
    pagecache.drop(path)
    assert resident(path) == 1.0  # pinned
    assert tier.snapshot()["pinned_bytes"] == 2 * MiB
    await tier.evict("a")
    assert tier.pins == {} and resident(path) < 0.01


async def test_a_vanished_file_is_reported_not_fatal(make_tier: TierFactory) -> None:
    tier = make_tier(["a", "b"], preload=("a", "b"))
    tier.files_of("a")[0].unlink()
    plan = await tier.tick()
    await tier.wait_idle()
    assert plan.warm == ["b"] and tier.source_for("a") == "unknown"
    assert "No such file" in tier.snapshot()["models"]["a"]["reason"]


async def test_snapshot_for_the_status_api(make_tier: TierFactory) -> None:
    tier = make_tier(["a"], preload=("a",), budget=MemoryAmount(percent=50))
    await tier.tick()
    await tier.wait_idle()
    await tier.measure()
    snap = tier.snapshot()
    assert snap["budget_bytes"] == 32 * GiB and snap["memory"] == {"total": 64 * GiB, "available": 32 * GiB}
    assert snap["last_scan"]["files"] == 1 and snap["last_scan"]["bytes"] == 16 * MiB
    assert snap["counters"]["warmed_bytes"] == 16 * MiB
    model = snap["models"]["a"]
    assert (model["tier"], model["source"], model["rank"], model["percent"]) == ("warm", "ram", 0, 100.0)
    assert model["reason"] is None
    assert model["files"][0]["warmed_by_us"] is True
    assert "warm=['a']" in repr(tier)


async def test_files_warmed_before_a_restart_are_still_ours(make_tier: TierFactory) -> None:
    first = make_tier(["a"])
    await first.warm("a")
    await first.close()
    second = make_tier({"a": list(first.files_of("a"))})
    assert await second.evict("a") == 16 * MiB


async def test_slow_scans_stretch_the_interval(make_tier: TierFactory) -> None:
    tier = make_tier(["a"], interval=5.0)
    assert tier.next_interval() == 5.0
    tier.last_scan = (0.0, 0.5)  # half a second per scan: at most 2% of a core means every 25 s
    assert tier.next_interval() == pytest.approx(25.0)


async def test_tick_of_a_disabled_tier_does_nothing(make_tier: TierFactory) -> None:
    tier = make_tier(["a"], enabled=False, preload=("a",))
    plan = await tier.tick()
    assert plan.warm == [] and tier.residency == {}


async def test_the_timer_rewarms_without_being_asked(make_tier: TierFactory) -> None:
    tier = make_tier(["a"], preload=("a",), interval=0.05)
    await tier.start()
    try:
        await tier.wait_idle()
        pagecache.drop(tier.files_of("a")[0])
        for _ in range(200):
            await asyncio.sleep(0.05)
            await tier.wait_idle()
            if resident(tier.files_of("a")[0]) > 0.99:
                break
        assert resident(tier.files_of("a")[0]) > 0.99
    finally:
        await tier.close()
