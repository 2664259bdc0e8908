"""The managed llama.cpp backend: one llama-cpp-python server process per loaded model.

Loading starts a process (from a pre-imported spare when there is one) and runs a one-token warm-up, so
a load is timed until the model can really answer; unloading stops the process. A process that dies on
its own is reported to the scheduler, which reloads the model on the next request.

The spare taken by a load is replaced once no request runs on the backend (or SPARE_REFILL_LATEST
seconds after the load, whichever comes first), not at once: a starting Python process beside a
generating llama.cpp server slows the generation sharply (its threads wait on each other), and the first
request after a swap is the one that would pay.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from warmpool.backends.base import Backend, LoadResult, ResidentModel
from warmpool.backends.llamacpp_process import ManagedServer, SparePool
from warmpool.config import BackendConfig, Config, ModelConfig
from warmpool.errors import BackendUnavailable

log = logging.getLogger("warmpool.backends.llamacpp")
SPARE_REFILL_LATEST = 30.0  # seconds after a load; for a backend that is never idle (max_resident > 1)


class LlamaCppBackend(Backend):
    speaks = "openai"
    # llama-cpp-python's request models: response_format is "text" or "json_object" (with an optional
    # "schema"), and an assistant message's content must be a string
    accepts_json_schema_format = False
    accepts_null_content = False
    tokenize_path = "/extras/tokenize/count"

    def __init__(self, config: BackendConfig, app_config: Config) -> None:
        super().__init__(config, app_config)
        self.servers: dict[str, ManagedServer] = {}
        self.spares = SparePool(config)
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._refill: asyncio.Task[None] | None = None
        self._refill_timer: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        # Nothing upstream to ask: the backend is "healthy" once it can start processes; the spare
        # proves the interpreter imports llama_cpp, and is ready for the first swap.
        self.healthy_once = True
        self._refill_spare()

    async def health(self) -> bool:
        return True

    def size_hint(self, model: ModelConfig) -> int:
        # Weights dominate a llama.cpp model's footprint; the KV cache comes on top (set `size` to be exact).
        return model.size or _file_size(model)

    def reads_images(self, model: ModelConfig) -> bool | None:
        # llama-cpp-python reads images only through a multimodal projector (a llava-style chat handler with
        # clip_model_path); without one it drops image parts silently
        return bool(model.llamacpp is not None and model.llamacpp.server_args.get("clip_model_path"))

    def base_url(self, model: ModelConfig | None) -> str:
        server = self.servers.get(model.name) if model else None
        if server is None or not server.alive:
            name = model.name if model else "?"
            raise BackendUnavailable(self.name, f"model {name!r} has no running server")
        return server.url

    async def load(self, model: ModelConfig) -> LoadResult:
        started = time.monotonic()
        server = ManagedServer(model, self.config, spare=self.spares.take(), log=log)
        try:
            await server.start()
            warm_up = await server.warm_up()
        except BaseException:
            await server.stop()
            self._refill_spare()
            raise
        if self._refill_timer is None:
            loop = asyncio.get_running_loop()
            self._refill_timer = loop.call_later(SPARE_REFILL_LATEST, self._refill_spare)
        self.servers[model.name] = server
        self._watchers[model.name] = asyncio.create_task(self._watch(model.name, server))
        return LoadResult(time.monotonic() - started, {**server.timings, "warm_up": warm_up},
                          size=self.size_hint(model))

    async def unload(self, model: ModelConfig) -> None:
        server = self.servers.pop(model.name, None)
        watcher = self._watchers.pop(model.name, None)
        if watcher is not None:
            watcher.cancel()
        if server is not None:
            await server.stop()

    async def resident(self) -> list[ResidentModel]:
        return [
            ResidentModel(name=name, size=_file_size(self.models[name]), context_length=_n_ctx(self.models[name]))
            for name, server in self.servers.items() if server.alive
        ]

    def idle(self) -> None:
        self._refill_spare()

    async def close(self) -> None:
        if self._refill_timer is not None:
            self._refill_timer.cancel()
        if self._refill is not None:
            self._refill.cancel()
        await asyncio.gather(*(self.unload(self.models[n]) for n in list(self.servers)), return_exceptions=True)
        await self.spares.close()
        await super().close()

    async def _watch(self, name: str, server: ManagedServer) -> None:
        await server.exited.wait()
        if self.servers.get(name) is server:
            del self.servers[name]
            self._watchers.pop(name, None)
            self.on_lost(name, f"server process exited with code {server.returncode}")

    def _refill_spare(self) -> None:
        if self._refill_timer is not None:
            self._refill_timer.cancel()
            self._refill_timer = None
        spare = self.spares.idle
        if spare is not None and spare.alive:
            return  # the usual case when a request ends: nothing to do, and no task for it
        if self.config.spare and (self._refill is None or self._refill.done()):
            self._refill = asyncio.create_task(self.spares.refill())


def _file_size(model: ModelConfig) -> int:
    try:
        return os.path.getsize(model.gguf) if model.gguf else 0
    except OSError:
        return 0


def _n_ctx(model: ModelConfig) -> int:
    return model.llamacpp.n_ctx if model.llamacpp is not None else 0
