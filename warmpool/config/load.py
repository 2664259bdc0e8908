"""Building a Config: finding the file, reading its YAML, `${VAR}` expansion, and the `WARMPOOL_*` environment
and command-line overrides (flags > env > file > defaults), then validation (schema.py)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from warmpool.config.model import BalancerConfig, Config, SchedulerConfig, TimeoutsConfig
from warmpool.config.schema import _build, _Checker, _did_you_mean, _join
from warmpool.config.values import _show, _Text
from warmpool.errors import ConfigError


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
        from warmpool.config.defaults import embedded_default  # lazily: it may assemble the demo model

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
        return yaml.load(text, Loader=_StrictLoader)
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
        mapping: dict[Any, Any] = super().construct_mapping(node, deep)
        return mapping


def _reject_duplicate_keys(node: yaml.MappingNode) -> None:
    seen: set[tuple[str, str]] = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
            continue  # `<<:` merges are meant to be overridden by the keys beside them
        if (key_node.tag, key_node.value) in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key_node.value!r}", key_node.start_mark)
        seen.add((key_node.tag, key_node.value))


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
    paths += [f"balancer.{f.name}" for f in fields(BalancerConfig)]
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
