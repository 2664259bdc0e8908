"""The spare worker: a llama-cpp-python server whose import cost is paid before it is given a model.

Run as `python -m warmpool.backends._llamacpp_worker` (or by file path, for an interpreter that lacks
warmpool: this module needs only the standard library and llama_cpp). It talks to its parent through
stdout lines that start with `@warmpool ` followed by a JSON object:

1. die with the parent (PR_SET_PDEATHSIG), first thing, and exit if the parent is already gone;
2. import llama_cpp, its server app and uvicorn, then print `{"event": "ready", "imports": seconds}`;
3. block reading ONE JSON line from stdin: the flat llama-cpp-python `Settings` (server and model fields
   mixed, exactly what `python -m llama_cpp.server` takes as flags); EOF means "not needed": exit 0;
4. build llama-cpp-python's own app with `create_app(server_settings=..., model_settings=[...])` (this
   loads the model), print `{"event": "loaded", "model_load": seconds}`, and run uvicorn the way
   `llama_cpp.server.__main__` does.

One addition to llama-cpp-python: its streams carry no token counts (it has no `stream_options`), so
the chunk that ends a stream gets a `usage` as llama-server's does; warmpool's Ollama translation needs
it for `prompt_eval_count`.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
from typing import Any

PREFIX = "@warmpool "
PARENT_PID_ENV = "WARMPOOL_PARENT_PID"
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Get SIGKILL when the parent dies; exit now if it already has (it may die before prctl runs)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    expected = os.environ.get(PARENT_PID_ENV)
    if expected is not None and os.getppid() != int(expected):
        os._exit(1)


def report(event: str, **fields: Any) -> None:
    print(PREFIX + json.dumps({"event": event, **fields}), flush=True)


def import_server() -> float:
    """Do the expensive imports ahead of need; returns seconds."""
    started = time.perf_counter()
    import llama_cpp
    import llama_cpp.server.app
    import llama_cpp.server.settings  # noqa: F401
    import uvicorn  # noqa: F401

    return time.perf_counter() - started


def read_settings() -> dict[str, Any] | None:
    line = sys.stdin.readline()
    return json.loads(line) if line.strip() else None


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


def build_app(settings: dict[str, Any]) -> tuple[Any, Any]:
    """Split the flat settings as the CLI does (server fields vs model fields) and create the app."""
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    count_stream_tokens()

    server_fields = {k: v for k, v in settings.items() if k in ServerSettings.model_fields}
    model_fields = {k: v for k, v in settings.items() if k not in ServerSettings.model_fields}
    server = ServerSettings(**server_fields)
    app = create_app(server_settings=server, model_settings=[ModelSettings(**model_fields)])
    return app, server


def serve(app: Any, server: Any) -> None:
    """Run uvicorn with the same arguments as `llama_cpp.server.__main__` (minus its HOST/PORT env)."""
    import uvicorn

    uvicorn.run(
        app,
        host=server.host,
        port=server.port,
        ssl_keyfile=server.ssl_keyfile,
        ssl_certfile=server.ssl_certfile,
    )


def main() -> int:
    die_with_parent()
    report("ready", imports=import_server())
    settings = read_settings()
    if settings is None:
        return 0
    started = time.perf_counter()
    app, server = build_app(settings)
    report("loaded", model_load=time.perf_counter() - started)
    serve(app, server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
