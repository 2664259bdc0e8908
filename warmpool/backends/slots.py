"""Saved server slots (llama-server's per-slot KV caches) that outlive the server process, so an agent's
context survives a swap: the directory warmpool owns for them (one subdirectory per model), kept within a
byte budget with the least recently used files going first, and the calls to llama-server's slot API that
write and read them.

llama-server started with `--slot-save-path DIR` saves slot N with `POST /slots/N?action=save
{"filename": NAME}` into DIR/NAME and loads it back with `action=restore` (tools/server/server-context.cpp);
the next request whose prompt starts with the restored tokens evaluates only the rest (`cache_prompt`, on by
default). File names are warmpool's own (`slot<N>.bin`); no client-sent name or path ever reaches this.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from warmpool.backends.control import read_json, send
from warmpool.config import ModelConfig
from warmpool.errors import BackendError

log = logging.getLogger("warmpool.backends.command")

_FILE = re.compile(r"slot(?P<id>\d+)\.bin")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True, slots=True)
class SlotFile:
    path: Path
    size: int
    used: float  # mtime: when it was last saved or restored


def over_budget(files: list[SlotFile], budget: int) -> list[SlotFile]:
    """The files to delete, least recently used first, so that the rest fit in `budget` bytes."""
    total = sum(f.size for f in files)
    doomed: list[SlotFile] = []
    for file in sorted(files, key=lambda f: f.used):
        if total <= budget:
            break
        doomed.append(file)
        total -= file.size
    return doomed


class ContextStore:
    """The directory of saved slots for one backend: `root`/<model>-<digest>/slot<N>.bin."""

    def __init__(self, root: Path, budget: int) -> None:
        self.root = root
        self.budget = budget

    def directory(self, model: ModelConfig) -> Path:
        """The model's own directory. Its name carries a digest of what the KV cache depends on (the
        command template and weight file), so a changed config never restores an incompatible cache."""
        part = model.command
        template = "\0".join([*(part.command if part else ()), str(model.gguf)])
        digest = hashlib.sha256(f"{model.name}\0{template}".encode()).hexdigest()[:12]
        return self.root / f"{_UNSAFE.sub('_', model.name)[:64]}-{digest}"

    def prepare(self, model: ModelConfig) -> Path:
        """Create the model's directory (the server refuses a --slot-save-path that does not exist)."""
        directory = self.directory(model)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        return directory

    def saved(self, model: ModelConfig) -> dict[int, Path]:
        """Slot id -> the saved file, for the model's slots saved before."""
        directory = self.directory(model)
        found: dict[int, Path] = {}
        for path in directory.glob("slot*.bin") if directory.is_dir() else ():
            match = _FILE.fullmatch(path.name)
            if match:
                found[int(match["id"])] = path
        return found

    def files(self) -> list[SlotFile]:
        found = []
        for path in self.root.glob("*/slot*.bin"):
            try:
                stat = path.stat()
            except OSError:
                continue
            found.append(SlotFile(path, stat.st_size, stat.st_mtime))
        return found

    def trim(self) -> list[Path]:
        """Delete the least recently used files until the store fits its budget; returns what went."""
        doomed = [file.path for file in over_budget(self.files(), self.budget)]
        for path in doomed:
            path.unlink(missing_ok=True)
        if doomed:
            log.info("saved slots over budget (%d bytes): removed %s", self.budget, ", ".join(map(str, doomed)))
        return doomed


def mark_used(path: Path) -> None:
    os.utime(path)


# The slot API -------------------------------------------------------------------------------------------

async def slot_ids(session: aiohttp.ClientSession, backend: str, url: str, timeout: float) -> list[int]:
    """The server's slot ids (GET /slots); [0] when it does not list them (--no-slots)."""
    try:
        slots = await read_json(await send(session, backend, "GET", url + "/slots", {}, None, timeout), backend)
    except BackendError:
        return [0]
    ids = [s["id"] for s in slots if isinstance(s, dict) and isinstance(s.get("id"), int)] \
        if isinstance(slots, list) else []
    return ids or [0]


async def _slot_action(session: aiohttp.ClientSession, backend: str, url: str, slot: int, action: str,
                       filename: str, timeout: float) -> dict[str, Any]:
    body = json.dumps({"filename": filename}).encode()
    response = await send(session, backend, "POST", f"{url}/slots/{slot}?action={action}",
                          {"Content-Type": "application/json"}, body, timeout)
    answer = await read_json(response, backend)
    return answer if isinstance(answer, dict) else {}


async def save_slots(session: aiohttp.ClientSession, backend: str, url: str, directory: Path,
                     timeout: float) -> int:
    """Save every slot of the server into `directory`; returns the tokens saved. Empty slots leave no file."""
    total = 0
    for slot in await slot_ids(session, backend, url, timeout):
        name = f"slot{slot}.bin"
        answer = await _slot_action(session, backend, url, slot, "save", name, timeout)
        saved = int(answer.get("n_saved") or 0)
        if saved == 0:
            (directory / name).unlink(missing_ok=True)  # nothing worth restoring
        total += saved
    return total


async def restore_slots(session: aiohttp.ClientSession, backend: str, url: str, files: dict[int, Path],
                        timeout: float) -> int:
    """Load the saved files back into the server's slots; returns the tokens restored. A file the server
    refuses (an incompatible cache) is deleted and the slot starts empty, as it would without one."""
    started = time.monotonic()
    total = 0
    slots = set(await slot_ids(session, backend, url, timeout)) if files else set()
    for slot, path in sorted(files.items()):
        if slot not in slots:
            continue
        try:
            answer = await _slot_action(session, backend, url, slot, "restore", path.name, timeout)
        except BackendError as exc:
            log.warning("%s: could not restore %s, starting slot %d empty: %s", backend, path, slot, exc.reason)
            path.unlink(missing_ok=True)
            continue
        mark_used(path)
        total += int(answer.get("n_restored") or 0)
    if total:
        log.info("%s: restored %d tokens into %d slots in %.3f s", backend, total, len(files),
                 time.monotonic() - started)
    return total
