"""The loops that `vqdeploy.ops.cpu_kernels` compiles with numba: the two kernels are plain Python
here (cpu_kernels compiles them with their signatures and numba's on-disk cache); the helpers
they call are jitted where they are defined.

How a row's margin is kept
--------------------------
The exact re-check needs each row's margin t_2 - t_b, the second-smallest score minus the
smallest. The fold (`fold_codes`) takes the codes GROUP at a time: a tournament picks each group's
smallest score (strict ``<``, the lower index winning a tie), and only that winner meets the
running best, which also keeps the second smallest of the group winners. The second smallest
score of all is the smaller of that and the smallest of the best's own group mates, which
`best_group_mates` reads from the block of scores still in cache, once per block and only for the
rows whose best lies in it. Tracking the exact second inside every group cost a quarter of the
op's time at D = 32 (benchmarks/RESULTS.md).

Candidate lists
---------------
A row whose margin is within its bound after a block (`NEAR_SAFETY`) keeps the list of the codes
whose scores lie within the bound of its running best (`note_near_codes`); the exact re-solve then
needs the float64 distances of those few codes only, instead of a second float32 pass over all K
(`vqdeploy.ops.contract.exact_nearest_listed`).
"""

from __future__ import annotations

import numba
import numpy as np

# Codes per tournament in `fold_codes`; code blocks of the tile loop are multiples of it.
GROUP = 8
# Codes a row's candidate list holds at most; a row with more near its best (duplicate codes,
# a codebook of equidistant codes) is re-solved over all codes.
LIST_CAPACITY = 16
# The candidate lists use one bound per row, ||x|| max_k alpha_k + max_k beta_k of
# `vqdeploy.ops.contract.recheck_coefficients` (which is at least the best code's own), widened so
# that a row the re-check test flags is near in the float64 test of `note_near_codes` too.
NEAR_SAFETY = 1.0 + 2.0**-20


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
        bounds = np.empty(last - first, np.float64)
        row_norm_bounds(x[first:last], under, grow, bounds)
        flag_unproven_rows(bounds, out[first:last], margin[first:last], alpha, beta, limit, flags[first:last])


def search_tiles(gemm, codes, x, norms, out, dots, first, step, stride, code_block,
                 alpha, beta, under, grow, limit, separation, flags, listed_rows, listed_codes, listed_count):
    """The whole search of one worker thread: for the tiles of `step` rows of x starting at rows
    first, first + stride, ..., and for each block of `code_block` codes (a multiple of GROUP), the
    GEMM ``dots = -2 codes_block @ tile^T`` through `gemm` (a library's ILP64 Fortran sgemm,
    `vqdeploy.ops.sgemm_entry`), `fold_codes` on it, the best's group mates and the candidate
    lists of near rows; then the tile's tokens, margins and `flag_unproven_rows`, all without
    returning to Python.

    x (N, D) and codes (K, D) are C-contiguous float32; out (N,) int64 and flags (N,) uint8 are
    written for those tiles' rows; dots holds at least code_block * leading_dimension(step) floats.
    A flagged row whose candidate list is complete is decided here where the float64 distances of
    its listed codes separate them (`decide_among_listed`; its flag is then cleared); one they do
    not separate is written to listed_rows[n] (its row in x) and listed_codes[n] (its codes
    ascending, -1 after them), n = listed_count[0] counting up while there is room, and gets flag 2
    instead of 1. The GEMM: `tile_gemm`.
    """
    num_codes = codes.shape[0]
    num_rows = x.shape[0]
    best = np.empty(step, np.float32)
    winners = np.empty(step, np.float32)
    mates = np.empty(step, np.float32)
    best_index = np.empty(step, np.int32)
    before = np.empty(step, np.float32)
    before_index = np.empty(step, np.int32)
    bounds = np.empty(step, np.float64)
    reach = np.empty(step, np.float64)
    margin = np.empty(step, np.float32)
    list_length = np.empty(step, np.int32)
    list_codes = np.empty((step, LIST_CAPACITY), np.int32)
    list_scores = np.empty((step, LIST_CAPACITY), np.float32)
    alpha_top, beta_top = alpha.max(), beta.max()
    for start in range(first, num_rows, stride):
        stop = min(start + step, num_rows)
        width = stop - start
        tile = x[start:stop]
        lead = leading_dimension(width)
        row_norm_bounds(tile, under, grow, bounds[:width])
        for r in range(width):
            reach[r] = (bounds[r] * alpha_top + beta_top) * NEAR_SAFETY
            list_length[r] = 0
        start_columns(best[:width], winners[:width], mates[:width], best_index[:width])
        for offset in range(0, num_codes, code_block):
            count = min(code_block, num_codes - offset)
            block = dots[: count * lead].reshape(count, lead)
            tile_gemm(gemm, tile, codes[offset : offset + count], block)
            block_norms = norms[offset : offset + count]
            before[:width] = best[:width]
            before_index[:width] = best_index[:width]
            fold_codes(block, block_norms, 0, width, offset, best, winners, best_index)
            best_group_mates(block, block_norms, 0, width, offset, best_index, mates)
            note_near_codes(block, block_norms, width, offset, best, winners, mates, best_index, before,
                            before_index, reach, list_length, list_codes, list_scores)
        rows_out, rows_flags = out[start:stop], flags[start:stop]
        finish_columns(best[:width], winners[:width], mates[:width], best_index[:width], rows_out, margin[:width])
        flag_unproven_rows(bounds[:width], rows_out, margin[:width], alpha, beta, limit, rows_flags)
        for r in range(width):
            length = list_length[r]
            if rows_flags[r] == 0 or length <= 0 or not bounds[r] < limit:
                continue
            code = decide_among_listed(tile[r], codes, list_codes[r, :length], separation)
            if code >= 0:
                rows_out[r] = code
                rows_flags[r] = 0
                continue
            if listed_count[0] >= listed_rows.shape[0]:
                continue
            slot = listed_count[0]
            listed_count[0] = slot + 1
            listed_rows[slot] = start + r
            chosen = np.sort(list_codes[r, :length])
            listed_codes[slot, :length] = chosen
            listed_codes[slot, length:] = -1
            rows_flags[r] = 2


@numba.njit(nogil=True)
def leading_dimension(width):
    """Floats per row of a tile's block of scores: width rounded up to 16, plus 16, so that rows
    of the block never lie a multiple of 4 KiB apart (at 512 columns every other row did, and the
    fold's stores to its running state then aliased its loads of scores)."""
    return (width + 15) // 16 * 16 + 16


@numba.njit(nogil=True, boundscheck=False)
def tile_gemm(gemm, tile, codes, block):
    """block[:, :R] = -2 codes (Kb, D) @ tile (R, D)^T through a Fortran sgemm (ILP64), all three
    C-contiguous float32, block (Kb, L) with L >= R. In column-major terms the row-major block is
    the (R, Kb) matrix tile @ codes^T with leading dimension L, whose operands are the row-major
    buffers read as (D, R) transposed and (D, Kb): sgemm("T", "N", R, Kb, D, -2, tile, D, codes,
    D, 0, block, L)."""
    characters = np.empty(2, np.uint8)
    characters[0], characters[1] = 84, 78  # "T", "N"
    scalars = np.empty(2, np.float32)
    scalars[0], scalars[1] = -2.0, 0.0
    sizes = np.empty(4, np.int64)
    sizes[0], sizes[1], sizes[2], sizes[3] = tile.shape[0], codes.shape[0], codes.shape[1], block.shape[1]
    gemm(characters[0:].ctypes, characters[1:].ctypes, sizes[0:].ctypes, sizes[1:].ctypes, sizes[2:].ctypes,
         scalars[0:].ctypes, tile.ctypes, sizes[2:].ctypes, codes.ctypes, sizes[2:].ctypes, scalars[1:].ctypes,
         block.ctypes, sizes[3:].ctypes)


@numba.njit(nogil=True, boundscheck=False)
def argmin_columns(dots, norms, first, last, out, margin):
    """out[r] = argmin_k (norms[k] + dots[k, r]) and margin[r] = second best - best, for columns
    first <= r < last of the (K, R) block dots, ties to the lowest k (`fold_codes` over all K)."""
    width = last - first
    best = np.empty(width, np.float32)
    winners = np.empty(width, np.float32)
    mates = np.empty(width, np.float32)
    best_index = np.empty(width, np.int32)
    start_columns(best, winners, mates, best_index)
    fold_codes(dots, norms, first, last, 0, best, winners, best_index)
    best_group_mates(dots, norms, first, last, 0, best_index, mates)
    finish_columns(best, winners, mates, best_index, out[first:last], margin[first:last])


@numba.njit(nogil=True, boundscheck=False)
def start_columns(best, winners, mates, best_index):
    """The running state of columns before any code: no best (+inf at index 0), no second."""
    for r in range(best.shape[0]):
        best[r] = np.inf
        winners[r] = np.inf
        mates[r] = np.inf
        best_index[r] = 0


@numba.njit(nogil=True, boundscheck=False)
def finish_columns(best, winners, mates, best_index, out, margin):
    """Each column's token and margin: the second best is the smaller of the second-best group
    winner and the best's group mates."""
    for r in range(best.shape[0]):
        out[r] = best_index[r]
        margin[r] = min(winners[r], mates[r]) - best[r]


@numba.njit(nogil=True, inline="always")
def duel(score_a, index_a, score_b, index_b):
    """(score, index) of the smaller score, a's on a tie (a is the lower code): one match of the
    fold's tournament, inlined into it (numba's inlining, so the fold's loop still vectorises)."""
    lower = score_b < score_a
    return (score_b if lower else score_a), (index_b if lower else index_a)


def _fold_with(keep_winners: bool):
    """`fold_codes` (keep_winners) and the same fold without the second-best group winner (the
    argmin-only baseline of benchmarks/bench_exact_recheck.py): one body, the branch a
    compile-time constant."""

    @numba.njit(nogil=True, boundscheck=False)
    def fold(dots, norms, first, last, offset, best, winners, best_index):
        """Fold the (Kb, R) block dots (codes offset.. of the codebook; norms their squared
        norms) into the running (best, index) of columns first..last-1 and the second-best of the
        group winners.

        dots holds -2 x.c (the GEMM's alpha is -2: scaling by a power of two is exact, so
        fl(norms[k] + dots[k, r]) is the score fl(n_k - 2 fl(x.c_k)) of every implementation, one
        add instead of a multiply and a subtract). The inner loops run over the contiguous columns
        with no dependence between columns, so they vectorise. Codes are taken GROUP (8) at a time:
        a tournament of strict ``<`` (the lower index wins a tie) picks the group's winner, and
        only it meets the running best; the loser of that duel folds into `winners`, the running
        second smallest of the winners. The codes after the last whole group are groups of one.
        Blocks must come in ascending code order (a later code never wins a tie).
        `best_group_mates` supplies the rest of the second best.

        The running values are written with np.minimum / np.maximum, not ``a if a < b else b``:
        LLVM turns a store of "the new value or the one loaded from there" into a masked store,
        which on an AMD EPYC without AVX-512 cost 1.04 cycles a score against 0.42 (K = 256, 512
        columns in cache). The two differ only for NaN, whose rows the re-check always flags, and
        for -0 against +0, equal scores.
        """
        num_codes = dots.shape[0]
        width = last - first
        k = 0
        while k + 8 <= num_codes:  # the tournament below is written out for GROUP = 8
            k0, k1, k2, k3 = np.int32(offset + k), np.int32(offset + k + 1), np.int32(offset + k + 2), np.int32(offset + k + 3)
            k4, k5, k6, k7 = np.int32(offset + k + 4), np.int32(offset + k + 5), np.int32(offset + k + 6), np.int32(offset + k + 7)
            n0, n1, n2, n3 = norms[k], norms[k + 1], norms[k + 2], norms[k + 3]
            n4, n5, n6, n7 = norms[k + 4], norms[k + 5], norms[k + 6], norms[k + 7]
            row0, row1 = dots[k, first:last], dots[k + 1, first:last]
            row2, row3 = dots[k + 2, first:last], dots[k + 3, first:last]
            row4, row5 = dots[k + 4, first:last], dots[k + 5, first:last]
            row6, row7 = dots[k + 6, first:last], dots[k + 7, first:last]
            for r in range(width):
                s0, s1, s2, s3 = n0 + row0[r], n1 + row1[r], n2 + row2[r], n3 + row3[r]
                s4, s5, s6, s7 = n4 + row4[r], n5 + row5[r], n6 + row6[r], n7 + row7[r]
                s01, i01 = duel(s0, k0, s1, k1)
                s23, i23 = duel(s2, k2, s3, k3)
                s45, i45 = duel(s4, k4, s5, k5)
                s67, i67 = duel(s6, k6, s7, k7)
                s03, i03 = duel(s01, i01, s23, i23)
                s47, i47 = duel(s45, i45, s67, i67)
                score, index = duel(s03, i03, s47, i47)
                old = best[r]
                if keep_winners:
                    winners[r] = np.minimum(winners[r], np.maximum(old, score))
                best[r] = np.minimum(old, score)
                best_index[r] = index if score < old else best_index[r]
            k += 8
        while k < num_codes:
            code = np.int32(offset + k)
            norm = norms[k]
            row = dots[k, first:last]
            for r in range(width):
                score = norm + row[r]
                old = best[r]
                if keep_winners:
                    winners[r] = np.minimum(winners[r], np.maximum(old, score))
                best[r] = np.minimum(old, score)
                best_index[r] = code if score < old else best_index[r]
            k += 1

    return fold


fold_codes = _fold_with(True)
fold_codes_argmin_only = _fold_with(False)


@numba.njit(nogil=True, boundscheck=False)
def best_group_mates(dots, norms, first, last, offset, best_index, mates):
    """mates[r] = the smallest score of the other codes in the group of column r's best code, for
    the columns whose best code lies in this block (codes offset.. of the (Kb, R) block dots, as
    `fold_codes` grouped them; +inf for a group of one). Other columns keep theirs: their best, and
    so its group, was in an earlier block."""
    num_codes = dots.shape[0]
    grouped = num_codes // GROUP * GROUP
    for r in range(last - first):
        position = best_index[r] - offset
        if position < 0 or position >= num_codes:
            continue
        least = np.float32(np.inf)
        if position < grouped:
            group = position // GROUP * GROUP
            for j in range(group, group + GROUP):
                if j != position:
                    least = min(least, norms[j] + dots[j, first + r])
        mates[r] = least


@numba.njit(nogil=True, boundscheck=False)
def note_near_codes(dots, norms, width, offset, best, winners, mates, best_index, before, before_index, reach,
                    list_length, list_codes, list_scores):
    """After a block: the candidate list of every row whose margin is within reach[r] of its
    running best, i.e. every code seen so far with score <= best + reach (the best included).

    list_length[r] is 0 for a row with no code but its best within reach (its list is implied),
    the list's length while it is complete, -1 once more than LIST_CAPACITY codes were within
    reach (the row then needs a search over all codes if flagged). A row that comes near in
    this block starts from its best before the block (before, before_index); codes of the block
    (dots (Kb, width), codes offset..) are scanned for it. Scores are compared in float64."""
    num_codes = dots.shape[0]
    capacity = list_codes.shape[1]
    for r in range(width):
        limit = np.float64(best[r]) + reach[r]
        second = min(winners[r], mates[r])
        if not np.float64(second) <= limit:  # only the best is within reach (or a NaN row)
            list_length[r] = 0
            continue
        length = list_length[r]
        if length < 0:
            continue
        if length == 0 and offset > 0 and np.float64(before[r]) <= limit:
            list_codes[r, 0] = before_index[r]
            list_scores[r, 0] = before[r]
            length = 1
        kept = 0
        for j in range(length):  # drop the codes the new best has put out of reach
            if np.float64(list_scores[r, j]) <= limit:
                list_codes[r, kept] = list_codes[r, j]
                list_scores[r, kept] = list_scores[r, j]
                kept += 1
        length = kept
        for k in range(num_codes):
            score = norms[k] + dots[k, r]
            if np.float64(score) <= limit:
                if length == capacity:
                    length = -1
                    break
                list_codes[r, length] = offset + k
                list_scores[r, length] = score
                length += 1
        list_length[r] = length


@numba.njit(nogil=True, boundscheck=False)
def decide_among_listed(row, codes, listed, separation):
    """The exact argmin of the float32 row among the listed codes (every code that can be it), or -1
    where float64 does not settle it: the test of `vqdeploy.ops.contract.resolve_candidates`.
    The float64 distance sum_i (x_i - c_i)^2 of float32 values errs by at most gamma_{D+2} of
    itself in any order, so the smallest decides the row when it times ``separation``
    (`vqdeploy.ops.contract.float64_separation`) is below every other listed distance."""
    least, second, chosen = np.inf, np.inf, -1
    for j in range(listed.shape[0]):
        code = listed[j]
        total = 0.0
        for i in range(row.shape[0]):
            difference = np.float64(row[i]) - np.float64(codes[code, i])
            total += difference * difference
        if total < least:
            least, second, chosen = total, least, code
        elif total < second:
            second = total
    if least * separation < second and least < np.inf:
        return chosen
    return -1


@numba.njit(fastmath={"reassoc", "contract"}, nogil=True, boundscheck=False)
def row_norm_bounds(x, under, grow, bounds):
    """bounds[r] >= ||x_r||: sqrt(fl(sum x_ri^2) + under) * grow (`norm_bound_from_float32`).
    Compiled with reassociation and contraction only (no "nnan": a NaN row gets a NaN bound, which
    no test proves): the float32 sum of squares may then run in any order, which the bound allows,
    and vectorises."""
    dim = x.shape[1]
    for r in range(x.shape[0]):
        total = np.float32(0.0)
        for i in range(dim):
            total += x[r, i] * x[r, i]
        bounds[r] = np.sqrt(np.float64(total) + under) * grow


@numba.njit(nogil=True, boundscheck=False)
def flag_unproven_rows(bounds, out, margin, alpha, beta, limit, flags):
    """flags[r] = 1 for the rows whose margin does not prove out[r] to be the exact argmin, else 0:
    the test of `vqdeploy.ops.contract.recheck_rows`, row by row. The row is proven where
    margin[r] > bounds[r] alpha[out[r]] + beta[out[r]] and bounds[r] < limit (bounds from
    `row_norm_bounds`; alpha, beta, limit from `vqdeploy.ops.contract.recheck_coefficients`, whose
    threshold carries RECHECK_SAFETY for its own rounding). A NaN margin or bound is never proven.
    """
    for r in range(out.shape[0]):
        best = out[r]
        proven = np.float64(margin[r]) > bounds[r] * alpha[best] + beta[best] and bounds[r] < limit
        flags[r] = 0 if proven else 1
