"""The tile GEMM choice of the CPU op (vqdeploy.ops.gemm): measured once, cached, forcible, and the
tokens the same whichever library computes the tiles."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from vqdeploy.errors import UnsupportedOptionError
from vqdeploy.ops import cpu_kernels, gemm, nearest_code
from vqdeploy.ops.contract import nearest_code_exact

SMALL_PROBE = ((2048, 32, 256), (512, 64, 1024))


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache folder, no forced library, a small probe; the process forgets its choice."""
    monkeypatch.setenv(gemm.ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(gemm.ENV_GEMM, raising=False)
    monkeypatch.setattr(gemm, "PROBE_SHAPES", SMALL_PROBE)
    gemm.forget_cached_choice()
    yield tmp_path / "cache"
    gemm.forget_cached_choice()


def _child(code: str, cache: os.PathLike, **env: str) -> str:
    """Run code in a new process with this one's cache folder, probe and torch thread count (part of
    the choice's key: a test run earlier in this worker process may have left it changed)."""
    script = (
        f"import torch\ntorch.set_num_threads({torch.get_num_threads()})\n"
        "from vqdeploy.ops import gemm\n"
        f"gemm.PROBE_SHAPES = {SMALL_PROBE!r}\n" + code
    )
    environ = {k: v for k, v in os.environ.items() if k != gemm.ENV_GEMM}
    environ.update({gemm.ENV_CACHE_DIR: str(cache), **env})
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=environ)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_choice_is_measured_once_then_read_from_the_cache(fresh_cache, monkeypatch):
    calls = []
    real_measure = gemm.measure
    monkeypatch.setattr(gemm, "measure", lambda: calls.append(1) or real_measure())
    first = gemm.gemm_choice()
    assert first.library in gemm.LIBRARIES and first.source == "measured" and calls == [1]
    assert set(first.seconds) == {"torch", "numpy"} and all(len(v) == len(SMALL_PROBE) for v in first.seconds.values())
    stored = json.loads(open(first.path).read())
    assert stored["library"] == first.library and stored["key"] == gemm.choice_key()
    assert gemm.gemm_choice() is first  # the process keeps its answer
    gemm.forget_cached_choice()
    again = gemm.gemm_choice()
    assert (again.library, again.source, calls) == (first.library, "cached", [1])  # read, not measured
    # another process, same machine and libraries: the same library, from the file
    assert _child("c = gemm.gemm_choice(); print(c.library, c.source)", fresh_cache) == f"{first.library} cached"


@pytest.mark.parametrize("library", gemm.LIBRARIES)
def test_the_file_decides_for_every_process(fresh_cache, library):
    """Whatever the cache file says is used, so processes never disagree (the first writer wins)."""
    key = gemm.choice_key()
    path = gemm.cache_path(key)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"key": key, "library": library, "seconds": {}}))
    assert (gemm.gemm_choice().library, gemm.gemm_choice().source) == (library, "cached")
    assert _child("print(gemm.gemm_choice().library)", fresh_cache) == library
    assert not gemm._write_once(path, {"library": "other"})  # a later writer leaves the file alone
    assert json.loads(path.read_text())["library"] == library


def test_a_file_for_another_key_is_not_used(fresh_cache):
    key = gemm.choice_key()
    path = gemm.cache_path(key)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"key": {**key, "torch": "0.0"}, "library": "numpy"}))
    assert gemm.gemm_choice().source == "measured"


def test_the_key_holds_the_thread_count_and_the_blas_environment(fresh_cache, monkeypatch):
    threads = torch.get_num_threads()
    base = gemm.choice_key()
    assert base["threads"] == threads and base["cpu"] and base["torch"] == torch.__version__
    assert base["numpy"] == np.__version__
    try:
        torch.set_num_threads(1)
        assert gemm.choice_key()["threads"] == 1
        assert gemm.cache_path(gemm.choice_key()) != gemm.cache_path(base)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    assert gemm.choice_key()["env"] == {"OPENBLAS_CORETYPE": "Haswell"}
    assert gemm.cache_path(gemm.choice_key()) != gemm.cache_path(base)


@pytest.mark.parametrize("library", gemm.LIBRARIES)
def test_forcing_a_library(fresh_cache, monkeypatch, library):
    monkeypatch.setenv(gemm.ENV_GEMM, library.upper())
    choice = gemm.gemm_choice()
    assert (choice.library, choice.source) == (library, "forced (VQDEPLOY_GEMM)")
    assert not fresh_cache.exists()  # nothing measured, nothing written
    assert library in choice.describe()
    assert _child("print(gemm.gemm_choice().library)", fresh_cache, VQDEPLOY_GEMM=library) == library


def test_an_unknown_library_is_refused(fresh_cache, monkeypatch):
    monkeypatch.setenv(gemm.ENV_GEMM, "openblas")
    with pytest.raises(UnsupportedOptionError, match="VQDEPLOY_GEMM must be one of auto, torch, numpy; got 'openblas'"):
        gemm.gemm_choice()


def test_an_unwritable_cache_still_gives_a_choice(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(gemm.ENV_CACHE_DIR, str(blocker / "cache"))
    monkeypatch.delenv(gemm.ENV_GEMM, raising=False)
    monkeypatch.setattr(gemm, "PROBE_SHAPES", SMALL_PROBE)
    gemm.forget_cached_choice()
    try:
        choice = gemm.gemm_choice()
    finally:
        gemm.forget_cached_choice()
    assert choice.library in gemm.LIBRARIES and choice.source.startswith("measured (not cached")


def _near_tie_inputs(rows: int, dim: int, codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(rows + dim + codes)
    codebook = torch.randn(codes, dim, generator=generator)
    codebook[codes // 2] = codebook[0]  # duplicate codes: exact ties
    pairs = torch.randint(0, codes, (rows, 2), generator=generator)
    mid = 0.5 * (codebook[pairs[:, 0]] + codebook[pairs[:, 1]])  # midpoints: near ties
    x = torch.where(torch.rand(rows, 1, generator=generator) < 0.5, mid, torch.randn(rows, dim, generator=generator))
    return x, codebook


@pytest.mark.parametrize("rows, dim, codes", [(1, 1, 1), (9, 3, 2), (5003, 32, 256), (3000, 64, 4096), (700, 512, 1024)])
def test_tokens_are_identical_whichever_gemm(rows, dim, codes):
    x, codebook = _near_tie_inputs(rows, dim, codes)
    exact = nearest_code_exact(x, codebook)
    for library in gemm.LIBRARIES:
        assert torch.equal(cpu_kernels.nearest_code_cpu(x, codebook, gemm=library), exact), library
        # ragged small tiles, several per worker thread
        small = cpu_kernels.nearest_code_cpu(x, codebook, gemm=library, block_bytes=4 * codes * 37)
        assert torch.equal(small, exact), library


def test_the_per_core_tile_height_changes_no_token(monkeypatch):
    x, codebook = _near_tie_inputs(5003, 32, 256)
    exact = nearest_code_exact(x, codebook)
    for rows in (1, 37, 256, 5003):  # one row per tile, ragged tiles, the default, one tile
        monkeypatch.setattr(cpu_kernels, "PER_CORE_TILE_ROWS", rows)
        for variant in (x, x.t().contiguous().t(), -x):  # numpy slices, and the tile-by-tile conversion
            assert torch.equal(cpu_kernels.nearest_code_cpu(variant, codebook, gemm="numpy"),
                               nearest_code_exact(variant, codebook) if variant is not x else exact), rows


@pytest.mark.parametrize("library", gemm.LIBRARIES)
def test_the_op_follows_the_forced_library(fresh_cache, monkeypatch, library):
    monkeypatch.setenv(gemm.ENV_GEMM, library)
    x, codebook = _near_tie_inputs(4000, 16, 300)
    assert torch.equal(nearest_code(x, codebook), nearest_code_exact(x, codebook))
    layouts = [x.t().contiguous().t(), x.double(), x.half().float(), -x]  # column-major, float64, negative view
    for variant in layouts:
        assert torch.equal(nearest_code(variant, codebook), nearest_code_exact(variant, codebook))


def test_numpy_path_restores_openblas_threads_and_follows_torch_threads():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    blas = [c for c in threadpoolctl.ThreadpoolController().lib_controllers if "numpy" in (c.filepath or "")]
    if not blas:
        pytest.skip("numpy's BLAS is not one threadpoolctl controls here")
    before = [c.get_num_threads() for c in blas]
    x, codebook = _near_tie_inputs(6000, 32, 256)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.nearest_code_cpu(x, codebook, gemm="numpy", block_bytes=4 * 256 * 500)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, cpu_kernels.nearest_code_cpu(x, codebook, gemm="numpy"))
    assert [c.get_num_threads() for c in blas] == before
