"""The memory-pressure experiment: what a managed llama.cpp load costs when part of its weights has
left the page cache.

Owns `run_pressure` (for each fraction: put the model's GGUF fully in the page cache, drop that fraction
of it from the front, then load it in a real slot worker, as a swap does, and measure), `render` (the
table `warmpool bench pressure` prints) and `select_model` (a configured managed llama.cpp model, or one
clear reason why not).

Per row it measures:

- the share of the file resident just before the start (cachestat/mincore, after the drop): the drop
  only removes pages no process has mapped, so a GGUF that another server maps stays partly or wholly
  resident, and the table shows what was really there rather than what was asked for;
- the load (the worker's `Llama` construction), and a one-token request after it: with mmap the load
  returns before the weights are read, so "load until first token" is their sum;
- tokens per second of a short generation through `/v1/completions` (wall clock, completion tokens
  as the server counts them: a model that stops at end-of-text produces fewer);
- the worker process's major page faults (`/proc/<pid>/stat` field 12) and the bytes it caused to be
  read from storage (`/proc/<pid>/io` read_bytes; None where the kernel will not show it), at the first
  token and over the generation. The counters the worker ran up importing llama-cpp-python (before it was
  given the model) are subtracted.

Expect major faults near zero even from a cold cache, with read bytes equal to the evicted part: the
llama.cpp in llama-cpp-python 0.3.36 `madvise(MADV_WILLNEED)`s the whole mapping while loading
(`llama_prefetch`), so the kernel reads the file ahead and the later faults find their pages already in
the cache or in flight, which counts as minor. The cold read is therefore paid inside the load, not at
the first token; read bytes, not faults, show how much came from disk.

This is the honest version of seed 003's experiment: rather than pinning dummy memory until the kernel
evicts the model (which needs swap and risks the OOM killer on a shared machine), it evicts exactly the
chosen part with `posix_fadvise(DONTNEED)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from warmpool.backends.llamacpp_slot import Slot
from warmpool.config import BackendConfig, Config, ModelConfig
from warmpool.ramtier import pagecache

__all__ = [
    "Counters", "PressureRow", "PressureSetupError", "evict_fraction", "parse_fractions", "read_counters",
    "ready_slot", "render", "run_pressure", "select_model",
]

PROMPT = "Once upon a time, in a small village by the sea,"
MIB = 1 << 20
# Resident share still seen after a full drop above which the table warns that someone maps the file.
MAPPED_ELSEWHERE = 0.05


class PressureSetupError(ValueError):
    """The named model cannot be used for the experiment; the message says why, in one line."""


@dataclass(frozen=True, slots=True)
class Counters:
    """A process's cumulative I/O counters; None where the kernel would not tell."""

    majflt: int | None
    read_bytes: int | None

    def __sub__(self, other: Counters) -> Counters:
        return Counters(_minus(self.majflt, other.majflt), _minus(self.read_bytes, other.read_bytes))


ZERO = Counters(0, 0)


def _minus(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a - b


@dataclass(frozen=True, slots=True)
class PressureRow:
    evicted: float  # fraction of the file asked to be dropped, from its start
    resident_at_start: float  # fraction measured in the page cache just before the load
    file_bytes: int
    load: float  # seconds, the load command to a ready slot worker (as a swap sends it) → loaded
    first_token: float  # seconds, a one-token request after the load
    tokens: int  # completion tokens of the generation
    generate_seconds: float
    at_first_token: Counters  # since the load command
    during_generation: Counters

    @property
    def load_to_first_token(self) -> float:
        return self.load + self.first_token

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.generate_seconds if self.generate_seconds > 0 else 0.0


# -- choosing the model ------------------------------------------------------------------------------

def select_model(config: Config, name: str) -> tuple[ModelConfig, BackendConfig]:
    """The model and its backend, if it is a managed llama.cpp model with a GGUF file."""
    model = config.models.get(name)
    if model is None:
        known = ", ".join(sorted(config.models)) or "none"
        raise PressureSetupError(f"unknown model {name!r} in {config.source} (configured: {known})")
    backend = config.backends[model.backend]
    if backend.kind != "llamacpp":
        raise PressureSetupError(
            f"model {name!r} is on backend {backend.name!r} of kind {backend.kind}: the pressure experiment "
            "needs a managed llamacpp backend (warmpool must start the server to measure its load)")
    if not model.gguf or not Path(model.gguf).is_file():
        raise PressureSetupError(f"model {name!r}: gguf file not found: {model.gguf}")
    return model, backend


def parse_fractions(text: str) -> tuple[float, ...]:
    """"0,0.5,1" or "0,50%,100%" → (0.0, 0.5, 1.0); raises ValueError (argparse reports it as a usage
    error when this is a flag's `type`)."""
    values = tuple(_fraction(part.strip()) for part in text.split(",") if part.strip())
    if not values:
        raise ValueError("expected fractions such as 0,0.5,1")
    return values


def _fraction(text: str) -> float:
    value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"fraction {text!r} is not between 0 and 1 (or 0% and 100%)")
    return value


# -- the page cache ----------------------------------------------------------------------------------

def evict_fraction(path: str, fraction: float) -> pagecache.Residency:
    """Make the first `fraction` of the file cold and the rest warm; returns the residency that results.

    Warm first, whatever the fraction: the starting state must not depend on the previous run."""
    pagecache.warm_read(path)
    size = Path(path).stat().st_size
    length = _page_ceil(int(size * fraction))
    if length:
        pagecache.drop(path, 0, 0 if length >= size else length)
    return pagecache.residency(path)


def _page_ceil(n: int) -> int:
    return -(-n // pagecache.PAGE_SIZE) * pagecache.PAGE_SIZE


# -- process counters --------------------------------------------------------------------------------

def read_counters(pid: int) -> Counters:
    """Major faults and storage read bytes of the whole process (all its threads), from /proc."""
    return Counters(_majflt(pid), _read_bytes(pid))


def _majflt(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count fields after the last ')'.
    # Fields 3.. follow it, so majflt (field 12) is the 10th of them.
    return int(text.rsplit(")", 1)[1].split()[9])


def _read_bytes(pid: int) -> int | None:
    # /proc/<pid>/io needs ptrace rights over the process (ours, or root); some kernels lack it.
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


# -- one measured start ------------------------------------------------------------------------------

async def run_pressure(model: ModelConfig, backend: BackendConfig, *,
                       fractions: Sequence[float] = (0.0, 0.5, 1.0), tokens: int = 32) -> list[PressureRow]:
    """One row per fraction of the model's GGUF evicted before a real load in a slot worker."""
    if model.gguf is None:
        raise PressureSetupError(f"model {model.name!r} has no gguf path")
    return [await _measure(model, backend, fraction, tokens) for fraction in fractions]


async def _measure(model: ModelConfig, backend: BackendConfig, fraction: float, tokens: int) -> PressureRow:
    async with ready_slot(backend) as slot:
        # Evict after the worker finished importing: its imports must not refill anything we dropped,
        # and what the load finds is exactly what was measured.
        resident = await asyncio.to_thread(evict_fraction, str(model.gguf), fraction)
        assert slot.pid is not None
        baseline = read_counters(slot.pid)
        started = time.monotonic()
        await slot.load(model, None, started + backend.start_timeout)
        load = time.monotonic() - started
        timeout = aiohttp.ClientTimeout(total=backend.start_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            _, first_token = await _complete(session, slot.url, model, " ", 1)
            loaded = read_counters(slot.pid)
            count, seconds = await _complete(session, slot.url, model, PROMPT, tokens)
            generated = read_counters(slot.pid)
    return PressureRow(
        evicted=fraction, resident_at_start=resident.fraction, file_bytes=resident.bytes_total, load=load,
        first_token=first_token, tokens=count, generate_seconds=seconds,
        at_first_token=loaded - baseline, during_generation=generated - loaded,
    )


@contextlib.asynccontextmanager
async def ready_slot(backend: BackendConfig) -> AsyncIterator[Slot]:
    """A slot worker that has finished its imports, as warmpool's swaps find it; stopped on the way out."""
    slot = Slot(0, backend, on_context=lambda slot, event: None, on_exit=lambda slot, reason: None)
    await slot.spawn()
    try:
        await slot.wait_ready(time.monotonic() + backend.start_timeout)
        yield slot
    finally:
        await slot.stop()


async def _complete(session: aiohttp.ClientSession, url: str, model: ModelConfig, prompt: str,
                    tokens: int) -> tuple[int, float]:
    """(completion tokens, seconds) of one non-streamed completion of up to `tokens` tokens."""
    body: dict[str, Any] = {"model": model.upstream_name, "prompt": prompt, "max_tokens": tokens,
                            "temperature": 0.0}
    started = time.monotonic()
    async with session.post(url + "/v1/completions", json=body) as response:
        answer = await response.json()
        response.raise_for_status()
    return int(answer["usage"]["completion_tokens"]), time.monotonic() - started


# -- the table ---------------------------------------------------------------------------------------

HEADER = (f"{'evicted':>7} {'resident':>8} {'load':>11} {'1st token':>9} {'load→token':>10} "
          f"{'tok/s':>6} {'majflt load':>11} {'majflt gen':>10} {'read MiB load':>13} {'read MiB gen':>12}")


def render(rows: Sequence[PressureRow]) -> str:
    """The experiment as a fixed-width table, with a note on each caveat the numbers show."""
    if not rows:
        return "no measurements"
    first = rows[0]
    lines = [f"GGUF {first.file_bytes / MIB:.0f} MiB, loaded in a slot worker (as warmpool swaps); "
             "resident = share in the page cache at start",
             HEADER, *map(_row_line, rows)]
    return "\n".join(lines + _notes(rows))


def _row_line(row: PressureRow) -> str:
    load, gen = row.at_first_token, row.during_generation
    return (f"{row.evicted:>7.0%} {row.resident_at_start:>8.1%} {row.load:>10.3f}s "
            f"{row.first_token:>8.3f}s {row.load_to_first_token:>9.3f}s {row.tokens_per_s:>6.1f} "
            f"{_count(load.majflt):>11} {_count(gen.majflt):>10} {_mib(load.read_bytes):>13} "
            f"{_mib(gen.read_bytes):>12}")


def _count(value: int | None) -> str:
    return "n/a" if value is None else str(value)


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.1f}"


def _notes(rows: Sequence[PressureRow]) -> list[str]:
    notes = []
    if any(row.evicted - (1 - row.resident_at_start) > MAPPED_ELSEWHERE for row in rows):
        notes.append("note: less was evicted than asked: another process maps this GGUF (a running server?), "
                     "and mapped pages cannot be dropped; the resident column is what the load really found")
    if any(row.at_first_token.read_bytes is None for row in rows):
        notes.append("note: /proc/<pid>/io is not readable here, so read bytes are n/a")
    short = [row for row in rows if row.tokens < max(r.tokens for r in rows)]
    if short:
        notes.append("note: some generations stopped early at end-of-text; tok/s uses the tokens produced")
    return notes
