"""Command line: subcommands, flag > environment (WARMPOOL_*) > file > default precedence, exit codes.
No logic of its own: each command calls into the package."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import yaml

from warmpool import __version__
from warmpool.cli.admin_client import RENDER, ClientError, call, find_url, render_action, warm_with_progress
from warmpool.config import Config, config_warnings, discover_config_path, load_config, redacted
from warmpool.errors import ConfigError, ListenError

EXIT_CONFIG = 2
SERVE = ("run the proxy: serve the Ollama and OpenAI APIs, preload models, keep their weights warm in RAM; "
         "logs \"listening on URL\" when it accepts requests and \"ready\" once the preload is done")
CHECK_CONFIG = ("validate a config file and print it resolved (defaults filled in, secrets redacted), with a "
                "warning for what would behave badly; exit 0, or 2 with every problem and its key path")
BENCH = "run an experiment on a configured model and print a table"
PRESSURE = ("start a managed llama.cpp model with 0%, 50% and 100% of its GGUF evicted from the page cache; "
            "print load to first token, tokens/s, major faults, bytes read")
ADMIN_COMMANDS = {
    "status": "show pools, models, queues and recent swaps of a running warmpool",
    "models": "show every model's tiers: loaded, share of its weight files in RAM, use",
    "load": "load a model now (waits until it is resident)",
    "unload": "unload a model once its running requests end",
    "warm": "read a model's weight files into the page cache (RAM), with progress on a terminal",
    "evict": "drop a model's weight files that warmpool warmed from the page cache",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="warmpool", description="A warm-pool reverse proxy for local LLM servers.")
    parser.add_argument("--version", action="version", version=f"warmpool {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the proxy", description=SERVE)
    serve.add_argument("--config", help="config file (else $WARMPOOL_CONFIG, ./warmpool.yaml, "
                                        "~/.config/warmpool/config.yaml, else the embedded default)")
    serve.add_argument("--listen", help="HOST:PORT to listen on (default 127.0.0.1:11435)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", choices=["text", "json"])
    check = sub.add_parser("check-config", help="validate a config and print it resolved, secrets redacted",
                           description=CHECK_CONFIG)
    check.add_argument("path", nargs="?", help="config file (default: the same discovery as serve)")
    check.add_argument("--config", dest="config_flag", metavar="PATH", help="the config file, as serve takes it")
    bench = sub.add_parser("bench", help=BENCH, description=BENCH)
    experiments = bench.add_subparsers(dest="experiment", required=True)
    pressure = experiments.add_parser("pressure", help=PRESSURE.replace("%", "%%"),
                                      description=PRESSURE)
    pressure.add_argument("model", help="a configured model on a llamacpp backend")
    pressure.add_argument("--config", help="config file (else the same discovery as serve)")
    pressure.add_argument("--tokens", type=int, default=32, help="tokens generated for tokens/s (default 32)")
    pressure.add_argument("--fractions", type=fractions, default=(0.0, 0.5, 1.0),
                          help="shares of the file to evict, from its start (default 0,0.5,1; 50%% works too)")
    for name, text in ADMIN_COMMANDS.items():
        cmd = sub.add_parser(name, help=text, description=f"{text} (asks a running warmpool over its admin API)")
        if name not in ("status", "models"):
            cmd.add_argument("model")
        cmd.add_argument("--url", help="warmpool's address (else $WARMPOOL_URL, else the config's listen)")
        cmd.add_argument("--config", help="config file whose `listen` to use")
        cmd.add_argument("--admin-key", default=os.environ.get("WARMPOOL_ADMIN_KEY"),
                         help="admin key (else $WARMPOOL_ADMIN_KEY)")
        cmd.add_argument("--json", action="store_true", help="print the raw JSON answer")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check-config":
            return check_config(args.path, args.config_flag)
        if args.command == "bench":
            return bench_pressure(args)
        if args.command in ADMIN_COMMANDS:
            return admin_command(args)
        return serve(args)
    except (ConfigError, ListenError) as error:
        print(f"warmpool: {error.message}", file=sys.stderr)
        return EXIT_CONFIG
    except ClientError as error:
        print(f"warmpool: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def resolve_config(explicit: str | None, overrides: dict[str, Any] | None = None) -> Config:
    return load_config(discover_config_path(explicit), overrides=overrides or {})


def check_config(path: str | None, flag: str | None = None) -> int:
    if path and flag and path != flag:
        raise ConfigError([f"two config files given ({path} and --config {flag}): name one"])
    cfg = resolve_config(path or flag)
    print(f"# {cfg.source}: valid")
    print(yaml.safe_dump(redacted(cfg), sort_keys=False), end="")
    for warning in config_warnings(cfg):
        print(f"warmpool: warning: {warning}", file=sys.stderr)
    return 0


def admin_command(args: argparse.Namespace) -> int:
    base = find_url(args.url, args.config)
    if args.command in ("status", "models"):
        data = call("GET", f"{base}/warmpool/{args.command}", args.admin_key)
        print(json.dumps(data, indent=2) if args.json else RENDER[args.command](data))
        return 0
    url = f"{base}/warmpool/models/{quote(args.model, safe='')}/{args.command}"
    if args.command == "warm" and not args.json:
        print(warm_with_progress(url, args.admin_key, sys.stdout.isatty()))
        return 0
    data = call("POST", url, args.admin_key)
    print(json.dumps(data, indent=2) if args.json else render_action(args.command, data))
    return 0


def fractions(text: str) -> tuple[float, ...]:
    from warmpool.cli.bench_pressure import (
        parse_fractions,  # lazily: it imports aiohttp and the llama.cpp backend
    )

    return parse_fractions(text)


def bench_pressure(args: argparse.Namespace) -> int:
    import asyncio

    from warmpool.cli.bench_pressure import PressureSetupError, render, run_pressure, select_model

    cfg = resolve_config(args.config)
    try:
        model, backend = select_model(cfg, args.model)
    except PressureSetupError as error:
        print(f"warmpool: {error}", file=sys.stderr)
        return EXIT_CONFIG
    rows = asyncio.run(run_pressure(model, backend, fractions=args.fractions, tokens=args.tokens))
    print(render(rows))
    return 0


def serve(args: argparse.Namespace) -> int:
    overrides = {key: value for key, value in (
        ("listen", args.listen), ("log.level", args.log_level), ("log.format", args.log_format)
    ) if value is not None}
    cfg = resolve_config(args.config, overrides)
    from warmpool import app, logs

    logs.configure(cfg.log.level, cfg.log.format)
    for warning in config_warnings(cfg):
        logging.getLogger("warmpool.config").warning("%s", warning)
    app.run(cfg)
    return 0
