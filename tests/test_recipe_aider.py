"""The README's Aider recipe, run as written with the real aider (PyPI's aider-chat, installed in a virtualenv of
its own by tests/install_aider.py; `make aider`), against warmpool in front of the Ollama emulator.

Both ways the recipe gives are run, parsed from the README's blocks under **Aider** so that a README change
that breaks the recipe fails here: the phase names as model names (the ```sh block), and the model names
with a phase header each from `.aider.model.settings.yml` (the ```yaml block, and the command its comment
gives). Only the URL changes, and flags that make aider non-interactive and keep it off the network.

Each way runs aider twice, one model each: a message (the main model answers it) and `--commit` in a git
repository with a staged change (the weak model writes the commit message). The emulator's records say which
upstream model served each request, and warmpool's metrics which phase chose it: in the settings-file way
the model names alone would choose no phase, so a phase there is the header having come through LiteLLM.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.install_aider import cached_executable, missing_reason
from tests.ollama_emulator import OllamaEmulator, fake_tokens, messages_text
from tests.test_recipes import DOCUMENTED_URL, client_recipes, recipes_stack

SETTINGS_FILE = ".aider.model.settings.yml"
# Answer and exit, ask nothing, and reach nothing but warmpool: no update check, analytics, URL scraping or
# release notes; no colours or prompt_toolkit input, so the output is plain text.
QUIET = ["--yes-always", "--no-check-update", "--no-analytics", "--no-show-model-warnings", "--no-pretty",
         "--no-fancy-input", "--no-detect-urls", "--no-show-release-notes"]
MESSAGE = "Say hello."
UPSTREAM = {"execution": ("coder", "qwen2.5-coder:7b"), "context": ("planner", "llama3.2:3b")}  # recipes_stack's


@dataclass(frozen=True)
class Way:
    """One way to run the recipe: aider's environment and command, and the settings file it reads, if any."""

    env: dict[str, str]
    command: list[str]
    settings: str | None


def ways() -> dict[str, Way]:
    part = client_recipes()["Aider"]
    sh = re.search(r"```sh\n(.*?)```", part, flags=re.S)
    yml = re.search(r"```yaml\n(.*?)```", part, flags=re.S)
    assert sh and yml, "the Aider recipe lost its ```sh or ```yaml block"
    lines = [shlex.split(line) for line in sh.group(1).splitlines() if line.strip()]
    exports = [words for words in lines if words[0] == "export"]
    commands = [words for words in lines if words[0] == "aider"]
    assert len(exports) == 1 and len(commands) == 1 and len(lines) == 2, f"unexpected Aider recipe: {sh.group(1)}"
    env = dict(word.split("=", 1) for word in exports[0][1:])
    assert DOCUMENTED_URL in env.get("OPENAI_API_BASE", ""), env
    # the settings file's comment names the command that uses it: `aider --model ... --weak-model ...`
    with_settings = re.search(r"`(aider [^`]+)`", yml.group(1))
    assert with_settings, f"the {SETTINGS_FILE} block no longer says which command reads it"
    return {"phase-names-as-models": Way(env, commands[0], None),
            "model-settings-headers": Way(env, shlex.split(with_settings.group(1)), yml.group(1))}


WAYS = ways()


@pytest.fixture(scope="module")
def aider() -> Path:
    executable = cached_executable()
    if executable is None:
        pytest.skip(f"no aider: {missing_reason()}")
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the weak model's turn is aider writing a commit message")
    return executable


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository with a staged change and no commit yet: aider's `--commit` has something to commit."""
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q")
    git(path, "config", "user.name", "test")
    git(path, "config", "user.email", "test@example.com")
    (path / "hello.py").write_text("print('hello')\n")
    git(path, "add", "hello.py")
    return path


async def run_aider(aider: Path, way: Way, url: str, home: Path, cwd: Path, *flags: str) -> str:
    """aider as the recipe runs it, with the documented URL replaced by warmpool's; what it printed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_", "AIDER_", "LITELLM_"))}
    env.update({k: v.replace(DOCUMENTED_URL, url) for k, v in way.env.items()})
    # a home of its own (aider reads ~/.aider.conf.yml and writes ~/.aider), and LiteLLM's bundled model list
    # rather than a download
    env.update({"HOME": str(home), "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    if way.settings is not None:
        (cwd / SETTINGS_FILE).write_text(way.settings)
    proc = await asyncio.create_subprocess_exec(
        str(aider), *way.command[1:], *QUIET, *flags, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    printed = out.decode(errors="replace")
    assert proc.returncode == 0, f"aider exited {proc.returncode}:\n{printed}"
    return printed


def says(printed: str, answer: str) -> bool:
    """`answer` is in what aider printed, which it wraps at the terminal's width."""
    return " ".join(answer.split()) in " ".join(printed.split())


def chats(emu: OllamaEmulator, since: int) -> list[tuple[str, str]]:
    """The chat requests the emulator served after its `since`-th event: (upstream model, its answer)."""
    served = []
    for event in emu.events[since:]:
        if event["event"] == "request" and event["path"] == "/v1/chat/completions":
            body = event["body"]
            tokens, _ = fake_tokens(event["model"], messages_text(body["messages"]), body.get("max_tokens"))
            served.append((event["model"], "".join(tokens)))
    return served


async def chosen(url: str) -> set[tuple[str, str]]:
    """(model, phase) of the requests warmpool answered, from its metrics; phase "" where none chose it."""
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
        text = await response.text()
    return {(s.labels["model"], s.labels["phase"]) for family in text_string_to_metric_families(text)
            if family.name == "warmpool_requests" for s in family.samples
            if s.name == "warmpool_requests_total" and s.value > 0}


@pytest.mark.parametrize("name", list(WAYS))
async def test_aider_recipe_runs_as_written(aider: Path, tmp_path: Path, repo: Path, name: str) -> None:
    way = WAYS[name]
    home, chat = tmp_path / "home", tmp_path / "chat"
    for directory in (home, chat):
        directory.mkdir()
    # aider downloads LiteLLM's model list from GitHub when its cache of it is missing or empty
    (home / ".aider" / "caches").mkdir(parents=True)
    (home / ".aider" / "caches" / "model_prices_and_context_window.json").write_text(json.dumps({"none": {}}))
    async with recipes_stack() as (url, emu):
        # the main model: a message, answered (no git: nothing to commit)
        before = len(emu.events)
        printed = await run_aider(aider, way, url, home, chat, "--message", MESSAGE, "--no-git")
        [(model, answer)] = chats(emu, before)
        assert model == UPSTREAM["execution"][1], f"{name}: the main model's turn went to {model}"
        assert says(printed, answer), f"{name}: aider did not print the answer {answer!r}:\n{printed}"

        # the weak model: the commit message for a staged change
        before = len(emu.events)
        printed = await run_aider(aider, way, url, home, repo, "--commit")
        [(model, answer)] = chats(emu, before)
        assert model == UPSTREAM["context"][1], f"{name}: the weak model's turn went to {model}"
        assert says(printed, answer), f"{name}: aider did not print the commit message {answer!r}:\n{printed}"
        assert (await asyncio.to_thread(git, repo, "log", "--format=%s")).strip() == answer

        # each turn was chosen by its phase: the model name in one way, the header in the other
        assert await chosen(url) == {(model, phase) for phase, (model, _) in UPSTREAM.items()}
