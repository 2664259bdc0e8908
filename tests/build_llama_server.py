"""Build llama.cpp's `llama-server` from the sources the llama-cpp-python sdist vendors, once, and cache it.

The tests of `kind: command` run a real llama-server. PyPI ships no llama-server binary, but the
llama-cpp-python sdist carries the whole llama.cpp tree under vendor/llama.cpp (tools/server included);
this script downloads the sdist of the llama-cpp-python version installed here (same llama.cpp as the
llamacpp kind runs), configures it with CMake using the portable CPU flags the Makefile uses for
llama-cpp-python, builds only the `llama-server` target and keeps the binary under

    ${XDG_CACHE_HOME:-~/.cache}/warmpool/llama-server/<version>-<flags digest>/llama-server

so a machine pays the build once (CI once per run). `WARMPOOL_LLAMA_SERVER` names a binary to use instead.

    python tests/build_llama_server.py          # build if missing; print the binary's path
    python tests/build_llama_server.py --check  # print the path or the reason it cannot be built; no build

Exit status 0 with the path on stdout; 2 when the sources cannot be obtained (the tests then skip with
that reason); 1 when the build itself fails (the tests then fail: a broken build is not a skip).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "llama_cpp_python"
BINARY = "llama-server"
OVERRIDE_ENV = "WARMPOOL_LLAMA_SERVER"
JOBS = os.environ.get("WARMPOOL_BUILD_JOBS", "2")
# The Makefile's portable CPU flags (a native build crashed at the first decode on the CPUs we test on),
# only the server, no network at build or run time: no prebuilt web UI download, no HTTPS client.
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # one relocatable binary to cache
    "-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_AVX512=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF",
    "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_COMMON=ON",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
]


class SourcesUnavailable(Exception):
    """The llama.cpp sources could not be obtained: the tests that need llama-server skip with this."""


class BuildFailed(Exception):
    """The sources were there and the build broke: the tests that need llama-server fail with this."""


def installed_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise SourcesUnavailable(f"{PACKAGE} is not installed: no version to take llama.cpp's sources from") from exc


def cache_dir(version: str) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(" ".join(CMAKE_FLAGS).encode()).hexdigest()[:10]
    return root / "warmpool" / BINARY / f"{version}-{digest}"


def cached_binary() -> Path | None:
    """The binary to use if it exists already (the override, or this version's cached build)."""
    override = os.environ.get(OVERRIDE_ENV)
    if override:
        return Path(override) if os.access(override, os.X_OK) else None
    binary = cache_dir(installed_version()) / BINARY
    return binary if os.access(binary, os.X_OK) else None


def ensure_llama_server(log: bool = True) -> Path:
    """The path of a working llama-server, building it first when no cached one exists."""
    override = os.environ.get(OVERRIDE_ENV)
    if override:
        if not os.access(override, os.X_OK):
            raise BuildFailed(f"{OVERRIDE_ENV}={override} is not an executable file")
        return Path(override)
    version = installed_version()
    target = cache_dir(version)
    target.mkdir(parents=True, exist_ok=True)
    with _exclusive(target / ".lock"):  # another test process or worktree may be building the same one
        binary = target / BINARY
        if os.access(binary, os.X_OK):
            return binary
        started = time.monotonic()
        sources = _unpacked_sources(version, target, log)
        _build(sources, target / "build", log)
        built = target / "build" / "bin" / BINARY
        if not built.exists():
            raise BuildFailed(f"the build finished without {built}")
        shutil.copy2(built, target / f".{BINARY}.tmp")
        os.replace(target / f".{BINARY}.tmp", binary)
        (target / "build-seconds").write_text(f"{time.monotonic() - started:.0f}\n")
        shutil.rmtree(target / "build", ignore_errors=True)  # ~200 MB of objects, not needed again
        shutil.rmtree(target / "src", ignore_errors=True)
        _say(log, f"built {binary} in {time.monotonic() - started:.0f} s")
        return binary


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _unpacked_sources(version: str, target: Path, log: bool) -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist, unpacked under `target`/src."""
    unpacked = target / "src" / f"{PACKAGE}-{version}" / "vendor" / "llama.cpp"
    if (unpacked / "tools" / "server").is_dir():
        return unpacked
    with tempfile.TemporaryDirectory(prefix="llama-sdist-") as download:
        _say(log, f"downloading the {PACKAGE}=={version} sdist (llama.cpp sources)")
        command = [sys.executable, "-m", "pip", "download", f"{PACKAGE}=={version}", "--no-binary", ":all:",
                   "--no-deps", "--quiet", "-d", download]
        result = subprocess.run(command, capture_output=True, text=True)
        archives = list(Path(download).glob("*.tar.gz"))
        if result.returncode != 0 or not archives:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise SourcesUnavailable(f"cannot download the {PACKAGE}=={version} sdist: {' | '.join(tail)}")
        prefix = f"{PACKAGE}-{version}/vendor/llama.cpp/"
        with tarfile.open(archives[0]) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
            if not members:
                raise SourcesUnavailable(f"the {PACKAGE}=={version} sdist has no vendor/llama.cpp")
            archive.extractall(target / "src", members=members, filter="data")
    return unpacked


def _build(sources: Path, build: Path, log: bool) -> None:
    if shutil.which("cmake") is None:
        raise SourcesUnavailable("cmake is not installed (apt-get install cmake g++)")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _say(log, f"configuring llama.cpp in {build}")
    _run(["cmake", "-S", str(sources), "-B", str(build), *generator, *CMAKE_FLAGS], "cmake configure")
    _say(log, f"building {BINARY} with {JOBS} jobs (several minutes)")
    _run(["cmake", "--build", str(build), "--target", BINARY, "-j", JOBS], "cmake build")


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-30:])
        raise BuildFailed(f"{what} failed (exit {result.returncode}):\n{tail}")


def _say(log: bool, message: str) -> None:
    if log:
        print(f"build_llama_server: {message}", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="report the cached binary; build nothing")
    args = parser.parse_args()
    try:
        binary = cached_binary() if args.check else ensure_llama_server()
    except SourcesUnavailable as exc:
        print(f"build_llama_server: {exc}", file=sys.stderr)
        return 2
    except BuildFailed as exc:
        print(f"build_llama_server: {exc}", file=sys.stderr)
        return 1
    if binary is None:
        print("build_llama_server: not built yet", file=sys.stderr)
        return 2
    print(binary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
