"""The loops that `vqdeploy.ops.cpu_kernels` compiles with numba: the two kernels are plain Python
here (cpu_kernels compiles them with their signatures and numba's on-disk cache); the helpers
they call are jitted where they are defined."""

from __future__ import annotations

import numba
import numpy as np


def running_argmin_over_codes(dots, norms, out, margin, num_chunks, x, alpha, beta, under, grow, limit, flags):
    """out[r] = argmin_k (norms[k] + dots[k, r]) over the K rows of dots, ties to the lowest k;
    margin[r] = second-best score - best score (inf for K = 1), and flags[r] the exact re-check's
    verdict on it (`flag_unproven_rows`, on x, the tile's (R, D) rows, in the same thread).

    dots is (K, R) float32, C-contiguous, and holds -2 x.c (`argmin_columns`); the R columns are
    split into num_chunks chunks (one per thread, a multiple of 16 columns wide).
    """
    num_columns = dots.shape[1]
    step = ((num_columns + num_chunks - 1) // num_chunks + 15) // 16 * 16
    for chunk in numba.prange(num_chunks):
        first = chunk * step
        last = min(num_columns, first + step)
        if last <= first:
            continue
        argmin_columns(dots, norms, first, last, out, margin)
        flag_unproven_rows(x, first, last, out, margin, alpha, beta, under, grow, limit, flags)


def search_tiles(gemm, codes, x, norms, out, dots, margin, first, step, stride, code_block,
                 alpha, beta, under, grow, limit, flags):
    """The whole search of one worker thread: for the tiles of `step` rows of x starting at rows
    first, first + stride, ..., and for each block of `code_block` codes, the GEMM
    ``dots = -2 codes_block @ tile^T`` through `gemm` (a library's ILP64 Fortran sgemm,
    `vqdeploy.ops.sgemm_entry`) and `fold_codes` on it; then the tile's tokens, margins and
    `flag_unproven_rows`, all without returning to Python.

    x (N, D) and codes (K, D) are C-contiguous float32; out (N,) int64 and flags (N,) uint8 are
    written for those tiles' rows; dots holds at least code_block * step floats and margin 4 * step
    floats (the running best, second best and index live there too). The GEMM: `tile_gemm`.
    """
    num_codes = codes.shape[0]
    num_rows = x.shape[0]
    best, second = margin[step : 2 * step], margin[2 * step : 3 * step]
    best_index = margin[3 * step : 4 * step].view(np.int32)
    for start in range(first, num_rows, stride):
        stop = min(start + step, num_rows)
        width = stop - start
        tile = x[start:stop]
        for offset in range(0, num_codes, code_block):
            count = min(code_block, num_codes - offset)
            block = dots[: count * width].reshape(count, width)
            tile_gemm(gemm, tile, codes[offset : offset + count], block)
            block_norms = norms[offset : offset + count]
            if offset == 0:
                start_columns(block, block_norms, 0, width, best, second, best_index)
                fold_codes(block, block_norms, 0, width, 0, 1, best, second, best_index)
            else:
                fold_codes(block, block_norms, 0, width, offset, 0, best, second, best_index)
        rows_out, rows_margin = out[start:stop], margin[:width]
        finish_columns(best[:width], second[:width], best_index[:width], rows_out, rows_margin)
        flag_unproven_rows(tile, 0, width, rows_out, rows_margin, alpha, beta, under, grow, limit, flags[start:stop])


@numba.njit(nogil=True, boundscheck=False)
def tile_gemm(gemm, tile, codes, block):
    """block (Kb, R) = -2 codes (Kb, D) @ tile (R, D)^T through a Fortran sgemm (ILP64), all three
    C-contiguous float32. In column-major terms the row-major (Kb, R) block is the (R, Kb) matrix
    tile @ codes^T, whose operands are the row-major buffers read as (D, R) transposed and (D, Kb):
    sgemm("T", "N", R, Kb, D, -2, tile, D, codes, D, 0, block, R)."""
    characters = np.empty(2, np.uint8)
    characters[0], characters[1] = 84, 78  # "T", "N"
    scalars = np.empty(2, np.float32)
    scalars[0], scalars[1] = -2.0, 0.0
    sizes = np.empty(4, np.int64)
    sizes[0], sizes[1], sizes[2], sizes[3] = tile.shape[0], codes.shape[0], codes.shape[1], tile.shape[0]
    gemm(characters[0:].ctypes, characters[1:].ctypes, sizes[0:].ctypes, sizes[1:].ctypes, sizes[2:].ctypes,
         scalars[0:].ctypes, tile.ctypes, sizes[2:].ctypes, codes.ctypes, sizes[2:].ctypes, scalars[1:].ctypes,
         block.ctypes, sizes[3:].ctypes)


@numba.njit(nogil=True, boundscheck=False)
def argmin_columns(dots, norms, first, last, out, margin):
    """out[r] = argmin_k (norms[k] + dots[k, r]) and margin[r] = second best - best, for columns
    first <= r < last of the (K, R) block dots, ties to the lowest k (`fold_codes` over all K)."""
    width = last - first
    best = np.empty(width, np.float32)
    second = np.empty(width, np.float32)
    best_index = np.empty(width, np.int32)
    start_columns(dots, norms, first, last, best, second, best_index)
    fold_codes(dots, norms, first, last, 0, 1, best, second, best_index)
    finish_columns(best, second, best_index, out[first:last], margin[first:last])


@numba.njit(nogil=True, boundscheck=False)
def start_columns(dots, norms, first, last, best, second, best_index):
    """The running (best, second, index) of columns first..last-1 after code 0 of dots alone."""
    norm = norms[0]
    row = dots[0, first:last]
    for r in range(last - first):
        best[r] = norm + row[r]
        second[r] = np.inf
        best_index[r] = 0


@numba.njit(nogil=True, boundscheck=False)
def finish_columns(best, second, best_index, out, margin):
    for r in range(best.shape[0]):
        out[r] = best_index[r]
        margin[r] = second[r] - best[r]


@numba.njit(nogil=True, boundscheck=False)
def fold_codes(dots, norms, first, last, offset, start, best, second, best_index):
    """Fold codes start.. of the (Kb, R) block dots (codes offset.. of the codebook; norms their
    squared norms) into the running (best, second, index) of columns first..last-1.

    dots holds -2 x.c (the GEMM's alpha is -2: scaling by a power of two is exact, so
    fl(norms[k] + dots[k, r]) is the score fl(n_k - 2 fl(x.c_k)) of every implementation, one add
    instead of a multiply and a subtract). The inner loops run over the contiguous columns with no
    dependence between columns, so they vectorise. Codes are taken four at a time: a small
    tournament (strict ``<``, so the lower index wins a tie) picks the best of the four, and only
    its winner is compared with the running best, which cuts the loads and stores of the running
    (min, argmin) fourfold. The group's second smallest, min(max(a, b), min(A, B)) for pair minima
    a, b and pair maxima A, B, and the loser of the winner's duel with the running best fold into a
    running second-best. Blocks must come in ascending code order (a later code never wins a tie).
    """
    num_codes = dots.shape[0]
    width = last - first
    k = start
    while k + 4 <= num_codes:
        k0, k1 = np.int32(offset + k), np.int32(offset + k + 1)
        k2, k3 = np.int32(offset + k + 2), np.int32(offset + k + 3)
        n0, n1, n2, n3 = norms[k], norms[k + 1], norms[k + 2], norms[k + 3]
        row0, row1 = dots[k, first:last], dots[k + 1, first:last]
        row2, row3 = dots[k + 2, first:last], dots[k + 3, first:last]
        for r in range(width):
            s0 = n0 + row0[r]
            s1 = n1 + row1[r]
            s2 = n2 + row2[r]
            s3 = n3 + row3[r]
            lower = s1 < s0
            s01 = s1 if lower else s0
            l01 = s0 if lower else s1
            i01 = k1 if lower else k0
            lower = s3 < s2
            s23 = s3 if lower else s2
            l23 = s2 if lower else s3
            i23 = k3 if lower else k2
            lower = s23 < s01
            score = s23 if lower else s01
            loser = s01 if lower else s23
            index = i23 if lower else i01
            group_second = min(loser, min(l01, l23))
            old = best[r]
            second[r] = min(second[r], min(group_second, max(old, score)))
            lower = score < old
            best[r] = score if lower else old
            best_index[r] = index if lower else best_index[r]
        k += 4
    while k < num_codes:
        code = np.int32(offset + k)
        norm = norms[k]
        row = dots[k, first:last]
        for r in range(width):
            score = norm + row[r]
            old = best[r]
            second[r] = min(second[r], max(old, score))
            lower = score < old
            best[r] = score if lower else old
            best_index[r] = code if lower else best_index[r]
        k += 1


@numba.njit(fastmath={"reassoc", "contract"}, nogil=True, boundscheck=False)
def flag_unproven_rows(x, first, last, out, margin, alpha, beta, under, grow, limit, flags):
    """flags[r] = 1 for rows first <= r < last whose margin does not prove out[r] to be the exact
    argmin, else 0: the test of `vqdeploy.ops.contract.recheck_rows`, row by row.

    ||x_r|| is bounded by sqrt(fl(sum x_ri^2) + under) * grow (`norm_bound_from_float32`), and the row
    is proven where margin[r] > ||x_r|| alpha[out[r]] + beta[out[r]] and ||x_r|| < limit (alpha,
    beta, limit from `vqdeploy.ops.contract.recheck_coefficients`). Compiled with reassociation and
    contraction only (no "nnan": a NaN margin or norm fails the test and leaves the row flagged):
    the float32 sum of squares may then run in any order, which the norm bound allows, and
    vectorises; the float64 threshold carries RECHECK_SAFETY for its own rounding.
    """
    dim = x.shape[1]
    for r in range(first, last):
        total = np.float32(0.0)
        for i in range(dim):
            total += x[r, i] * x[r, i]
        bound = np.sqrt(np.float64(total) + under) * grow
        best = out[r]
        proven = np.float64(margin[r]) > bound * alpha[best] + beta[best] and bound < limit
        flags[r] = 0 if proven else 1
