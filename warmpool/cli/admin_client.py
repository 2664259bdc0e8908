"""The CLI's side of the admin API: finding a running warmpool, calling it, and printing tables."""

from __future__ import annotations

import json
import os
import sys
import time
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
        given = (explicit or env["WARMPOOL_URL"]).strip().rstrip("/")
        return given if "://" in given else f"http://{given}"  # "127.0.0.1:11435" means plain HTTP
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
        raise ClientError(_error_line(method, url, response.status_code, data))
    return data


def _error_line(method: str, url: str, status: int, data: Any) -> str:
    """An error answer as one line: its message alone when it has one ("model 'x' not found")."""
    message = data.get("error") if isinstance(data, dict) else data
    if isinstance(message, dict):  # the OpenAI shape
        message = message.get("message")
    if isinstance(message, str) and message:
        return message.splitlines()[0]
    return f"{method} {url}: HTTP {status}"


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
    parts = [_render_pool(pool) for pool in status["pools"]]
    if "backends" in status:
        parts.append("backends:\n" + table(["BACKEND", "KIND", "URL", "HEALTH"], [
            [b["name"], b["kind"], b["url"] or "managed", "up" if b["healthy"] else "DOWN"]
            for b in status["backends"]]))
    if status.get("phases"):
        default = status.get("default_phase")
        parts.append("phases:\n" + table(["PHASE", "MODEL", ""], [
            [phase, model, "default" if phase == default else ""] for phase, model in status["phases"].items()]))
    if (ram := status.get("ram_tier") or {}).get("enabled"):
        parts.append(_render_ram(ram))
    return "\n\n".join(parts)


def _render_ram(ram: dict[str, Any]) -> str:
    memory = ram.get("memory") or {}
    return (f"RAM tier ({ram.get('strategy')}): weights warm {_size(ram.get('tracked_resident_bytes'))} of a "
            f"{_size(ram.get('budget_bytes'))} budget; host memory available {_size(memory.get('available'))} "
            f"of {_size(memory.get('total'))} (reserve {_size(ram.get('reserve_bytes'))})")


def _render_pool(pool: dict[str, Any]) -> str:
    budget = f"max_resident {pool['max_resident']}"
    if pool["vram_budget"]:
        budget += f", vram_budget {pool['vram_budget']}"
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


def render_models(data: dict[str, Any]) -> str:
    rows = [[m["name"], m["backend"], m["status"], m.get("tier") or "-", _size(m.get("size")),
             _percent(m.get("percent_in_ram")), m.get("use_count", 0), _ago(m.get("last_used")),
             m.get("reason") or ""] for m in data["models"]]
    return table(["MODEL", "BACKEND", "STATUS", "TIER", "SIZE", "IN RAM", "USES", "LAST USED", "NOTE"], rows)


def render_action(command: str, data: dict[str, Any]) -> str:
    if command == "load":
        return f"{data['model']}: resident ({data['seconds']:.3f} s)"
    if command == "unload":
        return f"{data['model']}: unloaded" if data["was_loaded"] else f"{data['model']}: was not loaded"
    line = f"{data['model']}: dropped {_size(data['bytes_dropped'])}, {_percent(data['percent_in_ram'])} in RAM"
    return f"{line} (kept: {data['kept']})" if data.get("kept") else line


def warm_with_progress(url: str, admin_key: str | None, show_bar: bool) -> str:
    """POST .../warm?progress=1 and draw a bar from its NDJSON lines; returns the closing summary."""
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    try:
        with httpx.stream("POST", url + "?progress=1", headers=headers, timeout=None) as response:
            if response.status_code >= 400:
                response.read()
                raise ClientError(_error_line("POST", url, response.status_code, _json_or_text(response)))
            last = _follow_progress(response.iter_lines(), show_bar)
    except httpx.HTTPError as exc:
        raise ClientError(f"cannot reach warmpool at {url}: {exc}") from None
    if "error" in last:
        raise ClientError(str(last["error"]))
    held = f" (held: {last['held']})" if last.get("held") else ""
    return f"{last['model']}: warmed {_size(last['bytes_warmed'])}, {_percent(last['percent_in_ram'])} in RAM{held}"


def _follow_progress(lines: Any, show_bar: bool) -> dict[str, Any]:
    last: dict[str, Any] = {}
    for line in lines:
        if not line.strip():
            continue
        last = json.loads(line)
        if show_bar and "bytes" in last and last.get("total"):
            done = min(1.0, last["bytes"] / last["total"])
            sys.stdout.write(f"\r[{'#' * int(done * 30):<30}] {done:6.1%} {_size(last['bytes'])}")
            sys.stdout.flush()
    if show_bar:
        sys.stdout.write("\r" + " " * 60 + "\r")
    return last


def _size(value: Any) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def _percent(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}%"


def _ago(epoch: Any) -> str:
    if not epoch:
        return "never"
    seconds = max(0, int(time.time() - epoch))
    if seconds < 120:
        return f"{seconds}s ago"
    return f"{seconds // 60}m ago" if seconds < 7200 else f"{seconds // 3600}h ago"


RENDER = {"status": render_status, "models": render_models}
