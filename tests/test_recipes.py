"""The README's client recipes, run as written: every Python block under "### Recipes" (the official openai,
ollama and anthropic clients, LangChain's ChatOpenAI and ChatOllama) against warmpool in front of the Ollama
emulator, with only the base URL replaced (Aider's command line: tests/test_recipe_aider.py). A recipe that
stops working fails here, not in a reader's hands."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import running_warmpool
from tests.ollama_emulator import EmulatedModel, OllamaEmulator

README = Path(__file__).resolve().parents[1] / "README.md"
DOCUMENTED_URL = "http://127.0.0.1:11435"


def recipes_section() -> str:
    text = README.read_text()
    section = text[text.index("### Recipes"):]
    return section[:section.index("\n## ")]


def client_recipes() -> dict[str, str]:
    """Each client's part of the section, by its bold name: from the name to the next client's."""
    parts = re.split(r"^\*\*(.+?)\*\*", recipes_section(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def recipes() -> list[str]:
    return re.findall(r"```python\n(.*?)```", recipes_section(), flags=re.S)


RECIPES = recipes()
NAMES = [re.search(r"^(?:from|import) (\w+)", code, flags=re.M).group(1) for code in RECIPES]  # type: ignore[union-attr]
# Recipes run by a test of their own: Aider's is a command line, run with the real aider (PyPI's aider-chat).
RUN_ELSEWHERE = {"Aider": "tests/test_recipe_aider.py"}
# Clients no test can run from PyPI: Continue is an editor extension, Claude Code an npm package.
NOT_ON_PYPI = {"Continue", "Claude Code"}


def test_every_client_with_a_package_has_a_recipe() -> None:
    assert sorted(NAMES) == ["anthropic", "langchain_ollama", "ollama", "openai"]
    # every client in the section is run by a test (here, its Python block; or by its own test), or has no
    # package on PyPI to run it with: a new client's recipe fails here until it is run or said not to be
    clients = client_recipes()
    run_here = {name for name, part in clients.items() if "```python" in part}
    assert set(clients) - run_here - set(RUN_ELSEWHERE) == NOT_ON_PYPI
    assert set(RUN_ELSEWHERE) <= set(clients)


@contextlib.asynccontextmanager
async def recipes_stack() -> AsyncIterator[tuple[str, OllamaEmulator]]:
    """warmpool in front of the Ollama emulator, with the models and phases the recipes name; yields warmpool's
    URL and the emulator (its events say which upstream model served each request)."""
    emu = OllamaEmulator([EmulatedModel("qwen2.5-coder:7b", size=100_000_000),
                          EmulatedModel("llama3.2:3b", size=100_000_000)], load_seconds_per_gb=0.1, token_delay=0.001)
    await emu.start()
    config = {"backends": {"gpu": {"kind": "ollama", "url": emu.url, "max_resident": 1}},
              "models": {"coder": {"backend": "gpu", "upstream_name": "qwen2.5-coder:7b"},
                         "planner": {"backend": "gpu", "upstream_name": "llama3.2:3b"}},
              "phases": {"execution": "coder", "context": "planner"}}
    try:
        async with running_warmpool(config) as url:
            yield url, emu
    finally:
        await emu.stop()


@pytest.fixture
async def warmpool_url() -> AsyncIterator[tuple[str, OllamaEmulator]]:
    async with recipes_stack() as stack:
        yield stack


@pytest.mark.parametrize("code", RECIPES, ids=NAMES)
async def test_recipe_runs_as_written(warmpool_url: tuple[str, OllamaEmulator], code: str) -> None:
    url, emu = warmpool_url
    assert DOCUMENTED_URL in code
    printed = io.StringIO()

    def run() -> None:
        namespace: dict[str, Any] = {}
        with contextlib.redirect_stdout(printed):
            exec(compile(code.replace(DOCUMENTED_URL, url), "README recipe", "exec"), namespace)

    await asyncio.to_thread(run)  # the recipes use the synchronous clients; warmpool runs in this loop
    lines = [line for line in printed.getvalue().splitlines() if line.strip()]
    assert lines, "the recipe printed nothing"
    served = {e["model"] for e in emu.events if e["event"] == "request"}
    # both phases were reached where the recipe names both, through the header or the model name
    wanted = {"qwen2.5-coder:7b", "llama3.2:3b"} if "context" in code and "execution" in code else None
    if wanted:
        assert wanted <= served
