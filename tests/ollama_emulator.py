"""An Ollama emulator for warmpool's tests: an aiohttp server that speaks Ollama v0.32 on the wire.

It follows /work/shared/research/upstream_spec.md §0 and §1: keep_alive parsing (§1.6), load/unload
done_reasons (§1.4), /api/ps (§1.7), the scheduler's queue, reloads and evictions (§1.8), the Host
check and both error dialects (§1.1, §1.2). Loading is a sleep proportional to the model's size and
generation is deterministic words, so tests can count swaps and time them loosely.

Tools and images (section "tools, images and the Anthropic layer" below): a model with the "tools"
capability answers a conversation that offers tools and does not end with a tool result by calling the
first tool, with arguments made from its schema; one without it refuses tools as Ollama does. From v0.14 on
it serves Anthropic's /v1/messages as Ollama documents it (docs/api/anthropic-compatibility.mdx).

    python -m tests.ollama_emulator --port 11434 --model qwen2.5:7b=4GB --model nomic-embed-text=300MB:embed
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import ipaddress
import json
import math
import random
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from aiohttp import web

Json = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
FOREVER = math.inf
GO_MAX_DURATION = timedelta(microseconds=(2**63 - 1) // 1000)  # §1.6: time.Duration(math.MaxInt64) ≈ 292 y
BUSY = "server busy, please try again.  maximum pending requests exceeded"
UNLOAD_DELAY = 0.05  # §1.6: "unload" is answered at once; the runner goes shortly after
DISCONNECT_POLL = 0.01
DEFAULT_TOKENS = 12
VOCAB = ("the", "warm", "pool", "keeps", "models", "ready", "for", "fast", "swaps", "and", "every",
         "token", "flows", "through", "a", "quiet", "proxy", "on", "loopback", "today")
# §1.3 options map: load-time (runner) options and this emulator's defaults (num_ctx as in v0.9–v0.15).
RUNNER_DEFAULTS: Json = {"num_ctx": 4096, "num_batch": 512, "num_gpu": -1, "main_gpu": 0,
                         "use_mmap": None, "num_thread": 0}
OPTION_KINDS = {
    **dict.fromkeys(("num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "num_keep", "seed",
                     "num_predict", "top_k", "repeat_last_n", "mirostat"), "integer"),
    **dict.fromkeys(("temperature", "top_p", "min_p", "typical_p", "repeat_penalty", "tfs_z",
                     "presence_penalty", "frequency_penalty", "mirostat_tau", "mirostat_eta"), "float32"),
    **dict.fromkeys(("use_mmap", "numa", "low_vram", "use_mlock", "penalize_newline"), "boolean"),
    "stop": "array of strings",
}
GO_PRIVATE_NETS = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                                     "fc00::/7")]  # Go's netip.Addr.IsPrivate
GO_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                     "h": 3600.0}
GO_DURATION_PART = re.compile(r"(\d*)(\.\d*)?([^\d.]*)")


class ApiError(Exception):
    """An error answer; rendered natively or in the OpenAI dialect by the middleware (§1.2)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message

    def render(self, openai: bool) -> web.Response:
        if not openai:
            return json_response({"error": self.message}, self.status)
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(self.status, "api_error")
        error = {"message": self.message, "type": kind, "param": None, "code": None}
        return json_response({"error": error}, self.status)

    def render_anthropic(self) -> web.Response:
        """Ollama's Anthropic layer (anthropic.NewError): Anthropic's error types by status, a request id."""
        kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 429: "rate_limit_error", 503: "overloaded_error"}.get(self.status, "api_error")
        body = {"type": "error", "error": {"type": kind, "message": self.message},
                "request_id": f"req_{random.getrandbits(96):024x}"}
        return json_response(body, self.status)


# -- pure helpers ---------------------------------------------------------------------------------

def normalize(name: str) -> str:
    """Display-shortest name with its tag: 'x' -> 'x:latest' (§1.1, §1.7)."""
    for prefix in ("registry.ollama.ai/", "library/"):
        name = name.removeprefix(prefix)
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def version_tuple(version: str) -> tuple[int, ...]:
    """'0.6.4' -> (0, 6, 4); a pre-release suffix ('0.33.0-rc2') is ignored."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("-")[0])[:3])


def go_quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # close enough to strconv.Quote for these messages


def parse_go_duration(text: str) -> float:
    """Go's time.ParseDuration, in seconds, with Go's error messages (§1.6)."""
    quoted, rest, sign = go_quote(text), text, 1.0
    if rest and rest[0] in "+-":
        sign, rest = (-1.0 if rest[0] == "-" else 1.0), rest[1:]
    if rest == "0":
        return 0.0
    if not rest:
        raise ValueError(f"time: invalid duration {quoted}")
    total = 0.0
    while rest:
        digits, fraction, unit = GO_DURATION_PART.match(rest).groups()  # type: ignore[union-attr]
        if not digits and len(fraction or "") < 2:
            raise ValueError(f"time: invalid duration {quoted}")
        if not unit:
            raise ValueError(f"time: missing unit in duration {quoted}")
        if unit not in GO_DURATION_UNITS:
            raise ValueError(f"time: unknown unit {go_quote(unit)} in duration {quoted}")
        total += float((digits or "0") + (fraction or "").rstrip(".")) * GO_DURATION_UNITS[unit]
        rest = rest[len(digits) + len(fraction or "") + len(unit):]
    return sign * total


def go_type(value: Any) -> str:
    """reflect.TypeOf of a decoded JSON value, as Go prints it."""
    names = {bool: "bool", str: "string", int: "float64", float: "float64", list: "[]interface {}"}
    return names.get(type(value), "map[string]interface {}")


def json_kind(value: Any) -> str:
    """The JSON kind encoding/json names in "cannot unmarshal X into ..." errors."""
    names = {bool: "bool", str: "string", int: "number", float: "number", list: "array", dict: "object"}
    return names.get(type(value), "null")


def parse_keep_alive(body: Json) -> float | None:
    """§1.6: number = seconds (negative = forever), string = Go duration, null/absent = not given."""
    value = body.get("keep_alive")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ApiError(400, f"Unsupported type: '{go_type(value)}'")
    try:
        seconds = parse_go_duration(value) if isinstance(value, str) else float(value)
    except ValueError as err:
        raise ApiError(400, str(err)) from None
    return FOREVER if seconds < 0 else seconds


def check_options(options: Any) -> Json:
    """§1.2/§1.3: unknown keys are ignored, a wrongly typed known key is a 500."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ApiError(400, f"json: cannot unmarshal {json_kind(options)} into Go struct field .options "
                            "of type map[string]interface {}")
    for key, value in options.items():
        kind = OPTION_KINDS.get(key)
        if kind and value is not None and not option_fits(kind, value):
            raise ApiError(500, f'option "{key}" must be of type {kind}')
    return options


def option_fits(kind: str, value: Any) -> bool:
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "array of strings":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def runner_options(options: Json) -> Json:
    """§1.8 needsReload compares only load-time options; unset ones keep their defaults."""
    merged = {k: d if options.get(k) is None else options[k] for k, d in RUNNER_DEFAULTS.items()}
    for key in ("num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread"):
        merged[key] = int(merged[key])
    merged["num_gpu"] = max(merged["num_gpu"], -1)  # §1.8: num_gpu < 0 means "auto"
    return merged


def host_allowed(host: str) -> bool:
    """§1.1 allowedHostsMiddleware: loopback/private/unspecified IPs, localhost, local TLDs, hostname."""
    host = host.lower()
    if host.startswith("["):  # net.SplitHostPort: "[::1]:11434" -> "::1"
        host = host[1:].split("]")[0]
    elif host.count(":") == 1:
        host = host.split(":")[0]
    with suppress(ValueError):
        ip = ipaddress.ip_address(host)
        if ip.is_loopback or ip.is_unspecified or any(ip in net for net in GO_PRIVATE_NETS):
            return True
    return host in ("", "localhost", socket.gethostname().lower()) or host.endswith(
        (".localhost", ".local", ".internal"))


def rfc3339(ts: float, utc: bool = False) -> str:
    """Go's RFC3339Nano: zeros trimmed, 'Z' for offset 0, local unless utc; inf = now + 292 y (§1.7)."""
    tz = UTC if utc else None
    dt = datetime.now(tz) + GO_MAX_DURATION if math.isinf(ts) else datetime.fromtimestamp(ts, tz)
    head, _, rest = dt.astimezone(tz).isoformat(timespec="microseconds").partition(".")
    fraction, offset = rest[:6].rstrip("0"), rest[6:]
    return f"{head}{'.' + fraction if fraction else ''}{'Z' if offset == '+00:00' else offset}"


def digest_int(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:8], "big")


def fake_tokens(model: str, prompt: str, limit: Any) -> tuple[list[str], str]:
    """Deterministic text of DEFAULT_TOKENS words; a num_predict/max_tokens limit cuts it short."""
    unlimited = not isinstance(limit, (int, float)) or isinstance(limit, bool) or limit < 0
    count = DEFAULT_TOKENS if unlimited else min(int(limit), DEFAULT_TOKENS)
    words = [VOCAB[digest_int(model, prompt, i) % len(VOCAB)] for i in range(count)]
    reason = "stop" if unlimited or limit > DEFAULT_TOKENS else "length"
    return [w if i == 0 else " " + w for i, w in enumerate(words)], reason


def fake_embedding(model: str, text: str, dims: int = 8) -> list[float]:
    """A deterministic unit vector derived from the text's hash."""
    raw = hashlib.sha256(f"{model}\0{text}".encode()).digest()[:dims]
    vector = [b / 255 - 0.5 for b in raw]
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.json_response(obj, status=status, dumps=dumps)  # application/json; charset=utf-8 (§1.4)


def ns(seconds: float) -> int:
    return max(1, int(seconds * 1e9))


def text_of(content: Any) -> str:
    """A prompt's text: a string, or OpenAI content parts."""
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def messages_text(messages: Any) -> str:
    return " ".join(text_of(m.get("content")) for m in messages if isinstance(m, dict))


# -- models, runners, generations -----------------------------------------------------------------

@dataclass
class EmulatedModel:
    """A model in the emulated store; copies share their source's blob digest (§1.8 identity key)."""

    name: str
    size: int = 500_000_000
    embedding: bool = False
    family: str = "llama"
    parameter_size: str = "7B"
    quantization_level: str = "Q4_K_M"
    tools: bool = True  # the "tools" capability (the model's template renders tools)
    vision: bool = False  # the "vision" capability (a projector for image input)
    digest: str = ""
    modified_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.name = normalize(self.name)
        self.digest = self.digest or hashlib.sha256(self.name.encode()).hexdigest()

    def details(self) -> Json:
        return {"parent_model": "", "format": "gguf", "family": self.family, "families": [self.family],
                "parameter_size": self.parameter_size, "quantization_level": self.quantization_level}

    def tag(self) -> Json:
        return {"name": self.name, "model": self.name, "modified_at": rfc3339(self.modified_at),
                "size": self.size, "digest": self.digest, "details": self.details()}


@dataclass(eq=False)
class Runner:
    """A loaded (or loading) model: Ollama's runnerRef (§1.8)."""

    model: EmulatedModel
    options: Json
    session_duration: float
    expires_at: float
    loading: bool = True
    expired: bool = False
    reason: str = "expired"
    ref_count: int = 0
    timer: asyncio.TimerHandle | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    gone: asyncio.Event = field(default_factory=asyncio.Event)

    def snapshot(self) -> Json:
        forever = math.isinf(self.session_duration)
        return {"state": "loading" if self.loading else "ready", "ref_count": self.ref_count,
                "keep_alive": -1 if forever else self.session_duration, "expired": self.expired,
                "expires_at": rfc3339(self.expires_at), "options": self.options, "size": self.model.size}


def pick_victim(runners: list[Runner]) -> Runner:
    """§1.8 findRunnerToUnload: shortest sessionDuration (then name); the first idle one wins."""
    ordered = sorted(runners, key=lambda r: (r.session_duration, r.model.name))
    return next((r for r in ordered if r.ref_count == 0), ordered[0])


@dataclass
class Generation:
    """One request's fake decoding and its §1.5 timing fields."""

    model: str  # as the client named it
    canonical: str
    prompt: str
    limit: Any  # num_predict / max_tokens as sent
    start: float
    loaded: float = field(default_factory=time.monotonic)
    tokens: list[str] = field(init=False)
    reason: str = field(init=False)
    calls: list[Json] = field(default_factory=list)  # tool calls (native shape) instead of text

    def __post_init__(self) -> None:
        self.tokens, self.reason = fake_tokens(self.canonical, self.prompt, self.limit)

    @property
    def prompt_tokens(self) -> int:
        return max(1, len(self.prompt.split()))

    def metrics(self) -> Json:
        now = time.monotonic()
        return {"total_duration": ns(now - self.start), "load_duration": ns(self.loaded - self.start),
                "prompt_eval_count": self.prompt_tokens, "prompt_eval_duration": self.prompt_tokens * 100_000,
                "eval_count": self.output_tokens, "eval_duration": ns(now - self.loaded)}

    @property
    def output_tokens(self) -> int:
        return len(self.tokens) + sum(len(dumps(c["function"]).split()) for c in self.calls)

    def with_calls(self, calls: list[Json]) -> Generation:
        """The answer is `calls` instead of text (a model calls tools without prose here)."""
        if calls:
            self.calls, self.tokens, self.reason = calls, [], "stop"
        return self

    def context(self) -> list[int]:
        return [digest_int(w) % 32000 for w in self.prompt.split() + self.tokens]

    def usage(self) -> Json:
        n, m = self.prompt_tokens, self.output_tokens
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}


def native_done(model: str, chat: bool, reason: str) -> Json:
    """The load/unload answers carry no durations (§1.5)."""
    body: Json = {"model": model, "created_at": rfc3339(time.time(), utc=True)}
    body.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
    return {**body, "done": True, "done_reason": reason}


def openai_chunk(gen: Generation, cid: str, kind: str, choices: list[Json], **extra: Any) -> Json:
    return {"id": cid, "object": kind, "created": int(time.time()), "model": gen.model,
            "system_fingerprint": "fp_ollama", "choices": choices, **extra}


# -- the scheduler -------------------------------------------------------------------------------

class Scheduler:
    """server/sched.go in miniature (§1.8): runners by blob, one FIFO loader, a bounded pending queue."""

    def __init__(self, record: Callable[..., None], *, load_seconds_per_gb: float, max_loaded: int,
                 max_queue: int, default_keep_alive: float) -> None:
        self.record, self.load_seconds_per_gb = record, load_seconds_per_gb
        self.max_loaded, self.max_queue, self.default_keep_alive = max_loaded, max_queue, default_keep_alive
        self.runners: dict[str, Runner] = {}  # keyed by blob digest: copies share one slot (§1.8)
        self.pending = 0
        self._loader = asyncio.Lock()  # §1.8: one loader, FIFO

    def __repr__(self) -> str:
        busy = {r.model.name: "loading" if r.loading else r.ref_count for r in self.runners.values()}
        return f"<Scheduler runners={busy} pending={self.pending}>"

    def stop(self) -> None:
        for runner in self.runners.values():
            self._cancel_timer(runner)

    @asynccontextmanager
    async def lease(self, request: web.Request, model: EmulatedModel, options: Json,
                     keep_alive: float | None) -> AsyncIterator[Runner]:
        """Hold a runner for the length of a request; the last release starts the idle timer (§1.6)."""
        acquiring = self._acquire(model, runner_options(options), keep_alive)
        runner = await self._unless_disconnected(request, acquiring)
        try:
            yield runner
        finally:
            self._release(runner)

    async def _acquire(self, model: EmulatedModel, options: Json, keep_alive: float | None) -> Runner:
        while True:
            runner = self.runners.get(model.digest)
            if runner is not None and runner.loading:
                await runner.ready.wait()  # §1.8: requests for a loading model wait for it, then join
                continue
            if runner is not None and not runner.expired and runner.options == options:
                return self._use(runner, keep_alive)  # §1.8 fast path: bypasses the queue
            return await self._enqueue(model, options, keep_alive)

    async def _enqueue(self, model: EmulatedModel, options: Json, keep_alive: float | None) -> Runner:
        if self.pending >= self.max_queue:
            raise ApiError(503, BUSY)  # §1.2: pending queue (OLLAMA_MAX_QUEUE) full
        self.pending += 1
        try:
            await self._loader.acquire()
        finally:
            self.pending -= 1
        try:
            return await self._schedule(model, options, keep_alive)
        finally:
            self._loader.release()

    async def _schedule(self, model: EmulatedModel, options: Json, keep_alive: float | None) -> Runner:
        """The single loader: reuse, or drain a runner with other options (§0.5 reload), make room, load."""
        while (runner := self.runners.get(model.digest)) is not None:
            if not runner.expired and runner.options == options:
                return self._use(runner, keep_alive)
            self.retire(runner, "reload")
            await runner.gone.wait()
        while len(self.runners) >= self.max_loaded:
            victim = pick_victim(list(self.runners.values()))
            self.retire(victim, "evicted")  # §1.8: a busy victim unloads when its requests finish
            await victim.gone.wait()
        return await self._load(model, options, keep_alive)

    async def _load(self, model: EmulatedModel, options: Json, keep_alive: float | None) -> Runner:
        duration = self.default_keep_alive if keep_alive is None else keep_alive  # §1.6 initial load
        # §1.7: listed in /api/ps while still loading, expiring at now + duration
        runner = Runner(model, options, duration, expires_at=time.time() + duration)
        self.runners[model.digest] = runner
        started = time.monotonic()
        self.record("load_start", model.name, options=options)
        try:
            await asyncio.sleep(model.size / 1e9 * self.load_seconds_per_gb)
        except asyncio.CancelledError:  # §0.4: the requesting client went away: abort the load
            self._drop(runner)
            self.record("load_aborted", model.name)
            raise
        finally:
            runner.loading = False
            runner.ready.set()
        self.record("load_done", model.name, seconds=time.monotonic() - started)
        return self._use(runner, None)

    def _use(self, runner: Runner, keep_alive: float | None) -> Runner:
        self._cancel_timer(runner)  # §1.6: the timer is stopped while requests are in flight
        if keep_alive is not None:
            runner.session_duration = keep_alive  # §1.6: absent keep_alive leaves the duration alone
        runner.ref_count += 1
        return runner

    def _release(self, runner: Runner) -> None:
        runner.ref_count -= 1
        if runner.ref_count > 0:
            return
        if runner.expired:
            self._schedule_unload(runner, 0.0)
        elif runner.session_duration <= 0:
            self.retire(runner, "keep_alive 0", UNLOAD_DELAY)
        else:  # §1.6: the idle window starts when the last request finishes
            runner.expires_at = time.time() + runner.session_duration
            if math.isfinite(runner.session_duration):
                self._schedule_unload(runner, runner.session_duration)

    def retire(self, runner: Runner, reason: str, delay: float = 0.0) -> None:
        """expireRunner (§1.6): duration 0; unload when idle (a loading runner finishes loading first)."""
        if runner.expired:
            return
        runner.expired, runner.reason, runner.session_duration = True, reason, 0.0
        runner.expires_at = time.time()
        self._cancel_timer(runner)
        if runner.ref_count == 0 and not runner.loading:
            self._schedule_unload(runner, delay)

    def _schedule_unload(self, runner: Runner, delay: float) -> None:
        self._cancel_timer(runner)
        runner.timer = asyncio.get_running_loop().call_later(delay, self._unload, runner)

    def _unload(self, runner: Runner) -> None:
        if self.runners.get(runner.model.digest) is runner and runner.ref_count == 0:
            self._drop(runner)
            self.record("unload", runner.model.name, reason=runner.reason)

    def _drop(self, runner: Runner) -> None:
        self._cancel_timer(runner)
        if self.runners.get(runner.model.digest) is runner:
            del self.runners[runner.model.digest]
        runner.gone.set()

    @staticmethod
    def _cancel_timer(runner: Runner) -> None:
        if runner.timer is not None:
            runner.timer.cancel()
            runner.timer = None

    async def _unless_disconnected(self, request: web.Request, work: Awaitable[Runner]) -> Runner:
        """§0.4/§1.8: a client that hangs up while queued or loading cancels its load; 499."""
        task = asyncio.ensure_future(work)
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=DISCONNECT_POLL)
                if not task.done() and (request.transport is None or request.transport.is_closing()):
                    task.cancel()
        except asyncio.CancelledError:  # the handler itself was cancelled (handler_cancellation=True)
            task.cancel()
            task.add_done_callback(lambda t: t.cancelled() or t.exception() or self._release(t.result()))
            raise
        if task.cancelled():
            raise ApiError(499, "request canceled")
        return task.result()


# -- tools, images and the Anthropic layer ----------------------------------------------------------

ANTHROPIC_SINCE = (0, 14)  # /v1/messages appeared in Ollama v0.14 (research/upstream_spec.md §1.3)
NO_VISION = "this model is missing data required for image input"  # model/model.go ErrNoVisionModel


def capabilities(model: EmulatedModel) -> list[str]:
    """/api/show's capabilities: what the model's template and weights can do."""
    if model.embedding:
        return ["embedding"]
    return ["completion"] + ["tools"] * model.tools + ["vision"] * model.vision


def check_abilities(model: EmulatedModel, tools: Any, images: int) -> None:
    """Ollama checks a request against the model's capabilities before scheduling it: tools for a model
    whose template has none are a 400 "<full name> does not support tools"; images for a model without a
    projector fail with ErrNoVisionModel (a 400 in current releases)."""
    if tools and not model.tools:
        name = model.name if "/" in model.name else f"registry.ollama.ai/library/{model.name}"
        raise ApiError(400, f"{name} does not support tools")
    if images and not model.vision:
        raise ApiError(400, NO_VISION)


def native_images(body: Json, chat: bool) -> int:
    if not chat:
        return len(body.get("images") or [])
    return sum(len(m.get("images") or []) for m in body.get("messages") or [] if isinstance(m, dict))


def openai_images(messages: Any) -> int:
    return sum(1 for m in messages or [] if isinstance(m, dict) and isinstance(m.get("content"), list)
               for p in m["content"] if isinstance(p, dict) and p.get("type") == "image_url")


def example_arguments(parameters: Any) -> Json:
    """Arguments a model would fill in for a JSON schema: an enum's first value, else a typed placeholder."""
    properties = parameters.get("properties") if isinstance(parameters, dict) else None
    out: Json = {}
    for name, schema in (properties or {}).items():
        schema = schema if isinstance(schema, dict) else {}
        if schema.get("enum"):
            out[name] = schema["enum"][0]
        else:
            kind = schema.get("type")
            out[name] = {"integer": 1, "number": 1.5, "boolean": True, "array": [], "object": {}}.get(
                kind if isinstance(kind, str) else "", "emulated")
    return out


def tool_calls_for(tools: Any, messages: Any, *, native: bool) -> list[Json]:
    """The emulated model's decision: offered tools and a conversation that does not end with a tool result
    get a call of the first tool; Ollama's native shape ({"id", "function": {"index", "name", "arguments"}})."""
    if not tools or not isinstance(tools, list):
        return []
    last = messages[-1] if isinstance(messages, list) and messages else {}
    if isinstance(last, dict) and last.get("role") == "tool":
        return []
    function = tools[0].get("function") if isinstance(tools[0], dict) else None
    if not isinstance(function, dict):
        return []
    arguments = example_arguments(function.get("parameters"))
    return [{"id": f"call_{random.getrandbits(32):08x}",
             "function": {"index": 0, "name": function.get("name", ""), "arguments": arguments}}]


def openai_tool_calls(calls: list[Json]) -> list[Json]:
    """Ollama's /v1 layer: arguments as a JSON string, an index and a type on each call."""
    return [{"id": c["id"], "index": c["function"]["index"], "type": "function",
             "function": {"name": c["function"]["name"], "arguments": dumps(c["function"]["arguments"])}}
            for c in calls]


def anthropic_to_chat(body: Json) -> tuple[list[Json], list[Json]]:
    """(messages, tools) of Ollama's /api/chat for an Anthropic request, as Ollama's Anthropic layer maps
    them (docs/api/anthropic-compatibility.mdx): the system prompt first; text joined; base64 images
    (URL images are not supported); tool_use blocks as tool calls; tool_result blocks as tool messages ahead
    of the turn's text; thinking blocks as thinking; input_schema as the function's parameters."""
    messages: list[Json] = []
    system = body.get("system")
    if isinstance(system, list):
        system = "".join(b.get("text", "") for b in system if isinstance(b, dict) and b.get("type") == "text")
    if isinstance(system, str) and system:
        messages.append({"role": "system", "content": system})
    for message in body.get("messages") or []:
        messages += anthropic_turn(message)
    tools = [{"type": "function", "function": {"name": t.get("name"), "description": t.get("description", ""),
                                               "parameters": t.get("input_schema") or {}}}
             for t in body.get("tools") or [] if isinstance(t, dict)]
    return messages, tools


def anthropic_turn(message: Any) -> list[Json]:
    if not isinstance(message, dict):
        raise ApiError(400, "invalid message")
    role, content = str(message.get("role", "")).lower(), message.get("content")
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
    text, images, calls, results, thinking = "", [], [], [], ""
    for block in blocks:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            text += block.get("text") or ""
        elif kind == "image":
            source = block.get("source") or {}
            if source.get("type") != "base64":
                raise ApiError(400, f"invalid image source type: {source.get('type')}. Only base64 images "
                                    "are supported.")
            images.append(source.get("data", ""))
        elif kind == "tool_use":
            if not block.get("id") or not block.get("name"):
                raise ApiError(400, "tool_use block missing required 'id' or 'name' field")
            calls.append({"id": block["id"], "function": {"name": block["name"], "arguments": block.get("input")}})
        elif kind == "tool_result":
            result = block.get("content")
            if isinstance(result, list):
                result = "".join(p.get("text", "") for p in result if isinstance(p, dict))
            results.append({"role": "tool", "content": result or "", "tool_call_id": block.get("tool_use_id")})
        elif kind == "thinking":
            thinking = block.get("thinking") or ""
    out = list(results) if role == "user" else []
    if text or images or calls or thinking:
        turn: Json = {"role": role, "content": text}
        turn.update({k: v for k, v in (("images", images), ("tool_calls", calls), ("thinking", thinking)) if v})
        out.append(turn)
    return out if role == "user" else out + results


def anthropic_stop_reason(reason: str, calls: bool) -> str:
    return "tool_use" if calls else {"stop": "end_turn", "length": "max_tokens"}.get(reason, "stop_sequence")


def anthropic_blocks(gen: Generation) -> list[Json]:
    text = "".join(gen.tokens)
    blocks: list[Json] = [{"type": "text", "text": text}] if text else []
    return blocks + [{"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                      "input": c["function"]["arguments"]} for c in gen.calls]


# -- the emulator ---------------------------------------------------------------------------------

class OllamaEmulator:
    """An Ollama server on loopback: the HTTP API, a scheduler, and an event log for assertions."""

    def __init__(self, models: list[EmulatedModel], *, load_seconds_per_gb: float = 0.2,
                 token_delay: float = 0.005, max_loaded: int = 3, max_queue: int = 512,
                 default_keep_alive: float = 300.0, host_check: bool = True, version: str = "0.32.15",
                 models_dir: str = "/root/.ollama/models", gpu: bool = False) -> None:
        self.token_delay, self.host_check, self.version, self.models_dir = (
            token_delay, host_check, version, models_dir)
        self.gpu = gpu  # every runner fully on a GPU (size_vram == size), else CPU-only (size_vram 0)
        self.scheduler = Scheduler(self._record, load_seconds_per_gb=load_seconds_per_gb,
                                   max_loaded=max_loaded, max_queue=max_queue,
                                   default_keep_alive=default_keep_alive)
        self._catalog = {m.name.lower(): m for m in models}  # what /api/pull can "download"
        self._models = dict(self._catalog)
        self._enforce_hosts = True
        self._site_runner: web.AppRunner | None = None
        self.events: list[Json] = []
        self.url = ""
        self.app = self._build_app()

    def __repr__(self) -> str:
        return f"<OllamaEmulator {self.url} {self.scheduler!r}>"

    # -- public test API --

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on host:port (0 = any free port) and return the base URL."""
        # §1.1: the Host check is only enforced when the listener is on loopback
        self._enforce_hosts = host in ("localhost", "::1") or host.startswith("127.")
        self._site_runner = web.AppRunner(self.app, shutdown_timeout=1.0)
        await self._site_runner.setup()
        await web.TCPSite(self._site_runner, host, port).start()
        bound = self._site_runner.addresses[0][1]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound}"
        return self.url

    async def stop(self) -> None:
        self.scheduler.stop()
        if self._site_runner is not None:
            await self._site_runner.cleanup()
            self._site_runner = None

    def loaded(self) -> dict[str, Json]:
        """What is loaded (or loading) now: model name -> runner state."""
        return {r.model.name: r.snapshot() for r in self.scheduler.runners.values()}

    def count(self, event: str, model: str | None = None) -> int:
        wanted = None if model is None else normalize(model)
        return sum(1 for e in self.events if e["event"] == event and wanted in (None, e["model"]))

    def expire(self, model: str) -> None:
        """Simulate an outside unload, as if another client had sent keep_alive 0 (§1.6 expireRunner)."""
        for runner in list(self.scheduler.runners.values()):
            if runner.model.name == normalize(model):
                self.scheduler.retire(runner, "expire", UNLOAD_DELAY)

    # -- plumbing --

    def _record(self, event: str, model: str | None, **extra: Any) -> None:
        self.events.append({"t": time.monotonic(), "event": event, "model": model, **extra})

    async def _body(self, request: web.Request) -> Json:
        """Bind the JSON body as gin does (§1.2: 400 for a missing or malformed body)."""
        raw = (await request.read()).decode("utf-8", "replace")
        if not raw.strip():
            raise ApiError(400, "missing request body")
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as err:
            char = raw[err.pos] if err.pos < len(raw) else ""
            raise ApiError(400, f"invalid character '{char}' looking for beginning of value" if char
                           else "unexpected EOF") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"json: cannot unmarshal {json_kind(body)} into Go value of type api.Request")
        name = body.get("model", body.get("name", body.get("source")))
        model = normalize(name) if isinstance(name, str) else None
        self._record("request", model, path=request.path, body=body)
        return body

    def _model(self, body: Json, legacy: bool = False) -> EmulatedModel:
        name = body.get("model") or (body.get("name") if legacy else None)
        if not isinstance(name, str) or not name:
            raise ApiError(400, "model is required")
        model = self._models.get(normalize(name).lower())  # §1.1: case-insensitive name match
        if model is None:
            raise ApiError(404, f"model '{name}' not found")
        return model

    @staticmethod
    def _capable(model: EmulatedModel, asked: str, what: str) -> None:
        if model.embedding:
            raise ApiError(400, f"{go_quote(asked)} does not support {what}")

    async def _decode(self, tokens: list[str]) -> AsyncIterator[str]:
        for token in tokens:
            await asyncio.sleep(self.token_delay)
            yield token

    @staticmethod
    async def _stream(request: web.Request, frames: AsyncIterator[Json], sse: bool) -> web.StreamResponse:
        """NDJSON lines (§1.4) or SSE frames ending in [DONE], each written and flushed at once."""
        kind = "text/event-stream" if sse else "application/x-ndjson"
        response = web.StreamResponse(headers={"Content-Type": kind, "Cache-Control": "no-cache"})
        await response.prepare(request)
        with suppress(ConnectionResetError):
            async for frame in frames:
                await response.write((f"data: {dumps(frame)}\n\n" if sse else dumps(frame) + "\n").encode())
            if sse:
                await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        return response

    # -- native API (§1.3) --

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        start, body = time.monotonic(), await self._body(request)
        keep_alive, model = parse_keep_alive(body), self._model(body)
        messages = body.get("messages") or []
        prompt = messages_text(messages) if chat else text_of(body.get("prompt"))
        empty = not messages if chat else prompt == ""
        if empty and keep_alive == 0:  # §0.3/§1.6: unload, answered at once (also when not loaded)
            if (runner := self.scheduler.runners.get(model.digest)) is not None:
                self.scheduler.retire(runner, "unload request", UNLOAD_DELAY)
            return json_response(native_done(body["model"], chat, "unload"))
        self._capable(model, body["model"], "chat" if chat else "generate")
        tools = body.get("tools") if chat else None
        check_abilities(model, tools, native_images(body, chat))
        options = check_options(body.get("options"))
        async with self.scheduler.lease(request, model, options, keep_alive):
            if empty:  # §0.3: load without generating
                return json_response(native_done(body["model"], chat, "load"))
            gen = Generation(body["model"], model.name, prompt, options.get("num_predict"), start)
            gen.with_calls(tool_calls_for(tools, messages, native=True) if chat else [])
            frames = self._native_frames(gen, chat)
            if body.get("stream", True) is not False:
                return await self._stream(request, frames, sse=False)
            final = [f async for f in frames][-1]
            final["message" if chat else "response"] = (
                {"role": "assistant", "content": "".join(gen.tokens)} if chat else "".join(gen.tokens))
            if gen.calls:
                final["message"]["tool_calls"] = gen.calls
            return json_response(final)

    async def _native_frames(self, gen: Generation, chat: bool) -> AsyncIterator[Json]:
        async for token in self._decode(gen.tokens):
            text = {"message": {"role": "assistant", "content": token}} if chat else {"response": token}
            yield {"model": gen.model, "created_at": rfc3339(time.time(), utc=True), **text, "done": False}
        if gen.calls:  # Ollama streams tool calls in a chunk of their own, before the final one
            message = {"role": "assistant", "content": "", "tool_calls": gen.calls}
            yield {"model": gen.model, "created_at": rfc3339(time.time(), utc=True), "message": message,
                   "done": False}
        final = {**native_done(gen.model, chat, gen.reason), **gen.metrics()}
        yield final if chat else {**final, "context": gen.context()}

    async def _embed_texts(self, request: web.Request, body: Json, texts: list[str]) -> tuple[Json, Any]:
        """Load (empty input = load only, §0.3) and embed; returns the timing fields and vectors."""
        start, keep_alive, model = time.monotonic(), parse_keep_alive(body), self._model(body)
        options = check_options(body.get("options"))
        async with self.scheduler.lease(request, model, options, keep_alive):
            loaded = time.monotonic()
            vectors = [fake_embedding(model.name, t) for t in texts]
            timing = {"total_duration": ns(time.monotonic() - start), "load_duration": ns(loaded - start),
                      "prompt_eval_count": sum(max(1, len(t.split())) for t in texts)}
            return timing, vectors

    async def _embed(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        raw = body.get("input")
        texts = [raw] if isinstance(raw, str) and raw else [] if raw in (None, "") else raw
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "invalid input type")
        timing, vectors = await self._embed_texts(request, body, texts)
        if not texts:
            return json_response({"model": body["model"], "embeddings": []})
        return json_response({"model": body["model"], "embeddings": vectors, **timing})

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        prompt = text_of(body.get("prompt"))
        _, vectors = await self._embed_texts(request, body, [prompt] if prompt else [])
        return json_response({"embedding": vectors[0] if vectors else []})

    async def _tags(self, request: web.Request) -> web.Response:
        models = sorted(self._models.values(), key=lambda m: (-m.modified_at, m.name))
        return json_response({"models": [m.tag() for m in models]})

    async def _ps(self, request: web.Request) -> web.Response:
        # §1.7: sorted by expires_at, latest first
        runners = sorted(self.scheduler.runners.values(), key=lambda r: -r.expires_at)
        return json_response({"models": [self._ps_entry(r) for r in runners]})

    def _ps_entry(self, runner: Runner) -> Json:
        # §1.7: size = runner footprint (here the file size); size_vram = its part on the GPU: all of it
        # with a GPU that fits it (the CLI's "100% GPU"), 0 on a CPU-only server ("100% CPU").
        model = runner.model
        return {"name": model.name, "model": model.name, "size": model.size, "digest": model.digest,
                "details": model.details(), "expires_at": rfc3339(runner.expires_at),
                "size_vram": model.size if self.gpu else 0, "context_length": runner.options["num_ctx"]}

    async def _show(self, request: web.Request) -> web.Response:
        model = self._model(await self._body(request), legacy=True)  # does not load (§1.3)
        modelfile = (f'# Modelfile generated by "ollama show"\n# FROM {model.name}\n\n'
                     f"FROM {self.models_dir}/blobs/sha256-{model.digest}\n"
                     'TEMPLATE "{{ .Prompt }}"\nPARAMETER stop "<|end|>"\n')
        info = {"general.architecture": model.family, "general.parameter_count": model.size * 2,
                f"{model.family}.context_length": 32768, f"{model.family}.embedding_length": 8}
        shown: Json = {
            "license": "", "modelfile": modelfile, "parameters": 'stop "<|end|>"',
            "template": "{{ .Prompt }}", "details": model.details(), "model_info": info,
            "modified_at": rfc3339(model.modified_at)}
        # `capabilities` came with Ollama v0.6.4 (ollama/ollama#10066, "server: add capabilities to show"):
        # an older server does not say what a model can do (server/images.go: completion, embedding, ...).
        if version_tuple(self.version) >= (0, 6, 4):
            shown["capabilities"] = capabilities(model)
        return json_response(shown)

    async def _pull(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "model is required")
        source = self._catalog.get(normalize(name).lower())
        steps = self._pull_steps(source)
        if body.get("stream", True) is False:  # only the last object; an error becomes a 500
            return json_response(steps[-1], 500 if "error" in steps[-1] else 200)

        async def frames() -> AsyncIterator[Json]:
            for step in steps:
                yield step
        return await self._stream(request, frames(), sse=False)

    def _pull_steps(self, source: EmulatedModel | None) -> list[Json]:
        if source is None:  # only models the emulator was given can be "downloaded"
            return [{"status": "pulling manifest"}, {"error": "pull model manifest: file does not exist"}]
        self._models.setdefault(source.name.lower(), source)
        layer = {"digest": f"sha256:{source.digest}", "total": source.size}
        return [{"status": "pulling manifest"},
                {"status": f"pulling {source.digest[:12]}", **layer, "completed": 0},
                {"status": f"pulling {source.digest[:12]}", **layer, "completed": source.size},
                {"status": "verifying sha256 digest"}, {"status": "writing manifest"}, {"status": "success"}]

    async def _copy(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        source, destination = body.get("source"), body.get("destination")
        model = self._models.get(normalize(source).lower()) if isinstance(source, str) and source else None
        if model is None:
            raise ApiError(404, f'model "{source}" not found')
        if not isinstance(destination, str) or not destination:
            raise ApiError(400, "destination is required")
        copy = replace(model, name=destination, modified_at=time.time())  # same blob digest
        self._models[copy.name.lower()] = copy
        return web.Response(status=200)

    async def _delete(self, request: web.Request) -> web.Response:
        model = self._model(await self._body(request), legacy=True)
        del self._models[model.name.lower()]  # a loaded runner stays loaded (ollama#4443)
        return web.Response(status=200)

    # -- OpenAI compatibility (§1.3, §1.9) --

    async def _v1_chat(self, request: web.Request) -> web.StreamResponse:
        start, body = time.monotonic(), await self._body(request)
        messages = body.get("messages")
        if not messages or not isinstance(messages, list):
            raise ApiError(400, "[] is too short - 'messages'")  # §1.9: no preload through /v1
        return await self._v1_generate(request, body, start, messages_text(messages), chat=True)

    async def _v1_completions(self, request: web.Request) -> web.StreamResponse:
        start, body = time.monotonic(), await self._body(request)
        return await self._v1_generate(request, body, start, text_of(body.get("prompt")), chat=False)

    async def _v1_generate(self, request: web.Request, body: Json, start: float, prompt: str,
                           chat: bool) -> web.StreamResponse:
        model = self._model(body)
        self._capable(model, body["model"], "chat" if chat else "generate")
        tools = body.get("tools") if chat else None
        messages = body.get("messages") if chat else []
        check_abilities(model, tools, openai_images(messages))
        # §1.9: /v1 carries neither keep_alive nor options such as num_ctx
        async with self.scheduler.lease(request, model, {}, None):
            gen = Generation(body["model"], model.name, prompt, body.get("max_tokens"), start)
            gen.with_calls(tool_calls_for(tools, messages, native=True))
            prefix = "chatcmpl" if chat else "cmpl"
            cid = f"{prefix}-{random.randint(0, 998)}"
            if body.get("stream") is True:
                usage = bool((body.get("stream_options") or {}).get("include_usage"))
                return await self._stream(request, self._v1_frames(gen, cid, chat, usage), sse=True)
            async for _ in self._decode(gen.tokens):
                pass
            return json_response(self._v1_whole(gen, cid, chat))

    async def _v1_frames(self, gen: Generation, cid: str, chat: bool, usage: bool) -> AsyncIterator[Json]:
        """§1.4 OpenAI SSE: role in the first delta, an empty-delta finish chunk, then optional usage."""
        kind = "chat.completion.chunk" if chat else "text_completion"
        first = True
        async for token in self._decode(gen.tokens):
            delta = {"role": "assistant", "content": token} if first else {"content": token}
            choice = {"index": 0, "delta": delta} if chat else {"index": 0, "text": token}
            first = False
            yield openai_chunk(gen, cid, kind, [{**choice, "finish_reason": None}])
        if gen.calls:  # Ollama's /v1 layer: one delta carrying every call, then finish_reason tool_calls
            delta = {"role": "assistant", "content": "", "tool_calls": openai_tool_calls(gen.calls)}
            yield openai_chunk(gen, cid, kind, [{"index": 0, "delta": delta, "finish_reason": None}])
        end = {"index": 0, "delta": {}} if chat else {"index": 0, "text": ""}
        reason = "tool_calls" if gen.calls else gen.reason
        yield openai_chunk(gen, cid, kind, [{**end, "finish_reason": reason}])
        if usage:
            yield openai_chunk(gen, cid, kind, [], usage=gen.usage())

    @staticmethod
    def _v1_whole(gen: Generation, cid: str, chat: bool) -> Json:
        text = "".join(gen.tokens)
        choice: Json = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {
            "index": 0, "text": text}
        if gen.calls:
            choice["message"]["tool_calls"] = openai_tool_calls(gen.calls)
        kind = "chat.completion" if chat else "text_completion"
        reason = "tool_calls" if gen.calls else gen.reason
        return openai_chunk(gen, cid, kind, [{**choice, "finish_reason": reason}], usage=gen.usage())

    async def _v1_embeddings(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        raw = body.get("input")
        texts = [raw] if isinstance(raw, str) else raw
        if not texts or not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "invalid input")
        timing, vectors = await self._embed_texts(request, body, texts)
        data = [{"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)]
        tokens = timing["prompt_eval_count"]
        return json_response({"object": "list", "data": data, "model": body["model"],
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def _v1_models(self, request: web.Request) -> web.Response:
        return json_response({"object": "list", "data": [self._v1_model(m) for m in self._models.values()]})

    async def _v1_model_one(self, request: web.Request) -> web.Response:
        model = self._model({"model": request.match_info["model"]})
        return json_response(self._v1_model(model))

    @staticmethod
    def _v1_model(model: EmulatedModel) -> Json:
        owner = model.name.split("/")[-2] if "/" in model.name else "library"
        return {"id": model.name, "object": "model", "created": int(model.modified_at), "owned_by": owner}

    # -- Anthropic compatibility (v0.14+, docs/api/anthropic-compatibility.mdx) --

    async def _v1_messages(self, request: web.Request) -> web.StreamResponse:
        """/v1/messages as Ollama's Anthropic layer serves it: converted to a chat (options from max_tokens,
        temperature, top_p, top_k, stop_sequences; no keep_alive), answered as a message or as the events
        message_start, content_block_start/delta/stop, message_delta and message_stop. tool_choice and
        count_tokens are documented as unsupported."""
        start, body = time.monotonic(), await self._body(request)
        model = self._model(body)
        self._capable(model, body["model"], "chat")
        messages, tools = anthropic_to_chat(body)
        check_abilities(model, tools, native_images({"messages": messages}, True))
        async with self.scheduler.lease(request, model, {}, None):
            gen = Generation(body["model"], model.name, messages_text(messages), body.get("max_tokens"), start)
            gen.with_calls(tool_calls_for(tools, messages, native=True))
            message_id = f"msg_{random.getrandbits(96):024x}"
            if body.get("stream") is True:
                return await self._named_events(request, self._anthropic_events(gen, message_id))
            async for _ in self._decode(gen.tokens):
                pass
            return json_response({
                "id": message_id, "type": "message", "role": "assistant", "model": gen.model,
                "content": anthropic_blocks(gen), "stop_reason": anthropic_stop_reason(gen.reason, bool(gen.calls)),
                "usage": {"input_tokens": gen.prompt_tokens, "output_tokens": gen.output_tokens}})

    async def _anthropic_events(self, gen: Generation, message_id: str) -> AsyncIterator[tuple[str, Json]]:
        start = {"id": message_id, "type": "message", "role": "assistant", "model": gen.model, "content": [],
                 "usage": {"input_tokens": gen.prompt_tokens, "output_tokens": 0}}
        yield "message_start", {"type": "message_start", "message": start}
        index, text_open = 0, False
        async for token in self._decode(gen.tokens):
            if not text_open:
                text_open = True
                yield "content_block_start", {"type": "content_block_start", "index": index,
                                              "content_block": {"type": "text", "text": ""}}
            yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                          "delta": {"type": "text_delta", "text": token}}
        for block in anthropic_blocks(gen):
            if block["type"] != "tool_use":
                continue
            if text_open:
                yield "content_block_stop", {"type": "content_block_stop", "index": index}
                text_open, index = False, index + 1
            yield "content_block_start", {"type": "content_block_start", "index": index,
                                          "content_block": {**block, "input": {}}}
            yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                          "delta": {"type": "input_json_delta", "partial_json": dumps(block["input"])}}
            yield "content_block_stop", {"type": "content_block_stop", "index": index}
            index += 1
        if text_open:
            yield "content_block_stop", {"type": "content_block_stop", "index": index}
        usage = {"input_tokens": gen.prompt_tokens, "output_tokens": gen.output_tokens}
        yield "message_delta", {"type": "message_delta", "usage": usage,
                                "delta": {"stop_reason": anthropic_stop_reason(gen.reason, bool(gen.calls))}}
        yield "message_stop", {"type": "message_stop"}

    @staticmethod
    async def _named_events(request: web.Request, events: AsyncIterator[tuple[str, Json]]) -> web.StreamResponse:
        """Named SSE events (`event:` and `data:` lines), each written and flushed at once."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        with suppress(ConnectionResetError):
            async for name, data in events:
                await response.write(f"event: {name}\ndata: {dumps(data)}\n\n".encode())
            await response.write_eof()
        return response

    # -- app --

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        checked = self.host_check and self._enforce_hosts
        if checked and not request.path.startswith("/_emulator/") and not host_allowed(
                request.headers.get("Host", "")):
            return web.Response(status=403)  # §0.1: 403 with an empty body
        if request.method == "OPTIONS":
            return web.Response(status=204)
        try:
            return await handler(request)
        except ApiError as err:
            if request.path.startswith("/v1/messages"):
                return err.render_anthropic()
            return err.render(openai=request.path.startswith("/v1/"))
        except web.HTTPMethodNotAllowed:  # §1.1: gin's HandleMethodNotAllowed
            return web.Response(status=405, text="405 method not allowed")
        except web.HTTPNotFound:
            return web.Response(status=404, text="404 page not found")

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        for path, handler in [("/", self._root), ("/api/version", self._version),
                              ("/api/tags", self._tags)]:
            app.router.add_get(path, handler)  # GET and HEAD
        for path, handler in [("/api/ps", self._ps), ("/v1/models", self._v1_models),
                              ("/v1/models/{model:.+}", self._v1_model_one),
                              ("/_emulator/events", self._events), ("/_emulator/loaded", self._loaded)]:
            app.router.add_get(path, handler, allow_head=False)
        for path, handler in [("/api/generate", partial(self._complete, chat=False)),
                              ("/api/chat", partial(self._complete, chat=True)),
                              ("/api/embed", self._embed), ("/api/embeddings", self._embeddings),
                              ("/api/show", self._show), ("/api/pull", self._pull), ("/api/copy", self._copy),
                              ("/v1/chat/completions", self._v1_chat),
                              ("/v1/completions", self._v1_completions),
                              ("/v1/embeddings", self._v1_embeddings)]:
            app.router.add_post(path, handler)
        if version_tuple(self.version) >= ANTHROPIC_SINCE:  # older versions answer gin's 404
            app.router.add_post("/v1/messages", self._v1_messages)
        app.router.add_delete("/api/delete", self._delete)
        return app

    async def _root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")  # text/plain; charset=utf-8

    async def _version(self, request: web.Request) -> web.Response:
        return json_response({"version": self.version})

    async def _events(self, request: web.Request) -> web.Response:
        return json_response(self.events)

    async def _loaded(self, request: web.Request) -> web.Response:
        return json_response(self.loaded())


# -- standalone ---------------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    """'4GB', '300MB', '1.5GiB', '123' -> bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(I?)B?\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    number, prefix, binary = match.groups()
    return int(float(number) * (1024 if binary else 1000) ** " KMGT".index(prefix or " "))


def parse_model_spec(spec: str) -> EmulatedModel:
    """'qwen2.5:7b=4GB', 'nomic-embed-text=300MB:embed' or just a name."""
    name, _, rest = spec.partition("=")
    size, _, flag = rest.partition(":")
    return EmulatedModel(name, size=parse_size(size) if size else 500_000_000, embedding=flag == "embed")


async def serve(args: argparse.Namespace) -> None:
    emulator = OllamaEmulator(
        [parse_model_spec(m) for m in args.model], load_seconds_per_gb=args.load_seconds_per_gb,
        token_delay=args.token_delay, max_loaded=args.max_loaded, max_queue=args.max_queue,
        default_keep_alive=args.keep_alive, host_check=not args.no_host_check)
    print(await emulator.start(args.host, args.port), flush=True)
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await emulator.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Ollama emulator for warmpool tests")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--model", action="append", default=[], help="name[=SIZE][:embed]")
    parser.add_argument("--load-seconds-per-gb", type=float, default=0.2)
    parser.add_argument("--token-delay", type=float, default=0.005)
    parser.add_argument("--max-loaded", type=int, default=3)
    parser.add_argument("--max-queue", type=int, default=512)
    parser.add_argument("--keep-alive", type=float, default=300.0, help="default keep_alive, seconds")
    parser.add_argument("--no-host-check", action="store_true")
    asyncio.run(serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
