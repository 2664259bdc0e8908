"""Where a model's weights live on disk: the files the RAM tier measures and warms.

Owns the lookup, and nothing else (no page-cache work, no HTTP):

- managed llama.cpp models: the `gguf` of their config, with every part of a split GGUF;
- Ollama models: the Ollama model store (`manifests/<host>/<namespace>/<model>/<tag>` → the layers with
  a weight media type → `blobs/sha256-<hex>`), or the `FROM` lines of `/api/show`'s modelfile, which
  name the blobs by absolute path (meaningful only when Ollama runs on this host);
- any model: `*.gguf` files under configured `models_dirs` and in the Hugging Face hub cache, matched by
  file name (stem) against the model's name or upstream name.

A model whose files cannot be found is still served; `WeightFiles.reason` says why it has no RAM tier.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import socket
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from urllib.parse import urlsplit

from warmpool.config import Config, ModelConfig

__all__ = [
    "WEIGHT_MEDIA_TYPES",
    "OllamaName",
    "SearchRoots",
    "WeightFiles",
    "discover_all",
    "find_weights",
    "from_modelfile",
    "hf_cache_ggufs",
    "is_local_url",
    "modelfile_paths",
    "ollama_blob",
    "ollama_blobs",
    "scan_dirs",
    "split_parts",
]

MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
# Everything Ollama reads from disk when it loads the model: the GGUF, a vision projector, LoRA adapters.
WEIGHT_MEDIA_TYPES = (MODEL_MEDIA_TYPE, "application/vnd.ollama.image.projector",
                      "application/vnd.ollama.image.adapter")
OLLAMA_SERVICE_STORE = Path("/usr/share/ollama/.ollama/models")  # the Linux install script's `ollama` user
_SPLIT = re.compile(r"^(?P<base>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class WeightFiles:
    """A model's weight files (canonical absolute paths), or why there are none."""

    paths: tuple[Path, ...] = ()
    reason: str | None = None  # set exactly when `paths` is empty
    source: str = ""  # gguf | modelfile | ollama store | models_dirs | hf cache

    @property
    def found(self) -> bool:
        return bool(self.paths)


def _found(paths: Iterable[Path], source: str) -> WeightFiles:
    return WeightFiles(tuple(dict.fromkeys(p.resolve() for p in paths)), None, source)


# -- Ollama names and the model store ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class OllamaName:
    """`[host/][namespace/]model[:tag]`, with Ollama's defaults filled in."""

    host: str = "registry.ollama.ai"
    namespace: str = "library"
    model: str = ""
    tag: str = "latest"

    @classmethod
    def parse(cls, name: str) -> OllamaName:
        rest = name.strip().split("@", 1)[0].split("://", 1)[-1]  # no digest, no scheme
        tag = "latest"
        if rest.rfind(":") > rest.rfind("/"):  # a ':' before the last '/' is a host's port
            rest, tag = rest.rsplit(":", 1)
        *prefix, model = rest.split("/")
        namespace = prefix[-1] if prefix else "library"
        host = "/".join(prefix[:-1]) or "registry.ollama.ai"
        return cls(host, namespace, model, tag or "latest")

    @property
    def parts(self) -> tuple[str, str, str, str]:
        return self.host, self.namespace, self.model, self.tag

    def __str__(self) -> str:
        prefix = "" if self.host == "registry.ollama.ai" else f"{self.host}/"
        return f"{prefix}{self.namespace}/{self.model}:{self.tag}"


def ollama_blob(models_root: Path, name: str) -> Path | None:
    """The GGUF blob of an Ollama model in the store at `models_root`, or None."""
    paths, _ = _ollama_layers(models_root, OllamaName.parse(name), (MODEL_MEDIA_TYPE,))
    return paths[0] if paths else None


def ollama_blobs(models_root: Path, name: str) -> tuple[list[Path], str | None]:
    """Every weight blob (model, projector, adapters) of an Ollama model, or ([], why not)."""
    return _ollama_layers(models_root, OllamaName.parse(name), WEIGHT_MEDIA_TYPES)


def _ollama_layers(root: Path, name: OllamaName,
                   media_types: tuple[str, ...]) -> tuple[list[Path], str | None]:
    manifests = root / "manifests"
    manifest = _casefold_path(manifests, name.parts)
    if manifest is None:
        return [], f"no manifest for {name} under {manifests}"
    digests = _layer_digests(manifest, media_types)
    if isinstance(digests, str):
        return [], digests
    blobs = [_blob_path(root, digest) for digest in digests]
    missing = [d for d, b in zip(digests, blobs, strict=True) if b is None]
    if missing:
        return [], f"manifest {manifest} names blob {missing[0]}, which is not in {root / 'blobs'}"
    return [b for b in blobs if b is not None], None


def _casefold_path(base: Path, parts: Iterable[str]) -> Path | None:
    """base/part/part/..., matching each part exactly or, as Ollama does, case-insensitively."""
    path = base
    for part in parts:
        exact = path / part
        if exact.exists():
            path = exact
            continue
        folded = [c for c in _children(path) if c.name.casefold() == part.casefold()]
        if not folded:
            return None
        path = folded[0]
    return path if path.is_file() else None


def _children(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except OSError:
        return []


def _layer_digests(manifest: Path, media_types: tuple[str, ...]) -> list[str] | str:
    """The digests of the manifest's weight layers (model first), or a reason string."""
    try:
        layers = json.loads(manifest.read_text(encoding="utf-8")).get("layers") or []
    except (OSError, ValueError, AttributeError) as exc:
        return f"cannot read manifest {manifest}: {exc}"
    chosen = [layer for kind in media_types for layer in layers
              if isinstance(layer, dict) and layer.get("mediaType") == kind and layer.get("digest")]
    if not any(layer.get("mediaType") == MODEL_MEDIA_TYPE for layer in chosen):
        return f"manifest {manifest} has no layer of type {MODEL_MEDIA_TYPE}"
    return [str(layer["digest"]) for layer in chosen]


def _blob_path(root: Path, digest: str) -> Path | None:
    # Ollama names blobs sha256-<hex>; versions before 0.1.x used sha256:<hex>.
    for name in (digest.replace(":", "-"), digest):
        if (root / "blobs" / name).is_file():
            return root / "blobs" / name
    return None


# -- /api/show modelfiles ----------------------------------------------------------------------------

def modelfile_paths(text: str) -> list[Path]:
    """The absolute paths of a modelfile's FROM and ADAPTER lines, in order (model names are skipped)."""
    paths = []
    for line in _directives(text):
        words = _words(line)
        if len(words) >= 2 and words[0].upper() in ("FROM", "ADAPTER") and os.path.isabs(words[1]):
            paths.append(Path(words[1]))
    return paths


def from_modelfile(text: str) -> Path | None:
    """The weight file a modelfile's first FROM line names by absolute path, or None."""
    for line in _directives(text):
        words = _words(line)
        if len(words) >= 2 and words[0].upper() == "FROM":
            return Path(words[1]) if os.path.isabs(words[1]) else None
    return None


def _directives(text: str) -> Iterator[str]:
    """The lines that start a directive: not those inside a triple-quoted TEMPLATE, SYSTEM or LICENSE,
    where a line may well begin with "from /"."""
    quoted = False
    for line in text.splitlines():
        if not quoted:
            yield line
        quoted ^= line.count('"""') % 2 == 1


def _words(line: str) -> list[str]:
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return []
    try:
        return shlex.split(stripped, posix=True)[:2]
    except ValueError:  # an unbalanced quote in a TEMPLATE line, say
        return stripped.split(maxsplit=1)


# -- GGUF files on disk ------------------------------------------------------------------------------

def split_parts(path: Path) -> list[Path]:
    """All parts of a split GGUF (`name-00001-of-00003.gguf`) given any one of them; else [path]."""
    match = _SPLIT.match(path.name)
    if match is None:
        return [path]
    count, width = int(match["count"]), len(match["index"])
    names = (f"{match['base']}-{i:0{width}d}-of-{match['count']}.gguf" for i in range(1, count + 1))
    return [path.with_name(name) for name in names]


def _gguf_key(path: Path) -> str:
    """The name a GGUF is found by: its stem, without a split suffix."""
    match = _SPLIT.match(path.name)
    return (match["base"] if match else path.stem).casefold()


def scan_dirs(dirs: Iterable[Path]) -> dict[str, list[Path]]:
    """`*.gguf` under each directory (recursively), grouped by stem (lower case; split parts together).
    A stem found in an earlier directory wins over the same stem in a later one."""
    found: dict[str, list[Path]] = {}
    for directory in dirs:
        found.update({k: v for k, v in _group_ggufs(_ggufs_under(Path(directory))).items() if k not in found})
    return found


def _ggufs_under(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.rglob("*.gguf") if p.is_file())
    except OSError:
        return []


def _group_ggufs(paths: Iterable[Path]) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for path in paths:
        groups.setdefault(_gguf_key(path), []).append(path)
    return groups


def hf_cache_ggufs(root: Path | None = None) -> dict[str, list[Path]]:
    """GGUFs in the Hugging Face hub cache (`models--org--repo/snapshots/<rev>/…`), grouped by stem. The
    snapshot entries are symlinks into `blobs/`; callers resolve them."""
    root = root or default_hf_root()
    snapshots = sorted(root.glob("models--*/snapshots/*"), key=_mtime, reverse=True)  # newest revision wins
    return scan_dirs(snapshots)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


# -- where to look -----------------------------------------------------------------------------------

def default_ollama_roots(configured: str | None = None, env: Mapping[str, str] = os.environ,
                         home: Path | None = None) -> tuple[Path, ...]:
    """The Ollama stores to search: the configured one, else $OLLAMA_MODELS, else the user's and the
    Linux service's default stores."""
    if configured:
        return (Path(configured).expanduser(),)
    if env.get("OLLAMA_MODELS"):
        return (Path(env["OLLAMA_MODELS"]).expanduser(),)
    return ((home or Path.home()) / ".ollama" / "models", OLLAMA_SERVICE_STORE)


def default_hf_root(env: Mapping[str, str] = os.environ, home: Path | None = None) -> Path:
    """$HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub (huggingface_hub's own order)."""
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    return (home or Path.home()) / ".cache" / "huggingface" / "hub"


@dataclass
class SearchRoots:
    """Where to look, with the directory scans done once and shared by every model."""

    ollama: tuple[Path, ...] = ()
    models_dirs: tuple[Path, ...] = ()
    hf_cache: Path | None = None

    @classmethod
    def from_settings(cls, ollama_models: str | None = None, models_dirs: Iterable[str] = (),
                      hf_cache: str | None = None, env: Mapping[str, str] = os.environ) -> SearchRoots:
        hf = Path(hf_cache).expanduser() if hf_cache else default_hf_root(env)
        dirs = tuple(Path(d).expanduser() for d in models_dirs)
        return cls(default_ollama_roots(ollama_models, env), dirs, hf)

    @cached_property
    def dir_ggufs(self) -> dict[str, list[Path]]:
        return scan_dirs(self.models_dirs)

    @cached_property
    def hf_ggufs(self) -> dict[str, list[Path]]:
        return hf_cache_ggufs(self.hf_cache) if self.hf_cache else {}


# -- the lookup --------------------------------------------------------------------------------------

def find_weights(model: ModelConfig, backend_kind: str, roots: SearchRoots, *,
                 show_modelfile: str | None = None) -> WeightFiles:
    """The weight files of `model`, served by a backend of `backend_kind`, or the reason there are none."""
    if model.gguf:  # configured (llamacpp and command models)
        return _configured_gguf(Path(model.gguf).expanduser())
    reasons: list[str] = []
    if backend_kind == "ollama":
        found = _ollama_weights(model, roots, show_modelfile, reasons)
        if found is not None:
            return found
    return _by_name(model, roots) or WeightFiles(reason="; ".join([*reasons, _not_in_dirs(model, roots)]))


def _configured_gguf(path: Path) -> WeightFiles:
    parts = split_parts(path)
    missing = [p for p in parts if not p.is_file()]
    if missing:
        what = "gguf" if len(parts) == 1 else f"part {parts.index(missing[0]) + 1} of split gguf"
        return WeightFiles(reason=f"{what} {missing[0]} does not exist")
    return _found(parts, "gguf")


def _ollama_weights(model: ModelConfig, roots: SearchRoots, show_modelfile: str | None,
                    reasons: list[str]) -> WeightFiles | None:
    if show_modelfile is not None:
        paths = modelfile_paths(show_modelfile)
        if paths and all(p.is_file() for p in paths):
            return _found(paths, "modelfile")
        reasons.append(_modelfile_problem(paths))
    for root in roots.ollama:
        paths, reason = ollama_blobs(root, model.upstream_name)
        if paths:
            return _found(paths, "ollama store")
        reasons.append(str(reason))
    return None


def _modelfile_problem(paths: list[Path]) -> str:
    if not paths:
        return "the /api/show modelfile names no weight file by path"
    missing = next(p for p in paths if not p.is_file())
    return f"the /api/show modelfile names {missing}, which is not on this host"


def _by_name(model: ModelConfig, roots: SearchRoots) -> WeightFiles | None:
    keys = _name_keys(model)
    for source, index in (("models_dirs", roots.dir_ggufs), ("hf cache", roots.hf_ggufs)):
        for key in keys:
            if key in index:
                return _found(index[key], source)
    return None


def _name_keys(model: ModelConfig) -> list[str]:
    names = [model.name, model.upstream_name, model.upstream_name.removesuffix(":latest")]
    return list(dict.fromkeys(n.casefold() for n in names))


def _not_in_dirs(model: ModelConfig, roots: SearchRoots) -> str:
    where = [str(d) for d in roots.models_dirs] + ([str(roots.hf_cache)] if roots.hf_cache else [])
    names = " or ".join(f"{k}.gguf" for k in _name_keys(model))
    return f"no {names} under {', '.join(where)}" if where else "no models_dirs to search"


# -- every configured model --------------------------------------------------------------------------

def discover_all(cfg: Config, roots: SearchRoots,
                 show_modelfiles: Mapping[str, str] | None = None) -> dict[str, WeightFiles]:
    """WeightFiles for every configured model. `show_modelfiles` maps model names to the `modelfile` of
    their `/api/show`, for Ollama backends on this host."""
    show = show_modelfiles or {}
    return {name: _discover_one(cfg, model, roots, show.get(name)) for name, model in cfg.models.items()}


def _discover_one(cfg: Config, model: ModelConfig, roots: SearchRoots, modelfile: str | None) -> WeightFiles:
    backend = cfg.backends[model.backend]
    if backend.kind == "ollama" and backend.url and not is_local_url(backend.url):
        return WeightFiles(reason=f"Ollama backend {backend.name!r} at {backend.url} runs on another host")
    return find_weights(model, backend.kind, roots, show_modelfile=modelfile)


def is_local_url(url: str) -> bool:
    """Whether the URL's host is this machine: loopback, its host name, or one of its addresses."""
    host = (urlsplit(url).hostname or "").lower()
    if host in ("localhost", socket.gethostname().lower()) or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified or str(address) in _own_addresses()


def _own_addresses() -> set[str]:
    import psutil  # only needed for a non-loopback address

    return {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}
