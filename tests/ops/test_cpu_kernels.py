"""The compiled CPU search (numba): contract, tiles, thread chunks, concurrency, fallback."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from token_assertions import assert_tokens_certified

from vqdeploy.ops import cpu_kernels, nearest_code, nearest_code_reference
from vqdeploy.ops.contract import (
    norm_bound_terms,
    norm_upper_bound,
    recheck_coefficients,
    recheck_rows,
    squared_norms,
)


def test_numba_kernel_is_available_and_used_by_the_op():
    assert cpu_kernels.available(), "numba is a dependency: the compiled kernel must run here"
    x, codebook = torch.randn(300, 12), torch.randn(50, 12)
    assert torch.equal(nearest_code(x, codebook), cpu_kernels.nearest_code_cpu(x, codebook))


@pytest.mark.parametrize(
    "m, d, k",
    [(1, 1, 1), (5, 3, 2), (1000, 37, 300), (4097, 32, 256), (3000, 256, 1024), (200, 8, 9000)],
)
def test_agrees_with_float64_up_to_certified_ties(m, d, k):
    x, codebook = torch.randn(m, d), torch.randn(k, d)
    got = cpu_kernels.nearest_code_cpu(x, codebook)
    truth = nearest_code_reference(x, codebook)
    assert got.dtype == torch.int64 and got.shape == (m,)
    assert int((got != truth).sum()) <= max(1, m // 1000)
    assert_tokens_certified(x, codebook, got)


def test_real_data_digits(digits):
    codebook = digits[torch.randperm(len(digits))[:256]] + 0.01 * torch.randn(256, 64)
    got = cpu_kernels.nearest_code_cpu(digits, codebook)
    assert_tokens_certified(digits, codebook, got)


def test_ties_go_to_the_lowest_index():
    # duplicate codes, a point exactly between two codes, and the origin equidistant to all four
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    x = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 0.0], [3.0, 0.0], [-1.0, 0.0]])
    assert cpu_kernels.nearest_code_cpu(x, codebook).tolist() == [0, 0, 0, 0, 3]
    # the same ties in every column of a tile wide enough for several threads
    wide = x.repeat(400, 1)
    assert cpu_kernels.nearest_code_cpu(wide, codebook).tolist() == [0, 0, 0, 0, 3] * 400


def test_tiles_and_thread_chunks_change_nothing(monkeypatch):
    x, codebook = torch.randn(5003, 24), torch.randn(300, 24)
    whole = cpu_kernels.nearest_code_cpu(x, codebook)
    nearest_code_module = importlib.import_module("vqdeploy.ops.contract")
    monkeypatch.setattr(nearest_code_module, "SCORE_BLOCK_BYTES", 4 * 300 * 37)  # 37-row tiles, a ragged last one
    monkeypatch.setattr(cpu_kernels, "MIN_COLUMNS_PER_THREAD", 16)
    assert nearest_code_module.rows_per_block(300) == 37
    assert torch.equal(cpu_kernels.nearest_code_cpu(x, codebook), whole)


def run_kernel(dots, norms, out, margin, chunks, x=None, codes=None):
    """The compiled kernel on a (K, R) block of dots x.c (handed to it as -2 x.c, as the op's GEMM
    writes them: exact); returns its re-check flags. Without rows x and codes, the test runs on
    zero rows with unit coefficients (flags then say margin <= 1)."""
    dots = np.ascontiguousarray(np.float32(-2.0) * dots)
    num_codes, columns = dots.shape
    if x is None:
        x = np.zeros((columns, 1), dtype=np.float32)
        alpha, beta, limit = np.ones(num_codes), np.ones(num_codes), np.inf
        under, grow = 0.0, 1.0
    else:
        alpha, beta, limit = (v.numpy() if hasattr(v, "numpy") else v for v in
                              recheck_coefficients(x.shape[1], norm_upper_bound(torch.from_numpy(codes))))
        under, grow = norm_bound_terms(x.shape[1])
    flags = np.full(columns, 7, dtype=np.uint8)
    cpu_kernels._kernel()(dots, norms, out, margin, chunks, np.ascontiguousarray(x), alpha, beta, under, grow, limit, flags)
    return flags


def test_kernel_flags_the_rows_recheck_rows_flags():
    g = torch.Generator().manual_seed(4)
    codes = torch.randn(64, 24, generator=g)
    pairs = torch.randint(0, 64, (300, 2), generator=g)
    x = torch.cat([(codes[pairs[:, 0]] + codes[pairs[:, 1]]) / 2, torch.randn(300, 24, generator=g)])
    x[5, 3] = float("nan")
    dots = (codes @ x.t()).contiguous().numpy()
    norms = squared_norms(codes).numpy()
    out, margin = np.empty(600, np.int64), np.empty(600, np.float32)
    flags = run_kernel(dots, norms, out, margin, 2, x=x.numpy(), codes=codes.numpy())
    expected = recheck_rows(24, torch.from_numpy(out), torch.from_numpy(margin), norm_upper_bound(x), norm_upper_bound(codes))
    assert np.flatnonzero(flags).tolist() == expected.tolist()
    assert 5 in expected.tolist() and 0 < len(expected) < 600


@pytest.mark.parametrize("codes", [1, 2, 4, 5, 8, 9, 256, 1027])
@pytest.mark.parametrize("columns, chunks", [(1, 1), (37, 2), (4096, 2), (300, 3)])
def test_kernel_equals_numpy_argmin_of_the_same_float32_scores(codes, columns, chunks):
    rng = np.random.default_rng(codes * 7919 + columns)
    # few distinct values, so that many scores tie exactly, within and across groups of four codes
    dots = rng.integers(-3, 4, size=(codes, columns)).astype(np.float32) / 4
    norms = rng.integers(0, 3, size=codes).astype(np.float32) / 2
    out = np.full(columns, -1, dtype=np.int64)
    margin = np.full(columns, np.nan, dtype=np.float32)
    run_kernel(dots, norms, out, margin, chunks)
    scores = norms[:, None] - np.float32(2) * dots
    assert out.tolist() == np.argmin(scores, axis=0).tolist()
    ordered = np.sort(scores, axis=0)
    want = ordered[1] - ordered[0] if codes > 1 else np.full(columns, np.inf, np.float32)
    assert margin.tolist() == want.tolist()  # the second-best score, exactly, ties included


def test_duplicate_codes_anywhere_tie_to_the_lower_index():
    base = torch.randn(13, 6)
    for low, high in [(0, 1), (1, 3), (2, 4), (3, 7), (6, 9), (9, 12), (11, 12), (0, 12)]:
        codebook = base.clone()
        codebook[high] = codebook[low]
        x = codebook[[low, high]]  # exactly the shared code: an exact tie
        assert cpu_kernels.nearest_code_cpu(x, codebook).tolist() == [low, low], (low, high)


def test_more_chunks_than_columns_leaves_no_row_unwritten():
    rng = np.random.default_rng(0)
    dots = rng.standard_normal((7, 20)).astype(np.float32)
    norms = rng.standard_normal(7).astype(np.float32)
    out = np.full(20, -1, dtype=np.int64)
    run_kernel(dots, norms, out, np.empty(20, np.float32), 8)  # chunks are 16 columns wide: two of them cover all 20, six are empty
    assert out.tolist() == np.argmin(norms[:, None] - 2 * dots, axis=0).tolist()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_are_searched_in_float32(dtype):
    x, codebook = torch.randn(500, 16).to(dtype), torch.randn(64, 16)
    assert torch.equal(
        cpu_kernels.nearest_code_cpu(x, codebook), cpu_kernels.nearest_code_cpu(x.float(), codebook)
    )


def test_non_contiguous_and_empty_inputs():
    base, codebook = torch.randn(16, 900), torch.randn(40, 16)
    x = base.t()  # (900, 16), column-major
    assert not x.is_contiguous()
    assert torch.equal(
        cpu_kernels.nearest_code_cpu(x, codebook), cpu_kernels.nearest_code_cpu(x.contiguous(), codebook)
    )
    assert cpu_kernels.nearest_code_cpu(torch.empty(0, 16), codebook).shape == (0,)


def test_concurrent_calls_from_threads_are_all_right():
    codebook = torch.randn(256, 32)
    inputs = [torch.randn(3000 + 17 * i, 32) for i in range(12)]
    expected = [cpu_kernels.nearest_code_cpu(x, codebook) for x in inputs]
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda x: cpu_kernels.nearest_code_cpu(x, codebook), inputs))
    assert all(torch.equal(a, b) for a, b in zip(results, expected, strict=True))


def test_without_numba_the_op_falls_back_to_torch():
    script = (
        "import sys; sys.modules['numba'] = None\n"  # makes `import numba` raise ImportError
        "import torch\n"
        "from vqdeploy.ops import cpu_kernels, nearest_code, nearest_code_blocked\n"
        "assert not cpu_kernels.available()\n"
        "x, c = torch.randn(777, 9), torch.randn(33, 9)\n"
        "assert torch.equal(nearest_code(x, c), nearest_code_blocked(x, c))\n"
        "print('fallback ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=dict(os.environ)
    )
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout


def test_tile_buffer_is_reused_and_survives_inference_mode():
    x, codebook = torch.randn(5000, 16), torch.randn(64, 16)
    with torch.inference_mode():
        inside = cpu_kernels.nearest_code_cpu(x, codebook)
    idle = cpu_kernels._WORKSPACE._idle
    assert idle is not None and idle.size >= 64 * 5000
    outside = cpu_kernels.nearest_code_cpu(x, codebook)  # writes into the buffer the first call left
    assert cpu_kernels._WORKSPACE._idle is idle
    assert torch.equal(inside, outside)
    with torch.no_grad():
        assert torch.equal(nearest_code(x, codebook), outside)


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 63, 64, 1000, 4099])
def test_flagged_rows_are_the_nonzero_positions(size):
    rng = np.random.default_rng(size)
    for density in (0.0, 0.01, 0.5, 1.0):
        flags = (rng.random(size) < density).astype(np.uint8) * rng.integers(1, 256, size, dtype=np.uint8)
        got = cpu_kernels.flagged_rows(flags)
        assert got.dtype == np.int64 and got.tolist() == np.flatnonzero(flags).tolist(), (size, density)
