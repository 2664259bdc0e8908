"""Backend adapters: the only code that talks to upstream servers."""

from __future__ import annotations

from warmpool.backends.base import Backend
from warmpool.config import BackendConfig, Config


def make_backend(config: BackendConfig, app_config: Config) -> Backend:
    """The adapter for a configured backend; imports lazily so a kind that is not used costs nothing."""
    if config.kind == "ollama":
        from warmpool.backends.ollama import OllamaBackend

        return OllamaBackend(config, app_config)
    if config.kind == "llamacpp":
        from warmpool.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(config, app_config)
    if config.kind == "command":
        from warmpool.backends.command import CommandBackend

        return CommandBackend(config, app_config)
    from warmpool.backends.openai import OpenAIBackend

    return OpenAIBackend(config, app_config)
