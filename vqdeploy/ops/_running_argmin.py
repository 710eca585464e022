"""The loop that `vqdeploy.ops.cpu_kernels` compiles with numba (plain Python here, imports numba)."""

from __future__ import annotations

import numba
import numpy as np


def running_argmin_over_codes(dots, norms, out, margin, num_chunks, x, alpha, beta, under, grow, limit, flags):
    """out[r] = argmin_k (norms[k] + dots[k, r]) over the K rows of dots, ties to the lowest k;
    margin[r] = second-best score - best score (inf for K = 1), and flags[r] the exact re-check's
    verdict on it (`flag_unproven_rows`, on x, the tile's (R, D) rows, in the same thread).

    dots is (K, R) float32, C-contiguous, and holds -2 x.c (the GEMM's alpha is -2: scaling by a power
    of two is exact, so fl(norms[k] + dots[k, r]) is the score fl(n_k - 2 fl(x.c_k)) of every
    implementation, one add instead of a multiply and a subtract); the R columns are split into num_chunks chunks (one per
    thread, a multiple of 16 columns wide). The inner loops run over the contiguous columns with no
    dependence between columns, so they vectorise. Codes are taken four at a time: a small
    tournament (strict ``<``, so the lower index wins a tie) picks the best of the four, and only
    its winner is compared with the running best, which cuts the loads and stores of the running
    (min, argmin) fourfold. The group's second smallest, min(max(a, b), min(A, B)) for pair minima
    a, b and pair maxima A, B, and the loser of the winner's duel with the running best fold into a
    running second-best.
    """
    num_codes, num_columns = dots.shape
    step = ((num_columns + num_chunks - 1) // num_chunks + 15) // 16 * 16
    for chunk in numba.prange(num_chunks):
        first = chunk * step
        last = min(num_columns, first + step)
        width = last - first
        if width <= 0:
            continue
        best = np.empty(width, np.float32)
        second = np.full(width, np.inf, np.float32)
        best_index = np.zeros(width, np.int32)
        norm = norms[0]
        row = dots[0, first:last]
        for r in range(width):
            best[r] = norm + row[r]
        k = 1
        while k + 4 <= num_codes:
            k0, k1, k2, k3 = np.int32(k), np.int32(k + 1), np.int32(k + 2), np.int32(k + 3)
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
            code = np.int32(k)
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
        for r in range(width):
            out[first + r] = best_index[r]
            margin[first + r] = second[r] - best[r]
        flag_unproven_rows(x, first, last, out, margin, alpha, beta, under, grow, limit, flags)


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
