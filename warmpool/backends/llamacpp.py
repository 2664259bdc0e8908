"""The managed llama.cpp backend: one long-lived llama-cpp-python worker process per slot (`max_resident`
of them), each loading and freeing models in-process on command, so a swap pays only the model load.

A load tells a free slot's worker to load the model and returns as soon as it is loaded, with
`answered=False`: with mmap the weights are read by the first decode, and the request that caused the
swap is that decode (a separate one-token warm-up made the client's first prompt slower). The first
answer forwarded after a load is reported through `on_answered`, which ends the swap's timing. An unload
tells the worker to free the model; its process stays up for the next one.

A worker that dies is noticed at once: the model it held is reported lost (the pool reloads it on the
next request) and the worker is restarted in the background, unless it died young (then the next load
starts it, and reports why it fails). With a context budget, the workers keep swapped-out conversations'
KV state in a directory this backend owns (see `_llamacpp_context`); its counters are this module's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

from warmpool.backends._llamacpp_context import ContextSettings, ContextStore, Tier
from warmpool.backends.base import Backend, LoadResult, ResidentModel, Upstream
from warmpool.backends.llamacpp_slot import Slot
from warmpool.config import BackendConfig, Config, ModelConfig
from warmpool.errors import BackendUnavailable
from warmpool.metrics import Sample

log = logging.getLogger("warmpool.backends.llamacpp")
RESTART_AFTER = 5.0  # a worker that died sooner than this after its start is not restarted on its own
SHM = "/dev/shm"


@dataclass(slots=True)
class ContextCounters:
    """What one model's workers did with its context (from their `context` events)."""

    saves: int = 0
    saved_bytes: int = 0
    restores: int = 0
    misses: int = 0
    reused_tokens: int = 0  # prompt tokens not recomputed thanks to a restore
    evictions: int = 0  # saved states dropped from RAM to make room for this model's
    spilled: int = 0
    failures: int = 0

    def add(self, event: dict[str, Any]) -> None:
        saved = int(event.get("saved", 0))
        self.saves += saved
        self.saved_bytes += int(event.get("bytes", 0)) if saved else 0
        self.restores += int(event.get("restored", 0))
        self.reused_tokens += int(event.get("reused", 0))
        self.misses += int(event.get("miss", 0))
        self.evictions += int(event.get("evicted", 0))
        self.spilled += int(event.get("spilled", 0))
        self.failures += int(event.get("failed", 0))


class LlamaCppBackend(Backend):
    speaks = "openai"
    # llama-cpp-python's request models: response_format is "text" or "json_object" (with an optional
    # "schema"), and an assistant message's content must be a string
    accepts_json_schema_format = False
    accepts_null_content = False
    tokenize_path = "/extras/tokenize/count"

    def __init__(self, config: BackendConfig, app_config: Config) -> None:
        super().__init__(config, app_config)
        # One worker per model that can be loaded at once; never more workers than models.
        count = max(1, min(config.max_resident, len(self.models)))
        self.slots = [Slot(i, config, self._context_event, self._worker_died) for i in range(count)]
        self.context = context_settings(config)
        self.counters = {name: ContextCounters() for name in self.models}
        self._own_dir: str | None = None  # the context directory this backend created (removed at close)
        self._unanswered: set[str] = set()  # loaded, first request not answered yet
        self._restarts: set[asyncio.Task[None]] = set()
        self._closing = False

    async def start(self) -> None:
        # Nothing upstream to ask: the backend is "healthy" once it can start workers; they import in
        # the background, ready for the first swap.
        self.healthy_once = True
        self._open_context_dir()
        for slot in self.slots:
            await slot.spawn()

    def _open_context_dir(self) -> None:
        if self.context is None or self.config.context_dir is not None:
            return
        base = SHM if os.path.isdir(SHM) and os.access(SHM, os.W_OK) else None
        self._own_dir = tempfile.mkdtemp(prefix=f"warmpool-context-{self.name}-", dir=base)
        ram = Tier(self._own_dir, self.config.context_budget)
        self.context = ContextSettings((ram, *self.context.tiers[1:]), self.context.min_tokens)

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
        slot = self._slot_of(model.name) if model else None
        if slot is None or not slot.ready:
            name = model.name if model else "?"
            raise BackendUnavailable(self.name, f"model {name!r} is not loaded in a running worker")
        return slot.url

    async def load(self, model: ModelConfig) -> LoadResult:
        started = time.monotonic()
        deadline = started + self.config.start_timeout
        if self._slot_of(model.name) is not None:
            return LoadResult(0.0, size=self.size_hint(model))
        slot = self._free_slot()
        if not slot.alive:
            await slot.spawn()
        await slot.wait_ready(deadline)
        ready = time.monotonic()
        context = self.context.to_json() if self.context is not None else None
        timings = await slot.load(model, context, deadline)
        self._unanswered.add(model.name)
        details = {"slot_wait": ready - started, **timings}
        return LoadResult(time.monotonic() - started, details, size=self.size_hint(model), answered=False)

    def _free_slot(self) -> Slot:
        free = [slot for slot in self.slots if slot.model is None]
        if not free:
            raise BackendUnavailable(self.name, f"all {len(self.slots)} workers hold a model")
        return max(free, key=lambda slot: (slot.ready, slot.alive))  # one that need not start first

    def _slot_of(self, name: str) -> Slot | None:
        return next((slot for slot in self.slots if slot.model == name), None)

    async def unload(self, model: ModelConfig) -> None:
        self._unanswered.discard(model.name)
        slot = self._slot_of(model.name)
        if slot is not None:
            await slot.free(time.monotonic() + self.config.start_timeout)

    async def resident(self) -> list[ResidentModel]:
        return [
            ResidentModel(name=slot.model, size=_file_size(self.models[slot.model]),
                          context_length=_n_ctx(self.models[slot.model]))
            for slot in self.slots if slot.model is not None and slot.alive
        ]

    async def forward(self, model: ModelConfig | None, method: str, path: str, raw_headers: Any, body: bytes,
                      *, query: str = "") -> Upstream:
        upstream = await super().forward(model, method, path, raw_headers, body, query=query)
        if model is not None and model.name in self._unanswered:
            self._unanswered.discard(model.name)
            return FirstAnswer(upstream, model.name, self.on_answered)
        return upstream

    def idle(self) -> None:
        # No request runs: a model whose first request never reached its worker will not answer now.
        for name in list(self._unanswered):
            self._unanswered.discard(name)
            self.on_answered(name)
        for slot in self.slots:
            if not slot.alive:
                self._restart(slot)

    def _worker_died(self, slot: Slot, reason: str) -> None:
        slot.held = None
        if slot.model is not None:
            name, slot.model = slot.model, None
            self._unanswered.discard(name)
            self.on_lost(name, f"worker process {reason}")
        if time.monotonic() - slot.started_at >= RESTART_AFTER:
            self._restart(slot)

    def _restart(self, slot: Slot) -> None:
        if self._closing:
            return
        task = asyncio.get_running_loop().create_task(slot.spawn())
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    def _context_event(self, slot: Slot, event: dict[str, Any]) -> None:
        counters = self.counters.get(slot.held or "")
        if counters is not None:
            counters.add(event)
        if event.get("error"):
            log.warning("%s: context of %s: %s", self.name, slot.held, event["error"])

    async def close(self) -> None:
        self._closing = True
        for task in list(self._restarts):
            task.cancel()
        await asyncio.gather(*(slot.stop() for slot in self.slots), return_exceptions=True)
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
        await super().close()

    # -- what it shows --------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {"slots": [slot.snapshot() for slot in self.slots], "context": self._context_status()}

    def _usage(self) -> list[tuple[Tier, int, int]]:
        if self.context is None or not self.context.tiers[0].path:  # not started yet
            return []
        return ContextStore(self.context.tiers).usage()

    def _context_status(self) -> dict[str, Any]:
        if self.context is None:
            return {"enabled": False}
        tiers = [{"path": tier.path, "budget": tier.budget, "bytes": kept, "states": count}
                 for tier, kept, count in self._usage()]
        models = {name: {f.name: getattr(c, f.name) for f in fields(c)} for name, c in self.counters.items()}
        return {"enabled": True, "min_tokens": self.context.min_tokens, "tiers": tiers, "models": models}

    def state_metrics(self) -> Iterable[Sample]:
        if self.context is None:
            return
        usage = self._usage()
        labels = ["pool", "tier"]
        tier_names = ["ram", "disk"]
        yield ("warmpool_context_kept_bytes", "Bytes of saved prompt/KV state kept for swapped-out models.",
               labels, [([self.name, tier_names[i]], float(kept)) for i, (_, kept, _) in enumerate(usage)])
        yield ("warmpool_context_kept_states", "Saved prompt/KV states kept.",
               labels, [([self.name, tier_names[i]], float(count)) for i, (_, _, count) in enumerate(usage)])
        yield ("warmpool_context_budget_bytes", "Bytes of saved prompt/KV state the pool may keep.",
               labels, [([self.name, tier_names[i]], float(t.budget)) for i, (t, _, _) in enumerate(usage)])
        for field_name, doc in CONTEXT_COUNTERS.items():
            samples = [([self.name, name], float(getattr(c, field_name))) for name, c in self.counters.items()]
            yield (f"warmpool_context_{field_name}_total", doc, ["pool", "model"], samples)


CONTEXT_COUNTERS = {
    "saves": "Conversations whose prompt/KV state was saved (at a swap, or before another prompt overwrote it).",
    "saved_bytes": "Bytes of prompt/KV state saved.",
    "restores": "Prompts that found a saved state sharing their prefix and restored it (hits).",
    "misses": "Prompts that found neither a live nor a saved state sharing at least context_min_tokens of them.",
    "reused_tokens": "Prompt tokens not recomputed thanks to a restored state.",
    "evictions": "Saved states dropped from RAM (least recently used first) to make room.",
    "spilled": "Of those, states moved to context_spill_dir.",
    "failures": "Saves or restores that failed (the prompt was then computed in full).",
}


def context_settings(config: BackendConfig) -> ContextSettings | None:
    """The workers' context settings (None with a zero budget); the RAM directory is set at start when
    the config names none."""
    if config.context_budget <= 0:
        return None
    tiers = [Tier(config.context_dir or "", config.context_budget)]
    if config.context_spill_dir is not None and config.context_spill_budget > 0:
        tiers.append(Tier(config.context_spill_dir, config.context_spill_budget))
    return ContextSettings(tuple(tiers), config.context_min_tokens)


class FirstAnswer:
    """An upstream answer that reports its first body bytes (or its end, if none came) once: the first
    request after a load is the one that reads the weights, so the swap's timing ends there."""

    __slots__ = ("_callback", "_model", "_upstream")

    def __init__(self, upstream: Upstream, model: str, callback: Any) -> None:
        self._upstream, self._model, self._callback = upstream, model, callback

    @property
    def status(self) -> int:
        return self._upstream.status

    @property
    def reason(self) -> str:
        return self._upstream.reason

    @property
    def headers(self) -> list[tuple[str, str]]:
        return self._upstream.headers

    @property
    def content_length(self) -> int | None:
        return self._upstream.content_length

    def header(self, name: str) -> str | None:
        return self._upstream.header(name)

    async def readany(self) -> bytes:
        data = await self._upstream.readany()
        self._report()
        return data

    async def pipe(self, sink: Callable[[bytes], bool]) -> bool:
        if self._callback is None:
            return await self._upstream.pipe(sink)

        def reporting(chunk: bytes) -> bool:
            self._report()
            return sink(chunk)

        try:
            return await self._upstream.pipe(reporting)
        finally:
            self._report()  # the body's end, if no bytes came

    async def read(self) -> bytes:
        data = await self._upstream.read()
        self._report()
        return data

    def close(self) -> None:
        self._upstream.close()
        self._report()

    def _report(self) -> None:
        if self._callback is not None:
            callback, self._callback = self._callback, None
            callback(self._model)


def _file_size(model: ModelConfig) -> int:
    try:
        return os.path.getsize(model.gguf) if model.gguf else 0
    except OSError:
        return 0


def _n_ctx(model: ModelConfig) -> int:
    return model.llamacpp.n_ctx if model.llamacpp is not None else 0


