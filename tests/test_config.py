"""Tests for warmpool.config: discovery, loading, ${VAR} expansion, overrides, validation, redaction."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

from warmpool.config import (
    Config,
    ModelConfig,
    OllamaModel,
    config_from_mapping,
    discover_config_path,
    load_config,
    parse_duration,
    parse_size,
    redacted,
)
from warmpool.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config.example.yaml"


def minimal(**top: Any) -> dict[str, Any]:
    """The smallest valid raw config (one Ollama backend, one model), plus `top`-level keys."""
    raw: dict[str, Any] = {
        "backends": {"local": {"kind": "ollama", "url": "http://127.0.0.1:11434"}},
        "models": {"planner": {"backend": "local", "upstream_name": "qwen2.5:7b"}},
    }
    raw.update(top)
    return raw


def build(raw: dict[str, Any], env: dict[str, str] | None = None, **kwargs: Any) -> Config:
    return config_from_mapping(raw, env=env or {}, **kwargs)


def problems_of(raw: Any, env: dict[str, str] | None = None, **kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(raw, env=env or {}, **kwargs)
    return info.value.problems


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- discovery ---------------------------------------------------------------------------------------


def test_discover_explicit_path_wins_over_everything(tmp_path: Path) -> None:
    explicit = write(tmp_path / "explicit.yaml", "{}")
    from_env = write(tmp_path / "env.yaml", "{}")
    write(tmp_path / "warmpool.yaml", "{}")
    found = discover_config_path(str(explicit), env={"WARMPOOL_CONFIG": str(from_env)}, cwd=tmp_path,
                                 home=tmp_path)
    assert found == explicit


def test_discover_explicit_relative_path_is_resolved_against_cwd(tmp_path: Path) -> None:
    write(tmp_path / "conf" / "a.yaml", "{}")
    found = discover_config_path("conf/a.yaml", env={}, cwd=tmp_path, home=tmp_path)
    assert found == tmp_path / "conf/a.yaml"


def test_discover_explicit_missing_is_an_error_even_if_others_exist(tmp_path: Path) -> None:
    write(tmp_path / "warmpool.yaml", "{}")
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        discover_config_path(str(tmp_path / "nope.yaml"), env={}, cwd=tmp_path, home=tmp_path)


def test_discover_env_var_wins_over_cwd_and_xdg(tmp_path: Path) -> None:
    from_env = write(tmp_path / "env.yaml", "{}")
    write(tmp_path / "warmpool.yaml", "{}")
    env = {"WARMPOOL_CONFIG": str(from_env), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    assert discover_config_path(None, env=env, cwd=tmp_path, home=tmp_path) == from_env


def test_discover_env_var_missing_is_an_error_naming_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not found: .*missing\.yaml \(from WARMPOOL_CONFIG\)"):
        discover_config_path(None, env={"WARMPOOL_CONFIG": str(tmp_path / "missing.yaml")}, cwd=tmp_path)


def test_discover_empty_env_var_counts_as_unset(tmp_path: Path) -> None:
    assert discover_config_path(None, env={"WARMPOOL_CONFIG": ""}, cwd=tmp_path, home=tmp_path) is None


def test_discover_cwd_file_wins_over_xdg(tmp_path: Path) -> None:
    local = write(tmp_path / "warmpool.yaml", "{}")
    write(tmp_path / "xdg" / "warmpool" / "config.yaml", "{}")
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    assert discover_config_path(None, env=env, cwd=tmp_path, home=tmp_path) == local


def test_discover_xdg_config_home(tmp_path: Path) -> None:
    xdg = write(tmp_path / "xdg" / "warmpool" / "config.yaml", "{}")
    cwd = tmp_path / "work"
    cwd.mkdir()
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    assert discover_config_path(None, env=env, cwd=cwd, home=tmp_path / "home") == xdg


def test_discover_falls_back_to_home_dot_config(tmp_path: Path) -> None:
    home_file = write(tmp_path / "home" / ".config" / "warmpool" / "config.yaml", "{}")
    cwd = tmp_path / "work"
    cwd.mkdir()
    assert discover_config_path(None, env={}, cwd=cwd, home=tmp_path / "home") == home_file


def test_discover_ignores_a_relative_xdg_config_home(tmp_path: Path) -> None:
    home_file = write(tmp_path / "home" / ".config" / "warmpool" / "config.yaml", "{}")
    write(tmp_path / "rel" / "warmpool" / "config.yaml", "{}")
    found = discover_config_path(None, env={"XDG_CONFIG_HOME": "rel"}, cwd=tmp_path, home=tmp_path / "home")
    assert found == home_file


def test_discover_nothing_found(tmp_path: Path) -> None:
    assert discover_config_path(None, env={}, cwd=tmp_path, home=tmp_path) is None


def test_discover_ignores_a_directory_named_like_the_config(tmp_path: Path) -> None:
    (tmp_path / "warmpool.yaml").mkdir()
    assert discover_config_path(None, env={}, cwd=tmp_path, home=tmp_path) is None


# --- loading files -----------------------------------------------------------------------------------


def test_example_config_loads() -> None:
    cfg = load_config(EXAMPLE, env={})
    assert cfg.source == str(EXAMPLE)
    assert cfg.backends["local"].kind == "ollama"
    assert cfg.backends["remote"].kind == "openai"
    assert cfg.models["coder"].upstream_name == "qwen2.5-coder:7b"
    assert cfg.models["llama3.2:3b"].upstream_name == "llama3.2:3b"
    assert set(cfg.phases) == {"context", "execution", "verification"}
    assert cfg.default_phase == "context"


def test_example_config_with_its_commented_llamacpp_and_secret_sections_enabled_loads(tmp_path: Path) -> None:
    gguf = write(tmp_path / "gemma.gguf", "GGUF")
    text = EXAMPLE.read_text().replace("~/models/gemma-3-270m-it-Q4_K_M.gguf", str(gguf))
    text = _uncomment(text, ("# gpu:", "# gemma:", "# api_key:", "# vram_budget: 24GiB", "# idle_default:"))
    cfg = load_config(write(tmp_path / "full.yaml", text), env={"REMOTE_API_KEY": "sk-test"})
    assert cfg.backends["gpu"].kind == "llamacpp"
    assert cfg.backends["gpu"].context_budget == 2 * 2**30 and cfg.backends["gpu"].context_min_tokens == 64
    assert cfg.backends["remote"].api_key == "sk-test"
    assert cfg.backends["local"].vram_budget == 24 * 2**30
    assert cfg.models["gemma"].gguf == str(gguf)
    assert cfg.models["gemma"].llamacpp is not None and cfg.models["gemma"].llamacpp.n_gpu_layers == -1
    assert cfg.models["gemma"].llamacpp.server_args == {"flash_attn": True}
    assert (cfg.backends["local"].idle_default, cfg.backends["local"].idle_after) == ("coder", 600.0)


def _uncomment(text: str, starts: tuple[str, ...]) -> str:
    """Uncomment each commented block that begins with one of `starts`, up to the next blank line."""
    out, active = [], False
    for line in text.splitlines():
        active = (active and line.strip() != "") or line.strip().startswith(starts)
        out.append(re.sub(r"^(\s*)# ?", r"\1", line, count=1) if active else line)
    return "\n".join(out) + "\n"


def test_every_key_of_the_schema_is_documented_in_the_example() -> None:
    text = EXAMPLE.read_text()
    keys = ["listen", "log", "level", "format", "max_body_size", "timeouts", "connect", "first_byte", "idle",
            "shutdown", "auth", "api_keys", "admin_keys", "scheduler", "max_queue", "queue_timeout",
            "max_wait", "load_ahead", "prefetch", "prefetch_threshold", "default_priority", "priorities",
            "interactive_max_wait",
            "min_residency", "backends", "kind", "url", "api_key", "max_resident", "vram_budget", "python",
            "start_timeout", "stop_grace", "context_budget", "context_dir", "context_spill_dir",
            "context_spill_budget", "context_min_tokens", "models", "backend", "upstream_name", "gguf", "n_ctx",
            "n_gpu_layers", "n_threads", "n_batch", "chat_format", "embedding", "use_mmap", "use_mlock",
            "server_args", "options", "keep_alive", "pin", "size", "phases", "default_phase", "preload",
            "balancer", "agent_port", "agent_host", "drain_delay"]
    missing = [key for key in keys if not re.search(rf"^\s*#?\s*{key}:", text, re.M)]
    assert missing == []
    assert text.count("optional, default:") >= 35


def test_load_sets_source_and_parses_yaml(tmp_path: Path) -> None:
    path = write(tmp_path / "w.yaml", yaml.safe_dump(minimal(listen="0.0.0.0:9000")))
    cfg = load_config(path, env={})
    assert (cfg.listen_host, cfg.listen_port, cfg.source) == ("0.0.0.0", 9000, str(path))


def test_load_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "listen: x\nbackends:\n  local: [unclosed\nmodels: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    (problem,) = info.value.problems
    assert str(path) in problem
    assert re.search(r"line [34]", problem)


def test_load_rejects_duplicate_keys(tmp_path: Path) -> None:
    text = yaml.safe_dump(minimal()) + "models:\n  other: {backend: local}\n"
    with pytest.raises(ConfigError, match=r"line \d+.*duplicate key 'models'"):
        load_config(write(tmp_path / "dup.yaml", text), env={})


def test_load_allows_yaml_merge_keys(tmp_path: Path) -> None:
    text = """
backends:
  local: {kind: ollama, url: "http://127.0.0.1:11434"}
models:
  base: &base {backend: local, keep_alive: 5m}
  other:
    <<: *base
    keep_alive: 1m
"""
    cfg = load_config(write(tmp_path / "merge.yaml", text), env={})
    assert cfg.models["other"].keep_alive == 60.0


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", env={})


def test_load_empty_file_reports_what_is_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path / "empty.yaml", ""), env={})
    assert info.value.problems == ["backends: at least one backend is required",
                                   "models: at least one model is required"]


def test_load_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path / "list.yaml", "- a\n- b\n"), env={})


def test_load_none_uses_the_embedded_default(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("warmpool.config.defaults")
    fake.embedded_default = lambda: minimal(default_phase=None)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "warmpool.config.defaults", fake)
    cfg = load_config(None, env={"WARMPOOL_LOG_LEVEL": "debug"})
    assert cfg.source == "<embedded default>"
    assert cfg.log.level == "debug"
    assert "planner" in cfg.models


# --- defaults and successful parsing -----------------------------------------------------------------


def test_omitted_sections_take_the_dataclass_defaults() -> None:
    cfg = build(minimal())
    defaults = Config()
    for name in ("listen_host", "listen_port", "log", "max_body_size", "timeouts", "auth", "scheduler",
                 "phases", "default_phase", "preload"):
        assert getattr(cfg, name) == getattr(defaults, name), name
    assert cfg.models["planner"] == ModelConfig(name="planner", backend="local", upstream_name="qwen2.5:7b",
                                                ollama=OllamaModel())


def test_empty_sections_are_allowed() -> None:
    cfg = build(minimal(log=None, timeouts={}, auth=None, scheduler={}, phases=None, preload=[]))
    assert cfg.log == Config().log


def test_upstream_name_defaults_to_the_model_name() -> None:
    cfg = build(minimal(models={"library/qwen2.5:7b": {"backend": "local"}}))
    assert cfg.models["library/qwen2.5:7b"].upstream_name == "library/qwen2.5:7b"


def test_full_values_are_parsed() -> None:
    cfg = build(minimal(
        listen="[::1]:0", log={"level": "WARNING", "format": "json"}, max_body_size="1MiB",
        timeouts={"connect": "500ms", "first_byte": "1h30m", "idle": 5, "shutdown": 0.5},
        auth={"api_keys": ["a", "b"], "admin_keys": ["c"]},
        scheduler={"max_queue": 3, "queue_timeout": "2m", "max_wait": 0, "min_residency": "10s"},
        phases={"context": "planner"}, default_phase="context", preload=["planner"],
        balancer={"agent_port": 9100, "agent_host": "0.0.0.0", "drain_delay": "5s"},
    ))
    assert (cfg.listen_host, cfg.listen_port, cfg.listen) == ("::1", 0, "[::1]:0")
    assert (cfg.log.level, cfg.log.format, cfg.max_body_size) == ("warning", "json", 2**20)
    assert (cfg.timeouts.connect, cfg.timeouts.first_byte, cfg.timeouts.idle) == (0.5, 5400.0, 5.0)
    assert cfg.auth.api_keys == ("a", "b") and cfg.auth.admin_keys == ("c",)
    assert (cfg.scheduler.max_queue, cfg.scheduler.queue_timeout, cfg.scheduler.min_residency) == (3, 120, 10)
    assert cfg.preload == ("planner",) and cfg.default_phase == "context"
    assert (cfg.balancer.agent_port, cfg.balancer.agent_host, cfg.balancer.drain_seconds) == (9100, "0.0.0.0", 5.0)


def test_balancer_port_is_checked_and_the_drain_delay_follows_the_agent() -> None:
    with pytest.raises(ConfigError, match=r"balancer.agent_port: expected a port number 0-65535, got 70000"):
        build(minimal(balancer={"agent_port": 70000}))
    assert build(minimal(balancer={"agent_port": 9100})).balancer.drain_seconds == 2.0
    assert build(minimal(balancer={"agent_port": 9100, "drain_delay": 0})).balancer.drain_seconds == 0.0
    assert build(minimal()).balancer.drain_seconds == 0.0


def test_llamacpp_backend_and_model(tmp_path: Path) -> None:
    gguf = write(tmp_path / "m.gguf", "GGUF")
    cfg = build(minimal(
        backends={"gpu": {"kind": "llamacpp", "python": "/opt/py/bin/python", "start_timeout": "1m",
                          "stop_grace": 2, "vram_budget": "8GiB", "max_resident": 2,
                          "context_budget": "512MiB", "context_dir": "/dev/shm/ctx", "context_spill_dir": "~/ctx",
                          "context_spill_budget": "2GB", "context_min_tokens": 128}},
        models={"gemma": {"backend": "gpu", "gguf": str(gguf), "n_ctx": 0, "n_gpu_layers": -1, "n_threads": 4,
                          "chat_format": "gemma", "embedding": True, "use_mlock": True,
                          "server_args": {"flash_attn": True, "seed": 1}, "size": "300MB", "pin": True}},
    ))
    backend, model = cfg.backends["gpu"], cfg.models["gemma"]
    assert (backend.start_timeout, backend.stop_grace) == (60.0, 2.0)
    assert (backend.context_budget, backend.context_dir) == (2**29, "/dev/shm/ctx")
    assert backend.context_spill_budget == 2 * 10**9
    assert backend.context_spill_dir == str(Path("~/ctx").expanduser()) and backend.context_min_tokens == 128
    assert (backend.vram_budget, backend.max_resident, backend.url) == (8 * 2**30, 2, None)
    assert model.llamacpp is not None and model.ollama is None
    llama = model.llamacpp
    assert (model.gguf, llama.n_ctx, llama.n_gpu_layers, model.size) == (str(gguf), 0, -1, 300_000_000)
    assert model.llamacpp.server_args == {"flash_attn": True, "seed": 1} and model.pin


def test_gguf_tilde_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    write(tmp_path / "models" / "m.gguf", "GGUF")
    cfg = build(minimal(backends={"gpu": {"kind": "llamacpp"}},
                        models={"m": {"backend": "gpu", "gguf": "~/models/m.gguf"}}))
    assert cfg.models["m"].gguf == str(tmp_path / "models" / "m.gguf")


@pytest.mark.parametrize("value, expected", [(-1, None), ("-1m", None), (-0.5, None), (None, None),
                                             (0, 0.0), ("30m", 1800.0)])
def test_keep_alive_negative_means_forever(value: Any, expected: float | None) -> None:
    cfg = build(minimal(models={"m": {"backend": "local", "keep_alive": value}}))
    assert cfg.models["m"].keep_alive == expected


def test_model_and_phase_names_may_contain_colons_slashes_and_dots() -> None:
    cfg = build(minimal(models={"library/qwen2.5:7b": {"backend": "local"}},
                        phases={"plan.v2": "library/qwen2.5:7b"}))
    assert cfg.phases == {"plan.v2": "library/qwen2.5:7b"}


# --- ${VAR} expansion --------------------------------------------------------------------------------


def test_var_expansion_whole_embedded_and_escaped(tmp_path: Path) -> None:
    write(tmp_path / "models" / "m.gguf", "GGUF")
    env = {"HOST": "10.0.0.2", "PORT": "9999", "DIR": str(tmp_path), "KEY": "sk-1"}
    cfg = build(minimal(
        backends={"remote": {"kind": "openai", "url": "http://${HOST}:${PORT}", "api_key": "${KEY}"},
                  "gpu": {"kind": "llamacpp"}},
        models={"m": {"backend": "gpu", "gguf": "${DIR}/models/m.gguf"},
                "r": {"backend": "remote", "upstream_name": "literal-$${HOST}-and-$$-kept"}},
    ), env)
    assert cfg.backends["remote"].url == "http://10.0.0.2:9999"
    assert cfg.backends["remote"].api_key == "sk-1"
    assert cfg.models["m"].gguf == str(tmp_path / "models" / "m.gguf")
    assert cfg.models["r"].upstream_name == "literal-${HOST}-and-$$-kept"


def test_var_expansion_gives_typed_values_where_types_are_expected() -> None:
    env = {"N": "3", "PIN": "true", "CTX": "8192", "TTL": "5m", "Q": "12"}
    cfg = build(minimal(
        scheduler={"max_queue": "${Q}"},
        backends={"local": {"kind": "ollama", "url": "http://h:1", "max_resident": "${N}"}},
        models={"m": {"backend": "local", "pin": "${PIN}", "keep_alive": "${TTL}",
                      "options": {"num_ctx": "${CTX}", "stop": "${TTL}"}}},
    ), env)
    assert cfg.backends["local"].max_resident == 3 and cfg.scheduler.max_queue == 12
    assert cfg.models["m"].pin is True and cfg.models["m"].keep_alive == 300.0
    assert cfg.models["m"].ollama == OllamaModel(options={"num_ctx": 8192, "stop": "5m"})


def test_var_expansion_keeps_numeric_looking_secrets_as_strings() -> None:
    cfg = build(minimal(auth={"api_keys": ["${K}"]},
                        backends={"r": {"kind": "openai", "url": "http://h", "api_key": "${K}"}},
                        models={"m": {"backend": "r"}}), {"K": "0123"})
    assert cfg.auth.api_keys == ("0123",) and cfg.backends["r"].api_key == "0123"


def test_unset_variable_names_the_key_path_and_the_variable() -> None:
    raw = minimal(auth={"api_keys": ["ok", "${WARMPOOL_TEST_KEY}"]},
                  backends={"local": {"kind": "ollama", "url": "http://${OLLAMA_HOST}:11434"}})
    assert problems_of(raw) == [  # and no echo such as "url: expected an http:// URL, got 'http://:11434'"
        "backends.local.url: environment variable OLLAMA_HOST is not set",
        "auth.api_keys[1]: environment variable WARMPOOL_TEST_KEY is not set",
    ]


def test_two_unset_variables_in_one_value_are_both_reported() -> None:
    raw = minimal(backends={"local": {"kind": "ollama", "url": "http://${H}:${P}"}})
    assert problems_of(raw) == ["backends.local.url: environment variable H is not set",
                                "backends.local.url: environment variable P is not set"]


def test_malformed_reference_is_an_error() -> None:
    problems = problems_of(minimal(models={"m": {"backend": "local", "upstream_name": "a${oops"}}))
    assert problems == [
        "models.m.upstream_name: invalid reference '${oops' (write ${NAME}; $${ is a literal ${)"]
    problems = problems_of(minimal(models={"m": {"backend": "local", "upstream_name": "${1BAD}"}}))
    assert problems[0].startswith("models.m.upstream_name: invalid reference '${1BAD}'")


def test_keys_are_not_expanded() -> None:
    cfg = build(minimal(models={"${NAME}": {"backend": "local"}}), {"NAME": "x"})
    assert "${NAME}" in cfg.models


# --- environment overrides ---------------------------------------------------------------------------


def test_env_overrides_beat_the_file() -> None:
    env = {"WARMPOOL_LISTEN": "0.0.0.0:8080", "WARMPOOL_LOG_LEVEL": "DEBUG", "WARMPOOL_LOG_FORMAT": "json",
           "WARMPOOL_MAX_BODY_SIZE": "1KiB", "WARMPOOL_TIMEOUTS_FIRST_BYTE": "20m",
           "WARMPOOL_TIMEOUTS_CONNECT": "3", "WARMPOOL_SCHEDULER_MAX_QUEUE": "7",
           "WARMPOOL_SCHEDULER_MIN_RESIDENCY": "1m", "WARMPOOL_DEFAULT_PHASE": "b",
           "WARMPOOL_AUTH_API_KEYS": " k1, k2 ,,", "WARMPOOL_AUTH_ADMIN_KEYS": "adm"}
    raw = minimal(listen="127.0.0.1:1", log={"level": "info"}, timeouts={"first_byte": "1m"},
                  scheduler={"max_queue": 1}, auth={"api_keys": ["file"]},
                  phases={"a": "planner", "b": "planner"}, default_phase="a")
    cfg = build(raw, env)
    assert cfg.listen == "0.0.0.0:8080" and (cfg.log.level, cfg.log.format) == ("debug", "json")
    assert cfg.max_body_size == 1024 and cfg.default_phase == "b"
    assert (cfg.timeouts.first_byte, cfg.timeouts.connect) == (1200.0, 3.0)
    assert (cfg.scheduler.max_queue, cfg.scheduler.min_residency) == (7, 60.0)
    assert cfg.auth.api_keys == ("k1", "k2") and cfg.auth.admin_keys == ("adm",)


def test_env_override_of_an_empty_file_section() -> None:
    cfg = build(minimal(timeouts=None), {"WARMPOOL_TIMEOUTS_IDLE": "1s"})
    assert cfg.timeouts.idle == 1.0


def test_empty_auth_env_var_clears_the_keys() -> None:
    cfg = build(minimal(auth={"api_keys": ["file"]}), {"WARMPOOL_AUTH_API_KEYS": ""})
    assert cfg.auth.api_keys == ()


def test_env_values_are_not_expanded() -> None:
    cfg = build(minimal(), {"WARMPOOL_AUTH_API_KEYS": "${NOT_A_VAR}"})
    assert cfg.auth.api_keys == ("${NOT_A_VAR}",)


def test_env_override_errors_name_the_variable() -> None:
    env = {"WARMPOOL_SCHEDULER_MAX_QUEUE": "lots", "WARMPOOL_LISTEN": "nowhere"}
    assert problems_of(minimal(), env) == [
        'listen (from WARMPOOL_LISTEN): expected "host:port" (IPv6 as "[::1]:port"; port 0-65535, '
        "0 picks a free one), got 'nowhere'",
        "scheduler.max_queue (from WARMPOOL_SCHEDULER_MAX_QUEUE): expected an integer >= 1, got 'lots'",
    ]


def test_unknown_warmpool_env_var_is_an_error() -> None:
    env = {"WARMPOOL_FOO": "1", "WARMPOOL_TIMEOUTS_CONECT": "5s", "WARMPOOL_TIMEOUTS_BOGUS": "1"}
    assert problems_of(minimal(), env) == [
        "unknown environment variable WARMPOOL_FOO",
        "unknown environment variable WARMPOOL_TIMEOUTS_BOGUS",
        "unknown environment variable WARMPOOL_TIMEOUTS_CONECT (did you mean 'WARMPOOL_TIMEOUTS_CONNECT'?)",
    ]


def test_cli_only_and_unrelated_env_vars_are_ignored() -> None:
    env = {"WARMPOOL_CONFIG": "/x.yaml", "WARMPOOL_URL": "http://h", "WARMPOOLX": "1", "warmpool_foo": "1",
           "HOME": "/root"}
    assert build(minimal(), env).listen == "127.0.0.1:11435"


# --- command-line overrides --------------------------------------------------------------------------


def test_cli_overrides_beat_env_and_file() -> None:
    env = {"WARMPOOL_LISTEN": "0.0.0.0:8080", "WARMPOOL_LOG_LEVEL": "warning"}
    cfg = build(minimal(listen="127.0.0.1:1"), env, overrides={"listen": "127.0.0.1:0", "log.level": "debug"})
    assert cfg.listen == "127.0.0.1:0" and cfg.log.level == "debug"


def test_cli_overrides_skip_none_and_parse_strings_like_yaml_scalars() -> None:
    overrides = {"listen": None, "scheduler.max_queue": "9", "timeouts.idle": 4, "auth.api_keys": ["x"]}
    cfg = build(minimal(), overrides=overrides)
    assert cfg.listen == "127.0.0.1:11435" and cfg.scheduler.max_queue == 9
    assert cfg.timeouts.idle == 4.0 and cfg.auth.api_keys == ("x",)


def test_cli_overrides_reach_models_whose_names_contain_dots() -> None:
    raw = minimal(models={"qwen2.5:7b": {"backend": "local"}}, phases={"context": "qwen2.5:7b"})
    cfg = build(raw, overrides={"models.qwen2.5:7b.pin": True, "backends.local.max_resident": 2,
                                "phases.execution": "qwen2.5:7b"})
    assert cfg.models["qwen2.5:7b"].pin and cfg.backends["local"].max_resident == 2
    assert cfg.phases == {"context": "qwen2.5:7b", "execution": "qwen2.5:7b"}


def test_cli_override_errors_name_the_command_line() -> None:
    problems = problems_of(minimal(), overrides={"log.level": "loud", "log.levle": "debug"})
    assert problems == [
        "log.levle (from the command line): unknown key (did you mean 'level'?)",
        "log.level (from the command line): expected one of debug, info, warning, error, got 'loud'",
    ]


# --- validation --------------------------------------------------------------------------------------


def test_unknown_keys_are_rejected_with_path_and_suggestion(tmp_path: Path) -> None:
    raw = minimal(lisen="x", timeouts={"conect": 1})
    raw["models"]["planner"]["ggfu"] = "/m.gguf"
    raw["backends"]["local"]["max_residents"] = 2
    assert problems_of(raw) == [
        "lisen: unknown key (did you mean 'listen'?)",
        "timeouts.conect: unknown key (did you mean 'connect'?)",
        "backends.local.max_residents: unknown key (did you mean 'max_resident'?)",
        "models.planner.ggfu: unknown key (did you mean 'gguf'?)",
    ]


def test_unknown_key_without_a_close_match_has_no_suggestion() -> None:
    assert problems_of(minimal(zzzz=1)) == ["zzzz: unknown key"]


@pytest.mark.parametrize("raw_patch, expected", [
    ({"listen": "localhost"}, 'listen: expected "host:port"'),
    ({"listen": "::1:80"}, 'listen: expected "host:port"'),
    ({"listen": "h:70000"}, 'listen: expected "host:port"'),
    ({"listen": 8080}, 'listen: expected "host:port"'),
    ({"log": {"level": "verbose"}}, "log.level: expected one of debug, info, warning, error, got 'verbose'"),
    ({"log": {"format": 1}}, "log.format: expected one of text, json, got 1"),
    ({"log": "debug"}, "log: expected a mapping, got 'debug'"),
    ({"max_body_size": "10%"},
     "max_body_size: expected a size in bytes (e.g. '4GiB'), got '10%': no percentages"),
    ({"max_body_size": 0}, "max_body_size: must be greater than 0, got 0"),
    ({"timeouts": {"connect": 0}}, "timeouts.connect: expected a duration greater than 0, got 0"),
    ({"timeouts": {"idle": "-5s"}}, "timeouts.idle: expected a duration (seconds, or e.g."),
    ({"timeouts": {"idle": True}},
     "timeouts.idle: expected a duration (seconds, or e.g. '500ms', '30s', '5m', '1h30m'), got true"),
    ({"scheduler": {"max_queue": 0}}, "scheduler.max_queue: expected an integer >= 1, got 0"),
    ({"scheduler": {"max_queue": 2.5}}, "scheduler.max_queue: expected an integer >= 1, got 2.5"),
    ({"scheduler": {"max_queue": True}}, "scheduler.max_queue: expected an integer >= 1, got true"),
    ({"scheduler": {"default_priority": "urgent"}},
     "scheduler.default_priority: expected one of interactive, batch, got 'urgent'"),
    ({"scheduler": {"priorities": {"p": "low"}}, "phases": {"p": "planner"}},
     "scheduler.priorities: expected one of interactive, batch, got 'low'"),
    ({"scheduler": {"priorities": {"nope": "batch"}}}, "scheduler.priorities.nope: unknown phase 'nope'"),
    ({"scheduler": {"prefetch_threshold": 0}}, "scheduler.prefetch_threshold: expected a fraction in (0, 1]"),
    ({"scheduler": {"prefetch": "yes"}}, "scheduler.prefetch: expected true or false, got 'yes'"),
    ({"auth": {"api_keys": "k"}}, "auth.api_keys: expected a list of strings, got str"),
    ({"auth": {"admin_keys": ["a", ""]}},
     "auth.admin_keys: item 1: expected a non-empty string, got an empty string"),
    ({"preload": "planner"}, "preload: expected a list of names, got 'planner'"),
    ({"phases": {"p": 3}}, "phases.p: expected a non-empty string, got 3"),
    ({"phases": ["p"]}, "phases: expected a mapping, got ['p']"),
    ({"default_phase": 1}, "default_phase: expected a non-empty string, got 1"),
])
def test_top_level_type_errors(raw_patch: dict[str, Any], expected: str) -> None:
    problems = problems_of(minimal(**raw_patch))
    assert len(problems) == 1 and problems[0].startswith(expected), problems


@pytest.mark.parametrize("field, value, expected", [
    ("max_resident", "two", "backends.local.max_resident: expected an integer >= 1, got 'two'"),
    ("max_resident", 0, "backends.local.max_resident: expected an integer >= 1, got 0"),
    ("url", "127.0.0.1:11434",
     "backends.local.url: expected an http:// or https:// URL, got '127.0.0.1:11434'"),
    ("url", "ftp://h", "backends.local.url: expected an http:// or https:// URL"),
    ("url", "http://h:99999", "backends.local.url: expected an http:// or https:// URL"),
    ("kind", "vllm", "backends.local.kind: expected one of ollama, llamacpp, command, openai, got 'vllm'"),
    ("vram_budget", "lots", "backends.local.vram_budget: expected a size"),
])
def test_backend_type_errors(field: str, value: Any, expected: str) -> None:
    raw = minimal()
    raw["backends"]["local"][field] = value
    problems = problems_of(raw)
    assert problems[0].startswith(expected), problems


@pytest.mark.parametrize("field, value, expected", [
    ("pin", "true", "models.planner.pin: expected true or false, got 'true'"),
    ("pin", 1, "models.planner.pin: expected true or false, got 1"),
    ("keep_alive", "forever", "models.planner.keep_alive: expected a duration"),
    ("keep_alive", "-forever", "models.planner.keep_alive: expected a duration"),
    ("min_residency", "-1s", "models.planner.min_residency: expected a duration"),
    ("size", "big", "models.planner.size: expected a size"),
    ("options", ["num_ctx"], "models.planner.options: expected a mapping with string keys, got ['num_ctx']"),
    ("upstream_name", "", "models.planner.upstream_name: expected a non-empty string, got ''"),
    ("backend", None, "models.planner.backend: expected a non-empty string, got null"),
])
def test_model_type_errors(field: str, value: Any, expected: str) -> None:
    raw = minimal()
    raw["models"]["planner"][field] = value
    problems = problems_of(raw)
    assert problems[0].startswith(expected), problems


def test_yaml_bools_are_real_bools() -> None:
    raw = minimal()
    raw["models"]["planner"]["pin"] = yaml.safe_load("yes")  # YAML 1.1: a real bool
    assert build(raw).models["planner"].pin is True
    raw["models"]["planner"]["pin"] = "yes"  # a quoted string
    assert problems_of(raw) == ["models.planner.pin: expected true or false, got 'yes'"]


def test_all_problems_are_collected_in_one_error() -> None:
    raw = {
        "listen": "bad", "log": {"level": "loud"}, "bogus": 1,
        "backends": {"a": {"kind": "ollama", "max_resident": "two"}, "b": {"url": "http://h"}},
        "models": {"m": {"backend": "nope"}, "n": {"backend": "a", "pin": "no"}},
        "phases": {"p": "ghost"}, "default_phase": "q", "preload": ["ghost"],
    }
    with pytest.raises(ConfigError) as info:
        config_from_mapping(raw, env={"WARMPOOL_NOPE": "1"})
    problems = info.value.problems
    assert len(problems) == 12, problems
    assert all(line in str(info.value) for line in problems)


def test_kind_specific_backend_keys() -> None:
    raw = minimal(backends={
        "o": {"kind": "ollama", "url": "http://h", "api_key": "k", "python": "/p", "context_budget": 0},
        "l": {"kind": "llamacpp", "url": "http://h"},
        "x": {"kind": "openai"},
    })
    raw["models"]["planner"]["backend"] = "o"
    assert problems_of(raw) == [
        "backends.o.api_key: only allowed when the backend kind is openai, not ollama",
        "backends.o.python: only allowed when the backend kind is llamacpp, not ollama",
        "backends.o.context_budget: only allowed when the backend kind is llamacpp or command, not ollama",
        "backends.l.url: only allowed when the backend kind is ollama or openai, not llamacpp",
        "backends.x.url: required when the backend kind is openai",
    ]


def test_backend_kind_is_required() -> None:
    raw = minimal(backends={"a": {"url": "http://h"}, "b": None})
    raw["models"]["planner"]["backend"] = "a"
    assert problems_of(raw) == ["backends.a.kind: required: one of ollama, llamacpp, command, openai",
                                "backends.b.kind: required: one of ollama, llamacpp, command, openai"]


def test_kind_specific_model_keys(tmp_path: Path) -> None:
    gguf = write(tmp_path / "m.gguf", "GGUF")
    raw = minimal(backends={"o": {"kind": "ollama", "url": "http://h"}, "l": {"kind": "llamacpp"}},
                  models={"a": {"backend": "o", "gguf": str(gguf), "n_ctx": 4096},
                          "b": {"backend": "l", "gguf": str(gguf), "options": {"num_ctx": 1}}})
    assert problems_of(raw) == [
        "models.a.gguf: only allowed when the backend kind is llamacpp or command, not ollama",
        "models.a.n_ctx: only allowed when the backend kind is llamacpp, not ollama",
        "models.b.options: only allowed when the backend kind is ollama, not llamacpp",
    ]


def test_llamacpp_model_needs_an_existing_gguf(tmp_path: Path) -> None:
    raw = minimal(backends={"l": {"kind": "llamacpp"}},
                  models={"a": {"backend": "l"},
                          "b": {"backend": "l", "gguf": str(tmp_path / "missing.gguf")},
                          "c": {"backend": "l", "gguf": str(tmp_path)}})
    assert problems_of(raw) == [
        "models.a.gguf: required when the backend kind is llamacpp",
        f"models.b.gguf: file not found: {tmp_path / 'missing.gguf'}",
        f"models.c.gguf: file not found: {tmp_path}",
    ]


def test_model_backend_must_exist() -> None:
    raw = minimal(models={"a": {"backend": "locl"}, "b": {}, "c": {"backend": "zzz"}})
    assert problems_of(raw) == [
        "models.a.backend: unknown backend 'locl' (did you mean 'local'?)",
        "models.b.backend: required: the name of one of the backends",
        "models.c.backend: unknown backend 'zzz' (known: local)",
    ]


def test_a_model_on_an_invalid_backend_gets_no_second_error() -> None:
    raw = minimal(backends={"local": {"kind": "vllm", "url": "http://h"}})
    assert problems_of(raw) == ["backends.local.kind: expected one of ollama, llamacpp, command, openai, got 'vllm'"]


def test_phases_must_reference_known_models() -> None:
    raw = minimal(phases={"context": "planer", "execution": "coder"})
    assert problems_of(raw) == [
        "phases.context: unknown model 'planer' (did you mean 'planner'?)",
        "phases.execution: unknown model 'coder' (known: planner)",
    ]


def test_default_phase_must_be_a_phase() -> None:
    assert problems_of(minimal(phases={"context": "planner"}, default_phase="contxt")) == [
        "default_phase: unknown phase 'contxt' (did you mean 'context'?)"]
    assert problems_of(minimal(default_phase="context")) == ["default_phase: unknown phase 'context'"]


def test_default_phase_from_env_is_checked_and_named() -> None:
    problems = problems_of(minimal(phases={"context": "planner"}), {"WARMPOOL_DEFAULT_PHASE": "nope"})
    assert problems == ["default_phase (from WARMPOOL_DEFAULT_PHASE): unknown phase 'nope' (known: context)"]


def test_preload_must_reference_known_models() -> None:
    assert problems_of(minimal(preload=["planner", "ghost"])) == [
        "preload[1]: unknown model 'ghost' (known: planner)"]


@pytest.mark.parametrize("name", ["", "has space", "tab\there", 7])
def test_invalid_names_are_rejected(name: Any) -> None:
    raw = minimal()
    raw["models"][name] = {"backend": "local"}
    (problem,) = problems_of(raw)
    assert problem.startswith("models: invalid name") and "without whitespace" in problem


def test_at_least_one_backend_and_model() -> None:
    assert problems_of({"backends": {}, "models": None}) == [
        "backends: at least one backend is required", "models: at least one model is required"]


def test_top_level_must_be_a_mapping() -> None:
    problems = problems_of(["listen"], source="x.yaml")
    assert problems == ["x.yaml: expected a mapping of settings, got ['listen']"]


def test_secret_values_are_never_echoed_in_errors() -> None:
    raw = minimal(auth={"api_keys": [12345678]},
                  backends={"r": {"kind": "openai", "url": "http://h", "api_key": 987654321}},
                  models={"m": {"backend": "r"}})
    problems = problems_of(raw)
    assert problems == [
        "auth.api_keys: item 0: expected a non-empty string, got int (quote keys in YAML)",
        "backends.r.api_key: expected a non-empty string, got int (quote keys in YAML)",
    ]


def test_config_error_message_lists_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(minimal(listen="x", log={"level": "x"}), env={})
    assert str(info.value).startswith("invalid configuration:\n  listen: ")
    assert "\n  log.level: " in str(info.value)


# --- durations and sizes -----------------------------------------------------------------------------


@pytest.mark.parametrize("value, seconds", [
    (0, 0.0), (30, 30.0), (1.5, 1.5), ("45", 45.0), ("2.5", 2.5), ("500ms", 0.5), ("30s", 30.0),
    ("5m", 300.0), ("2h", 7200.0), ("1h30m", 5400.0), ("1h 30m 15s", 5415.0), ("1.5h", 5400.0),
    ("1d", 86400.0), ("10M", 600.0), ("0s", 0.0), ("1m500ms", 60.5),
])
def test_parse_duration(value: Any, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "abc", "5 minutes", "-5s", -1, -0.1, "1h-30m", "5x", True, None, [1],
                                   float("inf"), float("nan"), "h", "1.s"])
def test_parse_duration_rejects(value: Any) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(value)


@pytest.mark.parametrize("value, size", [
    (0, 0), (1024, 1024), ("100", 100), ("100B", 100), ("512MB", 512_000_000), ("4GiB", 4 * 2**30),
    ("1.5GB", 1_500_000_000), ("800M", 800_000_000), ("64MiB", 64 * 2**20), ("2Gi", 2 * 2**30),
    ("1k", 1000), ("1KiB", 1024), ("2TB", 2 * 10**12), ("1tib", 2**40), (" 3 GB ", 3_000_000_000),
    ("123456789012345678901", 123456789012345678901),
])
def test_parse_size(value: Any, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["", "big", "-1GB", -1, 1.5, "5XB", "GB", True, None, {"a": 1}])
def test_parse_size_rejects(value: Any) -> None:
    with pytest.raises(ValueError, match="expected a size"):
        parse_size(value)


def test_parse_size_rejects_percentages() -> None:
    with pytest.raises(ValueError, match="no percentages"):
        parse_size("10%")


# --- redaction ---------------------------------------------------------------------------------------


def secret_config(tmp_path: Path) -> Config:
    gguf = write(tmp_path / "m.gguf", "GGUF")
    return build(minimal(
        auth={"api_keys": ["k1", "k2"], "admin_keys": ["adm"]},
        backends={"local": {"kind": "ollama", "url": "http://h:1"},
                  "r": {"kind": "openai", "url": "https://api.example", "api_key": "sk-secret"},
                  "gpu": {"kind": "llamacpp", "vram_budget": "1GiB"}},
        models={"planner": {"backend": "local", "options": {"num_ctx": 8192}, "keep_alive": "5m"},
                "remote": {"backend": "r"}, "g": {"backend": "gpu", "gguf": str(gguf), "size": "10MB"}},
        listen="[::1]:8080", phases={"context": "planner"}, default_phase="context", preload=["g"],
    ))


def test_redacted_masks_every_secret_and_keeps_list_lengths(tmp_path: Path) -> None:
    out = redacted(secret_config(tmp_path))
    assert out["auth"] == {"api_keys": ["***", "***"], "admin_keys": ["***"]}
    assert out["backends"]["r"]["api_key"] == "***"
    dumped = yaml.safe_dump(out)
    assert "sk-secret" not in dumped and "k1" not in dumped and "adm\n" not in dumped


def test_redacted_has_the_file_shape(tmp_path: Path) -> None:
    out = redacted(secret_config(tmp_path))
    assert out["listen"] == "[::1]:8080"
    assert out["max_body_size"] == 64 * 2**20 and out["timeouts"]["first_byte"] == 600.0
    assert out["backends"]["gpu"] == {
        "kind": "llamacpp", "max_resident": 1, "vram_budget": 2**30, "python": None,
        "start_timeout": 300.0, "stop_grace": 10.0, "idle_default": None, "idle_after": None,
        "context_budget": 2**30, "context_dir": None, "context_spill_dir": None, "context_spill_budget": 4 * 2**30,
        "context_min_tokens": 64,
    }
    assert "python" not in out["backends"]["local"] and "api_key" not in out["backends"]["local"]
    assert out["models"]["planner"]["keep_alive"] == 300.0 and "gguf" not in out["models"]["planner"]
    assert "options" not in out["models"]["g"] and out["models"]["g"]["size"] == 10_000_000
    assert out["preload"] == ["g"] and out["phases"] == {"context": "planner"}


def test_redacted_loads_back_as_the_same_config(tmp_path: Path) -> None:
    cfg = secret_config(tmp_path)
    again = build(yaml.safe_load(yaml.safe_dump(redacted(cfg))))
    assert again.backends["r"].api_key == "***" and again.auth.api_keys == ("***", "***")
    unmasked = {"auth": cfg.auth, "backends": {**again.backends, "r": cfg.backends["r"]}}
    assert Config(**{**_as_kwargs(again), **unmasked}) == cfg


def _as_kwargs(cfg: Config) -> dict[str, Any]:
    return {name: getattr(cfg, name) for name in Config.__dataclass_fields__}


def test_redacted_example_round_trips() -> None:
    cfg = load_config(EXAMPLE, env={})
    assert config_from_mapping(redacted(cfg), env={}, source=cfg.source) == cfg


def test_scheduler_classes_and_prefetch_settings() -> None:
    cfg = build(minimal(phases={"index": "planner", "chat": "planner"},
                        scheduler={"priorities": {"index": "batch"}, "default_priority": "interactive",
                                   "interactive_max_wait": "2s", "prefetch": False, "load_ahead": False,
                                   "prefetch_threshold": 0.8}))
    sched = cfg.scheduler
    assert (sched.priorities, sched.default_priority, sched.interactive_max_wait) == ({"index": "batch"},
                                                                                        "interactive", 2.0)
    assert (sched.prefetch, sched.load_ahead, sched.prefetch_threshold) == (False, False, 0.8)
    assert build(minimal()).scheduler.prefetch and build(minimal()).scheduler.load_ahead  # on by default
