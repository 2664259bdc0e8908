"""The per-model admin API and the checks every admin endpoint shares (admin key, known model): every model's
tiers (`GET /warmpool/models`), and warming or evicting a model's weight files in the page cache
(`POST /warmpool/models/{name}/warm|evict`)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from warmpool.config import Config
from warmpool.http import auth
from warmpool.http.exchange import Answer
from warmpool.http.routes import Call, Failure, Routes
from warmpool.ramtier.tier import RamTier, RamTierError
from warmpool.scheduling.pool import Scheduler

PROGRESS_INTERVAL = 0.2  # seconds between progress lines


def add_model_routes(routes: Routes, cfg: Config, scheduler: Scheduler, tier: RamTier | None,
                     keys: auth.Keys) -> None:
    async def models(request: Call) -> Answer:
        require_admin(request, keys)
        return Answer.json({"models": [model_view(name, cfg, scheduler, tier) for name in cfg.models]})

    async def warm(request: Call) -> Answer | None:
        require_admin(request, keys)
        name = known_model(request, cfg)
        active = _tier_or_409(tier)
        if request.query.get("progress"):
            await _warm_with_progress(request, active, name)
            return None
        try:
            result = await active.warm(name)
        except RamTierError as exc:
            raise _conflict(str(exc)) from None
        return Answer.json(_warm_answer(name, result.bytes_warmed, result.held, active))

    async def evict(request: Call) -> Answer:
        require_admin(request, keys)
        name = known_model(request, cfg)
        active = _tier_or_409(tier)
        kept = active.why_kept(name) if active.files_of(name) else None
        try:
            dropped = await active.evict(name)
        except RamTierError as exc:
            raise _conflict(str(exc)) from None
        return Answer.json({"model": name, "bytes_dropped": dropped, **_residency(tier, name),
                                  "kept": kept})

    routes.add_get("/warmpool/models", models)
    routes.add_post("/warmpool/models/{name}/warm", warm)
    routes.add_post("/warmpool/models/{name}/evict", evict)


def known_model(request: Call, cfg: Config) -> str:
    name = str(request.match_info["name"])
    if name not in cfg.models:
        raise Failure.json(404, f"model '{name}' not found")
    return name


def require_admin(request: Call, keys: auth.Keys) -> None:
    """An admin-grade action: the admin key as a Bearer token (or, with no admin keys, an API key)."""
    if keys.open:
        return
    verdict = keys.for_admin(auth.presented_key(request.incoming.raw_headers))
    if verdict is auth.Verdict.UNAUTHORIZED:
        which = "admin" if keys.admin else "API"
        raise Failure.json(401, f"missing or invalid {which} key", {"WWW-Authenticate": "Bearer"})
    if verdict is auth.Verdict.FORBIDDEN:
        raise Failure.json(403, "an admin key is needed (auth.admin_keys), not an API key")


def model_view(name: str, cfg: Config, scheduler: Scheduler, tier: RamTier | None) -> dict[str, Any]:
    """One model across the tiers: backend residency, its files, how much of them is in RAM, its use."""
    model = cfg.models[name]
    state = scheduler.pool_of(name).models[name]
    view: dict[str, Any] = {"name": name, "backend": model.backend, "upstream_name": model.upstream_name,
                            "status": state.status, "resident": state.status == "resident"}
    if tier is None:
        return {**view, "ram_tier": None, "reason": "ram_tier.enabled is false"}
    snap = tier.snapshot()["models"].get(name, {})
    usage = tier.state.models.get(name)
    return {
        **view, "tier": snap.get("tier"), "files": snap.get("files", []), "size": snap.get("bytes_total"),
        "bytes_in_ram": snap.get("bytes_resident"), "percent_in_ram": snap.get("percent"),
        "last_used": usage.last_used if usage else None, "use_count": usage.count if usage else 0,
        "reason": snap.get("reason"),
    }


async def _warm_with_progress(request: Call, tier: RamTier, name: str) -> None:
    """NDJSON: {"bytes": n} lines while warming, then the result line (for the CLI's progress bar)."""
    total = _size_of(tier, name)
    response = request.reply
    await response.start(200, "", [("Content-Type", "application/x-ndjson")], None)
    pending: list[int] = []
    last = [0.0]

    def progress(done: int) -> None:
        pending.append(done)

    async def flush() -> None:
        if pending and time.monotonic() - last[0] >= PROGRESS_INTERVAL:
            last[0] = time.monotonic()
            await response.write(_line({"bytes": pending[-1], "total": total}))

    task = asyncio.get_running_loop().create_task(tier.warm(name, progress))
    while not task.done():
        await flush()
        await _wait(task, PROGRESS_INTERVAL)
    try:
        result = task.result()
        await response.write(_line(_warm_answer(name, result.bytes_warmed, result.held, tier)))
    except RamTierError as exc:
        await response.write(_line({"error": str(exc)}))
    await response.end()


async def _wait(task: Any, seconds: float) -> None:
    await asyncio.wait({task}, timeout=seconds)


def _size_of(tier: RamTier, name: str) -> int:
    measured = tier.model_residency(name)
    return measured.bytes_total if measured else 0


def _warm_answer(name: str, warmed: int, held: str | None, tier: RamTier) -> dict[str, Any]:
    return {"model": name, "bytes_warmed": warmed, "held": held, **_residency(tier, name)}


def _residency(tier: RamTier | None, name: str) -> dict[str, Any]:
    measured = tier.model_residency(name) if tier else None
    if measured is None:
        return {"bytes_in_ram": None, "percent_in_ram": None}
    return {"bytes_in_ram": measured.bytes_resident, "percent_in_ram": round(measured.percent, 1)}


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _tier_or_409(tier: RamTier | None) -> RamTier:
    if tier is None:
        raise _conflict("the RAM tier is disabled (ram_tier.enabled: false)")
    return tier


def _conflict(message: str) -> Failure:
    return Failure.json(409, message)
