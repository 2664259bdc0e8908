"""Configuration: the frozen dataclasses every other module reads, and the only code that builds them.

Owns finding the config file, reading its YAML, `${VAR}` expansion, the `WARMPOOL_*` environment and
command-line overrides (flags > env > file > defaults), validation that reports every problem at once
with its key path, and the redacted view that `warmpool check-config` prints.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from warmpool.errors import ConfigError

__all__ = [
    "AuthConfig", "BackendConfig", "BackendKind", "Config", "LogConfig", "ModelConfig", "SchedulerConfig",
    "TimeoutsConfig", "config_from_mapping", "discover_config_path", "load_config", "parse_duration",
    "parse_size", "redacted",
]

BackendKind = Literal["ollama", "llamacpp", "openai"]


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"  # debug | info | warning | error
    format: str = "text"  # text | json


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    connect: float = 10.0  # seconds to open a TCP connection to an upstream
    first_byte: float = 600.0  # seconds an upstream may take to start answering (→ 504)
    idle: float = 600.0  # seconds an upstream stream may stay silent between chunks (→ 504 / cut)
    shutdown: float = 30.0  # seconds running streams get to finish on SIGTERM


@dataclass(frozen=True, slots=True)
class AuthConfig:
    api_keys: tuple[str, ...] = ()  # proxied requests need one (Bearer) when set
    admin_keys: tuple[str, ...] = ()  # /warmpool/* admin endpoints need one when set


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_queue: int = 256  # waiting requests per pool before 503 + Retry-After
    queue_timeout: float = 600.0  # seconds a request may wait for its model (→ 504)
    max_wait: float = 30.0  # after this, the oldest waiter is served even if it costs a swap
    min_residency: float = 0.0  # seconds a loaded model stays before it may be evicted


@dataclass(frozen=True, slots=True)
class BackendConfig:
    name: str
    kind: BackendKind
    url: str | None = None  # ollama / openai: base URL; llamacpp: not allowed
    api_key: str | None = None  # openai: sent upstream as Bearer (secret)
    max_resident: int = 1  # models loaded at once in this pool
    vram_budget: int | None = None  # bytes; if set, sizes must fit instead of counting models
    # managed llama.cpp only:
    python: str | None = None  # interpreter that has llama_cpp installed; default: warmpool's own
    start_timeout: float = 300.0  # seconds for a managed server to become healthy
    stop_grace: float = 10.0  # seconds between SIGTERM and SIGKILL
    spare: bool = True  # keep a pre-imported worker process ready so a swap pays only the model load
    idle_default: str | None = None  # model to load again once the pool has been idle for `idle_after`
    idle_after: float | None = None  # seconds of idleness before returning to `idle_default`


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str  # the name clients use
    backend: str
    upstream_name: str  # the name the backend knows (Ollama tag); defaults to `name`
    gguf: str | None = None  # llamacpp: path to the GGUF file
    n_ctx: int = 2048
    n_gpu_layers: int = 0
    n_threads: int | None = None
    n_batch: int = 512
    chat_format: str | None = None
    embedding: bool = False
    use_mmap: bool = True
    use_mlock: bool = False
    server_args: dict[str, Any] = field(default_factory=dict)  # extra llama_cpp.server model settings
    options: dict[str, Any] = field(default_factory=dict)  # ollama load-time options (num_ctx, ...)
    keep_alive: float | None = None  # seconds an idle model stays loaded; None = forever while in budget
    pin: bool = False
    min_residency: float | None = None  # overrides scheduler.min_residency
    size: int | None = None  # bytes in (V)RAM when loaded, if known


Strategy = Literal["read", "madvise", "mlock"]


@dataclass(frozen=True, slots=True)
class MemoryAmount:
    """A number of bytes, or a percentage of total RAM."""

    bytes: int | None = None
    percent: float | None = None

    def of(self, total: int) -> int:
        return self.bytes if self.bytes is not None else int(total * (self.percent or 0.0) / 100)

    @classmethod
    def parse(cls, value: object) -> MemoryAmount:
        """From 8589934592, "8GiB" or "50%"; raises ValueError."""
        if isinstance(value, str) and value.strip().endswith("%"):
            percent = float(value.strip()[:-1])
            if not 0 <= percent <= 100:
                raise ValueError(f"expected a percentage between 0% and 100%, got {value!r}")
            return cls(percent=percent)
        return cls(bytes=parse_size(value))

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.bytes is None else f"{self.bytes} bytes"


@dataclass(frozen=True, slots=True)
class RamTierConfig:
    """The `ram_tier:` section: which weight files stay warm in the page cache, and within what."""

    enabled: bool = True
    budget: MemoryAmount = MemoryAmount(percent=50.0)  # weight bytes the page cache may hold for models
    reserve: MemoryAmount = MemoryAmount(percent=10.0)  # available memory warming never eats into
    strategy: Strategy = "read"
    interval: float = 5.0  # seconds between re-measurements
    rate: int = 500_000_000  # bytes/s for `read` warming; 0 = unlimited
    min_warm_fraction: float = 0.9  # resident share at which a model counts as warm (source "ram")
    state_file: str | None = None  # None = ${XDG_STATE_HOME:-~/.local/state}/warmpool/usage.json
    top_n: int = 3  # most used models (per the state file) wanted warm from the start
    ollama_models: str | None = None  # Ollama store; None = $OLLAMA_MODELS, ~/.ollama/models, service store
    models_dirs: tuple[str, ...] = ()  # directories searched for <model name>.gguf
    hf_cache: str | None = None  # None = $HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub


@dataclass(frozen=True, slots=True)
class Config:
    listen_host: str = "127.0.0.1"
    listen_port: int = 11435
    log: LogConfig = field(default_factory=LogConfig)
    max_body_size: int = 64 * 1024 * 1024
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    backends: dict[str, BackendConfig] = field(default_factory=dict)
    models: dict[str, ModelConfig] = field(default_factory=dict)
    phases: dict[str, str] = field(default_factory=dict)
    default_phase: str | None = None
    preload: tuple[str, ...] = ()
    ram_tier: RamTierConfig = field(default_factory=RamTierConfig)
    loading_feedback: bool = False  # tell streaming clients what they wait for during a swap
    source: str = "<defaults>"  # where it came from: a path, or "<embedded default>"

    @property
    def listen(self) -> str:
        return _host_port(self.listen_host, self.listen_port)

    def backend_of(self, model: str) -> BackendConfig:
        return self.backends[self.models[model].backend]


def _host_port(host: str, port: int) -> str:
    """"host:port", with an IPv6 host in brackets so the port stays unambiguous."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------------------------------------------
# Finding and reading the file

def discover_config_path(explicit: str | None, env: Mapping[str, str] = os.environ,
                         cwd: Path | None = None, home: Path | None = None) -> Path | None:
    """The config file to use: --config, then $WARMPOOL_CONFIG (both must exist), then ./warmpool.yaml,
    then ${XDG_CONFIG_HOME:-~/.config}/warmpool/config.yaml; None when there is none."""
    cwd = cwd or Path.cwd()
    if explicit is not None:
        return _must_exist(cwd / Path(explicit).expanduser(), "")
    if env.get("WARMPOOL_CONFIG"):
        return _must_exist(cwd / Path(env["WARMPOOL_CONFIG"]).expanduser(), " (from WARMPOOL_CONFIG)")
    candidates = (cwd / "warmpool.yaml", _xdg_config_home(env, home) / "warmpool" / "config.yaml")
    return next((path for path in candidates if path.is_file()), None)


def _must_exist(path: Path, origin: str) -> Path:
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}{origin}"])
    return path


def _xdg_config_home(env: Mapping[str, str], home: Path | None) -> Path:
    xdg = env.get("XDG_CONFIG_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    return Path(xdg) if os.path.isabs(xdg) else (home or Path.home()) / ".config"


def load_config(path: Path | str | None, *, env: Mapping[str, str] = os.environ,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """The validated config from the YAML file at `path`, or from the embedded default when None."""
    if path is None:
        from warmpool.defaults import embedded_default  # lazily: it may assemble the demo model

        return config_from_mapping(embedded_default(), env=env, overrides=overrides,
                                   source="<embedded default>")
    raw = _read_yaml(Path(path))
    return config_from_mapping({} if raw is None else raw, env=env, overrides=overrides, source=str(path))


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"config file not found: {path}"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}"]) from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(path, exc)]) from None


def _yaml_problem(path: Path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
    return f"{where}: invalid YAML: {problem}"


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a repeated key is an error: plain YAML keeps only the last one, so a
    second `models:` section would silently drop the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        _reject_duplicate_keys(node)
        return super().construct_mapping(node, deep)


def _reject_duplicate_keys(node: yaml.MappingNode) -> None:
    seen: set[tuple[str, str]] = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
            continue  # `<<:` merges are meant to be overridden by the keys beside them
        if (key_node.tag, key_node.value) in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key_node.value!r}", key_node.start_mark)
        seen.add((key_node.tag, key_node.value))


# ---------------------------------------------------------------------------------------------------
# From a raw mapping to a Config

def config_from_mapping(raw: Mapping[str, Any], *, env: Mapping[str, str] = os.environ,
                        overrides: Mapping[str, Any] | None = None, source: str = "<mapping>") -> Config:
    """Expand ${VAR}s, apply WARMPOOL_* env overrides and then `overrides` (dotted paths, e.g.
    {"log.level": "debug"}; None values are skipped), validate, and build the Config.
    Raises one ConfigError listing every problem found."""
    if not isinstance(raw, Mapping):
        raise ConfigError([f"{source}: expected a mapping of settings, got {_show(raw)}"])
    ck = _Checker()
    tree = _expand(raw, "", env, ck)
    _apply_env(tree, env, ck)
    _apply_overrides(tree, overrides or {}, ck.labels)
    config = _build(tree, ck, source)
    if ck.problems:
        raise ConfigError(ck.problems)
    return config


class _Text(str):
    """Text that came from the environment (a ${VAR} or a WARMPOOL_* variable) or a command-line flag:
    where a number, boolean, duration or size is expected it is read like a YAML scalar, so
    `max_resident: ${N}` works although the substitution is a string."""

    __slots__ = ()


# ${VAR} expansion ----------------------------------------------------------------------------------

_REFERENCE = re.compile(r"(?P<escape>\$\$\{)|\$\{(?P<name>[^}]*)(?P<close>\})?")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _expand(value: Any, path: str, env: Mapping[str, str], ck: _Checker) -> Any:
    """A fresh copy of `value` with every ${VAR} replaced; later steps may mutate it."""
    if isinstance(value, Mapping):
        return {key: _expand(item, _join(path, key), env, ck) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand(item, f"{path}[{i}]", env, ck) for i, item in enumerate(value)]
    if isinstance(value, str) and "${" in value:
        return _Text(_REFERENCE.sub(lambda match: _substitute(match, path, env, ck), value))
    return value


def _substitute(match: re.Match[str], path: str, env: Mapping[str, str], ck: _Checker) -> str:
    name = match["name"]
    if match["escape"]:
        return "${"
    if match["close"] is None or not _VAR_NAME.fullmatch(name):
        ck.fail(path, f"invalid reference {match[0]!r} (write ${{NAME}}; $${{ is a literal ${{)", settle=True)
        return match[0]
    if name not in env:
        ck.fail(path, f"environment variable {name} is not set", settle=True)
        return ""
    return env[name]


# Environment and command-line overrides ------------------------------------------------------------

_ENV_IGNORED = frozenset({"WARMPOOL_CONFIG", "WARMPOOL_URL", "WARMPOOL_ADMIN_KEY"})  # read by the CLI, not settings
_ENV_LISTS = frozenset({"auth.api_keys", "auth.admin_keys"})  # comma-separated


def _env_paths() -> dict[str, str]:
    paths = ["listen", "log.level", "log.format", "max_body_size", "default_phase", *_ENV_LISTS]
    paths += [f"timeouts.{f.name}" for f in fields(TimeoutsConfig)]
    paths += [f"scheduler.{f.name}" for f in fields(SchedulerConfig)]
    return {"WARMPOOL_" + path.replace(".", "_").upper(): path for path in sorted(paths)}


_ENV_PATHS = _env_paths()


def _apply_env(tree: dict[str, Any], env: Mapping[str, str], ck: _Checker) -> None:
    for var in sorted(name for name in env if name.startswith("WARMPOOL_") and name not in _ENV_IGNORED):
        path = _ENV_PATHS.get(var)
        if path is None:
            # A high cutoff: the shared WARMPOOL_ prefix makes every name look alike.
            hint = _did_you_mean(var, _ENV_PATHS, cutoff=0.85)
            ck.problems.append(f"unknown environment variable {var}{hint}")
        else:
            _override(tree, ck.labels, path, _env_value(path, env[var]), f"from {var}")


def _env_value(path: str, text: str) -> Any:
    if path in _ENV_LISTS:
        return [key.strip() for key in text.split(",") if key.strip()]
    return _Text(text)


def _apply_overrides(tree: dict[str, Any], overrides: Mapping[str, Any], labels: dict[str, str]) -> None:
    for path, value in overrides.items():
        if value is not None:  # an option that was not given
            text_or_value = _Text(value) if isinstance(value, str) else value
            _override(tree, labels, path, text_or_value, "from the command line")


def _override(tree: dict[str, Any], labels: dict[str, str], path: str, value: Any, origin: str) -> None:
    _set(tree, _split(path), value)
    labels[path] = f"{path} ({origin})"  # so a problem names the variable or flag, not the file


def _split(path: str) -> list[str]:
    """Dotted path → keys; model and backend names may themselves contain dots ("qwen2.5:7b")."""
    head, _, rest = path.partition(".")
    if head in ("backends", "models") and "." in rest:
        name, _, key = rest.rpartition(".")
        return [head, name, key]
    return [head, rest] if head == "phases" and rest else path.split(".")


def _set(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    node = tree
    for key in keys[:-1]:
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            return  # the file's value is not a mapping: validation reports that
    node[keys[-1]] = value


# Value parsers: each takes a raw value and returns the typed one or raises ValueError(message) ------

Parser = Callable[[Any], Any]
_INVALID = object()  # what a parse that failed (and was reported) yields


def _show(value: Any) -> str:
    """A value for an error message, YAML-flavoured and cut short."""
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    text = repr(str(value)) if isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _expect(what: str, value: Any) -> ValueError:
    return ValueError(f"expected {what}, got {_show(value)}")


def _scalar(value: Any) -> Any:
    """Text from the environment read as a YAML scalar ("8" → 8, "true" → True); anything else as is."""
    if not isinstance(value, _Text):
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return str(value)
    return parsed if parsed is None or isinstance(parsed, (bool, int, float, str)) else str(value)


def _is_null(value: Any) -> bool:
    return value is None or isinstance(value, _Text) and value.strip() in ("", "~", "null", "Null", "NULL")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML's `true` is an int to Python


def _nullable(parse: Parser) -> Parser:
    """`parse`, except that null (or an empty environment value) means "not set"."""
    def parse_or_none(value: Any) -> Any:
        return None if _is_null(value) else parse(value)
    return parse_or_none


def _nonzero(parse: Parser) -> Parser:
    def parse_nonzero(value: Any) -> Any:
        result = parse(value)
        if not result:
            raise ValueError(f"must be greater than 0, got {_show(_scalar(value))}")
        return result
    return parse_nonzero


def _int(minimum: int) -> Parser:
    def parse_int(value: Any) -> int:
        value = _scalar(value)
        if not _is_int(value) or value < minimum:
            raise _expect(f"an integer >= {minimum}", value)
        return int(value)
    return parse_int


def _bool(value: Any) -> bool:
    value = _scalar(value)
    if not isinstance(value, bool):
        raise _expect("true or false", value)
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _expect("a non-empty string", value)
    return str(value)  # a plain str, not _Text: yaml.safe_dump refuses str subclasses


def _secret(value: Any) -> str:
    """Like _str, but an error never echoes the value: it may be a key."""
    if not isinstance(value, str) or not value:
        shown = "an empty string" if value == "" else type(value).__name__
        raise ValueError(f"expected a non-empty string, got {shown} (quote keys in YAML)")
    return str(value)


def _secret_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of strings, got {type(value).__name__}")
    for index, item in enumerate(value):
        try:
            _secret(item)
        except ValueError as exc:
            raise ValueError(f"item {index}: {exc}") from None
    return tuple(str(item) for item in value)


def _name_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise _expect("a list of names", value)
    return tuple(str(item) for item in value)


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise _expect("a fraction in (0, 1]", value)
    return float(value)


def _path_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise _expect("a list of paths", value)
    return tuple(_path(item) for item in value)


def _choice(*options: str) -> Parser:
    def parse_choice(value: Any) -> str:
        text = value.lower() if isinstance(value, str) else value
        if text not in options:
            raise _expect("one of " + ", ".join(options), value)
        return str(text)
    return parse_choice


_LISTEN = re.compile(r"(?:\[(?P<ipv6>[^\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d{1,5})")


def _listen(value: Any) -> tuple[str, int]:
    match = _LISTEN.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None or int(match["port"]) > 65535:
        raise _expect('"host:port" (IPv6 as "[::1]:port"; port 0-65535, 0 picks a free one)', value)
    return match["ipv6"] or match["host"], int(match["port"])


def _url(value: Any) -> str:
    if not isinstance(value, str) or not _is_http_url(value):
        raise _expect("an http:// or https:// URL", value)
    return str(value)


def _is_http_url(text: str) -> bool:
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _path(value: Any) -> str:
    return os.path.expanduser(_str(value))


def _file_path(value: Any) -> str:
    # Absolute, because the managed server process may run in another directory.
    return os.path.abspath(_path(value))


def _plain(value: Any) -> Any:
    """Plain YAML data: tuples become lists and environment text becomes the scalar it spells."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return _scalar(value)


def _mapping(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise _expect("a mapping with string keys", value)
    return _plain(value)  # type: ignore[no-any-return]


def _scalar_mapping(value: Any) -> dict[str, Any]:
    args = _mapping(value)
    for key, item in args.items():
        if isinstance(item, (dict, list)):
            raise ValueError(f"expected scalar values (string, number, boolean), {key!r} is {_show(item)}")
    return args


def _timeout(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds == 0:
        raise ValueError("expected a duration greater than 0, got 0")
    return seconds


def _keep_alive(value: Any) -> float | None:
    """A duration; as in Ollama, a negative one (-1, "-1m") means "keep it loaded" (None), as does null."""
    value = _scalar(value)
    if isinstance(value, str) and value.strip().startswith("-"):
        parse_duration(value.strip()[1:])  # still reject "-banana"
        return None
    if value is None or (_number(value) or 0.0) < 0:
        return None
    return parse_duration(value)


# Durations and sizes -------------------------------------------------------------------------------

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a string such as "500ms", "30s", "5m", "1h30m", "2h".
    Negative values are rejected; raises ValueError."""
    value = _scalar(value)
    seconds = _duration_text(value) if isinstance(value, str) else _number(value)
    if seconds is None or seconds < 0 or not math.isfinite(seconds):
        raise _expect("a duration (seconds, or e.g. '500ms', '30s', '5m', '1h30m')", value)
    return float(seconds)


def _duration_text(text: str) -> float | None:
    compact = text.replace(" ", "").lower()
    if _NUMBER.fullmatch(compact):
        return float(compact)
    if not _DURATION.fullmatch(compact):
        return None
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in _DURATION_PART.findall(compact))


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _size_units() -> dict[str, int]:
    units = {"": 1, "b": 1}
    for power, prefix in enumerate("kmgtp", start=1):
        units.update({prefix: 1000**power, prefix + "b": 1000**power})
        units.update({prefix + "i": 1024**power, prefix + "ib": 1024**power})
    return units


_SIZE_UNITS = _size_units()
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")


def parse_size(value: object) -> int:
    """Bytes from an integer or a string such as "512MB", "1.5GB", "800M", "4GiB": K/M/G/T(B) are powers
    of 1000, Ki/Mi/Gi/Ti(B) powers of 1024. Negatives and percentages are rejected; raises ValueError."""
    value = _scalar(value)
    if isinstance(value, str) and value.strip().endswith("%"):
        raise ValueError(f"expected a size in bytes (e.g. '4GiB'), got {_show(value)}: no percentages here")
    size = _size_text(value) if isinstance(value, str) else value if _is_int(value) else None
    if size is None or size < 0:  # type: ignore[operator]
        raise _expect("a size (bytes, or e.g. '512MB', '1.5GB', '4GiB')", value)
    return int(size)  # type: ignore[arg-type]


def _size_text(text: str) -> int | None:
    match = _SIZE.fullmatch(text.strip().lower())
    if match is None or match[2] not in _SIZE_UNITS:
        return None
    number = float(match[1]) if "." in match[1] else int(match[1])  # big integers stay exact
    return round(number * _SIZE_UNITS[match[2]])


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
    return raw is None or isinstance(raw, Mapping) and key not in raw


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

_KINDS = ("ollama", "llamacpp", "openai")
_LLAMACPP = ("llamacpp",)

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
    "scheduler": (SchedulerConfig, {"max_queue": _int(1), "queue_timeout": _timeout,
                                    "max_wait": parse_duration, "min_residency": parse_duration}),
}
_NESTED = (*_SECTIONS, "backends", "models", "phases")

_BACKEND: dict[str, Parser] = {
    "kind": _choice(*_KINDS), "url": _url, "api_key": _nullable(_secret), "max_resident": _int(1),
    "vram_budget": _nullable(_nonzero(parse_size)), "python": _nullable(_path), "start_timeout": _timeout,
    "stop_grace": parse_duration, "spare": _bool, "idle_default": _nullable(_str),
    "idle_after": _nullable(_timeout),
}
# Keys that only some backend kinds take, and keys that some kinds require.
_BACKEND_KINDS: dict[str, tuple[str, ...]] = {
    "url": ("ollama", "openai"), "api_key": ("openai",),
    **{key: _LLAMACPP for key in ("python", "start_timeout", "stop_grace", "spare")},
    **{key: ("ollama", "llamacpp") for key in ("idle_default", "idle_after", "vram_budget")},
}
_BACKEND_REQUIRED: dict[str, tuple[str, ...]] = {"url": ("ollama", "openai")}

_MODEL: dict[str, Parser] = {
    "backend": _str, "upstream_name": _str, "gguf": _file_path, "n_ctx": _int(0), "n_gpu_layers": _int(-1),
    "n_threads": _nullable(_int(1)), "n_batch": _int(1), "chat_format": _nullable(_str), "embedding": _bool,
    "use_mmap": _bool, "use_mlock": _bool, "server_args": _scalar_mapping, "options": _mapping,
    "keep_alive": _keep_alive, "pin": _bool, "min_residency": _nullable(parse_duration),
    "size": _nullable(_nonzero(parse_size)),
}
_LLAMACPP_MODEL_KEYS = ("gguf", "n_ctx", "n_gpu_layers", "n_threads", "n_batch", "chat_format",
                        "use_mmap", "use_mlock", "server_args")
_MODEL_KINDS: dict[str, tuple[str, ...]] = {
    **{key: _LLAMACPP for key in _LLAMACPP_MODEL_KEYS}, "options": ("ollama",),
}
_MODEL_REQUIRED: dict[str, tuple[str, ...]] = {"gguf": _LLAMACPP}


def _build(tree: dict[str, Any], ck: _Checker, source: str) -> Config:
    top = ck.section(tree, "", _TOP, extra=_NESTED)
    sections = {key: cls(**ck.section(tree.get(key), key, spec)) for key, (cls, spec) in _SECTIONS.items()}
    backends = _backends(ck, tree.get("backends"))
    models = _models(ck, tree.get("models"), {name: b and b.kind for name, b in backends.items()})
    phases = _phases(ck, tree.get("phases"), models)
    _check_references(ck, top, models, phases)
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
    values = ck.section(raw, path, _MODEL)
    kind = _backend_kind(ck, path, raw, values.get("backend"), kinds)
    if kind is not None:
        _check_kind(ck, path, raw, kind, _MODEL_KINDS, _MODEL_REQUIRED)
    if kind == "llamacpp" and "gguf" in values and not os.path.isfile(values["gguf"]):
        ck.fail(f"{path}.gguf", f"file not found: {values['gguf']}")
    values.setdefault("backend", "")
    values.setdefault("upstream_name", name)
    return ModelConfig(name=name, **values)


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


# ---------------------------------------------------------------------------------------------------
# The redacted view

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
    backend = cfg.backends.get(model.backend)
    return _for_kind(_fields_of(model), _MODEL_KINDS, backend.kind if backend else None)
