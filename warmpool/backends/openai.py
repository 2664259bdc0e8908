"""The OpenAI-compatible backend: any server that speaks /v1/* (vLLM, llama-server, a remote peer); forward only."""

from __future__ import annotations

from collections.abc import Mapping

from warmpool.backends.base import Backend, ResidentModel, read_json, send
from warmpool.config import ModelConfig
from warmpool.errors import BackendError


class OpenAIBackend(Backend):
    speaks = "openai"
    managed = False  # warmpool does not decide what such a server has loaded

    def base_url(self, model: ModelConfig | None) -> str:
        return self.config.url.rstrip("/")  # type: ignore[union-attr]

    def upstream_headers(self, headers: Mapping[str, str]) -> list[tuple[str, str]]:
        out = super().upstream_headers(headers)
        if self.config.api_key:
            out.append(("Authorization", f"Bearer {self.config.api_key}"))
        return out

    async def health(self) -> bool:
        try:
            resp = await send(self.session, self.name, "GET", self.base_url(None) + "/v1/models",
                              self.upstream_headers({}), None, self.app_config.timeouts.connect + 20)
            await read_json(resp, self.name)
        except BackendError:
            return False
        self.healthy_once = True
        return True

    async def resident(self) -> list[ResidentModel]:
        return []
