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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from warmpool.admin import routes as admin
from warmpool.admin.agent import Agent
from warmpool.admin.gauges import backend_gauges, ram_tier_metrics, scheduler_gauges
from warmpool.admin.residency import add_residency_route
from warmpool.backends import make_backend
from warmpool.backends.base import Backend
from warmpool.config import Config
from warmpool.errors import ListenError, WarmpoolError
from warmpool.http import server
from warmpool.http.exchange import Answer
from warmpool.http.routes import Routes
from warmpool.metrics import Metrics
from warmpool.proxy import routing
from warmpool.proxy.handler import Proxy, error_answer
from warmpool.ramtier.tier import RamTier
from warmpool.ramtier.weights import SearchRoots, discover_all
from warmpool.scheduling import residency
from warmpool.scheduling.pool import Scheduler
from warmpool.scheduling.preload import preload

log = logging.getLogger("warmpool.app")


@dataclass
class App:
    """Everything one running warmpool holds; `door` is the HTTP server every route is served by."""

    cfg: Config
    backends: dict[str, Backend]
    scheduler: Scheduler
    metrics: Metrics
    proxy: Proxy
    tier: RamTier | None
    agent: Agent
    routes: Routes
    door: server.Lane
    preload: asyncio.Task[list[str]] | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def create_app(cfg: Config, *, registry: CollectorRegistry | None = None) -> App:
    """A ready-to-run application; nothing starts until `start_app`."""
    metrics = Metrics(registry or CollectorRegistry())
    backends = {name: make_backend(b, cfg) for name, b in cfg.backends.items()}
    tier = build_ram_tier(cfg, in_backend=lambda: occupying(scheduler))
    scheduler = Scheduler(backends, cfg, metrics, hooks=tier)
    proxy = Proxy(cfg, backends, scheduler, metrics)
    sources = [lambda: scheduler_gauges(scheduler), lambda: backend_gauges(backends)]
    if tier is not None:
        sources.append(lambda: ram_tier_metrics(tier))
    metrics.add_state(sources)
    agent = Agent(cfg.balancer, scheduler)
    routes = Routes(proxy.handle)  # warmpool's own endpoints; every other path is the proxy's
    admin.add_routes(routes, cfg, backends, scheduler, metrics, tier, draining=lambda: agent.draining)
    add_residency_route(routes, scheduler, tier, agent, admin.admin_keys(cfg))
    door = server.Lane(routes, server.Limits.standard(cfg.max_body_size), refusal)
    return App(cfg, backends, scheduler, metrics, proxy, tier, agent, routes, door)


def refusal(status: int, message: str, path: str) -> Answer:
    """A request the server refuses before routing (malformed, too large, too slow), in its path's dialect."""
    error = WarmpoolError(message)
    error.status = status
    return error_answer(error, routing.dialect_of(path) if path else "ollama")


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


async def start_app(app: App) -> None:
    """Start what serves before the listener opens: the balancer agent, the backends (and what watches
    them), the RAM tier, the preload."""
    await app.agent.start()
    await asyncio.gather(*(b.start() for b in app.backends.values()))
    await residency.sync_residency(app.scheduler, app.backends)
    if app.tier is not None:
        await app.tier.start()
    app.preload = asyncio.create_task(preload(app.scheduler, app.cfg, app.metrics), name="preload")
    app.tasks += [
        asyncio.create_task(residency.watch(app.scheduler.pools[name], b, app.metrics), name=f"watch:{name}")
        for name, b in app.backends.items() if b.expires_models
    ]


async def stop_app(app: App, listener: asyncio.Server | None) -> None:
    """SIGTERM, after the balancer's drain delay: one deadline of `timeouts.shutdown` for everything the
    clients see. The listener closes, idle connections close, queued requests get 503; running exchanges
    get what is left of the deadline, then are dropped; then the backends and the agent stop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + app.cfg.timeouts.shutdown
    if listener is not None:
        listener.close()
    app.door.close()
    await app.scheduler.close()
    await app.door.drain(deadline - loop.time())
    for task in [*app.tasks, *([app.preload] if app.preload is not None else [])]:
        task.cancel()
    if app.tier is not None:
        await app.tier.close()
    results = await asyncio.gather(*(b.close() for b in app.backends.values()), return_exceptions=True)
    for backend, result in zip(app.backends.values(), results, strict=True):
        if isinstance(result, BaseException):
            log.warning("closing backend %s failed: %s", backend.name, result)
    await app.agent.close()


async def serve(cfg: Config, *, shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
                on_ready: Callable[[str], None] | None = None, registry: CollectorRegistry | None = None) -> None:
    """Run warmpool until `shutdown_trigger` returns (default: SIGTERM or SIGINT). The socket is the
    front door's (http/server.py): it serves every route."""
    app = create_app(cfg, registry=registry)
    listener: asyncio.Server | None = None
    announce: asyncio.Task[None] | None = None
    try:
        await start_app(app)
        listener = await _listen(app.door.protocol, cfg)
        url = _bound_url(listener, cfg)
        log.info("warmpool listening on %s (config: %s)", url, cfg.source)
        assert app.preload is not None
        announce = asyncio.create_task(_announce_ready(app.preload), name="announce-ready")
        if on_ready:
            on_ready(url)
        await (shutdown_trigger or _signal_trigger)()
        await _drain_first(app)
        log.info("shutting down: no new requests; running streams get up to %g s", cfg.timeouts.shutdown)
    finally:
        if announce is not None:
            announce.cancel()
        await stop_app(app, listener)
        log.info("stopped")


async def _listen(protocol: Callable[[], asyncio.Protocol], cfg: Config) -> asyncio.Server:
    try:
        return await asyncio.get_running_loop().create_server(protocol, cfg.listen_host, cfg.listen_port,
                                                              reuse_address=True, backlog=server.BACKLOG)
    except OSError as exc:  # the port is taken, or the address is not one of this host's
        reason = (os.strerror(exc.errno) if exc.errno else str(exc)).lower()
        raise ListenError(f"cannot listen on {cfg.listen}: {reason} (set `listen` or --listen)") from None


async def _announce_ready(preload_task: asyncio.Task[list[str]]) -> None:
    """One "ready" line once the preload is done (a failing preload retries, so this may come late)."""
    started = time.monotonic()
    loaded = await asyncio.shield(preload_task)
    what = f"preloaded {', '.join(loaded)}" if loaded else "nothing to preload"
    log.info("warmpool ready: %s (%.1f s after listening)", what, time.monotonic() - started)
async def _drain_first(app: App) -> None:
    """SIGTERM, step zero: tell the balancer at once (agent check: drain; /readyz: 503), and keep serving
    for `balancer.drain_delay` so it stops sending new requests before the listener closes."""
    app.agent.drain()
    delay = app.cfg.balancer.drain_seconds
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
