"""warmpool's own endpoints: liveness, readiness, metrics and the status API (admin-key protected when set)."""

from __future__ import annotations

import hmac
import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from warmpool.backends.base import Backend
from warmpool.config import Config
from warmpool.errors import BackendError, Unauthorized
from warmpool.metrics import Metrics
from warmpool.scheduler import Scheduler

log = logging.getLogger("warmpool.admin")


def add_routes(app: web.Application, cfg: Config, backends: dict[str, Backend], scheduler: Scheduler,
               metrics: Metrics) -> None:
    admin_keys = [k.encode() for k in cfg.auth.admin_keys]

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        waiting = [b.name for b in backends.values() if not b.healthy_once]
        if waiting:
            return web.json_response({"status": "waiting", "backends_not_answered": waiting}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics_endpoint(request: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(request: web.Request) -> web.Response:
        require_admin(request, admin_keys)
        return web.json_response(scheduler.snapshot())

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/warmpool/status", status)


def require_admin(request: web.Request, keys: list[bytes]) -> None:
    if not keys:
        return
    auth = request.headers.get("Authorization", "")
    presented = auth[7:].strip().encode() if auth[:7].lower() == "bearer " else b""
    if not any(hmac.compare_digest(presented, k) for k in keys):
        raise web.HTTPUnauthorized(text='{"error": "missing or invalid admin key"}', content_type="application/json")


async def sync_residency(scheduler: Scheduler, backends: dict[str, Backend]) -> None:
    """At start: learn what each managed backend already has loaded; an unreachable one is retried later."""
    for name, backend in backends.items():
        if not backend.managed:
            continue
        try:
            for resident in await backend.resident():
                scheduler.pools[name].mark_resident(resident.name)
        except BackendError as exc:
            log.warning("backend %s: cannot read its loaded models yet: %s", name, exc.reason)


__all__ = ["Unauthorized", "add_routes", "sync_residency"]
