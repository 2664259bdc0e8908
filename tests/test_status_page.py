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
    assert shot.exists() and shot.stat().st_size > 10_000
