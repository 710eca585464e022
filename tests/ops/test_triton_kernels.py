"""The fused Triton nearest-code kernel on CPU.

The kernel's logic (tiles, masks, ties, second-best tracking, row re-checks, both modes) runs in
the Triton interpreter, which needs ``TRITON_INTERPRET=1`` before triton is imported. Setting it
in this process would also turn the GPU tests of the same pytest run into interpreted ones, so
`test_interpreted_suite` re-runs this file in a child process with the variable set; there the
``@interpreted`` tests run and the others skip. The interpreter computes every dot in float32
whatever the requested precision: these tests check logic, the GPU tests check arithmetic.

Tests that need no interpreter (error bounds, configs, input checks, PTX for the AOT plugin,
compiled for an H100 target without a GPU) run in this process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from token_assertions import assert_tokens_certified

pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")

from vqdeploy.errors import (  # noqa: E402
    DeviceNotAvailableError,
    InputDtypeError,
    InputShapeError,
    UnsupportedOptionError,
)
from vqdeploy.ops.contract import (  # noqa: E402
    CANDIDATE_NORM_LIMIT,
    UNIT_ROUNDOFF,
    nearest_code_exact,
    nearest_code_reference,
    resolve_candidates,
    squared_norms,
)
from vqdeploy.ops.pass_emulation import emulate_chain, emulate_pass  # noqa: E402
from vqdeploy.ops.triton_kernels import (  # noqa: E402
    FAST_CHAIN,
    KernelConfig,
    _run_mode,
    code_bound_terms,
    list_norm_limit,
    margin_threshold_coefficients,
    mode_chain,
    nearest_code_into,
    nearest_code_pass,
    nearest_code_triton,
    resolve_listed,
    round_bf16,
    round_tf32,
    score_error_coefficients,
    select_config,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
REPO_ROOT = Path(__file__).resolve().parents[2]
interpreted = pytest.mark.skipif(
    not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child of test_interpreted_suite"
)
SMALL = KernelConfig(block_m=16, block_k=16, block_d=16, num_warps=1, num_stages=1)



# -- the interpreted suite, run in a child process ----------------------------------------------


@pytest.mark.skipif(INTERPRETED, reason="this process already runs under the interpreter")
def test_interpreted_suite() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = (proc.stdout[-6000:] + "\n" + proc.stderr[-3000:]).strip()
    assert proc.returncode == 0, f"interpreted suite failed:\n{report}"
    assert " passed" in proc.stdout, report
    assert "TRITON_INTERPRET=1 child" not in proc.stdout, f"interpreted tests were skipped:\n{report}"


# -- logic under the interpreter ---------------------------------------------------------------


@interpreted
@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize(
    ("rows", "codes", "dim"),
    [(1, 1, 1), (37, 5, 3), (130, 40, 37), (200, 300, 64), (17, 129, 20)],
)
def test_random_data_matches_float64(mode: str, rows: int, codes: int, dim: int) -> None:
    x, codebook = torch.randn(rows, dim), torch.randn(codes, dim)
    tokens = nearest_code_triton(x, codebook, mode=mode)
    assert_tokens_certified(x, codebook, tokens)
    assert torch.equal(tokens, nearest_code_exact(x, codebook))  # both modes: the exact argmin


@interpreted
@pytest.mark.parametrize("codes", [5, 16, 17, 50])
def test_small_tiles_ragged_everything(codes: int) -> None:
    """16-wide tiles: ragged M (45), K below, at and above one code tile, D = 37 (3 slices)."""
    x, codebook = torch.randn(45, 37), torch.randn(codes, 37)
    for mode in ("exact", "fast"):
        out = torch.empty(45, dtype=torch.int64)
        assert_tokens_certified(x, codebook, nearest_code_into(x, codebook, out, mode=mode, config=SMALL))


def _integer_codebook_with_duplicates(num_codes: int, dim: int) -> torch.Tensor:
    """Distinct integer codes in [-4, 4]^dim, with code 3 planted again at 7 (same 16-code tile)
    and at 21 (the next tile)."""
    generator = torch.Generator().manual_seed(1)
    while True:
        codebook = torch.randint(-4, 5, (num_codes, dim), generator=generator).float()
        if torch.unique(codebook, dim=0).shape[0] == num_codes:
            break
    codebook[21] = codebook[3]
    codebook[7] = codebook[3]
    return codebook


@interpreted
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_duplicate_codes_tie_to_lowest_index(mode: str) -> None:
    """The kernel's tie rule (lowest index within a tile, strict < across tiles, the re-check chain
    of both modes) on duplicate codes, with arithmetic that is exact in any summation order.

    Integer codes and quarter-integer offsets make every product, partial sum and score an exact
    float32 (and TF32) value, so duplicate codes get bit-identical scores whatever GEMM computes
    the interpreter's ``tl.dot``. That is what the interpreter can prove; see the next test for
    what it cannot.
    """
    codebook = _integer_codebook_with_duplicates(40, 6)
    offsets = torch.randint(-1, 2, (5, 6)).float() * 0.25  # <= 6/16 from code 3; others >= 9/16
    x = torch.cat([codebook[3:4] + offsets, codebook[3:4]])
    assert nearest_code_reference(x, codebook).tolist() == [3] * 6
    for config in (SMALL, None):
        out = torch.empty(6, dtype=torch.int64)
        assert nearest_code_into(x, codebook, out, mode=mode, config=config).tolist() == [3] * 6


@interpreted
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_duplicate_float_codes_go_to_the_lowest_index(mode: str) -> None:
    """Duplicates of random float codes: the lowest index, through the exact re-check.

    The interpreter's ``tl.dot`` is numpy's matmul. OpenBLAS's Haswell and Zen SGEMM kernels (what
    numpy picks on AMD EPYC, or with OPENBLAS_CORETYPE=Haswell) round the same column differently
    by its position in the product: measured on 128x16 @ 16x64 products with duplicated columns,
    200 of 200 differed (SkylakeX kernel: 0 of 200). Duplicate codes then get scores one ulp
    apart; the kernel alone could return either, so this checks the whole mode: the ieee pass
    flags the row (its margin is inside the bound) and the exact re-check picks the lowest index,
    whatever the arithmetic did.
    """
    codebook = torch.randn(40, 6)
    codebook[21] = codebook[3]
    codebook[7] = codebook[3]
    x = torch.cat([codebook[3:4] + 0.01 * torch.randn(5, 6), codebook[3:4]])
    for config in (SMALL, None):
        out = torch.empty(6, dtype=torch.int64)
        assert nearest_code_into(x, codebook, out, mode=mode, config=config).tolist() == [3] * 6


@interpreted
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_both_modes_return_the_exact_argmin_on_near_ties(mode: str) -> None:
    from vqdeploy.ops.contract import nearest_code_exact

    codebook = torch.randn(48, 20)
    pairs = torch.randint(0, 48, (400, 2))
    mid = 0.5 * (codebook[pairs[:, 0]] + codebook[pairs[:, 1]])
    x = torch.cat([mid, mid + 1e-7 * torch.randn_like(mid), torch.randn(100, 20)])
    for config in (SMALL, None):
        out = torch.empty(x.shape[0], dtype=torch.int64)
        assert torch.equal(nearest_code_into(x, codebook, out, mode=mode, config=config), nearest_code_exact(x, codebook))


@interpreted
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_points_exactly_between_codes_go_to_lowest_index(mode: str) -> None:
    # Integer coordinates: every distance is exact in any float arithmetic, so these are true ties.
    codebook = torch.tensor([[4.0, 0.0, 2.0], [0.0, 0.0, 0.0], [2.0, 2.0, 2.0], [0.0, 4.0, 2.0]])
    x = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [0.0, 2.0, 1.0], [3.0, 1.0, 2.0]])
    # [2,0,1]: codes 0 and 1 at 5 (and code 2 at 5) -> 0; [1,1,1]: codes 1, 2 at 3 -> 1;
    # [2,2,2]: code 2 exactly; [0,2,1]: codes 1, 3 at 5 and code 2 at 5 -> 1; [3,1,2]: codes 0, 2 at 2 -> 0.
    expected = nearest_code_reference(x, codebook).tolist()
    assert expected == [0, 1, 2, 1, 0]
    assert nearest_code_triton(x, codebook, mode=mode).tolist() == expected
    out = torch.empty(5, dtype=torch.int64)
    assert nearest_code_into(x, codebook, out, mode=mode, config=SMALL).tolist() == expected


@interpreted
def test_fast_equals_exact_on_adversarial_near_ties() -> None:
    codebook = torch.randn(64, 24)
    pairs = torch.randint(0, 64, (300, 2))
    mid = 0.5 * (codebook[pairs[:, 0]] + codebook[pairs[:, 1]])
    x = torch.cat([mid, mid + 1e-6 * torch.randn_like(mid), torch.randn(50, 24)])
    exact = nearest_code_triton(x, codebook, mode="exact")
    fast = nearest_code_triton(x, codebook, mode="fast")
    assert torch.equal(fast, exact)
    assert_tokens_certified(x, codebook, exact)


@interpreted
def test_low_precision_pass_flags_near_ties_only() -> None:
    codebook = torch.randn(32, 16)
    codebook[16:24] = codebook[8:16] + 0.3 * torch.randn(8, 16)  # close pairs, far from the rest
    far = codebook[:8].clone()  # on a code: margin far above the bound
    mid = 0.5 * (codebook[8:16] + codebook[16:24])  # equidistant from a pair: margin ~ 0
    x = torch.cat([far, mid])
    norms = codebook.square().sum(1)
    for dot in ("tf32", "tf32x3"):
        out = torch.empty(16, dtype=torch.int64)
        nearest_code_pass(x, codebook, norms, out, dot)
        assert (out[:8] == torch.arange(8)).all(), dot
        flagged = out[8:] < 0
        assert flagged.all(), dot
        decoded = -1 - out[8:]  # the kernel stores -1 - index for rows to re-check
        assert ((decoded == torch.arange(8, 16)) | (decoded == torch.arange(16, 24))).all()
    out = torch.empty(16, dtype=torch.int64)
    nearest_code_pass(x, codebook, norms, out, "ieee")
    assert (out >= 0).all()


def _flag_test_data(generator: torch.Generator, residual_bits: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and codes whose float32 dots are exact in any summation order, with margins spanning
    the thresholds.

    Grid values n/256 with 224 <= |n| <= 416 + 16 (TF32-exact, 9-bit numerators; products are
    multiples of 2^-16 and sums stay below 2^8, so exact): numpy's matmul in the interpreter and
    torch's here agree bit for bit. ``residual_bits`` adds q 2^-15, |q| <= 7, below half a TF32 ulp:
    the kernel's rounding removes it exactly (the dot stays exact) and leaves the residual norms
    that the tf32 bound uses; without it (tf32x3, computed in plain float32 by the interpreter) the
    values are the grid values.
    """

    def signs(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(0, 2, shape, generator=generator) * 2 - 1

    def residual(shape: tuple[int, int]) -> torch.Tensor:
        if not residual_bits:
            return torch.zeros(shape)
        return torch.randint(-7, 8, shape, generator=generator).float() * 2.0**-15

    # 25 codes and 25 twins 2h/256 apart in coordinate 0 (h = 1..16) and 32/256 in two more.
    # Rows: random grid points, codes, the twins' midpoints (exact ties, broken by the residual
    # bits) and midpoints moved j/256 towards a code in coordinate 0: margin 4 h j / 256^2,
    # from 6e-5 to 1.6e-2, across both passes' thresholds.
    p = 16 * torch.randint(16, 25, (25, 20), generator=generator) * signs((25, 20))
    twin = p.clone()
    twin[:, 0] += 2 * torch.randint(1, 17, (25,), generator=generator) * signs((25,))
    twin[:, 1:3] += 32 * signs((25, 2))
    grid = torch.cat([p, twin])
    pairs = torch.randint(0, 25, (120,), generator=generator)
    mid = (p[pairs] + twin[pairs]) // 2
    moved = mid.clone()
    steps = torch.randint(1, 17, (120,), generator=generator)
    moved[:, 0] += torch.sign(p[pairs, 0] - twin[pairs, 0]) * steps
    rows = torch.cat(
        [
            16 * torch.randint(16, 25, (60, 20), generator=generator) * signs((60, 20)),
            grid[torch.randint(0, 50, (20,), generator=generator)],
            mid[:40],
            moved,
        ]
    )
    codebook = grid.float() / 256 + residual((50, 20))
    x = rows.float() / 256 + residual((rows.shape[0], 20))
    return x, codebook


@interpreted
@pytest.mark.parametrize("dot", ["tf32", "tf32x3"])
@pytest.mark.parametrize("config", [SMALL, None], ids=["small-tiles", "default"])
def test_interpreted_flags_equal_emulation(dot: str, config: KernelConfig | None) -> None:
    """The kernel's tile-by-tile flag (step 4) is the emulation's global one, row for row."""
    generator = torch.Generator().manual_seed(7)
    x, codebook = _flag_test_data(generator, residual_bits=dot == "tf32")
    assert torch.equal(round_tf32(x), torch.round(x * 256) / 256)  # the residual bits round away
    norms = codebook.square().sum(1)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    nearest_code_pass(x, codebook, norms, out, dot, config=config)
    flagged = out < 0
    tokens = torch.where(flagged, -1 - out, out)
    emulated = emulate_pass(x, codebook, dot, code_norms=norms, interpreted=True)
    assert torch.equal(flagged, emulated.flagged), int((flagged != emulated.flagged).sum())
    assert torch.equal(tokens, emulated.tokens)
    assert 0 < int(flagged.sum()) < x.shape[0]  # both outcomes occur
    # The data probes the threshold itself: another bound would flag other rows.
    assert not torch.equal(flagged, emulate_pass(x, codebook, dot, bound="legacy", interpreted=True).flagged)
    ref = nearest_code_reference(x, codebook)
    assert torch.equal(tokens[~flagged], ref[~flagged])


def _bf16_grid_data(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and codes on which every pass of ``fast`` is exact in any summation order, with
    candidate sets of every size.

    D = 8; values (8 n + q) / 1024 with 64 <= |n| <= 88, |q| <= 1: TF32 values (so the tf32 and
    tf32x3 passes see no rounding and the interpreter's float32 tl.dot is theirs) whose bf16
    rounding is n / 128 (|q| / 1024 is below half a bf16 ulp), so the bf16 pass has residual
    norms; midpoints of two codes lie on the 1/2048 grid. Products are integers times 2^-21 and
    every dot, and ||x||^2, stays below 2^24 such units: exact whatever GEMM the interpreter
    uses. The rows:

    * on the base of a cluster of s = 2..5 codes, the others one grid step (8/1024) away in one
      coordinate each, with bf16 residuals -sign(x) / 1024 that put their bf16 scores ~0.01
      below the base's: the bf16 pass picks a wrong code, and its candidate set is the cluster,
      listed for s <= 3 and overflowing for s > 3. The base, the exact argmin, has the smallest
      e_k and the largest score, so the largest lower bound of its cluster: a list kept without
      the (L+1)-th value would miss it. The tf32 pass decides them (margin >= 5e-5, its bound
      ~1e-5);
    * on a duplicated code (an exact tie for every pass: lists, then the exact re-check);
    * at the centre of a star, four codes one step away in four coordinates and none on it: an
      exact four-way tie, which overflows the lists of every pass and reaches the exact re-check;
    * random grid rows, midpoints of random code pairs, and codes.
    """
    dim = 8

    def signs(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(0, 2, shape, generator=generator) * 2 - 1

    def grid(n: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return (8 * n + q).float() / 1024

    def step_away(n: torch.Tensor, i: int) -> torch.Tensor:
        moved = n.clone()
        moved[..., i] += torch.sign(moved[..., i])  # one step away from 0: stays within 64..88
        return moved

    base_n = torch.randint(65, 88, (24, dim), generator=generator) * signs((24, dim))
    base_q = torch.randint(-1, 2, (24, dim), generator=generator)
    base_q[:6] = 0  # cluster bases and the star's centre
    codes = [grid(base_n, base_q)]
    rows = []
    for b, size in enumerate([2, 3, 4, 5, 5]):
        for i in torch.randperm(dim, generator=generator)[: size - 1].tolist():
            # Residuals towards the base's bf16 side: the variant's bf16 score is below the base's.
            codes.append(grid(step_away(base_n[b : b + 1], i), -torch.sign(base_n[b : b + 1])))
        rows.append(codes[0][b : b + 1])
    star = base_n[5:6]
    codes[0][5] = grid(step_away(base_n[6:7], 0), base_q[6:7])[0]  # the centre is no code
    for i in range(4):
        codes.append(grid(step_away(star, i), torch.zeros_like(star)))
    rows.append(grid(star, torch.zeros_like(star)))
    codebook = torch.cat(codes)
    codebook = torch.cat([codebook, codebook[7:8]])  # a duplicate
    perm = torch.randperm(codebook.shape[0], generator=generator)  # spread over the code tiles
    codebook = codebook[perm]
    rows.append(codebook[int((perm == 7).nonzero()[0])][None])
    random_rows = grid(
        torch.randint(64, 89, (24, dim), generator=generator) * signs((24, dim)),
        torch.randint(-1, 2, (24, dim), generator=generator),
    )
    pairs = torch.randint(0, codebook.shape[0], (16, 2), generator=generator)
    mid = (codebook[pairs[:, 0]] + codebook[pairs[:, 1]]) / 2
    x = torch.cat([*rows, random_rows, mid, codebook[:8]])
    return x, codebook


def _as_sets(cand: torch.Tensor) -> list[list[int]]:
    return [sorted(c for c in row if c >= 0) for row in cand.tolist()]


@interpreted
@pytest.mark.parametrize("dot", ["bf16", "tf32"])
@pytest.mark.parametrize("config", [SMALL, None], ids=["small-tiles", "default"])
def test_interpreted_lists_equal_emulation(dot: str, config: KernelConfig | None) -> None:
    """Flags, tokens, listed rows and candidate lists (step 6) of a pass are the emulation's, row
    for row: the kernel's tile-by-tile merge of the L + 1 smallest lower bounds is the global one."""
    x, codebook = _bf16_grid_data(torch.Generator().manual_seed(3))
    assert torch.equal(round_tf32(x), x) and torch.equal(round_tf32(codebook), codebook)
    assert not torch.equal(round_bf16(x), x)  # the bf16 pass has residual norms
    norms = squared_norms(codebook)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    cand = nearest_code_pass(x, codebook, norms, out, dot, config=config, candidates=3)
    assert cand is not None and cand.shape == (x.shape[0], 3) and cand.dtype == torch.int32
    flagged = out < 0
    listed = cand[:, 0] >= 0
    emulated = emulate_pass(x, codebook, dot, code_norms=norms, interpreted=True, candidates=3)
    assert torch.equal(flagged, emulated.flagged), int((flagged != emulated.flagged).sum())
    assert torch.equal(torch.where(flagged, -1 - out, out), emulated.tokens)
    assert torch.equal(listed, emulated.listed), int((listed != emulated.listed).sum())
    assert _as_sets(cand[listed]) == _as_sets(emulated.candidates[emulated.listed])
    assert (cand[~listed] == -1).all()
    overflow = flagged & ~listed
    assert int(listed.sum()) > 0 and int(overflow.sum()) > 0 and int((~flagged).sum()) > 0
    # Rows 0-6: clusters of 2..5 codes, the star, the duplicate (docstring).
    if dot == "bf16":
        assert listed[[0, 1, 6]].all() and overflow[[2, 3, 4, 5]].all()
    else:
        assert (~flagged[:5]).all() and overflow[5] and listed[6]
    # The exact argmin of every listed row is in its list.
    exact = nearest_code_exact(x, codebook)
    assert all(int(e) in c for e, c in zip(exact[listed], _as_sets(cand[listed]), strict=True))
    if dot == "bf16":  # the data probes its bound: half of it would flag and list other rows
        tight = emulate_pass(x, codebook, dot, code_norms=norms, interpreted=True, candidates=3, slack_scale=0.5)
        assert not (torch.equal(flagged, tight.flagged) and torch.equal(listed, tight.listed))


@interpreted
@pytest.mark.parametrize("config", [SMALL, None], ids=["small-tiles", "default"])
def test_fast_chain_equals_emulated_chain(config: KernelConfig | None) -> None:
    """``fast`` runs bf16[3] > tf32[3] > tf32x3[3] > ieee[3] > exact re-check as the emulation does:
    the same number of rows enters every pass, is decided from lists and reaches the exact
    re-check; rows whose candidate set overflows go on; every token is the exact argmin."""
    x, codebook = _bf16_grid_data(torch.Generator().manual_seed(3))
    chain, width = mode_chain("fast", x.shape[1])
    assert chain == FAST_CHAIN == ("bf16", "tf32", "tf32x3", "ieee") and width == 3
    out = torch.empty(x.shape[0], dtype=torch.int64)
    trace: dict[str, torch.Tensor] = {}
    _run_mode(x, codebook, squared_norms(codebook), out, "fast", config, trace)
    assert torch.equal(out, nearest_code_exact(x, codebook))
    emulated = emulate_chain(x, codebook, FAST_CHAIN, candidates=3, interpreted=True)
    assert torch.equal(out, emulated.tokens)
    assert {k: v.numel() for k, v in trace.items()} == {k: v for k, v in emulated.entered.items() if v or k in trace}
    # The overflowing clusters (rows 2-4) go to the tf32 pass, which decides them; the star (row 5)
    # overflows every pass; the duplicate (row 6) is listed and left to the exact re-check.
    assert set(trace["tf32"].tolist()) >= {2, 3, 4, 5}
    assert 5 in trace["ieee"].tolist() and {5, 6} <= set(trace["exact"].tolist())
    assert trace["candidates"].numel() > trace["exact"].numel() - 1 > 0


@interpreted
def test_fast_tokens_are_batch_invariant() -> None:
    """A row's ``fast`` token does not depend on the rows beside it (alone, permuted, in another
    batch, in other tiles): every pass decides a row from its own scores, lists and the exact
    re-check, and all of them give the exact argmin."""
    x, codebook = _bf16_grid_data(torch.Generator().manual_seed(3))
    x = torch.cat([x, torch.randn(40, 8) * 0.6])
    ref = nearest_code_exact(x, codebook)
    assert torch.equal(nearest_code_triton(x, codebook, mode="fast"), ref)
    perm = torch.randperm(x.shape[0])
    out = torch.empty(x.shape[0], dtype=torch.int64)
    assert torch.equal(nearest_code_into(x[perm], codebook, out, mode="fast", config=SMALL), ref[perm])
    for r in (2, 5, 6, 30):
        assert nearest_code_triton(x[r : r + 1], codebook, mode="fast").item() == ref[r].item()


@interpreted
def test_no_lists_where_a_pass_could_overflow() -> None:
    """||x|| max ||c_k|| > 2^120 (host-checkable): flagged rows are not listed (the candidate
    proof assumes finite products), exactly as in the emulation; ``fast`` stays exact."""
    base_x, base_codes = _bf16_grid_data(torch.Generator().manual_seed(3))
    listed = {}
    for power in (58, 60):  # ||x|| max ||c_k|| ~ 2^119.8 x 2^(2 (power - 59)); every value stays finite
        x, codebook = base_x * 2.0**power, base_codes * 2.0**power  # the same exact arithmetic
        norms = squared_norms(codebook)
        out = torch.empty(x.shape[0], dtype=torch.int64)
        cand = nearest_code_pass(x, codebook, norms, out, "bf16", candidates=3)
        emulated = emulate_pass(x, codebook, "bf16", code_norms=norms, interpreted=True, candidates=3)
        assert torch.equal(out < 0, emulated.flagged) and int(emulated.flagged.sum()) > 0
        assert torch.equal(cand[:, 0] >= 0, emulated.listed)
        listed[power] = int(emulated.listed.sum())
    assert listed[58] > 0 and listed[60] == 0
    assert torch.equal(nearest_code_triton(x, codebook, mode="fast"), nearest_code_exact(x, codebook))


@interpreted
@pytest.mark.parametrize("indexed", [False, True])
def test_resolve_listed_decides_as_resolve_candidates(indexed: bool) -> None:
    """The listed rows' kernel (float64 distances of <= L codes, read in place) decides the rows
    `resolve_candidates` decides, with its tokens; it leaves unlisted rows and ties untouched."""
    generator = torch.Generator().manual_seed(5)
    x, codebook = torch.randn(90, 11, generator=generator), torch.randn(30, 11, generator=generator)
    codebook[17] = codebook[4]
    cand = torch.randint(0, 30, (60, 3), generator=generator, dtype=torch.int32)
    cand[:10, 2] = -1  # two candidates
    cand[10:20, 1:] = -1  # one
    cand[20:30] = -1  # not listed
    cand[30:40, :2] = torch.tensor([4, 17], dtype=torch.int32)  # duplicates: a tie
    x[:90:3] = codebook[4]  # on the duplicated code: an exact tie where both are candidates
    rows = torch.randperm(90, generator=generator)[:60] if indexed else None
    out = torch.full((90,), -5, dtype=torch.int64)
    resolve_listed(x, codebook, out, cand, rows=rows, block_m=16)
    picked = torch.arange(60) if rows is None else rows
    tokens, decided = resolve_candidates(x[picked], codebook, cand)
    listed = cand[:, 0] >= 0
    assert torch.equal(out[picked] >= 0, decided & listed)
    assert torch.equal(out[picked][decided], tokens[decided])
    assert 0 < int(decided.sum()) < int(listed.sum())  # both outcomes occur
    untouched = torch.ones(90, dtype=torch.bool)
    untouched[picked[decided]] = False
    assert (out[untouched] == -5).all()


@interpreted
def test_indexed_rows_pass_writes_only_those_rows() -> None:
    x, codebook = torch.randn(50, 9), torch.randn(20, 9)
    out = torch.full((50,), -7, dtype=torch.int64)
    rows = torch.tensor([3, 0, 49, 17, 18])
    nearest_code_pass(x, codebook, codebook.square().sum(1), out, "ieee", rows=rows, config=SMALL)
    ref = nearest_code_reference(x, codebook)
    assert torch.equal(out[rows], ref[rows])
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[rows] = False
    assert (out[untouched] == -7).all()


@interpreted
@pytest.mark.parametrize(
    ("x_dtype", "c_dtype"),
    [(torch.float16, torch.float16), (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)],
)
def test_half_precision_inputs(x_dtype: torch.dtype, c_dtype: torch.dtype) -> None:
    x, codebook = torch.randn(70, 37).to(x_dtype), torch.randn(33, 37).to(c_dtype)
    for mode in ("exact", "fast"):
        tokens = nearest_code_triton(x, codebook, mode=mode)
        assert tokens.dtype == torch.int64
        assert_tokens_certified(x.float(), codebook.float(), tokens)


@interpreted
def test_empty_batch_and_non_contiguous_input() -> None:
    codebook = torch.randn(10, 8)
    assert nearest_code_triton(torch.empty(0, 8), codebook).shape == (0,)
    x = torch.randn(8, 30)[:, :16:2]  # strided view
    assert_tokens_certified(x, codebook, nearest_code_triton(x, codebook, mode="fast"))


# -- no interpreter needed ---------------------------------------------------------------------


def test_ieee_bound_is_the_contract_bound() -> None:
    """The ieee pass's score bound is within the gamma_{D+3} bound that tie_tolerance certifies."""
    u = UNIT_ROUNDOFF["float32"]
    for dim in (1, 3, 64, 256, 4096):
        coef = score_error_coefficients("ieee", dim)
        gamma = (dim + 3) * u / (1 - (dim + 3) * u)
        norm_error = dim * u / (1 - dim * u)  # a float32 sum of D squares
        # cross ||x|| ||c|| + (square + norm gamma_D) ||c||^2 <= gamma (||x|| + ||c||)^2 for all norms.
        assert coef.cross <= 2 * gamma and coef.square + coef.norm * norm_error <= gamma
        assert coef.code_residual == 0 and coef.row_residual == 0


def test_margin_threshold_orders_the_passes() -> None:
    for dim in (3, 37, 256, 1024):
        tf32 = margin_threshold_coefficients("tf32", dim)
        x3 = margin_threshold_coefficients("tf32x3", dim)
        ieee = margin_threshold_coefficients("ieee", dim)
        assert x3.cross > ieee.cross > 0 and x3.square == ieee.square > 0 and x3.norm >= 1
        # tf32: the input rounding goes to the residual terms (2 ||r(x)|| ||c|| + 2 ||x|| ||r(c)||).
        assert tf32.row_residual >= 2 and tf32.code_residual >= 2 and tf32.cross > ieee.cross
        assert x3.row_residual == x3.code_residual == 0
        # bf16 (the fast mode's first pass): the tf32 form, with 2^-8 in place of 2^-11.
        bf16 = margin_threshold_coefficients("bf16", dim)
        assert bf16.row_residual == tf32.row_residual and bf16.code_residual > tf32.code_residual
        assert bf16.cross > tf32.cross and bf16.square == tf32.square
    with pytest.raises(UnsupportedOptionError):
        margin_threshold_coefficients("fp8", 8)
    with pytest.raises(UnsupportedOptionError, match="dot precision"):
        nearest_code_pass(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), torch.zeros(1, dtype=torch.int64), "fp8")


def test_threshold_is_infinite_where_no_bound_exists() -> None:
    coef = margin_threshold_coefficients("tf32x3", 2**22)  # 3D * 2^-23 >= 1
    assert coef.cross == float("inf") and not coef.is_finite()
    assert margin_threshold_coefficients("tf32x3", 256).is_finite()


def test_code_bound_terms_round_up() -> None:
    codebook = torch.randn(300, 40) * torch.logspace(-3, 3, 300)[:, None]
    norms = codebook.square().sum(1)
    cd = codebook.double()
    sq = cd.square().sum(1)
    for dot in ("tf32", "tf32x3"):
        coef = margin_threshold_coefficients(dot, 40)
        terms = code_bound_terms(codebook, dot, code_norms=norms)
        assert terms.dtype == torch.float32 and terms.shape == (3, 300)
        res = (cd - round_tf32(codebook).double()).norm(dim=1) if dot == "tf32" else torch.zeros(300).double()
        g = coef.cross * cd.norm(dim=1) + coef.code_residual * res
        q = coef.square * sq + coef.norm * (norms.double() - sq).abs()
        assert (terms[0].double() >= g).all() and (terms[1].double() >= coef.row_residual * cd.norm(dim=1)).all()
        assert (terms[2].double() >= q).all()
        assert (terms[0].double() <= g * (1 + 2.0**-22)).all()
        # Without the loaded norms, the worst-case norm error gamma_D ||c||^2 takes its place.
        assert (code_bound_terms(codebook, dot)[2] >= terms[2]).all()


def test_mode_chains() -> None:
    """``fast`` is the chain of docs/design.md section 10 with lists of 3; ``exact`` is unchanged."""
    assert mode_chain("fast", 256) == (("bf16", "tf32", "tf32x3", "ieee"), 3) and FAST_CHAIN[0] == "bf16"
    assert mode_chain("exact", 256) == (("tf32x3", "ieee"), 0)
    # A pass without a bound (3 D 2^-23 >= 1 for tf32x3 at D = 2^22) is left out.
    assert mode_chain("fast", 2**22)[0][-1] == "ieee" and "tf32x3" not in mode_chain("fast", 2**22)[0]
    with pytest.raises(UnsupportedOptionError, match="mode"):
        mode_chain("approx", 8)


@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1.0, 3.7e5, 1e30])
def test_list_norm_limit_is_the_largest_safe_float32(scale: float) -> None:
    """Rows with ||x|| <= the limit keep ||x|| max ||c_k|| <= 2^120 (no overflow in a listing pass)."""
    codebook = torch.randn(20, 7) * scale
    c_max = float(torch.linalg.vector_norm(codebook, dim=1, dtype=torch.float64).max())
    limit = list_norm_limit(codebook)
    assert torch.tensor(limit, dtype=torch.float32).item() == limit  # a float32 value
    assert limit * c_max <= CANDIDATE_NORM_LIMIT
    above = torch.nextafter(torch.tensor(limit), torch.tensor(float("inf"))).item()
    assert above * c_max > CANDIDATE_NORM_LIMIT or above == float("inf")
    assert list_norm_limit(torch.zeros(3, 4)) == torch.finfo(torch.float32).max


@pytest.mark.parametrize(("dim", "codes"), [(3, 1), (37, 40), (256, 1024), (64, 4096)])
def test_config_depends_on_dim_and_codes_only(dim: int, codes: int) -> None:
    for dot in ("ieee", "tf32", "tf32x3", "bf16"):
        cfg = select_config(dim, codes, dot)
        for block in (cfg.block_m, cfg.block_k, cfg.block_d):
            assert block >= 16 and block & (block - 1) == 0
        assert cfg.block_k <= max(16, 2 * codes) and cfg.block_d <= max(16, 2 * dim)


def test_bad_inputs_raise_typed_errors() -> None:
    x, codebook = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(InputShapeError, match="features"):
        nearest_code_triton(torch.randn(4, 2), codebook)
    with pytest.raises(InputShapeError, match="rank 2"):
        nearest_code_triton(torch.randn(4), codebook)
    with pytest.raises(InputDtypeError, match="float32"):
        nearest_code_triton(x.double(), codebook)
    with pytest.raises(InputShapeError, match="no codes"):
        nearest_code_triton(x, torch.empty(0, 3))
    with pytest.raises(UnsupportedOptionError, match="mode"):
        nearest_code_triton(x, codebook, mode="approx")
    with pytest.raises(InputShapeError, match="int64"):
        nearest_code_into(x, codebook, torch.empty(4, dtype=torch.int32))


@pytest.mark.skipif(INTERPRETED, reason="only the compiled kernel refuses CPU tensors")
def test_cpu_tensors_without_interpreter_raise() -> None:
    with pytest.raises(DeviceNotAvailableError, match="TRITON_INTERPRET"):
        nearest_code_triton(torch.randn(4, 3), torch.randn(5, 3))


@pytest.mark.skipif(INTERPRETED, reason="needs the compiled (not interpreted) kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_aot_ptx_compiles_without_gpu(dtype: torch.dtype) -> None:
    """PTX for an H100 (sm_90) from this CPU-only machine: what the TensorRT AOT plugin embeds."""
    from triton.backends.compiler import GPUTarget

    from vqdeploy.ops.triton_aot import compile_exact_ptx

    kernel = compile_exact_ptx(dtype, target=GPUTarget("cuda", 90, 32))
    # TensorRT launches with (inputs, extra scalars, outputs): x, codebook, M, K, D, out.
    assert kernel.num_params == 6
    entry = kernel.ptx[kernel.ptx.index(".entry " + kernel.name) :]
    params = entry[: entry.index(")")]
    assert params.count(".param") == 6 and params.count(".u32") == 3
    assert kernel.block_x == 4 * 32 and kernel.shared_mem <= 48 * 1024  # no opt-in shared memory
    assert kernel.grid_x(1) == 1 and kernel.grid_x(kernel.block_m + 1) == 2


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="needs the compiled (not interpreted) kernel")
def test_resolve_listed_kernel_compiles_for_h100() -> None:
    """The listed rows' kernel lowers to float64 PTX for sm_90 without a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget

    from vqdeploy.ops.triton_kernels import _resolve_listed_kernel

    signature = {"x_ptr": "*fp32", "c_ptr": "*fp32", "rows_ptr": "*i64", "cand_ptr": "*i32"}
    signature.update({"factor_ptr": "*fp64", "M": "i32", "D": "i32", "out_ptr": "*i64"})
    constexprs = {"LIST": 3, "BLOCK_M": 64, "BLOCK_D": 64, "ROWS_INDEXED": True}
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    source = triton.compiler.ASTSource(fn=_resolve_listed_kernel, signature=signature, constexprs=constexprs)
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "enable_fp_fusion": True}).asm["ptx"]
    assert re.search(r"(fma|mul)\.rn\.f64", ptx) and "cvt.f64.f32" in ptx

def test_strip_unused_trailing_params() -> None:
    from vqdeploy.ops.triton_aot import _strip_unused_trailing_params

    ptx = (
        ".visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .u32 k_param_1,\n"
        "\t.param .u64 k_param_2,\n\t.param .u64 k_param_3\n)\n{\n"
        "\tld.param.u64 %rd1, [k_param_0];\n\tld.param.u32 %r1, [k_param_1];\n}\n"
    )
    stripped, kept = _strip_unused_trailing_params(ptx, "k")
    assert kept == 2
    assert "k_param_2" not in stripped and "k_param_3" not in stripped and "[k_param_1]" in stripped
    with pytest.raises(ValueError, match="not found"):
        _strip_unused_trailing_params(ptx, "other")


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="needs the compiled (not interpreted) kernel")
@pytest.mark.parametrize(("dot", "width"), [("tf32", 0), ("tf32x3", 0), ("bf16", 3)])
def test_tracking_kernel_compiles_for_h100(dot: str, width: int) -> None:
    """The flagging passes (per-code bound, step 4; candidate lists, step 6) lower to tensor-core
    PTX for sm_90 without a GPU; the bf16 pass to bf16 products with float32 accumulation."""
    import triton
    from triton.backends.compiler import GPUTarget

    from vqdeploy.ops.triton_kernels import _nearest_code_kernel

    signature = {name: "*fp32" for name in ("x_ptr", "c_ptr", "cnorm_ptr", "bound_ptr")}
    signature.update({"rows_ptr": "*i64", "M": "i32", "K": "i32", "D": "i32", "list_norm_max": "fp32"})
    signature.update({"out_ptr": "*i64", "cand_ptr": "*i32"})
    cfg = select_config(256, 1024, dot)
    constexprs = {
        "BLOCK_M": cfg.block_m, "BLOCK_K": cfg.block_k, "BLOCK_D": cfg.block_d, "DOT": dot,
        "ROUND": dot if dot in ("tf32", "bf16") else "", "TRACK_SECOND": True, "NORMS_IN_KERNEL": False,
        "ROWS_INDEXED": True, "LIST": width, "LIST_WIDTH": 4, "BF16_OPERANDS": True,
    }
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    source = triton.compiler.ASTSource(fn=_nearest_code_kernel, signature=signature, constexprs=constexprs)
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "enable_fp_fusion": True}
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
    operands = "bf16" if dot == "bf16" else "tf32"
    assert re.search(rf"mma[\w.]*\.f32\.{operands}\.{operands}", ptx), operands
