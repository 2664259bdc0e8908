"""The page cache, file by file: how much of a file is in RAM, and putting it there or taking it out.

Low level and synchronous (callers run it in a thread). Owns:

- `residency(path)`: bytes of the file in the page cache. With `cachestat(2)` (Linux 6.5+: one call per
  file, 3x cheaper on warm files, see benchmarks/residency_scan.py) where the kernel has it, else with
  `mincore(2)` over a read-only shared mapping, a window at a time so the per-page vector stays small.
  Neither reads data or faults a page in, so measuring never warms anything. They differ on pages
  still being read: mincore counts a page once its read completed, cachestat as soon as it is queued.
  Both refuse to tell a process about a file it neither owns nor may write (side-channel rules):
  cachestat fails with EPERM, but mincore *lies*, reporting every page resident. So mincore is used
  only where its answer is true, and a file no method may see is a `PageCacheError` saying so;
- `drop(path)`: `POSIX_FADV_DONTNEED`. Only clean, unmapped pages go: pages some process (a llama.cpp
  server) has mapped stay, and so do dirty ones (weight files are read-only, so there are none);
- three ways to warm: `warm_read` (sequential reads into one reused buffer, paced to a byte rate and
  interruptible between chunks), `warm_madvise` (asks the kernel for readahead and returns once it has
  been asked) and `MlockPin` (maps and locks the file: the kernel may not evict it until `close()`).

Every failure names the file: `PageCacheError` (an `OSError`) for a file that cannot be opened or
mapped, `MlockLimitError` when `RLIMIT_MEMLOCK` is too small to pin a file.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import mmap
import os
import resource
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "PAGE_SIZE",
    "Method",
    "MlockLimitError",
    "MlockPin",
    "PageCacheError",
    "Residency",
    "drop",
    "readahead_bytes",
    "residency",
    "warm_madvise",
    "warm_read",
]

PAGE_SIZE = mmap.PAGESIZE
SCAN_WINDOW = 1 << 30  # bytes mapped per mincore call: a 256 KiB vector for 4 KiB pages
READ_CHUNK = 4 << 20
SYS_CACHESTAT = 451  # the same number on every architecture (new syscalls share one table)
CAP_FOWNER = 3
DEFAULT_READAHEAD = 128 << 10  # the kernel's default read_ahead_kb, when sysfs does not say
MAX_SLEEP_SLICE = 0.1  # a paced reader sleeps at most this long before asking should_stop again

StopCheck = Callable[[], bool]
Progress = Callable[[int], None]

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int64]
for _name in ("munmap", "mlock", "munlock"):
    getattr(_libc, _name).argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long
_MAP_FAILED = ctypes.c_void_p(-1).value
# mincore sets bit 0 of each byte for a resident page; the other bits are reserved, so mask them.
_LOW_BIT = bytes(i & 1 for i in range(256))


class PageCacheError(OSError):
    """A weight file could not be measured, warmed or dropped; the message names the file."""

    def __init__(self, err: int, message: str, path: str | os.PathLike[str]) -> None:
        super().__init__(err, message)
        self.filename = os.fspath(path)

    def __str__(self) -> str:
        return str(self.strerror)


class MlockLimitError(PageCacheError):
    """RLIMIT_MEMLOCK (or the lack of CAP_IPC_LOCK) keeps a weight file from being pinned."""


@dataclass(frozen=True, slots=True)
class Residency:
    bytes_total: int
    bytes_resident: int

    @property
    def fraction(self) -> float:
        """Share of the file in RAM; an empty file counts as fully resident (nothing to read)."""
        return self.bytes_resident / self.bytes_total if self.bytes_total else 1.0

    @property
    def percent(self) -> float:
        return 100.0 * self.fraction

    def __add__(self, other: Residency) -> Residency:
        return Residency(self.bytes_total + other.bytes_total, self.bytes_resident + other.bytes_resident)


# -- opening and mapping ---------------------------------------------------------------------------

@contextlib.contextmanager
def _opened(path: str | os.PathLike[str], purpose: str) -> Iterator[tuple[int, int]]:
    """(fd, size) of a regular file opened read-only; a clear PageCacheError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise PageCacheError(exc.errno or errno.EIO, f"cannot {purpose} weight file {path}: {exc.strerror}",
                             path) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PageCacheError(errno.EINVAL, f"cannot {purpose} {path}: not a regular file", path)
        yield fd, info.st_size
    finally:
        os.close(fd)


def _map(fd: int, offset: int, length: int, path: str | os.PathLike[str]) -> int:
    # libc's mmap rather than the mmap module: mincore, madvise and mlock need the address, which the
    # module does not expose for a read-only mapping.
    addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
    if addr in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise PageCacheError(err, f"cannot map weight file {path}: {os.strerror(err)}", path)
    return int(addr)


@contextlib.contextmanager
def _mapped(fd: int, offset: int, length: int, path: str | os.PathLike[str]) -> Iterator[int]:
    addr = _map(fd, offset, length, path)
    try:
        yield addr
    finally:
        _libc.munmap(addr, length)


def _pages(length: int) -> int:
    return -(-length // PAGE_SIZE)


# -- measuring ---------------------------------------------------------------------------------------

Method = Literal["auto", "cachestat", "mincore"]  # auto: cachestat where the kernel has it, else mincore


def residency(path: str | os.PathLike[str], *, method: Method = "auto") -> Residency:
    """How many bytes of the file are in the page cache now. Reads no data and faults no page in."""
    with _opened(path, "measure") as (fd, size):
        if size == 0:
            return Residency(0, 0)
        if method in ("auto", "cachestat"):
            pages = _cachestat_pages(fd, 0, 0)
            if pages is not None:
                last_resident = _cachestat_pages(fd, _last_page(size), 0) == 1
                return Residency(size, _resident_bytes(size, pages, last_resident))
            if method == "cachestat":
                raise PageCacheError(errno.ENOSYS, f"cannot measure {path}: no cachestat(2) here", path)
        _require_truthful_mincore(fd, path)
        return _mincore_residency(fd, size, path)


def _last_page(size: int) -> int:
    return (_pages(size) - 1) * PAGE_SIZE


def _resident_bytes(size: int, pages: int, last_resident: bool) -> int:
    # The last page is partly past the end of the file: count only the file's bytes in it.
    tail_slack = _pages(size) * PAGE_SIZE - size
    return pages * PAGE_SIZE - (tail_slack if last_resident else 0)


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


def _cachestat_pages(fd: int, offset: int, length: int) -> int | None:
    """Pages of [offset, offset+length) (length 0: to the end) in the page cache, or None when the kernel
    has no cachestat (ENOSYS), a seccomp filter blocks it, or it will not tell this process (EPERM)."""
    stat_, where = _Cachestat(), _CachestatRange(offset, length)
    if _libc.syscall(ctypes.c_long(SYS_CACHESTAT), ctypes.c_int(fd), ctypes.byref(where),
                     ctypes.byref(stat_), ctypes.c_uint(0)) != 0:
        return None
    return int(stat_.nr_cache)


def _require_truthful_mincore(fd: int, path: str | os.PathLike[str]) -> None:
    """mincore reports every page of a file resident unless the process owns it, may write it, or has
    CAP_FOWNER (mm/mincore.c, can_do_mincore, since Linux 5.0): refuse rather than report a false 100%."""
    if os.fstat(fd).st_uid == os.geteuid() or _may_write(path) or _has_capability(CAP_FOWNER):
        return
    raise PageCacheError(errno.EPERM, (
        f"cannot measure {path}: the kernel shows page-cache residency only to a process that owns the "
        f"file or may write it (or has CAP_FOWNER); run warmpool as its owner or give it write access"), path)


def _may_write(path: str | os.PathLike[str]) -> bool:
    # As the kernel asks: with the effective ids, and false on a read-only mount.
    return os.access(path, os.W_OK, effective_ids=os.access in os.supports_effective_ids)


def _has_capability(cap: int) -> bool:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def _mincore_residency(fd: int, size: int, path: str | os.PathLike[str]) -> Residency:
    vec = bytearray(_pages(min(size, SCAN_WINDOW)))
    pages, last_resident = 0, False
    for offset in range(0, size, SCAN_WINDOW):
        bits = _page_bits(fd, offset, min(SCAN_WINDOW, size - offset), vec, path)
        pages += bits.count(1)
        last_resident = bits[-1] == 1
    return Residency(size, _resident_bytes(size, pages, last_resident))


def _page_bits(fd: int, offset: int, length: int, vec: bytearray, path: str | os.PathLike[str]) -> bytes:
    """One byte per page of [offset, offset+length): 1 if resident, else 0."""
    npages = _pages(length)
    with _mapped(fd, offset, length, path) as addr:
        buf = (ctypes.c_char * len(vec)).from_buffer(vec)
        if _libc.mincore(addr, length, buf) != 0:
            err = ctypes.get_errno()
            raise PageCacheError(err, f"mincore failed on {path}: {os.strerror(err)}", path)
    return bytes(memoryview(vec)[:npages]).translate(_LOW_BIT)


def _missing_chunks(fd: int, size: int, chunk: int, path: str | os.PathLike[str]) -> Iterator[int]:
    """Offsets of the `chunk`-sized pieces of the file that are not wholly resident (all of them when
    the kernel will not say)."""
    if _cachestat_pages(fd, 0, PAGE_SIZE) is not None:
        yield from (off for off in range(0, size, chunk)
                    if _cachestat_pages(fd, off, chunk) != _pages(min(chunk, size - off)))
        return
    try:
        _require_truthful_mincore(fd, path)
    except PageCacheError:
        yield from range(0, size, chunk)
        return
    yield from _mincore_missing_chunks(fd, size, chunk, path)


def _mincore_missing_chunks(fd: int, size: int, chunk: int, path: str | os.PathLike[str]) -> Iterator[int]:
    per_chunk = chunk // PAGE_SIZE
    span = max(1, SCAN_WINDOW // chunk) * chunk  # whole chunks per window
    vec = bytearray(_pages(min(size, span)))
    for window in range(0, size, span):
        bits = _page_bits(fd, window, min(span, size - window), vec, path)
        for start in range(0, len(bits), per_chunk):
            if 0 in bits[start:start + per_chunk]:
                yield window + start * PAGE_SIZE


# -- dropping ----------------------------------------------------------------------------------------

def drop(path: str | os.PathLike[str], offset: int = 0, length: int = 0) -> None:
    """Ask the kernel to drop the file's clean, unmapped pages in [offset, offset+length) (0 = to the end)."""
    with _opened(path, "drop") as (fd, _):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


# -- warming by reading ------------------------------------------------------------------------------

def warm_read(path: str | os.PathLike[str], *, rate_bytes_per_s: float | None = None,
              should_stop: StopCheck | None = None, chunk: int = READ_CHUNK,
              progress: Progress | None = None) -> int:
    """Read the file's missing parts into the page cache, at most `rate_bytes_per_s` (None or 0: as fast as
    the disk goes), asking `should_stop` between chunks. Returns the bytes read; `progress` gets the
    running total. Chunks already resident are skipped, so topping up a mostly warm file is cheap."""
    chunk = max(PAGE_SIZE, chunk // PAGE_SIZE * PAGE_SIZE)
    stop = should_stop or (lambda: False)
    with _opened(path, "warm") as (fd, size):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return _read_chunks(fd, size, chunk, _Pacer(rate_bytes_per_s, stop), progress, path)


def _read_chunks(fd: int, size: int, chunk: int, pacer: _Pacer, progress: Progress | None,
                 path: str | os.PathLike[str]) -> int:
    buf = memoryview(bytearray(chunk))
    done = 0
    # Listed before reading: once the WILLNEED below has queued the next chunk, cachestat counts its pages
    # (in flight) as cached, and a lazy check would skip it unread and unpaced.
    for offset in list(_missing_chunks(fd, size, chunk, path)):
        if pacer.stop():
            break
        # WILLNEED one chunk ahead, not over the whole file: the kernel would start with the whole
        # readahead window at full disk speed (and ignore the rest), and the rate would mean nothing.
        os.posix_fadvise(fd, offset + chunk, chunk, os.POSIX_FADV_WILLNEED)
        done += os.preadv(fd, [buf[:min(chunk, size - offset)]], offset)
        if progress is not None:
            progress(done)
        pacer.wait(done)
    return done


class _Pacer:
    """Sleeps just enough to keep the bytes read under a rate, waking early when told to stop."""

    def __init__(self, rate: float | None, stop: StopCheck) -> None:
        self.rate = rate or None
        self.stop = stop
        self.started = time.monotonic()

    def wait(self, done: int) -> None:
        if self.rate is None:
            return
        due = self.started + done / self.rate
        while (left := due - time.monotonic()) > 0 and not self.stop():
            time.sleep(min(left, MAX_SLEEP_SLICE))


# -- warming by advice -------------------------------------------------------------------------------

def warm_madvise(path: str | os.PathLike[str], *, should_stop: StopCheck | None = None,
                 chunk: int | None = None) -> int:
    """MADV_WILLNEED over the file, `chunk` bytes at a time: the kernel queues the reads and this returns
    without waiting for them (residency rises afterwards). Returns the bytes advised.

    Linux reads at most max(read_ahead_kb, max_sectors_kb) per WILLNEED call and silently ignores the
    rest of the range (mm/readahead.c, force_page_cache_ra), so one call over a whole file warms only
    its first few MiB. The default chunk is therefore the device's readahead size."""
    with _opened(path, "warm") as (fd, size):
        if size == 0:
            return 0
        step = max(PAGE_SIZE, (chunk or readahead_bytes(fd)) // PAGE_SIZE * PAGE_SIZE)
        with _mapped(fd, 0, size, path) as addr:
            return _advise_chunks(addr, size, step, should_stop or (lambda: False))


def readahead_bytes(fd: int) -> int:
    """The readahead size of the file's backing device (its BDI's read_ahead_kb), or the kernel default."""
    dev = os.fstat(fd).st_dev
    try:
        text = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").read_text()
        return max(PAGE_SIZE, int(text) * 1024)
    except (OSError, ValueError):
        return DEFAULT_READAHEAD


def _advise_chunks(addr: int, size: int, chunk: int, stop: StopCheck) -> int:
    advised = 0
    for offset in range(0, size, chunk):
        if stop():
            break
        length = min(chunk, size - offset)
        _libc.madvise(addr + offset, length, mmap.MADV_WILLNEED)  # advice: a failure only means less warmth
        advised += length
    return advised


# -- pinning -----------------------------------------------------------------------------------------

class MlockPin:
    """A file mapped and locked in RAM until `close()`. Raises `MlockLimitError` when the soft
    RLIMIT_MEMLOCK is too small and cannot be raised far enough (it is raised to the hard limit, and
    further where the process is allowed to)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.addr = 0
        with _opened(path, "pin") as (fd, size):
            self.size = size
            if size:
                self.addr = _map(fd, 0, size, path)
        if size:
            self._lock()

    def __repr__(self) -> str:
        return f"<MlockPin {self.path} {self.size} bytes {'locked' if self.addr else 'closed'}>"

    def __enter__(self) -> MlockPin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _lock(self) -> None:
        err = _mlock(self.addr, self.size)
        if err and err in (errno.ENOMEM, errno.EPERM) and _raise_memlock_limit():
            err = _mlock(self.addr, self.size)
        if err:
            self.close()
            raise _mlock_error(err, self.path, self.size)

    def close(self) -> None:
        """Unlock and unmap; the pages stay cached until the kernel (or `drop`) evicts them."""
        if self.addr:
            _libc.munlock(self.addr, self.size)
            _libc.munmap(self.addr, self.size)
            self.addr = 0


def _mlock(addr: int, size: int) -> int:
    """0, or the errno of a failed mlock."""
    return 0 if _libc.mlock(addr, size) == 0 else ctypes.get_errno()


def _raise_memlock_limit() -> bool:
    """Lift the soft RLIMIT_MEMLOCK: to unlimited where permitted (root with CAP_SYS_RESOURCE), else to the
    hard limit. True if it changed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    for wanted in ((resource.RLIM_INFINITY, resource.RLIM_INFINITY), (hard, hard)):
        if wanted[0] == soft and wanted[1] == hard:
            continue
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_MEMLOCK, wanted)
            return True
    return False


def _mlock_error(err: int, path: Path, size: int) -> PageCacheError:
    if err not in (errno.ENOMEM, errno.EPERM):
        return PageCacheError(err, f"cannot pin weight file {path} ({size} bytes): {os.strerror(err)}", path)
    soft, hard = (_limit_text(v) for v in resource.getrlimit(resource.RLIMIT_MEMLOCK))
    return MlockLimitError(err, (
        f"cannot pin weight file {path} ({size} bytes): RLIMIT_MEMLOCK is {soft} (hard {hard}) and "
        f"{_locked_bytes()} bytes are already locked by this process; raise the limit (ulimit -l, systemd "
        f"LimitMEMLOCK=, memlock in /etc/security/limits.conf), grant CAP_IPC_LOCK, or use strategy 'read'"),
        path)


def _limit_text(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else f"{value} bytes"


def _locked_bytes() -> int:
    """VmLck of this process, in bytes (0 where /proc is not available)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmLck:"):
                return int(line.split()[1]) * 1024
    return 0
