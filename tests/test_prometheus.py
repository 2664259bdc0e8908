"""The Grafana dashboard proved against a real Prometheus (Debian's `prometheus`): Prometheus scrapes a real
warmpool every second while a workload swaps models in front of the Ollama emulator, warming their weight
files before some swaps (RAM-tier hits) and evicting them before others (misses); then every PromQL
expression of every panel is evaluated through Prometheus's HTTP API and must return numbers. A metric
name that warmpool does not export fails, both by name and because its query comes back empty."""

from __future__ import annotations

import asyncio
import ctypes
import math
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml

from tests.conftest import running_warmpool
from tests.ollama_emulator import EmulatedModel, OllamaEmulator
from tests.test_grafana import (
    generate,
    load_dashboard,
    metric_names,
    panel_exprs,
    to_promql,
    variable_queries,
    warmpool_config,
    weight_files,
)

pytestmark = pytest.mark.timeout(180)

PROMETHEUS = "/usr/bin/prometheus"
MODELS = ["alpha", "beta", "gamma"]
WORKLOAD_SECONDS = 12.0


def prometheus_binary() -> str:
    """The prometheus binary; without one the test is skipped, except under CI, where it fails."""
    found = PROMETHEUS if os.access(PROMETHEUS, os.X_OK) else shutil.which("prometheus")
    if found:
        return found
    reason = f"{PROMETHEUS} is missing (Debian: apt-get install prometheus; .ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(reason + ", and CI is set: this test must run under CI")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child may not dlopen safely
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if the test process dies, so no Prometheus outlives a run."""
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


@asynccontextmanager
async def running_prometheus(binary: str, target: str, workdir: Path) -> AsyncIterator[str]:
    """A Prometheus scraping `target` (host:port) every second; yields its base URL, killed after."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "warmpool", "static_configs": [{"targets": [target]}]}],
    }))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h",
             "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)

    def log_tail() -> str:
        return log_path.read_text(errors="replace")[-3000:]

    try:
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession() as s:
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"prometheus exited with {proc.returncode}:\n{log_tail()}")
                try:
                    async with s.get(url + "/-/ready") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, f"prometheus not ready in 60 s:\n{log_tail()}"
                await asyncio.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 15)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)


async def api(session: aiohttp.ClientSession, prom: str, path: str, **params: str) -> Any:
    async with session.get(prom + "/api/v1/" + path, params=params) as r:
        body = await r.json()
        assert r.status == 200 and body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]


async def instant(session: aiohttp.ClientSession, prom: str, query: str) -> list[dict[str, Any]]:
    data = await api(session, prom, "query", query=query)
    assert data["resultType"] == "vector", data
    return list(data["result"])


async def poll(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, f"not reached in {timeout} s: {what}"
        await asyncio.sleep(0.25)


async def swap_workload(url: str, seconds: float) -> dict[str, int]:
    """Cycle through the models (each request swaps: room for one) for about `seconds`. In even rounds a
    model's files are warmed just before its swap (a RAM-tier hit), in odd rounds evicted (a miss). A
    second request for the same model joins the queue while the swap runs."""
    sources = {"ram": 0, "disk": 0}
    deadline = time.monotonic() + seconds
    step = 0
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline or sources["disk"] < 2:
            model = MODELS[step % len(MODELS)]
            hit = (step // len(MODELS)) % 2 == 0
            action = "warm" if hit else "evict"
            async with s.post(f"{url}/warmpool/models/{model}/{action}") as r:
                assert r.status == 200, await r.text()
                answer = await r.json()
            assert answer["percent_in_ram"] >= 90.0 if hit else answer["percent_in_ram"] < 10.0, answer
            await asyncio.gather(generate(s, url, model), generate(s, url, model))
            async with s.get(url + "/warmpool/status") as r:
                swap = (await r.json())["pools"][0]["swaps"][0]
            assert swap["model"] == model and swap["source"] == ("ram" if hit else "disk"), swap
            sources[swap["source"]] += 1
            step += 1
            assert step < 200, "workload did not end"
    return sources


async def scraped_total(session: aiohttp.ClientSession, url: str, name: str) -> float:
    """The sum of a counter's samples in warmpool's own /metrics."""
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


SWAP_LATENCY_BY_SOURCE = ("histogram_quantile(0.95, sum by (le, source) "
                          "(rate(warmpool_swap_duration_seconds_bucket[1m])))")


async def screenshot_graph(prom: str, expr: str, profile: Path) -> None:
    from urllib.parse import quote

    from tests.test_status_page import CHROMIUM, SCREENSHOT_DIR, chromium

    if CHROMIUM is None:
        return
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOT_DIR / "prometheus-swap-latency.png"
    await chromium(f"--screenshot={shot}", f"{prom}/graph?g0.expr={quote(expr)}&g0.tab=0&g0.range_input=1m",
                   profile=profile)
    assert shot.exists()


async def test_every_dashboard_query_returns_data_from_a_real_prometheus(tmp_path: Path) -> None:
    binary = prometheus_binary()
    dashboard = load_dashboard()
    exprs = panel_exprs(dashboard)
    weight_files(tmp_path / "models", MODELS)
    # ~0.2 s per load: 1 GB at 0.2 s/GB.
    emu = OllamaEmulator([EmulatedModel(m, size=1_000_000_000) for m in MODELS], load_seconds_per_gb=0.2,
                         token_delay=0.005)
    await emu.start()
    try:
        async with running_warmpool(warmpool_config(emu.url, tmp_path, MODELS)) as url:
            target = urlsplit(url).netloc
            async with running_prometheus(binary, target, tmp_path / "prometheus") as prom, \
                    aiohttp.ClientSession() as s:

                async def target_up() -> bool:
                    active = (await api(s, prom, "targets"))["activeTargets"]
                    return any(t["scrapeUrl"].startswith(url) and t["health"] == "up" for t in active)

                async def up_is_one() -> bool:
                    return [r["value"][1] for r in await instant(s, prom, "up")] == ["1"]

                await poll(target_up, "prometheus scrapes warmpool")
                await poll(up_is_one, "up == 1")

                sources = await swap_workload(url, WORKLOAD_SECONDS)
                assert sources["ram"] >= 3 and sources["disk"] >= 2, sources

                # Until Prometheus has scraped the workload's end state.
                swaps = await scraped_total(s, url, "warmpool_swaps_total")
                misses = await scraped_total(s, url, "warmpool_ramtier_misses_total")

                async def caught_up() -> bool:
                    got = {q: await instant(s, prom, f"sum({q})")
                           for q in ("warmpool_swaps_total", "warmpool_ramtier_misses_total")}
                    return all(got[q] and float(got[q][0]["value"][1]) == want
                               for q, want in (("warmpool_swaps_total", swaps),
                                               ("warmpool_ramtier_misses_total", misses)))

                await poll(caught_up, f"prometheus has scraped {swaps} swaps and {misses} misses")

                # 1. Every name the dashboard uses is one Prometheus got from warmpool.
                scraped = set(await api(s, prom, "label/__name__/values"))
                used = metric_names([e for _, e in exprs] + [q for _, q in variable_queries(dashboard)])
                unknown = used - scraped
                assert unknown == set(), f"the dashboard names metrics warmpool does not export: {unknown}"

                # 2. Every panel query returns numbers.
                problems = []
                for where, expr in exprs:
                    query = to_promql(expr)
                    result = await instant(s, prom, query)
                    values = [float(r["value"][1]) for r in result]
                    if not values:
                        problems.append(f"{where}: no data for {query}")
                    elif not all(math.isfinite(v) for v in values):
                        problems.append(f"{where}: not a number in {result} for {query}")
                assert not problems, "\n".join(problems)

                # 3. The model variable's label_values(warmpool_model_resident, model).
                models = await api(s, prom, "label/model/values", **{"match[]": "warmpool_model_resident"})
                assert sorted(models) == MODELS

                # 4. For people: the swap-latency panel's query graphed by Prometheus itself (no Grafana
                # can be installed here), kept next to the status page's screenshot.
                await screenshot_graph(prom, SWAP_LATENCY_BY_SOURCE, tmp_path / "chromium")
    finally:
        await emu.stop()
