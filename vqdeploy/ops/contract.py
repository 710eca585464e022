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

from vqdeploy.errors import UnsupportedOptionError

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
# A float32 search that keeps its best score t_b and second-best score t_2 per row returns the exact
# argmin b whenever t_2 - t_b > E_b + E_max, with E_k = gamma_{D+3} (||x|| + ||c_k||)^2 the bound (1)
# and E_max the same with the largest code norm: then for every k != b,
# s_k - s_b >= (t_k - E_k) - (t_b + E_b) >= t_2 - t_b - E_max - E_b > 0. Rows that fail the test
# (0.02-0.3% of random rows, duplicates, exact midpoints) are re-solved by `exact_nearest`.
# Covers computing the threshold in floating point and a margin t_2 - t_b rounded to float32 (at most
# a relative 2^-24 above the exact difference of the two float32 scores).
RECHECK_SAFETY = 1.0 + 2.0**-20


def norm_upper_bound(rows: torch.Tensor) -> torch.Tensor:
    """float64 upper bounds of ||r|| for float32 rows, from one cheap float32 norm per row."""
    dim = rows.shape[-1] if rows.ndim else 1
    norms = torch.linalg.vector_norm(rows.detach().to(torch.float32), dim=-1).double()
    return norms * (1.0 + (dim + 4) * 2.0**-23)


def recheck_rows(
    dim: int, best: torch.Tensor, margin: torch.Tensor, x_norm: torch.Tensor, code_norm: torch.Tensor
) -> torch.Tensor:
    """Rows whose float32 margin t_2 - t_b does not prove ``best`` to be the exact argmin.

    ``x_norm`` (M,) and ``code_norm`` (K,) are upper bounds of the norms (`norm_upper_bound`).
    Returns row numbers (int64, CPU); NaN margins are always re-checked.
    """
    if best.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    u = UNIT_ROUNDOFF["float32"]
    gamma = (dim + 3) * u / (1 - (dim + 3) * u)
    x_norm, code_norm = x_norm.double().cpu(), code_norm.double().cpu()
    threshold = gamma * ((x_norm + code_norm[best.cpu()]) ** 2 + (x_norm + code_norm.max()) ** 2)
    return torch.nonzero(~(margin.detach().double().cpu() > threshold * RECHECK_SAFETY)).squeeze(1)


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


def exact_nearest(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The exact argmin of ||x - c_k||^2 over the float32 values (ties to the lowest k), per row.

    Distances in float64 first; codes whose float64 distance lies within float64 rounding of the
    best are compared again exactly (`_exact_nearest_among`: exact float64 terms, math.fsum). For
    the few rows a float32 search cannot prove (`recheck_rows`): cost O(rows K D).
    """
    rows = x.detach().to(torch.float32).double().cpu()
    codes = codebook.detach().to(torch.float32).double().cpu()
    out = torch.empty(rows.shape[0], dtype=torch.int64)
    if rows.shape[0] == 0:
        return out
    dim = codes.shape[1]
    gamma64 = (dim + 3) * 2.0**-53 / (1 - (dim + 3) * 2.0**-53)  # bound (1) in float64
    code_norm, code_sq = codes.norm(dim=1), (codes * codes).sum(1)
    # A handful of (rows, K) float64 temporaries live at once: keep each near 2 MiB.
    step = max(1, 2**21 // (8 * max(codes.shape[0], 1)))
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step]
        dist = (block * block).sum(1)[:, None] + code_sq[None] - 2.0 * block @ codes.T  # (r, K) float64
        bound = gamma64 * (block.norm(dim=1)[:, None] + code_norm[None]) ** 2
        best = dist.argmin(dim=1)
        reach = dist.gather(1, best[:, None]) + bound.gather(1, best[:, None]) + bound
        within = dist <= reach
        out[start : start + block.shape[0]] = best
        for r in torch.nonzero(within.sum(1) > 1).squeeze(1).tolist():  # float64 cannot separate them
            candidates = torch.nonzero(within[r]).squeeze(1).tolist()
            out[start + r] = _exact_nearest_among(block[r], codes, candidates)
    return out


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
