"""One server process of a `kind: command` model: its argv and environment filled in from the model's
template, started on a free loopback port as a `Child` (own process group, parent-death signal, stderr
tail), polled until its health path answers 200, and stopped with SIGTERM, then SIGKILL after stop_grace.

Nothing here goes through a shell: the template is split into arguments when the config loads, and each
argument has its placeholders filled in on its own.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path

import aiohttp

from warmpool.backends.process import HOST, Child, base_env, free_port, wait_event
from warmpool.config import BackendConfig, CommandModel, ModelConfig
from warmpool.config.placeholders import fill
from warmpool.errors import BackendError, BackendUnavailable

PROBE_INTERVAL = 0.05  # seconds between health probes while a server starts
PROBE_TIMEOUT = 2.0  # seconds one probe may take


def command_part(model: ModelConfig) -> CommandModel:
    if model.command is None:
        raise ValueError(f"model {model.name!r} has no command (not a command backend's model)")
    return model.command


def placeholder_values(model: ModelConfig, port: int, slot_dir: Path | None) -> dict[str, str]:
    part = command_part(model)
    values = {"PORT": str(port), "MODEL": model.upstream_name, "GGUF": part.gguf or ""}
    if slot_dir is not None:
        values["SLOT_DIR"] = str(slot_dir)
    return values


def server_argv(model: ModelConfig, port: int, slot_dir: Path | None) -> list[str]:
    values = placeholder_values(model, port, slot_dir)
    return [fill(arg, values) for arg in command_part(model).command]


def server_env(model: ModelConfig, port: int, slot_dir: Path | None) -> dict[str, str]:
    values = placeholder_values(model, port, slot_dir)
    return {**base_env(), **{name: fill(value, values) for name, value in command_part(model).env.items()}}


class CommandServer:
    """One started server for one model; `exited` is set when the process ends, for whatever reason."""

    def __init__(self, model: ModelConfig, backend: BackendConfig, slot_dir: Path | None,
                 log: logging.Logger) -> None:
        self.model = model
        self.backend = backend
        self.slot_dir = slot_dir
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.exited = asyncio.Event()
        self.timings: dict[str, float] = {}
        self._log = log
        self._child: Child | None = None
        self._ready = False  # an exit before this is start()'s failure, after it a crash
        self._stopping = False

    def __repr__(self) -> str:
        state = "alive" if self.alive else f"exited={self.returncode}" if self._child else "new"
        return f"<CommandServer {self.model.name!r} {self.url} pid={self.pid} {state}>"

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child else None

    @property
    def alive(self) -> bool:
        return self._child is not None and self._child.alive

    @property
    def returncode(self) -> int | None:
        return self._child.returncode if self._child else None

    def exit_report(self) -> str:
        """How the process ended, with the tail of its stderr."""
        if self._child is None:
            return "never started"
        return self._child.exit_reason() + self._child.stderr_report()

    async def start(self) -> None:
        """Spawn the server and wait until its health path answers 200; on any failure kill it and raise."""
        started = time.monotonic()
        try:
            await self._spawn()
            await self._wait_healthy(started + self.backend.start_timeout)
        except BaseException:
            await self._discard()
            raise
        self._ready = True
        self.timings["start_to_ready"] = time.monotonic() - started
        self._log.info("%s: server pid %s on port %d ready in %.3f s", self.model.name, self.pid, self.port,
                       self.timings["start_to_ready"])

    async def _spawn(self) -> None:
        argv = server_argv(self.model, self.port, self.slot_dir)
        env = server_env(self.model, self.port, self.slot_dir)
        try:
            child = await Child.spawn(argv, f"server {self.model.name}", env)
        except OSError as exc:  # no such program, not executable, ...
            raise self._error(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from exc
        child.on_exit.append(self._on_exit)
        self._child = child

    def _on_exit(self, returncode: int) -> None:
        self.exited.set()
        if self._ready and not self._stopping:
            self._log.warning("%s: server pid %s (%s) %s", self.model.name, self.pid, self.url, self.exit_report())

    async def _wait_healthy(self, deadline: float) -> None:
        """Poll the health path until 200, failing fast if the process exits meanwhile."""
        child = self._child
        assert child is not None
        url = self.url + command_part(self.model).health
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT)) as session:
            while not await _answers_ok(session, url):
                if not child.alive:
                    raise self._error(f"{child.exit_reason()} before it was healthy{child.stderr_report()}")
                if time.monotonic() > deadline:
                    raise self._error(f"{url} did not answer 200 within {self.backend.start_timeout:g} s"
                                      f"{child.stderr_report()}")
                await wait_event(child.exited, PROBE_INTERVAL)

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
            self._log.info("%s: server pid %s stopped (%s)", self.model.name, self.pid, self._child.exit_reason())

    async def _discard(self) -> None:
        """Kill a server that failed to start; SIGKILL goes out before the first await, so even a cancelled
        start() leaves nothing running."""
        self._stopping = True
        if self._child is not None:
            self._child.signal_group(signal.SIGKILL)
            await asyncio.shield(self._child.close())

    def _error(self, reason: str) -> BackendError:
        return BackendUnavailable(self.backend.name, f"{self.model.name}: {reason}")


async def _answers_ok(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url) as response:
            return response.status == 200
    except (TimeoutError, aiohttp.ClientError):
        return False
