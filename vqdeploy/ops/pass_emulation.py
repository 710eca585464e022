"""CPU emulation, in torch, of the Triton kernel's passes and of their re-check flags.

`vqdeploy.ops.triton_kernels` runs ``fast`` as a chain of passes (``bf16``, ``tf32``, ``tf32x3``,
``ieee``, each with candidate lists of 3 codes) and ``exact`` as ``tf32x3``, ``ieee``; each
low-precision pass flags the rows whose best-vs-second margin lies inside its rigorous error
bound (that module's docstring, steps 1 to 4) and only those rows go on to the next pass, less
the rows its candidate lists decide (step 6). How
many rows leave each pass decides what ``fast`` costs, and the Triton interpreter cannot tell:
its ``tl.dot`` is numpy's float32 matmul whatever precision is asked for. This module computes
what the GPU computes, on CPU:

* ``tf32``: both operands rounded to TF32 with the kernel's bit trick (round to nearest, ties
  away, 10 mantissa bits), products of TF32 values (exact in float32), float32 accumulation
  (torch's CPU matmul; its summation order is not the tensor core's, which the bound covers);
* ``tf32x3``: Triton's split, hi = tf32(a) and lo = a - hi, and lo.hi + hi.lo + hi.hi
  accumulated in float32 (the tensor core reads lo as TF32, possibly truncating; emulated by
  rounding it, a difference of ~2^-22 of lo that the bound, which assumes truncation, covers);
* ``ieee``: a float32 matmul;

then the score t_k = fl(||c_k||^2 - 2 fl(x.c_k)) with the same float32 code norms the kernel
loads, and the flag of the kernel, in float32, in the kernel's order of operations:
``e = (||x|| g_k + ||r(x)|| h_k) + q_k`` with the per-code terms of `code_bound_terms`, and a row
keeps its best b when ``min_{k != b} (t_k - e_k) > t_b + e_b``. The tile-by-tile tracking of the
kernel yields the same minimum as the global one computed here (every term is the same float32
value whichever tile holds it), so on the same float32 products the flags are identical; the
interpreted kernel is checked against this in ``tests/ops/test_triton_kernels.py``
(``test_interpreted_flags_equal_emulation``, on data whose dots are exact in any order).

``bf16`` (the fast mode's first pass; docs/design.md section 10): both operands rounded to bf16
with the same bit trick (8-bit significands, round to nearest, ties away), products exact in
float32, float32 accumulation; its bound is the ``tf32`` one with 2^-8 rounding and bf16
residual norms.

Candidate lists (``candidates=L``): a flagged row's possible exact argmins are the codes with
t_k - e_k <= t_b + e_b (every other code has s_k >= t_k - e_k > t_b + e_b >= s_b). A pass that
keeps the L smallest t_k - e_k of a row, with their codes, and the (L+1)-th value, knows that set
completely when that value exceeds t_b + e_b; `resolve_candidates` then decides the row from the
float64 distances of at most L codes, and only rows whose candidate set is larger go on to the
next pass (``PassResult.listed``). The kernel keeps the same L + 1 values tile by tile; its lists
are checked against these in ``tests/ops/test_triton_kernels.py``
(``test_interpreted_lists_equal_emulation``, ``test_fast_chain_equals_emulated_chain``).

``bound="legacy"`` evaluates the kernel's former test, ``second - best <= A ||x|| C + B C^2``
(C the largest code norm), and ``bound="per-code"`` the new test without residual norms
(Cauchy-Schwarz on ||x|| ||c_k||), for comparison in ``benchmarks/bench_pass_bounds.py``.

The emulation does not reproduce the GPU's bits (summation order, FMA contraction): it checks the
bound's arithmetic model, which covers any order, on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vqdeploy.errors import UnsupportedOptionError
from vqdeploy.ops.contract import CANDIDATE_NORM_LIMIT, exact_nearest, resolve_candidates, squared_norms
from vqdeploy.ops.triton_kernels import (
    BOUND_DOTS,
    U_ACC_TC,
    U_FP32,
    V_BF16,
    V_TF32,
    _gamma,
    code_bound_terms,
    round_bf16,
    round_tf32,
)

__all__ = [
    "BOUNDS",
    "ChainResult",
    "PassResult",
    "emulate_chain",
    "emulate_pass",
    "legacy_threshold_coefficients",
    "resolve_candidates",
]

BOUNDS = ("residual", "per-code", "legacy")
CHUNK_SCORES = 2**22  # float32 scores per block of rows (16 MiB)


@dataclass
class PassResult:
    """One pass over some rows: the best code of each row and whether the pass flagged it."""

    tokens: torch.Tensor  # int64 [rows]
    flagged: torch.Tensor  # bool [rows]
    # With candidates=L: per row the codes that may be the exact argmin (-1 pads), complete where
    # ``listed`` (a flagged row whose candidate set has at most L codes).
    candidates: torch.Tensor | None = None  # int64 [rows, L]
    listed: torch.Tensor | None = None  # bool [rows]


@dataclass
class ChainResult:
    """A chain of passes: final tokens and, per pass, how many rows entered it.

    ``entered`` also counts ``"candidates"`` (rows decided from their candidate lists, all passes
    together) and ``"exact"`` (rows re-solved by the exact re-check on the host).
    """

    tokens: torch.Tensor
    entered: dict[str, int] = field(default_factory=dict)
    rows: int = 0

    def fraction_entering(self, dot: str) -> float:
        """Share of all rows that a pass of the chain recomputed (1.0 for the first pass)."""
        return self.entered.get(dot, 0) / max(self.rows, 1)


def legacy_threshold_coefficients(dot: str, dim: int) -> tuple[float, float]:
    """(A, B) of the former test: a row was flagged when margin <= A ||x|| C + B C^2."""
    u = U_FP32

    def delta(d: str) -> float:
        if d == "ieee":
            return _gamma(dim, u)
        if d in ("tf32", "bf16"):
            v = V_BF16 if d == "bf16" else V_TF32
            return (1.0 + v) ** 2 * (1.0 + _gamma(dim, U_ACC_TC)) - 1.0
        v = V_TF32
        return 12 * v**2 + 16 * v**3 + _gamma(3 * dim, U_ACC_TC) * ((1 + 2 * v) ** 2 + 4 * v * (1 + 2 * v))

    beta = (1.0 + _gamma(dim, u)) * (1.0 + u) - 1.0
    delta_pass = (1.0 + delta(dot)) * (1.0 + u) - 1.0
    delta_ref = (1.0 + delta("ieee")) * (1.0 + u) - 1.0 if dot != "ieee" else 0.0
    safety = 1.0 + 2.0 * _gamma(dim + 8, u) + 2.0**-20
    a = 4.0 * (delta_pass + delta_ref) * safety
    b = 4.0 * beta * safety
    return a * (1.0 + 2.0**-20), b * (1.0 + 2.0**-20)


def _dot(x: torch.Tensor, codebook: torch.Tensor, dot: str, interpreted: bool) -> torch.Tensor:
    """x @ codebook.T in float32 as the pass computes it (``interpreted``: as the Triton interpreter)."""
    if dot == "tf32":  # the kernel rounds its operands itself, interpreted or not
        return round_tf32(x) @ round_tf32(codebook).T
    if dot == "bf16":  # products of 8-bit significands: exact in float32
        return round_bf16(x) @ round_bf16(codebook).T
    if dot == "ieee" or (dot == "tf32x3" and interpreted):
        return x @ codebook.T
    if dot == "tf32x3":
        x_hi, c_hi = round_tf32(x), round_tf32(codebook)
        x_lo, c_lo = round_tf32(x - x_hi), round_tf32(codebook - c_hi)
        acc = x_lo @ c_hi.T
        acc += x_hi @ c_lo.T
        acc += x_hi @ c_hi.T
        return acc
    raise UnsupportedOptionError(f"dot precision must be one of {BOUND_DOTS}, got {dot!r}")


def emulate_pass(
    x: torch.Tensor,
    codebook: torch.Tensor,
    dot: str,
    bound: str = "residual",
    code_norms: torch.Tensor | None = None,
    track: bool | None = None,
    interpreted: bool = False,
    candidates: int = 0,
    slack_scale: float = 1.0,
) -> PassResult:
    """One pass of the kernel over every row of ``x``: tokens and re-check flags.

    ``track`` (default: every pass but ``ieee``) computes the flags; on ``ieee`` they mark the
    rows whose margin is within that pass's own bound, the rows an exact re-check has to see.
    ``interpreted=True`` computes the dots as the Triton interpreter does (plain float32 for
    ``tf32x3``), to compare with the interpreted kernel. ``candidates=L > 0`` also returns, per
    flagged row, its candidate list (module docstring) and whether it is complete. ``slack_scale``
    multiplies every e_k: 1 is the proven bound; other values exist to test that the tests catch
    a bound that is too tight.
    """
    if bound not in BOUNDS:
        raise UnsupportedOptionError(f"bound must be one of {BOUNDS}, got {bound!r}")
    if dot not in BOUND_DOTS:
        raise UnsupportedOptionError(f"dot precision must be one of {BOUND_DOTS}, got {dot!r}")
    if candidates < 0 or (candidates and bound == "legacy"):
        raise UnsupportedOptionError(
            f"candidates must be >= 0 and needs a per-code bound, got {candidates} with bound {bound!r}"
        )
    x = x.detach().float().contiguous()
    codebook = codebook.detach().float().contiguous()
    norms = squared_norms(codebook) if code_norms is None else code_norms.float()
    dim, num_codes = codebook.shape[1], codebook.shape[0]
    tokens = torch.empty(x.shape[0], dtype=torch.int64)
    flagged = torch.zeros(x.shape[0], dtype=torch.bool)
    width = min(candidates, num_codes)
    cand = torch.full((x.shape[0], width), -1, dtype=torch.int64) if candidates else None
    listed = torch.zeros(x.shape[0], dtype=torch.bool) if candidates else None
    track = dot != "ieee" if track is None else track
    if track and bound != "legacy":
        g, h, q = code_bound_terms(codebook, dot, code_norms=norms, residual=bound == "residual")
        if slack_scale != 1.0:
            g, h, q = (t * slack_scale for t in (g, h, q))
        use_residual = dot in ("tf32", "bf16") and bound == "residual"
        rounding = round_bf16 if dot == "bf16" else round_tf32
        c_max = float(torch.linalg.vector_norm(codebook, dim=1, dtype=torch.float64).max())
    if track and bound == "legacy":
        thr_a, thr_b = (torch.tensor(c, dtype=torch.float32) for c in legacy_threshold_coefficients(dot, dim))
        c_max_sq = norms.max()
    step = max(1, CHUNK_SCORES // num_codes)
    for start in range(0, x.shape[0], step):
        xb = x[start : start + step]
        scores = norms[None, :] - 2.0 * _dot(xb, codebook, dot, interpreted)
        best, best_idx = torch.min(scores, dim=1)  # first index of the minimum: the kernel's rule
        tokens[start : start + step] = best_idx
        if not track:
            continue
        is_best = torch.zeros_like(scores, dtype=torch.bool)
        is_best[torch.arange(xb.shape[0]), best_idx] = True
        x_norm = torch.sqrt(torch.sum(xb * xb, dim=1))
        if bound == "legacy":
            second = torch.where(is_best, torch.inf, scores).min(dim=1).values
            threshold = thr_a * x_norm * torch.sqrt(c_max_sq) + thr_b * c_max_sq
            flagged[start : start + step] = (second - best) <= threshold
            continue
        err = x_norm[:, None] * g[None, :]
        if use_residual:
            r = xb - rounding(xb)
            r_norm = torch.sqrt(torch.sum(r * r, dim=1))
            err = err + r_norm[:, None] * h[None, :]
        err = err + q[None, :]
        best_err = err[torch.arange(xb.shape[0]), best_idx]
        lo = scores - err
        other_lo = torch.where(is_best, torch.inf, lo).min(dim=1).values
        hi = best + best_err
        row_flagged = ~(other_lo > hi)
        flagged[start : start + step] = row_flagged
        if candidates:
            # The kernel would keep the L smallest lo of the row and the (L+1)-th value.
            top = torch.topk(lo, min(width + 1, num_codes), dim=1, largest=False, sorted=True)
            complete = top.values[:, width] > hi if num_codes > width else torch.ones_like(row_flagged)
            # Rigour needs finite scores and bounds: no overflow (host-checkable norm limit), no NaN.
            sane = torch.isfinite(hi) & ~torch.isnan(lo).any(dim=1)
            sane &= x_norm.double() * c_max <= CANDIDATE_NORM_LIMIT
            near = top.values[:, :width] <= hi[:, None]
            cand[start : start + step] = torch.where(near, top.indices[:, :width], -1)
            listed[start : start + step] = row_flagged & complete & sane
    return PassResult(tokens=tokens, flagged=flagged, candidates=cand, listed=listed)


def emulate_chain(
    x: torch.Tensor,
    codebook: torch.Tensor,
    chain: tuple[str, ...] = ("tf32", "tf32x3", "ieee"),
    bound: str = "residual",
    final: str = "exact",
    candidates: int = 0,
    slack_scale: float = 1.0,
    interpreted: bool = False,
) -> ChainResult:
    """Run ``chain`` as `_run_mode` does: each pass recomputes only the rows the last one flagged.

    ``final="exact"`` models the exact re-check of the exact-tokens issue after the last pass:
    the rows that pass flags (an ``ieee`` pass flags those within its own bound) get the exact
    argmin (`exact_nearest`); ``entered["exact"]`` counts them. ``final="ieee"`` keeps the last
    pass's argmin on every row that reaches it (meant for chains ending with ``ieee``).
    ``candidates=L`` gives every pass candidate lists: flagged rows whose list is complete are
    decided by `resolve_candidates` (undecided ones join the exact re-check) and only the others
    go on to the next pass. ``interpreted`` as in `emulate_pass` (every pass of the chain).
    """
    if final not in ("exact", "ieee"):
        raise UnsupportedOptionError(f"final must be 'exact' or 'ieee', got {final!r}")
    x = x.detach().float().contiguous()
    codebook = codebook.detach().float().contiguous()
    norms = squared_norms(codebook)
    tokens = torch.empty(x.shape[0], dtype=torch.int64)
    result = ChainResult(tokens=tokens, rows=x.shape[0])
    rows = torch.arange(x.shape[0])
    to_exact: list[torch.Tensor] = []
    result.entered["candidates"] = 0
    for i, dot in enumerate(chain):
        result.entered[dot] = int(rows.numel())
        if rows.numel() == 0:
            continue
        last = i == len(chain) - 1
        track = dot != "ieee" or (final == "exact" and last)
        passed = emulate_pass(
            x[rows],
            codebook,
            dot,
            bound=bound,
            code_norms=norms,
            track=track,
            candidates=candidates if track else 0,
            slack_scale=slack_scale,
            interpreted=interpreted,
        )
        tokens[rows] = passed.tokens
        if passed.listed is not None and bool(passed.listed.any()):
            listed_rows = rows[passed.listed]
            got, decided = resolve_candidates(x[listed_rows], codebook, passed.candidates[passed.listed])
            result.entered["candidates"] += int(listed_rows.numel())
            tokens[listed_rows[decided]] = got[decided]
            to_exact.append(listed_rows[~decided])
            rows = rows[passed.flagged & ~passed.listed]
        else:
            rows = rows[passed.flagged]
    if final == "exact":
        to_exact.append(rows)
        pending = torch.cat(to_exact)
        result.entered["exact"] = int(pending.numel())
        if pending.numel():
            tokens[pending] = exact_nearest(x[pending], codebook)
    return result
