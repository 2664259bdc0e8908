"""The application: builds backends, scheduler, metrics and proxy from a Config, wires routes and the
lifecycle, and serves until told to stop (SIGTERM/SIGINT, or a trigger in tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry

from warmpool.admin import routes as admin
from warmpool.admin.agent import Agent
from warmpool.admin.gauges import backend_gauges, ram_tier_metrics, scheduler_gauges
from warmpool.admin.residency import add_residency_route
from warmpool.backends import make_backend
from warmpool.backends.base import Backend
from warmpool.config import Config
from warmpool.errors import ListenError
from warmpool.http import aiohttp_fallback, server
from warmpool.metrics import Metrics
from warmpool.proxy import routing
from warmpool.proxy.handler import Proxy
from warmpool.ramtier.tier import RamTier
from warmpool.ramtier.weights import SearchRoots, discover_all
from warmpool.scheduling import residency
from warmpool.scheduling.pool import Scheduler
from warmpool.scheduling.preload import preload

log = logging.getLogger("warmpool.app")

CONFIG = web.AppKey("config", Config)
BACKENDS = web.AppKey("backends", dict)
SCHEDULER = web.AppKey("scheduler", Scheduler)
METRICS = web.AppKey("metrics", Metrics)
PROXY = web.AppKey("proxy", Proxy)
RAMTIER = web.AppKey("ramtier", object)  # RamTier | None
FRONT_DOOR = web.AppKey("front_door", server.Lane)
PRELOAD = web.AppKey("preload", asyncio.Task)
AGENT = web.AppKey("agent", Agent)


def create_app(cfg: Config, *, registry: CollectorRegistry | None = None) -> web.Application:
    """A ready-to-run application; nothing starts until the aiohttp runner sets it up."""
    metrics = Metrics(registry or CollectorRegistry())
    backends = {name: make_backend(b, cfg) for name, b in cfg.backends.items()}
    tier = build_ram_tier(cfg, in_backend=lambda: occupying(scheduler))
    scheduler = Scheduler(backends, cfg, metrics, hooks=tier)
    proxy = Proxy(cfg, backends, scheduler, metrics)
    sources = [lambda: scheduler_gauges(scheduler), lambda: backend_gauges(backends)]
    if tier is not None:
        sources.append(lambda: ram_tier_metrics(tier))
    metrics.add_state(sources)
    app = web.Application(client_max_size=cfg.max_body_size, handler_args={"max_field_size": 65536})
    app[CONFIG], app[BACKENDS], app[SCHEDULER], app[METRICS], app[PROXY] = cfg, backends, scheduler, metrics, proxy
    app[RAMTIER] = tier
    app[AGENT] = agent = Agent(cfg.balancer, scheduler)
    app.cleanup_ctx.append(_agent_lifecycle)  # first in, last out: it says "drain" until the very end
    app[FRONT_DOOR] = server.Lane(proxy.handle, routing.is_known_path, cfg.max_body_size)
    app.cleanup_ctx.append(_backends_lifecycle)
    app.on_shutdown.append(_stop_admitting)
    app.on_shutdown.append(_finish_front_door)
    admin.add_routes(app, cfg, backends, scheduler, metrics, tier, draining=lambda: agent.draining)
    add_residency_route(app, scheduler, tier, agent, admin.admin_keys(cfg))
    handle = aiohttp_fallback.handler(proxy.handle, cfg.max_body_size)
    for path in sorted(routing.INFERENCE | routing.MODEL_ADMIN | routing.LISTINGS):
        app.router.add_route("*", path, handle)  # a fixed path resolves in one dict lookup
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def build_ram_tier(cfg: Config, in_backend: Callable[[], set[str]]) -> RamTier | None:
    """The RAM tier for `cfg` (it is every pool's hooks: swap sources and uses); None when
    `ram_tier.enabled` is false. `in_backend` names the models whose files must never be dropped."""
    rt = cfg.ram_tier
    if not rt.enabled:
        return None
    roots = SearchRoots.from_settings(rt.ollama_models, rt.models_dirs, rt.hf_cache)
    return RamTier(rt, discover_all(cfg, roots), preload=cfg.preload, phases=cfg.phases, in_backend=in_backend)


def occupying(scheduler: Scheduler) -> set[str]:
    """Models loaded (or on their way in or out) in any backend: their files are never dropped."""
    return {name for pool in scheduler.pools.values() for name, s in pool.models.items() if s.occupies}


async def _agent_lifecycle(app: web.Application) -> AsyncIterator[None]:
    await app[AGENT].start()
    yield
    await app[AGENT].close()


async def _backends_lifecycle(app: web.Application) -> AsyncIterator[None]:
    backends: dict[str, Backend] = app[BACKENDS]
    await asyncio.gather(*(b.start() for b in backends.values()))
    await residency.sync_residency(app[SCHEDULER], backends)
    tier = app[RAMTIER]
    if isinstance(tier, RamTier):
        await tier.start()
    app[PRELOAD] = asyncio.create_task(preload(app[SCHEDULER], app[CONFIG], app[METRICS]), name="preload")
    tasks = [app[PRELOAD]]
    tasks += [
        asyncio.create_task(residency.watch(app[SCHEDULER].pools[name], b, app[METRICS]), name=f"watch:{name}")
        for name, b in backends.items() if b.expires_models
    ]
    yield
    for task in tasks:
        task.cancel()
    if isinstance(tier, RamTier):
        await tier.close()
    results = await asyncio.gather(*(b.close() for b in backends.values()), return_exceptions=True)
    for backend, result in zip(backends.values(), results, strict=True):
        if isinstance(result, BaseException):
            log.warning("closing backend %s failed: %s", backend.name, result)


async def _stop_admitting(app: web.Application) -> None:
    """SIGTERM, step one: queued requests get 503; running streams go on until shutdown's timeout."""
    await app[SCHEDULER].close()


async def _finish_front_door(app: web.Application) -> None:
    """SIGTERM, step two: the front door's running exchanges finish (up to the timeout) before the backends
    stop; aiohttp then does the same for the connections it was handed."""
    await app[FRONT_DOOR].drain(app[CONFIG].timeouts.shutdown)


async def serve(cfg: Config, *, shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
                on_ready: Callable[[str], None] | None = None, registry: CollectorRegistry | None = None) -> None:
    """Run warmpool until `shutdown_trigger` returns (default: SIGTERM or SIGINT).

    The socket is the front door's (http/server.py); aiohttp's server gets the connections it hands over."""
    app = create_app(cfg, registry=registry)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=cfg.timeouts.shutdown,
                           access_log=None, handle_signals=False)
    await runner.setup()
    door = app[FRONT_DOOR]
    door.fallback = runner.server
    server: asyncio.Server | None = None
    announce: asyncio.Task[None] | None = None
    try:
        server = await _listen(door.protocol, cfg)
        url = _bound_url(server, cfg)
        log.info("warmpool listening on %s (config: %s)", url, cfg.source)
        announce = asyncio.create_task(_announce_ready(app[PRELOAD]), name="announce-ready")
        if on_ready:
            on_ready(url)
        await (shutdown_trigger or _signal_trigger)()
        await _drain_first(app)
        log.info("shutting down: no new requests; running streams get up to %g s", cfg.timeouts.shutdown)
    finally:
        if announce is not None:
            announce.cancel()
        if server is not None:
            server.close()
        door.close()
        await runner.cleanup()
        log.info("stopped")


async def _listen(protocol: Callable[[], asyncio.Protocol], cfg: Config) -> asyncio.Server:
    try:
        return await asyncio.get_running_loop().create_server(protocol, cfg.listen_host, cfg.listen_port,
                                                              reuse_address=True)
    except OSError as exc:  # the port is taken, or the address is not one of this host's
        reason = (os.strerror(exc.errno) if exc.errno else str(exc)).lower()
        raise ListenError(f"cannot listen on {cfg.listen}: {reason} (set `listen` or --listen)") from None


async def _announce_ready(preload_task: asyncio.Task[list[str]]) -> None:
    """One "ready" line once the preload is done (a failing preload retries, so this may come late)."""
    started = time.monotonic()
    loaded = await asyncio.shield(preload_task)
    what = f"preloaded {', '.join(loaded)}" if loaded else "nothing to preload"
    log.info("warmpool ready: %s (%.1f s after listening)", what, time.monotonic() - started)
async def _drain_first(app: web.Application) -> None:
    """SIGTERM, step zero: tell the balancer at once (agent check: drain; /readyz: 503), and keep serving
    for `balancer.drain_delay` so it stops sending new requests before the listener closes."""
    app[AGENT].drain()
    delay = app[CONFIG].balancer.drain_seconds
    if delay > 0:
        log.info("draining for %g s before closing the listener", delay)
        await asyncio.sleep(delay)


def _bound_url(server: asyncio.Server, cfg: Config) -> str:
    addrs = [s.getsockname() for s in server.sockets]
    host, port = (addrs[0][0], addrs[0][1]) if addrs else (cfg.listen_host, cfg.listen_port)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _signal_trigger() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


def run(cfg: Config) -> None:
    """Blocking entry point for the CLI: uvloop when available (it is faster on the relay path)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(cfg))
    else:
        uvloop.run(serve(cfg))
