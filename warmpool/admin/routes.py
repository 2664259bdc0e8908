"""warmpool's own endpoints: liveness, readiness, metrics and the status API (admin-key protected when set)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from warmpool.admin.models import add_model_routes, known_model, require_admin
from warmpool.admin.overview import BackendHealth, phase_map
from warmpool.backends.base import Backend
from warmpool.config import Config
from warmpool.errors import WarmpoolError
from warmpool.http import auth
from warmpool.http.exchange import Answer
from warmpool.http.routes import Call, Routes
from warmpool.metrics import Metrics
from warmpool.ramtier.tier import RamTier
from warmpool.scheduling.pool import Scheduler

log = logging.getLogger("warmpool.admin")
STATUS_PAGE = Path(__file__).with_name("static") / "status.html"
FAVICON = Path(__file__).with_name("static") / "favicon.svg"


def add_routes(routes: Routes, cfg: Config, backends: dict[str, Backend], scheduler: Scheduler,
               metrics: Metrics, tier: RamTier | None = None, draining: Callable[[], bool] = lambda: False) -> None:
    keys = admin_keys(cfg)
    health = BackendHealth(backends)

    async def healthz(request: Call) -> Answer:
        return Answer.json({"status": "ok"})

    async def readyz(request: Call) -> Answer:
        if draining():  # shutting down: a balancer or Kubernetes stops sending new requests here
            return Answer.json({"status": "draining"}, status=503)
        waiting = [b.name for b in backends.values() if not b.healthy_once]
        if waiting:
            return Answer.json({"status": "waiting", "backends_not_answered": waiting}, status=503)
        return Answer.json({"status": "ready"})

    async def metrics_endpoint(request: Call) -> Answer:
        return Answer(generate_latest(metrics.registry), CONTENT_TYPE_LATEST)

    async def status(request: Call) -> Answer:
        require_admin(request, keys)
        ram = tier.snapshot() if tier is not None else {"enabled": False}
        return Answer.json({**scheduler.snapshot(), "ram_tier": ram, **phase_map(cfg), **await health.snapshot()})

    async def load(request: Call) -> Answer:
        require_admin(request, keys)
        name = known_model(request, cfg)
        try:
            seconds = await scheduler.pool_of(name).load(name)
        except WarmpoolError as error:
            return Answer.json(error.ollama_body(), status=error.status)
        return Answer.json({"model": name, "status": "resident", "seconds": round(seconds, 4)})

    async def unload(request: Call) -> Answer:
        require_admin(request, keys)
        name = known_model(request, cfg)
        try:
            was_loaded = await scheduler.pool_of(name).unload(name, cfg.scheduler.queue_timeout)
        except TimeoutError:
            return Answer.json({"error": f"{name} still busy after {cfg.scheduler.queue_timeout:g} s"},
                               status=504)
        return Answer.json({"model": name, "status": "absent", "was_loaded": was_loaded})

    routes.add_post("/warmpool/models/{name}/load", load)
    routes.add_post("/warmpool/models/{name}/unload", unload)
    routes.add_get("/healthz", healthz)
    routes.add_get("/readyz", readyz)
    routes.add_get("/metrics", metrics_endpoint)

    async def page(request: Call) -> Answer:
        # The page itself holds no data; its fetches carry the admin key when one is required.
        return Answer(STATUS_PAGE.read_bytes(), "text/html; charset=utf-8", headers=(("Cache-Control", "no-cache"),))

    async def favicon(request: Call) -> Answer:  # browsers ask for it: answered, not a logged 404
        return Answer(FAVICON.read_bytes(), "image/svg+xml", headers=(("Cache-Control", "max-age=86400"),))

    routes.add_get("/warmpool/status", status)
    routes.add_get("/warmpool/", page)
    routes.add_get("/warmpool", page)
    routes.add_get("/favicon.ico", favicon)
    add_model_routes(routes, cfg, scheduler, tier, keys)


def admin_keys(cfg: Config) -> auth.Keys:
    """The keys the admin API checks (http/auth.py has the rule)."""
    return auth.Keys.of(cfg.auth.api_keys, cfg.auth.admin_keys)
