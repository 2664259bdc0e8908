"""The RAM tier: which models' weight files stay warm in the page cache, within a memory budget.

Two halves, as in scheduling's policy and pool:

- `plan_warmth(models, budget, available, reserve)` (plan.py) is the pure decision. All weight bytes in RAM count
  (whoever read them in), and they may not exceed the room: `min(budget, available - reserve)`.
  `available` is the kernel's MemAvailable, which counts clean page cache as available, so warming
  does not lower it: the room is what the weights may hold in total, not what is left to add. Rules:
  wanted models are kept in priority order (a model too big for what is left is passed over, and
  smaller ones behind it still fit); files of models loaded in a backend are never dropped; only files
  warmpool warmed are ever dropped, least recently used first, and only as many as the room requires.
- `RamTier` carries plans out: measures residency in a thread, warms with the configured strategy
  (paced reads in a thread; madvise; mlock), drops with POSIX_FADV_DONTNEED, re-plans on a timer so
  that what the kernel evicted under pressure is warmed again when memory allows, and stops any warming
  the moment the room is used up. It keeps hit/miss/warm/evict counters and a small JSON state file
  (usage counts, and which files it warmed) so that the most used models are warmed at the next start.

Priority ("most likely needed next"): the preload list in order, then the rest by most recent use, then
by usage count. Wanted are: preload models, phase-map models, the `top_n` most used (from the state
file), every model used or explicitly warmed since start, minus those explicitly evicted since.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from warmpool.config import MemoryAmount, RamTierConfig
from warmpool.ramtier import pagecache
from warmpool.ramtier.pagecache import MlockPin, PageCacheError, Residency
from warmpool.ramtier.plan import FileWarmth, ModelWarmth, WarmthPlan, plan_warmth
from warmpool.ramtier.usage import Usage, UsageState, default_state_file, rank_models
from warmpool.ramtier.weights import WeightFiles

__all__ = [
    "FileWarmth", "MemoryAmount", "ModelWarmth", "RamTier", "RamTierConfig", "RamTierError", "TierCounters",
    "Usage", "UsageState", "WarmResult", "WarmthPlan", "default_state_file", "plan_warmth", "rank_models",
    "system_memory",
]

log = logging.getLogger("warmpool.ramtier")
MAX_SCAN_SHARE = 0.02  # the timer stretches its interval so that scans take at most this share of a core
MemoryProbe = Callable[[], tuple[int, int]]  # () -> (total bytes, available bytes)


# -- configuration ---------------------------------------------------------------------------------

def system_memory() -> tuple[int, int]:
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.total), int(vm.available)


# -- counters --------------------------------------------------------------------------------------

@dataclass(slots=True)
class TierCounters:
    """Per-model counters, for Prometheus (labels = model names) and the status API (totals)."""

    hits: Counter[str] = field(default_factory=Counter)  # swaps that started from RAM
    misses: Counter[str] = field(default_factory=Counter)  # swaps that started from disk
    warmed_bytes: Counter[str] = field(default_factory=Counter)
    evictions: Counter[str] = field(default_factory=Counter)  # times a model's files were dropped
    evicted_bytes: Counter[str] = field(default_factory=Counter)
    warm_errors: Counter[str] = field(default_factory=Counter)

    def totals(self) -> dict[str, int]:
        return {f.name: sum(getattr(self, f.name).values()) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class WarmResult:
    name: str
    bytes_warmed: int
    residency: Residency | None  # after warming (madvise: the kernel may still be reading)
    held: str | None = None  # why nothing was warmed, when the plan left the model out


class RamTierError(Exception):
    """A RAM-tier operation asked for a model the tier cannot act on."""


# -- the service -----------------------------------------------------------------------------------

class RamTier:
    """Measures, warms and drops weight files per `plan_warmth`; see the module docstring."""

    def __init__(self, cfg: RamTierConfig, weights: Mapping[str, WeightFiles], *,
                 preload: Sequence[str] = (), phases: Mapping[str, str] | None = None,
                 in_backend: Callable[[], Collection[str]] = frozenset,
                 memory: MemoryProbe = system_memory, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.weights = dict(weights)
        self.preload = tuple(preload)
        self.phase_models = tuple(dict.fromkeys((phases or {}).values()))
        self.in_backend = in_backend
        self.memory = memory
        self.clock = clock
        self.state = UsageState.load(Path(cfg.state_file).expanduser() if cfg.state_file
                                     else default_state_file())
        self.residency: dict[Path, Residency] = {}
        self.file_errors: dict[Path, str] = {}
        self.counters = TierCounters()
        self.pins: dict[Path, MlockPin] = {}
        self.session: dict[str, float] = {}  # models used or warmed since start -> when
        self.unwanted: set[str] = set()  # explicitly evicted, until used again
        self.last_plan: WarmthPlan | None = None
        self.last_scan: tuple[float, float] | None = None  # (wall clock, seconds it took)
        self.warming: str | None = None
        self.tracked_bytes = 0  # weight bytes in RAM: measured, then kept current while warming
        self._stopping = threading.Event()
        self._lock = asyncio.Lock()  # one warm or drop at a time: sequential reads are what disks like
        self._loop_task: asyncio.Task[None] | None = None
        self._warm_task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        warm = [n for n in self.weights if self.source_for(n) == "ram"]
        return (f"<RamTier {self.cfg.strategy} warm={warm} warming={self.warming} "
                f"tracked={self.tracked_bytes}>")

    # -- files -------------------------------------------------------------------------------------

    def files_of(self, name: str) -> tuple[Path, ...]:
        found = self.weights.get(name)
        return found.paths if found is not None else ()

    def all_files(self) -> list[Path]:
        return list(dict.fromkeys(p for wf in self.weights.values() for p in wf.paths))

    def set_weights(self, name: str, weights: WeightFiles) -> None:
        """Replace a model's files (say, once /api/show has named them)."""
        self.weights[name] = weights

    def model_residency(self, name: str) -> Residency | None:
        """The model's files in RAM at the last measurement; None if not found or not measured."""
        paths = self.files_of(name)
        if not paths or any(p not in self.residency for p in paths):
            return None
        return sum((self.residency[p] for p in paths), Residency(0, 0))

    # -- measuring ---------------------------------------------------------------------------------

    async def measure(self, paths: Iterable[Path] | None = None) -> dict[Path, Residency]:
        """Re-measure the given files (default: all), in a thread."""
        targets = list(paths) if paths is not None else self.all_files()
        started, wall = time.perf_counter(), self.clock()
        results = await asyncio.to_thread(_measure_files, targets)
        if paths is None:
            self.last_scan = (wall, time.perf_counter() - started)
        self._store(results)
        self.tracked_bytes = sum(r.bytes_resident for r in self.residency.values())
        return {p: r for p, r in results.items() if isinstance(r, Residency)}

    def _store(self, results: Mapping[Path, Residency | str]) -> None:
        for path, result in results.items():
            if isinstance(result, Residency):
                self.residency[path] = result
                self.file_errors.pop(path, None)
            else:
                self.residency.pop(path, None)
                self.file_errors[path] = result

    def source_for(self, name: str) -> str:
        """"ram" when at least `min_warm_fraction` of the model's files was resident at the last
        measurement, "disk" when less, "unknown" without files or a measurement."""
        measured = self.model_residency(name)
        if measured is None:
            return "unknown"
        return "ram" if measured.fraction >= self.cfg.min_warm_fraction else "disk"

    async def swap_source(self, name: str) -> str:
        """The source tier of a swap starting now: measured afresh, and counted as a hit or a miss."""
        if self.files_of(name):
            await self.measure(self.files_of(name))
        source = self.source_for(name)
        if source != "unknown":
            (self.counters.hits if source == "ram" else self.counters.misses)[name] += 1
        return source

    # -- usage -------------------------------------------------------------------------------------

    def record_use(self, name: str) -> None:
        """A request used the model: it counts for priority now and at the next start."""
        now = self.clock()
        self.state.record(name, now)
        self.session[name] = now
        self.unwanted.discard(name)

    def ranks(self) -> dict[str, int]:
        return rank_models(self.weights, preload=self.preload, phase_models=self.phase_models,
                           usage=self.state.models, session=self.session, top_n=self.cfg.top_n,
                           unwanted=self.unwanted)

    # -- planning ----------------------------------------------------------------------------------

    def plan(self) -> WarmthPlan:
        """The plan for the last measurement and the memory numbers now."""
        total, available = self.memory()
        budget = self.cfg.budget.of(total)
        plan = plan_warmth(self.warmth(), budget, available + self._pinned_bytes(),
                           self.cfg.reserve.of(total))
        self.last_plan = plan
        return plan

    def warmth(self) -> list[ModelWarmth]:
        ranks, loaded = self.ranks(), set(self.in_backend())
        found = [n for n, wf in self.weights.items() if wf.found and self.model_residency(n) is not None]
        return [ModelWarmth(n, self._file_warmth(n), ranks.get(n), n in loaded, self._last_used(n))
                for n in found]

    def _file_warmth(self, name: str) -> tuple[FileWarmth, ...]:
        return tuple(FileWarmth(str(p), self.residency[p].bytes_total, self.residency[p].bytes_resident,
                                str(p) in self.state.warmed) for p in self.files_of(name))

    def _last_used(self, name: str) -> float:
        saved = self.state.models.get(name)
        return max(self.session.get(name, 0.0), saved.last_used if saved else 0.0)

    def _pinned_bytes(self) -> int:
        # Locked pages are not reclaimable, so MemAvailable leaves them out; the room counts them in.
        return sum(pin.size for pin in self.pins.values())

    def _has_room(self) -> bool:
        """Whether warming may go on: the weights in RAM are still under the room."""
        total, available = self.memory()
        if available <= self.cfg.reserve.of(total):
            return False
        room = min(self.cfg.budget.of(total), available + self._pinned_bytes() - self.cfg.reserve.of(total))
        return self.tracked_bytes < room

    # -- the timer ---------------------------------------------------------------------------------

    async def tick(self) -> WarmthPlan:
        """Re-measure, drop what the plan drops, start warming what it warms (in the background)."""
        if not self.cfg.enabled:
            return WarmthPlan(room=0)
        await self.measure()
        plan = self.plan()
        await self._drop_files(plan.drop, plan.evict)
        if plan.warm and (self._warm_task is None or self._warm_task.done()):
            self._warm_task = asyncio.create_task(self._warm_in_order(plan.warm), name="ramtier-warm")
        if self.state.dirty:
            await asyncio.to_thread(self.state.save)
        return plan

    async def start(self) -> None:
        """Forget warmed files no longer configured, plan once (warming the top models), then re-plan on
        a timer."""
        if not self.cfg.enabled or self._loop_task is not None:
            return
        self.state.warmed &= {str(p) for p in self.all_files()}
        await self.tick()
        self._loop_task = asyncio.create_task(self._run(), name="ramtier")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.next_interval())
            try:
                await self.tick()
            except Exception:  # the timer must outlive one bad round
                log.exception("RAM tier round failed")

    def next_interval(self) -> float:
        """The configured interval, stretched when scans are slow (a scan costs ~3-12 ms per GiB resident)."""
        scan = self.last_scan[1] if self.last_scan else 0.0
        return max(self.cfg.interval, scan / MAX_SCAN_SHARE)

    async def close(self) -> None:
        """Stop the timer and any warming, unpin, and save the state file."""
        self._stopping.set()
        for task in (self._loop_task, self._warm_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for pin in self.pins.values():
            pin.close()
        self.pins.clear()
        if self.cfg.enabled:
            self.state.save()

    async def wait_idle(self) -> None:
        """Wait for background warming to finish (tests, benchmarks, admin)."""
        if self._warm_task is not None:
            await asyncio.shield(self._warm_task)

    # -- warming -----------------------------------------------------------------------------------

    async def warm(self, name: str, progress: Callable[[int], None] | None = None) -> WarmResult:
        """Treat `name` as just used and warm it now, dropping colder files first if the room needs it."""
        if not self.files_of(name):
            raise RamTierError(f"model {name!r} has no RAM tier: {self._why_no_files(name)}")
        self.session[name] = self.clock()
        self.unwanted.discard(name)
        await self.measure()
        plan = self.plan()
        await self._drop_files(plan.drop, plan.evict)
        if name not in plan.warm:
            return WarmResult(name, 0, self.model_residency(name), self._not_warming(name, plan))
        warmed = await self._warm_model(name, progress)
        return WarmResult(name, warmed, self.model_residency(name))

    async def prepare(self, name: str) -> int:
        """The scheduler expects to load `name` soon (the pools' hook): warm its files unless they are in
        RAM already. Returns the bytes read in; 0 for a model without files or already warm."""
        if not self.cfg.enabled or not self.files_of(name):
            return 0
        await self.measure(self.files_of(name))
        if self.source_for(name) == "ram":
            return 0
        return (await self.warm(name)).bytes_warmed

    def _not_warming(self, name: str, plan: WarmthPlan) -> str:
        if name in plan.held:
            return plan.held[name]
        if name in self.in_backend():
            return "loaded in a backend"
        return "already in RAM" if name in plan.keep else "cannot be measured"

    def _why_no_files(self, name: str) -> str:
        found = self.weights.get(name)
        if found is None:
            return "not a configured model"
        return found.reason or "no weight files"

    async def _warm_in_order(self, names: list[str]) -> None:
        for name in names:
            if self._stopping.is_set() or not self._has_room():
                return
            if self.last_plan is not None and name not in self.last_plan.warm:
                continue  # a newer plan no longer wants it
            await self._warm_model(name, None)

    async def _warm_model(self, name: str, progress: Callable[[int], None] | None) -> int:
        async with self._lock:
            self.warming = name
            try:
                warmed = await self._warm_files(name, progress)
            finally:
                self.warming = None
        await self.measure(self.files_of(name))
        return warmed

    async def _warm_files(self, name: str, progress: Callable[[int], None] | None) -> int:
        warmed = 0
        for path in self.files_of(name):
            if self._stopping.is_set() or not self._has_room():
                break
            try:
                warmed += await self._warm_file(path, _offset(progress, warmed))
            except PageCacheError as exc:
                self.counters.warm_errors[name] += 1
                self.file_errors[path] = str(exc)
                log.warning("warming %s failed: %s", name, exc)
                break
        self.counters.warmed_bytes[name] += warmed
        return warmed

    async def _warm_file(self, path: Path, progress: Callable[[int], None]) -> int:
        """Warm one file with the configured strategy; returns the bytes it brought in."""
        self.state.warmed.add(str(path))
        self.state.dirty = True
        missing = self._missing_bytes(path)
        if self.cfg.strategy == "mlock":
            return await self._pin(path, missing)
        if self.cfg.strategy == "madvise":
            await asyncio.to_thread(pagecache.warm_madvise, path, should_stop=self._should_stop)
            self.tracked_bytes += missing
            return missing
        return await asyncio.to_thread(pagecache.warm_read, path, rate_bytes_per_s=self.cfg.rate,
                                       should_stop=self._should_stop, progress=self._counting(progress))

    def _missing_bytes(self, path: Path) -> int:
        measured = self.residency.get(path)
        return measured.bytes_total - measured.bytes_resident if measured else 0

    async def _pin(self, path: Path, missing: int) -> int:
        if path not in self.pins:
            self.pins[path] = await asyncio.to_thread(MlockPin, path)
            self.tracked_bytes += missing
        return missing

    def _counting(self, progress: Callable[[int], None]) -> Callable[[int], None]:
        """A progress callback (called from the warming thread) that also keeps `tracked_bytes` current."""
        seen = [0]

        def report(done: int) -> None:
            self.tracked_bytes += done - seen[0]
            seen[0] = done
            progress(done)
        return report

    def _should_stop(self) -> bool:
        return self._stopping.is_set() or not self._has_room()

    # -- dropping ----------------------------------------------------------------------------------

    async def evict(self, name: str) -> int:
        """Drop the model's files that warmpool warmed and no backend-loaded model uses; it stays unwanted
        until it is used again. Returns the resident bytes dropped."""
        if not self.files_of(name):
            raise RamTierError(f"model {name!r} has no RAM tier: {self._why_no_files(name)}")
        self.unwanted.add(name)
        self.session.pop(name, None)
        await self.measure(self.files_of(name))
        paths = [str(p) for p in self.files_of(name) if self._ours_and_free(p)]
        return await self._drop_files(paths, [name])

    def why_kept(self, name: str) -> str | None:
        """Why `evict` would leave some of the model's files in the page cache, in words; None when it
        would drop them all."""
        loaded = set(self.in_backend())
        reasons = []
        for path in self.files_of(name):
            users = sorted(m for m in loaded if path in self.files_of(m))
            if users:
                reasons.append(f"loaded in its backend ({', '.join(users)}): a running server maps {path.name}")
            elif self.warming and path in self.files_of(self.warming):
                reasons.append(f"{path.name} is being warmed right now")
            elif str(path) not in self.state.warmed:
                reasons.append(f"warmpool did not warm {path.name} (it only drops what it read in itself)")
        return "; ".join(dict.fromkeys(reasons)) or None

    def _ours_and_free(self, path: Path) -> bool:
        loaded = set(self.in_backend())
        used_by_loaded = any(path in self.files_of(m) for m in loaded)
        return str(path) in self.state.warmed and not used_by_loaded

    async def _drop_files(self, paths: Iterable[str], models: Iterable[str]) -> int:
        busy = self.files_of(self.warming) if self.warming else ()  # never drop what is being read in
        targets = [Path(p) for p in paths if Path(p) not in busy]
        if not targets:
            return 0
        dropped = {p: self._drop_one(p) for p in targets}
        await self.measure(targets)
        for name in models:
            self.counters.evictions[name] += 1
            self.counters.evicted_bytes[name] += sum(dropped.get(p, 0) for p in self.files_of(name))
        return sum(dropped.values())

    def _drop_one(self, path: Path) -> int:
        pin = self.pins.pop(path, None)
        if pin is not None:
            pin.close()
        resident = self.residency.get(path, Residency(0, 0)).bytes_resident
        try:
            pagecache.drop(path)
        except PageCacheError as exc:
            self.file_errors[path] = str(exc)
            return 0
        self.state.warmed.discard(str(path))
        self.state.dirty = True
        return resident

    # -- status ------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything the status API shows about the RAM tier."""
        if not self.cfg.enabled:
            return {"enabled": False}
        total, available = self.memory()
        ranks = self.ranks()
        return {
            "enabled": True, "strategy": self.cfg.strategy,
            "budget_bytes": self.cfg.budget.of(total), "reserve_bytes": self.cfg.reserve.of(total),
            "room_bytes": self.last_plan.room if self.last_plan else None,
            "memory": {"total": total, "available": available},
            "tracked_resident_bytes": self.tracked_bytes, "pinned_bytes": self._pinned_bytes(),
            "warming": self.warming, "last_scan": self._scan_status(), "counters": self.counters.totals(),
            "models": {name: self._model_status(name, ranks) for name in self.weights},
        }

    def _scan_status(self) -> dict[str, Any] | None:
        if self.last_scan is None:
            return None
        return {"at": self.last_scan[0], "seconds": round(self.last_scan[1], 4), "files": len(self.residency),
                "bytes": sum(r.bytes_total for r in self.residency.values())}

    def _model_status(self, name: str, ranks: Mapping[str, int]) -> dict[str, Any]:
        measured = self.model_residency(name)
        status: dict[str, Any] = {
            "tier": self._tier(name), "source": self.source_for(name), "rank": ranks.get(name),
            "files": [self._file_status(p) for p in self.files_of(name)],
            "bytes_total": measured.bytes_total if measured else None,
            "bytes_resident": measured.bytes_resident if measured else None,
            "percent": round(measured.percent, 1) if measured else None,
        }
        status["reason"] = self._reason(name)
        return status

    def _tier(self, name: str) -> str:
        """DESIGN.md's tiers: resident (loaded in a backend), warm, cold; unknown without a measurement."""
        if name in self.in_backend():
            return "resident"
        return {"ram": "warm", "disk": "cold"}.get(self.source_for(name), "unknown")

    def _file_status(self, path: Path) -> dict[str, Any]:
        measured = self.residency.get(path)
        return {"path": str(path), "size": measured.bytes_total if measured else None,
                "resident": measured.bytes_resident if measured else None,
                "warmed_by_us": str(path) in self.state.warmed, "error": self.file_errors.get(path)}

    def _reason(self, name: str) -> str | None:
        """Why the model is not warm, when there is a reason worth showing."""
        if not self.files_of(name):
            return self._why_no_files(name)
        errors = [self.file_errors[p] for p in self.files_of(name) if p in self.file_errors]
        if errors:
            return errors[0]
        if name in self.unwanted:
            return "evicted on request; warmed again once used"
        return self.last_plan.held.get(name) if self.last_plan else None


def _offset(progress: Callable[[int], None] | None, base: int) -> Callable[[int], None]:
    """A per-file progress callback that reports the model's running total."""
    return (lambda done: progress(base + done)) if progress is not None else (lambda done: None)


def _measure_files(paths: Iterable[Path]) -> dict[Path, Residency | str]:
    """Residency of each file, or the error text for one that cannot be measured."""
    results: dict[Path, Residency | str] = {}
    for path in paths:
        try:
            results[path] = pagecache.residency(path)
        except PageCacheError as exc:
            results[path] = str(exc)
    return results
