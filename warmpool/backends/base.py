"""The backend interface: what the scheduler and the proxy may ask of an upstream (`Backend`), and what an
upstream's answer looks like to the relay (`Upstream`).

Only modules in `warmpool.backends` talk to upstreams. A backend forwards a request and hands back the
upstream's response unread, so the proxy can relay it chunk by chunk; it loads and unloads models when
the scheduler says so, and reports what is resident. What only some kinds of backend can do is declared
as a capability here (a class attribute or a method with a neutral default), never found out with
isinstance by the code that asks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from warmpool.backends.control import make_session
from warmpool.config import BackendConfig, Config, ModelConfig
from warmpool.errors import BackendError, BackendTimeout, Dialect
from warmpool.http.client import ConnectFailed, Origin, UpstreamBroken
from warmpool.http.wire import encode_headers, forwardable
from warmpool.metrics import Sample

# Hop-by-hop headers (RFC 9110 §7.6.1) and those the client stack recomputes: never forwarded.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length", "authorization",
    "x-warmpool-phase", "x-warmpool-session", "x-warmpool-priority", "x-api-key",
})
# Also never forwarded: the body is re-serialised JSON, whatever type the client claimed (curl's default
# form type would lie); and Expect: 100-continue, since warmpool already holds the whole body and sends it
# with the head.
NOT_FORWARDED = HOP_BY_HOP | {"content-type", "expect"}
NOT_FORWARDED_RAW = frozenset(name.encode() for name in NOT_FORWARDED)
JSON_TYPE = b"Content-Type: application/json\r\n"


@dataclass(slots=True)
class LoadResult:
    """What one load cost, measured by warmpool (seconds)."""

    seconds: float
    details: dict[str, float] = field(default_factory=dict)
    size: int | None = None  # bytes the loaded model occupies, when the backend reports it
    # Whether the load ran until the model produced a token. False: the model is loaded, but its weights
    # may be read only by its first request (the backend then reports that answer through `on_answered`,
    # and the swap is over only then).
    answered: bool = True


@dataclass(slots=True)
class ResidentModel:
    """A model the backend reports as loaded, with what /api/ps shows about it (Ollama's fields)."""

    name: str  # configured model name
    size: int = 0  # bytes it occupies (Ollama: weights, KV cache and graph)
    expires_at: str | None = None  # when the upstream would unload it on its own
    context_length: int = 0
    details: dict[str, Any] = field(default_factory=dict)  # Ollama's `details` object
    digest: str | None = None
    size_vram: int = 0  # the part of `size` in GPU memory


__all__ = ["AnsweredCallback", "Backend", "Dialect", "LoadResult", "LostCallback", "ResidentModel", "Upstream",
           "UpstreamBroken"]


class Upstream(Protocol):
    """An upstream's answer with its body unread, as the proxy relays it. Reads raise `UpstreamBroken` when
    the upstream breaks the connection and TimeoutError when it goes silent; `close()` releases it (early:
    the upstream learns its client left)."""

    @property
    def status(self) -> int: ...
    @property
    def reason(self) -> str: ...
    @property
    def headers(self) -> list[tuple[str, str]]: ...
    @property
    def content_length(self) -> int | None: ...

    def header(self, name: str) -> str | None: ...

    async def readany(self) -> bytes:
        """The next part of the body as it arrives; b"" at its end."""
        ...

    async def pipe(self, sink: Callable[[bytes], bool]) -> bool:
        """The body to `sink` chunk by chunk as it arrives, with no wake-up of the caller per chunk; True at
        its end, False when `sink` returned True (full: call again once its receiver has room)."""
        ...

    async def read(self) -> bytes: ...

    def close(self) -> None: ...


LostCallback = Callable[[str, str], None]  # (model, reason): a model vanished without warmpool unloading it
AnsweredCallback = Callable[[str], None]  # (model): the first request after a load got its first bytes


def _nobody_listens(model: str, reason: str) -> None:
    pass


def _nobody_waits(model: str) -> None:
    pass


class Backend:
    """Base class. Subclasses: OllamaBackend, LlamaCppBackend, CommandBackend, OpenAIBackend."""

    speaks: Dialect = "openai"  # the dialect its inference endpoints speak
    managed = True  # whether the scheduler decides what is loaded (False: forward only)
    # Whether the upstream unloads models on its own (Ollama's keep_alive): warmpool then polls what it
    # has loaded (`loaded_expiries`) and re-arms what should stay.
    expires_models = False

    def __init__(self, config: BackendConfig, app_config: Config) -> None:
        self.config = config
        self.name = config.name
        self.app_config = app_config
        self.models = {m.name: m for m in app_config.models.values() if m.backend == config.name}
        self.on_lost: LostCallback = _nobody_listens
        self.on_answered: AnsweredCallback = _nobody_waits
        self.healthy_once = False
        self._session: aiohttp.ClientSession | None = None
        self._origins: dict[str, Origin] = {}
        self._own_block = encode_headers(self.own_headers())
        self._prober: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} models={sorted(self.models)}>"

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = make_session(self.app_config)
        return self._session

    def report_losses_to(self, callback: LostCallback) -> None:
        """Where to report a model that left the upstream without warmpool unloading it (a crashed server):
        the pool that owns this backend subscribes when it is built."""
        self.on_lost = callback

    def report_answers_to(self, callback: AnsweredCallback) -> None:
        """Where to report that a model loaded with `LoadResult.answered` false has answered its first
        request (or that its first request ended without an answer): the swap's timing ends there."""
        self.on_answered = callback

    async def start(self) -> None:
        """Start probing the upstream in the background; an upstream that is down is never fatal."""
        self._prober = asyncio.create_task(self._probe_until_healthy(), name=f"probe:{self.name}")

    async def _probe_until_healthy(self) -> None:
        delay = 0.25
        while not await self.health():
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None
        for origin in self._origins.values():
            origin.close()
        self._origins.clear()

    async def health(self) -> bool:
        raise NotImplementedError

    async def load(self, model: ModelConfig) -> LoadResult:
        raise NotImplementedError

    async def unload(self, model: ModelConfig) -> None:
        raise NotImplementedError

    async def resident(self) -> list[ResidentModel]:
        raise NotImplementedError

    def size_hint(self, model: ModelConfig) -> int:
        """Bytes `model` is expected to occupy before it was ever loaded (0: unknown)."""
        return model.size or 0

    def embedding_only(self, model: ModelConfig) -> bool:
        """Whether `model` is known to serve embeddings only (a generate or chat request is refused)."""
        return False

    def note_request(self, model: ModelConfig, path: str) -> None:
        """A request on `path` is about to use `model`: a hint at what the model is (an embedding request
        for a model of unknown kind) for the load it may cause."""

    async def loaded_expiries(self) -> dict[str, float | None]:
        """Configured name -> when the upstream will unload it on its own (epoch seconds; None: never), for
        every model it reports loaded. Only for backends that `expires_models`."""
        raise NotImplementedError

    def lease_seconds(self, model: ModelConfig) -> float | None:
        """How long the upstream is asked to keep `model` loaded when idle (None: not asked)."""
        return None

    async def ollama_version(self) -> str | None:
        """The Ollama API version the upstream reports; None where it is not an Ollama server."""
        return None

    async def catalog(self) -> dict[str, dict[str, Any]] | None:
        """The upstream's own listing entries (Ollama's /api/tags) by configured model name; None where
        the upstream keeps no catalog of its own."""
        return None

    # What the upstream's OpenAI chat endpoint accepts: `response_format` of type json_schema, and an
    # assistant message whose content is null (one that only calls tools). Where not, warmpool rewrites both
    # to the forms it does accept.
    accepts_json_schema_format = True
    accepts_null_content = True
    # The path of the upstream's tokenizer (llama-cpp-python's /extras/tokenize/count, llama-server's
    # /tokenize), for /v1/messages/count_tokens; None where it has none reachable.
    tokenize_path: str | None = None

    def serves_natively(self, path: str) -> bool:
        """Whether the upstream serves a client endpoint warmpool would otherwise translate (Ollama ≥ 0.14 has
        /v1/messages), as far as warmpool has learned; answering False is always safe."""
        return False

    def reads_images(self, model: ModelConfig) -> bool | None:
        """Whether `model` can take images: True, False, or None when warmpool cannot tell (the upstream then
        answers for itself)."""
        return None

    def idle(self) -> None:
        """Called by the scheduler when none of this backend's models has a request running (the last
        one ended, or a swap ended with nobody waiting): a moment for background work that would slow a
        generation down."""

    def state_metrics(self) -> Iterable[Sample]:
        """Metrics read at scrape time from this backend's own state (e.g. the context it keeps)."""
        return ()

    def status(self) -> dict[str, Any] | None:
        """What the status API shows about this backend beyond its pool (None: nothing)."""
        return None

    def base_url(self, model: ModelConfig | None) -> str:
        """Where requests for `model` go."""
        raise NotImplementedError

    def rewrite_body(self, model: ModelConfig, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """The body to send upstream: the model renamed to what the backend knows it as."""
        return {**body, "model": model.upstream_name}

    def own_headers(self) -> list[tuple[str, str]]:
        """Headers this backend adds to every request (an API key, for one)."""
        return []

    async def forward(
        self, model: ModelConfig | None, method: str, path: str, raw_headers: Iterable[tuple[bytes, bytes]],
        body: bytes, *, query: str = "",
    ) -> Upstream:
        """Send the request upstream with the client's raw headers (minus hop-by-hop ones); return the
        response with its body unread (the caller must close it)."""
        base = self.base_url(model)
        origin = self._origins.get(base) or self._origin(base)
        target = f"{path}?{query}" if query else path
        headers = forwardable(raw_headers, NOT_FORWARDED_RAW) + self._own_block + (JSON_TYPE if body else b"")
        first_byte = self.app_config.timeouts.first_byte
        try:
            return await origin.request(method, target, headers, body, timeout=first_byte)
        except TimeoutError:
            reason = f"no response within {first_byte:g} s ({method} {base}{target})"
            raise BackendTimeout(self.name, reason) from None
        except ConnectFailed as exc:
            raise BackendError(self.name, f"cannot connect to {base}: {exc}") from exc
        except UpstreamBroken as exc:
            raise BackendError(self.name, f"connection dropped ({method} {base}{target}): {exc}") from exc

    def _origin(self, base: str) -> Origin:
        # A managed llama.cpp server gets a new port at every start: forget origins nothing uses any more.
        for unused in [url for url, origin in self._origins.items() if origin.open_connections == 0]:
            del self._origins[unused]
        timeouts = self.app_config.timeouts
        origin = Origin(base, connect_timeout=timeouts.connect, idle_timeout=timeouts.idle)
        self._origins[base] = origin
        return origin
