"""The floor plan, measured from the code's own imports: at most eight modules at warmpool's top level, no
import cycles, every import going down the layers (ARCHITECTURE.md), and one /api/chat request walking
through at most eight packages (traced for real, in-process, against the Ollama emulator).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp

from tests.conftest import running_warmpool
from tests.ollama_emulator import EmulatedModel, OllamaEmulator

PACKAGE = Path(__file__).resolve().parents[1] / "warmpool"
# Higher layers may import lower ones, never the reverse; parts on one layer do not import each other.
LAYERS: list[set[str]] = [
    {"__main__"},
    {"cli"},
    {"app"},
    {"proxy", "admin"},
    {"scheduling"},
    {"backends", "ramtier"},
    {"dialects", "http", "config"},
    {"errors", "logs", "metrics"},
    {"__init__"},
]
LAYER_OF = {part: depth for depth, parts in enumerate(LAYERS) for part in parts}


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(relative.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts.pop()
        yield ".".join(parts), path


def part_of(module: str) -> str:
    """The top-level part a module belongs to: its package, or itself for a top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """Every warmpool module `module` imports, lazily inside functions too."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known}
    return {name for name in found if name in known and name != module}


def graph() -> dict[str, set[str]]:
    paths = dict(modules())
    known = set(paths)
    return {module: imports_of(module, path, known) for module, path in paths.items()}


def test_at_most_eight_modules_at_the_top_level() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top


def test_every_part_has_a_layer() -> None:
    parts = {part_of(m) for m in graph()}
    assert parts <= set(LAYER_OF), parts - set(LAYER_OF)


def test_imports_only_go_down_the_layers() -> None:
    wrong = []
    for module, imported in graph().items():
        for target in imported:
            source_part, target_part = part_of(module), part_of(target)
            if target_part == "__init__" or source_part == target_part:
                continue
            if LAYER_OF[target_part] <= LAYER_OF[source_part]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


def test_no_import_cycles() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    # A package's __init__ re-exporting its own modules is not a cycle between parts.
    real = [c for c in cycles if len({part_of(m) for m in c}) > 1 or not any(m == c[0].rpartition(".")[0]
                                                                               for m in c)]
    assert not real, real


async def test_one_api_chat_walks_through_at_most_eight_packages() -> None:
    emu = OllamaEmulator([EmulatedModel("qwen2.5:7b", size=100_000_000)], load_seconds_per_gb=0.1,
                         token_delay=0.0)
    await emu.start()
    config = {"backends": {"gpu": {"kind": "ollama", "url": emu.url}},
              "models": {"planner": {"backend": "gpu", "upstream_name": "qwen2.5:7b"}},
              "phases": {"context": "planner"}, "ram_tier": {"enabled": False}}
    body = {"model": "planner", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    try:
        async with running_warmpool(config) as url, aiohttp.ClientSession() as http:
            async with http.post(url + "/api/chat", json=body) as warm:  # the load happens here
                assert warm.status == 200, await warm.text()
                await warm.read()
            touched: set[str] = set()
            sys.setprofile(_recorder(touched))
            try:
                async with http.post(url + "/api/chat", json=body) as reply:
                    assert reply.status == 200
                    await reply.read()
            finally:
                sys.setprofile(None)
    finally:
        await emu.stop()
    assert {"http", "proxy", "scheduling", "backends"} <= touched, touched  # the walk was seen
    print("packages touched by one /api/chat:", sorted(touched))
    assert len(touched) <= 8, sorted(touched)


def _recorder(touched: set[str]) -> Any:
    def record(frame: FrameType, event: str, arg: object) -> None:
        if event == "call":
            name = frame.f_globals.get("__name__", "")
            if name.startswith("warmpool."):
                touched.add(part_of(name))
    return record
