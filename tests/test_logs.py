"""Log lines: text or JSON, each carrying its request id."""

from __future__ import annotations

import json
import logging

import pytest

from warmpool import logs


def test_json_lines_carry_request_id_and_extra_fields(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("info", "json")
    logs.new_request_id("req-123")
    logging.getLogger("warmpool.access").info("POST /api/chat 200", extra={"model": "coder", "status": 200})
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["request_id"] == "req-123" and line["model"] == "coder" and line["status"] == 200
    assert line["level"] == "info" and line["logger"] == "warmpool.access" and line["ts"].endswith("Z")


def test_text_lines_and_unsafe_request_ids_are_replaced(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("info", "text")
    rid = logs.new_request_id("bad\nid")
    assert rid != "bad\nid" and len(rid) == 12
    logging.getLogger("warmpool.test").warning("hello")
    assert f"[{rid}] hello" in capsys.readouterr().err
