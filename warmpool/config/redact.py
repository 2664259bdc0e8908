"""The redacted view that `warmpool check-config` prints: the resolved config as plain YAML data, secrets masked."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from warmpool.config.model import BackendConfig, Config, ModelConfig, RamTierConfig
from warmpool.config.schema import _BACKEND_KINDS, _MODEL_KINDS, _MODEL_PARTS
from warmpool.config.values import _plain

_MASK = "***"


def redacted(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain, YAML-dumpable data in the file's shape (durations in seconds, sizes
    in bytes), with every secret replaced by "***". It loads back as the same config, secrets aside."""
    return {
        "listen": cfg.listen,
        **{key: _fields_of(getattr(cfg, key)) for key in ("log", "max_body_size", "timeouts")},
        "auth": {key: [_MASK] * len(keys) for key, keys in _fields_of(cfg.auth).items()},
        "scheduler": _fields_of(cfg.scheduler),
        "ram_tier": _ram_tier_dict(cfg.ram_tier),
        "balancer": _fields_of(cfg.balancer),
        "backends": {name: _redacted_backend(backend) for name, backend in cfg.backends.items()},
        "models": {name: _model_dict(model, cfg) for name, model in cfg.models.items()},
        "phases": dict(cfg.phases),
        "default_phase": cfg.default_phase,
        "preload": list(cfg.preload),
        "loading_feedback": cfg.loading_feedback,
    }


def _ram_tier_dict(rt: RamTierConfig) -> dict[str, Any]:
    out = {f.name: getattr(rt, f.name) for f in fields(rt)}
    for key in ("budget", "reserve"):
        amount = out[key]
        out[key] = f"{amount.percent:g}%" if amount.bytes is None else amount.bytes
    out["models_dirs"] = list(rt.models_dirs)
    return out


def _fields_of(value: Any) -> Any:
    """A dataclass as a plain dict without its `name` (the mapping key); anything else as plain data."""
    if not hasattr(value, "__dataclass_fields__"):
        return _plain(value)
    return {f.name: _plain(getattr(value, f.name)) for f in fields(value) if f.name != "name"}


def _for_kind(values: dict[str, Any], allowed: Mapping[str, tuple[str, ...]],
              kind: str | None) -> dict[str, Any]:
    """Only the keys a backend of `kind` accepts, so the output loads back."""
    if kind is None:
        return values
    return {key: value for key, value in values.items() if kind in allowed.get(key, (kind,))}


def _redacted_backend(backend: BackendConfig) -> dict[str, Any]:
    values = _for_kind(_fields_of(backend), _BACKEND_KINDS, backend.kind)
    if values.get("api_key") is not None:
        values["api_key"] = _MASK
    return values


def _model_dict(model: ModelConfig, cfg: Config) -> dict[str, Any]:
    """A model in the file's flat shape: the common keys, then its kind's part."""
    backend = cfg.backends.get(model.backend)
    flat = {key: value for key, value in _fields_of(model).items() if key not in _MODEL_PARTS}
    for part in (model.llamacpp, model.ollama):
        if part is not None:
            flat.update(_fields_of(part))
    return _for_kind(flat, _MODEL_KINDS, backend.kind if backend else None)
