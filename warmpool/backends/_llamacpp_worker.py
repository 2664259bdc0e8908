"""A slot worker: one long-lived llama-cpp-python server process that loads and frees models on command,
so a swap pays neither a process start nor the imports.

Run as `python -m warmpool.backends._llamacpp_worker` (or by file path, for an interpreter that lacks
warmpool: this module needs only the standard library, llama_cpp and its sibling `_llamacpp_context.py`).

1. Die with the parent (PR_SET_PDEATHSIG), first thing, and exit if the parent is already gone.
2. Import llama_cpp, its server app and uvicorn; build llama-cpp-python's own app (`create_app`: its
   routes, middleware and error handling) with no model in it, bind a free loopback port and serve;
   then print `{"event": "ready", "port": N, "imports": seconds}`.
3. Read commands from stdin, one JSON object a line, each answered on stdout by `{"event": "done", "id"}`
   (with timings) or `{"event": "failed", "id", "error"}`:
   - `{"op": "load", "id", "settings", "context"}`: free the current model (saving its context), then
     load the model with these flat llama-cpp-python settings (server fields mixed in, as
     `python -m llama_cpp.server` takes them) through `LlamaProxy.load_llama_from_model_settings`;
   - `{"op": "free", "id"}`: save the model's context and free it.
   Both hold the server's model locks (the ones every inference endpoint takes), so they never run
   beside a request. EOF on stdin means warmpool is done with the worker: it exits.

Every line for warmpool starts with `@warmpool ` (other output may share stdout). Context events
(`{"event": "context", ...}`: saves, restores, misses) come from `_llamacpp_context`.

One addition to llama-cpp-python: its streams carry no token counts (it has no `stream_options`), so
the chunk that ends a stream gets a `usage` as llama-server's does; warmpool's Ollama translation needs
it for `prompt_eval_count`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

PREFIX = "@warmpool "
PARENT_PID_ENV = "WARMPOOL_PARENT_PID"
PR_SET_PDEATHSIG = 1
HOST = "127.0.0.1"

_report_lock = threading.Lock()


def die_with_parent() -> None:
    """Get SIGKILL when the parent dies; exit now if it already has (it may die before prctl runs)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    expected = os.environ.get(PARENT_PID_ENV)
    if expected is not None and os.getppid() != int(expected):
        os._exit(1)


def report(event: str, **fields: Any) -> None:
    """One line for warmpool, written whole (requests run in threads that may report at the same time)."""
    line = PREFIX + json.dumps({"event": event, **fields}) + "\n"
    with _report_lock:
        sys.stdout.write(line)
        sys.stdout.flush()


def import_server() -> float:
    """Do the expensive imports ahead of need; returns seconds."""
    started = time.perf_counter()
    import llama_cpp
    import llama_cpp.server.app
    import llama_cpp.server.settings  # noqa: F401
    import uvicorn  # noqa: F401

    return time.perf_counter() - started


def context_module() -> ModuleType:
    """`_llamacpp_context`, from warmpool when it is importable, else from the file beside this one."""
    try:
        import warmpool.backends._llamacpp_context as context
    except ImportError:
        path = Path(__file__).with_name("_llamacpp_context.py")
        spec = importlib.util.spec_from_file_location("_llamacpp_context", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up by name
        spec.loader.exec_module(module)
        return module
    return context


class Slot:
    """What the app's endpoints reach as `llama_cpp.server.app._llama_proxy`: the one loaded model (or
    none), in place of llama-cpp-python's `LlamaProxy`, which always holds one and swaps on its own."""

    def __init__(self) -> None:
        self.llama: Any = None
        self.alias: str | None = None
        self.keeper: Any = None

    def __call__(self, model: str | None = None) -> Any:
        if self.llama is None:
            from fastapi import HTTPException

            raise HTTPException(status_code=503, detail="no model loaded in this worker")
        return self.llama

    def __iter__(self) -> Any:
        return iter([self.alias] if self.alias else [])

    def load(self, settings: dict[str, Any], context: dict[str, Any] | None) -> dict[str, float]:
        """Free the current model, then load one from flat settings; returns timings. Blocking."""
        timings = self.free()
        from llama_cpp.server.model import LlamaProxy
        from llama_cpp.server.settings import ModelSettings, ServerSettings

        server_fields = {k: v for k, v in settings.items() if k in ServerSettings.model_fields}
        model_settings = ModelSettings(**{k: v for k, v in settings.items() if k not in server_fields})
        apply_server_settings(server_fields)
        started = time.perf_counter()
        self.llama = LlamaProxy.load_llama_from_model_settings(model_settings)
        self.alias = model_settings.model_alias
        timings["model_load"] = time.perf_counter() - started
        if context is not None and keeps_context(model_settings):
            self.keeper = new_keeper(self.llama, model_settings, context)
        return timings

    def free(self) -> dict[str, float]:
        """Save the model's context, then free it; returns timings. Blocking."""
        timings: dict[str, float] = {}
        if self.llama is None:
            return timings
        if self.keeper is not None:
            started = time.perf_counter()
            try:
                self.keeper.save()
            except Exception as exc:  # noqa: BLE001 - a failed save must not keep the model (and its memory)
                report("context", failed=1, error=repr(exc))
            timings["context_save"] = time.perf_counter() - started
        started = time.perf_counter()
        llama, self.llama, self.alias, self.keeper = self.llama, None, None, None
        llama.close()
        timings["free"] = time.perf_counter() - started
        return timings


def keeps_context(settings: Any) -> bool:
    """Context is kept for generative text models: an embedding context does not generate, and the
    multimodal chat handlers evaluate images outside `generate`."""
    return not settings.embedding and settings.clip_model_path is None


def new_keeper(llama: Any, settings: Any, context: dict[str, Any]) -> Any:
    import llama_cpp

    ctx = context_module()
    config = ctx.ContextSettings.from_json(context)
    store = ctx.ContextStore(config.tiers)
    fingerprint = ctx.fingerprint(settings.model_dump(), llama_cpp.__version__)
    keeper = ctx.ContextKeeper(llama, store, fingerprint, config.min_tokens, report)
    keeper.install()
    return keeper


def apply_server_settings(fields: dict[str, Any]) -> None:
    """Server-level settings of a model's `server_args` (api_key, disable_ping_events, ...) take effect
    for as long as it is loaded; interrupt_requests stays off (it would cut running streams)."""
    import llama_cpp.server.app as server_app
    from llama_cpp.server.settings import ServerSettings

    server = ServerSettings(**{**fields, "interrupt_requests": False})
    server_app.set_server_settings(server)
    server_app._ping_message_factory = (lambda: b"") if server.disable_ping_events else None


def count_stream_tokens() -> None:
    """Give the finishing chunk of every streamed completion a `usage`: the prompt's tokens exactly as
    `Llama.generate` was given them, and the tokens it produced that the answer kept (all but an
    end-of-generation token), which is how llama-cpp-python counts a non-streamed answer."""
    from llama_cpp import Llama, llama_vocab_is_eog

    generate, complete, chat = Llama.generate, Llama.create_completion, Llama.create_chat_completion

    def counting_generate(self: Any, tokens: Any, *args: Any, **kwargs: Any) -> Any:
        self.warmpool_usage = counts = [len(tokens), 0]
        for token in generate(self, tokens, *args, **kwargs):
            counts[1] += not llama_vocab_is_eog(self._model.vocab, token)
            yield token

    def with_usage(self: Any, chunks: Any) -> Any:
        for chunk in chunks:
            choices = chunk.get("choices") or [{}]
            counts = getattr(self, "warmpool_usage", None)
            if choices[0].get("finish_reason") and counts is not None:
                chunk["usage"] = {"prompt_tokens": counts[0], "completion_tokens": counts[1],
                                  "total_tokens": counts[0] + counts[1]}
            yield chunk

    def streaming(create: Any) -> Any:
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = create(self, *args, **kwargs)
            return with_usage(self, result) if kwargs.get("stream") else result
        return call

    Llama.generate = counting_generate  # type: ignore[method-assign]
    Llama.create_completion = streaming(complete)  # type: ignore[method-assign]
    Llama.create_chat_completion = streaming(chat)  # type: ignore[method-assign]


def build_app(slot: Slot) -> Any:
    """llama-cpp-python's own app, with `slot` in place of the model proxy and no model loaded yet."""
    import llama_cpp.server.app as server_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    count_stream_tokens()
    original = server_app.set_llama_proxy
    server_app.set_llama_proxy = lambda model_settings: None  # create_app would load a model here
    try:
        app = server_app.create_app(server_settings=ServerSettings(host=HOST, interrupt_requests=False),
                                    model_settings=[ModelSettings(model="")])
    finally:
        server_app.set_llama_proxy = original
    server_app._llama_proxy = slot  # type: ignore[assignment]
    return app


async def run_locked(function: Any, *args: Any) -> Any:
    """Run a blocking model operation in a thread while holding the server's model locks."""
    import anyio.to_thread
    from llama_cpp.server.app import get_llama_proxy

    async with contextlib.asynccontextmanager(get_llama_proxy)():
        return await anyio.to_thread.run_sync(function, *args)


async def handle(slot: Slot, command: dict[str, Any]) -> None:
    ident = command.get("id")
    try:
        if command.get("op") == "load":
            timings = await run_locked(slot.load, command["settings"], command.get("context"))
        elif command.get("op") == "free":
            timings = await run_locked(slot.free)
        else:
            raise ValueError(f"unknown command {command.get('op')!r}")
    except Exception as exc:  # noqa: BLE001 - every failure goes back to warmpool, the worker stays up
        report("failed", id=ident, error=f"{type(exc).__name__}: {exc}")
    else:
        report("done", id=ident, **timings)


def read_commands(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[dict[str, Any] | None]) -> None:
    """Stdin reader thread: each line a command; None at EOF."""
    for line in sys.stdin:
        if line.strip():
            loop.call_soon_threadsafe(queue.put_nowait, json.loads(line))
    loop.call_soon_threadsafe(queue.put_nowait, None)


async def serve(imports: float) -> None:
    import uvicorn

    slot = Slot()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    config = uvicorn.Config(build_app(slot), access_log=False, log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if serving.done():
            serving.result()  # raises what stopped it
            return
        await asyncio.sleep(0.005)
    report("ready", port=sock.getsockname()[1], imports=imports)
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    threading.Thread(target=read_commands, args=(loop, queue), daemon=True).start()
    while (command := await queue.get()) is not None:
        await handle(slot, command)
    server.should_exit = True
    await serving


def main() -> int:
    die_with_parent()
    imports = import_server()
    asyncio.run(serve(imports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
