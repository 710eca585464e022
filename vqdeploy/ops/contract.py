"""The NearestCode contract: what every implementation of the op computes, and how it is judged
(docs/design.md sections 3 and 4). Kernels import from here; this module imports no kernel.

Contract
--------
``nearest_code(x[M, D], codebook[K, D]) -> int64[M]`` is ``argmin_k ||x - c_k||^2``; ties go to
the lowest k (what ``torch.argmin`` and ONNX ``ArgMin(select_last_index=0)`` do). The truth is the
same argmin computed in float64 (`nearest_code_reference`). Cosine codebooks normalise x and the
codes before the op; the op itself is always squared L2.

Every implementation computes, in float32, the score ``s_k = ||c_k||^2 - 2 x.c_k``: it differs
from ``||x - c_k||^2`` by ``||x||^2``, which is the same for every k, so the argmin is unchanged
and one rounding of a large term is saved. Half-precision inputs are widened to float32 first.

Certified ties (docs/design.md section 4), see `tie_tolerance`
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

import math
import warnings
from dataclasses import dataclass

import torch

from vqdeploy.errors import NonFiniteInputError, UnsupportedOptionError

UNIT_ROUNDOFF = {
    "float32": 2.0**-24,
    "tf32": 2.0**-11,
    "bfloat16": 2.0**-8,
    "float16": 2.0**-11,
}

# Budget for the one block of scores (or dot products) an encode call holds at a time, for the
# blocked path and the compiled CPU kernel alike (docs/design.md section 5: <= 64 MiB). Measured for the
# kernel on 2 cores (benchmarks/RESULTS.md): 16 MiB was the fastest or within noise of it at every
# size of docs/design.md section 5; 4 MiB lost 10-20% where K is large (too few columns per GEMM), 32 MiB
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


def rows_per_block(num_codes: int, block_bytes: int | None = None, parts: int = 1) -> int:
    """Rows of x scored at once so that a float32 block of scores stays within SCORE_BLOCK_BYTES
    (or ``block_bytes``), or within a share of it where ``parts`` blocks live at once."""
    budget = (SCORE_BLOCK_BYTES if block_bytes is None else block_bytes) // max(parts, 1)
    return max(16, min(MAX_BLOCK_ROWS, budget // (4 * max(num_codes, 1))))


def nearest_code_reference(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The argmin computed in float64: the reference the certified-tie rule measures gaps against
    (`certify`). The exact argmin itself is `nearest_code_exact`."""
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
    arithmetic: str = "float32",
    *,
    precision: str | None = None,
) -> torch.Tensor:
    """tau(x; a, b) of equation (2) in the module docstring, in float64, one value per row.

    arithmetic: the float format the scores were computed in (a key of UNIT_ROUNDOFF). Not to be
    confused with the runtime's precision ("exact" / "fast"); `precision=` is its deprecated name.
    """
    u = UNIT_ROUNDOFF[_arithmetic(arithmetic, precision)]
    dim = x.shape[-1]
    gamma = (dim + 3) * u / (1 - (dim + 3) * u)
    x_norm = x.detach().double().norm(dim=-1)
    c_norm = codebook.detach().double().norm(dim=-1)
    return gamma * ((x_norm + c_norm[index_a]) ** 2 + (x_norm + c_norm[index_b]) ** 2)


@dataclass(frozen=True)
class Certificate:
    """What `certify` found for each row: the float64 argmin, the gap to it and its tolerance."""

    reference: torch.Tensor  # int64 (M,): argmin in float64 (the truth of the contract)
    gap: torch.Tensor  # float64 (M,): d(x, c_token) - d(x, c_reference); inf for an index outside [0, K)
    tau: torch.Tensor  # float64 (M,): tie_tolerance(x; reference, token)

    @property
    def certified(self) -> torch.Tensor:
        """Rows whose token is the float64 argmin or a certified float32 tie with it."""
        return self.gap <= self.tau

    @property
    def worst_gap_over_tau(self) -> float:
        """The largest gap / tau over rows whose token is not the reference (0 when none differ)."""
        ratio = self.gap / self.tau.clamp(min=torch.finfo(torch.float64).tiny)
        ratio = ratio[self.gap > 0]
        return float(ratio.max()) if ratio.numel() else 0.0


def _arithmetic(arithmetic: str, precision: str | None) -> str:
    if precision is not None:
        warnings.warn("precision= of certify / tie_tolerance is deprecated; it is called arithmetic= (the float "
                      "format of the scores), as the runtime's precision means exact/fast", DeprecationWarning,
                      stacklevel=3)
        arithmetic = precision
    if arithmetic not in UNIT_ROUNDOFF:
        raise UnsupportedOptionError(f"arithmetic must be one of {', '.join(UNIT_ROUNDOFF)}, got {arithmetic!r}")
    return arithmetic


def certify(
    x: torch.Tensor, codebook: torch.Tensor, tokens: torch.Tensor, arithmetic: str = "float32", *,
    precision: str | None = None,
) -> Certificate:
    """The one certified-tie rule of the project (equation (2) of the module docstring).

    A token is certified when d(x, c_token) - min_k d(x, c_k) <= tau(x; argmin, token), with the
    distances in float64. Every tie check (verify, Polygraphy, tests, benchmarks) calls this.
    Tokens outside [0, K) are never certified.
    """
    rows = x.detach().reshape(-1, codebook.shape[-1])
    tokens = tokens.detach().reshape(-1).to(torch.int64).cpu()
    rows, codebook = rows.cpu(), codebook.detach().cpu()
    reference = nearest_code_reference(rows, codebook)
    in_range = (tokens >= 0) & (tokens < codebook.shape[0])
    safe = torch.where(in_range, tokens, reference)
    gap = squared_distances64(rows, codebook, safe) - squared_distances64(rows, codebook, reference)
    gap = torch.where(in_range, gap, torch.full_like(gap, float("inf")))
    tau = tie_tolerance(rows, codebook, reference, safe, _arithmetic(arithmetic, precision))
    return Certificate(reference=reference, gap=gap, tau=tau)


# -- the exact argmin --------------------------------------------------------------------------------
# vqdeploy's own searches (the CPU kernel, the blocked search, the ONNX re-check body) compute
# t_k = fl(n_k - 2 d_k) with n_k = fl(||c_k||^2) and d_k = fl(x.c_k), or accumulate the products onto
# n_k (torch.addmm / Gemm with beta = 1); neither ever adds ||x||^2. Their error is then bounded by
#
#     |t_k - s_k| <= E_k = 2 gamma_{D+3} ||c_k|| (||c_k|| + ||x||)                               (3)
#
# n_k is off by at most gamma_D ||c_k||^2 and d_k by gamma_D sum_i |x_i c_ki| <= gamma_D ||x|| ||c_k||
# in any summation order; the final subtraction rounds once more (u |n_k - 2 d_k|), or, where the
# products are summed onto n_k, the D + 1 term sum carries gamma_{D+1} (|n_k| + 2 sum_i |x_i c_ki|);
# in both cases the ||c_k||^2 coefficient is at most 2 gamma_{D+3} and the ||x|| ||c_k|| one at most
# 2 gamma_{D+3}. Unlike (1) it has no ||x||^2 term: with codes much shorter than the rows (a fresh
# codebook, rows of unit variance) (1) flagged 26% of the rows at (65536, 256, 1024) and 99% at
# (16384, 512, 8192), (3) flags 0.15% and 0.6% (benchmarks/RESULTS.md).
# Underflow adds an absolute error the relative bound misses: at most 2^-150 per product with
# gradual underflow, and with flush-to-zero / denormals-are-zero (torch.set_flush_denormal, or a
# library that sets FTZ/DAZ) at most 2^-126 per flushed result and 2^-126 |other factor| per flushed
# input. Over the 2D products, D + 1 additions and the factor 2 this stays below
#
#     A_k = 2^-124 (D + 1 + sqrt(D) (||x|| + ||c_k||)),                                         (3a)
#
# which `score_error_bound` adds to (3); negligible unless the rows or codes are tiny, where it sends
# the rows to the exact re-check. Overflow: where (||x|| + ||c_max||)^2 >= 2^126 a partial sum may
# overflow float32 (an infinite score proves nothing), so such rows are always re-checked.
#
# A search that keeps its best score t_b and second-best score t_2 per row returns the exact argmin b
# whenever t_2 - t_b > E_b + E_max, E_max being (3) with the largest code norm (E_k grows with
# ||c_k||): then for every k != b, s_k - s_b >= (t_k - E_k) - (t_b + E_b) >= t_2 - t_b - E_max - E_b > 0.
# Rows that fail the test (near ties, duplicates, exact midpoints) are re-solved by `exact_nearest`.
# RECHECK_SAFETY covers computing the threshold in floating point and a margin t_2 - t_b rounded to
# float32 (at most a relative 2^-24 above the exact difference of the two float32 scores).
RECHECK_SAFETY = 1.0 + 2.0**-20


# Absolute error scale of a float32 operation whose result or input underflows (see (3a)).
UNDERFLOW_UNIT = 2.0**-124
# Beyond this (||x|| + ||c||)^2 a float32 score may overflow: the margin proves nothing.
OVERFLOW_SCALE = 2.0**126


def norm_bound_terms(dim: int) -> tuple[float, float]:
    """(under, grow): sqrt(fl(sum r_i^2) + under) * grow bounds ||r|| from above for a float32 sum
    of squares in any order. The float32 sum is at most gamma_D below the exact one, underflow
    (gradual or flushed to zero) loses at most D 2^-125 more, and the square root rounds once."""
    return dim * UNDERFLOW_UNIT, 1.0 + (dim + 4) * 2.0**-23


def norm_bound_from_float32(norms: torch.Tensor, dim: int) -> torch.Tensor:
    """float64 upper bounds of ||r|| from float32 norms sqrt(fl(sum r_i^2)) (`norm_bound_terms`)."""
    under, grow = norm_bound_terms(dim)
    norms = norms.double()
    return torch.sqrt(norms * norms + under) * grow


def norm_upper_bound(rows: torch.Tensor) -> torch.Tensor:
    """float64 upper bounds of ||r|| for float32 rows, from one cheap float32 norm per row."""
    dim = rows.shape[-1] if rows.ndim else 1
    return norm_bound_from_float32(torch.linalg.vector_norm(rows.detach().to(torch.float32), dim=-1), dim)


def score_error_coefficients(dim: int, code_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, beta) with E_k + A_k of bounds (3) and (3a) = ||x|| alpha_k + beta_k, in float64:
    alpha = 2 gamma_{D+3} ||c|| + 2^-124 sqrt(D), beta = 2 gamma_{D+3} ||c||^2 + 2^-124 (D + 1 + sqrt(D) ||c||)."""
    u = UNIT_ROUNDOFF["float32"]
    gamma = (dim + 3) * u / (1 - (dim + 3) * u)
    code_norm = code_norm.double()
    alpha = 2.0 * gamma * code_norm + UNDERFLOW_UNIT * math.sqrt(dim)
    beta = 2.0 * gamma * code_norm * code_norm + UNDERFLOW_UNIT * (dim + 1 + math.sqrt(dim) * code_norm)
    return alpha, beta


def score_error_bound(dim: int, x_norm: torch.Tensor, code_norm: torch.Tensor) -> torch.Tensor:
    """E_k + A_k of bounds (3) and (3a) above, in float64: how far vqdeploy's float32 score of a
    code with norm ``code_norm`` may be from the exact s_k for a row of norm ``x_norm`` (broadcast)."""
    alpha, beta = score_error_coefficients(dim, torch.as_tensor(code_norm))
    return x_norm * alpha + beta


def recheck_coefficients(dim: int, code_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The re-check test's per-code terms: a row with best code b and norm bound ||x|| is proven
    where t_2 - t_b > ||x|| alpha_b + beta_b (E_b + E_max of bound (3) and (3a), RECHECK_SAFETY
    included) and ||x|| < limit (beyond it a float32 score may overflow). float64, CPU."""
    code_norm = code_norm.double().cpu()
    longest = code_norm.max()
    alpha, beta = score_error_coefficients(dim, code_norm)
    alpha_max, beta_max = score_error_coefficients(dim, longest)
    alpha = (alpha + alpha_max).mul_(RECHECK_SAFETY)
    beta = (beta + beta_max).mul_(RECHECK_SAFETY)
    return alpha, beta, math.sqrt(OVERFLOW_SCALE) - float(longest)


def recheck_rows(
    dim: int, best: torch.Tensor, margin: torch.Tensor, x_norm: torch.Tensor, code_norm: torch.Tensor
) -> torch.Tensor:
    """Rows whose float32 margin t_2 - t_b does not prove ``best`` to be the exact argmin.

    ``x_norm`` (M,) and ``code_norm`` (K,) are upper bounds of the norms (`norm_upper_bound`).
    Returns row numbers (int64, CPU); NaN margins are always re-checked. Two gathers and a
    multiply-add per row (`recheck_coefficients`); the compiled CPU kernel runs the same test
    (`vqdeploy.ops._running_argmin.flag_unproven_rows`).
    """
    if best.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    alpha, beta, limit = recheck_coefficients(dim, code_norm)
    best = best.cpu()
    threshold = torch.addcmul(beta[best], x_norm.double().cpu(), alpha[best])
    proven = margin.detach().cpu().double() > threshold  # NaN: not proven
    proven &= x_norm.cpu() < limit
    return torch.nonzero(~proven).squeeze(1)


def _exact_differences(x: torch.Tensor, codes: torch.Tensor, ref: torch.Tensor) -> list[float]:
    """||x - c_j||^2 - ||x - ref||^2 for every row c_j of `codes`, each correctly rounded (so its
    sign, and whether it is 0, are exact).

    x, codes and ref hold float32 values in float64. Every term of
    sum_i (c_i^2 - 2 x_i c_i) - sum_i (r_i^2 - 2 x_i r_i) is exact in float64 (a product of two
    24-bit significands has 48 bits; no float32 square overflows or underflows float64), and
    math.fsum returns the correctly rounded sum of its terms.
    """
    against = torch.cat([-(ref * ref), 2.0 * x * ref]).tolist()
    terms = torch.cat([codes * codes, -2.0 * x * codes], 1).tolist()
    return [math.fsum(row + against) for row in terms]


def _exact_nearest_among(x: torch.Tensor, codes: torch.Tensor, candidates: list[int]) -> int:
    """The exact argmin of ||x - c_k||^2 over `candidates` (ascending; ties to the lowest k).

    x and codes are float64 tensors holding float32 values. Every candidate is compared with the
    lowest-index one in one pass of exact differences; those strictly better and tied with each
    other in their rounded difference are compared again among themselves (rare). Identical codes
    count once (their lowest index). O(len(candidates) D) in C loops whatever the ties, so a
    codebook of identical or equidistant codes does not make a row cost a Python loop over K D.
    """
    index = torch.tensor(candidates)
    pool = codes[index]
    if len(candidates) > 8:  # many candidates: identical codes (dead or never-trained ones) are one
        pool, inverse = torch.unique(pool, dim=0, return_inverse=True)
        lowest = torch.full((pool.shape[0],), torch.iinfo(torch.int64).max, dtype=torch.int64)
        index = lowest.scatter_reduce_(0, inverse, index, reduce="amin")
        order = torch.argsort(index)
        pool, index = pool[order], index[order]
    while pool.shape[0] > 1:
        diffs = _exact_differences(x, pool[1:], pool[0])
        least = min(diffs)
        if least >= 0:  # nothing is closer than the lowest-index candidate: it wins its ties
            break
        better = torch.tensor([d == least for d in diffs])
        pool, index = pool[1:][better], index[1:][better]
    return int(index[0])


def _candidate_codes(
    rows32: torch.Tensor, codes32: torch.Tensor, code_sq32: torch.Tensor, code_norm: torch.Tensor
) -> torch.Tensor:
    """Codes that can be the exact argmin of at least one of ``rows32`` (int64, ascending).

    The float32 score t_k of every code is within E_k of s_k (bounds (3), (3a)), so the exact
    argmin k* has t_k* <= s_k* + E_k* <= s_b + E_k* <= t_b + E_b + E_max, b the float32 argmin.
    Rows whose scores are not finite (overflow, NaN) keep every code. ``code_sq32`` are the codes'
    float32 squared norms (`squared_norms`), ``code_norm`` their `norm_upper_bound`.
    """
    dim = codes32.shape[1]
    scores = torch.addmm(code_sq32, rows32, codes32.t(), beta=1.0, alpha=-2.0).double()
    x_norm = norm_upper_bound(rows32)
    best_score, best = scores.min(dim=1)
    reach = best_score + score_error_bound(dim, x_norm, code_norm[best])
    reach = reach + score_error_bound(dim, x_norm, code_norm.max())  # E_k <= E_max: one bound per row
    keep = scores <= (reach * RECHECK_SAFETY + reach.abs() * 2.0**-50)[:, None]
    unproven = ~torch.isfinite(scores).all(dim=1) | ((x_norm + code_norm.max()) ** 2 >= OVERFLOW_SCALE)
    keep[unproven] = True
    return torch.nonzero(keep.any(dim=0)).squeeze(1)


def exact_nearest(
    x: torch.Tensor, codebook: torch.Tensor, code_terms: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """The exact argmin of ||x - c_k||^2 over the float32 values (ties to the lowest k), per row.

    A float32 pass narrows the codes to those that can win (`_candidate_codes`); then distances in
    float64, and codes whose float64 distance lies within float64 rounding of the best are compared
    again exactly (`_exact_nearest_among`: exact float64 terms, math.fsum). For the few rows a
    float32 search cannot prove (`recheck_rows`): cost O(rows K D) in float32, far less in float64.
    ``code_terms``: the codebook's float32 `squared_norms` and `norm_upper_bound`, where the caller
    has them (the CPU op computes them once per call).

    Rows with a NaN or an infinity in float32 (a float64 1e300 included) have no nearest code: they
    raise `NonFiniteInputError`. Every search flags such rows (their norm bound or margin is not
    finite, so the test cannot prove them) and sends them here, so a search that re-solves its
    flagged rows detects them at no cost to the others (the runtime's torch backend on CPU relies on
    it: `vqdeploy.runtime.torch_backend.TorchRunner.search_detects_non_finite`).
    """
    rows32 = x.detach().to(torch.float32).cpu()
    finite = torch.isfinite(rows32)
    if not bool(finite.all()):
        raise NonFiniteInputError(
            f"the rows of the nearest-code search must be finite, got {int((~finite).sum())} NaN/Inf value(s) "
            f"in float32 (the dtype it searches in; largest {torch.finfo(torch.float32).max:.6g}) in "
            f"{int((~finite.all(dim=-1)).sum())} row(s)"
        )
    codes32 = codebook.detach().to(torch.float32).cpu().contiguous()
    out = torch.empty(rows32.shape[0], dtype=torch.int64)
    if rows32.shape[0] == 0:
        return out
    dim = codes32.shape[1]
    gamma64 = (dim + 3) * 2.0**-53 / (1 - (dim + 3) * 2.0**-53)  # bound (1) in float64
    code_sq32, code_norm32 = code_terms if code_terms is not None else (squared_norms(codes32), norm_upper_bound(codes32))
    # A handful of (rows, K) temporaries live at once: keep each near 2 MiB.
    step = max(1, 2**21 // (8 * max(codes32.shape[0], 1)))
    for start in range(0, rows32.shape[0], step):
        block32 = rows32[start : start + step]
        columns = _candidate_codes(block32, codes32, code_sq32, code_norm32)
        codes = codes32[columns].double()
        block = block32.double()
        code_norm, code_sq = codes.norm(dim=1), (codes * codes).sum(1)
        dist = (block * block).sum(1)[:, None] + code_sq[None] - 2.0 * block @ codes.T  # (r, K') float64
        bound = gamma64 * (block.norm(dim=1)[:, None] + code_norm[None]) ** 2
        best = dist.argmin(dim=1)
        reach = dist.gather(1, best[:, None]) + bound.gather(1, best[:, None]) + bound
        within = dist <= reach
        out[start : start + block.shape[0]] = columns[best]
        for r in torch.nonzero(within.sum(1) > 1).squeeze(1).tolist():  # float64 cannot separate them
            candidates = torch.nonzero(within[r]).squeeze(1).tolist()
            out[start + r] = columns[_exact_nearest_among(block[r], codes, candidates)]
    return out


# Candidate lists (docs/design.md section 10) need no overflow anywhere in a pass: |x~.c~| and its
# partial sums stay below (1 + 2^-8)^2 ||x|| max_k ||c_k|| <= 2^121 when the host-checkable
# ||x|| max ||c_k|| <= 2^120.
CANDIDATE_NORM_LIMIT = 2.0**120
U_FP64 = 2.0**-53


def float64_separation(dim: int) -> float:
    """F with: fl64(d_j) * F < fl64(d_k) (F's product rounded) proves d_j < d_k (exact values).

    Each float64 distance of float32 rows, sum of D squared float64 differences, errs by at most
    gamma_{D+2}(2^-53) of itself (all terms are >= 0), so d_j <= fl(d_j) / (1 - g) and
    d_k >= fl(d_k) / (1 + g); F = (1 + g) / (1 - g), widened to cover its own and the product's
    rounding.
    """
    nu = (dim + 2) * U_FP64
    g = nu / (1.0 - nu)
    return (1.0 + g) / (1.0 - g) * (1.0 + 2.0**-50)


def resolve_candidates(
    x: torch.Tensor, codebook: torch.Tensor, candidates: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decide rows from complete candidate lists: (tokens, decided), both [rows].

    ``candidates`` [rows, L] holds, per row, every code that can be the exact argmin (-1 pads).
    The float64 distances of those codes decide the row when the smallest is below every other
    by more than float64 rounding (`float64_separation`); the token is then the exact argmin
    (the codes outside the list are strictly farther). Undecided rows (exact or float64 ties)
    need the exact re-check. Cost O(rows L D). The Triton kernel's `resolve_listed` applies the
    same test to the rows it lists, reading them in place.
    """
    x = x.detach().float()
    codebook = codebook.detach().float().to(x.device)
    candidates = candidates.to(device=x.device, dtype=torch.int64)
    rows, width = candidates.shape
    tokens = torch.full((rows,), -1, dtype=torch.int64, device=x.device)
    decided = torch.zeros(rows, dtype=torch.bool, device=x.device)
    if rows == 0 or width == 0:
        return tokens, decided
    factor = float64_separation(codebook.shape[1])
    step = max(1, 2**22 // max(width * codebook.shape[1], 1))  # float64 temporaries near 32 MiB
    for start in range(0, rows, step):
        idx = candidates[start : start + step]
        diff = x[start : start + step].double()[:, None, :] - codebook[idx.clamp(min=0)].double()
        dist = torch.where(idx >= 0, (diff * diff).sum(-1), torch.inf)
        best, pos = dist.min(dim=1)
        others = dist.clone()
        others[torch.arange(idx.shape[0], device=x.device), pos] = torch.inf
        decided[start : start + step] = (best * factor < others.min(dim=1).values) & torch.isfinite(best)
        tokens[start : start + step] = idx[torch.arange(idx.shape[0], device=x.device), pos]
    tokens[~decided] = -1
    return tokens, decided


def exact_nearest_listed(x: torch.Tensor, codebook: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The exact argmin (ties to the lowest k) of rows whose complete candidate lists are known.

    ``candidates`` [rows, L] holds, per row and ascending, every code that can be its exact argmin
    (-1 pads), as the CPU op's compiled search lists them for the rows it flags. The float64
    distances of those codes decide most rows (`resolve_candidates`); the rest, whose listed codes
    float64 cannot separate (duplicates, exact midpoints), are compared exactly among their codes
    (`_exact_nearest_among`). Cost O(rows L D), against O(rows K D) for `exact_nearest`. The rows
    must be finite (the lists' proof assumes finite float32 scores).
    """
    x = x.detach().float().cpu()
    codebook = codebook.detach().float().cpu()
    candidates = candidates.cpu()
    tokens, decided = resolve_candidates(x, codebook, candidates)
    for r in torch.nonzero(~decided).squeeze(1).tolist():
        listed = candidates[r][candidates[r] >= 0]
        position = _exact_nearest_among(x[r].double(), codebook[listed].double(), list(range(listed.numel())))
        tokens[r] = listed[position]
    return tokens


def resolve_near_ties_(
    x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, margin: torch.Tensor,
    x_norm: torch.Tensor | None = None, code_norm: torch.Tensor | None = None,
) -> int:
    """Make a float32 search's ``indices`` exact in place, given its margins t_2 - t_b; returns
    how many rows were re-solved. Norm bounds are computed when not given."""
    if x_norm is None:
        x_norm = norm_upper_bound(x)
    if code_norm is None:
        code_norm = norm_upper_bound(codebook)
    rows = recheck_rows(x.shape[-1], indices, margin, x_norm, code_norm)
    if rows.numel():
        exact = exact_nearest(x.detach()[rows.to(x.device)], codebook)
        indices[rows.to(indices.device)] = exact.to(indices.device)
    return int(rows.numel())


def nearest_code_exact(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The truth of the contract, exactly: a float32 search with margins, near ties re-solved."""
    indices, margin, x_norm = nearest_code_blocked_with_margin(x, codebook)
    resolve_near_ties_(x, codebook, indices, margin, x_norm=x_norm)
    return indices


def nearest_code_blocked(
    x: torch.Tensor, codebook: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Blocked implementation: one reused block of scores, never the M x K matrix.

    Works on any device: the float64 search behind `nearest_code_reference`. (The op's CPU path
    without the compiled kernel is `nearest_code_blocked_with_margin` plus the exact re-check.)
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


def nearest_code_blocked_with_margin(
    x: torch.Tensor, codebook: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 blocked search: (indices, margins t_2 - t_b (inf for K = 1), norm bounds of x)."""
    num_rows, num_codes = x.shape[0], codebook.shape[0]
    out = torch.empty(num_rows, dtype=torch.int64, device=x.device)
    margin = torch.full((num_rows,), float("inf"), dtype=torch.float32, device=x.device)
    x_norm = torch.empty(num_rows, dtype=torch.float64, device=x.device)
    if num_rows == 0:
        return out, margin, x_norm
    codes = codebook.detach().to(torch.float32).contiguous()
    code_norms = squared_norms(codes)
    step = min(rows_per_block(num_codes), num_rows)
    scores = torch.empty(step, num_codes, dtype=torch.float32, device=x.device)
    for start in range(0, num_rows, step):
        stop = min(start + step, num_rows)
        block, xb = scores[: stop - start], x[start:stop].detach().to(torch.float32)
        torch.addmm(code_norms, xb, codes.t(), beta=1.0, alpha=-2.0, out=block)
        x_norm[start:stop] = norm_upper_bound(xb)
        out[start:stop] = block.argmin(dim=1)  # the first minimum: ties to the lowest index
        if num_codes > 1:
            values = torch.topk(block, 2, dim=1, largest=False, sorted=True).values
            margin[start:stop] = values[:, 1] - values[:, 0]
    return out, margin, x_norm
