"""The data path: one handler that routes, leases, forwards and relays, and renders every error in the
client's dialect. It sees the client only through `exchange.Incoming` and `exchange.Reply`, so the
front door (http/server.py) carries it.

Streams are relayed chunk by chunk as they arrive; nothing is buffered. An Ollama-dialect request for a
model on an OpenAI-speaking backend (managed llama.cpp, openai) is translated on the way in and out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from warmpool.backends.base import Backend, Upstream
from warmpool.config import Config, ModelConfig, Priority, SchedulerConfig
from warmpool.dialects import ollama_from_openai, openai_from_ollama, strictjson
from warmpool.dialects.transforms import OllamaFromOpenAI, OpenAIFromOllama, Transform
from warmpool.errors import BadRequest, Dialect, Forbidden, ModelNotFound, Unauthorized, WarmpoolError
from warmpool.http import auth
from warmpool.http.exchange import Answer, Headers, Incoming, Reply
from warmpool.logs import new_request_id
from warmpool.metrics import Metrics, RequestMeters
from warmpool.proxy import feedback, keepalive, listings, naming, relay, routing, tokens, translate
from warmpool.proxy.rawbody import upstream_body
from warmpool.scheduling.pool import Lease, Scheduler

log = logging.getLogger("warmpool.access")
MODEL_HEADER = "X-Warmpool-Model"
PHASE_HEADER = routing.PHASE_HEADER
PRIORITY_HEADER = "X-Warmpool-Priority"
SESSION_HEADER = "X-Warmpool-Session"
MAX_SESSION = 200  # characters of a session name kept
# What Ollama calls the capability an endpoint needs, in its "<model>" does not support <verb> answer
# (server/routes.go: GenerateHandler and ChatHandler check "completion" before loading; /v1/completions
# and /v1/chat/completions reach those handlers). Embedding endpoints need no capability.
COMPLETION_VERBS = {"/api/generate": "generate", "/api/chat": "chat", "/v1/completions": "generate",
                    "/v1/chat/completions": "chat"}


@dataclass(slots=True)
class Exchange:
    """What one request carries through the data path; filled in as it goes."""

    request: Incoming
    reply: Reply
    dialect: Dialect
    started: float
    body: dict[str, Any] = field(default_factory=dict)
    raw: bytes = b""  # the body as the client sent it
    model: ModelConfig | None = None
    phase: str | None = None
    priority: Priority = "interactive"
    echo: str = ""  # the model name answers carry: the one the client sent
    keep_alive: float | None = None  # the client's keep_alive in seconds (Ollama's native API), if sent
    queue_wait: float = 0.0
    meters: RequestMeters | None = None  # set with the model when metrics are on

    def tags(self) -> Headers:
        """The headers that name the model (and the phase that chose it) on every answer about a model."""
        tags = [] if self.model is None else [(MODEL_HEADER, self.model.name)]
        if self.phase is not None:
            tags.append((PHASE_HEADER, self.phase))
        return tags

    async def answer(self, answer: Answer) -> None:
        await answer.send(self.reply, self.tags())

    async def send(self, backend: Backend, path: str, body: dict[str, Any]) -> Upstream:
        """Forward the request to `backend` at `path`: the client's raw headers and query, and `body`
        made from the client's bytes where it can be."""
        assert self.model is not None
        return await backend.forward(self.model, self.request.method, path, self.request.raw_headers,
                                     upstream_body(body, self.body, self.raw),
                                     query=self.request.query)


class Proxy:
    """Holds what the handler needs: config, backends, scheduler, metrics."""

    def __init__(self, cfg: Config, backends: dict[str, Backend], scheduler: Scheduler,
                 metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.backends = backends
        self.scheduler = scheduler
        self.metrics = metrics
        self.aliases = routing.model_aliases(cfg)
        self.keys = auth.Keys.of(cfg.auth.api_keys, cfg.auth.admin_keys)

    async def handle(self, request: Incoming, reply: Reply) -> None:
        """Answer `request` into `reply`; every failure becomes an answer in the client's dialect."""
        new_request_id(request.headers.get("X-Request-Id"))
        ex = Exchange(request, reply, routing.dialect_of(request.path), time.monotonic())
        try:
            await self._dispatch(ex)
        except WarmpoolError as error:
            await self._fail(ex, error, ex.tags())
        except (ConnectionResetError, asyncio.CancelledError):
            raise  # the client left; nothing to answer
        except RecursionError:
            # A body nested just shallower than strictjson's parse admits still breaks the steps that
            # re-serialise or translate it: the client's doing, so a 400 (logged, in case it was not).
            log.warning("%s %s: nesting too deep", ex.request.method, ex.request.path, exc_info=True)
            await self._fail(ex, BadRequest(strictjson.TOO_DEEP), ex.tags())
        except Exception as exc:  # a bug must cost one request, never the proxy
            log.exception("internal error on %s %s", ex.request.method, ex.request.path)
            await self._fail(ex, WarmpoolError(f"internal error: {type(exc).__name__}: {exc}"), [])
        self._account(ex)

    async def _fail(self, ex: Exchange, error: WarmpoolError, tags: Headers) -> None:
        if ex.reply.started:
            # The head already went out and the body cannot carry an error (not a stream): drop the
            # connection, so a client cannot take the cut body for a whole one.
            log.warning("%s %s: %s; connection dropped mid-answer", ex.request.method, ex.request.path, error)
            ex.reply.abort()
            return
        await error_answer(error, ex.dialect).send(ex.reply, tags)

    async def _dispatch(self, ex: Exchange) -> None:
        path, method = ex.request.path, ex.request.method
        if not routing.is_known_path(path):
            raise ModelNotFound(f"{method} {path}: no such endpoint")  # 404 in the client's dialect
        if method not in routing.allowed_methods(path):
            raise MethodNotAllowed(f"{method} not allowed on {path}")
        check_key(ex.request, self.keys, admin_grade=path in routing.MODEL_MANAGEMENT)
        if path in routing.LISTINGS or routing.is_model_entry(path):
            return await ex.answer(await listings.answer(path, self.cfg, self.backends, self.scheduler))
        ex.raw = await ex.request.read()
        ex.body = strictjson.loads_object(ex.raw)
        if ex.dialect == "ollama" and path in keepalive.ENDPOINTS:
            ex.keep_alive = keepalive.parse_keep_alive(ex.body.get("keep_alive"))  # Ollama binds it first
            if ex.keep_alive == 0 and ollama_from_openai.is_ollama_preload(path, ex.body):
                check_key(ex.request, self.keys, admin_grade=True)  # an unload: other clients' model goes
        requested = routing.body_model(path, ex.body)
        choice = routing.choose_model(self.cfg, self.aliases, ex.request.headers.get(PHASE_HEADER), requested)
        ex.model, ex.phase = self.cfg.models[choice.model], choice.phase
        ex.priority = request_priority(ex.request.headers.get(PRIORITY_HEADER), ex.phase, self.cfg.scheduler)
        ex.echo = naming.echo_name(requested, ex.model)
        if self.metrics is not None:
            ex.meters = self.metrics.meters(ex.model.name, ex.model.backend, ex.phase or "", ex.dialect,
                                            ex.priority)
        backend = self.backends[ex.model.backend]
        if path in routing.MODEL_ADMIN:
            return await self._model_admin(ex, backend)
        if path == routing.COUNT_TOKENS:
            return await self._count_tokens(ex, backend)
        return await self._inference(ex, backend)

    async def _model_admin(self, ex: Exchange, backend: Backend) -> None:
        """show / pull / copy / delete: forwarded to Ollama; answered by warmpool for other backends."""
        assert ex.model is not None
        if backend.speaks != "ollama":
            return await ex.answer(listings.model_admin_answer(ex.request.path, ex.model, ex.body))
        body = {**ex.body, routing.model_field(ex.request.path): ex.model.upstream_name}
        body.pop("name", None)
        return await self._forward(ex, backend, ex.request.path, body, transform=None)

    async def _count_tokens(self, ex: Exchange, backend: Backend) -> None:
        assert ex.model is not None
        counted, ex.queue_wait = await tokens.count_tokens(ex.body, ex.model, backend, self.scheduler)
        await ex.answer(Answer.json(counted))

    async def _inference(self, ex: Exchange, backend: Backend) -> None:
        assert ex.model is not None
        preload = ex.dialect == "ollama" and ollama_from_openai.is_ollama_preload(ex.request.path, ex.body)
        if preload and ex.keep_alive == 0:
            return await self._unload(ex)  # Ollama unloads before it checks capabilities
        backend.note_request(ex.model, ex.request.path)
        self._check_capability(ex, backend)
        if preload:
            return await self._load(ex)
        path, body, transform = self._upstream_request(ex, backend)
        lease = self.scheduler.lease(ex.model.name, ex.priority, session_of(ex.request), ex.phase)
        if not lease.try_now():
            if self._wants_feedback(ex):
                return await self._inference_with_feedback(ex, backend, lease, path, body, transform)
            ex.queue_wait = await lease.wait()
        try:
            self._granted(ex, backend, transform)
            await self._forward(ex, backend, path, body, transform)
        finally:
            lease.release()

    def _check_capability(self, ex: Exchange, backend: Backend) -> None:
        """Ollama's own 400 for a generate or chat request to an embedding-only model, before any load."""
        assert ex.model is not None
        verb = COMPLETION_VERBS.get(ex.request.path)
        if verb is not None and backend.embedding_only(ex.model):
            raise BadRequest(f"{json.dumps(ex.echo, ensure_ascii=False)} does not support {verb}")

    def _granted(self, ex: Exchange, backend: Backend, transform: Transform | None) -> None:
        """The lease is held: the model is loaded (and what its load taught the backend is known)."""
        assert ex.model is not None
        self._observe_queue(ex)
        self._check_capability(ex, backend)
        self.scheduler.pool_of(ex.model.name).set_keep_alive(ex.model.name, ex.keep_alive)
        if isinstance(transform, OllamaFromOpenAI):
            transform.load_seconds = ex.queue_wait  # Ollama's load_duration: arrival until the model is ready

    def _wants_feedback(self, ex: Exchange) -> bool:
        return feedback.streams(ex.request.path, ex.body) and feedback.wanted(
            ex.request.headers.get(feedback.HEADER), self.cfg.loading_feedback)

    async def _inference_with_feedback(self, ex: Exchange, backend: Backend, lease: Lease, path: str,
                                       body: dict[str, Any], transform: Transform | None) -> None:
        """Open the stream now and tell the client what it waits for; then relay into that stream."""
        assert ex.model is not None
        pool, name = self.scheduler.pool_of(ex.model.name), ex.model.name
        await ex.reply.start(200, "", [("Content-Type", feedback.content_type(ex.dialect)), *ex.tags()], None)
        self._first_byte_observer(ex)()

        async def tell() -> None:
            seconds = time.monotonic() - ex.started
            await ex.reply.write(feedback.line(ex.request.path, ex.echo, pool.describe_wait(name), seconds))

        try:
            ex.queue_wait = await lease.wait(every=feedback.INTERVAL, tick=tell)
        except WarmpoolError as error:
            await relay.report_in_stream(ex.reply, error)
            return
        try:
            self._granted(ex, backend, transform)
            upstream = await ex.send(backend, path, body)
            await relay.relay_into(ex.reply, upstream, backend.name, transform, self._renamer(ex, body))
        except WarmpoolError as error:
            await relay.report_in_stream(ex.reply, error)
        finally:
            lease.release()

    async def _unload(self, ex: Exchange) -> None:
        """Ollama's empty request with keep_alive 0 unloads the model. warmpool owns residency, so it
        unloads through its scheduler (keeping its view true) instead of forwarding."""
        assert ex.model is not None
        await self.scheduler.pool_of(ex.model.name).unload(ex.model.name, self.cfg.scheduler.queue_timeout)
        answer = ollama_from_openai.ollama_preload_response(ex.request.path, ex.echo, unload=True)
        await ex.answer(Answer.json(answer))

    async def _load(self, ex: Exchange) -> None:
        """Ollama's empty request loads the model (through the scheduler, like any request) and sets its
        keep_alive when one is sent."""
        assert ex.model is not None
        pool = self.scheduler.pool_of(ex.model.name)
        async with pool.lease(ex.model.name, ex.priority) as lease:
            ex.queue_wait = lease.waited
            pool.set_keep_alive(ex.model.name, ex.keep_alive)
        answer = ollama_from_openai.ollama_preload_response(ex.request.path, ex.echo)
        await ex.answer(Answer.json(answer))

    def _upstream_request(self, ex: Exchange, backend: Backend) -> tuple[str, dict[str, Any], Transform | None]:
        assert ex.model is not None
        path = ex.request.path
        if path in routing.TRANSLATED:
            return translate.translated_request(path, ex.body, ex.model, backend, ex.echo)
        if ex.dialect == "ollama" and backend.speaks == "openai":
            upstream_path, body = ollama_from_openai.ollama_request_to_openai(path, ex.body, ex.model.upstream_name)
            body = translate.fit_openai_body(backend, ex.model, upstream_path, body)
            return upstream_path, body, OllamaFromOpenAI(path, ex.echo, ex.body)
        options = ex.model.ollama.options if ex.model.ollama is not None else {}
        if ex.dialect == "openai" and backend.speaks == "ollama" and options:
            # Ollama's /v1 cannot carry load-time options: it would reload the model with defaults.
            upstream_path, body = openai_from_ollama.openai_request_to_ollama(
                path, ex.body, ex.model.upstream_name, options, backend.lease_seconds(ex.model))
            return upstream_path, body, OpenAIFromOllama(path, ex.echo, ex.body)
        body = backend.rewrite_body(ex.model, path, ex.body)
        if backend.speaks == "openai":
            body = translate.fit_openai_body(backend, ex.model, path, body)
        return path, body, None

    async def _forward(self, ex: Exchange, backend: Backend, path: str, body: dict[str, Any],
                       transform: Transform | None) -> None:
        upstream = await ex.send(backend, path, body)
        await relay.relay(ex.reply, upstream, backend.name, ex.tags(), transform,
                          on_first_byte=self._first_byte_observer(ex), error_dialect=ex.dialect,
                          rename=self._renamer(ex, body))

    @staticmethod
    def _renamer(ex: Exchange, sent: dict[str, Any]) -> naming.Renamer | None:
        """Upstreams echo the name they were sent; the client gets the one it sent."""
        upstream_name = sent.get("model")
        return naming.renamer_for(upstream_name, ex.echo) if isinstance(upstream_name, str) else None

    def _first_byte_observer(self, ex: Exchange) -> Callable[[], None]:
        def observe() -> None:
            if ex.meters is not None:
                ex.meters.first_byte.observe(time.monotonic() - ex.started)
        return observe

    def _observe_queue(self, ex: Exchange) -> None:
        if ex.meters is not None:
            ex.meters.queue_wait.observe(ex.queue_wait)

    def _account(self, ex: Exchange) -> None:
        seconds = time.monotonic() - ex.started
        status = ex.reply.status
        if ex.meters is not None:
            ex.meters.answered(status).inc()
            ex.meters.duration.observe(seconds)
        if not log.isEnabledFor(logging.INFO):
            return  # the line's arguments (two round()s, a dict) are not free
        model = ex.model.name if ex.model else ""
        log.info("%s %s %s model=%s phase=%s wait=%.3fs %.3fs", ex.request.method, ex.request.path,
                 status, model or "-", ex.phase or "-", ex.queue_wait, seconds,
                 extra={"model": model, "phase": ex.phase, "status": status,
                        "queue_wait_s": round(ex.queue_wait, 4), "duration_s": round(seconds, 4)})


class MethodNotAllowed(WarmpoolError):
    status = 405


def request_priority(header: str | None, phase: str | None, sched: SchedulerConfig) -> Priority:
    """The request's class: `X-Warmpool-Priority`, else its phase's configured default, else the default."""
    if header is None:
        return sched.priorities.get(phase or "", sched.default_priority)
    value = header.strip().lower()
    if value == "interactive":
        return "interactive"
    if value == "batch":
        return "batch"
    raise BadRequest(f"{PRIORITY_HEADER} must be 'interactive' or 'batch', got {header[:40]!r}")


def session_of(request: Incoming) -> str | None:
    """The client session whose phase order the scheduler learns: `X-Warmpool-Session`, else the client's
    address; None when neither is known."""
    named = request.headers.get(SESSION_HEADER)
    if named is not None and named.strip():
        return "session:" + named.strip()[:MAX_SESSION]
    return "address:" + request.peer if request.peer else None


def check_key(request: Incoming, keys: auth.Keys, *, admin_grade: bool) -> None:
    """The key a request needs (auth.py has the rule), presented as Bearer or x-api-key: 401 without it,
    403 for an API key where an admin key is needed."""
    if keys.open or (not admin_grade and not keys.api):
        return  # nothing to check: the headers are not even looked at
    presented = auth.presented_key(request.raw_headers, x_api_key=True)
    verdict = keys.for_admin(presented) if admin_grade else keys.for_request(presented)
    if verdict is auth.Verdict.UNAUTHORIZED:
        raise Unauthorized("missing or invalid admin key" if admin_grade and keys.admin
                           else "missing or invalid API key")
    if verdict is auth.Verdict.FORBIDDEN:
        raise Forbidden(f"{request.method} {request.path} changes what other clients are served: "
                        "it needs an admin key (auth.admin_keys), not an API key")


def error_answer(error: WarmpoolError, dialect: Dialect) -> Answer:
    return Answer.json(error.body(dialect), status=error.status, headers=error.headers)
