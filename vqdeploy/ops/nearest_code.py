"""The NearestCode op: one contract, several implementations (DESIGN.md section 3).

Contract
--------
``nearest_code(x[M, D], codebook[K, D]) -> int64[M]`` is ``argmin_k ||x - c_k||^2``; ties go to
the lowest k (what ``torch.argmin`` and ONNX ``ArgMin(select_last_index=0)`` do). The truth is the
same argmin computed in float64 (`nearest_code_reference`). Cosine codebooks normalise x and the
codes before the op; the op itself is always squared L2.

Every implementation computes, in float32, the score ``s_k = ||c_k||^2 - 2 x.c_k``: it differs
from ``||x - c_k||^2`` by ``||x||^2``, which is the same for every k, so the argmin is unchanged
and one rounding of a large term is saved. Half-precision inputs are widened to float32 first.

Certified ties (DESIGN.md section 4), see `tie_tolerance`
------------------------------------------------------
Let u be the unit roundoff of the arithmetic (2^-24 for float32) and gamma_n = n u / (1 - n u).
A float32 implementation computes each score with an error bounded by

    |fl(s_k) - s_k| <= gamma_{D+3} * (||x|| + ||c_k||)^2                                   (1)

because the dot product x.c_k in any summation order (blocked GEMM, FMA, split-K) carries an error
of at most gamma_D * sum_i |x_i||c_ki| <= gamma_D ||x|| ||c_k|| (Cauchy-Schwarz), ||c_k||^2 likewise
gamma_D ||c_k||^2, and a backend that also adds ||x||^2 (cdist style) adds gamma_D ||x||^2; the
final additions cost at most three more roundings. (||x|| + ||c_k||)^2 covers all three terms.
If an implementation returns index b where the float64 argmin (or another implementation) gives
a, then fl(s_b) <= fl(s_a), hence in exact arithmetic

    d(x, c_b) - d(x, c_a) = s_b - s_a <= err_b + err_a = tau(x; a, b)                        (2)

so any disagreement with d(x, c_b) - d(x, c_a) <= tau is explained by float32 rounding alone: a
certified tie. A larger gap is a parity violation. Lower-precision arithmetic (TF32, bf16) uses
its own u in the same formula.
"""

from __future__ import annotations

import torch

UNIT_ROUNDOFF = {
    "float32": 2.0**-24,
    "tf32": 2.0**-11,
    "bfloat16": 2.0**-8,
    "float16": 2.0**-11,
}

# Budget for the one block of scores (or dot products) an encode call holds at a time, for the
# blocked path and the compiled CPU kernel alike (DESIGN.md section 5: <= 64 MiB). Measured for the
# kernel on 2 cores (benchmarks/RESULTS.md): 16 MiB was the fastest or within noise of it at every
# size of DESIGN.md section 5; 4 MiB lost 10-20% where K is large (too few columns per GEMM), 32 MiB
# up to 10%.
SCORE_BLOCK_BYTES = 16 * 2**20
MAX_BLOCK_ROWS = 65536


# Values of the temporary that `squared_norms` squares at a time (1 MiB of float32).
NORM_BLOCK_VALUES = 2**18


def squared_norms(rows: torch.Tensor) -> torch.Tensor:
    """||r||^2 of every row, summed in the rows' dtype, a block of rows at a time.

    A codebook of 8192 x 512 float32 is 16 MiB: squaring it whole would double that for every call.
    """
    out = torch.empty(rows.shape[0], dtype=rows.dtype, device=rows.device)
    step = max(1, NORM_BLOCK_VALUES // max(rows.shape[1], 1))
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step]
        torch.sum(block * block, dim=1, out=out[start : start + step])
    return out


def rows_per_block(num_codes: int) -> int:
    """Rows of x scored at once so that a float32 block of scores stays within SCORE_BLOCK_BYTES."""
    return max(16, min(MAX_BLOCK_ROWS, SCORE_BLOCK_BYTES // (4 * max(num_codes, 1))))


def nearest_code_reference(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The truth of the contract: the same argmin computed in float64 (for tests and verification)."""
    return nearest_code_blocked(x, codebook, dtype=torch.float64)


def squared_distances64(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """||x_i - c_{indices_i}||^2 in float64, row by row (no M x K matrix)."""
    diff = x.detach().double() - codebook.detach().double()[indices]
    return (diff * diff).sum(-1)


def tie_tolerance(
    x: torch.Tensor,
    codebook: torch.Tensor,
    index_a: torch.Tensor,
    index_b: torch.Tensor,
    precision: str = "float32",
) -> torch.Tensor:
    """tau(x; a, b) of equation (2) in the module docstring, in float64, one value per row."""
    u = UNIT_ROUNDOFF[precision]
    dim = x.shape[-1]
    gamma = (dim + 3) * u / (1 - (dim + 3) * u)
    x_norm = x.detach().double().norm(dim=-1)
    c_norm = codebook.detach().double().norm(dim=-1)
    return gamma * ((x_norm + c_norm[index_a]) ** 2 + (x_norm + c_norm[index_b]) ** 2)


def nearest_code_blocked(
    x: torch.Tensor, codebook: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Blocked implementation: one reused block of scores, never the M x K matrix.

    Works on any device: the float64 reference, and the CPU path of the custom op where the
    compiled kernel of `vqdeploy.ops.cpu_kernels` is not available.
    """
    num_rows, num_codes = x.shape[0], codebook.shape[0]
    out = torch.empty(num_rows, dtype=torch.int64, device=x.device)
    if num_rows == 0:
        return out
    codes = codebook.detach().to(dtype).contiguous()
    code_norms = squared_norms(codes)
    codes_t = codes.t()
    step = min(rows_per_block(num_codes), num_rows)
    scores = torch.empty(step, num_codes, dtype=dtype, device=x.device)
    best = torch.empty(step, dtype=dtype, device=x.device)
    for start in range(0, num_rows, step):
        stop = min(start + step, num_rows)
        xb = x[start:stop].detach().to(dtype)
        block = scores[: stop - start]
        torch.addmm(code_norms, xb, codes_t, beta=1.0, alpha=-2.0, out=block)
        # min(dim) returns the first minimal index, as argmin does, and runs faster on CPU.
        torch.min(block, dim=1, out=(best[: stop - start], out[start:stop]))
    return out


def _triton_available() -> bool:
    try:
        from vqdeploy.ops import triton_kernels  # noqa: F401
    except ImportError:
        return False
    return True


@torch.library.custom_op("vqdeploy::nearest_code", mutates_args=())
def _nearest_code_op(x: torch.Tensor, codebook: torch.Tensor, mode: str = "exact") -> torch.Tensor:
    from vqdeploy.ops import cpu_kernels  # imports this module

    if x.device.type == "cpu" and codebook.shape[0] > 0 and cpu_kernels.available():
        return cpu_kernels.nearest_code_cpu(x, codebook)
    return nearest_code_blocked(x, codebook)


@_nearest_code_op.register_kernel("cuda")
def _nearest_code_cuda(x: torch.Tensor, codebook: torch.Tensor, mode: str = "exact") -> torch.Tensor:
    if _triton_available():
        from vqdeploy.ops.triton_kernels import nearest_code_triton

        return nearest_code_triton(x, codebook, mode=mode)
    return nearest_code_blocked(x, codebook)


@_nearest_code_op.register_fake
def _nearest_code_fake(x: torch.Tensor, codebook: torch.Tensor, mode: str = "exact") -> torch.Tensor:
    return x.new_empty((x.shape[0],), dtype=torch.int64)


MODES = ("exact", "fast")


def nearest_code(x: torch.Tensor, codebook: torch.Tensor, mode: str = "exact") -> torch.Tensor:
    """Index of the nearest code for every row of ``x`` (contract in the module docstring).

    >>> import torch
    >>> codes = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    >>> nearest_code(torch.tensor([[0.9, 0.8], [0.5, 0.5]]), codes).tolist()  # the tie goes to 0
    [1, 0]
    """
    return torch.ops.vqdeploy.nearest_code(x, codebook, mode)
