"""The CPU emulation of the Triton kernel's passes and the rigor of their re-check bounds.

The emulation computes TF32, tf32x3 and bf16 arithmetic as the GPU does (operands rounded to
TF32 or bf16, float32 accumulation), which the Triton interpreter cannot: its ``tl.dot`` is
float32 whatever precision is asked for. That the emulation's flags are the kernel's flags is checked under the
interpreter in ``test_triton_kernels.py`` (``test_interpreted_flags_equal_emulation``).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")

from vqdeploy.errors import UnsupportedOptionError  # noqa: E402
from vqdeploy.ops.contract import nearest_code_exact, nearest_code_reference, squared_norms  # noqa: E402
from vqdeploy.ops.pass_emulation import _dot, emulate_chain, emulate_pass, resolve_candidates  # noqa: E402
from vqdeploy.ops.triton_kernels import round_bf16, round_tf32, score_error_coefficients  # noqa: E402

FAST = ("tf32", "tf32x3", "ieee")
EXACT = ("tf32x3", "ieee")
BF16_FIRST = ("bf16", "tf32", "tf32x3", "ieee")
ROUNDING = {"tf32": round_tf32, "bf16": round_bf16, "tf32x3": round_tf32, "ieee": round_tf32}


def _near_ties(codebook: torch.Tensor, rows: int, generator: torch.Generator) -> torch.Tensor:
    """Midpoints of random code pairs moved towards one code by 0 or +-10^-8..10^-1 (relative)."""
    pairs = torch.randint(0, codebook.shape[0], (rows, 2), generator=generator)
    a, b = codebook[pairs[:, 0]], codebook[pairs[:, 1]]
    nudge = 10 ** (torch.rand(rows, 1, generator=generator) * 7 - 8)
    nudge *= torch.randint(-1, 2, (rows, 1), generator=generator).float()
    return (a + b) / 2 + nudge * (a - b) / 2


def _planted_norms(
    generator: torch.Generator, codes: int = 96, dim: int = 48
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes with norms over six decades (some duplicated up to a tiny shift), rows near ties
    between them, rows far larger and far smaller than the codes."""
    scales = 10 ** (torch.rand(codes, 1, generator=generator) * 6 - 3)
    codebook = torch.randn(codes, dim, generator=generator) * scales
    codebook[codes // 2 :] = codebook[: codes // 2] * (
        1 + 1e-4 * torch.randn(codes // 2, 1, generator=generator)
    )
    x = torch.cat(
        [
            _near_ties(codebook, 600, generator),
            1e3 * torch.randn(100, dim, generator=generator),
            1e-3 * torch.randn(100, dim, generator=generator),
            codebook[torch.randint(0, codes, (100,), generator=generator)],
        ]
    )
    return x, codebook


def _cases() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(25)
    cases = []
    for dim, codes in ((256, 256), (64, 512), (7, 33)):
        codebook = torch.randn(codes, dim, generator=gen)
        x = torch.cat([torch.randn(500, dim, generator=gen), _near_ties(codebook, 1500, gen)])
        cases.append((f"random+ties {dim}x{codes}", x, codebook))
    x, codebook = _planted_norms(gen)
    cases.append(("planted norms", x, codebook))
    # Integer data: exact ties in float64, TF32-exact operands (residuals 0).
    codebook = torch.randint(-3, 4, (64, 16), generator=gen).float()
    x = torch.randint(-6, 7, (500, 16), generator=gen).float() / 2
    cases.append(("integer ties", x, codebook))
    return cases


CASES = _cases()


def test_round_tf32_is_round_to_nearest_ties_away() -> None:
    v = torch.tensor([1.0, 1 + 2**-11, 1 + 2**-12, -(1 + 2**-11), 1 + 3 * 2**-11, 3.0e38, 1e-30])
    r = round_tf32(v)
    assert r[:4].tolist() == [1.0, 1 + 2**-10, 1.0, -(1 + 2**-10)]  # ties go away from zero
    assert r[4].item() == 1 + 2 * 2**-10
    x = torch.randn(10000) * 10 ** torch.randint(-20, 20, (10000,)).float()
    rx = round_tf32(x)
    assert (rx.view(torch.int32) & 0x1FFF == 0).all()
    assert ((x - rx).abs() <= 2.0**-11 * x.abs()).all()


def test_round_bf16_is_round_to_nearest_ties_away() -> None:
    v = torch.tensor([1.0, 1 + 2**-8, 1 + 2**-9, -(1 + 2**-8), 1 + 3 * 2**-8, 0.5 + 2**-9 + 2**-20])
    r = round_bf16(v)
    assert r[:4].tolist() == [1.0, 1 + 2**-7, 1.0, -(1 + 2**-7)]  # ties go away from zero
    assert r[4].item() == 1 + 2 * 2**-7 and r[5].item() == 0.5 + 2**-8
    x = torch.randn(10000) * 10 ** torch.randint(-20, 20, (10000,)).float()
    rx = round_bf16(x)
    assert (rx.view(torch.int32) & 0xFFFF == 0).all()
    rne = x.to(torch.bfloat16).float()  # torch rounds to nearest even: the two differ on ties only
    assert ((rx == rne) | ((x - rx).abs() == (x - rne).abs())).all()
    assert ((x - rx).abs() <= 2.0**-8 * x.abs()).all()
    assert ((x - rx) + rx == x).all()  # the residual is exact in float32


@pytest.mark.parametrize("dot", ["bf16", "tf32", "tf32x3", "ieee"])
@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_emulated_scores_within_the_score_bound(dot: str, case: int) -> None:
    """Step 3 of the bound, element by element, against float64 scores."""
    name, x, codebook = CASES[case]
    x = x[:400]
    scores = squared_norms(codebook)[None, :] - 2.0 * _dot(x, codebook, dot, interpreted=False)
    xd, cd = x.double(), codebook.double()
    exact = cd.square().sum(1)[None, :] - 2.0 * xd @ cd.T
    coef = score_error_coefficients(dot, x.shape[1])
    xn, cn = xd.norm(dim=1)[:, None], cd.norm(dim=1)[None, :]
    rx = (xd - ROUNDING[dot](x).double()).norm(dim=1)[:, None]
    rc = (cd - ROUNDING[dot](codebook).double()).norm(dim=1)[None, :]
    norm_error = (squared_norms(codebook).double() - cd.square().sum(1)).abs()[None, :]
    bound = coef.cross * xn * cn + coef.code_residual * xn * rc + coef.row_residual * rx * cn
    bound = bound + coef.square * cn**2 + coef.norm * norm_error
    error = (scores.double() - exact).abs()
    assert (error <= bound).all(), float((error / bound).max())
    if name != "integer ties":  # there every score is exact
        # The bound is not vacuous: the worst error uses a visible part of it.
        assert float((error / bound).max()) > 1e-3


@pytest.mark.parametrize("bound", ["residual", "per-code", "legacy"])
@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_unflagged_rows_are_the_exact_argmin(bound: str, case: int) -> None:
    """No row outside a pass's flagged set is wrong: near-ties, planted norms, exact ties."""
    _, x, codebook = CASES[case]
    ref = nearest_code_reference(x, codebook)
    for dot in ("bf16", "tf32", "tf32x3", "ieee"):
        res = emulate_pass(x, codebook, dot, bound=bound, track=True)
        kept = ~res.flagged
        assert torch.equal(res.tokens[kept], ref[kept]), (
            f"{dot}: {int((res.tokens[kept] != ref[kept]).sum())} wrong"
        )
        if dot in ("tf32", "bf16") and case < 3:
            # The near-ties do reach the flag: TF32 alone gets some of them wrong, all flagged.
            assert bool(res.flagged.any()) and bool((res.tokens != ref).any())


@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_fast_and_exact_chains_return_the_exact_argmin_on_every_row(case: int) -> None:
    _, x, codebook = CASES[case]
    ref = nearest_code_reference(x, codebook)
    fast = emulate_chain(x, codebook, FAST)
    exact = emulate_chain(x, codebook, EXACT)
    assert torch.equal(fast.tokens, ref) and torch.equal(exact.tokens, ref)
    assert fast.entered["tf32"] == x.shape[0] and fast.entered["tf32x3"] <= x.shape[0]
    assert fast.entered["exact"] <= fast.entered["ieee"] <= fast.entered["tf32x3"]


def test_residual_bound_sends_fewer_rows_on() -> None:
    """At 256 x 1024 on random rows the residual bound flags well under half of the legacy one."""
    gen = torch.Generator().manual_seed(3)
    x, codebook = torch.randn(2048, 256, generator=gen), torch.randn(1024, 256, generator=gen)
    legacy = emulate_pass(x, codebook, "tf32", bound="legacy").flagged
    per_code = emulate_pass(x, codebook, "tf32", bound="per-code").flagged
    residual = emulate_pass(x, codebook, "tf32", bound="residual").flagged
    assert int(residual.sum()) < 0.5 * int(legacy.sum())
    assert int(residual.sum()) < int(per_code.sum()) <= int(legacy.sum())


def test_bad_options_raise_typed_errors() -> None:
    x, codebook = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(UnsupportedOptionError, match="bound"):
        emulate_pass(x, codebook, "tf32", bound="loose")
    with pytest.raises(UnsupportedOptionError, match="dot"):
        emulate_pass(x, codebook, "fp8")
    with pytest.raises(UnsupportedOptionError, match="final"):
        emulate_chain(x, codebook, final="float64")


def _aligned_residuals(v: float, rows: int = 64, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows where the bound is nearly attained: r(x) points along c_b - c_a, away from c_a.

    Codes a = -(1 - v) 1 and b = 3 * 1 are exact at unit roundoff v (bf16: 2^-8, TF32: 2^-11),
    their bisector is x = (1 + v/2) 1, and rows (1 + v/2 + delta) 1 with 0 < delta < v/2 are
    truly nearer b but round to 1, nearer a: the computed margin is 64v - 16v^2, the bound
    e_a + e_b = 2 ||r(x)|| (||c_a|| + ||c_b||) + (small terms) = 64v + 128 delta + ... Two far
    codes pad the codebook.
    """
    delta = torch.linspace(2**-6, 0.45, rows)[:, None] * v
    x = (1 + v / 2 + delta) * torch.ones(rows, dim)
    ones = torch.ones(dim)
    codes = torch.stack([-(1 - v) * ones, 3 * ones, -10 * ones, 10 * ones])
    return x, codes


@pytest.mark.parametrize("dot, v", [("bf16", 2.0**-8), ("tf32", 2.0**-11)])
def test_tightened_bound_is_caught_and_loosened_one_only_flags_more(dot: str, v: float) -> None:
    """The checks have teeth: halving the proven slack lets wrong tokens through, unflagged."""
    x, codes = _aligned_residuals(v)
    ref = nearest_code_exact(x, codes)
    assert bool((ref == 1).all())
    proven = emulate_pass(x, codes, dot, candidates=2)
    assert bool((proven.tokens != ref).any())  # the pass itself is wrong on these rows...
    assert torch.equal(proven.tokens[~proven.flagged], ref[~proven.flagged])  # ...and flags them all
    tight = emulate_pass(x, codes, dot, slack_scale=0.5)
    kept = ~tight.flagged
    assert bool((tight.tokens[kept] != ref[kept]).any()), "a bound half as large must let a wrong row through"
    chain = (dot, "tf32x3", "ieee")
    assert not torch.equal(emulate_chain(x, codes, chain, candidates=2, slack_scale=0.5).tokens, ref)
    loose = emulate_pass(x, codes, dot, slack_scale=2.0)
    assert bool((loose.flagged >= proven.flagged).all()) and int(loose.flagged.sum()) >= int(proven.flagged.sum())
    assert torch.equal(emulate_chain(x, codes, chain, candidates=2, slack_scale=2.0).tokens, ref)
    assert torch.equal(emulate_chain(x, codes, chain, candidates=2).tokens, ref)


@pytest.mark.parametrize("width", [2, 3])  # a flagged row has >= 2 candidates
@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_complete_candidate_lists_hold_every_possible_argmin(width: int, case: int) -> None:
    """A listed row's candidates include its token and every code at the exact minimum distance."""
    _, x, codebook = CASES[case]
    exact = (x.double()[:, None, :] - codebook.double()[None]).square().sum(-1)
    at_min = exact == exact.min(dim=1, keepdim=True).values
    for dot in ("bf16", "tf32", "tf32x3"):
        res = emulate_pass(x, codebook, dot, candidates=width)
        assert not bool((res.listed & ~res.flagged).any())
        rows = res.listed
        in_list = torch.zeros(x.shape[0], codebook.shape[0] + 1, dtype=torch.bool)  # last column: pads
        cand = res.candidates[rows]
        in_list[rows] = in_list[rows].scatter_(1, torch.where(cand >= 0, cand, codebook.shape[0]), True)
        in_list = in_list[:, :-1]
        assert not bool((at_min[rows] & ~in_list[rows]).any()), dot
        assert bool(in_list[rows].gather(1, res.tokens[rows][:, None]).all()), dot
        assert bool(rows.any()) or dot == "tf32x3"  # the near-ties are listed


def test_resolve_candidates_decides_only_separated_rows() -> None:
    codes = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    x = torch.tensor([[1.0, 0.0], [0.9, 0.0], [1.0 + 2**-23, 0.0], [0.0, 1.4]])
    cand = torch.tensor([[0, 1, -1], [1, 0, -1], [0, 1, 2], [0, 2, -1]])
    tokens, decided = resolve_candidates(x, codes, cand)
    assert decided.tolist() == [False, True, True, True]  # row 0: an exact tie, left to the exact re-check
    assert tokens[decided].tolist() == [0, 1, 0]
    assert tokens[0].item() == -1


@pytest.mark.parametrize("width", [0, 3])
@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_bf16_first_chains_return_the_exact_argmin_on_every_row(width: int, case: int) -> None:
    _, x, codebook = CASES[case]
    ref = nearest_code_exact(x, codebook)
    res = emulate_chain(x, codebook, BF16_FIRST, candidates=width)
    assert torch.equal(res.tokens, ref), int((res.tokens != ref).sum())
    assert res.entered["bf16"] == x.shape[0]
    if width:  # lists decide rows that would otherwise have gone on to the tf32 pass
        plain = emulate_chain(x, codebook, BF16_FIRST)
        assert res.entered["candidates"] > 0 and res.entered["tf32"] < plain.entered["tf32"]


def _kmeans_digits_module(dim: int, codes: int):
    """A VectorQuantize whose codebook is scikit-learn k-means on the digits (columns tiled to dim)."""
    import numpy as np
    from sklearn.cluster import KMeans
    from sklearn.datasets import load_digits

    from vqdeploy.nn import VectorQuantize

    digits = load_digits().data.astype(np.float32)
    digits = np.tile(digits, (1, -(-dim // digits.shape[1])))[:, :dim]
    centres = KMeans(n_clusters=codes, n_init=1, max_iter=30, random_state=0).fit(digits).cluster_centers_
    module = VectorQuantize(dim=dim, codebook_size=codes).eval()
    with torch.no_grad():
        module._codebook.embed[0].copy_(torch.from_numpy(centres.astype(np.float32)))
    return module, torch.from_numpy(digits)


@pytest.mark.slow
@pytest.mark.parametrize("dim, codes", [(64, 256), (256, 128)])
def test_verify_inputs_on_a_kmeans_digits_codebook(dim: int, codes: int) -> None:
    """verify's probes (digits, random, exact midpoints, graded near-ties, on-code, spread) and the
    digits themselves: every chain, with and without candidate lists, gives the exact argmin."""
    from vqdeploy.parity import default_inputs

    module, digits = _kmeans_digits_module(dim, codes)
    codebook = module.codebook.detach().float()
    x = torch.cat([t.reshape(-1, dim) for t in default_inputs(module, num_samples=256)] + [digits])
    ref = nearest_code_exact(x, codebook)
    runs = {}
    for chain, width in ((FAST, 0), (BF16_FIRST, 3)):
        runs[chain] = res = emulate_chain(x, codebook, chain, candidates=width)
        assert torch.equal(res.tokens, ref), (chain, width, int((res.tokens != ref).sum()))
    # The probes do reach the later passes (exact midpoints, graded near-ties) and the lists.
    assert runs[FAST].entered["ieee"] > 0 and runs[BF16_FIRST].entered["candidates"] > 0
