"""The names a client may use for a configured model, and which model each one means. Pure: no I/O.

A model answers to its configured name and its `upstream_name`, each with and without Ollama's implicit
":latest" tag. A configured name always wins: a model's `upstream_name` never takes over a name that
another model is configured under (`coder` on one backend and `remote: {upstream_name: coder}` on
another: "coder" is the first, "remote" the second). Between two upstream names, the model configured
first wins. `name_clashes` says where either happens, for `check-config`.
"""

from __future__ import annotations

from collections.abc import Iterable

from warmpool.config.model import ModelConfig


def tag_variants(name: str) -> tuple[str, ...]:
    """`name` as a client may spell it: with and without ":latest" (a name with another tag has only itself)."""
    if name.endswith(":latest"):
        return (name, name[: -len(":latest")])
    if ":" in name.rsplit("/", 1)[-1]:
        return (name,)
    return (name, name + ":latest")


def model_aliases(models: Iterable[ModelConfig]) -> dict[str, str]:
    """Every name a client may use → the configured name of the model it means."""
    models = list(models)
    aliases: dict[str, str] = {}
    for model in models:  # upstream names first, the first model's kept ...
        for variant in tag_variants(model.upstream_name):
            aliases.setdefault(variant, model.name)
    for model in models:  # ... then configured names, over any upstream name
        for variant in tag_variants(model.name):
            aliases[variant] = model.name
    return aliases


def name_clashes(models: Iterable[ModelConfig]) -> list[str]:
    """One line per model whose upstream name another model answers to (by its configured name, or by
    its upstream name when configured first)."""
    models = list(models)
    aliases = model_aliases(models)
    configured = {variant for m in models for variant in tag_variants(m.name)}
    lines = []
    for model in models:
        taken = [v for v in tag_variants(model.upstream_name) if aliases[v] != model.name]
        if taken:
            name, winner = taken[0], aliases[taken[0]]
            what = "the configured name" if name in configured else "also the upstream name"
            lines.append(f"models.{model.name}.upstream_name: {name!r} is {what} of model {winner!r}, so a "
                         f"request for {name!r} goes to {winner!r}, never to {model.name!r} (ask for "
                         f"{model.name!r})")
    return lines
