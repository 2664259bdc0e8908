"""Validation: the schema of every section, and the checker that reports every problem at once with its key
path (naming the environment variable or flag that set a value), then builds the Config."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import MISSING, fields
from typing import Any

from warmpool.config.model import (
    AuthConfig,
    BackendConfig,
    BalancerConfig,
    CommandModel,
    Config,
    LlamaCppModel,
    LogConfig,
    MemoryAmount,
    ModelConfig,
    OllamaModel,
    RamTierConfig,
    SchedulerConfig,
    TimeoutsConfig,
)
from warmpool.config.placeholders import used
from warmpool.config.values import (
    _INVALID,
    Parser,
    _argv,
    _bool,
    _choice,
    _environment,
    _file_path,
    _fraction,
    _http_path,
    _int,
    _keep_alive,
    _listen,
    _mapping,
    _name_list,
    _nonzero,
    _nullable,
    _path,
    _path_list,
    _port,
    _scalar_mapping,
    _secret,
    _secret_list,
    _show,
    _str,
    _timeout,
    _url,
    parse_duration,
    parse_size,
)

# Validation ----------------------------------------------------------------------------------------

def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _did_you_mean(name: object, known: Any, *, list_known: bool = False, cutoff: float = 0.6) -> str:
    choices = [str(key) for key in known]
    close = difflib.get_close_matches(str(name), choices, n=1, cutoff=cutoff)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (known: {', '.join(sorted(choices))})" if list_known and choices else ""


def _is_name(name: object) -> bool:
    """Backend, model and phase names: any non-empty string without whitespace ("library/qwen2.5:7b")."""
    return isinstance(name, str) and bool(name) and not any(char.isspace() for char in name)


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith((outer + ".", outer + "["))


def _lacks(raw: Any, key: str) -> bool:
    return raw is None or (isinstance(raw, Mapping) and key not in raw)


class _Checker:
    """Collects every problem as "key.path: what is wrong", naming the variable or flag that set a value."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.labels: dict[str, str] = {}  # key path → how to name it: "listen (from WARMPOOL_LISTEN)"
        self.settled: set[str] = set()  # paths whose value is known to be broken (an unset ${VAR})

    def fail(self, path: str, message: str, *, settle: bool = False) -> None:
        """Report a problem, unless it only echoes one already reported at or below `path`."""
        if settle or not any(_within(done, path) for done in self.settled):
            self.problems.append(f"{self.labels.get(path, path)}: {message}")
        if settle:
            self.settled.add(path)

    def mapping(self, raw: Any, path: str) -> Mapping[Any, Any]:
        if raw is None:  # `log:` with nothing under it
            return {}
        if isinstance(raw, Mapping):
            return raw
        self.fail(path, f"expected a mapping, got {_show(raw)}")
        return {}

    def named(self, raw: Any, path: str) -> dict[str, Any]:
        entries = self.mapping(raw, path)
        for name in entries:
            if not _is_name(name):
                self.fail(path, f"invalid name {_show(name)}: names are non-empty strings without whitespace")
        return {name: value for name, value in entries.items() if _is_name(name)}

    def section(self, raw: Any, path: str, spec: Mapping[str, Parser],
                extra: tuple[str, ...] = ()) -> dict[str, Any]:
        """The keys of `raw` that `spec` knows, parsed; unknown keys and bad values are reported."""
        entries = self.mapping(raw, path)
        known = [*spec, *extra]
        for key in entries:
            if key not in known:
                self.fail(_join(path, key), "unknown key" + _did_you_mean(key, known))
        parsed = {key: self.parse(_join(path, key), entries[key], parse) for key, parse in spec.items()
                  if key in entries}
        return {key: value for key, value in parsed.items() if value is not _INVALID}

    def parse(self, path: str, value: Any, parser: Parser) -> Any:
        try:
            return parser(value)
        except ValueError as exc:
            self.fail(path, str(exc))
            return _INVALID

    def known(self, path: str, what: str, name: str, known: Mapping[str, Any]) -> bool:
        if name in known:
            return True
        self.fail(path, f"unknown {what} {name!r}" + _did_you_mean(name, known, list_known=True))
        return False


# The schema ----------------------------------------------------------------------------------------

_KINDS = ("ollama", "llamacpp", "command", "openai")
_LLAMACPP = ("llamacpp",)
_MANAGED = ("llamacpp", "command")  # kinds whose server processes warmpool starts and stops

_PRIORITY = _choice("interactive", "batch")


def _priority_map(value: Any) -> dict[str, str]:
    """`scheduler.priorities`: phase name -> interactive | batch."""
    return {phase: _PRIORITY(priority) for phase, priority in _mapping(value).items()}


_TOP: dict[str, Parser] = {
    "listen": _listen, "max_body_size": _nonzero(parse_size),
    "default_phase": _nullable(_str), "preload": _name_list, "loading_feedback": _bool,
}
_SECTIONS: dict[str, tuple[type, dict[str, Parser]]] = {
    "log": (LogConfig, {"level": _choice("debug", "info", "warning", "error"),
                        "format": _choice("text", "json")}),
    "timeouts": (TimeoutsConfig, {f.name: _timeout for f in fields(TimeoutsConfig)}),
    "auth": (AuthConfig, {"api_keys": _secret_list, "admin_keys": _secret_list}),
    "ram_tier": (RamTierConfig, {
        "enabled": _bool, "budget": MemoryAmount.parse, "reserve": MemoryAmount.parse,
        "strategy": _choice("read", "madvise", "mlock"), "interval": _timeout, "rate": parse_size,
        "min_warm_fraction": _fraction, "state_file": _nullable(_path), "top_n": _int(0),
        "ollama_models": _nullable(_path), "models_dirs": _path_list, "hf_cache": _nullable(_path)}),
    "balancer": (BalancerConfig, {"agent_port": _nullable(_port), "agent_host": _str,
                                  "drain_delay": _nullable(parse_duration)}),
    "scheduler": (SchedulerConfig, {
        "max_queue": _int(1), "queue_timeout": _timeout, "max_wait": parse_duration,
        "min_residency": parse_duration, "load_ahead": _bool, "prefetch": _bool,
        "prefetch_threshold": _fraction, "interactive_max_wait": parse_duration,
        "default_priority": _PRIORITY, "priorities": _priority_map}),
}
_NESTED = (*_SECTIONS, "backends", "models", "phases")

_BACKEND: dict[str, Parser] = {
    "kind": _choice(*_KINDS), "url": _url, "api_key": _nullable(_secret), "max_resident": _int(1),
    "vram_budget": _nullable(_nonzero(parse_size)), "python": _nullable(_path), "start_timeout": _timeout,
    "stop_grace": parse_duration, "idle_default": _nullable(_str),
    "idle_after": _nullable(_timeout), "context_budget": parse_size, "context_dir": _nullable(_file_path),
    "context_spill_dir": _nullable(_path), "context_spill_budget": parse_size, "context_min_tokens": _int(1),
}
# Keys that only some backend kinds take, and keys that some kinds require.
_BACKEND_KINDS: dict[str, tuple[str, ...]] = {
    "url": ("ollama", "openai"), "api_key": ("openai",),
    **{key: _LLAMACPP for key in ("python", "context_spill_dir", "context_spill_budget", "context_min_tokens")},
    **{key: _MANAGED for key in ("start_timeout", "stop_grace", "context_budget", "context_dir")},
    **{key: ("ollama", *_MANAGED) for key in ("idle_default", "idle_after", "vram_budget")},
}
_BACKEND_REQUIRED: dict[str, tuple[str, ...]] = {"url": ("ollama", "openai")}

_MODEL: dict[str, Parser] = {
    "backend": _str, "upstream_name": _str, "embedding": _bool, "keep_alive": _keep_alive, "pin": _bool,
    "min_residency": _nullable(parse_duration), "size": _nullable(_nonzero(parse_size)),
}
# The part of a model only one backend kind reads: its dataclass (a ModelConfig field named like the kind)
# and its keys, which sit flat beside the common ones in the file. Which keys a kind allows, and which it
# requires (fields without a default), follow from these.
_MODEL_PARTS: dict[str, tuple[type, dict[str, Parser]]] = {
    "llamacpp": (LlamaCppModel, {
        "gguf": _file_path, "n_ctx": _int(0), "n_gpu_layers": _int(-1), "n_threads": _nullable(_int(1)),
        "n_batch": _int(1), "chat_format": _nullable(_str), "use_mmap": _bool, "use_mlock": _bool,
        "server_args": _scalar_mapping}),
    "ollama": (OllamaModel, {"options": _mapping}),
    "command": (CommandModel, {
        "command": _argv, "gguf": _file_path, "health": _http_path, "env": _environment}),
}
_MODEL_KINDS: dict[str, tuple[str, ...]] = {
    key: tuple(kind for kind, (_, spec) in _MODEL_PARTS.items() if key in spec)
    for _, spec in _MODEL_PARTS.values() for key in spec
}
_MODEL_REQUIRED: dict[str, tuple[str, ...]] = {
    f.name: (kind,) for kind, (cls, _) in _MODEL_PARTS.items() for f in fields(cls)
    if f.default is MISSING and f.default_factory is MISSING
}
_ALL_MODEL_KEYS: dict[str, Parser] = {**_MODEL, **{k: p for _, spec in _MODEL_PARTS.values() for k, p in spec.items()}}


def _build(tree: dict[str, Any], ck: _Checker, source: str) -> Config:
    top = ck.section(tree, "", _TOP, extra=_NESTED)
    sections = {key: cls(**ck.section(tree.get(key), key, spec)) for key, (cls, spec) in _SECTIONS.items()}
    backends = _backends(ck, tree.get("backends"))
    models = _models(ck, tree.get("models"), {name: b.kind if b else None for name, b in backends.items()})
    phases = _phases(ck, tree.get("phases"), models)
    _check_references(ck, top, models, phases)
    for phase in sections["scheduler"].priorities:
        ck.known(f"scheduler.priorities.{phase}", "phase", phase, phases)
    _check_idle_defaults(ck, backends, models)
    if "listen" in top:
        top["listen_host"], top["listen_port"] = top.pop("listen")
    valid_backends = {name: b for name, b in backends.items() if b is not None}
    return Config(**top, **sections, backends=valid_backends, models=models, phases=phases, source=source)


def _backends(ck: _Checker, raw: Any) -> dict[str, BackendConfig | None]:
    """Every named backend; None for one whose kind is missing or invalid (already reported)."""
    named = ck.named(raw, "backends")
    if not named and not raw:
        ck.fail("backends", "at least one backend is required")
    return {name: _backend(ck, name, value) for name, value in named.items()}


def _backend(ck: _Checker, name: str, raw: Any) -> BackendConfig | None:
    path = f"backends.{name}"
    values = ck.section(raw, path, _BACKEND)
    kind = values.pop("kind", None)
    if kind is None:
        if _lacks(raw, "kind"):
            ck.fail(f"{path}.kind", "required: one of " + ", ".join(_KINDS))
        return None
    _check_kind(ck, path, raw, kind, _BACKEND_KINDS, _BACKEND_REQUIRED)
    return BackendConfig(name=name, kind=kind, **values)


def _check_kind(ck: _Checker, path: str, raw: Any, kind: str, allowed: Mapping[str, tuple[str, ...]],
                required: Mapping[str, tuple[str, ...]]) -> None:
    present = raw if isinstance(raw, Mapping) else {}
    for key in present:
        if kind not in allowed.get(key, (kind,)):
            ck.fail(_join(path, key), f"only allowed when the backend kind is {' or '.join(allowed[key])}, "
                                      f"not {kind}")
    for key, kinds in required.items():
        if kind in kinds and key not in present:
            ck.fail(_join(path, key), f"required when the backend kind is {kind}")


def _models(ck: _Checker, raw: Any, kinds: Mapping[str, str | None]) -> dict[str, ModelConfig]:
    named = ck.named(raw, "models")
    if not named and not raw:
        ck.fail("models", "at least one model is required")
    return {name: _model(ck, name, value, kinds) for name, value in named.items()}


def _model(ck: _Checker, name: str, raw: Any, kinds: Mapping[str, str | None]) -> ModelConfig:
    path = f"models.{name}"
    values = ck.section(raw, path, _ALL_MODEL_KEYS)
    kind = _backend_kind(ck, path, raw, values.get("backend"), kinds)
    if kind is not None:
        _check_kind(ck, path, raw, kind, _MODEL_KINDS, _MODEL_REQUIRED)
    if kind in _MANAGED and "gguf" in values and not os.path.isfile(values["gguf"]):
        ck.fail(f"{path}.gguf", f"file not found: {values['gguf']}")
    parts = {part: _model_part(part, values) for part in _MODEL_PARTS if part == kind}
    if isinstance(parts.get("command"), CommandModel):
        _check_template(ck, path, parts["command"])
    common = {key: value for key, value in values.items() if key in _MODEL}
    common.setdefault("backend", "")
    common.setdefault("upstream_name", name)
    return ModelConfig(name=name, **common, **parts)


def _model_part(kind: str, values: Mapping[str, Any]) -> Any:
    """The kind's part of a model from its flat keys; None when a required key is missing (reported)."""
    cls, spec = _MODEL_PARTS[kind]
    given = {key: value for key, value in values.items() if key in spec}
    return cls(**given) if all(key in given for key, kinds in _MODEL_REQUIRED.items() if kind in kinds) else None


def _check_template(ck: _Checker, path: str, part: CommandModel) -> None:
    """The server must learn its port from warmpool, and ${GGUF} needs a file to name."""
    in_command = set().union(*(used(arg) for arg in part.command))
    everywhere = in_command.union(*(used(value) for value in part.env.values()))
    if "PORT" not in everywhere:
        ck.fail(f"{path}.command", "must pass ${PORT} to the server (in its arguments or env): warmpool picks a "
                                   "free loopback port at each start and talks to the server there")
    if "GGUF" in everywhere and part.gguf is None:
        ck.fail(f"{path}.gguf", "required when the command uses ${GGUF}")


def _backend_kind(ck: _Checker, path: str, raw: Any, backend: str | None,
                  kinds: Mapping[str, str | None]) -> str | None:
    """The kind of the model's backend; None when it is missing, unknown or itself invalid."""
    if backend is None:
        if _lacks(raw, "backend"):
            ck.fail(f"{path}.backend", "required: the name of one of the backends")
        return None
    return kinds[backend] if ck.known(f"{path}.backend", "backend", backend, kinds) else None


def _phases(ck: _Checker, raw: Any, models: Mapping[str, ModelConfig]) -> dict[str, str]:
    phases: dict[str, str] = {}
    for phase, value in ck.named(raw, "phases").items():
        model = ck.parse(f"phases.{phase}", value, _str)
        if model is not _INVALID:
            ck.known(f"phases.{phase}", "model", model, models)
            phases[phase] = model
    return phases


def _check_references(ck: _Checker, top: Mapping[str, Any], models: Mapping[str, ModelConfig],
                      phases: Mapping[str, str]) -> None:
    if top.get("default_phase") is not None:
        ck.known("default_phase", "phase", top["default_phase"], phases)
    for index, model in enumerate(top.get("preload", ())):
        ck.known(f"preload[{index}]", "model", model, models)


def _check_idle_defaults(ck: _Checker, backends: Mapping[str, BackendConfig | None],
                         models: Mapping[str, ModelConfig]) -> None:
    for name, backend in backends.items():
        if backend is None or backend.idle_default is None:
            continue
        path = f"backends.{name}.idle_default"
        if ck.known(path, "model", backend.idle_default, models) and models[backend.idle_default].backend != name:
            ck.fail(path, f"model {backend.idle_default!r} belongs to backend {models[backend.idle_default].backend!r}")
        if backend.idle_after is None:
            ck.fail(f"backends.{name}.idle_after", "required when idle_default is set")

