"""Managed llama-cpp-python server processes: spawn, health, warm-up, stop, and never a leaked child.

Owns `ManagedServer` (one `llama_cpp.server` process serving one model on a free loopback port) and
`SparePool` / `SpareWorker` (at most one process per backend that has already paid llama-cpp-python's
import cost and waits for a model, so a swap pays only the model load). Every child is a
`backends.process.Child`: its own process group and a parent-death signal, so neither `stop()` nor a
SIGKILLed warmpool leaves one behind. Facts relied on (research/upstream_spec.md §2): the server loads
its model before uvicorn binds the port; `/openapi.json` takes no model lock, while `/v1/models` does
and would cut running streams; `interrupt_requests` defaults to true and must be turned off.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import site
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from warmpool.backends._llamacpp_worker import PREFIX
from warmpool.backends.process import HOST, Child, base_env, free_port, wait_event
from warmpool.config import BackendConfig, ModelConfig
from warmpool.errors import BackendError, BackendTimeout, BackendUnavailable

logger = logging.getLogger("warmpool.backends.llamacpp")

PROBE_PATH = "/openapi.json"  # answered without the model lock (see module docstring)
PROBE_INTERVAL = 0.05
PROBE_TIMEOUT = 2.0
WORKER_MODULE = "warmpool.backends._llamacpp_worker"
WORKER_FILE = Path(__file__).with_name("_llamacpp_worker.py")
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory holding the warmpool package

# pydantic-settings fills every unset llama-cpp-python setting from an environment variable of the same
# name (case-insensitive), and the CLI lets HOST, PORT and CONFIG_FILE override its flags outright; a
# stray PORT or API_KEY in warmpool's environment would silently break the server. Field names read from
# llama_cpp/server/settings.py (v0.3.36); an extra name here is harmless.
_SETTINGS_ENV = frozenset(
    """config_file api_key cache cache_size cache_type chat_format chat_template_kwargs clip_model_path
    disable_ping_events draft_model draft_model_num_pred_tokens embedding flash_attn hf_model_repo_id
    hf_pretrained_model_name_or_path hf_tokenizer_config_path host interrupt_requests kv_overrides
    last_n_tokens_size logits_all lora_base lora_path main_gpu model model_alias mul_mat_q n_batch n_ctx
    n_gpu_layers n_threads n_threads_batch n_ubatch numa offload_kqv port root_path rope_freq_base
    rope_freq_scale rope_scaling_type rpc_servers seed split_mode ssl_certfile ssl_keyfile tensor_split
    type_k type_v use_mlock use_mmap verbose vocab_only yarn_attn_factor yarn_beta_fast yarn_beta_slow
    yarn_ext_factor yarn_orig_ctx""".split()
)



# ---------------------------------------------------------------- settings and command lines


def llama_settings(model: ModelConfig, port: int) -> dict[str, Any]:
    """The flat llama-cpp-python `Settings` for `model` on `port`.

    `server_args` override the typed model fields (those always carry a value, defaults included, so an
    explicit extra could otherwise never take effect) but never host, port or interrupt_requests, which
    are warmpool's contract with the process.
    """
    llama = model.llamacpp
    if llama is None:
        raise ValueError(f"model {model.name!r} has no llama.cpp settings (not a llamacpp backend's model)")
    settings: dict[str, Any] = {
        "model": llama.gguf,
        "model_alias": model.upstream_name,
        "n_ctx": llama.n_ctx,
        "n_gpu_layers": llama.n_gpu_layers,
        "n_batch": llama.n_batch,
        "embedding": model.embedding,
        "use_mmap": llama.use_mmap,
        "use_mlock": llama.use_mlock,  # llama-cpp-python defaults to true on Linux; pass ours explicitly
    }
    optional = {"n_threads": llama.n_threads, "chat_format": llama.chat_format}
    settings.update({k: v for k, v in optional.items() if v is not None})
    settings.update(llama.server_args)
    settings.update(host=HOST, port=port, interrupt_requests=False)
    return settings


def cli_args(settings: dict[str, Any]) -> list[str]:
    """`--name value` flags as `llama_cpp.server`'s argparse (generated from pydantic fields) takes them."""
    args: list[str] = []
    for name, value in settings.items():
        if value is not None:
            args += [f"--{name}", *_cli_values(value)]
    return args


def _cli_values(value: Any) -> list[str]:
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, dict):
        return [json.dumps(value)]
    if isinstance(value, (list, tuple)):
        return [str(item) for item in value]  # list fields are nargs="*"
    return [str(value)]


def plain_argv(python: str, settings: dict[str, Any]) -> list[str]:
    return [python, "-m", "llama_cpp.server", *cli_args(settings)]


def worker_argv(python: str) -> list[str]:
    if python == sys.executable:  # child_env puts this very warmpool on the child's path
        return [python, "-m", WORKER_MODULE]
    # Another interpreter may not have warmpool installed; the worker file needs only llama_cpp. runpy
    # (not `python FILE`) keeps warmpool/backends off sys.path, where its modules would shadow others.
    bootstrap = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"
    return [python, "-c", bootstrap, str(WORKER_FILE)]


def child_env(python: str) -> dict[str, str]:
    env = {k: v for k, v in base_env().items() if k.lower() not in _SETTINGS_ENV}
    if python == sys.executable and _is_source_checkout():
        # `-m warmpool...` must find this warmpool even when only our cwd or sys.path made it importable.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    return env


def _is_source_checkout() -> bool:
    # An installed warmpool is found anyway; putting site-packages on PYTHONPATH would move it ahead of
    # the standard library.
    installed = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    return PACKAGE_ROOT not in installed


# ---------------------------------------------------------------- one child process


class _Child(Child):
    """A llama.cpp server or spare worker process: also reads the worker's `@warmpool` report lines."""

    def __init__(self, proc: asyncio.subprocess.Process, label: str) -> None:
        self.reports: dict[str, float] = {}  # timings the spare worker printed
        self.ready = asyncio.Event()  # the spare worker finished its imports
        super().__init__(proc, label)

    def on_stdout_line(self, line: str) -> None:
        # uvicorn's access log goes to stdout too; only the worker's own lines matter here.
        if not line.startswith(PREFIX):
            return
        try:
            message = json.loads(line[len(PREFIX) :])
        except ValueError:
            return
        self.reports.update({k: v for k, v in message.items() if isinstance(v, (int, float))})
        if message.get("event") == "ready":
            self.ready.set()

    async def send(self, settings: dict[str, Any]) -> None:
        await self.send_line(json.dumps(settings).encode())


# ---------------------------------------------------------------- spare workers


class SpareWorker:
    """A worker process that has done (or is doing) the expensive imports and waits for one model."""

    def __init__(self, child: _Child) -> None:
        self._child = child

    def __repr__(self) -> str:
        state = "ready" if self.ready else "importing" if self.alive else "dead"
        return f"<SpareWorker pid={self.pid} {state}>"

    @classmethod
    async def spawn(cls, backend: BackendConfig) -> SpareWorker:
        python = backend.python or sys.executable
        return cls(await _Child.spawn(worker_argv(python), f"{backend.name} spare worker", child_env(python)))

    @property
    def pid(self) -> int:
        return self._child.pid

    @property
    def alive(self) -> bool:
        return self._child.alive

    @property
    def ready(self) -> bool:
        return self._child.ready.is_set() and self.alive

    async def wait_ready(self, timeout: float) -> bool:
        """Whether the imports finished within `timeout` (False too if the worker died)."""
        waiters = [asyncio.ensure_future(e.wait()) for e in (self._child.ready, self._child.exited)]
        await asyncio.wait(waiters, timeout=max(timeout, 0.0), return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        return self.ready

    async def launch(self, settings: dict[str, Any]) -> _Child:
        """Hand the worker its settings; the process now belongs to the caller."""
        await self._child.send(settings)
        return self._child

    async def close(self) -> None:
        await self._child.close()  # SIGKILL: an idle spare holds nothing worth a graceful shutdown


class SparePool:
    """Keeps at most one pre-started worker per backend so a swap pays only the model load."""

    def __init__(self, backend: BackendConfig) -> None:
        self._backend = backend
        self._idle: SpareWorker | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"<SparePool {self._backend.name!r} idle={self._idle!r}>"

    @property
    def idle(self) -> SpareWorker | None:
        """The spare `take()` would hand out, left in place."""
        return self._idle

    def take(self) -> SpareWorker | None:
        """The idle worker, or None. One still importing is handed out too: finishing its imports is
        always sooner than starting a fresh process."""
        spare, self._idle = self._idle, None
        return spare if spare is not None and spare.alive else None

    async def refill(self) -> None:
        """Start a new spare (it imports in the background) if enabled and none is idle."""
        async with self._lock:
            if self._closed or not self._backend.spare:
                return
            if self._idle is None or not self._idle.alive:
                self._idle = await SpareWorker.spawn(self._backend)

    async def close(self) -> None:
        async with self._lock:
            self._closed = True
            spare, self._idle = self._idle, None
        if spare is not None:
            await spare.close()


# ---------------------------------------------------------------- managed server


class ManagedServer:
    """One llama-cpp-python server process serving one model."""

    def __init__(
        self,
        model: ModelConfig,
        backend: BackendConfig,
        *,
        spare: SpareWorker | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        self.model = model
        self.backend = backend
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.exited = asyncio.Event()
        self.timings: dict[str, float] = {}
        self._spare = spare
        self._log = log or logger
        self._child: _Child | None = None
        self._ready = False  # an exit before this is start()'s failure, after it a crash
        self._stopping = False

    def __repr__(self) -> str:
        state = "alive" if self.alive else f"exited={self.returncode}" if self._child else "new"
        return f"<ManagedServer {self.model.name!r} {self.url} pid={self.pid} {state}>"

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child else None

    @property
    def alive(self) -> bool:
        return self._child is not None and self._child.alive

    @property
    def returncode(self) -> int | None:
        return self._child.returncode if self._child else None

    @property
    def stderr_tail(self) -> list[str]:
        return list(self._child.tail) if self._child else []

    async def start(self) -> None:
        """Spawn (or adopt the spare), wait until healthy; on any failure kill it and raise."""
        if self.model.gguf is None:
            raise self._error("no gguf path configured")
        started = time.monotonic()
        deadline = started + self.backend.start_timeout
        try:
            await self._launch(deadline)
            await self._wait_healthy(deadline)
        except BaseException:
            await self._discard()
            raise
        self._record_start(started)

    async def _launch(self, deadline: float) -> None:
        settings = llama_settings(self.model, self.port)
        spare, self._spare = self._spare, None
        if spare is not None and await self._spare_ready(spare, deadline):
            self._adopt(await spare.launch(settings))
        else:
            python = self.backend.python or sys.executable
            argv = plain_argv(python, settings)
            self._adopt(await _Child.spawn(argv, f"llama server {self.model.name}", child_env(python)))

    async def _spare_ready(self, spare: SpareWorker, deadline: float) -> bool:
        waited = time.monotonic()
        if await spare.wait_ready(deadline - waited):
            self.timings["spare_wait"] = time.monotonic() - waited
            return True
        self._log.warning("%s: spare worker %s unusable, starting plain", self.model.name, spare)
        await spare.close()
        return False

    def _adopt(self, child: _Child) -> None:
        child.label = f"llama server {self.model.name}"
        child.on_exit.append(self._on_exit)
        self._child = child
        if not child.alive:
            self._on_exit(child.returncode or 0)

    def _on_exit(self, returncode: int) -> None:
        self.exited.set()
        if self._ready and not self._stopping and self._child is not None:
            self._log.warning(
                "%s (pid %d, %s) %s%s",
                self._child.label, self._child.pid, self.url, self._child.exit_reason(),
                self._child.stderr_report(),
            )

    async def _wait_healthy(self, deadline: float) -> None:
        """Poll the lock-free probe until 200, failing fast if the process exits meanwhile."""
        child = self._checked_child()
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not await self._probe(session):
                if not child.alive:
                    raise self._error(f"{child.exit_reason()} before it was healthy{child.stderr_report()}")
                if time.monotonic() > deadline:
                    limit = self.backend.start_timeout
                    raise self._error(f"not healthy within {limit:g} s{child.stderr_report()}")
                await wait_event(child.exited, PROBE_INTERVAL)

    async def _probe(self, session: aiohttp.ClientSession) -> bool:
        try:
            async with session.get(self.url + PROBE_PATH) as response:
                return response.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    def _record_start(self, started: float) -> None:
        child = self._checked_child()
        self._ready = True
        self.timings["start_to_ready"] = time.monotonic() - started
        self.timings.update(child.reports)  # "imports" and "model_load" when a spare worker ran it
        self._log.info(
            "%s: llama server pid %d on port %d ready (%s)",
            self.model.name, child.pid, self.port, _format_timings(self.timings),
        )

    async def warm_up(self) -> float:
        """Produce one token (or one embedding), so the weights are really read; returns seconds.

        With mmap the load returns before the weights are paged in; a swap is over only now.
        """
        path, body = self._warm_up_request()
        started = time.monotonic()
        try:
            await self._post(path, body)
        except TimeoutError as exc:
            raise BackendTimeout(self.backend.name, f"{self.model.name}: warm-up timed out") from exc
        except aiohttp.ClientError as exc:
            raise self._error(f"warm-up failed: {exc!r}") from exc
        self.timings["warm_up"] = elapsed = time.monotonic() - started
        return elapsed

    def _warm_up_request(self) -> tuple[str, dict[str, Any]]:
        alias = self.model.upstream_name
        if self.model.embedding:  # an embedding context may have no logits to sample from
            return "/v1/embeddings", {"model": alias, "input": " "}
        return "/v1/completions", {"model": alias, "prompt": " ", "max_tokens": 1}

    async def _post(self, path: str, body: dict[str, Any]) -> None:
        timeout = aiohttp.ClientTimeout(total=self.backend.start_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.post(self.url + path, json=body) as response:
            text = await response.text()
            if response.status != 200:
                raise self._error(f"warm-up answered {response.status}: {text[:300]}")

    async def stop(self) -> None:
        """SIGTERM the process group, SIGKILL after stop_grace, reap; idempotent."""
        if self._child is None:
            return
        self._stopping = True
        was_alive = self._child.alive
        started = time.monotonic()
        await self._child.stop(self.backend.stop_grace)
        if was_alive:
            self.timings["stop"] = time.monotonic() - started
            self._log.info("%s: llama server pid %d stopped (%s)", self.model.name, self.pid,
                           self._child.exit_reason())

    async def _discard(self) -> None:
        """Kill a process that failed to start; the SIGKILL is sent before the first await, so even a
        cancelled start() leaves nothing running."""
        self._stopping = True
        if self._child is not None:
            self._child.signal_group(signal.SIGKILL)
            await asyncio.shield(self._child.close())

    def _checked_child(self) -> _Child:
        assert self._child is not None, "start() has not spawned a process"
        return self._child

    def _error(self, reason: str) -> BackendError:
        return BackendUnavailable(self.backend.name, f"{self.model.name}: {reason}")


def _format_timings(timings: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.3f} s" for name, seconds in timings.items())
