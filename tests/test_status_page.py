"""The live status page in a real headless Chromium: it loads, fetches the status API, and shows pools,
each model's tier and the recent swaps with their source tier. A screenshot is kept for people."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import running_warmpool
from tests.ollama_emulator import EmulatedModel, OllamaEmulator

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="chromium is not installed "
                       "(apt-get install chromium; under CI this test fails instead)"),
]
SCREENSHOT_DIR = Path(os.environ.get("WARMPOOL_ARTIFACTS", "/tmp/warmpool-artifacts"))


async def chromium(*args: str, profile: Path) -> bytes:
    assert CHROMIUM, "chromium is required"
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--window-size=1280,900", "--virtual-time-budget=5000", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    return out


async def test_status_page_shows_pools_tiers_and_swaps(tmp_path: Path) -> None:
    weights = tmp_path / "models"
    weights.mkdir()
    (weights / "alpha.gguf").write_bytes(os.urandom(4 << 20))
    emu = OllamaEmulator([EmulatedModel("alpha", size=100_000_000), EmulatedModel("beta", size=100_000_000)],
                         load_seconds_per_gb=0.5)
    await emu.start()
    cfg = {
        "backends": {"ol": {"kind": "ollama", "url": emu.url}},
        "models": {"alpha": {"backend": "ol"}, "beta": {"backend": "ol"}},
        "ram_tier": {"models_dirs": [str(weights)]},
    }
    try:
        async with running_warmpool(cfg) as url, aiohttp.ClientSession() as s:
            for model in ("alpha", "beta"):
                async with s.post(url + "/api/generate", json={"model": model, "prompt": "x", "stream": False}) as r:
                    assert r.status == 200
            async with s.get(url + "/warmpool/") as r:
                assert r.status == 200 and r.content_type == "text/html"
            dom = (await chromium("--dump-dom", url + "/warmpool/", profile=tmp_path / "p1")).decode()
            SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
            shot = SCREENSHOT_DIR / "status-page.png"
            await chromium(f"--screenshot={shot}", url + "/warmpool/", profile=tmp_path / "p2")
    finally:
        await emu.stop()
    assert 'data-loaded="true"' in dom, "the page never rendered data"
    assert 'data-pool="ol"' in dom and "resident: beta" in dom
    assert '<tr data-model="alpha"><td>alpha</td><td>ol</td><td><span class="pill warm">warm</span>' in dom
    assert '<span class="pill resident">resident</span>' in dom
    assert "demand" in dom and "alpha" in dom  # the swap table lists the swaps and their reasons
    assert '<td colspan="3" class="muted">no phases configured: clients name the model</td>' in dom
    assert shot.exists() and shot.stat().st_size > 10_000


async def test_status_page_shows_phases_backends_memory_and_a_swap_chart(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The operator's view: the phase map, each backend's health (one of them down), the RAM tier's budget
    and the host's memory, a link to /metrics, and a chart of the last swaps by source tier drawn by the
    page itself; /favicon.ico answers instead of a logged 404. The screenshot is kept for people."""
    from warmpool.ramtier import pagecache

    weights = tmp_path / "models"
    weights.mkdir()
    alpha = weights / "alpha.gguf"
    alpha.write_bytes(os.urandom(8 << 20))
    emu = OllamaEmulator([EmulatedModel("alpha", size=100_000_000), EmulatedModel("beta", size=100_000_000)],
                         load_seconds_per_gb=0.5)
    await emu.start()
    cfg = {
        "backends": {"ol": {"kind": "ollama", "url": emu.url}, "gone": {"kind": "openai", "url": "http://127.0.0.1:9"}},
        "models": {"alpha": {"backend": "ol"}, "beta": {"backend": "ol"}, "far": {"backend": "gone"}},
        "phases": {"context": "alpha", "execution": "beta"}, "default_phase": "context",
        "ram_tier": {"models_dirs": [str(weights)], "budget": "1MB"},  # too small to warm alpha back in
    }
    caplog.set_level("INFO", logger="warmpool.access")
    try:
        async with running_warmpool(cfg) as url, aiohttp.ClientSession() as s:
            for model in ("alpha", "beta", "alpha", "beta", "alpha"):  # swaps from RAM, unknown, then disk
                async with s.post(url + "/api/generate", json={"model": model, "prompt": "x", "stream": False}) as r:
                    assert r.status == 200
                if model == "beta":
                    pagecache.drop(alpha)  # alpha's next swap reads its weights from disk
            async with s.get(url + "/favicon.ico") as r:
                assert r.status == 200 and r.content_type == "image/svg+xml"
            async with s.get(url + "/warmpool/status") as r:
                status = await r.json()
            dom = (await chromium("--dump-dom", url + "/warmpool/", profile=tmp_path / "p1")).decode()
            SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
            shot = SCREENSHOT_DIR / "status-page-operator.png"
            await chromium(f"--screenshot={shot}", "--window-size=1280,1500", url + "/warmpool/",
                           profile=tmp_path / "p2")
    finally:
        await emu.stop()
    sources = [s["source"] for s in status["pools"][0]["swaps"]]
    assert {"ram", "disk", "unknown"} <= set(sources), sources
    assert 'data-loaded="true"' in dom, "the page never rendered data"
    assert '<tr data-phase="context"><td>context</td><td>alpha</td><td class="muted">default</td></tr>' in dom
    assert '<tr data-backend="ol">' in dom and '<span class="pill up">up</span>' in dom
    assert '<tr data-backend="gone">' in dom and '<span class="pill down">down</span>' in dom
    assert "Model weights kept warm" in dom and "Host memory in use" in dom
    assert 'href="../metrics"' in dom
    assert dom.count('data-source="ram"') >= 1 and dom.count('data-source="disk"') >= 1
    assert dom.count('data-source="unknown"') >= 2
    assert shot.exists() and shot.stat().st_size > 10_000
    assert not [r for r in caplog.records if "favicon" in r.getMessage()], "a request for the icon was logged"
