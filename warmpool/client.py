"""The CLI's side of the admin API: finding a running warmpool, calling it, and printing tables."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import httpx

from warmpool.config import discover_config_path, load_config

DEFAULT_URL = "http://127.0.0.1:11435"


class ClientError(Exception):
    """One clear line for the user; the CLI exits non-zero."""


def find_url(explicit: str | None, config: str | None, env: Mapping[str, str] = os.environ) -> str:
    """--url, then $WARMPOOL_URL, then the config's `listen`, then the default address."""
    if explicit or env.get("WARMPOOL_URL"):
        return (explicit or env["WARMPOOL_URL"]).rstrip("/")
    path = discover_config_path(config, env)
    if path is None:
        return DEFAULT_URL
    cfg = load_config(path, env=env)
    host = "127.0.0.1" if cfg.listen_host in ("0.0.0.0", "") else cfg.listen_host
    host = "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)
    return f"http://{host}:{cfg.listen_port}"


def call(method: str, url: str, admin_key: str | None, timeout: float = 660.0) -> Any:
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    try:
        response = httpx.request(method, url, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise ClientError(f"cannot reach warmpool at {url}: {exc}") from None
    data = _json_or_text(response)
    if response.status_code >= 400:
        message = data.get("error") if isinstance(data, dict) else data
        raise ClientError(f"{method} {url}: {response.status_code} {message}")
    return data


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text.strip()


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces."""
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def render_status(status: dict[str, Any]) -> str:
    parts = []
    for pool in status["pools"]:
        parts.append(_render_pool(pool))
    return "\n\n".join(parts)


def _render_pool(pool: dict[str, Any]) -> str:
    budget = f"max_resident {pool['max_resident']}" + (f", vram_budget {pool['vram_budget']}" if pool["vram_budget"] else "")
    head = f"pool {pool['pool']} ({pool['kind']}, {budget})"
    models = table(["MODEL", "STATUS", "IN FLIGHT", "QUEUED", "PINNED"], [
        [name, m["status"], m["inflight"], pool["queue"].get(name, 0), "yes" if m["pinned"] else ""]
        for name, m in pool["models"].items()
    ])
    swaps = table(["WHEN", "LOADED", "EVICTED", "REASON", "SOURCE", "SECONDS", "OK"], [
        [_clock(s["started_at"]), s["model"], ",".join(s["evicted"]) or None, s["reason"], s["source"],
         f"{s['seconds']:.3f}", "yes" if s["ok"] else f"no: {s['error']}"]
        for s in pool["swaps"][:10]
    ]) if pool["swaps"] else "no swaps yet"
    return f"{head}\n{models}\n\nrecent swaps:\n{swaps}"


def _clock(epoch: float) -> str:
    return datetime.fromtimestamp(epoch).strftime("%H:%M:%S")
