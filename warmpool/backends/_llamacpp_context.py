"""Context that survives a swap: saved prompt/KV state of llama.cpp conversations, kept as files within a
byte budget, restored when a prompt shares a saved token prefix.

Two parts, both run inside the slot workers (this module needs only the standard library; llama_cpp is
reached through the `Llama` object it is given):

- `ContextStore`: a directory of states (normally on a RAM-backed file system), optionally spilling to a
  second one on disk. One file per state: a header with the exact tokens the state holds, then the bytes
  of llama.cpp's per-sequence state (`llama_state_seq_get_data`). Files are named by a fingerprint of
  everything that shapes the KV cache (the GGUF file, context settings, llama-cpp-python's version), so a
  model finds its states again on any worker. Every write happens under an exclusive `flock` on the
  directory, after evicting the least recently used files until the new one fits: the bytes in a
  directory never exceed its budget, whichever worker writes. Readers take no lock (a file evicted
  while being read stays readable through the open descriptor).
- `ContextKeeper`: attached to one loaded `Llama`. Before each generation it compares the prompt with
  the tokens the live KV cache holds and with the saved states; when a saved state shares a longer
  prefix it restores it (`llama_state_seq_set_data`, then tells the `Llama` which tokens are evaluated,
  so llama-cpp-python's own prefix matching reuses them); when the prompt is about to overwrite a live
  conversation it saves that first. `save()` is called when the model is freed. It keeps every reuse
  bit-exact: an answer after a restore is the answer with the prefix recomputed (see the class).

`Llama.save_state`/`load_state` are not used: they copy the n_batch x n_vocab logits array (537 MB for a
262k vocabulary), where the per-sequence calls move only the KV cells (about 10 MB per 1,000 tokens on
the demo model, in milliseconds).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import inspect
import json
import math
import os
import shutil
import struct
import threading
import time
from array import array
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

MAGIC = b"WPKV1\n"
HEADER = struct.Struct("<6sI")  # magic, number of tokens; then the tokens (int32), then the state
SUFFIX = ".kv"
LOCK_NAME = ".lock"
SEQ = 0  # llama-cpp-python keeps its one conversation in sequence 0
GRANULE = 32  # evaluations start at multiples of this (see ContextKeeper)

# Model settings that do not change what a KV cache holds: a state saved under one value restores under
# another. Everything else (the file, n_ctx, cache types, rope and LoRA settings, GPU layers...) is part
# of the fingerprint.
NOT_IN_FINGERPRINT = frozenset({
    "model_alias", "chat_format", "chat_template_kwargs", "verbose", "n_threads", "n_threads_batch",
    "use_mmap", "use_mlock", "cache", "cache_type", "cache_size", "last_n_tokens_size", "draft_model",
    "draft_model_num_pred_tokens", "hf_tokenizer_config_path", "hf_pretrained_model_name_or_path",
    "host", "port", "interrupt_requests", "api_key", "disable_ping_events", "root_path", "ssl_keyfile",
    "ssl_certfile",
})


@dataclass(frozen=True, slots=True)
class Tier:
    """One directory of saved states and the bytes it may hold."""

    path: str
    budget: int


@dataclass(frozen=True, slots=True)
class ContextSettings:
    """What a worker needs to keep context: the tiers (RAM first, then an optional spill directory) and the
    shortest conversation worth saving."""

    tiers: tuple[Tier, ...]
    min_tokens: int = 64

    def to_json(self) -> dict[str, Any]:
        return {"tiers": [asdict(t) for t in self.tiers], "min_tokens": self.min_tokens}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ContextSettings:
        return cls(tuple(Tier(**t) for t in data["tiers"]), int(data["min_tokens"]))


@dataclass(frozen=True, slots=True)
class Entry:
    """One saved state."""

    path: str
    tokens: tuple[int, ...]
    size: int  # bytes of the file
    used: float  # mtime: when it was saved or last restored


@dataclass(slots=True)
class PutResult:
    saved: bool
    size: int = 0
    evicted: int = 0  # states dropped from the RAM tier to make room (spilled ones included)
    spilled: int = 0  # of those, moved to the spill tier
    reason: str = ""


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def fingerprint(settings: dict[str, Any], version: str) -> str:
    """What a state is valid for: the model's KV-shaping settings, the GGUF file's identity and the
    engine's version (its state format may change)."""
    relevant = {k: v for k, v in sorted(settings.items()) if k not in NOT_IN_FINGERPRINT}
    path = str(settings.get("model", ""))
    try:
        stat = os.stat(path)
        identity = [os.path.realpath(path), stat.st_size, stat.st_mtime_ns]
    except OSError:
        identity = [path]
    blob = json.dumps([relevant, identity, version], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class ContextStore:
    """Saved states in budgeted directories (see the module docstring)."""

    def __init__(self, tiers: Sequence[Tier]) -> None:
        self.tiers = list(tiers)
        for tier in self.tiers:
            os.makedirs(tier.path, mode=0o700, exist_ok=True)

    # -- reading -----------------------------------------------------------------------------------

    def entries(self, fp: str | None = None) -> list[Entry]:
        """Every saved state (of fingerprint `fp`, if given), in every tier."""
        found = []
        for tier in self.tiers:
            for name in _names(tier.path):
                if fp is None or name.startswith(fp + "-"):
                    entry = _read_entry(os.path.join(tier.path, name))
                    if entry is not None:
                        found.append(entry)
        return found

    def best(self, fp: str, tokens: Sequence[int]) -> tuple[Entry, int] | None:
        """The saved state sharing the longest prefix with `tokens` (the most recent among equals)."""
        best: tuple[Entry, int] | None = None
        for entry in self.entries(fp):
            shared = common_prefix(entry.tokens, tokens)
            if shared and (best is None or (shared, entry.used) > (best[1], best[0].used)):
                best = (entry, shared)
        return best

    def read(self, entry: Entry) -> bytearray | None:
        """The state bytes of `entry` (None if it was evicted meanwhile); marks it used."""
        try:
            with open(entry.path, "rb") as file:
                file.seek(HEADER.size + 4 * len(entry.tokens))
                data = bytearray(file.read())
            os.utime(entry.path)  # LRU: a restore counts as a use
        except FileNotFoundError:
            return None
        return data

    def usage(self) -> list[tuple[Tier, int, int]]:
        """(tier, bytes kept, states kept) per tier."""
        result = []
        for tier in self.tiers:
            sizes = [_size(os.path.join(tier.path, n)) for n in _names(tier.path)]
            result.append((tier, sum(sizes), len(sizes)))
        return result

    # -- writing -----------------------------------------------------------------------------------

    def put(self, fp: str, tokens: Sequence[int], state: memoryview | bytes) -> PutResult:
        """Save `state` (holding exactly `tokens`) in the RAM tier, within its budget."""
        ram = self.tiers[0]
        header = HEADER.pack(MAGIC, len(tokens)) + array("i", tokens).tobytes()
        size = len(header) + len(state)
        if size > ram.budget:
            return PutResult(False, size, reason="larger than the budget")
        with _locked(ram.path):
            known = self.entries(fp)
            if any(common_prefix(e.tokens, tokens) == len(tokens) for e in known):
                return PutResult(False, size, reason="already kept")  # a saved state extends this one
            for covered in known:  # states whose tokens this one extends are no longer needed
                if common_prefix(covered.tokens, tokens) == len(covered.tokens):
                    _unlink(covered.path)
            result = self._make_room(ram, size)
            _write(os.path.join(ram.path, f"{fp}-{_digest(tokens)}{SUFFIX}"), header, state)
        result.saved, result.size = True, size
        return result

    def _make_room(self, ram: Tier, size: int) -> PutResult:
        """Evict least recently used states from the RAM tier (under its lock) until `size` bytes fit;
        evicted states move to the spill tier when there is one."""
        result = PutResult(False)
        for name in _names(ram.path, suffix=".tmp"):  # a writer that died mid-write: nobody writes now
            _unlink(os.path.join(ram.path, name))
        kept = sorted(self.entries_in(ram), key=lambda e: e.used)
        used = sum(e.size for e in kept)
        while kept and used + size > ram.budget:
            victim = kept.pop(0)
            used -= victim.size
            result.evicted += 1
            result.spilled += self._spill(victim)
        return result

    def entries_in(self, tier: Tier) -> list[Entry]:
        found = (_read_entry(os.path.join(tier.path, n)) for n in _names(tier.path))
        return [e for e in found if e is not None]

    def _spill(self, entry: Entry) -> int:
        """Move `entry` to the spill tier (LRU within its budget); 1 if it went there, else 0."""
        spill = self.tiers[1] if len(self.tiers) > 1 else None
        moved = 0
        if spill is not None and entry.size <= spill.budget:
            with _locked(spill.path):
                kept = sorted(self.entries_in(spill), key=lambda e: e.used)
                used = sum(e.size for e in kept)
                while kept and used + entry.size > spill.budget:
                    victim = kept.pop(0)
                    used -= victim.size
                    _unlink(victim.path)
                target = os.path.join(spill.path, os.path.basename(entry.path))
                with contextlib.suppress(FileNotFoundError):
                    shutil.copyfile(entry.path, target + ".tmp")
                    os.utime(target + ".tmp", (entry.used, entry.used))
                    os.replace(target + ".tmp", target)
                    moved = 1
        _unlink(entry.path)
        return moved


# -- the keeper: one loaded Llama -----------------------------------------------------------------------

Report = Callable[..., None]


class ContextKeeper:
    """Saves and restores one `Llama`'s conversation state through a `ContextStore`, so that an answer
    never depends on whether its prefix was restored, kept live or computed from scratch.

    llama.cpp's CPU kernels process a batch's rows in small groups, and a row computed in a group can
    differ in its last bits from the same row computed alone or in a remainder: a KV cell is only what a
    from-scratch evaluation would compute if it was computed with the same row alignment. So every
    evaluation here starts at a multiple of `granule` (32, a multiple of every group size; n_batch and
    n_ubatch are multiples of it too), only the cells of a prompt up to its last whole granule count as
    exact (generated tokens, evaluated one at a time, never do), and only exact cells are saved, restored
    or reused. At temperature 0 a restored answer is then the recomputed answer, token for token; the
    price is re-evaluating up to `granule` - 1 prompt tokens more than llama-cpp-python's own prefix reuse.
    """

    def __init__(self, llama: Any, store: ContextStore, fp: str, min_tokens: int, report: Report) -> None:
        self.llama = llama
        self.store = store
        self.fp = fp
        self.min_tokens = max(1, min_tokens)
        self.report = report
        self.granule = granule_for(llama.n_batch, llama.context_params.n_ubatch)
        self.exact = 0  # leading live tokens whose cells a from-scratch evaluation would compute alike
        self.saved_upto = 0  # leading live tokens the store holds already
        self.prompt_logits_wanted = False  # the running completion echoes its prompt with logprobs
        self._lock = threading.Lock()

    def install(self) -> None:
        """Run `before_generate` ahead of every generation of the `Llama`, and note what each completion
        asks for (instance attributes, so llama-cpp-python's own code, its chat handlers included, calls
        them in place of the class's methods)."""
        generate, create_completion = self.llama.generate, self.llama.create_completion
        # The parameters as `create_completion` names them (`_create_completion` has the same ones, and,
        # unlike the public method, no wrapper around it)
        parameters = inspect.signature(self.llama._create_completion)

        def generating(tokens: Sequence[int], *args: Any, **kwargs: Any) -> Generator[int, Any, None]:
            self.before_generate(list(tokens))
            yield from generate(tokens, *args, **kwargs)

        def completing(*args: Any, **kwargs: Any) -> Any:
            asked = parameters.bind_partial(*args, **kwargs).arguments
            # Echoed prompt logprobs are read from the prompt's rows of Llama.scores, which a restore
            # does not fill: such a completion computes its prompt (the server runs one at a time).
            self.prompt_logits_wanted = bool(asked.get("echo")) and asked.get("logprobs") is not None
            return create_completion(*args, **kwargs)

        self.llama.generate, self.llama.create_completion = generating, completing

    def aligned(self, n: int) -> int:
        return max(n, 0) - max(n, 0) % self.granule

    def live_exact(self) -> list[int]:
        """The live tokens whose cells are exact."""
        count = self.aligned(min(self.exact, self.llama.n_tokens))
        return [int(t) for t in self.llama.input_ids[:count]]

    def before_generate(self, prompt: list[int]) -> None:
        """Leave the live state at the longest exact, aligned prefix of `prompt` it can have: the live one,
        or a saved one when that is at least min_tokens longer (saving a live conversation the prompt
        is about to overwrite first). llama-cpp-python's `generate` then evaluates the rest."""
        with self._lock:
            live = self.live_exact()
            keep = self.aligned(min(common_prefix(live, prompt), len(prompt) - 1))
            wanted = len(prompt) > self.min_tokens and not self.prompt_logits_wanted
            found = self.store.best(self.fp, prompt) if wanted else None
            take = self.aligned(min(found[1], len(prompt) - 1)) if found else 0
            if found is not None and take - keep >= self.min_tokens:
                self._save(live)  # the restore replaces all of it
                keep = self._restore(found[0], take, keep)
            else:
                if len(live) - keep >= self.min_tokens:
                    self._save(live)  # the prompt overwrites what follows `keep`
                if keep < self.min_tokens and len(prompt) > self.min_tokens:
                    self.report("context", miss=1)
            self._truncate(keep)
            self.exact = self.aligned(len(prompt))  # once generate has evaluated the prompt

    def save(self) -> None:
        """Keep the live conversation (the model is about to be freed)."""
        with self._lock:
            self._save(self.live_exact())

    def _save(self, live: list[int]) -> None:
        """Save the exact part of the live state, if it is long enough and not saved already."""
        if len(live) < self.min_tokens or len(live) <= self.saved_upto:
            return
        import llama_cpp

        started = time.perf_counter()
        self._truncate(len(live))  # the cells after the exact ones are never reused
        ctx = self.llama.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, SEQ)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(ctx, buffer, size, SEQ)
        result = self.store.put(self.fp, live, memoryview(buffer)[:written])
        self.saved_upto = len(live)
        self.report("context", saved=int(result.saved), bytes=result.size if result.saved else 0,
                    tokens=len(live), evicted=result.evicted, spilled=result.spilled,
                    seconds=time.perf_counter() - started, why=result.reason)

    def _restore(self, entry: Entry, take: int, keep: int) -> int:
        """Load `entry` and keep its first `take` tokens; returns the tokens now live (0 on failure)."""
        import llama_cpp

        started = time.perf_counter()
        data = self.store.read(entry)
        ok = 0
        if data is not None:
            buffer = (ctypes.c_uint8 * len(data)).from_buffer(data)
            ok = llama_cpp.llama_state_seq_set_data(self.llama.ctx, buffer, len(data), SEQ)
        if not ok or data is None:  # evicted meanwhile, or refused: what is in the cache now is not trusted
            self.llama.n_tokens = len(entry.tokens)
            self._truncate(0)
            self.report("context", miss=1, failed=int(data is not None))
            return 0
        self.llama.input_ids[: len(entry.tokens)] = entry.tokens
        self.llama.n_tokens = len(entry.tokens)
        self.exact = self.saved_upto = take
        self.report("context", restored=1, reused=take - keep, bytes=len(data),
                    seconds=time.perf_counter() - started)
        return take

    def _truncate(self, count: int) -> None:
        """Drop the live cells from `count` on; the next evaluation starts there."""
        if count < self.llama.n_tokens or count == 0:
            self.llama._ctx.kv_cache_seq_rm(SEQ, count, -1)
            self.llama.n_tokens = count
            self.llama._requires_eval = True  # the logits are not from a decode of the last live token
        self.exact = min(self.exact, count)
        self.saved_upto = min(self.saved_upto, count)


def granule_for(n_batch: int, n_ubatch: int) -> int:
    """The alignment of evaluations: 32 (a multiple of the CPU kernels' row groups) where the batch
    sizes allow it, else their greatest common divisor."""
    return GRANULE if n_batch % GRANULE == 0 and n_ubatch % GRANULE == 0 else math.gcd(n_batch, n_ubatch)


# -- files ----------------------------------------------------------------------------------------------

def _names(path: str, suffix: str = SUFFIX) -> list[str]:
    try:
        return [n for n in os.listdir(path) if n.endswith(suffix)]
    except FileNotFoundError:
        return []


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _read_entry(path: str) -> Entry | None:
    try:
        with open(path, "rb") as file:
            magic, count = HEADER.unpack(file.read(HEADER.size))
            if magic != MAGIC:
                return None
            tokens = array("i")
            tokens.frombytes(file.read(4 * count))
            stat = os.fstat(file.fileno())
    except (FileNotFoundError, struct.error, ValueError):
        return None
    return Entry(path, tuple(tokens), stat.st_size, stat.st_mtime)


def _digest(tokens: Sequence[int]) -> str:
    return hashlib.sha1(array("i", tokens).tobytes()).hexdigest()[:16]


def _write(path: str, header: bytes, state: memoryview | bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as file:
        file.write(header)
        file.write(state)
    os.replace(tmp, path)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
