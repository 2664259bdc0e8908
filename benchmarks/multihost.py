"""Three warmpool hosts behind one HAProxy: routing by model affinity against round robin, then a host
killed and a host stopped gracefully, in one run.

Each host is a network namespace with its own address, its own Ollama emulator and its own warmpool
(`max_resident: 1`, agent-check responder on); HAProxy runs deploy/haproxy/haproxy.cfg as shipped, plus a
round-robin frontend over the same three hosts (tests/multihost.py has the harness). The workload is
benchmarks/phases.py's agents: each loops context -> execution -> verification (sometimes debugging), a
streamed OpenAI chat per step with a short think time, fixed by --seed; context is served by planner,
execution and debugging by coder, verification by reviewer (the map HAProxy hashes on says the same).

  1. affinity without the bounded load (hash-balance-factor 0), affinity as shipped (150), then round robin,
     each from hosts with nothing loaded and at full weight: model loads over all hosts
     (warmpool_swaps_total), time to first token p50/p95 at the client, requests per host, and where each
     model's requests went. The targets are judged on the shipped configuration.
  2. host killed: the affinity workload again (its own seed); once a third of its requests are done and a
     host has a stream running, that host's warmpool gets SIGKILL. Every request must end complete or
     with an error the client sees (an HTTP error, an error event or a cut stream), none may hang; the
     killed host's models must come up on a survivor. HAProxy's retry and redispatch counters show the
     requests that had not started and were sent elsewhere.
  3. graceful stop: the workload again on the two survivors; one gets SIGTERM while it streams. Its agent
     must say drain (HAProxy shows DRAIN) before it closes its listener, and no request may fail.

Needs root (network namespaces) and HAProxy (Debian: apt-get install haproxy). Every namespace, veth and
process is removed at the end, also on failure.

    .venv/bin/python benchmarks/multihost.py [--seed N] [--agents N] [--rounds N] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout under test and its tests/ harness

import phases  # benchmarks/phases.py, beside this script: the agents' workload

from tests import multihost as mh

SHIPPED_FACTOR = 150  # hash-balance-factor in deploy/haproxy/haproxy.cfg
MODELS_MAP = {**mh.PHASES, **{model: model for model in mh.UPSTREAM}}  # every name -> the model serving it


@dataclass
class Run:
    label: str
    outcomes: list[mh.Outcome]
    loads: int
    wall: float
    hosts: list[str]
    notes: list[str] = field(default_factory=list)

    def ttfts(self) -> list[float]:
        return [o.ttft for o in self.outcomes if o.complete and o.ttft is not None]

    def per_host(self) -> Counter[str]:
        return Counter(o.host or "-" for o in self.outcomes)

    def max_share(self) -> tuple[float, str]:
        """The busiest host's requests over its fair share (total / hosts), and its name."""
        counts = self.per_host()
        fair = len(self.outcomes) / len(self.hosts)
        name = max(self.hosts, key=lambda h: counts.get(h, 0))
        return counts.get(name, 0) / fair, name

    def failed(self) -> list[mh.Outcome]:
        return [o for o in self.outcomes if not o.complete]

    def placement(self) -> str:
        """Where each model's requests went: "planner gpu3 20, gpu2 7; ..."."""
        by_model: dict[str, Counter[str]] = {}
        for o in self.outcomes:
            by_model.setdefault(mh.PHASES.get(o.phase or "", o.phase or "-"), Counter())[o.host or "-"] += 1
        return "; ".join(f"{model} " + ", ".join(f"{host} {n}" for host, n in hosts.most_common())
                         for model, hosts in sorted(by_model.items()))


def plan(args: argparse.Namespace, seed: int) -> list[tuple[phases.Step, ...]]:
    think = (args.think_min, args.think_max)
    return [phases.agent_plan(seed, agent, args.rounds, args.p_debug, think, mh.PHASES) for agent in range(args.agents)]


async def run_agents(http: aiohttp.ClientSession, base: str, agents: list[tuple[phases.Step, ...]],
                     args: argparse.Namespace, done: list[mh.Outcome]) -> float:
    async def agent(steps: tuple[phases.Step, ...]) -> None:
        for step in steps:
            await asyncio.sleep(step.think)
            done.append(await mh.stream_chat(http, base, step.phase, step.prompt, args.max_tokens,
                                             hang_after=args.hang_after))

    started = time.perf_counter()
    await asyncio.gather(*(agent(steps) for steps in agents))
    return time.perf_counter() - started


async def total_loads(http: aiohttp.ClientSession, hosts: list[mh.Host]) -> int:
    return sum([await mh.loads(http, h) for h in hosts])


async def reset(http: aiohttp.ClientSession, hosts: list[mh.Host]) -> None:
    """Nothing loaded anywhere, every host back at full weight: each routing starts from the same state."""
    for host in hosts:
        body = await mh.residency(http, host)
        for name, model in body["models"].items():
            if model["state"] != "cold":
                async with http.post(f"{host.url}/warmpool/models/{name}/unload") as r:
                    assert r.status == 200, await r.text()

    async def settled() -> bool:
        views = [await mh.residency(http, h) for h in hosts]
        return all(v["weight"] == 100 and all(m["state"] == "cold" for m in v["models"].values()) for v in views)

    await mh.until("hosts idle at full weight", settled, timeout=120, interval=1.0)


async def measure(http: aiohttp.ClientSession, label: str, base: str, hosts: list[mh.Host],
                  agents: list[tuple[phases.Step, ...]], args: argparse.Namespace) -> Run:
    await reset(http, hosts)
    before = await total_loads(http, hosts)
    outcomes: list[mh.Outcome] = []
    wall = await run_agents(http, base, agents, args, outcomes)
    return Run(label, outcomes, await total_loads(http, hosts) - before, wall, [h.name for h in hosts])


async def when_streaming(http: aiohttp.ClientSession, hosts: list[mh.Host], outcomes: list[mh.Outcome],
                         after: int) -> tuple[mh.Host, dict[str, Any]]:
    """Once `after` requests are done, the first host seen with a stream running, and its residency."""
    while True:
        if len(outcomes) >= after:
            for host in hosts:
                view = await mh.residency(http, host)
                if view["load"]["inflight"] > 0:
                    return host, view
        await asyncio.sleep(0.05)


async def with_event(work: Awaitable[float], event: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    event_task = asyncio.ensure_future(event())
    wall = await work
    return wall, await event_task


async def kill_mid_run(http: aiohttp.ClientSession, fab: mh.Fabric, args: argparse.Namespace) -> tuple[Run, mh.Host]:
    haproxy = fab.haproxy
    assert haproxy is not None
    agents = plan(args, args.seed + 1)
    before = haproxy.backend()
    outcomes: list[mh.Outcome] = []

    async def kill() -> tuple[mh.Host, dict[str, Any], float]:
        victim, view = await when_streaming(http, fab.hosts, outcomes, sum(map(len, agents)) // 3)
        victim.warmpool.signal(signal.SIGKILL)
        return victim, view, time.monotonic()

    wall, (victim, view, killed_at) = await with_event(run_agents(http, haproxy.url, agents, args, outcomes), kill)
    after = haproxy.backend()
    run = Run("host killed", outcomes, 0, wall, [h.name for h in fab.hosts])
    running = {n: m["inflight"] for n, m in view["models"].items() if m["inflight"]}
    queued = {n: m["queued"] for n, m in view["models"].items() if m["queued"]}
    run.notes.append(f"killed {victim.name}'s warmpool with {sum(running.values())} stream(s) running "
                     f"{running} and {sum(queued.values())} request(s) queued {queued or ''}".rstrip())
    run.notes.append(f"HAProxy retried {int(after['wretr']) - int(before['wretr'])} and redispatched "
                     f"{int(after['wredis']) - int(before['wredis'])} request(s)")
    for name, model in view["models"].items():
        if model["state"] in ("resident", "loading"):
            later = [o for o in outcomes if o.started > killed_at and mh.PHASES.get(o.phase or "") == name]
            hosts = Counter(o.host for o in later if o.complete)
            run.notes.append(f"{name}, {model['state']} on {victim.name} when it died: {len(later)} request(s) for it "
                             f"sent after, {sum(hosts.values())} answered, by "
                             f"{', '.join(f'{h} ({n})' for h, n in hosts.most_common()) or 'none'}")
    return run, victim


async def stop_gracefully(http: aiohttp.ClientSession, fab: mh.Fabric, hosts: list[mh.Host],
                          args: argparse.Namespace) -> Run:
    haproxy = fab.haproxy
    assert haproxy is not None
    agents = plan(args, args.seed + 2)
    outcomes: list[mh.Outcome] = []

    async def stop() -> str:
        host, _ = await when_streaming(http, hosts, outcomes, sum(map(len, agents)) // 3)
        host.warmpool.signal(signal.SIGTERM)
        seen = "not seen"
        deadline = time.monotonic() + mh.DRAIN_DELAY + 5
        while time.monotonic() < deadline and seen == "not seen":
            status = haproxy.servers().get(host.name, {}).get("status", "")
            if status.startswith("DRAIN"):
                seen = f"HAProxy showed {host.name} DRAIN while its warmpool " + \
                       ("still ran" if host.warmpool.alive() else "had already exited")
            await asyncio.sleep(0.05)
        return f"SIGTERM to {host.name}'s warmpool; {seen}"

    wall, note = await with_event(run_agents(http, haproxy.url, agents, args, outcomes), stop)
    return Run("graceful stop", outcomes, 0, wall, [h.name for h in hosts], [note])


# -- the table -------------------------------------------------------------------------------------------

def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def routing_table(runs: list[Run]) -> list[str]:
    lines = ["| routing | model loads | TTFT p50 | TTFT p95 | requests per host | busiest / fair share | "
             "failed | wall |", "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        counts = run.per_host()
        share, name = run.max_share()
        lines.append(f"| {run.label} | {run.loads} | {seconds(mh.percentile(run.ttfts(), 50))} | "
                     f"{seconds(mh.percentile(run.ttfts(), 95))} | "
                     f"{' / '.join(str(counts.get(h, 0)) for h in run.hosts)} | {share:.2f}x ({name}) | "
                     f"{len(run.failed())} of {len(run.outcomes)} | {run.wall:.1f} s |")
    return lines


def target_rows(affinity: Run, rr: Run, killed: Run, graceful: Run, factor: float) -> list[str]:
    ratio = affinity.loads / rr.loads if rr.loads else float("inf")
    p95 = (mh.percentile(affinity.ttfts(), 95), mh.percentile(rr.ttfts(), 95))
    share, name = affinity.max_share()
    lost = [o for o in killed.outcomes if not o.answered]
    hung = [o for o in killed.outcomes if o.hung]
    rows = [
        ("model loads, affinity <= 0.5x round robin", f"{affinity.loads} vs {rr.loads} = {ratio:.2f}x", ratio <= 0.5),
        ("TTFT p95, affinity <= round robin", f"{seconds(p95[0])} vs {seconds(p95[1])}",
         None not in p95 and p95[0] <= p95[1]),  # type: ignore[operator]
        (f"no host above {factor:g}x its fair share (affinity)", f"busiest {name}: {share:.2f}x", share <= factor),
        ("host killed: requests lost without an answer", f"{len(lost)} of {len(killed.outcomes)}", not lost),
        ("host killed: hangs", str(len(hung)), not hung),
        ("graceful stop: failed requests", f"{len(graceful.failed())} of {len(graceful.outcomes)}",
         not graceful.failed()),
    ]
    lines = ["| target | measured | |", "|---|---|---|"]
    lines += [f"| {what} | {measured} | {'met' if ok else 'NOT MET'} |" for what, measured, ok in rows]
    return lines


def failures(run: Run) -> list[str]:
    seen = Counter(f"{o.error}" for o in run.failed())
    return [f"  {count} x {error[:160]}" for error, count in seen.most_common(5)]


# -- main ------------------------------------------------------------------------------------------------

async def bench(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="warmpool-multihost-") as tmp, mh.fabric(Path(tmp)) as fab:
        emulation = mh.Emulation(load_seconds_per_gb=args.load_seconds_per_gb, token_delay=args.token_delay)
        for host in fab.hosts:
            fab.start_host(host, emulation)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            await mh.wait_hosts_ready(http, fab.hosts)
            agents = plan(args, args.seed)
            unbounded = await measure(http, "affinity, no bounded load (factor 0)",
                                      (await start_haproxy(fab, 0)).url, fab.hosts, agents, args)
            haproxy = await start_haproxy(fab, None)
            affinity = await measure(http, f"affinity as shipped (hash-balance-factor {SHIPPED_FACTOR})",
                                     haproxy.url, fab.hosts, agents, args)
            rr = await measure(http, "round robin", haproxy.rr_url, fab.hosts, agents, args)
            await reset(http, fab.hosts)
            killed, victim = await kill_mid_run(http, fab, args)
            survivors = [h for h in fab.hosts if h is not victim]
            graceful = await stop_gracefully(http, fab, survivors, args)
    requests = sum(map(len, agents))
    print(f"\n{args.agents} agents x {args.rounds} rounds ({requests} streamed chats per run, seed {args.seed}), "
          f"3 hosts, max_resident 1, emulated loads {args.load_seconds_per_gb:g} s per GB (1 GB models), "
          f"{args.max_tokens} tokens at {args.token_delay * 1000:g} ms\n")
    print("\n".join(routing_table([unbounded, affinity, rr])))
    print()
    print("\n".join(target_rows(affinity, rr, killed, graceful, SHIPPED_FACTOR / 100)))
    print("\nwhere each model's requests went:")
    for run in (unbounded, affinity, rr):
        print(f"  {run.label}: {run.placement()}")
    for run in (killed, graceful):
        if run.notes or run.failed():
            print(f"\n{run.label}:")
            print("\n".join(f"  {note}" for note in run.notes))
            if run.failed():
                print(f"  {len(run.failed())} request(s) did not complete:")
                print("\n".join(failures(run)))
    return 0


async def start_haproxy(fab: mh.Fabric, factor: int | None) -> mh.HAProxy:
    """HAProxy as shipped, or with another hash-balance-factor, once it sees every host up."""
    haproxy = fab.start_haproxy(MODELS_MAP, factor)
    for backend in ("warmpool_hosts", "warmpool_rr"):
        await mh.wait_haproxy_sees(haproxy, {h.name: "UP" for h in fab.hosts}, backend=backend)
    return haproxy


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--seed", type=int, default=1)
    add("--agents", type=int, default=6)
    add("--rounds", type=int, default=5)
    add("--p-debug", type=float, default=0.25, help="chance a round has a debugging step")
    add("--think-min", type=float, default=0.2)
    add("--think-max", type=float, default=1.0)
    add("--max-tokens", type=int, default=12, help="the emulator answers at most 12 tokens")
    add("--token-delay", type=float, default=0.02, help="emulator seconds per token")
    add("--load-seconds-per-gb", type=float, default=0.8, help="emulator load time per GB (models are 1 GB)")
    add("--hang-after", type=float, default=60.0, help="seconds after which a request counts as hung")
    add("--quick", action="store_true", help="3 agents x 2 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.agents, args.rounds = 3, 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = mh.namespaces_unavailable()
    if reason or shutil.which("haproxy") is None:
        print(f"cannot run: {reason or 'haproxy is missing (Debian: apt-get install haproxy)'}", file=sys.stderr)
        return 2
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
