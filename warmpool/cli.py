"""Command line: subcommands, flag > environment (WARMPOOL_*) > file > default precedence, exit codes.
No logic of its own: each command calls into the package."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import yaml

from warmpool import __version__
from warmpool.config import Config, discover_config_path, load_config, redacted
from warmpool.client import ClientError, call, find_url, render_status
from warmpool.errors import ConfigError

EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="warmpool", description="A warm-pool reverse proxy for local LLM servers.")
    parser.add_argument("--version", action="version", version=f"warmpool {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="config file (else $WARMPOOL_CONFIG, ./warmpool.yaml, "
                                        "~/.config/warmpool/config.yaml, else the embedded default)")
    serve.add_argument("--listen", help="HOST:PORT to listen on (default 127.0.0.1:11435)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", choices=["text", "json"])
    check = sub.add_parser("check-config", help="validate a config and print it resolved, secrets redacted")
    check.add_argument("path", nargs="?", help="config file (default: the same discovery as serve)")
    for name, text in (("status", "show pools, models, queues and recent swaps of a running warmpool"),
                       ("load", "load a model now (waits until it is resident)"),
                       ("unload", "unload a model once its running requests end")):
        cmd = sub.add_parser(name, help=text)
        if name != "status":
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
            return check_config(args.path)
        if args.command in ("status", "load", "unload"):
            return admin_command(args)
        return serve(args)
    except ConfigError as error:
        print(f"warmpool: {error.message}", file=sys.stderr)
        return EXIT_CONFIG
    except ClientError as error:
        print(f"warmpool: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def resolve_config(explicit: str | None, overrides: dict[str, Any] | None = None) -> Config:
    return load_config(discover_config_path(explicit), overrides=overrides or {})


def check_config(path: str | None) -> int:
    cfg = resolve_config(path)
    print(f"# {cfg.source}: valid")
    print(yaml.safe_dump(redacted(cfg), sort_keys=False), end="")
    return 0


def admin_command(args: argparse.Namespace) -> int:
    base = find_url(args.url, args.config)
    if args.command == "status":
        data = call("GET", f"{base}/warmpool/status", args.admin_key)
        print(json.dumps(data, indent=2) if args.json else render_status(data))
        return 0
    data = call("POST", f"{base}/warmpool/models/{quote(args.model, safe='')}/{args.command}", args.admin_key)
    if args.json:
        print(json.dumps(data, indent=2))
    elif args.command == "load":
        print(f"{data['model']}: resident ({data['seconds']:.3f} s)")
    else:
        print(f"{data['model']}: unloaded" if data["was_loaded"] else f"{data['model']}: was not loaded")
    return 0


def serve(args: argparse.Namespace) -> int:
    overrides = {key: value for key, value in (
        ("listen", args.listen), ("log.level", args.log_level), ("log.format", args.log_format)
    ) if value is not None}
    cfg = resolve_config(args.config, overrides)
    from warmpool import app, logs

    logs.configure(cfg.log.level, cfg.log.format)
    app.run(cfg)
    return 0
