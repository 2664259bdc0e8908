"""Where each model lives when several warmpool hosts sit behind HAProxy: the two maps that
deploy/haproxy/haproxy.cfg reads, written from warmpool's configuration and the list of hosts.

- warmpool-models.map: every name a client may use for a model (each phase naming it, its name and its
  upstream name, with and without Ollama's ':latest') -> the model. Every name of one model then has one
  hash key and one home.
- warmpool-homes.map: each model -> its home host (the HAProxy server name). The models are spread so
  that the hosts' expected loads come out as even as they can: heaviest model first, each onto the host
  with the least expected load so far (then the fewest models, then the first listed). With no loads
  given, every model counts the same and they go round the hosts in the configuration's order.

Why explicit homes: consistent hashing places a handful of models by chance (with three models on three
hosts, all three on different hosts only 2 times in 9), and two busy models sharing a host that holds one
at a time swap all day while another host idles. Homes put one model on each host while there are hosts
to spare; hashing still decides for names the map does not list, and for a model whose home is down.

Expected loads (`--load NAME=N`, NAME a model, alias or phase; a phase's load counts for its model) are
relative: requests per hour, or the counts of warmpool's `warmpool_requests_total` on the hosts. Models
given no load are placed as idle ones, after the others.

    python deploy/haproxy/placement.py --config /etc/warmpool/config.yaml --hosts gpu1 gpu2 gpu3 \
        [--load execution=40 --load context=30 ...] [--out /etc/haproxy]

Run it with the warmpool installation's interpreter (it reads the configuration with warmpool's loader).
Without --out it prints both maps.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from warmpool.config import Config, load_config
from warmpool.errors import ConfigError
from warmpool.proxy.routing import model_aliases

MODELS_MAP = "warmpool-models.map"
HOMES_MAP = "warmpool-homes.map"


def client_names(cfg: Config) -> dict[str, str]:
    """Every name a client may send (X-Warmpool-Phase or the body's model) -> the model serving it. A name
    that is both a phase and a model's alias maps as warmpool reads it in a body: the alias wins."""
    names = dict(cfg.phases)
    names.update(model_aliases(cfg))
    return names


def expected_loads(cfg: Config, given: Mapping[str, float]) -> dict[str, float]:
    """Each configured model's expected load, in the configuration's order: the loads given for it and for
    the names (phases, aliases) that reach it, added up; with nothing given, 1 each."""
    if not given:
        return dict.fromkeys(cfg.models, 1.0)
    names = client_names(cfg)
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"no model or phase named {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    loads = dict.fromkeys(cfg.models, 0.0)
    for name, load in given.items():
        if load < 0:
            raise ValueError(f"the load of {name} is negative ({load:g})")
        loads[names[name]] += load
    return loads


def homes(loads: Mapping[str, float], hosts: Sequence[str]) -> dict[str, str]:
    """Each model -> its home host: heaviest first (ties in the given order), each onto the host with the
    least expected load so far, then the fewest models, then the first listed."""
    if not hosts:
        raise ValueError("no hosts to place models on")
    if len(set(hosts)) != len(hosts):
        raise ValueError(f"a host is listed twice: {', '.join(hosts)}")
    load_on = dict.fromkeys(hosts, 0.0)
    models_on = dict.fromkeys(hosts, 0)
    placed: dict[str, str] = {}
    for model in sorted(loads, key=lambda m: -loads[m]):  # sorted() is stable: equal loads keep their order
        host = min(hosts, key=lambda h: (load_on[h], models_on[h]))  # min() keeps the first of equals
        placed[model] = host
        load_on[host] += loads[model]
        models_on[host] += 1
    return {model: placed[model] for model in loads}


def map_text(entries: Mapping[str, str], what: str) -> str:
    """An HAProxy map file: a comment saying what it is, then one "key value" line per entry."""
    for key, value in entries.items():
        if not key or not value or any(c.isspace() for c in key + value):
            raise ValueError(f"an HAProxy map cannot hold {key!r} -> {value!r} (empty, or with white space)")
    lines = [f"# {what}", "# Written by deploy/haproxy/placement.py; rerun it when the models or hosts change."]
    return "\n".join([*lines, *(f"{key} {value}" for key, value in entries.items())]) + "\n"


def maps(cfg: Config, hosts: Sequence[str], given: Mapping[str, float]) -> dict[str, str]:
    """Both maps' file names -> their text."""
    loads = expected_loads(cfg, given)
    placed = homes(loads, hosts)
    shares = ", ".join(f"{m} {loads[m]:g}" for m in loads)
    return {MODELS_MAP: map_text(client_names(cfg), "client name (phase, model, upstream name) -> model"),
            HOMES_MAP: map_text(placed, f"model -> home host (HAProxy server name); expected loads: {shares}")}


def parse_load(text: str) -> tuple[str, float]:
    name, sep, value = text.rpartition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=LOAD, got {text!r}")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the load in {text!r} is not a number") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write HAProxy's model and home maps for warmpool hosts.")
    parser.add_argument("--config", required=True, help="the warmpool configuration every host runs")
    parser.add_argument("--hosts", nargs="+", required=True, help="HAProxy server names, as in haproxy.cfg")
    parser.add_argument("--load", type=parse_load, action="append", default=[], metavar="NAME=LOAD",
                        help="expected load of a model or phase (repeatable)")
    parser.add_argument("--out", type=Path, help="folder to write the maps to (default: print them)")
    args = parser.parse_args(argv)
    given: dict[str, float] = {}
    for name, load in args.load:
        given[name] = given.get(name, 0.0) + load
    try:
        written = maps(load_config(args.config), args.hosts, given)
    except (ValueError, ConfigError) as exc:
        print(f"placement: {exc}", file=sys.stderr)
        return 2
    for name, text in written.items():
        if args.out is None:
            print(f"## {name}\n{text}")
        else:
            (args.out / name).write_text(text)
            print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
