"""Configuration: the frozen dataclasses every other module reads (model), and the only code that builds
them: finding and loading the file (load), validation with key paths (schema), value parsers (values),
the redacted view (redact), the embedded default (defaults) and warnings about a valid config (advice)."""

from warmpool.config.advice import config_warnings
from warmpool.config.load import config_from_mapping, discover_config_path, load_config
from warmpool.config.model import (
    AuthConfig,
    BackendConfig,
    BackendKind,
    BalancerConfig,
    CommandModel,
    Config,
    LlamaCppModel,
    LogConfig,
    MemoryAmount,
    ModelConfig,
    OllamaModel,
    Priority,
    RamTierConfig,
    SchedulerConfig,
    Strategy,
    TimeoutsConfig,
)
from warmpool.config.redact import redacted
from warmpool.config.values import parse_duration, parse_size

__all__ = [
    "AuthConfig", "BackendConfig", "BackendKind", "BalancerConfig", "CommandModel", "Config", "LlamaCppModel",
    "LogConfig", "MemoryAmount", "ModelConfig", "OllamaModel", "Priority", "RamTierConfig", "SchedulerConfig",
    "Strategy", "TimeoutsConfig", "config_from_mapping", "config_warnings", "discover_config_path", "load_config",
    "parse_duration", "parse_size", "redacted",
]
