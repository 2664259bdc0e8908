"""What the RAM tier knows of use: per model a use count and the last use, saved in a small JSON state file
(with the files warmpool warmed), and the priority ranking it feeds ("most likely needed next")."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("warmpool.ramtier")


def default_state_file(env: Mapping[str, str] = os.environ) -> Path:
    state_home = env.get("XDG_STATE_HOME", "")
    base = Path(state_home) if os.path.isabs(state_home) else Path.home() / ".local" / "state"
    return base / "warmpool" / "usage.json"


@dataclass(slots=True)
class Usage:
    count: int = 0
    last_used: float = 0.0  # wall clock


def rank_models(names: Iterable[str], *, preload: Sequence[str] = (), phase_models: Iterable[str] = (),
                usage: Mapping[str, Usage] | None = None, session: Mapping[str, float] | None = None,
                top_n: int = 0, unwanted: Collection[str] = ()) -> dict[str, int]:
    """Rank (0 = most wanted) of each wanted model; models not in the result are not wanted warm."""
    usage, session = usage or {}, session or {}
    known = set(names)
    most_used = sorted((n for n in usage if n in known), key=lambda n: (-usage[n].count, n))[:top_n]
    wanted = (set(preload) | set(phase_models) | set(most_used) | set(session)) & known - set(unwanted)

    def key(name: str) -> tuple[int, float, int, str]:
        used = usage.get(name, Usage())
        first = preload.index(name) if name in preload else len(preload)
        return first, -max(used.last_used, session.get(name, 0.0)), -used.count, name

    return {name: rank for rank, name in enumerate(sorted(wanted, key=key))}


class UsageState:
    """The JSON state file: per model a use count and the last use, and the files warmpool warmed."""

    def __init__(self, path: Path, models: dict[str, Usage] | None = None,
                 warmed: set[str] | None = None) -> None:
        self.path = path
        self.models = models or {}
        self.warmed = warmed or set()
        self.dirty = False

    @classmethod
    def load(cls, path: Path) -> UsageState:
        """The saved state; an empty one when the file is missing or unreadable (it is only a hint)."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            models = {str(n): Usage(int(u.get("count", 0)), float(u.get("last_used", 0.0)))
                      for n, u in (raw.get("models") or {}).items()}
            return cls(path, models, {str(p) for p in raw.get("warmed") or []})
        except FileNotFoundError:
            return cls(path)
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable RAM-tier state file %s: %s", path, exc)
            return cls(path)

    def record(self, name: str, now: float) -> None:
        entry = self.models.get(name)
        if entry is None:
            entry = self.models[name] = Usage()
        entry.count += 1
        entry.last_used = now
        self.dirty = True

    def save(self) -> None:
        """Write atomically (a crash leaves the old file); failures are logged, not raised."""
        data = {"version": 1, "models": {n: {"count": u.count, "last_used": u.last_used}
                                         for n, u in sorted(self.models.items())},
                "warmed": sorted(self.warmed)}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
            os.replace(tmp, self.path)
            self.dirty = False
        except OSError as exc:
            log.warning("cannot save RAM-tier state file %s: %s", self.path, exc)
