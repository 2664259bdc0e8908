"""The first request after a phase switch: how long it waits for its first token (the swap included) and
how long it then generates, on the embedded default (managed llama.cpp, the demo model under two names,
max_resident 1).

Each trial asks the `context` phase, waits `--think` seconds (an agent's own work between two calls),
then asks the `execution` phase, which swaps, and times that second, streamed request at the client:
time to first token, and first token to the end of the stream; then waits SETTLE seconds. With
`--compare PATH`, warmpool from that checkout is measured too, the two taking turns trial by trial (the
machine is shared), and the table shows both with their ratio.

    .venv/bin/python benchmarks/first_after_swap.py [--trials N] [--think S] [--compare /path/to/other/checkout]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import aiohttp
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from warmpool.config.defaults import embedded_default

PROMPT = "Write a short story about a robot who learns to paint."
READY_TIMEOUT = 120.0
SETTLE = 4.0  # seconds after each trial: one warmpool's background work must not overlap the other's trial


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def warmpool(source: Path, workdir: Path) -> Iterator[str]:
    """`python -m warmpool serve` from `source` on the embedded default's config, on a free port."""
    port = free_port()
    path = workdir / f"warmpool-{port}.yaml"
    path.write_text(yaml.safe_dump({**embedded_default(), "listen": f"127.0.0.1:{port}"}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARMPOOL_")}
    env["PYTHONPATH"] = str(source)
    argv = [sys.executable, "-m", "warmpool", "serve", "--config", str(path)]
    proc = subprocess.Popen(argv, cwd=source, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # warmpool stops its llama.cpp children on SIGTERM
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def wait_ready(session: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        try:
            async with session.get(url + "/readyz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} not ready within {READY_TIMEOUT:g} s")


async def stream(session: aiohttp.ClientSession, url: str, phase: str,
                 max_tokens: int) -> tuple[float, float]:
    """(seconds to the first content chunk, seconds from it to the end of the stream)."""
    body = {"model": "any", "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": PROMPT}]}
    started, first = time.perf_counter(), None
    headers = {"X-Warmpool-Phase": phase}
    async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url} answered {resp.status}: {await resp.text()}")
        async for line in resp.content:
            if first is None and line.startswith(b"data: {") and content_of(line):
                first = time.perf_counter()
    if first is None:
        raise RuntimeError(f"{url}: a stream without content")
    return first - started, time.perf_counter() - first


def content_of(event: bytes) -> str:
    choices = json.loads(event[len(b"data: "):])["choices"]
    return (choices[0]["delta"].get("content") or "") if choices else ""


async def trial(session: aiohttp.ClientSession, url: str, think: float,
                max_tokens: int) -> tuple[float, float]:
    await stream(session, url, "context", max_tokens)
    await asyncio.sleep(think)
    return await stream(session, url, "execution", max_tokens)


Samples = dict[str, list[tuple[float, float]]]  # per warmpool: (time to first token, then to the end)


async def measure(urls: dict[str, str], trials: int, think: float, max_tokens: int) -> Samples:
    results: Samples = {name: [] for name in urls}
    async with aiohttp.ClientSession() as session:
        for url in urls.values():
            await wait_ready(session, url)
            await trial(session, url, think, max_tokens)  # warm-up: both models' files in the page cache
            await asyncio.sleep(SETTLE)
        for index in range(trials):
            names = list(urls) if index % 2 == 0 else list(reversed(urls))
            for name in names:
                results[name].append(await trial(session, urls[name], think, max_tokens))
                await asyncio.sleep(SETTLE)
            print(f"  trial {index + 1}/{trials}", file=sys.stderr, flush=True)
    return results


def report(results: Samples) -> str:
    names = list(results)
    lines = [f"{'median over trials':<34}" + "".join(f"{n:>16}" for n in names)
             + (f"{'ratio':>10}" if len(names) == 2 else "")]
    for label, index in (("time to first token, swap incl. (s)", 0), ("first token to end (s)", 1)):
        medians = [statistics.median(r[index] for r in results[n]) for n in names]
        ratio = f"{medians[0] / medians[1]:>9.2f}x" if len(names) == 2 else ""
        lines.append(f"{label:<34}" + "".join(f"{m:>16.3f}" for m in medians) + ratio)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--think", type=float, default=3.0,
                        help="seconds between the two requests of a trial")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--compare", type=Path, help="also measure warmpool from this checkout")
    args = parser.parse_args(argv)
    sources = {"this checkout": REPO}
    if args.compare:
        sources["compared"] = args.compare.resolve()
    with tempfile.TemporaryDirectory(prefix="warmpool-bench-") as workdir, ExitStack() as stack:
        urls = {name: stack.enter_context(warmpool(source, Path(workdir)))
                for name, source in sources.items()}
        results = asyncio.run(measure(urls, args.trials, args.think, args.max_tokens))
    print(f"\nfirst request after a swap, {args.trials} trials, think time {args.think:g} s, "
          f"{args.max_tokens} tokens, {os.cpu_count()} CPUs\n")
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
