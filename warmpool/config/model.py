"""The configuration's shape: the frozen dataclasses every other module reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from warmpool.config.placeholders import used
from warmpool.config.values import parse_size

BackendKind = Literal["ollama", "llamacpp", "command", "openai"]
Priority = Literal["interactive", "batch"]  # a request's class: X-Warmpool-Priority, else its phase's default


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"  # debug | info | warning | error
    format: str = "text"  # text | json


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    connect: float = 10.0  # seconds to open a TCP connection to an upstream
    first_byte: float = 600.0  # seconds an upstream may take to start answering (→ 504)
    idle: float = 600.0  # seconds an upstream stream may stay silent between chunks (→ 504 / cut)
    shutdown: float = 30.0  # seconds running streams get to finish on SIGTERM


@dataclass(frozen=True, slots=True)
class AuthConfig:
    api_keys: tuple[str, ...] = ()  # proxied requests need one (Bearer) when set
    admin_keys: tuple[str, ...] = ()  # /warmpool/* admin endpoints need one when set


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_queue: int = 256  # waiting requests per pool before 503 + Retry-After
    queue_timeout: float = 600.0  # seconds a request may wait for its model (→ 504)
    max_wait: float = 30.0  # after this, the oldest waiter is served even if it costs a swap
    # At most this long after its load, a model is kept while keeping it saves work (requests for it
    # queued, or one expected sooner than a swap back would cost); never as a fixed hold.
    min_residency: float = 0.0
    load_ahead: bool = True  # load the next model before the current one goes, where the budget has room
    prefetch: bool = True  # learn each session's phase order and prepare the likely next model
    prefetch_threshold: float = 0.6  # share of a step's observed successors a prediction needs
    interactive_max_wait: float = 5.0  # after this, an interactive waiter cuts a batch model's residency short
    default_priority: Priority = "interactive"
    priorities: dict[str, Priority] = field(default_factory=dict)  # phase -> its requests' default class


@dataclass(frozen=True, slots=True)
class BackendConfig:
    name: str
    kind: BackendKind
    url: str | None = None  # ollama / openai: base URL; llamacpp: not allowed
    api_key: str | None = None  # openai: sent upstream as Bearer (secret)
    max_resident: int = 1  # models loaded at once in this pool
    vram_budget: int | None = None  # bytes; if set, sizes must fit instead of counting models
    # managed servers (llamacpp, command):
    start_timeout: float = 300.0  # seconds for a managed server to become healthy
    stop_grace: float = 10.0  # seconds between SIGTERM and SIGKILL
    # managed llama.cpp only:
    python: str | None = None  # interpreter that has llama_cpp installed; default: warmpool's own
    # Context kept across swaps (llamacpp: saved KV states of recent conversations; command: saved
    # server slots): at most context_budget bytes, in context_dir.
    context_budget: int = 1 << 30  # bytes of saved state kept; 0 keeps none
    # context_dir None: for llamacpp a private directory under /dev/shm; for command
    # ${XDG_CACHE_HOME:-~/.cache}/warmpool/contexts/<backend>
    context_dir: str | None = None
    context_spill_dir: str | None = None  # llamacpp: a directory on disk for states pushed out of RAM; None: dropped
    context_spill_budget: int = 4 << 30  # bytes of saved state kept in context_spill_dir
    context_min_tokens: int = 64  # llamacpp: shorter conversations are not worth saving
    idle_default: str | None = None  # model to load again once the pool has been idle for `idle_after`
    idle_after: float | None = None  # seconds of idleness before returning to `idle_default`


@dataclass(frozen=True, slots=True)
class LlamaCppModel:
    """How a managed llama.cpp server loads the model (models of a `llamacpp` backend)."""

    gguf: str  # path to the GGUF file
    n_ctx: int = 2048
    n_gpu_layers: int = 0
    n_threads: int | None = None
    n_batch: int = 512
    chat_format: str | None = None
    use_mmap: bool = True
    use_mlock: bool = False
    server_args: dict[str, Any] = field(default_factory=dict)  # extra llama_cpp.server model settings


@dataclass(frozen=True, slots=True)
class CommandModel:
    """How warmpool starts the server of a model of a `command` backend. `command` and `env` are templates:
    ${PORT}, ${MODEL}, ${GGUF} and ${SLOT_DIR} are filled in at each start (config/placeholders.py)."""

    command: tuple[str, ...]  # the argv, never run through a shell
    gguf: str | None = None  # the weight file ${GGUF} names (and the RAM tier keeps warm)
    health: str = "/health"  # a path on the server that answers 200 once it can serve
    env: dict[str, str] = field(default_factory=dict)  # added to warmpool's environment for the server

    @property
    def keeps_context(self) -> bool:
        """Whether the server is given a slot directory (llama-server's --slot-save-path ${SLOT_DIR}), so
        its slots are saved before it stops and restored after it starts."""
        return any("SLOT_DIR" in used(text) for text in (*self.command, *self.env.values()))


@dataclass(frozen=True, slots=True)
class OllamaModel:
    """How Ollama loads the model (models of an `ollama` backend)."""

    options: dict[str, Any] = field(default_factory=dict)  # load-time options (num_ctx, ...)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """A model as clients name it and as the scheduler treats it; what only one backend kind needs lives in
    that kind's part (`llamacpp`, `ollama`, `command`), set for models of that kind. The config file keeps them flat."""

    name: str  # the name clients use
    backend: str
    upstream_name: str  # the name the backend knows (Ollama tag); defaults to `name`
    embedding: bool = False
    keep_alive: float | None = None  # seconds an idle model stays loaded; None = forever while in budget
    pin: bool = False
    min_residency: float | None = None  # overrides scheduler.min_residency
    size: int | None = None  # bytes in (V)RAM when loaded, if known
    llamacpp: LlamaCppModel | None = None
    ollama: OllamaModel | None = None
    command: CommandModel | None = None

    @property
    def gguf(self) -> str | None:
        """The configured weight file (llamacpp and command models); None where warmpool has to find it."""
        if self.llamacpp is not None:
            return self.llamacpp.gguf
        return self.command.gguf if self.command is not None else None


Strategy = Literal["read", "madvise", "mlock"]


@dataclass(frozen=True, slots=True)
class MemoryAmount:
    """A number of bytes, or a percentage of total RAM."""

    bytes: int | None = None
    percent: float | None = None

    def of(self, total: int) -> int:
        return self.bytes if self.bytes is not None else int(total * (self.percent or 0.0) / 100)

    @classmethod
    def parse(cls, value: object) -> MemoryAmount:
        """From 8589934592, "8GiB" or "50%"; raises ValueError."""
        if isinstance(value, str) and value.strip().endswith("%"):
            percent = float(value.strip()[:-1])
            if not 0 <= percent <= 100:
                raise ValueError(f"expected a percentage between 0% and 100%, got {value!r}")
            return cls(percent=percent)
        return cls(bytes=parse_size(value))

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.bytes is None else f"{self.bytes} bytes"


@dataclass(frozen=True, slots=True)
class RamTierConfig:
    """The `ram_tier:` section: which weight files stay warm in the page cache, and within what."""

    enabled: bool = True
    budget: MemoryAmount = MemoryAmount(percent=50.0)  # weight bytes the page cache may hold for models
    reserve: MemoryAmount = MemoryAmount(percent=10.0)  # available memory warming never eats into
    strategy: Strategy = "read"
    interval: float = 5.0  # seconds between re-measurements
    rate: int = 500_000_000  # bytes/s for `read` warming; 0 = unlimited
    min_warm_fraction: float = 0.9  # resident share at which a model counts as warm (source "ram")
    state_file: str | None = None  # None = ${XDG_STATE_HOME:-~/.local/state}/warmpool/usage.json
    top_n: int = 3  # most used models (per the state file) wanted warm from the start
    ollama_models: str | None = None  # Ollama store; None = $OLLAMA_MODELS, ~/.ollama/models, service store
    models_dirs: tuple[str, ...] = ()  # directories searched for <model name>.gguf
    hf_cache: str | None = None  # None = $HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub


@dataclass(frozen=True, slots=True)
class BalancerConfig:
    """The `balancer:` section: what warmpool tells a load balancer that spreads requests over several hosts."""

    agent_port: int | None = None  # HAProxy agent-check responder's TCP port; None: no responder
    agent_host: str = "127.0.0.1"  # address the responder listens on (the balancer must reach it)
    drain_delay: float | None = None  # seconds between SIGTERM and closing the listener; None: see below

    @property
    def drain_seconds(self) -> float:
        """How long warmpool keeps serving after SIGTERM while it reports drain (agent, /readyz): the
        configured delay; by default 2 s with the agent on (HAProxy's default agent-inter), else none."""
        if self.drain_delay is not None:
            return self.drain_delay
        return 2.0 if self.agent_port is not None else 0.0


@dataclass(frozen=True, slots=True)
class Config:
    listen_host: str = "127.0.0.1"
    listen_port: int = 11435
    log: LogConfig = field(default_factory=LogConfig)
    max_body_size: int = 64 * 1024 * 1024
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    backends: dict[str, BackendConfig] = field(default_factory=dict)
    models: dict[str, ModelConfig] = field(default_factory=dict)
    phases: dict[str, str] = field(default_factory=dict)
    default_phase: str | None = None
    preload: tuple[str, ...] = ()
    ram_tier: RamTierConfig = field(default_factory=RamTierConfig)
    balancer: BalancerConfig = field(default_factory=BalancerConfig)
    loading_feedback: bool = False  # tell streaming clients what they wait for during a swap
    source: str = "<defaults>"  # where it came from: a path, or "<embedded default>"

    @property
    def listen(self) -> str:
        return _host_port(self.listen_host, self.listen_port)

    def backend_of(self, model: str) -> BackendConfig:
        return self.backends[self.models[model].backend]


def _host_port(host: str, port: int) -> str:
    """"host:port", with an IPv6 host in brackets so the port stays unambiguous."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

