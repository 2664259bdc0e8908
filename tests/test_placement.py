"""deploy/haproxy/placement.py: the names every model is known by, and its home host, spread by expected load;
the maps shipped in deploy/haproxy/ are what it writes for config.example.yaml. test_multihost.py runs its
maps for real behind HAProxy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.multihost import PLACEMENT_PY, REPO, placement_module
from warmpool.config import Config, config_from_mapping, load_config

place = placement_module()


def config(models: list[str], phases: dict[str, str] | None = None, upstream: dict[str, str] | None = None) -> Config:
    raw: dict[str, Any] = {
        "backends": {"ollama": {"kind": "ollama", "url": "http://127.0.0.1:11434", "max_resident": 1}},
        "models": {m: {"backend": "ollama", "upstream_name": (upstream or {}).get(m, f"{m}:7b")} for m in models},
        "phases": phases or {},
    }
    return config_from_mapping(raw, env={}, source="<test>")


def test_three_models_on_three_hosts_get_a_host_each() -> None:
    """What consistent hashing gets only 2 times in 9."""
    cfg = config(["planner", "coder", "reviewer"])
    assert place.homes(place.expected_loads(cfg, {}), ["gpu1", "gpu2", "gpu3"]) == {
        "planner": "gpu1", "coder": "gpu2", "reviewer": "gpu3"}


def test_heavier_models_get_the_emptier_hosts() -> None:
    loads = {"a": 1.0, "b": 10.0, "c": 6.0, "d": 5.0, "e": 0.0}
    # b (10) -> h1; c (6) -> h2; d (5) -> h2 (6 < 10): 11; a (1) -> h1: 11; e (0) -> h1 (11 = 11, and h1 and
    # h2 both have two models, so the first listed).
    assert place.homes(loads, ["h1", "h2"]) == {"a": "h1", "b": "h1", "c": "h2", "d": "h2", "e": "h1"}


def test_equal_loads_go_round_the_hosts_in_order_and_spare_hosts_stay_free() -> None:
    assert place.homes(dict.fromkeys("abcde", 1.0), ["h1", "h2"]) == {
        "a": "h1", "b": "h2", "c": "h1", "d": "h2", "e": "h1"}
    assert place.homes({"a": 1.0}, ["h1", "h2", "h3"]) == {"a": "h1"}


def test_idle_models_go_to_the_host_with_fewest_models() -> None:
    assert place.homes({"busy": 5.0, "idle1": 0.0, "idle2": 0.0}, ["h1", "h2"]) == {
        "busy": "h1", "idle1": "h2", "idle2": "h2"}


def test_no_hosts_or_a_host_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="no hosts"):
        place.homes({"a": 1.0}, [])
    with pytest.raises(ValueError, match="listed twice"):
        place.homes({"a": 1.0}, ["h1", "h1"])


def test_loads_given_for_phases_and_aliases_count_for_their_model() -> None:
    cfg = config(["planner", "coder", "reviewer"], phases={"context": "planner", "execution": "coder",
                                                           "debugging": "coder"})
    loads = place.expected_loads(cfg, {"execution": 30, "debugging": 7, "context": 30, "reviewer:7b": 2})
    assert loads == {"planner": 30.0, "coder": 37.0, "reviewer": 2.0}
    assert list(loads) == ["planner", "coder", "reviewer"]  # the configuration's order
    with pytest.raises(ValueError, match="no model or phase named nope"):
        place.expected_loads(cfg, {"nope": 1})
    with pytest.raises(ValueError, match="negative"):
        place.expected_loads(cfg, {"coder": -1})


def test_client_names_cover_phases_names_and_upstream_names_with_and_without_latest() -> None:
    cfg = config(["planner", "coder"], phases={"context": "planner", "execution": "coder"},
                 upstream={"planner": "qwen2.5", "coder": "qwen2.5-coder:7b"})
    assert place.client_names(cfg) == {
        "context": "planner", "execution": "coder",
        "qwen2.5": "planner", "qwen2.5:latest": "planner", "planner": "planner", "planner:latest": "planner",
        "qwen2.5-coder:7b": "coder", "coder": "coder", "coder:latest": "coder"}


def test_a_map_line_cannot_hold_white_space() -> None:
    assert place.map_text({"a": "b"}, "what").endswith("\na b\n")
    with pytest.raises(ValueError, match="white space"):
        place.map_text({"a b": "c"}, "what")


def test_the_shipped_maps_are_what_placement_writes_for_the_example_config(tmp_path: Path) -> None:
    """Run as its README says, on config.example.yaml and the three servers of haproxy.cfg."""
    result = subprocess.run([sys.executable, str(PLACEMENT_PY), "--config", str(REPO / "config.example.yaml"),
                             "--hosts", "gpu1", "gpu2", "gpu3", "--out", str(tmp_path)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    for name in (place.MODELS_MAP, place.HOMES_MAP):
        assert (tmp_path / name).read_text() == (REPO / "deploy" / "haproxy" / name).read_text()
    cfg = load_config(REPO / "config.example.yaml", env={})
    assert sorted(place.homes(place.expected_loads(cfg, {}), ["gpu1", "gpu2", "gpu3"]).values()) == [
        "gpu1", "gpu2", "gpu3"]


def test_the_script_says_what_is_wrong_and_exits_2() -> None:
    result = subprocess.run([sys.executable, str(PLACEMENT_PY), "--config", str(REPO / "config.example.yaml"),
                             "--hosts", "gpu1", "--load", "nope=3"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "no model or phase named nope" in result.stderr
