"""Tests for warmpool.ramtier.weights: Ollama names and store layout (real manifest and blob files in tmp_path),
modelfile FROM lines, split GGUFs, models_dirs and Hugging Face cache scans, and the reasons given when
a model's files cannot be found."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from warmpool.config import LlamaCppModel, ModelConfig, config_from_mapping
from warmpool.ramtier.weights import (
    OllamaName,
    SearchRoots,
    default_hf_root,
    default_ollama_roots,
    discover_all,
    find_weights,
    from_modelfile,
    hf_cache_ggufs,
    is_local_url,
    modelfile_paths,
    ollama_blob,
    ollama_blobs,
    scan_dirs,
    split_parts,
)

MODEL = "application/vnd.ollama.image.model"
PROJECTOR = "application/vnd.ollama.image.projector"


def write(path: Path, data: bytes | str = b"GGUF") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def add_blob(store: Path, content: bytes) -> str:
    digest = hashlib.sha256(content).hexdigest()
    write(store / "blobs" / f"sha256-{digest}", content)
    return f"sha256:{digest}"


def add_model(store: Path, parts: tuple[str, str, str, str], layers: list[tuple[str, bytes]]) -> list[Path]:
    """A pulled model as Ollama lays it out: a manifest naming content-addressed blobs."""
    entries: list[dict[str, Any]] = [{"mediaType": kind, "digest": add_blob(store, content),
                                      "size": len(content)} for kind, content in layers]
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                           "digest": add_blob(store, b"{}"), "size": 2},
                "layers": entries}
    write(store / "manifests" / Path(*parts), json.dumps(manifest))
    return [store / "blobs" / e["digest"].replace(":", "-") for e in entries]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "ollama" / "models"


def model(name: str = "planner", upstream: str | None = None, gguf: str | None = None) -> ModelConfig:
    return ModelConfig(name=name, backend="b", upstream_name=upstream or name,
                       llamacpp=LlamaCppModel(gguf=gguf) if gguf is not None else None)


# -- names -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "parts"), [
    ("qwen2.5:7b", ("registry.ollama.ai", "library", "qwen2.5", "7b")),
    ("llama3", ("registry.ollama.ai", "library", "llama3", "latest")),
    ("someone/custom:v1", ("registry.ollama.ai", "someone", "custom", "v1")),
    ("hf.co/bartowski/Qwen-GGUF:Q4_K_M", ("hf.co", "bartowski", "Qwen-GGUF", "Q4_K_M")),
    ("localhost:5000/team/m", ("localhost:5000", "team", "m", "latest")),
    ("https://reg.example/a/b:c@sha256:0123", ("reg.example", "a", "b", "c")),
])
def test_ollama_names_get_ollamas_defaults(name: str, parts: tuple[str, ...]) -> None:
    assert OllamaName.parse(name).parts == parts


def test_ollama_name_prints_short() -> None:
    assert str(OllamaName.parse("qwen2.5:7b")) == "library/qwen2.5:7b"
    assert str(OllamaName.parse("hf.co/a/b:q")) == "hf.co/a/b:q"


# -- the Ollama store ------------------------------------------------------------------------------

def test_manifest_leads_to_the_model_blob(store: Path) -> None:
    blobs = add_model(store, ("registry.ollama.ai", "library", "qwen2.5", "7b"),
                      [(MODEL, b"GGUF weights"), ("application/vnd.ollama.image.template", b"{{ .Prompt }}"),
                       ("application/vnd.ollama.image.params", b'{"stop":[]}')])
    assert ollama_blob(store, "qwen2.5:7b") == blobs[0]


def test_all_weight_layers_are_found_model_first(store: Path) -> None:
    blobs = add_model(store, ("registry.ollama.ai", "library", "llava", "latest"),
                      [(PROJECTOR, b"clip projector"), (MODEL, b"GGUF llava")])
    assert ollama_blobs(store, "llava") == ([blobs[1], blobs[0]], None)


def test_manifest_lookup_ignores_case_like_ollama(store: Path) -> None:
    blobs = add_model(store, ("registry.ollama.ai", "library", "Qwen2.5", "7B"), [(MODEL, b"GGUF")])
    assert ollama_blob(store, "qwen2.5:7b") == blobs[0]


def test_other_registries_and_namespaces(store: Path) -> None:
    blobs = add_model(store, ("hf.co", "bartowski", "Qwen-GGUF", "Q4_K_M"), [(MODEL, b"GGUF hf")])
    assert ollama_blob(store, "hf.co/bartowski/Qwen-GGUF:Q4_K_M") == blobs[0]


def test_old_blob_names_with_a_colon(store: Path) -> None:
    blob = add_model(store, ("registry.ollama.ai", "library", "old", "latest"), [(MODEL, b"GGUF old")])[0]
    blob.rename(blob.with_name(blob.name.replace("sha256-", "sha256:")))
    assert ollama_blob(store, "old") == blob.with_name(blob.name.replace("sha256-", "sha256:"))


def test_no_manifest_says_where_it_looked(store: Path) -> None:
    assert ollama_blobs(store, "qwen2.5:7b") == (
        [], f"no manifest for library/qwen2.5:7b under {store / 'manifests'}")
    assert ollama_blob(store, "qwen2.5:7b") is None


def test_manifest_without_a_model_layer(store: Path) -> None:
    add_model(store, ("registry.ollama.ai", "library", "tmpl", "latest"),
              [("application/vnd.ollama.image.template", b"{{ .Prompt }}")])
    paths, reason = ollama_blobs(store, "tmpl")
    assert paths == [] and f"has no layer of type {MODEL}" in str(reason)


def test_manifest_naming_a_missing_blob(store: Path) -> None:
    blob = add_model(store, ("registry.ollama.ai", "library", "gone", "latest"), [(MODEL, b"GGUF gone")])[0]
    blob.unlink()
    paths, reason = ollama_blobs(store, "gone")
    assert paths == [] and "which is not in" in str(reason) and blob.name.replace("-", ":") in str(reason)


def test_unreadable_manifest(store: Path) -> None:
    write(store / "manifests" / "registry.ollama.ai" / "library" / "bad" / "latest", "{not json")
    paths, reason = ollama_blobs(store, "bad")
    assert paths == [] and "cannot read manifest" in str(reason)


# -- modelfiles ------------------------------------------------------------------------------------

SHOWN = """# Modelfile generated by "ollama show"
# To build a new Modelfile based on this, replace FROM with:
# FROM qwen2.5:7b

FROM /root/.ollama/models/blobs/sha256-aaaa
FROM /root/.ollama/models/blobs/sha256-bbbb
TEMPLATE \"\"\"{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>{{ end }}\"\"\"
ADAPTER /root/.ollama/models/blobs/sha256-cccc
PARAMETER stop <|im_end|>
LICENSE \"\"\"Apache 2.0 with "quotes\"\"\"
"""


def test_from_line_of_an_api_show_modelfile() -> None:
    assert from_modelfile(SHOWN) == Path("/root/.ollama/models/blobs/sha256-aaaa")


def test_modelfile_weight_paths_include_projector_and_adapter() -> None:
    assert modelfile_paths(SHOWN) == [Path("/root/.ollama/models/blobs/sha256-aaaa"),
                                      Path("/root/.ollama/models/blobs/sha256-bbbb"),
                                      Path("/root/.ollama/models/blobs/sha256-cccc")]


@pytest.mark.parametrize(("text", "expected"), [
    ("FROM qwen2.5:7b\n", None),  # a model name, not a file
    ('from "/models/my model.gguf"\n', Path("/models/my model.gguf")),
    ("  # FROM /commented/out\nFROM ./relative.gguf\n", None),
    ("", None),
    ('SYSTEM """You are terse.\nfrom /etc/passwd you know nothing.\n"""\nFROM /m/blob\n', Path("/m/blob")),
])
def test_from_line_variants(text: str, expected: Path | None) -> None:
    assert from_modelfile(text) == expected


# -- GGUF files on disk ----------------------------------------------------------------------------

def test_split_parts_from_any_part(tmp_path: Path) -> None:
    parts = [tmp_path / f"big-Q4-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert split_parts(parts[1]) == parts
    assert split_parts(tmp_path / "single.gguf") == [tmp_path / "single.gguf"]


def test_scan_dirs_groups_split_parts_by_stem(tmp_path: Path) -> None:
    first = tmp_path / "a"
    parts = [write(first / "nested" / f"Big-0000{i}-of-00002.gguf") for i in (1, 2)]
    small = write(first / "small.gguf")
    write(first / "notes.txt")
    shadowed = write(tmp_path / "b" / "small.gguf")
    found = scan_dirs([first, tmp_path / "b", tmp_path / "missing"])
    assert found == {"big": parts, "small": [small]}
    assert shadowed not in found["small"]


def test_hf_cache_layout_is_followed_to_the_blobs(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    blob = write(hub / "models--org--repo-GGUF" / "blobs" / "0123abcd", b"GGUF hf")
    link = hub / "models--org--repo-GGUF" / "snapshots" / "rev1" / "repo-Q4_K_M.gguf"
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)
    assert hf_cache_ggufs(hub) == {"repo-q4_k_m": [link]}
    found = find_weights(model("repo-Q4_K_M"), "llamacpp", SearchRoots(hf_cache=hub))
    assert found.paths == (blob.resolve(),) and found.source == "hf cache"


# -- find_weights ----------------------------------------------------------------------------------

def test_managed_model_uses_its_gguf(tmp_path: Path) -> None:
    gguf = write(tmp_path / "m.gguf")
    found = find_weights(model(gguf=str(gguf)), "llamacpp", SearchRoots())
    assert found.paths == (gguf.resolve(),) and found.reason is None and found.source == "gguf"


def test_managed_split_gguf_brings_every_part(tmp_path: Path) -> None:
    parts = [write(tmp_path / f"m-0000{i}-of-00003.gguf") for i in (1, 2, 3)]
    found = find_weights(model(gguf=str(parts[0])), "llamacpp", SearchRoots())
    assert found.paths == tuple(p.resolve() for p in parts)


def test_a_missing_split_part_is_the_reason(tmp_path: Path) -> None:
    first = write(tmp_path / "m-00001-of-00002.gguf")
    found = find_weights(model(gguf=str(first)), "llamacpp", SearchRoots())
    assert not found.found
    assert found.reason == f"part 2 of split gguf {tmp_path / 'm-00002-of-00002.gguf'} does not exist"


def test_a_missing_gguf_is_the_reason(tmp_path: Path) -> None:
    found = find_weights(model(gguf=str(tmp_path / "x.gguf")), "llamacpp", SearchRoots())
    assert found.reason == f"gguf {tmp_path / 'x.gguf'} does not exist"


def test_ollama_model_from_the_store(store: Path) -> None:
    blob = add_model(store, ("registry.ollama.ai", "library", "qwen2.5", "7b"), [(MODEL, b"GGUF q")])[0]
    found = find_weights(model(upstream="qwen2.5:7b"), "ollama", SearchRoots(ollama=(store,)))
    assert found.paths == (blob.resolve(),) and found.source == "ollama store"


def test_ollama_modelfile_path_wins_when_it_exists_here(tmp_path: Path, store: Path) -> None:
    shown = write(tmp_path / "elsewhere" / "sha256-feed")
    found = find_weights(model(upstream="qwen2.5:7b"), "ollama", SearchRoots(ollama=(store,)),
                         show_modelfile=f"FROM {shown}\n")
    assert found.paths == (shown.resolve(),) and found.source == "modelfile"


def test_ollama_modelfile_from_another_host_falls_back_to_the_store(store: Path) -> None:
    blob = add_model(store, ("registry.ollama.ai", "library", "qwen2.5", "7b"), [(MODEL, b"GGUF q")])[0]
    found = find_weights(model(upstream="qwen2.5:7b"), "ollama", SearchRoots(ollama=(store,)),
                         show_modelfile="FROM /nowhere/sha256-0000\n")
    assert found.paths == (blob.resolve(),)


def test_ollama_model_not_found_says_why(tmp_path: Path, store: Path) -> None:
    roots = SearchRoots(ollama=(store,), models_dirs=(tmp_path / "models",))
    found = find_weights(model(upstream="qwen2.5:7b"), "ollama", roots, show_modelfile="FROM /nowhere/blob\n")
    assert not found.found and found.paths == ()
    assert found.reason == (
        "the /api/show modelfile names /nowhere/blob, which is not on this host; "
        f"no manifest for library/qwen2.5:7b under {store / 'manifests'}; "
        f"no planner.gguf or qwen2.5:7b.gguf under {tmp_path / 'models'}")


def test_models_dirs_match_by_name_for_any_backend(tmp_path: Path) -> None:
    gguf = write(tmp_path / "models" / "Planner.gguf")
    found = find_weights(model(), "openai", SearchRoots(models_dirs=(tmp_path / "models",)))
    assert found.paths == (gguf.resolve(),) and found.source == "models_dirs"


def test_no_places_to_look() -> None:
    assert find_weights(model(), "openai", SearchRoots()).reason == "no models_dirs to search"


def test_shared_file_is_one_canonical_path(tmp_path: Path) -> None:
    gguf = write(tmp_path / "real.gguf")
    (tmp_path / "alias.gguf").symlink_to(gguf)
    a = find_weights(model("a", gguf=str(gguf)), "llamacpp", SearchRoots())
    b = find_weights(model("b", gguf=str(tmp_path / "alias.gguf")), "llamacpp", SearchRoots())
    assert a.paths == b.paths


# -- every configured model ------------------------------------------------------------------------

def test_discover_all(tmp_path: Path, store: Path) -> None:
    gguf = write(tmp_path / "local.gguf")
    blob = add_model(store, ("registry.ollama.ai", "library", "qwen2.5", "7b"), [(MODEL, b"GGUF q")])[0]
    cfg = config_from_mapping({
        "backends": {"local": {"kind": "llamacpp"}, "near": {"kind": "ollama", "url": "http://127.0.0.1:11434"},
                     "far": {"kind": "ollama", "url": "http://192.0.2.7:11434"}},
        "models": {"small": {"backend": "local", "gguf": str(gguf)},
                   "planner": {"backend": "near", "upstream_name": "qwen2.5:7b"},
                   "remote": {"backend": "far", "upstream_name": "qwen2.5:7b"}},
    }, env={})
    found = discover_all(cfg, SearchRoots(ollama=(store,)))
    assert found["small"].paths == (gguf.resolve(),)
    assert found["planner"].paths == (blob.resolve(),)
    assert found["remote"].reason == "Ollama backend 'far' at http://192.0.2.7:11434 runs on another host"


@pytest.mark.parametrize(("url", "local"), [
    ("http://127.0.0.1:11434", True), ("http://localhost:11434", True), ("http://[::1]:11434", True),
    ("http://0.0.0.0:11434", True), ("http://192.0.2.7:11434", False), ("http://ollama.example:11434", False),
])
def test_is_local_url(url: str, local: bool) -> None:
    assert is_local_url(url) is local


def test_default_roots_follow_the_environment(tmp_path: Path) -> None:
    assert default_ollama_roots(None, {"OLLAMA_MODELS": "/srv/ollama"}) == (Path("/srv/ollama"),)
    assert default_ollama_roots("/cfg", {"OLLAMA_MODELS": "/srv/ollama"}) == (Path("/cfg"),)
    assert default_ollama_roots(None, {}, home=tmp_path)[0] == tmp_path / ".ollama" / "models"
    assert default_hf_root({"HF_HOME": "/hf"}) == Path("/hf/hub")
    assert default_hf_root({"HF_HUB_CACHE": "/c", "HF_HOME": "/hf"}) == Path("/c")
    assert default_hf_root({}, home=tmp_path) == tmp_path / ".cache" / "huggingface" / "hub"
