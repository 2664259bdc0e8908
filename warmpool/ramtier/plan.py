"""The RAM tier's pure decision: which models' weight files to warm and which files to drop, within the room
`min(budget, available - reserve)`. See warmpool/ramtier/tier.py's docstring for the rules."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class FileWarmth:
    path: str
    size: int
    resident: int
    warmed_by_us: bool = False


@dataclass(frozen=True, slots=True)
class ModelWarmth:
    name: str
    files: tuple[FileWarmth, ...]
    priority: int | None = None  # 0 is wanted most; None: not wanted warm
    in_backend: bool = False  # loaded in a backend: its files are never dropped
    last_used: float = 0.0

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def resident(self) -> int:
        return sum(f.resident for f in self.files)


@dataclass(slots=True)
class WarmthPlan:
    room: int  # bytes of weights RAM may hold: min(budget, available - reserve)
    warm: list[str] = field(default_factory=list)  # models to warm, most wanted first
    evict: list[str] = field(default_factory=list)  # models whose files are dropped, LRU first
    drop: list[str] = field(default_factory=list)  # the files to drop, in order
    keep: list[str] = field(default_factory=list)  # every wanted model that fits, most wanted first
    held: dict[str, str] = field(default_factory=dict)  # wanted models left out, and why


def plan_warmth(models: Sequence[ModelWarmth], budget_bytes: int, available_bytes: int,
                reserve_bytes: int) -> WarmthPlan:
    """Which models to warm and which files to drop. See the module docstring for the rules."""
    room = max(0, min(budget_bytes, available_bytes - reserve_bytes))
    plan = WarmthPlan(room=room)
    files = {f.path: f for m in models for f in m.files}
    protected = {f.path for m in models if m.in_backend for f in m.files}
    kept: set[str] = set()
    for model in _wanted(models):
        _admit(model, files, protected, kept, plan, budget_bytes)
    _plan_drops(models, files, protected, kept, plan)
    plan.warm = [name for name in plan.keep if _needs_warming(_by_name(models, name), kept)]
    return plan


def _wanted(models: Sequence[ModelWarmth]) -> list[ModelWarmth]:
    chosen = [m for m in models if m.priority is not None and not m.in_backend and m.files]
    return sorted(chosen, key=lambda m: (m.priority, -m.last_used, m.name))


def _by_name(models: Sequence[ModelWarmth], name: str) -> ModelWarmth:
    return next(m for m in models if m.name == name)


def _droppable(f: FileWarmth, protected: set[str], kept: set[str]) -> bool:
    return f.warmed_by_us and f.resident > 0 and f.path not in protected and f.path not in kept


def _committed(files: Mapping[str, FileWarmth], protected: set[str], kept: set[str]) -> int:
    """Bytes in RAM once the kept files are fully warm, before any drop: droppable files don't count."""
    return sum(f.size if path in kept else f.resident
               for path, f in files.items() if not _droppable(f, protected, kept))


def _admit(model: ModelWarmth, files: Mapping[str, FileWarmth], protected: set[str], kept: set[str],
           plan: WarmthPlan, budget: int) -> None:
    trial = kept | {f.path for f in model.files}
    if _committed(files, protected, trial) <= plan.room:
        kept.update(trial)
        plan.keep.append(model.name)
    elif model.size > plan.room:
        plan.held[model.name] = f"needs {model.size} bytes, more than the RAM tier's room ({plan.room})"
    else:
        limit = "budget" if plan.room == budget else "available memory less the reserve"
        plan.held[model.name] = f"no room: more wanted models fill the {limit} ({plan.room} bytes)"


def _plan_drops(models: Sequence[ModelWarmth], files: Mapping[str, FileWarmth], protected: set[str],
                kept: set[str], plan: WarmthPlan) -> None:
    """Drop our least recently used files until everything fits the room."""
    droppable = [f for f in files.values() if _droppable(f, protected, kept)]
    total = _committed(files, protected, kept) + sum(f.resident for f in droppable)
    for f in sorted(droppable, key=lambda f: (_last_use(models, f.path), f.path)):
        if total <= plan.room:
            break
        plan.drop.append(f.path)
        total -= f.resident
        plan.evict.extend(m.name for m in models if _uses(m, f.path) and m.name not in plan.evict)


def _uses(model: ModelWarmth, path: str) -> bool:
    return any(f.path == path for f in model.files)


def _last_use(models: Sequence[ModelWarmth], path: str) -> float:
    return max((m.last_used for m in models if _uses(m, path)), default=0.0)


def _needs_warming(model: ModelWarmth, kept: set[str]) -> bool:
    return any(f.resident < f.size for f in model.files if f.path in kept)
