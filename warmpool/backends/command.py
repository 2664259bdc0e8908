"""The `kind: command` backend: any OpenAI-compatible server (llama-server, vLLM, SGLang, llama-cpp-python)
that warmpool starts from a per-model command template, one process per loaded model.

Loading starts the server on a free loopback port and waits for its health path; unloading stops it. A
server that dies on its own is reported to the scheduler, which loads the model again on the next request.
Where the model's server is given a slot directory (`--slot-save-path ${SLOT_DIR}`, llama-server), its
slots are saved before it stops and restored after the next start, so an agent's context survives a swap.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from warmpool.backends.base import Backend, LoadResult, ResidentModel
from warmpool.backends.command_server import CommandServer, command_part
from warmpool.backends.slots import ContextStore, restore_slots, save_slots
from warmpool.config import BackendConfig, Config, ModelConfig
from warmpool.errors import BackendError, BackendUnavailable

log = logging.getLogger("warmpool.backends.command")


def default_context_dir(backend: str) -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "warmpool" / "contexts" / backend


class CommandBackend(Backend):
    speaks = "openai"

    def __init__(self, config: BackendConfig, app_config: Config) -> None:
        super().__init__(config, app_config)
        self.servers: dict[str, CommandServer] = {}
        self.contexts = ContextStore(Path(config.context_dir or default_context_dir(config.name)),
                                     config.context_budget)
        self._watchers: dict[str, asyncio.Task[None]] = {}

    async def start(self) -> None:
        # Nothing upstream to ask before a model is loaded: a server exists only while its model does.
        self.healthy_once = True

    async def health(self) -> bool:
        return True

    def size_hint(self, model: ModelConfig) -> int:
        return model.size or _file_size(model.gguf)

    def base_url(self, model: ModelConfig | None) -> str:
        server = self.servers.get(model.name) if model else None
        if server is None or not server.alive:
            name = model.name if model else "?"
            raise BackendUnavailable(self.name, f"model {name!r} has no running server")
        return server.url

    async def load(self, model: ModelConfig) -> LoadResult:
        started = time.monotonic()
        keeps_context = command_part(model).keeps_context
        slot_dir = await asyncio.to_thread(self.contexts.prepare, model) if keeps_context else None
        server = CommandServer(model, self.config, slot_dir, log)
        try:
            await server.start()
            details = {**server.timings, **(await self._restore(model, server) if keeps_context else {})}
        except BaseException:
            await server.stop()
            raise
        self.servers[model.name] = server
        self._watchers[model.name] = asyncio.create_task(self._watch(model.name, server))
        return LoadResult(time.monotonic() - started, details, size=self.size_hint(model))

    async def _restore(self, model: ModelConfig, server: CommandServer) -> dict[str, float]:
        files = await asyncio.to_thread(self.contexts.saved, model)
        if not files:
            return {}
        started = time.monotonic()
        tokens = await restore_slots(self.session, self.name, server.url, files, self.config.start_timeout)
        return {"slot_restore": time.monotonic() - started, "restored_tokens": float(tokens)}

    async def unload(self, model: ModelConfig) -> None:
        server = self.servers.pop(model.name, None)
        watcher = self._watchers.pop(model.name, None)
        if watcher is not None:
            watcher.cancel()
        if server is None:
            return
        if server.alive and server.slot_dir is not None and self.contexts.budget > 0:
            await self._save(model, server, server.slot_dir)
        await server.stop()

    async def _save(self, model: ModelConfig, server: CommandServer, slot_dir: Path) -> None:
        """Save the server's slots; a failure costs the context, never the swap."""
        started = time.monotonic()
        try:
            tokens = await save_slots(self.session, self.name, server.url, slot_dir, self.config.start_timeout)
        except BackendError as exc:
            log.warning("%s: slots not saved, the context is recomputed after the next load: %s",
                        model.name, exc.reason)
            return
        server.timings["slot_save"] = time.monotonic() - started
        await asyncio.to_thread(self.contexts.trim)
        log.info("%s: saved %d tokens of context in %.3f s", model.name, tokens, server.timings["slot_save"])

    async def resident(self) -> list[ResidentModel]:
        return [ResidentModel(name=name, size=self.size_hint(self.models[name]))
                for name, server in self.servers.items() if server.alive]

    async def close(self) -> None:
        await asyncio.gather(*(self.unload(self.models[n]) for n in list(self.servers)), return_exceptions=True)
        await super().close()

    async def _watch(self, name: str, server: CommandServer) -> None:
        await server.exited.wait()
        if self.servers.get(name) is server:
            del self.servers[name]
            self._watchers.pop(name, None)
            self.on_lost(name, f"server process {server.exit_report()}")


def _file_size(path: str | None) -> int:
    try:
        return os.path.getsize(path) if path else 0
    except OSError:
        return 0
