"""The upstream body made from the client's bytes: unchanged, or with only the model renamed; anything
else re-serialised. Whatever path is taken, the upstream parses exactly the intended body."""

from __future__ import annotations

import json
import random

import pytest

from warmpool.proxy.rawbody import upstream_body, with_model


def renamed(client: dict, new: str = "qwen2.5-coder:7b") -> dict:
    return {**client, "model": new}


def test_an_unchanged_body_is_passed_on_as_the_same_bytes() -> None:
    raw = b'{"model": "coder", "messages": []}'
    body = json.loads(raw)
    assert upstream_body(dict(body), body, raw) is raw


def test_a_renamed_model_changes_only_its_value() -> None:
    raw = (b'{ "stream" : true,\n  "model"  :  "coder",\t"messages": [{"role": "user", '
           b'"content": "caf\\u00e9 \\"model\\": \\"x\\""}], "options": {"num_ctx": 8192}}')
    client = json.loads(raw)
    sent = upstream_body(renamed(client), client, raw)
    assert sent == raw.replace(b'"coder"', b'"qwen2.5-coder:7b"')  # spacing and escapes untouched
    assert json.loads(sent) == renamed(client)


@pytest.mark.parametrize("raw", [
    # a second "model" key deeper down (a tool's parameter schema)
    b'{"model": "coder", "tools": [{"type": "function", "function": {"name": "f", "parameters": '
    b'{"type": "object", "properties": {"model": {"type": "string"}}}}}]}',
    # the value spelled with an escape json.dumps would not use
    b'{"model": "c\\u006fder", "prompt": "hi"}',
    # a duplicated key (json.loads keeps the last)
    b'{"model": "planner", "model": "coder", "prompt": "hi"}',
    # UTF-8 with a BOM, and UTF-16: json.loads takes them, an upstream may not
    b'\xef\xbb\xbf{"model": "coder", "prompt": "hi"}',
    '{"model": "coder", "prompt": "hi"}'.encode("utf-16-le"),
])
def test_what_cannot_be_renamed_on_the_bytes_is_re_serialised(raw: bytes) -> None:
    client = json.loads(raw)
    sent = upstream_body(renamed(client), client, raw)
    assert sent == json.dumps(renamed(client)).encode()


def test_other_changes_are_re_serialised() -> None:
    raw = b'{"model": "coder", "prompt": "hi", "keep_alive": "5m"}'
    client = json.loads(raw)
    body = {**renamed(client), "keep_alive": -1}
    assert json.loads(upstream_body(body, client, raw)) == body
    no_model = json.loads(b'{"prompt": "hi"}')  # the model came from the default phase
    assert json.loads(upstream_body(renamed(no_model), no_model, b'{"prompt": "hi"}')) == renamed(no_model)


def test_with_model_refuses_rather_than_guesses() -> None:
    assert with_model(b'{"model": "a"}', "b", "c") is None  # not the value it should replace
    assert with_model(b'{"prompt": "x"}', "a", "c") is None


def test_random_bodies_always_reach_the_upstream_as_intended() -> None:
    rng = random.Random(3)
    words = ["model", '"model"', "\\", '"', "é", "\n", "coder", ":", "{", "}"]

    def text() -> str:
        return "".join(rng.choice(words) for _ in range(rng.randint(0, 6)))

    for _ in range(500):
        client: dict = {"model": rng.choice(["coder", "plan\\ner", 'qu"ote', "é"])}
        for _ in range(rng.randint(0, 4)):
            client[text() or "k"] = rng.choice([text(), {"model": text()}, [text(), 1], None, True])
        raw = json.dumps(client, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1])).encode()
        parsed = json.loads(raw)
        body = renamed(parsed, rng.choice(["qwen", 'x"y', "ü"]))
        assert json.loads(upstream_body(body, parsed, raw)) == body
