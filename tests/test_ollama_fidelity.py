"""Faithful to Ollama, in front of the Ollama emulator, through the official `ollama` and `openai` clients:

- what a model can do is learned from Ollama (/api/show `capabilities`, at start and before its first
  load) or, where Ollama does not say, from the request that causes the load: an embedding model works
  without `embedding: true` in the config, and a generate or chat sent to it gets Ollama's own 400;
- one naming rule: every answer (and every chunk of a stream, loading feedback included) carries the name
  the client sent; /api/tags and /v1/models list every name a client may use;
- /api/ps passes the Ollama server's own facts through (details, digest, size_vram).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import ollama
import openai
import pytest

from tests.conftest import running_warmpool
from tests.ollama_emulator import EmulatedModel, OllamaEmulator

EMBEDDER, CODER = "embedder", "coder"
UPSTREAM = {EMBEDDER: "nomic-embed-text", CODER: "qwen2.5-coder:7b"}
USER = [{"role": "user", "content": "hi"}]
Start = Callable[..., Awaitable[tuple[OllamaEmulator, str]]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """`emu, url = await start(version=..., gpu=..., **config)`: an emulator and warmpool in front of it with
    the two models (neither marked `embedding: true`), stopped at teardown."""
    stops: list[Callable[[], Awaitable[None]]] = []
    contexts: list[Any] = []

    async def make(*, version: str = "0.32.15", gpu: bool = False, load_seconds_per_gb: float = 0.5,
                   **top: Any) -> tuple[OllamaEmulator, str]:
        emu = OllamaEmulator([EmulatedModel(UPSTREAM[EMBEDDER], size=100_000_000, embedding=True,
                                            family="nomic-bert", parameter_size="137M", quantization_level="F16"),
                              EmulatedModel(UPSTREAM[CODER], size=300_000_000, family="qwen2")],
                             version=version, gpu=gpu, load_seconds_per_gb=load_seconds_per_gb)
        await emu.start()
        stops.append(emu.stop)
        cfg = {"backends": {"gpu": {"kind": "ollama", "url": emu.url, "max_resident": 1}},
               "models": {name: {"backend": "gpu", "upstream_name": up} for name, up in UPSTREAM.items()}, **top}
        context = running_warmpool(cfg)
        contexts.append(context)
        return emu, await context.__aenter__()

    yield make
    for context in reversed(contexts):
        await context.__aexit__(None, None, None)
    for stop in reversed(stops):
        await stop()


def loads(emu: OllamaEmulator) -> list[tuple[str, str]]:
    """(path, model) of every load request warmpool sent (empty generate or embed)."""
    return [(e["path"], e["model"]) for e in emu.events if e["event"] == "request"
            and e["path"] in ("/api/generate", "/api/embed")
            and not (e["body"].get("prompt") or e["body"].get("input"))]


# -- 1. embedding models without configuration -------------------------------------------------------------

@pytest.mark.parametrize("version", ["0.32.15", "0.6.2"], ids=["capabilities-from-show", "older-ollama"])
async def test_an_unconfigured_embedding_model_embeds(start: Start, version: str) -> None:
    """0.32.15 says what the model is in /api/show; 0.6.2 does not (capabilities came with 0.6.4), and
    then the embedding request that causes the load decides how it is loaded."""
    emu, url = await start(version=version)
    vectors = await ollama.AsyncClient(host=url).embed(EMBEDDER, ["a", "b"])
    assert len(vectors.embeddings) == 2
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0) as client:
        done = await client.embeddings.create(model=EMBEDDER, input="a")
    assert len(done.data[0].embedding) == 8
    assert loads(emu) == [("/api/embed", "nomic-embed-text:latest")]


async def test_generate_and_chat_to_an_embedding_model_get_ollama_s_400(start: Start) -> None:
    emu, url = await start()
    client = ollama.AsyncClient(host=url)
    for call, verb in ((lambda: client.generate(EMBEDDER, "hi"), "generate"),
                       (lambda: client.chat(EMBEDDER, USER), "chat"),
                       (lambda: client.generate(EMBEDDER), "generate")):  # a load request too
        with pytest.raises(ollama.ResponseError) as caught:
            await call()
        assert (caught.value.status_code, caught.value.error) == (400, f'"{EMBEDDER}" does not support {verb}')
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0) as ai:
        with pytest.raises(openai.BadRequestError) as refused:
            await ai.chat.completions.create(model=EMBEDDER, messages=USER)  # type: ignore[arg-type]
    assert refused.value.status_code == 400 and '"embedder" does not support chat' in str(refused.value)
    assert loads(emu) == []  # like Ollama, refused before anything is loaded
    # Ollama answers the same, by the name it was sent
    with pytest.raises(ollama.ResponseError) as direct:
        await ollama.AsyncClient(host=emu.url).generate(UPSTREAM[EMBEDDER], "hi")
    assert direct.value.error == '"nomic-embed-text" does not support generate'


async def test_older_ollama_learns_the_capability_from_its_refusal(start: Start) -> None:
    """Without `capabilities` and with a generate request causing the load: Ollama refuses to load the
    model through /api/generate; warmpool loads it through /api/embed and answers the generate with
    Ollama's 400, not a 502."""
    _, url = await start(version="0.6.2")
    with pytest.raises(ollama.ResponseError) as caught:
        await ollama.AsyncClient(host=url).generate(EMBEDDER, "hi")
    assert (caught.value.status_code, caught.value.error) == (400, '"embedder" does not support generate')
    assert (await ollama.AsyncClient(host=url).embed(EMBEDDER, "a")).embeddings


# -- 3. one naming rule ------------------------------------------------------------------------------------

async def test_native_answers_echo_the_name_sent(start: Start) -> None:
    _, url = await start()
    client = ollama.AsyncClient(host=url)
    for name in (CODER, "coder:latest", UPSTREAM[CODER]):
        assert (await client.generate(name, "hi")).model == name
        assert (await client.chat(name, USER)).model == name
        assert {part.model async for part in await client.chat(name, USER, stream=True)} == {name}
        assert {part.model async for part in await client.generate(name, "hi", stream=True)} == {name}
    assert (await client.embed(UPSTREAM[EMBEDDER], "a")).model == UPSTREAM[EMBEDDER]
    assert (await client.embed(EMBEDDER, "a")).model == EMBEDDER


@pytest.mark.parametrize("options", [False, True], ids=["relayed", "translated-for-load-options"])
async def test_openai_answers_echo_the_name_sent(start: Start, options: bool) -> None:
    """Without load-time options /v1 is relayed to Ollama's /v1; with them it goes through the native API
    (so the options travel along) and is translated: the same name comes back either way."""
    extra = {"models": {CODER: {"backend": "gpu", "upstream_name": UPSTREAM[CODER], "options": {"num_ctx": 4096}},
                        EMBEDDER: {"backend": "gpu", "upstream_name": UPSTREAM[EMBEDDER]}}} if options else {}
    _, url = await start(**extra)
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0) as client:
        for name in (CODER, UPSTREAM[CODER]):
            done = await client.chat.completions.create(model=name, messages=USER)  # type: ignore[arg-type]
            assert done.model == name
            stream = await client.chat.completions.create(model=name, messages=USER, stream=True)  # type: ignore[arg-type]
            assert {chunk.model async for chunk in stream} == {name}
            assert (await client.completions.create(model=name, prompt="hi")).model == name
        assert (await client.embeddings.create(model=EMBEDDER, input="a")).model == EMBEDDER


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
async def test_loading_feedback_streams_carry_the_name_sent_throughout(start: Start, path: str) -> None:
    _, url = await start(loading_feedback=True, load_seconds_per_gb=8.0)  # the coder loads for 2.4 s
    body = {"model": "coder:latest", "stream": True, "messages": USER}
    async with aiohttp.ClientSession() as http, http.post(url + path, json=body) as r:
        assert r.status == 200
        lines = [line.strip() async for line in r.content if line.strip()]
    if path == "/api/chat":
        chunks = [json.loads(line) for line in lines]
        assert any("warmpool" in c for c in chunks), "no loading feedback: the model was not loading"
    else:
        assert any(line.startswith(b": warmpool loading") for line in lines)
        chunks = [json.loads(line[6:]) for line in lines if line.startswith(b"data: {")]
    assert {c["model"] for c in chunks} == {"coder:latest"}


async def test_listings_show_every_name_a_client_may_use(start: Start) -> None:
    _, url = await start()
    tags = {m.model for m in (await ollama.AsyncClient(host=url).list()).models}
    assert tags == {"coder:latest", "embedder:latest", "qwen2.5-coder:7b", "nomic-embed-text:latest"}
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0) as client:
        ids = {m.id async for m in client.models.list()}
        assert ids == {CODER, EMBEDDER, UPSTREAM[CODER], UPSTREAM[EMBEDDER]}
        for name in ids:  # every listed name works
            assert (await client.models.retrieve(name)).id == name
    for name in tags - {"embedder:latest", "nomic-embed-text:latest"}:
        assert (await ollama.AsyncClient(host=url).generate(name, "hi")).done


# -- 4. /api/ps passes Ollama's facts through ---------------------------------------------------------------

@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
async def test_ps_passes_upstream_details_digest_and_size_vram_through(start: Start, gpu: bool) -> None:
    emu, url = await start(gpu=gpu)
    await ollama.AsyncClient(host=url).embed(EMBEDDER, "a")
    ours = (await ollama.AsyncClient(host=url).ps()).models
    theirs = (await ollama.AsyncClient(host=emu.url).ps()).models
    assert [m.model for m in ours] == ["embedder:latest"] and len(theirs) == 1
    mine, upstream = ours[0], theirs[0]
    assert mine.digest == upstream.digest and mine.details == upstream.details
    assert mine.details.family == "nomic-bert" and mine.details.quantization_level == "F16"
    assert (mine.size, mine.size_vram, mine.context_length) == (upstream.size, upstream.size_vram,
                                                               upstream.context_length)
    assert mine.size_vram == (100_000_000 if gpu else 0)
