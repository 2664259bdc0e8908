"""A client's keep_alive, as Ollama takes it (upstream_spec.md §1.6): parsed by Ollama's rules (Go durations
need a unit; a JSON number is seconds; negative is forever), refused with Ollama's own 400 when invalid,
and honoured as the model's idle expiry while warmpool keeps sending its own keep_alive upstream, so
Ollama never unloads a model behind warmpool's back. Spoken to with the official `ollama` client, in front
of the Ollama emulator.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import ollama
import pytest

from tests.conftest import eventually, running_warmpool
from tests.ollama_emulator import EmulatedModel, OllamaEmulator, parse_keep_alive
from warmpool.errors import BadRequest
from warmpool.proxy.keepalive import FOREVER, parse_go_duration

# -- parsing: Ollama's api.Duration.UnmarshalJSON over Go's time.ParseDuration ----------------------------

VALID = [
    (300, 300.0), (0.5, 0.5), (0, 0.0), (-1, FOREVER), (-0.5, FOREVER),
    ("5m", 300.0), ("1h30m", 5400.0), ("0", 0.0), ("-0", 0.0), ("+10s", 10.0), ("-1m", FOREVER), ("-1s", FOREVER),
    ("1.5h", 5400.0), (".5s", 0.5), ("5.s", 5.0), ("100ms", 0.1), ("10us", 1e-5), ("10µs", 1e-5), ("10μs", 1e-5),
    ("1h2m3s4ms5us6ns", 3723.004005006), (None, None),
]
INVALID = [  # value -> Ollama's message (Go's error text)
    ("300", 'time: missing unit in duration "300"'),
    ("-1", 'time: missing unit in duration "-1"'),
    ("5", 'time: missing unit in duration "5"'),
    ("1h30", 'time: missing unit in duration "1h30"'),
    ("abc", 'time: invalid duration "abc"'),
    ("", 'time: invalid duration ""'),
    ("-", 'time: invalid duration "-"'),
    (".s", 'time: invalid duration ".s"'),
    ("5M", 'time: unknown unit "M" in duration "5M"'),
    ("5 m", 'time: unknown unit " m" in duration "5 m"'),
    ("1e3s", 'time: unknown unit "e" in duration "1e3s"'),
    ("9223372036854775808ns", 'time: invalid duration "9223372036854775808ns"'),
    ('1"x', 'time: unknown unit "\\"x" in duration "1\\"x"'),
    ("é5s", 'time: invalid duration "\\xc3\\xa95s"'),
    (True, "Unsupported type: 'bool'"),
    ([1], "Unsupported type: '[]interface {}'"),
    ({"m": 5}, "Unsupported type: 'map[string]interface {}'"),
]


@pytest.mark.parametrize(("value", "seconds"), VALID, ids=[repr(v) for v, _ in VALID])
def test_valid_keep_alive_values(value: Any, seconds: float | None) -> None:
    from warmpool.proxy.keepalive import parse_keep_alive as warmpool_parse

    parsed = warmpool_parse(value)
    assert parsed == pytest.approx(seconds) if seconds is not None and math.isfinite(seconds) else parsed == seconds


@pytest.mark.parametrize(("value", "message"), INVALID, ids=[repr(v) for v, _ in INVALID])
def test_invalid_keep_alive_values_get_go_s_message(value: Any, message: str) -> None:
    from warmpool.proxy.keepalive import parse_keep_alive as warmpool_parse

    with pytest.raises(BadRequest) as caught:
        warmpool_parse(value)
    assert caught.value.message == message


def test_go_duration_edges() -> None:
    assert parse_go_duration("9223372036854775807ns") == 2**63 - 1
    assert parse_go_duration("-9223372036854775808ns") == -(2**63)
    assert parse_go_duration("1.0000000000000000000001h") == 3_600_000_000_000  # digits past int64 dropped


@pytest.mark.parametrize("value", [v for v, _ in VALID[:-1]] + ["1h", "2562047h"])
def test_the_emulator_reads_valid_values_the_same(value: Any) -> None:
    """The emulator (the only stand-in) agrees with warmpool, so the end-to-end tests below mean something."""
    from warmpool.proxy.keepalive import parse_keep_alive as warmpool_parse

    assert parse_keep_alive({"keep_alive": value}) == pytest.approx(warmpool_parse(value))


# -- end to end -------------------------------------------------------------------------------------

CODER, PLANNER = "coder", "planner"
UPSTREAM = {CODER: "qwen2.5-coder:7b", PLANNER: "llama3.2:3b"}
LEASE = 600.0  # what warmpool asks Ollama to keep a model without a configured keep_alive


@pytest.fixture
async def emu() -> AsyncIterator[OllamaEmulator]:
    emulator = OllamaEmulator([EmulatedModel(UPSTREAM[CODER], size=200_000_000),
                               EmulatedModel(UPSTREAM[PLANNER], size=200_000_000)], load_seconds_per_gb=0.2)
    await emulator.start()
    yield emulator
    await emulator.stop()


def config(emu: OllamaEmulator, **coder: Any) -> dict[str, Any]:
    return {"backends": {"gpu": {"kind": "ollama", "url": emu.url, "max_resident": 1}},
            "models": {CODER: {"backend": "gpu", "upstream_name": UPSTREAM[CODER], **coder},
                       PLANNER: {"backend": "gpu", "upstream_name": UPSTREAM[PLANNER]}}}


@pytest.mark.parametrize(("value", "message"), INVALID[:6], ids=[repr(v) for v, _ in INVALID[:6]])
async def test_invalid_keep_alive_is_ollama_s_400(emu: OllamaEmulator, value: Any, message: str) -> None:
    async with running_warmpool(config(emu)) as url:
        client = ollama.AsyncClient(host=url)
        for call in (lambda: client.generate(CODER, "hi", keep_alive=value),
                     lambda: client.chat(CODER, [{"role": "user", "content": "hi"}], keep_alive=value),
                     lambda: client.embed(CODER, "hi", keep_alive=value)):
            with pytest.raises(ollama.ResponseError) as caught:
                await call()
            assert (caught.value.status_code, caught.value.error) == (400, message)
        # Ollama itself answers the same, word for word
        direct = ollama.AsyncClient(host=emu.url)
        with pytest.raises(ollama.ResponseError) as upstream:
            await direct.generate(UPSTREAM[CODER], "hi", keep_alive=value)
        assert (upstream.value.status_code, upstream.value.error) == (400, message)
    assert emu.count("load_start") == 0  # nothing was loaded for a refused request


@pytest.mark.parametrize(("value", "message"), INVALID[-3:], ids=[repr(v) for v, _ in INVALID[-3:]])
async def test_keep_alive_of_another_json_type_is_ollama_s_400(emu: OllamaEmulator, value: Any, message: str) -> None:
    # (the ollama client checks the type itself, so these go out as raw JSON)
    async with running_warmpool(config(emu)) as url, aiohttp.ClientSession() as http:
        for base, model in ((url, CODER), (emu.url, UPSTREAM[CODER])):
            async with http.post(base + "/api/chat", json={"model": model, "messages": [], "keep_alive": value}) as r:
                assert (r.status, await r.json()) == (400, {"error": message})


def expires_in(listed: ollama.ProcessResponse, name: str) -> float:
    entry = next(m for m in listed.models if m.model == f"{name}:latest")
    assert entry.expires_at is not None
    return (entry.expires_at - datetime.now(UTC)).total_seconds()


async def test_client_keep_alive_becomes_the_expiry_in_api_ps(emu: OllamaEmulator) -> None:
    async with running_warmpool(config(emu)) as url:
        client = ollama.AsyncClient(host=url)
        await client.generate(CODER, "hi")
        default = expires_in(await client.ps(), CODER)
        await client.generate(CODER, "hi", keep_alive=-1)
        forever = expires_in(await client.ps(), CODER)
        await client.generate(CODER, "hi")  # no keep_alive: the expiry stays (Ollama since v0.1.49)
        still = expires_in(await client.ps(), CODER)
        await client.generate(CODER, "hi", keep_alive="10m")
        ten_minutes = expires_in(await client.ps(), CODER)
    assert default > 20 * 365 * 86400  # no keep_alive anywhere: kept while in budget (Ollama's "Forever")
    assert forever > 20 * 365 * 86400 and still > 20 * 365 * 86400
    assert 590 < ten_minutes <= 600
    sent = [e["body"]["keep_alive"] for e in emu.events if e["event"] == "request" and e["path"] == "/api/generate"]
    assert set(sent) == {LEASE}  # warmpool's own keep_alive went upstream every time


async def test_keep_alive_zero_unloads_after_the_request(emu: OllamaEmulator) -> None:
    async with running_warmpool(config(emu)) as url:
        client = ollama.AsyncClient(host=url)
        reply = await client.generate(CODER, "hi", keep_alive=0)
        assert reply.done and reply.response
        await eventually(lambda: emu.loaded() == {}, timeout=10)
        assert (await client.ps()).models == []
        await client.generate(CODER, "hi")  # loaded again: a load starts from the model's own keep_alive
        await asyncio.sleep(1.0)
        assert [m.model for m in (await client.ps()).models] == ["coder:latest"]


async def test_a_pin_wins_over_keep_alive_zero(emu: OllamaEmulator) -> None:
    async with running_warmpool(config(emu, pin=True)) as url:
        client = ollama.AsyncClient(host=url)
        await client.generate(CODER, "hi", keep_alive=0)
        await asyncio.sleep(1.0)
        assert [m.model for m in (await client.ps()).models] == ["coder:latest"]
        assert expires_in(await client.ps(), CODER) > 20 * 365 * 86400


async def test_keep_alive_forever_still_gives_way_on_demand(emu: OllamaEmulator) -> None:
    async with running_warmpool(config(emu)) as url:
        client = ollama.AsyncClient(host=url)
        await client.generate(CODER, "hi", keep_alive=-1)
        await client.generate(PLANNER, "hi")  # one slot: the scheduler evicts the coder for it
        assert [m.model for m in (await client.ps()).models] == ["planner:latest"]


async def test_ollama_never_unloads_a_model_the_client_asked_to_keep(emu: OllamaEmulator) -> None:
    """The coder's own keep_alive (4 s) is what warmpool sends upstream; the client asks for forever, so
    warmpool re-arms Ollama's lease (polling /api/ps every 2 s) before it runs out instead of letting
    Ollama drop the model."""
    async with running_warmpool(config(emu, keep_alive="4s")) as url:
        client = ollama.AsyncClient(host=url)
        await client.generate(CODER, "hi", keep_alive=-1)
        started = time.monotonic()
        while time.monotonic() - started < 9:
            assert normalized(UPSTREAM[CODER]) in emu.loaded(), "Ollama dropped the model"
            await asyncio.sleep(0.1)
        assert emu.count("unload") == 0
        rearms = [e for e in emu.events if e["event"] == "request" and e["path"] == "/api/generate"
                  and not e["body"].get("prompt")]
        assert len(rearms) >= 2 and all(e["body"]["keep_alive"] == 4.0 for e in rearms)


def normalized(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


async def test_a_client_keep_alive_longer_than_the_lease_still_ends(emu: OllamaEmulator) -> None:
    """The coder's lease upstream is 3 s, the client asks for 7 s: warmpool re-arms Ollama past 3 s, and
    then unloads the model itself once it idled 7 s (re-arming is not a use: it does not restart the
    idle time)."""
    async with running_warmpool(config(emu, keep_alive="3s")) as url:
        client = ollama.AsyncClient(host=url)
        await client.generate(CODER, "hi", keep_alive="7s")
        done = time.monotonic()
        await asyncio.sleep(4.5)
        assert normalized(UPSTREAM[CODER]) in emu.loaded()  # past Ollama's 3 s lease: re-armed
        await eventually(lambda: emu.loaded() == {}, timeout=15)
        idle = time.monotonic() - done
        assert 6.5 < idle < 12, idle
        assert [e["reason"] for e in emu.events if e["event"] == "unload"] == ["unload request"]  # warmpool's
