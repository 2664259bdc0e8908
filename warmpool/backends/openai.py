"""The OpenAI-compatible backend: any server that speaks /v1/* (vLLM, llama-server, a remote peer); forward only."""

from __future__ import annotations

from warmpool.backends.base import Backend, ResidentModel
from warmpool.backends.control import read_json, send
from warmpool.config import ModelConfig
from warmpool.errors import BackendError


class OpenAIBackend(Backend):
    speaks = "openai"
    managed = False  # warmpool does not decide what such a server has loaded

    def base_url(self, model: ModelConfig | None) -> str:
        return self.config.url.rstrip("/")  # type: ignore[union-attr]

    def own_headers(self) -> list[tuple[str, str]]:
        return [("Authorization", f"Bearer {self.config.api_key}")] if self.config.api_key else []

    async def health(self) -> bool:
        try:
            resp = await send(self.session, self.name, "GET", self.base_url(None) + "/v1/models",
                              dict(self.own_headers()), None, self.app_config.timeouts.connect + 20)
            await read_json(resp, self.name)
        except BackendError:
            return False
        self.healthy_once = True
        return True

    async def resident(self) -> list[ResidentModel]:
        return []
