"""The control plane's HTTP client: the calls warmpool makes on its own behalf (load, unload, /api/ps, health
probes) through one pooled aiohttp session per backend, with transport failures turned into BackendErrors."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

import aiohttp

from warmpool.config import Config
from warmpool.errors import BackendError, BackendTimeout

T = TypeVar("T")


def make_session(cfg: Config) -> aiohttp.ClientSession:
    """One pooled session per backend. No total timeout (streams may run for minutes); the read timeout
    bounds silence between chunks; no decompression so bytes pass through untouched."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.timeouts.connect, sock_read=cfg.timeouts.idle)
    connector = aiohttp.TCPConnector(limit=0, family=socket.AF_UNSPEC, ttl_dns_cache=300)
    # A reverse proxy passes redirects and cookies to its client; it never follows or keeps them itself
    # (one shared jar would leak one client's cookies to the next).
    return aiohttp.ClientSession(
        timeout=timeout, connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


async def send(
    session: aiohttp.ClientSession, backend: str, method: str, url: str, headers: Mapping[str, str],
    body: bytes | None, first_byte: float,
) -> aiohttp.ClientResponse:
    """Issue one upstream request, translating transport failures into BackendError with the reason."""
    try:
        return await within(first_byte, session.request(method, url, headers=headers, data=body,
                                                                   allow_redirects=False))
    except TimeoutError as exc:
        raise BackendTimeout(backend, f"no response within {first_byte:g} s ({method} {url})") from exc
    except aiohttp.ClientConnectorError as exc:
        raise BackendError(backend, f"cannot connect to {url}: {exc.os_error.strerror or exc}") from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError) as exc:
        raise BackendError(backend, f"connection dropped ({method} {url}): {exc}") from exc
    except aiohttp.ClientError as exc:
        raise BackendError(backend, f"{type(exc).__name__} ({method} {url}): {exc}") from exc


async def within(seconds: float, awaitable: Awaitable[T]) -> T:
    """`async with asyncio.timeout(seconds): return await awaitable` for the one await every proxied
    request makes: a bare timer instead of asyncio's Timeout state machine, at a third of its cost."""
    task = asyncio.current_task()
    assert task is not None
    cancelling = task.cancelling()
    fired = False

    def fire() -> None:
        nonlocal fired
        fired = True
        task.cancel()

    timer = asyncio.get_running_loop().call_later(seconds, fire)
    try:
        return await awaitable
    except asyncio.CancelledError:
        if fired and task.uncancel() <= cancelling:
            raise TimeoutError from None  # our own cancellation, not the caller's
        raise
    finally:
        timer.cancel()


async def read_json(resp: aiohttp.ClientResponse, backend: str) -> Any:
    """Read a whole JSON response; a non-2xx status or broken body becomes a BackendError."""
    try:
        async with resp:
            data = await resp.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise BackendError(backend, f"reading {resp.url.path} failed: {exc}") from exc
    if resp.status >= 300:
        raise BackendError(backend, f"{resp.url.path} answered {resp.status}: {data[:300].decode(errors='replace')}")
    try:
        return json.loads(data) if data else None
    except (ValueError, RecursionError) as exc:  # not JSON, or nested too deep to read
        raise BackendError(backend, f"{resp.url.path} sent invalid JSON: {exc}") from exc
