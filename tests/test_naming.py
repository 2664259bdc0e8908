"""The naming rule's pure parts: which name an answer echoes, which names listings show, and the Renamer
that puts the client's name in place of the upstream's in relayed bodies, however the bytes arrive."""

from __future__ import annotations

import json

import pytest

from warmpool.config import config_from_mapping
from warmpool.proxy.naming import Renamer, echo_name, listed_names, renamer_for

CFG = config_from_mapping({
    "backends": {"o": {"kind": "ollama", "url": "http://127.0.0.1:1"}},
    "models": {"coder": {"backend": "o", "upstream_name": "qwen2.5-coder:7b"},
               "llama3.2": {"backend": "o"},  # configured under its upstream name
               "planner": {"backend": "o", "upstream_name": "llama3.2"},  # shares it
               "qwen2.5-coder:7b-alias": {"backend": "o", "upstream_name": "coder"}},  # upstream = another's name
}, env={}, source="<test>")


def test_echo_is_the_name_sent_else_the_configured_one() -> None:
    coder = CFG.models["coder"]
    assert [echo_name(sent, coder) for sent in ("coder:latest", "qwen2.5-coder:7b", "", None, 5)] == [
        "coder:latest", "qwen2.5-coder:7b", "coder", "coder", "coder"]


def test_listings_show_each_usable_name_once_configured_names_first() -> None:
    names = dict(listed_names(CFG.models.values()))
    assert list(names) == ["coder", "llama3.2", "planner", "qwen2.5-coder:7b-alias", "qwen2.5-coder:7b"]
    assert names["coder"].name == "coder"  # a configured name is never another model's upstream alias


STREAM = b"".join(json.dumps({"model": "qwen2.5-coder:7b", "n": i}).encode() + b"\n" for i in range(3))


@pytest.mark.parametrize("size", [1, 2, 7, 13, len(STREAM)])
def test_a_stream_is_renamed_whatever_its_chunk_boundaries(size: int) -> None:
    renamer = Renamer("qwen2.5-coder:7b", "coder")
    out = b"".join(renamer.feed(STREAM[i:i + size]) for i in range(0, len(STREAM), size)) + renamer.finish()
    assert [json.loads(line)["model"] for line in out.splitlines()] == ["coder"] * 3


def test_only_model_values_equal_to_the_upstream_name_change() -> None:
    renamer = Renamer("gemma", "my \"pet\" model")
    body = b'{"model" : "gemma", "text": "gemma", "tools": [{"model":"gemma-2"}], "x": {"model":"gemma"}}'
    out = json.loads(renamer.whole(body))
    assert out == {"model": 'my "pet" model', "text": "gemma", "tools": [{"model": "gemma-2"}],
                   "x": {"model": 'my "pet" model'}}
    assert renamer.whole(b'{"error":"boom"}') == b'{"error":"boom"}'


def test_a_last_line_without_newline_comes_out_at_the_end() -> None:
    renamer = Renamer("a", "b")
    assert renamer.feed(b'{"model":"a"}') == b""
    assert renamer.finish() == b'{"model":"b"}'


def test_no_renamer_when_the_names_agree() -> None:
    assert renamer_for("coder", "coder") is None and renamer_for("x", "coder") is not None
