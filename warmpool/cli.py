"""Command line: subcommands, flag > environment (WARMPOOL_*) > file > default precedence, exit codes.
No logic of its own: each command calls into the package."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from warmpool import __version__
from warmpool.config import Config, discover_config_path, load_config, redacted
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check-config":
            return check_config(args.path)
        return serve(args)
    except ConfigError as error:
        print(f"warmpool: {error.message}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


def resolve_config(explicit: str | None, overrides: dict[str, Any] | None = None) -> Config:
    return load_config(discover_config_path(explicit), overrides=overrides or {})


def check_config(path: str | None) -> int:
    cfg = resolve_config(path)
    print(f"# {cfg.source}: valid")
    print(yaml.safe_dump(redacted(cfg), sort_keys=False), end="")
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


__all__ = ["main", "Path"]
