"""How a llama-cpp-python worker process is started: its command line, its environment, and the settings
it is given for a model.

Facts relied on (research/upstream_spec.md §2): `interrupt_requests` defaults to true and must be turned
off (it cuts a running stream whenever another request arrives); llama-cpp-python reads unset settings
from same-named environment variables, so the worker's environment is cleaned of them.
"""

from __future__ import annotations

import os
import site
import sys
from pathlib import Path
from typing import Any

from warmpool.backends.process import base_env
from warmpool.config import ModelConfig

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
WARMPOOLS = frozenset({"host", "port", "interrupt_requests"})  # settings a model's server_args cannot change


def llama_settings(model: ModelConfig) -> dict[str, Any]:
    """The flat llama-cpp-python `Settings` (model fields, and server fields from `server_args`) for `model`.

    `server_args` override the typed model fields (those always carry a value, defaults included, so an
    explicit extra could otherwise never take effect) but never host, port or interrupt_requests, which
    are warmpool's contract with the worker.
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
    settings.update({k: v for k, v in llama.server_args.items() if k not in WARMPOOLS})
    settings["interrupt_requests"] = False
    return settings


def worker_argv(python: str) -> list[str]:
    """The command line of a worker process run by `python`."""
    if python == sys.executable:  # child_env puts this very warmpool on the child's path
        return [python, "-m", WORKER_MODULE]
    # Another interpreter may not have warmpool installed; the worker file needs only llama_cpp
    # and the context module beside it. runpy
    # (not `python FILE`) keeps warmpool/backends off sys.path, where its modules would shadow others.
    bootstrap = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"
    return [python, "-c", bootstrap, str(WORKER_FILE)]


def child_env(python: str) -> dict[str, str]:
    """The worker's environment: warmpool's, minus what llama-cpp-python would read as settings."""
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
