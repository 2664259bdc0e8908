"""The Grafana dashboard: it parses, has a stable uid, takes its Prometheus from a datasource variable (so it
works imported or provisioned), covers what the issue asks for, and names only metrics warmpool exports,
checked against the /metrics of a real warmpool (in front of the Ollama emulator, with the RAM tier on).
tests/test_prometheus.py evaluates every expression against a real Prometheus."""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, running_warmpool
from tests.ollama_emulator import EmulatedModel, OllamaEmulator
from warmpool.ramtier import pagecache

pytestmark = pytest.mark.timeout(60)

DASHBOARD = REPO / "grafana" / "dashboards" / "warmpool.json"
PROVISIONING = REPO / "grafana" / "provisioning"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
METRIC_NAME = re.compile(r"\b(warmpool_[A-Za-z0-9_:]+)")
# What Grafana substitutes before it sends a query; the tests stand in for it.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$model": ".*"}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"), "info": ("_info",), "stateset": ("",),
            "gaugehistogram": ("_bucket", "_gsum", "_gcount")}


# -- helpers shared with test_prometheus ----------------------------------------------------------------

def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in all_panels(dashboard) if p["type"] != "row"]


def panel_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every query of every panel, as written in the dashboard."""
    return [(f"{p['title']} [{t['refId']}]", t["expr"])
            for p in query_panels(dashboard) for t in p["targets"]]


def variable_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(variable, query) for every query variable (Grafana templating, e.g. label_values(metric, label))."""
    found = []
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            found.append((var["name"], query))
    return found


def to_promql(expr: str) -> str:
    """The expression as Grafana sends it to Prometheus: the dashboard's variables substituted."""
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def metric_names(exprs: Iterable[str]) -> set[str]:
    return {name for expr in exprs for name in METRIC_NAME.findall(expr)}


def exported_names(exposition: str) -> set[str]:
    """Every series name a Prometheus scrape of this /metrics text can produce: the samples present, and
    for each declared family the names its type implies (a labelled counter has no sample until used)."""
    names = set()
    for family in text_string_to_metric_families(exposition):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


def unknown_metrics(exprs: Iterable[str], exported: set[str]) -> set[str]:
    """The warmpool_* names the expressions use that warmpool does not export."""
    return metric_names(exprs) - exported


def weight_files(directory: Path, names: Iterable[str], size: int = 4 << 20) -> dict[str, Path]:
    """`<name>.gguf` of random bytes for each model (the RAM tier finds weights by name in models_dirs),
    written to disk and dropped from the page cache, so the RAM tier starts cold."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in names:
        path = directory / f"{name}.gguf"
        with path.open("wb") as f:
            f.write(os.urandom(size))
            f.flush()
            os.fsync(f.fileno())
        pagecache.drop(path)
        files[name] = path
    return files


def warmpool_config(emulator_url: str, tmp: Path, models: Iterable[str]) -> dict[str, Any]:
    """warmpool in front of the emulator: one pool with room for one model, the RAM tier on, its weights in
    `tmp/models`, nothing else searched, and no background re-warming during a test."""
    empty = tmp / "empty"
    empty.mkdir(exist_ok=True)
    return {
        "backends": {"ol": {"kind": "ollama", "url": emulator_url, "max_resident": 1}},
        "models": {name: {"backend": "ol"} for name in models},
        "ram_tier": {"enabled": True, "models_dirs": [str(tmp / "models")], "ollama_models": str(empty),
                     "hf_cache": str(empty), "interval": "60s", "top_n": 0,
                     "state_file": str(tmp / "usage.json")},
    }


async def generate(session: aiohttp.ClientSession, url: str, model: str) -> None:
    body = {"model": model, "prompt": "hi", "stream": False}
    async with session.post(url + "/api/generate", json=body) as r:
        assert r.status == 200, await r.text()
        await r.read()


# -- the dashboard alone ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


def test_dashboard_parses_with_a_stable_uid(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "warmpool"
    assert dashboard["id"] is None  # imported or provisioned, Grafana assigns its own
    assert dashboard["title"] == "warmpool"
    assert "__inputs" not in dashboard  # no import-time mapping needed: the variable chooses the datasource


def test_datasource_variable_and_model_variable(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    assert ds["current"]["value"] == "prometheus"  # the provisioned datasource's uid
    model = variables["model"]
    assert model["datasource"] == DATASOURCE
    assert model["multi"] and model["includeAll"] and model["allValue"] == ".*"
    assert variable_queries(dashboard) == [("model", "label_values(warmpool_model_resident, model)")]


def test_every_panel_and_query_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    panels = query_panels(dashboard)
    assert panels
    for panel in panels:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert t.get("datasource", DATASOURCE) == DATASOURCE, panel["title"]
            assert t["expr"].strip(), panel["title"]
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in all_panels(dashboard):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]


def test_panels_cover_the_issue(dashboard: dict[str, Any]) -> None:
    by_title = {p["title"]: p for p in query_panels(dashboard)}

    def exprs(title: str) -> str:
        return " ".join(t["expr"] for t in by_title[title]["targets"])

    swap = exprs("Swap latency p50 / p95 by source tier")
    assert "histogram_quantile(0.5, sum by (le, source)" in swap
    assert "histogram_quantile(0.95, sum by (le, source)" in swap
    assert "warmpool_swap_duration_seconds_bucket" in swap
    assert "warmpool_swaps_total" in exprs("Swaps per minute by model and reason")
    assert "warmpool_queue_wait_seconds_bucket" in exprs("Queue wait p50 / p95 by model")
    assert "warmpool_queue_depth" in exprs("Queue depth by model")
    assert "warmpool_time_to_first_byte_seconds_bucket" in exprs("Time to first byte p50 / p95 by model")
    assert "warmpool_requests_total" in exprs("Request rate by status")
    timeline = by_title["Resident model timeline"]
    assert timeline["type"] == "state-timeline"
    assert "warmpool_model_resident" in exprs("Resident model timeline")
    assert "warmpool_pagecache_resident_ratio" in exprs("RAM residency per model")
    hit_rate = exprs("RAM-tier hit rate")
    assert "warmpool_ramtier_hits_total" in hit_rate and "warmpool_ramtier_misses_total" in hit_rate
    evictions = exprs("Evictions per minute")
    assert "warmpool_evictions_total" in evictions and "warmpool_ramtier_evictions_total" in evictions
    assert "warmpool_backend_up" in exprs("Backend up")
    assert "warmpool_host_memory_available_bytes" in exprs("Host available memory")
    # Grafana variables only: $__rate_interval adapts the window to the scrape interval; nothing else.
    for where, expr in panel_exprs(dashboard):
        assert "[$__rate_interval]" in expr or "rate(" not in expr, where
        assert "$" not in to_promql(expr), where


def test_provisioning_files() -> None:
    dashboards = yaml.safe_load((PROVISIONING / "dashboards" / "warmpool.yaml").read_text())
    assert dashboards["apiVersion"] == 1
    (provider,) = dashboards["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    assert datasources["apiVersion"] == 1
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["uid"] == "prometheus" and ds["url"] == "http://prometheus:9090"


# -- metric names against a real warmpool ------------------------------------------------------------

def test_an_unknown_metric_name_is_caught() -> None:
    exposition = ("# HELP warmpool_swaps_total Loads.\n# TYPE warmpool_swaps_total counter\n"
                  "# HELP warmpool_queue_wait_seconds Wait.\n# TYPE warmpool_queue_wait_seconds histogram\n"
                  "# HELP warmpool_queue_depth Depth.\n# TYPE warmpool_queue_depth gauge\n"
                  'warmpool_queue_depth{model="a"} 0.0\n')
    exported = exported_names(exposition)
    assert {"warmpool_swaps_total", "warmpool_queue_wait_seconds_bucket", "warmpool_queue_depth"} <= exported
    good = ["sum(rate(warmpool_swaps_total[$__rate_interval]))",
            "histogram_quantile(0.9, sum by (le) (rate(warmpool_queue_wait_seconds_bucket[1m])))"]
    assert unknown_metrics(good, exported) == set()
    bad = [*good, "sum(rate(warmpool_swap_total[1m]))", "warmpool_queue_wait_seconds",
           "warmpool_queue_depth_total"]
    assert unknown_metrics(bad, exported) == {"warmpool_swap_total", "warmpool_queue_wait_seconds",
                                              "warmpool_queue_depth_total"}


@pytest.fixture
async def emulator() -> AsyncIterator[OllamaEmulator]:
    emu = OllamaEmulator([EmulatedModel("alpha", size=500_000_000), EmulatedModel("beta", size=500_000_000)],
                         load_seconds_per_gb=0.1)
    await emu.start()
    yield emu
    await emu.stop()


async def test_every_metric_in_the_dashboard_is_exported_by_warmpool(
        dashboard: dict[str, Any], emulator: OllamaEmulator, tmp_path: Path) -> None:
    weight_files(tmp_path / "models", ["alpha", "beta"])
    async with running_warmpool(warmpool_config(emulator.url, tmp_path, ["alpha", "beta"])) as url:
        async with aiohttp.ClientSession() as s:
            await generate(s, url, "alpha")
            await generate(s, url, "beta")  # a swap: evictions, unloads, queue waits
            async with s.get(url + "/metrics") as r:
                assert r.status == 200
                exported = exported_names(await r.text())
    assert "warmpool_pagecache_resident_ratio" in exported  # the RAM tier was on
    exprs = [e for _, e in panel_exprs(dashboard)] + [q for _, q in variable_queries(dashboard)]
    assert len(metric_names(exprs)) >= 15
    assert unknown_metrics(exprs, exported) == set()


def readme_metric_names() -> set[str]:
    """The metric names the README's metrics reference lists (first column of its table)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("### Metrics", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(warmpool_[a-z_]+)`", section, flags=re.M))


async def test_readme_metrics_reference_matches_metrics(emulator: OllamaEmulator, tmp_path: Path) -> None:
    weight_files(tmp_path / "models", ["alpha", "beta"])
    async with running_warmpool(warmpool_config(emulator.url, tmp_path, ["alpha", "beta"])) as url:
        async with aiohttp.ClientSession() as s:
            await generate(s, url, "alpha")
            await generate(s, url, "beta")
            async with s.get(url + "/metrics") as r:
                families = {f.name for f in text_string_to_metric_families(await r.text())}
    # prometheus_client names a counter family without its _total; the README lists what a scrape shows.
    # The context families come from a managed llama.cpp pool only: tests/test_context.py checks those.
    documented = {n.removesuffix("_total") for n in readme_metric_names() if not n.startswith("warmpool_context_")}
    exported = {n for n in families if n.startswith("warmpool_") and not n.startswith("warmpool_process_")}
    assert documented == exported, {"undocumented": exported - documented, "not exported": documented - exported}
