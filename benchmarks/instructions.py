"""What warmpool's data path costs in CPU instructions: a count that a busy machine does not move.

benchmarks/overhead.py measures time, and on this shared two-core machine a 10 µs difference per request
drowns in other people's work between rounds. This counts the instructions warmpool's process executes
(valgrind's callgrind, user space: Python, uvloop, llhttp, the kernel's side not included) while it
serves a fixed batch of requests, and divides by the batch: the same work gives the same count within
about 1% run after run, so a change's cost shows even where timings cannot.

The setup is overhead.py's: its fake upstream (answers at once; streams 20 SSE chunks) and warmpool from
one or two checkouts with overhead.py's config, the `openai` route (forward only) and the `ollama` route
(the scheduler's lease on every request). warmpool runs under valgrind with instrumentation off while it
starts and warms up (200 requests), on for the batch only; what its own timers execute meanwhile (counted
over 3 idle seconds) is taken off. Rows: small non-streamed chat completions at
concurrency 16 (per request) and streamed ones one at a time (per chunk: the stream's instructions,
less a non-streamed request's, over its chunks).

    .venv/bin/python benchmarks/instructions.py [--baseline DIR] [--requests N] [--streams N] [--keep DIR]

Needs valgrind (`apt-get install valgrind`). Under valgrind warmpool runs 30-80x slower; a run takes
a minute or two.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # the sibling benchmark: its fake upstream, config and load generator

REPO = Path(__file__).resolve().parents[1]
WARMUP = 200
TOTALS = re.compile(rb"^totals:\s*(\d+)", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Counted:
    """Instructions per non-streamed request at c=16 and per streamed chunk, for one route of one checkout."""

    per_request: float
    per_chunk: float


class Instrumented:
    """warmpool from `source` under callgrind, instrumentation switched on for one batch at a time."""

    def __init__(self, started: list[overhead.Child], upstream: str, workdir: Path, source: Path,
                 keep: Path | None = None) -> None:
        self.keep, self.kept = keep, 0
        port = overhead.free_port()
        config = workdir / "warmpool.yaml"
        config.write_text(yaml.safe_dump(overhead.warmpool_config(upstream, port)))
        self.out = workdir / "callgrind.out"
        env = {k: v for k, v in os.environ.items() if not k.startswith("WARMPOOL_")}
        env["PYTHONPATH"] = str(source)
        argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={self.out}.%p",
                sys.executable, "-m", "warmpool", "serve", "--config", str(config)]
        self.child = overhead.Child("warmpool", argv, env, cwd=source)
        self.child.url = f"http://127.0.0.1:{port}"
        started.append(self.child)
        self.child.drain()
        self.pid = self.child.proc.pid

    async def ready(self) -> None:
        deadline = time.monotonic() + 300  # starting under valgrind takes a while
        while True:
            try:
                await overhead.wait_resident(self.child.url, self.child)
                return
            except RuntimeError:
                if time.monotonic() > deadline or self.child.proc.poll() is not None:
                    raise

    def control(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(self.pid)], check=True, capture_output=True, timeout=120)

    async def count(self, work: Awaitable[object]) -> tuple[int, float]:
        """Instructions warmpool executed while `work` ran, and the seconds it ran."""
        for old in self.out.parent.glob(self.out.name + ".*"):
            old.unlink()
        await asyncio.to_thread(self.control, "--zero")
        await asyncio.to_thread(self.control, "--instr=on")
        started = time.monotonic()
        await work
        seconds = time.monotonic() - started
        await asyncio.to_thread(self.control, "--instr=off")
        await asyncio.to_thread(self.control, "--dump")
        total = 0
        for dump in self.out.parent.glob(self.out.name + ".*"):
            total += sum(int(found) for found in TOTALS.findall(dump.read_bytes())[:1])
            if self.keep is not None and dump.stat().st_size:
                self.kept += 1
                shutil.copy(dump, self.keep / f"{self.out.parent.name}-{self.kept}.callgrind")
        return total, seconds


async def streams(url: str, body: bytes, count: int) -> int:
    """`count` streams one after the other; the SSE data lines received."""
    lines = 0
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                async for line in resp.content:
                    lines += line.startswith(b"data: ")
    return lines


async def measure(proxy: Instrumented, model: str, requests: int, stream_count: int) -> Counted:
    url = proxy.child.url
    plain, streamed = overhead.request_body(model, False), overhead.request_body(model, True)
    await proxy.ready()
    await overhead.lean_requests(url, plain, WARMUP, 16)
    await streams(url + overhead.CHAT, streamed, 5)
    # warmpool's own timers (residency scans, the scheduler's) run while a batch does, more of them under
    # valgrind's slowdown: their rate, counted while nothing is asked, is taken off each batch.
    idle, idle_seconds = await proxy.count(asyncio.sleep(3))
    idle_rate = idle / idle_seconds
    total, seconds = await proxy.count(overhead.lean_requests(url, plain, requests, 16))
    per_request = (total - idle_rate * seconds) / requests
    chunks: list[int] = []

    async def run_streams() -> None:
        chunks.append(await streams(url + overhead.CHAT, streamed, stream_count))

    total, seconds = await proxy.count(run_streams())
    per_chunk = ((total - idle_rate * seconds) / stream_count - per_request) / (chunks[0] / stream_count)
    return Counted(per_request, per_chunk)


def run(args: argparse.Namespace) -> dict[str, Counted]:
    sources = [("now", REPO), *([("before", args.baseline.resolve())] if args.baseline else [])]
    results: dict[str, Counted] = {}
    settings = overhead.Settings()  # 20 chunks 5 ms apart: each arrives on its own
    with overhead.children() as started, tempfile.TemporaryDirectory(prefix="warmpool-instr-") as tmp:
        upstream = overhead.start_upstream(started, settings)
        for label, source in sources:
            for route in args.routes:
                place = Path(tmp) / f"{label}-{route}"
                place.mkdir()
                proxy = Instrumented(started, upstream, place, source, args.keep)
                print(f"  {label} {route}: warmpool from {source} under callgrind ...", file=sys.stderr, flush=True)
                results[f"{route} ({label})"] = overhead.event_loop_runner()(
                    measure(proxy, overhead.ROUTES[route], args.requests, args.streams))
                proxy.child.stop()
                started.remove(proxy.child)
    return results


def table(results: dict[str, Counted], requests: int, stream_count: int) -> str:
    lines = [f"instructions executed by warmpool (callgrind): {requests} non-streamed requests at c=16, "
             f"{stream_count} streams of {overhead.CHUNKS} chunks",
             f"{'route':<20} {'per request':>14} {'per chunk':>12}", "-" * 48]
    for name, counted in results.items():
        lines.append(f"{name:<20} {counted.per_request:>14,.0f} {counted.per_chunk:>12,.0f}")
    for route in ("openai", "ollama"):
        now, before = results.get(f"{route} (now)"), results.get(f"{route} (before)")
        if now and before:
            lines.append(f"{route}: now/before per request {now.per_request / before.per_request:.3f}x, "
                         f"per chunk {now.per_chunk / before.per_chunk:.3f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="also count warmpool from this checkout")
    parser.add_argument("--requests", type=int, default=1000, help="non-streamed requests counted (default 1000)")
    parser.add_argument("--streams", type=int, default=20, help="streams counted (default 20)")
    parser.add_argument("--keep", type=Path, help="copy callgrind's dumps here (1: idle, 2: the requests, "
                        "3: the streams), for callgrind_annotate")
    parser.add_argument("--routes", nargs="+", default=list(overhead.ROUTES), choices=sorted(overhead.ROUTES))
    args = parser.parse_args(argv)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("instructions.py needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    results = run(args)
    print(table(results, args.requests, args.streams))
    return 0


if __name__ == "__main__":
    sys.exit(main())
