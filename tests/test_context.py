"""Context that survives a swap: the store of saved KV states (files, longest prefix, LRU within a byte
budget, spill, concurrent writers), and, with real workers and the demo model under warmpool, that an
answer after a restore is exactly the answer with the context recomputed."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import llama_models, running_warmpool
from tests.test_grafana import readme_metric_names
from warmpool.backends._llamacpp_context import ContextStore, Tier, fingerprint
from warmpool.backends.llamacpp_slot import Slot
from warmpool.config import BackendConfig, LlamaCppModel, ModelConfig

REPO = Path(__file__).resolve().parents[1]
FP = "f" * 20


def store(tmp_path: Path, ram: int, spill: int | None = None) -> ContextStore:
    tiers = [Tier(str(tmp_path / "ram"), ram)]
    if spill is not None:
        tiers.append(Tier(str(tmp_path / "spill"), spill))
    return ContextStore(tiers)


def kept_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*") if p.name != ".lock" and p.is_file())


def state(size: int) -> bytes:
    return os.urandom(size)


# ---------------------------------------------------------------- the store


def test_the_longest_shared_prefix_wins_and_the_newest_among_equals(tmp_path: Path) -> None:
    s = store(tmp_path, 10**6)
    assert s.put(FP, [1, 2, 3, 4], state(100)).saved
    assert s.put(FP, [1, 2, 9, 9, 9], state(100)).saved
    assert s.put("other", [1, 2, 3, 4, 5], state(100)).saved  # another model's: never matched
    found = s.best(FP, [1, 2, 3, 4, 7])
    assert found is not None and found[0].tokens == (1, 2, 3, 4) and found[1] == 4
    assert s.best(FP, [5, 5]) is None
    time.sleep(0.01)
    assert s.put(FP, [1, 2, 8], state(100)).saved
    found = s.best(FP, [1, 2, 0])
    assert found is not None and found[0].tokens == (1, 2, 8)  # shares 2, like the others: the newest


def test_a_longer_conversation_replaces_the_states_it_extends(tmp_path: Path) -> None:
    s = store(tmp_path, 10**6)
    assert s.put(FP, [1, 2, 3], state(100)).saved
    assert s.put(FP, [1, 2, 3, 4, 5], state(100)).saved
    assert [e.tokens for e in s.entries(FP)] == [(1, 2, 3, 4, 5)]
    result = s.put(FP, [1, 2, 3], state(100))  # what is kept already holds it
    assert not result.saved and result.reason == "already kept"
    assert len(s.entries(FP)) == 1


def test_the_least_recently_used_state_goes_first_and_the_budget_holds(tmp_path: Path) -> None:
    s = store(tmp_path, 2600)
    for first in (1, 2):
        assert s.put(FP, [first, 0], state(1000)).saved
        time.sleep(0.01)
    oldest = next(e for e in s.entries(FP) if e.tokens[0] == 1)
    assert s.read(oldest) is not None  # a restore is a use: now 2 is the least recently used
    time.sleep(0.01)
    result = s.put(FP, [3, 0], state(1000))
    assert result.saved and result.evicted == 1 and result.spilled == 0
    assert sorted(e.tokens[0] for e in s.entries(FP)) == [1, 3]
    assert kept_bytes(tmp_path / "ram") <= 2600
    assert not s.put(FP, [4], state(3000)).saved  # larger than the whole budget: not kept, nothing evicted
    assert len(s.entries(FP)) == 2


def test_evicted_states_spill_to_disk_within_their_own_budget(tmp_path: Path) -> None:
    s = store(tmp_path, ram=2100, spill=2100)
    for first in (1, 2, 3, 4):
        assert s.put(FP, [first], state(1000)).saved
        time.sleep(0.01)
    ram = {e.tokens[0] for e in s.entries_in(s.tiers[0])}
    spilled = {e.tokens[0] for e in s.entries_in(s.tiers[1])}
    assert (ram, spilled) == ({3, 4}, {1, 2})
    found = s.best(FP, [1, 5])
    assert found is not None and found[0].path.startswith(str(tmp_path / "spill"))
    assert s.read(found[0]) is not None
    assert s.put(FP, [5], state(1000)).spilled == 1
    assert {e.tokens[0] for e in s.entries_in(s.tiers[1])} == {1, 3}  # 2 was the spill tier's oldest
    assert kept_bytes(tmp_path / "spill") <= 2100 and kept_bytes(tmp_path / "ram") <= 2100


WRITER = """
import os, random, sys
from warmpool.backends._llamacpp_context import ContextStore, Tier
store = ContextStore([Tier(sys.argv[1], int(sys.argv[2]))])
rng = random.Random(int(sys.argv[3]))
for i in range(40):
    store.put("f" * 20, [int(sys.argv[3]), i], os.urandom(rng.randrange(1000, 40000)))
"""


def test_concurrent_writers_never_exceed_the_budget(tmp_path: Path) -> None:
    """Four processes save states of random sizes into one directory while a thread watches its size."""
    budget, ram = 100_000, tmp_path / "ram"
    ram.mkdir()
    peak, done = [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            with contextlib.suppress(FileNotFoundError):  # a file went between the listing and its stat
                peak[0] = max(peak[0], kept_bytes(ram))

    watcher = threading.Thread(target=watch)
    watcher.start()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(ram), str(budget), str(n)], env=env)
               for n in range(4)]
    try:
        assert [w.wait(120) for w in writers] == [0, 0, 0, 0]
    finally:
        done.set()
        watcher.join()
    assert 0 < kept_bytes(ram) <= budget
    assert peak[0] <= budget, f"{peak[0]} bytes kept at one moment, over the budget of {budget}"


def test_fingerprints_follow_what_shapes_the_cache(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    base = {"model": str(gguf), "n_ctx": 512, "model_alias": "a", "chat_format": "gemma", "n_threads": 2}
    same = fingerprint(base, "0.3.36")
    assert fingerprint({**base, "model_alias": "b", "n_threads": 8, "chat_format": None}, "0.3.36") == same
    assert fingerprint({**base, "n_ctx": 1024}, "0.3.36") != same
    assert fingerprint({**base, "type_k": 8}, "0.3.36") != same
    assert fingerprint(base, "0.3.37") != same
    os.utime(gguf, (1, 1))  # another file at the same path
    assert fingerprint(base, "0.3.36") != same


# ---------------------------------------------------------------- real workers, real model

# About 270 tokens of context every request repeats, as an agent's system prompt and tools would be.
CONTEXT = " ".join(f"Item {i}: a box of {i * 7 % 13} apples and {i * 5 % 11} pears." for i in range(20))
QUESTIONS = ["How many apples are in item 7?", "How many pears are in item 3?"]


def ask(model: str, question: str) -> dict[str, Any]:
    content = f"Inventory:\n{CONTEXT}\n\nQuestion: {question}"
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 12, "temperature": 0}


async def answer(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> str:
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        data = await response.json()
        assert response.status == 200, data
    return str(data["choices"][0]["message"]["content"])


async def context_status(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url + "/warmpool/status") as response:
        [local] = [b for b in (await response.json())["backends"] if b["name"] == "local"]
        return dict(local["context"])


def config(gguf: str, **backend: Any) -> dict[str, Any]:
    models = llama_models(gguf, "planner", n_ctx=512)
    models.update(llama_models(gguf, "coder", n_ctx=384))  # another fingerprint: it restores nothing of planner's
    return {"backends": {"local": {"kind": "llamacpp", "max_resident": 1, "context_min_tokens": 16, **backend}},
            "models": models}


async def phase_round_trip(url: str) -> str:
    """planner (context + first question), a swap to coder, back to planner (context + second question)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=240)) as session:
        await answer(session, url, ask("planner", QUESTIONS[0]))
        await answer(session, url, ask("coder", "Hello"))
        return await answer(session, url, ask("planner", QUESTIONS[1]))


@pytest.mark.timeout(600)
async def test_an_answer_after_a_restore_is_the_answer_with_the_context_recomputed(gguf_path: str) -> None:
    async with running_warmpool(config(gguf_path)) as url:
        restored = await phase_round_trip(url)
        async with aiohttp.ClientSession() as session:
            planner = (await context_status(session, url))["models"]["planner"]
            async with session.get(url + "/metrics") as r:
                families = {f.name: f for f in text_string_to_metric_families(await r.text())}
    assert planner["saves"] >= 1 and planner["restores"] == 1 and planner["reused_tokens"] > 250
    # /metrics shows the same, under the names the README's metrics reference documents.
    exported = {name for name in families if name.startswith("warmpool_context_")}
    assert exported == {n.removesuffix("_total") for n in readme_metric_names() if n.startswith("warmpool_context_")}
    restores = {s.labels["model"]: s.value for s in families["warmpool_context_restores"].samples
                if s.name.endswith("_total")}
    assert restores["planner"] == 1.0
    async with running_warmpool(config(gguf_path, context_budget=0)) as url:
        recomputed = await phase_round_trip(url)
        async with aiohttp.ClientSession() as session:
            assert (await context_status(session, url)) == {"enabled": False}
    assert restored == recomputed and restored


@pytest.mark.timeout(600)
async def test_the_budget_holds_with_real_states(gguf_path: str, tmp_path: Path) -> None:
    """A budget for about one and a half states: each new conversation evicts the older one."""
    ram = tmp_path / "ctx"
    async with running_warmpool(config(gguf_path, context_dir=str(ram), context_budget="8MiB")) as url:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=240)) as session:
            for i in range(3):
                body = ask("planner", QUESTIONS[0])
                body["messages"][0]["content"] = f"Conversation {i}. " + body["messages"][0]["content"]
                await answer(session, url, body)
                await answer(session, url, ask("coder", "Hello"))  # the swap saves planner's conversation
                assert kept_bytes(ram) <= 8 * 2**20
            shown = await context_status(session, url)
    planner = shown["models"]["planner"]
    assert planner["saves"] == 3 and planner["evictions"] >= 1, planner
    [tier] = shown["tiers"]
    assert tier["path"] == str(ram) and 0 < tier["bytes"] <= tier["budget"] == 8 * 2**20
    assert ram.is_dir(), "a configured directory stays (warmpool removes only the one it made)"


@pytest.mark.timeout(300)
async def test_echoed_prompt_logprobs_are_never_taken_from_a_restore(gguf_path: str, tmp_path: Path) -> None:
    """Echoed logprobs read the prompt's logits, which a restored state does not carry: such a
    completion computes its prompt, and its logprobs are those of a worker that never saved anything."""
    model = ModelConfig(name="m", backend="b", upstream_name="m",
                        llamacpp=LlamaCppModel(gguf=gguf_path, n_ctx=512, chat_format="gemma"))
    backend = BackendConfig(name="b", kind="llamacpp", start_timeout=60)
    context = {"tiers": [{"path": str(tmp_path / "ctx"), "budget": 10**8}], "min_tokens": 16}
    events: list[dict[str, Any]] = []
    short = CONTEXT[: CONTEXT.index("Item 5:")]  # ~80 tokens: echoed logprobs sort the whole vocabulary per token
    prompt = f"Inventory:\n{short}\n\nQuestion: "
    echoed = {"model": "m", "prompt": prompt + QUESTIONS[1], "max_tokens": 1, "echo": True, "logprobs": 1,
              "temperature": 0}

    async def completion(slot: Slot, body: dict[str, Any]) -> dict[str, Any]:
        async with aiohttp.ClientSession() as session, session.post(slot.url + "/v1/completions", json=body) as r:
            assert r.status == 200
            return dict(await r.json())

    kept = Slot(0, backend, lambda slot, event: events.append(event), lambda slot, reason: None)
    fresh = Slot(1, backend, lambda slot, event: None, lambda slot, reason: None)
    try:
        for slot in (kept, fresh):
            await slot.spawn()
            await slot.wait_ready(time.monotonic() + 60)
        await kept.load(model, context, time.monotonic() + 60)
        await completion(kept, {"model": "m", "prompt": prompt + QUESTIONS[0], "max_tokens": 1})
        await kept.load(model, context, time.monotonic() + 60)  # frees (saves), loads again: empty
        assert any(e.get("saved") for e in events)
        got = (await completion(kept, echoed))["choices"][0]["logprobs"]
        assert not any(e.get("restored") for e in events)
        await fresh.load(model, None, time.monotonic() + 60)
        assert got == (await completion(fresh, echoed))["choices"][0]["logprobs"]
        await kept.load(model, context, time.monotonic() + 60)
        await completion(kept, {**echoed, "echo": False, "logprobs": None})
        assert any(e.get("restored") for e in events)  # the same prompt without echo does restore
    finally:
        await kept.stop()
        await fresh.stop()
