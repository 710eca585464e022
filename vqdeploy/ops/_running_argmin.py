"""The loop that `vqdeploy.ops.cpu_kernels` compiles with numba (plain Python here, imports numba)."""

from __future__ import annotations

import numba
import numpy as np


def running_argmin_over_codes(dots, norms, out, num_chunks):
    """out[r] = argmin_k (norms[k] - 2 dots[k, r]) over the K rows of dots, ties to the lowest k.

    dots is (K, R) float32, C-contiguous; the R columns are split into num_chunks chunks (one per
    thread, a multiple of 16 columns wide). The inner loop runs over the contiguous columns of one
    code with no dependence between columns, so it vectorises.
    """
    num_codes, num_columns = dots.shape
    step = ((num_columns + num_chunks - 1) // num_chunks + 15) // 16 * 16
    two = np.float32(2.0)
    for chunk in numba.prange(num_chunks):
        first = chunk * step
        last = min(num_columns, first + step)
        width = last - first
        if width <= 0:
            continue
        best = np.empty(width, np.float32)
        best_index = np.zeros(width, np.int32)
        norm = norms[0]
        row = dots[0, first:last]
        for r in range(width):
            best[r] = norm - two * row[r]
        for k in range(1, num_codes):
            code = np.int32(k)
            norm = norms[k]
            row = dots[k, first:last]
            for r in range(width):
                score = norm - two * row[r]
                better = score < best[r]
                best[r] = min(score, best[r])
                best_index[r] = code if better else best_index[r]
        for r in range(width):
            out[first + r] = best_index[r]
