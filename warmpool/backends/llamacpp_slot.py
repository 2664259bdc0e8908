"""One slot of a managed llama.cpp pool: a long-lived worker process (`_llamacpp_worker`) that serves
llama-cpp-python's OpenAI-compatible API on its own loopback port and loads or frees a model when told.

The process is a `backends.process.Child` (its own process group, a parent-death signal, output drained,
stderr tail kept). `Slot` speaks the worker's line protocol: it sends `load` / `free` commands on stdin
and matches each `done` / `failed` answer to its command by id; `context` lines go to a callback. A
worker that exits fails the commands it had not answered, and the slot reports the exit once.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from warmpool.backends._llamacpp_worker import PREFIX
from warmpool.backends.llamacpp_process import child_env, llama_settings, worker_argv
from warmpool.backends.process import HOST, Child
from warmpool.config import BackendConfig, ModelConfig
from warmpool.errors import BackendUnavailable

log = logging.getLogger("warmpool.backends.llamacpp")

ContextListener = Callable[["Slot", dict[str, Any]], None]
ExitListener = Callable[["Slot", str], None]


class WorkerProcess(Child):
    """The worker's process: its `@warmpool` lines become the port, answers and context events."""

    def __init__(self, proc: asyncio.subprocess.Process, label: str) -> None:
        self.port: int | None = None
        self.imports: float | None = None
        self.ready = asyncio.Event()  # imported, serving, waiting for commands
        self.answers: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.on_context: Callable[[dict[str, Any]], None] = lambda message: None
        super().__init__(proc, label)

    def on_stdout_line(self, line: str) -> None:
        if not line.startswith(PREFIX):
            return
        try:
            message = json.loads(line[len(PREFIX):])
        except ValueError:
            return
        event = message.pop("event", None)
        if event == "ready":
            self.port, self.imports = int(message["port"]), float(message.get("imports", 0.0))
            self.ready.set()
        elif event in ("done", "failed"):
            future = self.answers.pop(message.pop("id", -1), None)
            if future is not None and not future.done():
                future.set_result({"event": event, **message})
        elif event == "context":
            self.on_context(message)


class Slot:
    """One worker process and the model it holds (if any); restarted by its backend when it dies."""

    def __init__(self, index: int, backend: BackendConfig, on_context: ContextListener,
                 on_exit: ExitListener) -> None:
        self.index = index
        self.backend = backend
        self.model: str | None = None  # the configured name of the loaded model, once it can serve
        self.held: str | None = None  # the model the worker holds as far as its answers tell (a free in
        # progress still holds it): its context events are that model's
        self.started_at = 0.0
        self._on_context = on_context
        self._on_exit = on_exit
        self._process: WorkerProcess | None = None
        self._ids = itertools.count(1)
        self._stopping = False
        self._spawning = asyncio.Lock()  # a restart in the background and a load must not both start one

    def __repr__(self) -> str:
        state = "ready" if self.ready else "starting" if self.alive else "down"
        return f"<Slot {self.backend.name}#{self.index} pid={self.pid} {state} model={self.model}>"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.alive

    @property
    def ready(self) -> bool:
        return self.alive and self._process is not None and self._process.ready.is_set()

    @property
    def url(self) -> str:
        port = self._process.port if self._process else None
        return f"http://{HOST}:{port}"

    @property
    def imports(self) -> float | None:
        return self._process.imports if self._process else None

    def snapshot(self) -> dict[str, Any]:
        return {"slot": self.index, "pid": self.pid, "ready": self.ready, "model": self.model,
                "url": self.url if self.ready else None}

    async def spawn(self) -> None:
        """Start a fresh worker (it imports in the background), unless one runs already."""
        async with self._spawning:
            if self.alive:
                return
            python = self.backend.python or sys.executable
            label = f"{self.backend.name} worker {self.index}"
            process = await WorkerProcess.spawn(worker_argv(python), label, child_env(python))
            process.on_context = lambda message: self._on_context(self, message)
            process.on_exit.append(lambda code: self._exited(process))
            self._process, self.model, self.held, self._stopping = process, None, None, False
            self.started_at = time.monotonic()

    def _exited(self, process: WorkerProcess) -> None:
        reason = f"{process.exit_reason()}{process.stderr_report()}"
        for future in process.answers.values():
            if not future.done():
                future.set_result({"event": "failed", "error": f"worker {reason}"})
        process.answers.clear()
        if process is self._process and not self._stopping:
            log.warning("%s (pid %d) %s", process.label, process.pid, reason)
            self._on_exit(self, process.exit_reason())

    async def wait_ready(self, deadline: float) -> None:
        """Until the worker serves and takes commands; BackendUnavailable if it exits or takes too long."""
        process = self._checked()
        waiters = [asyncio.ensure_future(e.wait()) for e in (process.ready, process.exited)]
        try:
            await asyncio.wait(waiters, timeout=max(deadline - time.monotonic(), 0.0),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if not process.ready.is_set() or not process.alive:
            problem = (f"{process.exit_reason()} before it was ready{process.stderr_report()}" if not process.alive
                       else f"not ready within {self.backend.start_timeout:g} s{process.stderr_report()}")
            await self._kill()
            raise self._error(problem)

    async def load(self, model: ModelConfig, context: dict[str, Any] | None, deadline: float) -> dict[str, float]:
        """Load `model` in the worker (freeing what it held); returns the worker's timings."""
        self.model = None
        try:
            answer = await self._command({"op": "load", "settings": llama_settings(model), "context": context},
                                         deadline, model.name)
        except BaseException:
            self.held = None  # the worker freed what it held before it failed
            raise
        self.model = self.held = model.name
        return answer

    async def free(self, deadline: float) -> dict[str, float]:
        """Free the worker's model (saving its context first)."""
        name, self.model = self.model, None
        if not self.alive:
            return {}  # the model went with the process
        try:
            return await self._command({"op": "free"}, deadline, name or "?")
        finally:
            self.held = None

    async def _command(self, command: dict[str, Any], deadline: float, model: str) -> dict[str, float]:
        process = self._checked()
        if not process.alive:
            raise self._error(f"{model}: {command['op']}: the worker {process.exit_reason()}")
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        process.answers[ident] = future
        await process.send_line(json.dumps({**command, "id": ident}).encode())
        try:
            answer = await asyncio.wait_for(asyncio.shield(future), max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            # A load that never ends holds the worker: it cannot take another command, so it goes.
            await self._kill()
            raise self._error(f"{model}: {command['op']} not done within {self.backend.start_timeout:g} s") from None
        if answer.pop("event") == "failed":
            raise self._error(f"{model}: {command['op']} failed: {answer.get('error')}")
        return {k: float(v) for k, v in answer.items() if isinstance(v, (int, float))}

    async def _kill(self) -> None:
        """End the worker for good (it failed to start or hangs); the backend starts another when needed."""
        if self._process is not None:
            self.model = self.held = None
            await self._process.close()

    async def stop(self) -> None:
        """SIGTERM, SIGKILL after stop_grace; no exit report (warmpool asked for it)."""
        self._stopping = True
        self.model = self.held = None
        if self._process is not None:
            await self._process.stop(self.backend.stop_grace)

    def _checked(self) -> WorkerProcess:
        if self._process is None:
            raise self._error("worker not started")
        return self._process

    def _error(self, reason: str) -> BackendUnavailable:
        return BackendUnavailable(self.backend.name, f"worker {self.index}: {reason}")
