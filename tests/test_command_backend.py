"""`kind: command` without a language model: its config (templates, placeholders, validation), the saved-slot
store's byte budget, and the lifecycle of a server process (start, health, failures with the stderr tail,
SIGTERM then SIGKILL, a crash reported, nothing left behind), driven with small real HTTP servers written in
Python. The same backend serving real llama-server and llama-cpp-python processes: test_e2e_command.py."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from warmpool.backends import make_backend
from warmpool.backends.command import CommandBackend
from warmpool.backends.command_server import CommandServer, server_argv
from warmpool.backends.slots import ContextStore, SlotFile, over_budget
from warmpool.config import ModelConfig, config_from_mapping, load_config, redacted
from warmpool.config.placeholders import fill, used
from warmpool.errors import BackendUnavailable, ConfigError

# A tiny HTTP server: 200 on every GET; with "ignore-term" it ignores SIGTERM, with "grandchild" it starts
# a sleeping child first (which must die with the group).
SERVER = """
import http.server, signal, subprocess, sys
port, mode = int(sys.argv[1]), sys.argv[2]
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if mode == "grandchild":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(f"grandchild {child.pid}", file=sys.stderr, flush=True)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), Health).serve_forever()
"""
FAILING = "import sys; print('error: unable to load model /nowhere.gguf', file=sys.stderr); sys.exit(3)"


def command_config(command: Any, **model: Any) -> dict[str, Any]:
    backend = model.pop("backend_settings", {})
    return {"backends": {"cmd": {"kind": "command", "start_timeout": "20s", "stop_grace": "2s", **backend}},
            "models": {"m": {"backend": "cmd", "command": command, **model}}}


def problems_of(raw: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(raw, env=env or {})
    return info.value.problems


# ---------------------------------------------------------------- config


def test_placeholders_are_kept_for_the_backend_and_the_rest_is_the_environment(tmp_path: Path) -> None:
    gguf = tmp_path / "w.gguf"
    gguf.write_bytes(b"GGUF")
    cfg = config_from_mapping(command_config(
        "${BIN}/llama-server -m ${GGUF} --port ${PORT} --alias ${MODEL} --slot-save-path ${SLOT_DIR} "
        "--chat-template-kwargs '{\"a\": 1}' --literal $${PORT}",
        gguf=str(gguf), upstream_name="qwen", env={"CUDA_VISIBLE_DEVICES": "${GPU}", "P": "${PORT}"},
    ), env={"BIN": "/opt/llama", "GPU": "0"})
    part = cfg.models["m"].command
    assert part is not None and part.keeps_context and cfg.models["m"].gguf == str(gguf)
    assert part.command == ("/opt/llama/llama-server", "-m", "${GGUF}", "--port", "${PORT}", "--alias",
                            "${MODEL}", "--slot-save-path", "${SLOT_DIR}", "--chat-template-kwargs", '{"a": 1}',
                            "--literal", "$${PORT}")
    assert part.env == {"CUDA_VISIBLE_DEVICES": "0", "P": "${PORT}"}
    argv = server_argv(cfg.models["m"], 8123, Path("/state/slots"))
    assert argv == ["/opt/llama/llama-server", "-m", str(gguf), "--port", "8123", "--alias", "qwen",
                    "--slot-save-path", "/state/slots", "--chat-template-kwargs", '{"a": 1}', "--literal", "${PORT}"]


def test_placeholders_are_the_environments_outside_a_template() -> None:
    raw = command_config(["srv", "--port", "${PORT}"])
    raw["models"]["m"]["upstream_name"] = "${MODEL}"
    assert problems_of(raw) == ["models.m.upstream_name: environment variable MODEL is not set"]


def test_fill_and_used() -> None:
    assert used("a${PORT}b$${GGUF}${MODEL}${HOME}") == {"PORT", "MODEL"}
    assert fill("${PORT}/$${PORT}/${MODEL}", {"PORT": "1", "MODEL": "m"}) == "1/${PORT}/m"


def test_a_list_command_keeps_each_argument_whole() -> None:
    cfg = config_from_mapping(command_config(["my server", "--port", "${PORT}", "--name", "${WHO}"]),
                              env={"WHO": "a b"})
    assert cfg.models["m"].command is not None
    assert cfg.models["m"].command.command == ("my server", "--port", "${PORT}", "--name", "a b")
    assert not cfg.models["m"].command.keeps_context


@pytest.mark.parametrize(("model", "expected"), [
    ({"command": ["srv", "--model", "x"]}, "models.m.command: must pass ${PORT} to the server"),
    ({"command": ["srv", "${PORT}", "${GGUF}"]}, "models.m.gguf: required when the command uses ${GGUF}"),
    ({"command": ["srv", "${PORT}"], "gguf": "/no/such.gguf"}, "models.m.gguf: file not found: /no/such.gguf"),
    ({"command": "srv '${PORT}"}, "models.m.command: cannot split the command into arguments"),
    ({"command": []}, "models.m.command: expected a command with at least the program to run"),
    ({"command": {"a": 1}}, "models.m.command: expected a command: a list of arguments or one string"),
    ({"command": ["srv", "${PORT}"], "health": "health"}, 'models.m.health: expected a path on the server'),
    ({"command": ["srv", "${PORT}"], "env": {"1X": "a"}}, "models.m.env: invalid environment variable name"),
    ({"command": ["srv", "${PORT}"], "n_ctx": 512}, "models.m.n_ctx: only allowed when the backend kind is "
                                                    "llamacpp, not command"),
    ({"command": ["srv", "${PORT}"], "backend_settings": {"context_min_tokens": 8}},
     "backends.cmd.context_min_tokens: only allowed when the backend kind is llamacpp, not command"),
    ({"command": ["srv", "${PORT}"], "backend_settings": {"context_budget": "lots"}},
     "backends.cmd.context_budget: "),
])
def test_invalid_command_models(model: dict[str, Any], expected: str) -> None:
    command = model.pop("command")
    problems = problems_of(command_config(command, **model))
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_command_keys_belong_to_command_models() -> None:
    raw = command_config(["srv", "${PORT}"])
    raw["backends"]["other"] = {"kind": "llamacpp", "context_dir": "/tmp/x"}  # context_dir: both managed kinds
    raw["models"]["o"] = {"backend": "other", "gguf": __file__, "command": ["srv"], "health": "/h"}
    assert problems_of(raw) == [
        "models.o.command: only allowed when the backend kind is command, not llamacpp",
        "models.o.health: only allowed when the backend kind is command, not llamacpp",
    ]


def test_a_port_passed_through_the_environment_is_enough() -> None:
    cfg = config_from_mapping(command_config(["python", "-m", "llama_cpp.server"], env={"PORT": "${PORT}"}))
    assert cfg.models["m"].command is not None and cfg.models["m"].command.env == {"PORT": "${PORT}"}


def test_redacted_command_config_loads_back(tmp_path: Path) -> None:
    cfg = config_from_mapping(command_config(
        "srv --port ${PORT} --slot-save-path ${SLOT_DIR} $${X}", gguf=__file__, health="/v1/models",
        env={"A": 1}, backend_settings={"context_dir": str(tmp_path), "context_budget": "1GiB"}))
    out = redacted(cfg)
    assert out["backends"]["cmd"]["context_budget"] == 2**30 and "spare" not in out["backends"]["cmd"]
    assert out["models"]["m"]["command"] == ["srv", "--port", "${PORT}", "--slot-save-path", "${SLOT_DIR}", "$${X}"]
    assert config_from_mapping(yaml.safe_load(yaml.safe_dump(out)), env={}) == cfg


def test_the_examples_commented_command_sections_load(tmp_path: Path) -> None:
    from tests.test_config import EXAMPLE, _uncomment

    gguf = tmp_path / "qwen.gguf"
    gguf.write_bytes(b"GGUF")
    text = EXAMPLE.read_text().replace("~/models/qwen2.5-coder-7b-q4_k_m.gguf", str(gguf))
    path = tmp_path / "full.yaml"
    path.write_text(_uncomment(text, ("# cpp:", "# qwen-cpp:", "# qwen-vllm:")))
    cfg = load_config(path, env={"LLAMA_CPP": "/opt/llama.cpp/build/bin"})
    assert cfg.backends["cpp"].kind == "command" and cfg.backends["cpp"].context_budget == 4 * 2**30
    cpp, vllm = cfg.models["qwen-cpp"].command, cfg.models["qwen-vllm"].command
    assert cpp is not None and cpp.keeps_context and cpp.env == {"CUDA_VISIBLE_DEVICES": "0"}
    assert cpp.command[:3] == ("/opt/llama.cpp/build/bin/llama-server", "-m", "${GGUF}")
    assert vllm is not None and vllm.command[2] == "${MODEL}" and not vllm.keeps_context
    for key in ("context_dir", "context_budget", "command", "health", "env"):
        assert re.search(rf"^\s*#?\s*{key}:", text, re.M), key


# ---------------------------------------------------------------- the saved-slot store


def test_over_budget_drops_the_least_recently_used_first() -> None:
    files = [SlotFile(Path(name), size, used) for name, size, used in
             [("old", 40, 1.0), ("new", 50, 3.0), ("mid", 30, 2.0)]]
    assert over_budget(files, 200) == []
    assert [f.path.name for f in over_budget(files, 80)] == ["old"]
    assert [f.path.name for f in over_budget(files, 50)] == ["old", "mid"]
    assert [f.path.name for f in over_budget(files, 0)] == ["old", "mid", "new"]


def test_context_store_trims_to_its_budget(tmp_path: Path) -> None:
    a = ModelConfig(name="a/b:1", backend="cmd", upstream_name="a")
    b = ModelConfig(name="b", backend="cmd", upstream_name="b")
    store = ContextStore(tmp_path, budget=150)
    for index, model in enumerate([a, b]):
        directory = store.prepare(model)
        (directory / "slot0.bin").write_bytes(b"x" * 100)
        os.utime(directory / "slot0.bin", (time.time() - 100 + index, time.time() - 100 + index))
    assert store.directory(a).parent == tmp_path and "/" not in store.directory(a).name
    assert store.trim() == [store.directory(a) / "slot0.bin"]
    assert store.saved(a) == {} and store.saved(b) == {0: store.directory(b) / "slot0.bin"}


def test_a_changed_command_gets_another_context_directory(tmp_path: Path) -> None:
    one = config_from_mapping(command_config(["srv", "${PORT}", "-c", "512"])).models["m"]
    two = config_from_mapping(command_config(["srv", "${PORT}", "-c", "1024"])).models["m"]
    store = ContextStore(tmp_path, budget=1)
    assert store.directory(one) != store.directory(two)


# ---------------------------------------------------------------- server processes


def small_server(mode: str = "plain", **settings: Any) -> tuple[CommandBackend, ModelConfig]:
    raw = command_config([sys.executable, "-c", SERVER, "${PORT}", mode], health="/ready", **settings)
    cfg = config_from_mapping(raw, env={})
    backend = make_backend(cfg.backends["cmd"], cfg)
    assert isinstance(backend, CommandBackend)
    return backend, cfg.models["m"]


def group_members(pgid: int) -> list[int]:
    members = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


async def eventually(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return bool(predicate())


async def test_load_serves_on_a_loopback_port_and_unload_stops_the_group() -> None:
    backend, model = small_server("grandchild")
    await backend.start()
    try:
        result = await backend.load(model)
        server = backend.servers["m"]
        assert backend.base_url(model) == server.url and server.url.startswith("http://127.0.0.1:")
        assert result.seconds > 0 and "start_to_ready" in result.details
        assert [r.name for r in await backend.resident()] == ["m"]
        assert server.pid is not None and len(group_members(server.pid)) == 2  # the server and its child
        await backend.unload(model)
        assert group_members(server.pid) == [] and backend.servers == {}
        with pytest.raises(BackendUnavailable, match="has no running server"):
            backend.base_url(model)
    finally:
        await backend.close()


async def test_sigterm_ignored_means_sigkill_after_the_grace() -> None:
    backend, model = small_server("ignore-term", backend_settings={"stop_grace": "0.5s"})
    try:
        await backend.load(model)
        server = backend.servers["m"]
        started = time.monotonic()
        await backend.unload(model)
        assert time.monotonic() - started >= 0.5 and server.returncode == -signal.SIGKILL
    finally:
        await backend.close()


async def test_a_crash_is_reported_with_the_stderr_tail() -> None:
    backend, model = small_server()
    lost: list[tuple[str, str]] = []
    backend.report_losses_to(lambda name, reason: lost.append((name, reason)))
    try:
        await backend.load(model)
        server = backend.servers["m"]
        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)
        assert await eventually(lambda: bool(lost), 10)
        assert lost == [("m", "server process killed by SIGKILL; no stderr output")]
        assert backend.servers == {} and await backend.resident() == []
        await backend.load(model)  # and it comes back on the next load
        assert backend.servers["m"].alive
    finally:
        await backend.close()


async def test_a_server_that_exits_while_starting_fails_the_load_with_its_stderr() -> None:
    raw = command_config([sys.executable, "-c", FAILING, "${PORT}"])
    cfg = config_from_mapping(raw, env={})
    backend = make_backend(cfg.backends["cmd"], cfg)
    with pytest.raises(BackendUnavailable, match=r"(?s)exited with code 3 before it was healthy.*unable to load"):
        await backend.load(cfg.models["m"])
    await backend.close()


async def test_a_missing_program_fails_the_load_clearly() -> None:
    cfg = config_from_mapping(command_config(["/no/such/llama-server", "--port", "${PORT}"]), env={})
    backend = make_backend(cfg.backends["cmd"], cfg)
    with pytest.raises(BackendUnavailable, match="cannot run '/no/such/llama-server': No such file"):
        await backend.load(cfg.models["m"])
    await backend.close()


async def test_not_healthy_within_start_timeout_kills_it() -> None:
    raw = command_config([sys.executable, "-c", "import time; time.sleep(60)", "${PORT}"],
                         backend_settings={"start_timeout": "0.5s"})
    cfg = config_from_mapping(raw, env={})
    server = CommandServer(cfg.models["m"], cfg.backends["cmd"], None, logging.getLogger("t"))
    with pytest.raises(BackendUnavailable, match=r"did not answer 200 within 0\.5 s"):
        await server.start()
    assert server.pid is not None and group_members(server.pid) == []
