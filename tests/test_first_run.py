"""A first run with no surprises: what a new user following the README meets. The CLI as a child process
(`python -m warmpool ...`), warmpool in front of the Ollama emulator.

- min_residency longer than max_wait on a one-model pool no longer stalls the other models (it holds a
  model only while that saves work), so nothing warns about it; a surprising config still gets a warning
  from check-config and at start-up; loading feedback says why a request waits;
- start-up: a port in use is one line and exit code 2; "listening" when listening, then "ready";
- the CLI: check-config --config, one-line errors, evict says why nothing was dropped, --help texts,
  --url without a scheme;
- `make test` says which Debian packages it installs before it does.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import REPO, WarmpoolProcess, eventually, running_warmpool
from tests.ollama_emulator import EmulatedModel, OllamaEmulator
from warmpool.config import config_from_mapping, config_warnings, load_config

pytestmark = pytest.mark.timeout(120)
SLOW_CUT = "scheduler.interactive_max_wait (60 s) is longer than scheduler.max_wait (30 s)"


@pytest.fixture
async def emu() -> AsyncIterator[OllamaEmulator]:
    # An answer streams 12 tokens, 0.3 s each: long enough to be waited for.
    emulator = OllamaEmulator([EmulatedModel("llama3.2:3b", size=200_000_000),
                               EmulatedModel("qwen2.5-coder:7b", size=200_000_000)], load_seconds_per_gb=0.5,
                              token_delay=0.3)
    await emulator.start()
    yield emulator
    await emulator.stop()


def readme_config(url: str = "http://127.0.0.1:11434") -> dict[str, Any]:
    """The README's minimal Ollama config, as a new user copies it."""
    text = (REPO / "README.md").read_text()
    block = text.split("A minimal config in front of Ollama:", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    raw: dict[str, Any] = yaml.safe_load(block)
    raw["backends"]["gpu"]["url"] = url
    return raw


def stalling(url: str) -> dict[str, Any]:
    raw = readme_config(url)
    raw["models"]["coder"]["min_residency"] = "60s"  # what the README's example used to say
    return raw


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "warmpool", *args, cwd=REPO, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


# -- warnings, and what a request waits for -----------------------------------------------------------

def test_the_readme_example_and_config_example_warn_about_nothing() -> None:
    assert config_warnings(config_from_mapping(readme_config(), env={})) == []
    assert config_warnings(load_config(REPO / "config.example.yaml", env={})) == []


def test_min_residency_past_max_wait_is_no_stall_any_more() -> None:
    # It held the pool for every other model up to max_wait; now it holds a model only while that
    # saves work (scheduling/policy.py: holds), so a one-model pool with it gets no warning.
    assert config_warnings(config_from_mapping(stalling("http://127.0.0.1:1"), env={})) == []
    everyone = readme_config("http://127.0.0.1:1")
    everyone["scheduler"] = {"min_residency": "45s"}
    assert config_warnings(config_from_mapping(everyone, env={})) == []


def slow_cut(url: str) -> dict[str, Any]:
    raw = readme_config(url)
    raw["scheduler"] = {"interactive_max_wait": "60s"}
    return raw


def test_an_interactive_max_wait_past_max_wait_is_warned_about() -> None:
    (warning,) = config_warnings(config_from_mapping(slow_cut("http://127.0.0.1:1"), env={}))
    assert warning.startswith(SLOW_CUT)
    patient = slow_cut("http://127.0.0.1:1")
    patient["scheduler"]["max_wait"] = "2m"
    assert config_warnings(config_from_mapping(patient, env={})) == []


async def test_check_config_and_start_up_warn(tmp_path: Path, warmpool_process: Any) -> None:
    path = tmp_path / "slow-cut.yaml"
    path.write_text(yaml.safe_dump(slow_cut("http://127.0.0.1:9")))
    code, out, err = await cli("check-config", "--config", str(path))  # the form config.example.yaml shows
    assert code == 0 and "valid" in out
    assert err.strip() == f"warmpool: warning: {SLOW_CUT}: interactive requests then get no earlier cut " \
                          "of a batch model's residency than any request; keep it below max_wait"
    proc = warmpool_process({**slow_cut("http://127.0.0.1:9"), "preload": []})
    assert any(SLOW_CUT in line and "WARNING" in line for line in proc.log)


async def test_check_config_takes_the_example_config_as_its_comment_says() -> None:
    example = (REPO / "config.example.yaml").read_text()
    assert "warmpool check-config --config config.example.yaml" in example
    code, out, err = await cli("check-config", "--config", "config.example.yaml")
    assert (code, err) == (0, "") and out.startswith("# ") and "valid" in out


async def test_loading_feedback_says_why_a_request_waits(emu: OllamaEmulator) -> None:
    raw = stalling(emu.url)  # min_residency 60s on coder: no reason to wait any more, so none is given
    async with running_warmpool(raw) as url, aiohttp.ClientSession() as http:
        await wait_for_resident(http, url, "coder")
        streaming = asyncio.create_task(http.post(url + "/api/generate", json={
            "model": "coder", "prompt": "long", "stream": False}))
        for _ in range(200):  # until coder streams
            async with http.get(url + "/warmpool/status") as r:
                if (await r.json())["pools"][0]["models"]["coder"]["inflight"]:
                    break
            await asyncio.sleep(0.02)
        body = {"model": "planner", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        headers = {"X-Warmpool-Loading-Feedback": "1"}
        async with http.post(url + "/api/chat", json=body, headers=headers) as r:
            first = json.loads(await r.content.readline())
            status = first["warmpool"]["status"]
            assert status == "waiting for coder's 1 running request to finish", status
            await r.read()
        (await streaming).release()
        async with http.post(url + "/v1/chat/completions", json={**body, "model": "coder"}, headers=headers) as r:
            assert r.status == 200
            await r.read()
        async with http.post(url + "/api/chat", json=body, headers=headers) as r:
            lines = [json.loads(line) for line in (await r.read()).splitlines()]
        statuses = [line["warmpool"]["status"] for line in lines if "warmpool" in line]
        assert lines[-1]["done"] and all(s.startswith("loading planner") for s in statuses), statuses


async def wait_for_resident(http: aiohttp.ClientSession, url: str, model: str) -> None:
    for _ in range(200):
        async with http.get(url + "/warmpool/status") as r:
            if model in (await r.json())["pools"][0]["resident"]:
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{model} never became resident")


# -- start-up ----------------------------------------------------------------------------------------------

def test_a_port_in_use_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(readme_config("http://127.0.0.1:9")))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "warmpool", "serve", "--config", str(path), "--listen",
                               f"127.0.0.1:{port}"], cwd=REPO, capture_output=True, text=True, timeout=60,
                              env={k: v for k, v in os.environ.items() if not k.startswith("WARMPOOL_")})
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"warmpool: cannot listen on 127.0.0.1:{port}: address already in use (set `listen` or --listen)"
    assert "Traceback" not in done.stderr


async def test_listening_then_ready_once_preloaded(emu: OllamaEmulator, warmpool_process: Any) -> None:
    proc: WarmpoolProcess = warmpool_process(readme_config(emu.url))
    await eventually(lambda: any("warmpool ready" in line for line in proc.log), timeout=30)
    listening = next(i for i, line in enumerate(proc.log) if "listening on http://" in line)
    ready = next(i for i, line in enumerate(proc.log) if "warmpool ready" in line)
    preloaded = next(i for i, line in enumerate(proc.log) if "preloaded coder" in line)
    assert listening < ready and preloaded <= ready
    assert "warmpool ready: preloaded coder" in proc.log[ready]


# -- the CLI ---------------------------------------------------------------------------------------------

async def test_cli_errors_are_one_clear_line_and_url_needs_no_scheme(emu: OllamaEmulator) -> None:
    async with running_warmpool({**readme_config(emu.url), "preload": []}) as url:
        bare = url.removeprefix("http://")
        code, out, err = await cli("warm", "nosuch", "--url", bare)
        assert (code, out, err) == (1, "", "warmpool: model 'nosuch' not found\n")
        code, out, _ = await cli("status", "--url", bare)
        assert code == 0 and "pool gpu" in out


async def test_evict_says_why_nothing_was_dropped(emu: OllamaEmulator, tmp_path: Path) -> None:
    (tmp_path / "planner.gguf").write_bytes(os.urandom(1 << 20))  # just written: in the page cache
    raw = {**readme_config(emu.url), "preload": [], "phases": {}, "ram_tier": {"models_dirs": [str(tmp_path)]}}
    async with running_warmpool(raw) as url:
        code, out, _ = await cli("evict", "planner", "--url", url)
        assert code == 0
        assert out.strip() == ("planner: dropped 0 B, 100.0% in RAM (kept: warmpool did not warm planner.gguf "
                               "(it only drops what it read in itself))")
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/api/generate", json={"model": "planner", "prompt": "x"}) as r:
                assert r.status == 200
            await r.release()
        code, out, _ = await cli("evict", "planner", "--url", url, "--json")
        assert "loaded in its backend (planner): a running server maps planner.gguf" in json.loads(out)["kept"]


SUBCOMMANDS = [["serve"], ["check-config"], ["bench"], ["bench", "pressure"], ["status"], ["models"], ["load"],
               ["unload"], ["warm"], ["evict"]]


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=[" ".join(w) for w in SUBCOMMANDS])
def test_every_subcommand_s_help_describes_it(words: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "warmpool", *words, "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0
    usage, _, rest = done.stdout.partition("\n\n")
    description = rest.split("\n\n", 1)[0]
    assert usage.startswith("usage: ") and not description.startswith(("positional", "options")), done.stdout
    assert len(description.split()) >= 6, description


def test_the_readme_lists_every_subcommand() -> None:
    from warmpool.cli.main import build_parser

    text = (REPO / "README.md").read_text()
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert commands is not None
    for name in commands:
        assert f"`warmpool {name}" in text, name


# -- make test's system packages ------------------------------------------------------------------------

def makefile_system_tools() -> list[str]:
    """The Makefile's SYSTEM_TOOLS, the Debian packages `make test` installs when they are missing."""
    line = next(line for line in (REPO / "Makefile").read_text().splitlines() if line.startswith("SYSTEM_TOOLS"))
    tools = line.partition(":=")[2].split()
    assert {"chromium", "prometheus", "openssl"} <= set(tools), tools
    return tools


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_says_which_debian_packages_it_installs_before_it_does(tmp_path: Path) -> None:
    """With none of the tools on PATH, and apt-get and id replaced by scripts that log their calls (so
    nothing is installed for real), the packages are named before apt-get runs."""
    log = tmp_path / "calls.log"
    for name, body in (("apt-get", f'echo "apt-get $*" >> {log}\n'), ("id", "echo 0\n")):
        script = tmp_path / name
        script.write_text(f"#!/bin/sh\n{body}")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    make = shutil.which("make")
    assert make is not None
    done = subprocess.run([make, "--no-print-directory", "-s", "system-deps", "SHELL=/bin/sh"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env={"PATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    said = done.stdout.splitlines()
    packages = " ".join(makefile_system_tools())
    assert said[0].startswith(f"system-deps: installing Debian packages: {packages}")
    assert log.read_text().splitlines() == ["apt-get update", f"apt-get install -y {packages}"]
    skipped = subprocess.run([make, "-s", "system-deps", "SHELL=/bin/sh", "SYSTEM_DEPS=no"], cwd=REPO,
                             capture_output=True, text=True, timeout=60, env={"PATH": str(tmp_path)})
    assert skipped.stdout == "" and len(log.read_text().splitlines()) == 2


async def test_status_shows_the_phase_map_and_backend_health(emu: OllamaEmulator) -> None:
    raw = {**readme_config(emu.url), "preload": [], "default_phase": "context"}
    raw["backends"]["far"] = {"kind": "openai", "url": "http://127.0.0.1:9"}
    raw["models"]["remote"] = {"backend": "far"}
    async with running_warmpool(raw) as url:
        code, out, _ = await cli("status", "--url", url)
        assert code == 0
        assert re.search(r"^gpu\s+ollama\s+http://127\.0\.0\.1:\d+\s+up$", out, re.M), out
        assert re.search(r"^far\s+openai\s+http://127\.0\.0\.1:9\s+DOWN$", out, re.M), out
        assert re.search(r"^context\s+planner\s+default$", out, re.M) and re.search(r"^execution\s+coder$", out, re.M)
        code, out, _ = await cli("status", "--url", url, "--json")
    data = json.loads(out)
    assert data["phases"] == {"context": "planner", "execution": "coder", "verification": "planner"}
    assert data["default_phase"] == "context"
    assert {b["name"]: b["healthy"] for b in data["backends"]} == {"gpu": True, "far": False}
