"""Fused exact nearest-code kernel in Triton (docs/design.md sections 3 to 5).

`nearest_code_triton(x, codebook, mode)` computes the contract of `vqdeploy.ops.contract`
(argmin_k ||x - c_k||^2, ties to the lowest k) without writing the M x K matrix: one program per
tile of BLOCK_M rows loops over tiles of BLOCK_K codes, accumulates x.c over slices of BLOCK_D
with `tl.dot`, forms the score s_k = ||c_k||^2 - 2 x.c_k in float32 (code norms computed once per
call, in float32) and keeps a running (min, argmin) per row in registers. Memory: the inputs, the
int64 output, K code norms, 3 x K bound terms, the index list of rows that need a re-check and,
in ``fast``, an int32 [rows, 3] candidate list per pass (12 bytes a row).

Passes and modes
----------------
The kernel runs with one of four dot precisions:

* ``ieee``: float32 FMA (CUDA cores). Its scores obey the bound of `vqdeploy.ops.contract`
  (eq. (1), u = 2^-24), so its argmin differs from the float64 argmin only by certified ties.
  Call that argmin the *ieee argmin*. Both modes return the exact argmin on every row that a
  low-precision pass decides, and the ieee argmin on the rows left to ``ieee`` (step 5).
* ``tf32x3``: three TF32 tensor-core products (hi*hi + hi*lo + lo*hi), close to float32 accuracy
  and ~3x faster than ``ieee`` on an H100 (docs/design.md section 5).
* ``tf32``: one TF32 tensor-core pass, ~10x faster than ``ieee``, with 2^-11 input rounding.
* ``bf16``: both operands rounded to bf16 in the kernel (2^-8), a bf16 tensor-core ``tl.dot``
  with float32 accumulation (about half the TF32 GEMM's time on an H100: docs/design.md section
  10); its bound is the ``tf32`` one with bf16 residuals (steps 1, 2).

A low-precision pass also flags every row whose best-vs-second margin is within its rigorous error
bound (step 4 below); flagged rows (returned as ``-1 - index`` by the kernel, so no extra buffer
is needed) are gathered by index and recomputed by the next pass. A pass with candidate lists
(step 6) also returns, for a flagged row whose possible exact argmins are at most L codes, those
codes (the row is *listed*); a second launch decides listed rows from them (`resolve_listed`)
and only the other flagged rows go on.

* ``exact``: a ``tf32x3`` pass, then ``ieee`` on its flagged rows (no lists).
* ``fast``: ``bf16[3] > tf32[3] > tf32x3[3] > ieee[3]`` (`FAST_CHAIN`, lists of L = 3 in every
  pass, as `vqdeploy.ops.pass_emulation.emulate_chain` runs it): each pass sees the rows the
  previous one neither decided nor listed.

In both modes the ``ieee`` pass flags too, with its own bound, and the rows it flags (near ties,
duplicates, exact midpoints: 0.02-0.14% of random rows, emulated), with the listed rows whose
float64 distances do not separate (exact and float64 ties), are re-solved on the host by
`vqdeploy.ops.contract.exact_nearest`. Every pass certifies the exact argmin of the rows it
does not flag, listed rows are decided exactly, so both modes return the exact argmin, row by
row, and the same tokens.

`vqdeploy.ops.pass_emulation` emulates the passes on CPU (TF32 and bf16 rounding, float32
accumulation, the kernel's flag and lists in float32) and ``benchmarks/bench_pass_bounds.py``
counts the rows that leave each pass. At (256, 1024) on random rows the bf16 pass flags 26.7% of
the rows and lists all but 1.5% of them; 0.008% reach the tf32x3 pass (benchmarks/RESULTS.md,
emulated). The interpreted kernel's flags, lists and per-pass row counts equal the emulation's
row for row on data whose dots are exact in any order (tests/ops/test_triton_kernels.py). Not
measured (no GPU was available): the time of the bf16 pass, of the list tracking (per row and
tile, L + 1 = 4 extractions of a tile minimum and its lowest code, two reductions each, and one
NaN check), and of `resolve_listed`'s float64 check, so the 2.5 ms target of docs/design.md
section 10 is open.

Error bound of a pass and the re-check test
-------------------------------------------
Notation of `vqdeploy.ops.contract`: gamma_n(u) = n u / (1 - n u); s_k = ||c_k||^2 - 2 x.c_k
the exact score, t_k the score a pass computes; ||.|| the 2-norm; u = 2^-24, v = 2^-11 (TF32
rounding), w = 2^-23 (tensor-core accumulation, allowing truncation); tf32(v) the TF32 rounding of
a vector and r(v) = v - tf32(v) its residual; n_k the float32 code norm the kernel loads.
Underflow adds at most (3a) of `vqdeploy.ops.contract`, 2^-124 (D + 1 + sqrt(D) (||x|| + ||c_k||)),
which `code_bound_terms` folds into g_k and q_k; the bounds assume no overflow.

1. Input rounding. The tf32 pass rounds both operands to TF32 (10 explicit mantissa bits) with
   round-to-nearest *in the kernel* (the tensor core itself may truncate; pre-rounding makes its
   conversion exact), so |tf32(a) - a| <= v |a| elementwise; the product of two TF32 numbers
   (11-bit significands) is exact in float32. With x~ = tf32(x), c~ = tf32(c), exactly
       x.c - x~.c~ = r(x).c + x~.r(c),  so  |x.c - x~.c~| <= ||r(x)|| ||c|| + (1 + v) ||x|| ||r(c)||
   by Cauchy-Schwarz on the residuals. ||r(x)|| is typically ~0.4 v ||x||, not v ||x||: this is
   where the bound gains most over bounding every product by (2v + v^2) |x_i c_i|. The bf16
   pass is the same with v = 2^-8 and r the bf16 residual (`round_bf16`: 8-bit significands,
   whose products are exact in float32; converting the rounded values to bf16 is exact).
2. Accumulation of n products in float32 adds at most gamma_n(w) * sum |products| (w = 2^-24 for
   the FMA ``ieee`` pass) and sum_i |a_i b_i| <= ||a|| ||b||. Hence |fl(x.c_k) - x.c_k| <= Delta_k,
       tf32:   Delta_k = ||r(x)|| ||c_k|| + (1 + v) ||x|| ||r(c_k)|| + gamma_D(w) (1 + v)^2 ||x|| ||c_k||
       ieee:   Delta_k = gamma_D(2^-24) ||x|| ||c_k||
       tf32x3: Delta_k = (rho + gamma_{3D}(w) g) ||x|| ||c_k||,
                         rho = 12 v^2 + 16 v^3,  g = (1+2v)^2 + 4v (1+2v),
   where for tf32x3 (each split assumed truncated: |a - a_hi| <= 2v|a|, the part lo*lo and the
   residual a - a_hi - a_lo are dropped) rho bounds the relative error of one product and g the
   sum of the three partial products' magnitudes.
3. The score t_k = fl(n_k - 2 fl(x.c_k)) rounds once (2^-24), so
       |t_k - s_k| <= (1 + u) |n_k - ||c_k||^2| + u ||c_k||^2 + 2 (1 + u) Delta_k + 2u ||x|| ||c_k||.
   n_k is summed in float32 (error <= gamma_D(u) ||c_k||^2), but its actual error is known: the host
   computes ||c_k||^2 in float64 (squares of float32 values are exact there) and uses
   |n_k - ||c_k||^2| + D 2^-52 ||c_k||^2, typically ~sqrt(D) times smaller than the worst case.
   `score_error_coefficients` returns these coefficients (`ErrorCoefficients`).
4. The test. Let e_k >= |t_k - s_k| for every code and b the pass's argmin. If
       min_{k != b} (t_k - e_k) > t_b + e_b                                                  (3)
   then for every k != b, s_k >= t_k - e_k > t_b + e_b >= s_b: b is the strict exact argmin.
   The kernel evaluates e_k = ||x|| g_k + ||r(x)|| h_k + q_k per row and code, with per-code terms
   (`code_bound_terms`, computed on the host in float64 and rounded up to float32)
       g_k = cross ||c_k|| + code_residual ||r(c_k)||,  h_k = row_residual ||c_k||,
       q_k = square ||c_k||^2 + norm |n_k - ||c_k||^2|,
   from `margin_threshold_coefficients`: step 3's coefficients, plus 2u (||c_k||^2 + 2 ||x|| ||c_k||
   + |n_k - ||c_k||^2|) for the float32 roundings of t_k - e_k and t_b + e_b (each <= u (|t| + e)),
   all times `safety` = 1 + 2 gamma_{D+8}(2^-24) + 2^-20, which covers ||x||, ||r(x)|| (exact
   differences x - tf32(x), squared and summed in float32, IEEE square root) and e_k evaluated
   in float32 (a relative gamma_{D+4} at most). FMA contraction only removes roundings. A NaN
   anywhere flags the row.
   Tracking: per row the kernel keeps the best score t_b, its index, t_b - e_b and t_b + e_b, and
   other_lo = min of t_k - e_k over the codes seen other than the current best; when a tile brings
   a new best, the old best's t - e joins other_lo. This is the same float32 minimum as over all
   codes at once (each t_k - e_k is computed once, in the same way, whichever tile holds it), so
   the emulation computes it globally and matches the interpreted kernel row for row. Per score,
   this costs three FMAs and one reduction more than tracking the second-best score.
   The former test (flag when second - best <= A ||x|| C + B C^2 with C = max_k ||c_k||, A and B
   covering this pass's and the ``ieee`` pass's errors) flagged 10.6% of random rows at (256, 1024)
   where this one flags 3.8%; `vqdeploy.ops.pass_emulation` keeps it as ``bound="legacy"``.
5. Tokens. A row that a pass does not flag gets the exact argmin; a listed row gets it from its
   candidates (step 6); other flagged rows go on, and the ``ieee`` pass decides the rest. The exact re-check that follows it (the exact-tokens issue)
   makes every mode return the exact argmin, so ``fast`` and ``exact`` agree row by row. Without
   that re-check the ``ieee`` pass returns its own argmin, which differs from the exact one only
   by a tie certified by ``tie_tolerance(..., arithmetic="float32")``; the two modes can then
   differ only on such rows (a row the ``tf32`` pass certified and the ``tf32x3`` pass did not).
6. Candidate lists (docs/design.md section 10). With lo_k = fl(t_k - e_k) and hi = fl(t_b + e_b)
   as step 4 computes them, lo_k <= s_k and s_b <= hi, so every code with lo_k > hi is strictly
   farther than b: the exact argmin (ties to the lowest k) is the exact argmin over
   C = {k : lo_k <= hi}, and b is in C. Per row the kernel keeps the L + 1 smallest lo_k with
   their codes, merged tile by tile: L + 1 times, the least value of (kept) u (tile), its lowest
   code, removed by code (a code lives in one tile, so the index identifies it). The kept values
   are the L + 1 smallest of all lo_k whichever tile held them, so they equal a global selection
   (the emulation's `torch.topk`); which of equal values is kept does not matter, since every code
   with lo_k <= hi < lambda is kept. A flagged row is *listed* when lambda, the (L + 1)-th
   smallest, exceeds hi (then the kept codes with lo_k <= hi are all of C), hi is finite, no lo_k
   is NaN, and ||x|| <= `list_norm_limit` (||x|| max ||c_k|| <= 2^120: no product, partial sum
   or score overflows). The kernel writes the listed row's codes with lo_k <= hi into an int32
   [rows, L] buffer (-1 pads; -1 throughout for rows not listed). A second launch
   (`resolve_listed`) decides the listed rows with the test of
   `vqdeploy.ops.contract.resolve_candidates`: the float64 distances of a row's <= L codes (each
   read in place, float64 differences of float32 values, summed in any order), j the smallest,
   decide when fl(d^_j F) < d^_k for every other candidate (F = `float64_separation`, passed
   as float64); the rest (exact or float64 ties) go to the exact re-check. Rows flagged and not
   listed go on to the next pass.

Other entry points: `nearest_code_into` (write into a given int64 buffer), `launch_on_stream`
(for the TensorRT plugin: run on a given CUDA stream), `compile_exact_ptx` (PTX of the
single-pass ``ieee`` kernel for the TensorRT AOT plugin).

With ``TRITON_INTERPRET=1`` set before triton is imported, the kernel runs in the Triton
interpreter on CPU tensors (slow; for tests: it checks the logic, not the GPU's arithmetic). The
interpreter's ``tl.dot`` is float32 whatever the precision (the kernel's own rounding makes the
tf32 and bf16 passes' products what the tensor core computes) and multiplies the stored bits of
bf16 tensors, so there the bf16 pass keeps its bf16-rounded operands in float32
(``BF16_OPERANDS=False``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # custom_op.py falls back to the blocked torch path
    raise ImportError("vqdeploy.ops.triton_kernels needs Triton: pip install triton") from exc

from vqdeploy.errors import (
    DeviceMismatchError,
    DeviceNotAvailableError,
    InputDtypeError,
    InputShapeError,
    UnsupportedOptionError,
)
from vqdeploy.ops.contract import (
    CANDIDATE_NORM_LIMIT,
    UNDERFLOW_UNIT,
    exact_nearest,
    float64_separation,
    squared_norms,
)

__all__ = [
    "MODES",
    "ErrorCoefficients",
    "KernelConfig",
    "code_bound_terms",
    "launch_on_stream",
    "list_norm_limit",
    "margin_threshold_coefficients",
    "mode_chain",
    "nearest_code_into",
    "nearest_code_pass",
    "nearest_code_triton",
    "resolve_listed",
    "round_bf16",
    "round_tf32",
    "score_error_coefficients",
    "select_config",
]

MODES = ("exact", "fast")
DOTS = ("ieee", "tf32x3", "tf32", "bf16")
# Precisions with an error model (steps 1 to 4): every pass of the kernel.
BOUND_DOTS = DOTS
# The passes of each mode and their candidate lists (docs/design.md section 10).
EXACT_CHAIN = ("tf32x3", "ieee")
FAST_CHAIN = ("bf16", "tf32", "tf32x3", "ieee")
FAST_CANDIDATES = 3
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

U_FP32 = 2.0**-24  # unit roundoff of float32, round to nearest
U_ACC_TC = 2.0**-23  # tensor-core accumulation, allowing truncation
V_TF32 = 2.0**-11  # unit roundoff of the TF32 conversion, round to nearest
V_BF16 = 2.0**-8  # unit roundoff of the bf16 conversion (8-bit significand), round to nearest
# FMA contraction only merges roundings, so every bound above holds with or without it; pinned
# so that the kernel does not change when Triton changes its default (3.10 turns it off).
FP_FUSION = True


# ----------------------------------------------------------------------------------------------
# Error bounds (module docstring, steps 1 to 4)
# ----------------------------------------------------------------------------------------------


def _gamma(n: float, u: float) -> float:
    """gamma_n(u) = n u / (1 - n u); infinite where n u >= 1 (no bound)."""
    nu = n * u
    return math.inf if nu >= 1.0 else nu / (1.0 - nu)


@dataclass(frozen=True)
class ErrorCoefficients:
    """Coefficients of a bound linear in products of norms (module docstring, steps 3 and 4):

    ``cross ||x|| ||c_k|| + code_residual ||x|| ||r(c_k)|| + row_residual ||r(x)|| ||c_k||
    + square ||c_k||^2 + norm |n_k - ||c_k||^2|``, with r(v) = v - tf32(v) the TF32 rounding
    residual of a vector and n_k the float32 code norm the kernel loads.
    """

    cross: float
    code_residual: float
    row_residual: float
    square: float
    norm: float

    def __add__(self, other: ErrorCoefficients) -> ErrorCoefficients:
        return ErrorCoefficients(*(a + b for a, b in zip(self.astuple(), other.astuple(), strict=True)))

    def astuple(self) -> tuple[float, float, float, float, float]:
        """(cross, code_residual, row_residual, square, norm)."""
        return (self.cross, self.code_residual, self.row_residual, self.square, self.norm)

    def scaled(self, factor: float) -> ErrorCoefficients:
        """Every coefficient times ``factor``."""
        return ErrorCoefficients(*(a * factor for a in self.astuple()))

    def is_finite(self) -> bool:
        """False where the bound does not exist (n u >= 1 in some gamma_n)."""
        return all(math.isfinite(c) for c in self.astuple())


def _dot_error(dot: str, dim: int) -> tuple[float, float, float]:
    """Step 2: (cross, code_residual, row_residual) with |fl(x.c) - x.c| <= their norm products."""
    v = V_TF32
    if dot == "ieee":
        return _gamma(dim, U_FP32), 0.0, 0.0
    if dot in ("tf32", "bf16"):
        # x.c - x~.c~ = r(x).c + x~.r(c) exactly; ||x~|| <= (1 + v)||x||, ||c~|| <= (1 + v)||c||.
        # Products of two TF32 (11-bit) or bf16 (8-bit) significands are exact in float32.
        v = V_BF16 if dot == "bf16" else V_TF32
        return _gamma(dim, U_ACC_TC) * (1.0 + v) ** 2, 1.0 + v, 1.0
    if dot == "tf32x3":
        rho = 12 * v**2 + 16 * v**3
        growth = (1 + 2 * v) ** 2 + 4 * v * (1 + 2 * v)
        return rho + _gamma(3 * dim, U_ACC_TC) * growth, 0.0, 0.0
    raise UnsupportedOptionError(f"dot precision must be one of {BOUND_DOTS}, got {dot!r}")


def score_error_coefficients(dot: str, dim: int) -> ErrorCoefficients:
    """Step 3: |t_k - s_k| <= the `ErrorCoefficients` bound for one pass's score t_k.

    The loaded norm's own error |n_k - ||c_k||^2| is at most gamma_D(2^-24) ||c_k||^2 (it is summed
    in float32); `code_bound_terms` uses its exact value instead.
    """
    cross, code_res, row_res = _dot_error(dot, dim)
    u = U_FP32
    return ErrorCoefficients(
        cross=2.0 * (1.0 + u) * cross + 2.0 * u,
        code_residual=2.0 * (1.0 + u) * code_res,
        row_residual=2.0 * (1.0 + u) * row_res,
        square=u,
        norm=1.0 + u,
    )


def margin_threshold_coefficients(dot: str, dim: int) -> ErrorCoefficients:
    """Step 4: the per-code slack e_k of a ``dot`` pass, as `ErrorCoefficients`.

    A row keeps its best code b when min_{k != b} (t_k - e_k) > t_b + e_b, evaluated in float32:
    then b is the strict exact argmin. e_k covers the pass's score error and the float32
    evaluation of the test (safety factor included). Infinite coefficients mean the bound does not
    exist (huge D): every row must be re-checked.
    """
    u = U_FP32
    evaluation = ErrorCoefficients(cross=4.0 * u, code_residual=0.0, row_residual=0.0, square=2.0 * u, norm=2.0 * u)
    safety = 1.0 + 2.0 * _gamma(dim + 8, u) + 2.0**-20
    return (score_error_coefficients(dot, dim) + evaluation).scaled(safety)


def round_tf32(values: torch.Tensor) -> torch.Tensor:
    """float32 -> nearest TF32 value (ties away from zero), the kernel's bit trick, as float32."""
    bits = values.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & -8192).view(torch.float32)


def round_bf16(values: torch.Tensor) -> torch.Tensor:
    """float32 -> nearest bf16 value (ties away from zero), as float32: the same bit trick with 8 bits.

    |round_bf16(a) - a| <= 2^-8 |a| for normal a, and a - round_bf16(a) is exact in float32.
    """
    bits = values.float().contiguous().view(torch.int32)
    return ((bits + 0x8000) & -65536).view(torch.float32)


_ROUNDING = {"tf32": round_tf32, "bf16": round_bf16}


def code_bound_terms(
    codebook: torch.Tensor, dot: str, code_norms: torch.Tensor | None = None, residual: bool = True
) -> torch.Tensor:
    """Per-code float32 terms [3, K] of the slack e_k = ||x|| g_k + ||r(x)|| h_k + q_k (step 4).

    g_k = cross ||c_k|| + code_residual ||r(c_k)||, h_k = row_residual ||c_k||,
    q_k = square ||c_k||^2 + norm |n_k - ||c_k||^2|, computed in float64 from the float32 codes and
    rounded up to float32. ``code_norms`` are the n_k the kernel loads (float32); without them
    the norm error is bounded by gamma_D(2^-24) ||c_k||^2. r is the pass's own rounding residual
    (TF32 for ``"tf32"``, bf16 for ``"bf16"``). ``residual=False`` bounds the residual terms by
    ||r(v)|| <= v ||v|| (2^-11, or 2^-8 for bf16; no ||r(x)|| needed; for comparison in
    `vqdeploy.ops.pass_emulation`).
    """
    dim = codebook.shape[1]
    coef = margin_threshold_coefficients(dot, dim)
    codes = codebook.detach()
    norms = torch.empty(codes.shape[0], dtype=torch.float64, device=codes.device)
    res = torch.zeros_like(norms)
    step = max(1, 2**18 // max(dim, 1))  # 1 MiB of float32 codes at a time
    for start in range(0, codes.shape[0], step):
        block = codes[start : start + step].float()
        norms[start : start + step] = torch.linalg.vector_norm(block, dim=1, dtype=torch.float64)
        if dot in _ROUNDING:
            rounded = _ROUNDING[dot](block)
            res[start : start + step] = torch.linalg.vector_norm(block - rounded, dim=1, dtype=torch.float64)
    sq = norms.square()
    if code_norms is None:
        norm_err = _gamma(dim, U_FP32) * sq
    else:
        # Squares of float32 values are exact in float64; the float64 sum errs by <= D 2^-53 of it.
        norm_err = (code_norms.detach().to(sq.device, torch.float64) - sq).abs() + dim * 2.0**-52 * sq
    if residual:
        g = coef.cross * norms + coef.code_residual * res
        h = coef.row_residual * norms
    else:
        v = V_BF16 if dot == "bf16" else V_TF32
        g = (coef.cross + (coef.code_residual + coef.row_residual) * v) * norms
        h = torch.zeros_like(norms)
    q = coef.square * sq + coef.norm * norm_err
    # (3a): what underflow (gradual or flushed) may add to a score, 2^-124 (D + 1 + sqrt(D) (||x|| + ||c_k||))
    g = g + math.sqrt(dim) * UNDERFLOW_UNIT
    q = q + UNDERFLOW_UNIT * (dim + 1 + math.sqrt(dim) * norms)
    terms = torch.nan_to_num(torch.stack([g, h, q]).mul_(1.0 + 2.0**-30), nan=math.inf)
    up = terms.float()
    return torch.where(up.double() < terms, torch.nextafter(up, torch.full_like(up, math.inf)), up).contiguous()


# ----------------------------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _program_rows(rows_ptr, M, BLOCK_M: tl.constexpr, ROWS_INDEXED: tl.constexpr):
    """This program's positions [pid*BLOCK_M, +BLOCK_M), which of them exist (< M), and their row
    numbers: rows_ptr[position] with ROWS_INDEXED, else the positions (int64: M * D may exceed 2^31)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    if ROWS_INDEXED:
        rows = tl.load(rows_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    else:
        rows = offs_m.to(tl.int64)
    return offs_m, m_mask, rows


@triton.jit
def _nearest_code_kernel(
    x_ptr,
    c_ptr,
    cnorm_ptr,
    rows_ptr,
    bound_ptr,
    M,
    K,
    D,
    list_norm_max,
    out_ptr,
    cand_ptr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT: tl.constexpr,
    ROUND: tl.constexpr,
    TRACK_SECOND: tl.constexpr,
    NORMS_IN_KERNEL: tl.constexpr,
    ROWS_INDEXED: tl.constexpr,
    LIST: tl.constexpr,
    LIST_WIDTH: tl.constexpr,
    BF16_OPERANDS: tl.constexpr,
):
    """Rows [pid*BLOCK_M, +BLOCK_M) (or rows_ptr[...] of them): index of the nearest code.

    Non-constexpr arguments are ordered (inputs, scalars, outputs) so that the AOT variant
    (cnorm_ptr, rows_ptr, bound_ptr, list_norm_max, cand_ptr made constexpr) matches TensorRT's
    launch convention. With TRACK_SECOND, bound_ptr holds the [3, K] float32 terms of
    `code_bound_terms`. ROUND ("", "tf32" or "bf16") rounds both operands in the kernel (DOT
    "tf32" or "bf16"). With LIST = L > 0 (candidate lists, step 6), cand_ptr is int32 [M, L]:
    row m's candidates (by position m in this launch, not by row number) where the row is listed,
    -1 everywhere else. LIST_WIDTH is a power of two > L. BF16_OPERANDS feeds tl.dot bf16
    tensors (the bf16 tensor-core product); the interpreter keeps the same values in float32,
    since its tl.dot multiplies the stored bits of bf16 tensors.
    """
    offs_m, m_mask, rows = _program_rows(rows_ptr, M, BLOCK_M, ROWS_INDEXED)
    x_rows = x_ptr + rows * D  # int64 offsets: M * D may exceed 2^31
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)

    best = tl.full([BLOCK_M], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_M], tl.int32)
    # Step 4: lower bounds t_k - e_k of the codes other than the best, and t_b -/+ e_b of the best.
    other_lo = tl.full([BLOCK_M], float("inf"), tl.float32)
    best_lo = tl.full([BLOCK_M], float("inf"), tl.float32)
    best_hi = tl.full([BLOCK_M], float("inf"), tl.float32)
    # Step 6: the LIST + 1 smallest t_k - e_k (ascending, in columns 0..LIST) and their codes.
    cols = tl.arange(0, LIST_WIDTH)
    list_lo = tl.full([BLOCK_M, LIST_WIDTH], float("inf"), tl.float32)
    list_code = tl.full([BLOCK_M, LIST_WIDTH], -1, tl.int32)
    nan_lo = tl.zeros([BLOCK_M], tl.int32)
    x_sq = tl.zeros([BLOCK_M], tl.float32)
    r_sq = tl.zeros([BLOCK_M], tl.float32)
    if TRACK_SECOND:
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            xt = tl.load(x_rows[:, None] + dd[None, :], mask=m_mask[:, None] & (dd < D)[None, :], other=0.0)
            xt = xt.to(tl.float32)
            x_sq += tl.sum(xt * xt, axis=1)
            # x - tf32(x) and x - bf16(x) are exact in float32: the rounding residual r(x).
            if ROUND == "tf32":
                rt = xt - ((xt.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)
                r_sq += tl.sum(rt * rt, axis=1)
            if ROUND == "bf16":
                rt = xt - ((xt.to(tl.int32, bitcast=True) + 0x8000) & -65536).to(tl.float32, bitcast=True)
                r_sq += tl.sum(rt * rt, axis=1)
    # sqrt_rn: IEEE square root (tl.sqrt may be the approximate one); the bound counts one rounding.
    x_norm = tl.sqrt_rn(x_sq)
    r_norm = tl.sqrt_rn(r_sq)

    for k0 in range(0, K, BLOCK_K):
        codes = k0 + offs_k
        k_mask = codes < K
        c_rows = c_ptr + codes.to(tl.int64) * D
        acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
        c_norm = tl.zeros([BLOCK_K], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            d_mask = dd < D
            xt = tl.load(x_rows[:, None] + dd[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
            ct = tl.load(c_rows[:, None] + dd[None, :], mask=k_mask[:, None] & d_mask[None, :], other=0.0)
            xt = xt.to(tl.float32)
            ct = ct.to(tl.float32)
            if NORMS_IN_KERNEL:
                c_norm += tl.sum(ct * ct, axis=1)
            # Round to nearest (ties away) in the kernel: the tensor core then converts exactly.
            if ROUND == "tf32":
                xt = ((xt.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)
                ct = ((ct.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)
            if ROUND == "bf16":
                xt = ((xt.to(tl.int32, bitcast=True) + 0x8000) & -65536).to(tl.float32, bitcast=True)
                ct = ((ct.to(tl.int32, bitcast=True) + 0x8000) & -65536).to(tl.float32, bitcast=True)
            if DOT == "bf16":
                if BF16_OPERANDS:
                    # bf16 values already: the conversion is exact, products are exact in float32.
                    acc = tl.dot(xt.to(tl.bfloat16), tl.trans(ct.to(tl.bfloat16)), acc)
                else:
                    acc = tl.dot(xt, tl.trans(ct), acc)
            else:
                acc = tl.dot(xt, tl.trans(ct), acc, input_precision=DOT)
        if not NORMS_IN_KERNEL:
            c_norm = tl.load(cnorm_ptr + codes, mask=k_mask, other=0.0)
        scores = c_norm[None, :] - 2.0 * acc
        scores = tl.where(k_mask[None, :], scores, float("inf"))
        tile_best = tl.min(scores, axis=1)
        # Lowest code index reaching the tile minimum: ties go to the lowest k.
        tile_idx = tl.min(tl.where(scores == tile_best[:, None], codes[None, :], K), axis=1)
        # Strict <: an equal score in a later tile has a higher index and loses the tie.
        better = tile_best < best
        if TRACK_SECOND:
            g = tl.load(bound_ptr + codes, mask=k_mask, other=0.0)
            q = tl.load(bound_ptr + 2 * K + codes, mask=k_mask, other=0.0)
            err = x_norm[:, None] * g[None, :]
            if ROUND != "":
                h = tl.load(bound_ptr + K + codes, mask=k_mask, other=0.0)
                err = err + r_norm[:, None] * h[None, :]
            err = err + q[None, :]
            lo = scores - err  # masked codes: inf - 0
            is_best = codes[None, :] == tile_idx[:, None]
            tile_err = tl.sum(tl.where(is_best, err, 0.0), axis=1)  # one nonzero term: exact
            tile_other = tl.min(tl.where(is_best, float("inf"), lo), axis=1)
            tile_lo = tile_best - tile_err  # the lo of the tile's best, bit for bit
            keep_other = tl.minimum(other_lo, tl.minimum(tile_other, tile_lo))
            new_other = tl.minimum(tl.minimum(other_lo, best_lo), tile_other)
            other_lo = tl.where(better, new_other, keep_other)
            best_lo = tl.where(better, tile_lo, best_lo)
            best_hi = tl.where(better, tile_best + tile_err, best_hi)
            if LIST > 0:
                # Merge: the LIST + 1 smallest of (kept values) u (this tile's), taken one at a
                # time; a code is in one tile only, so its index identifies the value taken.
                lo_t = tl.where(k_mask[None, :], lo, float("inf"))
                nan_lo = tl.maximum(nan_lo, tl.max(tl.where(k_mask[None, :] & (lo != lo), 1, 0), axis=1))
                merged_lo = tl.full([BLOCK_M, LIST_WIDTH], float("inf"), tl.float32)
                merged_code = tl.full([BLOCK_M, LIST_WIDTH], -1, tl.int32)
                for j in tl.static_range(LIST + 1):
                    least = tl.minimum(tl.min(lo_t, axis=1), tl.min(list_lo, axis=1))
                    code_t = tl.min(tl.where(lo_t == least[:, None], codes[None, :], K), axis=1)
                    code_l = tl.min(tl.where(list_lo == least[:, None], list_code, K), axis=1)
                    code = tl.minimum(code_t, code_l)
                    merged_lo = tl.where(cols[None, :] == j, least[:, None], merged_lo)
                    merged_code = tl.where(cols[None, :] == j, code[:, None], merged_code)
                    lo_t = tl.where(codes[None, :] == code[:, None], float("inf"), lo_t)
                    list_lo = tl.where(list_code == code[:, None], float("inf"), list_lo)
                list_lo = merged_lo
                list_code = merged_code
        best_idx = tl.where(better, tile_idx, best_idx)
        best = tl.where(better, tile_best, best)

    result = best_idx.to(tl.int64)
    if TRACK_SECOND:
        # Not (other_lo > best_hi): a NaN anywhere re-checks the row.
        recheck = ~(other_lo > best_hi)
        result = tl.where(recheck, -1 - result, result)
        if LIST > 0:
            # Listed: flagged, the (LIST + 1)-th smallest lower bound above hi (so the kept codes
            # with lo <= hi are all of C), finite hi, no NaN bound, no overflow (x_norm limit).
            lam = tl.min(tl.where(cols[None, :] == LIST, list_lo, float("inf")), axis=1)
            sane = (nan_lo == 0) & (best_hi < float("inf")) & (best_hi > -float("inf"))
            sane = sane & (x_norm <= list_norm_max)
            listed = recheck & (lam > best_hi) & sane
            keep = listed[:, None] & (list_lo <= best_hi[:, None]) & (cols[None, :] < LIST)
            cand = tl.where(keep, list_code, -1)
            cand_ptrs = cand_ptr + offs_m.to(tl.int64)[:, None] * LIST + cols[None, :]
            tl.store(cand_ptrs, cand, mask=m_mask[:, None] & (cols[None, :] < LIST))
    tl.store(out_ptr + rows, result, mask=m_mask)


@triton.jit
def _resolve_listed_kernel(
    x_ptr,
    c_ptr,
    rows_ptr,
    cand_ptr,
    factor_ptr,
    M,
    D,
    out_ptr,
    LIST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS_INDEXED: tl.constexpr,
):
    """Listed rows of a pass (step 6): out[row] = the exact argmin where the float64 distances of
    the row's candidates separate it, as `vqdeploy.ops.contract.resolve_candidates` decides;
    other rows (not listed, or ties) are left as they are. Positions [pid*BLOCK_M, +BLOCK_M) of
    the pass's cand_ptr [M, LIST]; rows_ptr maps positions to rows. factor_ptr holds F
    (`float64_separation`) as float64: a Python float argument would be passed as float32."""
    offs_m, m_mask, rows = _program_rows(rows_ptr, M, BLOCK_M, ROWS_INDEXED)
    offs_d = tl.arange(0, BLOCK_D)
    factor = tl.load(factor_ptr)
    best = tl.full([BLOCK_M], float("inf"), tl.float64)
    second = tl.full([BLOCK_M], float("inf"), tl.float64)
    best_code = tl.full([BLOCK_M], -1, tl.int32)
    first = tl.load(cand_ptr + offs_m.to(tl.int64) * LIST, mask=m_mask, other=-1)
    listed = m_mask & (first >= 0)
    for j in tl.static_range(LIST):
        code = tl.load(cand_ptr + offs_m.to(tl.int64) * LIST + j, mask=listed, other=-1)
        valid = listed & (code >= 0)
        dist = tl.zeros([BLOCK_M], tl.float64)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            mask = valid[:, None] & (dd < D)[None, :]
            xt = tl.load(x_ptr + rows[:, None] * D + dd[None, :], mask=mask, other=0.0)
            ct = tl.load(c_ptr + code.to(tl.int64)[:, None] * D + dd[None, :], mask=mask, other=0.0)
            diff = xt.to(tl.float32).to(tl.float64) - ct.to(tl.float32).to(tl.float64)  # exact
            dist += tl.sum(diff * diff, axis=1)
        dist = tl.where(valid, dist, float("inf"))
        # The first smallest wins equal distances (then undecided anyway), as torch.min does.
        better = dist < best
        second = tl.where(better, best, tl.minimum(second, dist))
        best_code = tl.where(better, code, best_code)
        best = tl.where(better, dist, best)
    decided = listed & (best * factor < second) & (best < float("inf"))
    tl.store(out_ptr + rows, best_code.to(tl.int64), mask=decided)


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options. BLOCK_* are powers of two >= 16 (tl.dot's minimum)."""

    block_m: int = 128
    block_k: int = 128
    block_d: int = 32
    num_warps: int = 8
    num_stages: int = 3


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


def select_config(dim: int, num_codes: int, dot: str) -> KernelConfig:
    """The config for a problem: depends on (D, K, dot) only, never on M.

    Tiles of 128 rows x 128 codes x 32 dims were the measured H100 baseline (docs/design.md section 5);
    small codebooks or dims shrink their tile so that no work goes to masked lanes.
    """
    block_k = min(128, _pow2_at_least(num_codes))
    block_d = min(32, _pow2_at_least(dim))
    num_stages = 2 if dot == "ieee" else 3
    return KernelConfig(block_m=128, block_k=block_k, block_d=block_d, num_warps=8, num_stages=num_stages)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    """True when the kernel runs in the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_nearest_code_kernel, triton.runtime.JITFunction)


def _kernel_for(device: torch.device, kernel: Any = None) -> Any:
    """The kernel (default: the search) for tensors on ``device``: CUDA, or CPU under the Triton
    interpreter."""
    if device.type == "cpu" and not _interpreting():
        raise DeviceNotAvailableError(
            "the Triton kernel needs CUDA tensors; CPU tensors run only in the Triton interpreter "
            "(set TRITON_INTERPRET=1 before triton is imported). On CPU use vqdeploy.ops.contract."
        )
    return _nearest_code_kernel if kernel is None else kernel


def _check_inputs(x: torch.Tensor, codebook: torch.Tensor) -> None:
    for name, t in (("x", x), ("codebook", codebook)):
        if not isinstance(t, torch.Tensor):
            raise InputDtypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise InputShapeError(f"{name} must have rank 2, got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise InputDtypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if x.shape[1] != codebook.shape[1]:
        raise InputShapeError(f"x has {x.shape[1]} features per row but the codebook has {codebook.shape[1]}")
    if codebook.shape[0] == 0:
        raise InputShapeError("the codebook has no codes (shape [0, D])")
    if x.device != codebook.device:
        raise DeviceMismatchError(f"x is on {x.device} but the codebook is on {codebook.device}")
    if x.device.type not in ("cuda", "cpu"):
        raise DeviceNotAvailableError(
            f"the Triton kernel runs on CUDA tensors (or CPU, interpreted), got {x.device}"
        )
    max_int32 = 2**31 - 1
    if x.shape[0] > max_int32 or codebook.shape[0] > max_int32 or x.shape[1] > max_int32:
        raise InputShapeError(
            f"sizes must fit in int32, got x {tuple(x.shape)}, codebook {tuple(codebook.shape)}"
        )


def list_norm_limit(codebook: torch.Tensor) -> float:
    """The largest float32 n with n max_k ||c_k|| <= 2^120 (in float64): rows with ||x|| <= n may be
    listed (no overflow anywhere in the pass; docs/design.md section 10, `CANDIDATE_NORM_LIMIT`)."""
    c_max = float(torch.linalg.vector_norm(codebook.detach().float(), dim=1, dtype=torch.float64).max())
    top = torch.tensor(torch.finfo(torch.float32).max)
    if not math.isfinite(c_max):
        return 0.0
    if c_max == 0.0:
        return float(top)
    limit = torch.tensor(min(CANDIDATE_NORM_LIMIT / c_max, float(top)), dtype=torch.float32)
    down, up = torch.tensor(-math.inf), torch.tensor(math.inf)
    while float(limit) * c_max > CANDIDATE_NORM_LIMIT:
        limit = torch.nextafter(limit, down)
    while limit < top and float(torch.nextafter(limit, up)) * c_max <= CANDIDATE_NORM_LIMIT:
        limit = torch.nextafter(limit, up)
    return float(limit)


def nearest_code_pass(
    x: torch.Tensor,
    codebook: torch.Tensor,
    code_norms: torch.Tensor,
    out: torch.Tensor,
    dot: str,
    rows: torch.Tensor | None = None,
    config: KernelConfig | None = None,
    bound_terms: torch.Tensor | None = None,
    flag: bool | None = None,
    candidates: int = 0,
    list_limit: float | None = None,
) -> torch.Tensor | None:
    """One launch: writes ``out[rows]`` (all rows if None) for contiguous x and codebook.

    A flagging pass writes ``-1 - index`` for the rows whose margin is within the bound of the
    module docstring (step 4), to be re-checked; the others write indices. ``"bf16"``, ``"tf32"``
    and ``"tf32x3"`` always flag; ``"ieee"`` flags when ``flag=True`` (each mode's last pass).
    ``bound_terms`` is ``code_bound_terms(codebook, dot, code_norms)`` (computed here if None).

    ``candidates=L > 0`` (a flagging pass) also keeps candidate lists (step 6) and returns them:
    int32 [rows, L], one line per row of the launch in the order of ``rows``, holding the codes
    that can be the exact argmin where the row is *listed* (flagged, its candidate set complete
    within L codes; ``[:, 0] >= 0``), -1 everywhere else. ``list_limit`` is `list_norm_limit`
    (computed here if None). Returns None without lists.
    """
    if dot not in DOTS:
        raise UnsupportedOptionError(f"dot precision must be one of {DOTS}, got {dot!r}")
    if candidates < 0:
        raise UnsupportedOptionError(f"candidates must be >= 0, got {candidates}")
    if not (
        x.is_contiguous() and codebook.is_contiguous() and code_norms.is_contiguous() and out.is_contiguous()
    ):
        raise InputShapeError("nearest_code_pass needs contiguous tensors (the kernel uses row stride D)")
    num_rows = x.shape[0] if rows is None else rows.shape[0]
    dim, num_codes = x.shape[1], codebook.shape[0]
    track = dot != "ieee" if flag is None else bool(flag) or dot != "ieee"
    width = candidates if track else 0
    cand = torch.full((num_rows, width), -1, dtype=torch.int32, device=x.device) if width else None
    if num_rows == 0:
        return cand
    cfg = config or select_config(dim, num_codes, dot)
    if track and bound_terms is None:
        bound_terms = code_bound_terms(codebook, dot, code_norms=code_norms)
    if width and list_limit is None:
        list_limit = list_norm_limit(codebook)
    grid = (triton.cdiv(num_rows, cfg.block_m),)
    _kernel_for(x.device)[grid](
        x,
        codebook,
        code_norms,
        rows,
        bound_terms,
        num_rows,
        num_codes,
        dim,
        float(list_limit or 0.0),
        out,
        cand,
        BLOCK_M=cfg.block_m,
        BLOCK_K=cfg.block_k,
        BLOCK_D=cfg.block_d,
        DOT=dot,
        ROUND=dot if dot in _ROUNDING else "",
        TRACK_SECOND=track,
        NORMS_IN_KERNEL=False,
        ROWS_INDEXED=rows is not None,
        LIST=width,
        LIST_WIDTH=_pow2_at_least(width + 1, floor=2),
        BF16_OPERANDS=not _interpreting(),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        enable_fp_fusion=FP_FUSION,
    )
    return cand


def _flagged(out: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Row numbers that a low-precision pass marked for a re-check (out < 0)."""
    if rows is None:
        return torch.nonzero(out < 0).squeeze(1)
    return rows[out[rows] < 0]


def resolve_listed(
    x: torch.Tensor,
    codebook: torch.Tensor,
    out: torch.Tensor,
    cand: torch.Tensor,
    rows: torch.Tensor | None = None,
    block_m: int = 64,
) -> None:
    """Decide a pass's listed rows from their candidates (step 6): writes ``out[row]`` = the exact
    argmin where float64 separates it (`vqdeploy.ops.contract.resolve_candidates`' test, in one
    launch that reads each listed row and its <= L codes, no gathered copy); rows not listed and
    listed rows float64 cannot decide keep their ``-1 - index``. ``cand`` and ``rows`` are those of
    the `nearest_code_pass` launch."""
    num, width = cand.shape
    if num == 0 or width == 0:
        return
    dim = x.shape[1]
    grid = (triton.cdiv(num, block_m),)
    _kernel_for(x.device, _resolve_listed_kernel)[grid](
        x,
        codebook,
        rows,
        cand,
        torch.tensor([float64_separation(dim)], dtype=torch.float64, device=x.device),
        num,
        dim,
        out,
        LIST=width,
        BLOCK_M=block_m,
        BLOCK_D=min(64, _pow2_at_least(dim)),
        ROWS_INDEXED=rows is not None,
        enable_fp_fusion=FP_FUSION,
    )


def mode_chain(mode: str, dim: int) -> tuple[tuple[str, ...], int]:
    """(passes, candidate list length L) of a mode at dimension ``dim`` (module docstring).

    A low-precision pass whose bound does not exist (D too large) is left out: it would flag
    every row.
    """
    if mode not in MODES:
        raise UnsupportedOptionError(f"mode must be one of {MODES}, got {mode!r}")
    chain, width = (FAST_CHAIN, FAST_CANDIDATES) if mode == "fast" else (EXACT_CHAIN, 0)
    chain = tuple(d for d in chain if d == "ieee" or margin_threshold_coefficients(d, dim).is_finite())
    return chain, width


def _run_mode(
    x: torch.Tensor,
    codebook: torch.Tensor,
    code_norms: torch.Tensor,
    out: torch.Tensor,
    mode: str,
    config: KernelConfig | None,
    trace: dict[str, torch.Tensor] | None = None,
) -> None:
    """The chain of ``mode`` over every row; ``trace`` (if given) receives, per pass, the rows
    that entered it, and under ``"candidates"`` / ``"exact"`` the rows decided from lists / by
    the exact re-check (row numbers, on x's device)."""
    chain, width = mode_chain(mode, x.shape[1])
    list_limit = list_norm_limit(codebook) if width else None
    rows: torch.Tensor | None = None  # None: every row
    pending: list[torch.Tensor] = []  # listed rows whose candidates float64 cannot separate
    listed_all: list[torch.Tensor] = []

    def row_numbers(positions: torch.Tensor) -> torch.Tensor:
        return positions if rows is None else rows[positions]

    for dot in chain:
        if trace is not None:
            trace[dot] = torch.arange(x.shape[0], device=x.device) if rows is None else rows
        # The ieee pass flags too: its flagged rows (near ties, duplicates) get the exact re-check.
        cand = nearest_code_pass(
            x, codebook, code_norms, out, dot, rows=rows, config=config, flag=True,
            candidates=width, list_limit=list_limit,
        )
        if cand is not None:
            resolve_listed(x, codebook, out, cand, rows=rows)
        unsolved = (out < 0) if rows is None else (out[rows] < 0)
        if cand is not None:
            listed = cand[:, 0] >= 0
            pending.append(row_numbers(torch.nonzero(unsolved & listed).squeeze(1)))
            if trace is not None:
                listed_all.append(row_numbers(torch.nonzero(listed).squeeze(1)))
            unsolved &= ~listed
        rows = row_numbers(torch.nonzero(unsolved).squeeze(1))
        if rows.numel() == 0:
            break
    rows = torch.cat([rows, *pending])
    if trace is not None:
        trace["candidates"] = torch.cat(listed_all) if listed_all else rows[:0]
        trace["exact"] = rows
    if rows.numel():
        exact = exact_nearest(x[rows].cpu(), codebook.cpu())
        out[rows] = exact.to(out.device)


def nearest_code_into(
    x: torch.Tensor,
    codebook: torch.Tensor,
    out: torch.Tensor,
    mode: str = "exact",
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Like `nearest_code_triton`, writing into ``out`` (int64[M], contiguous); returns ``out``.

    ``config`` overrides the tile sizes of every pass (tests use small tiles).
    """
    if mode not in MODES:
        raise UnsupportedOptionError(f"mode must be one of {MODES}, got {mode!r}")
    _check_inputs(x, codebook)
    if out.dtype != torch.int64 or out.shape != (x.shape[0],) or not out.is_contiguous():
        raise InputShapeError(
            f"out must be a contiguous int64 tensor of shape ({x.shape[0]},), got {out.dtype} {tuple(out.shape)}"
        )
    if x.shape[0] == 0:
        return out
    x = x.detach().contiguous()
    codebook = codebook.detach().contiguous()
    code_norms = squared_norms(codebook.float())  # once per call, float32, no K x D temporary
    _run_mode(x, codebook, code_norms, out, mode, config)
    return out


def nearest_code_triton(x: torch.Tensor, codebook: torch.Tensor, mode: str = "exact") -> torch.Tensor:
    """Index of the nearest code for every row of ``x``: int64[M] on x's device.

    ``x`` [M, D] and ``codebook`` [K, D] may be float32, float16 or bfloat16 (computed in float32).
    ``mode="exact"`` and ``mode="fast"`` return the same tokens (module docstring); ``fast`` starts
    from one bf16 pass with candidate lists and recomputes only the rows whose margin is within
    its error bound and whose candidate set overflows the list.

    >>> import torch
    >>> codes = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    >>> x = torch.tensor([[0.9, 0.8], [0.5, 0.5]])
    >>> nearest_code_triton(x.cuda(), codes.cuda()).tolist()  # doctest: +SKIP
    [1, 0]
    """
    _check_inputs(x, codebook)
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    return nearest_code_into(x, codebook, out, mode=mode)


def launch_on_stream(
    x: torch.Tensor, codebook: torch.Tensor, out: torch.Tensor, stream: int, mode: str = "exact"
) -> None:
    """Run `nearest_code_into` on the raw CUDA stream handle ``stream`` (e.g. TensorRT's)."""
    with torch.cuda.stream(torch.cuda.ExternalStream(stream, device=x.device)):
        nearest_code_into(x, codebook, out, mode=mode)
