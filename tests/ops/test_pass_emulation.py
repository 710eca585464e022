"""The CPU emulation of the Triton kernel's passes and the rigor of their re-check bounds.

The emulation computes TF32 and tf32x3 arithmetic as the GPU does (operands rounded to TF32,
float32 accumulation), which the Triton interpreter cannot: its ``tl.dot`` is float32 whatever
precision is asked for. That the emulation's flags are the kernel's flags is checked under the
interpreter in ``test_triton_kernels.py`` (``test_interpreted_flags_equal_emulation``).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")

from vqdeploy.errors import UnsupportedOptionError  # noqa: E402
from vqdeploy.ops.nearest_code import nearest_code_reference, squared_norms  # noqa: E402
from vqdeploy.ops.pass_emulation import _dot, emulate_chain, emulate_pass  # noqa: E402
from vqdeploy.ops.triton_kernels import round_tf32, score_error_coefficients  # noqa: E402

FAST = ("tf32", "tf32x3", "ieee")
EXACT = ("tf32x3", "ieee")


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


@pytest.mark.parametrize("dot", ["tf32", "tf32x3", "ieee"])
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
    rx = (xd - round_tf32(x).double()).norm(dim=1)[:, None]
    rc = (cd - round_tf32(codebook).double()).norm(dim=1)[None, :]
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
    for dot in ("tf32", "tf32x3", "ieee"):
        res = emulate_pass(x, codebook, dot, bound=bound, track=True)
        kept = ~res.flagged
        assert torch.equal(res.tokens[kept], ref[kept]), (
            f"{dot}: {int((res.tokens[kept] != ref[kept]).sum())} wrong"
        )
        if dot == "tf32" and case < 3:
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
