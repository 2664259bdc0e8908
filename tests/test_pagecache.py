"""Tests for warmpool.ramtier.pagecache on real files: residency checked against posix_fadvise, the three warming
strategies, dropping, and the errors (missing files, RLIMIT_MEMLOCK in a child process)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from warmpool.ramtier import pagecache
from warmpool.ramtier.pagecache import PAGE_SIZE, Method, MlockLimitError, MlockPin, PageCacheError, Residency

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[1]


BLOCK = os.urandom(4 * MiB)  # the page cache does not deduplicate, so repeating one random block is fine


def cold_file(path: Path, size: int) -> Path:
    """A file of random bytes (not sparse: every page is on disk), out of the page cache."""
    with open(path, "wb") as f:
        for offset in range(0, size, len(BLOCK)):
            f.write(BLOCK[:min(len(BLOCK), size - offset)])
        f.flush()
        os.fsync(f.fileno())  # dirty pages cannot be dropped
    pagecache.drop(path)
    return path


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def big(tmp_path: Path) -> Path:
    return cold_file(tmp_path / "weights.gguf", 64 * MiB)


def cachestat_works(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.write_bytes(b"x")
    try:
        pagecache.residency(probe, method="cachestat")
    except PageCacheError:
        return False
    return True


@pytest.fixture(params=["mincore", "cachestat"])
def method(request: pytest.FixtureRequest, tmp_path: Path) -> Method:
    """Each measuring test runs with both ways of measuring (cachestat where the kernel has it)."""
    if request.param == "cachestat" and not cachestat_works(tmp_path):
        pytest.skip("no cachestat(2) here (Linux < 6.5, or blocked)")
    return request.param  # type: ignore[no-any-return]


# -- measuring, checked against the kernel's own advice ---------------------------------------------

def test_dropped_file_is_not_resident(big: Path, method: Method) -> None:
    measured = pagecache.residency(big, method=method)
    assert measured.bytes_total == 64 * MiB
    assert measured.fraction < 0.01


def test_fadvise_willneed_shows_up_as_resident(big: Path, method: Method) -> None:
    fd = os.open(big, os.O_RDONLY)
    try:
        # Per MiB: one WILLNEED over the whole file reads only the first readahead window (see warm_madvise).
        for offset in range(0, 64 * MiB, MiB):
            os.posix_fadvise(fd, offset, MiB, os.POSIX_FADV_WILLNEED)
        # mincore counts a page once its read has completed (cachestat as soon as it is queued), and
        # DONTNEED cannot drop a page still being read: wait for the reads.
        assert wait_for(lambda: pagecache.residency(big, method="mincore").fraction > 0.99)
        assert pagecache.residency(big, method=method).fraction > 0.99
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert pagecache.residency(big, method=method).bytes_resident == 0
    finally:
        os.close(fd)


def test_half_dropped_file_is_half_resident(big: Path, method: Method) -> None:
    pagecache.warm_read(big)
    pagecache.drop(big, 0, 32 * MiB)
    assert pagecache.residency(big, method=method).percent == pytest.approx(50.0, abs=0.5)


def test_mincore_across_scan_windows(big: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small windows exercise the windowing with an odd-sized hole spanning several of them.
    monkeypatch.setattr(pagecache, "SCAN_WINDOW", 1 * MiB)
    pagecache.warm_read(big)
    pagecache.drop(big, 3 * MiB + 5 * PAGE_SIZE, 7 * MiB)
    assert pagecache.residency(big, method="mincore").bytes_resident == 64 * MiB - 7 * MiB
    assert pagecache.warm_read(big, chunk=MiB) == 8 * MiB  # the hole touches eight 1 MiB chunks


def test_the_partial_last_page_counts_only_the_file_bytes(tmp_path: Path, method: Method) -> None:
    path = cold_file(tmp_path / "odd.bin", 3 * PAGE_SIZE + 100)
    pagecache.warm_read(path)
    assert pagecache.residency(path, method=method) == Residency(3 * PAGE_SIZE + 100, 3 * PAGE_SIZE + 100)
    pagecache.drop(path, 3 * PAGE_SIZE, 0)
    assert pagecache.residency(path, method=method) == Residency(3 * PAGE_SIZE + 100, 3 * PAGE_SIZE)
    pagecache.warm_read(path)
    pagecache.drop(path, 0, PAGE_SIZE)
    assert pagecache.residency(path, method=method) == Residency(3 * PAGE_SIZE + 100, 2 * PAGE_SIZE + 100)


def test_measuring_does_not_warm(big: Path, method: Method) -> None:
    for _ in range(3):
        pagecache.residency(big, method=method)
    assert pagecache.residency(big, method=method).bytes_resident == 0


def test_zero_length_file(tmp_path: Path, method: Method) -> None:
    empty = tmp_path / "empty.gguf"
    empty.touch()
    assert pagecache.residency(empty, method=method) == Residency(0, 0)
    assert pagecache.residency(empty).fraction == 1.0
    assert pagecache.warm_read(empty) == 0
    assert pagecache.warm_madvise(empty) == 0
    pagecache.drop(empty)
    with MlockPin(empty) as pin:
        assert pin.size == 0


# -- warming ---------------------------------------------------------------------------------------

def test_warm_read_makes_the_file_resident(big: Path) -> None:
    seen: list[int] = []
    assert pagecache.warm_read(big, progress=seen.append) == 64 * MiB
    assert pagecache.residency(big).fraction > 0.99
    assert seen == sorted(seen) and seen[-1] == 64 * MiB


def test_warm_read_reads_only_what_is_missing(big: Path) -> None:
    pagecache.warm_read(big)
    assert pagecache.warm_read(big) == 0
    pagecache.drop(big, 16 * MiB, 8 * MiB)
    assert pagecache.warm_read(big) == 8 * MiB
    assert pagecache.residency(big).fraction > 0.99


def test_warm_read_stops_when_told(big: Path) -> None:
    asked = [0]

    def stop_after_three_chunks() -> bool:
        asked[0] += 1
        return asked[0] > 3

    read = pagecache.warm_read(big, should_stop=stop_after_three_chunks, chunk=4 * MiB)
    assert read == 12 * MiB
    # The kernel's readahead may have brought in a little more than was read.
    assert 12 * MiB <= pagecache.residency(big).bytes_resident < 48 * MiB


def test_warm_read_keeps_to_its_rate(tmp_path: Path) -> None:
    path = cold_file(tmp_path / "paced.bin", 16 * MiB)
    started = time.monotonic()
    pagecache.warm_read(path, rate_bytes_per_s=64 * MiB, chunk=1 * MiB)
    assert time.monotonic() - started >= 0.2  # 16 MiB at 64 MiB/s: at least ~0.23 s (a lower bound only)


def test_warm_madvise_returns_and_the_kernel_reads(big: Path) -> None:
    assert pagecache.warm_madvise(big) == 64 * MiB
    assert wait_for(lambda: pagecache.residency(big).fraction > 0.99)


def test_one_willneed_over_a_big_range_warms_only_its_start(big: Path) -> None:
    # The kernel behaviour warm_madvise works around: if this ever warms the whole file, the chunking
    # could go.
    assert pagecache.warm_madvise(big, chunk=64 * MiB) == 64 * MiB
    time.sleep(0.5)
    assert pagecache.residency(big).bytes_resident < 32 * MiB  # here: 8 MiB, the device's read_ahead_kb


def test_warm_madvise_stops_when_told(big: Path) -> None:
    assert pagecache.warm_madvise(big, should_stop=lambda: True) == 0


def test_drop_after_warming(big: Path) -> None:
    pagecache.warm_read(big)
    pagecache.drop(big)
    assert pagecache.residency(big).bytes_resident == 0


# -- pinning ---------------------------------------------------------------------------------------

def locked_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1]) * 1024
    return 0


def test_mlock_pins_the_file_until_closed(tmp_path: Path) -> None:
    path = cold_file(tmp_path / "small.gguf", 2 * MiB)
    before = locked_bytes()
    pin = MlockPin(path)
    try:
        assert pagecache.residency(path).fraction == 1.0
        assert locked_bytes() - before == 2 * MiB
        pagecache.drop(path)  # locked pages cannot be dropped
        assert pagecache.residency(path).fraction == 1.0
    finally:
        pin.close()
    assert locked_bytes() == before
    pin.close()  # twice is harmless


# The child lowers RLIMIT_MEMLOCK (soft and hard) and gives up CAP_IPC_LOCK (which ignores the limit) and
# CAP_SYS_RESOURCE (which may raise it again), as a process without privileges would be.
CHILD = textwrap.dedent("""
    import ctypes, resource, sys
    from warmpool.ramtier.pagecache import MlockLimitError, MlockPin

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [(name, ctypes.c_uint32) for name in ("effective", "permitted", "inheritable")]

    def drop_capabilities(*caps):
        libc = ctypes.CDLL(None, use_errno=True)
        header, data = Header(0x20080522, 0), (Data * 2)()
        if libc.capget(ctypes.byref(header), data) != 0:
            return
        for cap in caps:
            word = data[cap // 32]
            word.effective &= ~(1 << cap % 32)
            word.permitted &= ~(1 << cap % 32)
        assert libc.capset(ctypes.byref(header), data) == 0, ctypes.get_errno()

    path, soft, hard = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard))
    drop_capabilities(14, 24)  # CAP_IPC_LOCK, CAP_SYS_RESOURCE
    try:
        with MlockPin(path):
            print("pinned", *resource.getrlimit(resource.RLIMIT_MEMLOCK))
    except MlockLimitError as exc:
        print("error", exc)
""")


def run_child(path: Path, soft: int, hard: int) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), str(soft), str(hard)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def current_hard_limit() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]


def test_mlock_over_the_limit_names_rlimit_memlock(tmp_path: Path) -> None:
    path = cold_file(tmp_path / "pinned.gguf", 4 * MiB)
    out = run_child(path, 1 * MiB, 1 * MiB)
    assert out.startswith("error ")
    assert "RLIMIT_MEMLOCK is 1048576 bytes (hard 1048576 bytes)" in out
    assert str(path) in out and "4194304 bytes" in out


def test_mlock_raises_the_soft_limit_to_the_hard_one(tmp_path: Path) -> None:
    hard = min(current_hard_limit(), 64 * MiB)
    if hard < 8 * MiB:
        pytest.skip(f"the hard RLIMIT_MEMLOCK here is only {hard} bytes")
    path = cold_file(tmp_path / "pinned.gguf", 4 * MiB)
    assert run_child(path, 1 * MiB, hard) == f"pinned {hard} {hard}"


# -- files the kernel will not describe -------------------------------------------------------------

# mincore reports every page of a file resident to a process that neither owns it nor may write it (and
# cachestat refuses). The child measures, as user nobody, a file root owns, like warmpool running as
# itself over the blobs of an Ollama service.
NOBODY = textwrap.dedent("""
    import os, sys
    from warmpool.ramtier import pagecache
    os.setgid(65534)
    os.setuid(65534)
    path = sys.argv[1]
    for method in ("mincore", "auto"):
        try:
            print(method, pagecache.residency(path, method=method))
        except pagecache.PageCacheError as exc:
            print(method, "error", exc)
    print("read", pagecache.warm_read(path))
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_a_file_the_kernel_will_not_describe_is_an_error_not_a_false_100_percent() -> None:
    directory = Path(tempfile.mkdtemp(prefix="warmpool-nobody-"))
    try:
        directory.chmod(0o755)
        path = cold_file(directory / "blob", 8 * MiB)
        path.chmod(0o644)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        done = subprocess.run([sys.executable, "-c", NOBODY, str(path)], env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        for line in lines[:2]:
            assert "error cannot measure" in line and "owns the file or may write it" in line
        assert lines[2] == f"read {8 * MiB}"  # nothing skipped on the strength of a lie
    finally:
        shutil.rmtree(directory)


# -- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("operation", [pagecache.residency, pagecache.drop, pagecache.warm_read,
                                       pagecache.warm_madvise, MlockPin])
def test_a_missing_file_is_a_clear_error(tmp_path: Path, operation: Callable[[Path], object]) -> None:
    missing = tmp_path / "gone.gguf"
    with pytest.raises(PageCacheError) as info:
        operation(missing)
    assert info.value.errno == errno.ENOENT
    assert str(missing) in str(info.value) and "No such file" in str(info.value)
    assert info.value.filename == str(missing)


def test_a_directory_is_not_a_weight_file(tmp_path: Path) -> None:
    with pytest.raises(PageCacheError, match="not a regular file"):
        pagecache.residency(tmp_path)


def test_mlock_limit_error_is_a_page_cache_error() -> None:
    assert issubclass(MlockLimitError, PageCacheError) and issubclass(PageCacheError, OSError)
