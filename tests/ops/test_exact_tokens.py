"""The exact-argmin contract: every row gets the exact nearest code of the float32 values, ties to
the lowest index, whatever the batch it comes in.

The truth here is computed independently, with Python fractions on the float32 values.
"""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction

import pytest
import torch

from vqdeploy.ops import cpu_kernels
from vqdeploy.ops.contract import (
    exact_nearest,
    nearest_code_blocked_with_margin,
    nearest_code_exact,
    norm_upper_bound,
    recheck_rows,
    score_error_bound,
    squared_norms,
)
from vqdeploy.ops.custom_op import nearest_code


def exact_by_fractions(x: torch.Tensor, codebook: torch.Tensor) -> list[int]:
    codes = [[Fraction(float(v)) for v in row] for row in codebook.float()]
    out = []
    for row in x.float():
        values = [Fraction(float(v)) for v in row]
        distances = [sum((a - b) ** 2 for a, b in zip(values, code, strict=True)) for code in codes]
        out.append(min(range(len(codes)), key=lambda k: (distances[k], k)))
    return out


def near_ties(codebook: torch.Tensor, rows: int, scale: float = 1e-7) -> torch.Tensor:
    """Midpoints of random code pairs, nudged by ~scale relative: ties float32 cannot separate."""
    pairs = torch.randint(0, codebook.shape[0], (rows, 2))
    mid = (codebook[pairs[:, 0]] + codebook[pairs[:, 1]]) / 2
    return mid + scale * mid.abs().mean() * torch.randn_like(mid)


PATHS = {
    "op": lambda x, c: nearest_code(x, c),
    "blocked": lambda x, c: nearest_code_exact(x, c),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_near_ties_equal_the_exact_argmin(path):
    codebook = torch.randn(40, 16)
    x = torch.cat([near_ties(codebook, 300), near_ties(codebook, 100, scale=0.0), torch.randn(50, 16)])
    assert PATHS[path](x, codebook).tolist() == exact_by_fractions(x, codebook)


@pytest.mark.parametrize("path", list(PATHS))
def test_duplicates_and_exact_midpoints_go_to_the_lowest_index(path):
    codebook = torch.randn(24, 8)
    codebook[17] = codebook[5]
    codebook[9] = codebook[2]
    x = torch.cat([codebook[[5, 17, 2, 9]], (codebook[[0, 3]] + codebook[[1, 4]]) / 2])
    got = PATHS[path](x, codebook).tolist()
    assert got[:4] == [5, 5, 2, 2]
    assert got == exact_by_fractions(x, codebook)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("scale", [1e-18, 1e18])
def test_tiny_and_huge_norms(path, scale):
    codebook = torch.randn(30, 12) * scale
    x = torch.cat([near_ties(codebook, 60), torch.randn(20, 12) * scale])
    assert PATHS[path](x, codebook).tolist() == exact_by_fractions(x, codebook)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("flush", [False, True], ids=["gradual underflow", "flush to zero"])
def test_products_that_underflow(path, flush):
    # Products of 1e-21 and 1e-22 are subnormal in float32; with flush-to-zero they vanish. The
    # margin cannot prove such rows, so they must reach the exact re-check either way.
    g = torch.Generator().manual_seed(8)
    codebook = torch.randn(40, 16, generator=g) * 1e-21
    x = torch.cat([near_ties(codebook, 40), torch.randn(40, 16, generator=g) * 1e-22])
    if flush and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        tokens = PATHS[path](x, codebook).tolist()
    finally:
        torch.set_flush_denormal(False)
    assert tokens == exact_by_fractions(x, codebook)


def test_batch_invariance_of_the_op():
    """Each row's token is the same alone, in batches of every size, at any position, shuffled."""
    torch.manual_seed(3)
    codebook = torch.randn(256, 64)
    x = torch.cat([near_ties(codebook, 600), torch.randn(400, 64)])
    whole = nearest_code(x, codebook)
    assert whole[:40].tolist() == exact_by_fractions(x[:40], codebook)
    one_by_one = torch.cat([nearest_code(x[i : i + 1], codebook) for i in range(0, len(x), 7)])
    assert torch.equal(one_by_one, whole[::7])
    for size in (7, 333):
        batched = torch.cat([nearest_code(x[s : s + size], codebook) for s in range(0, len(x), size)])
        assert torch.equal(batched, whole), size
    order = torch.randperm(len(x))
    assert torch.equal(nearest_code(x[order], codebook), whole[order])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_exact_on_their_widened_values(dtype):
    codebook = torch.randn(32, 8).to(dtype)
    x = near_ties(codebook.float(), 200).to(dtype)
    assert nearest_code(x, codebook).tolist() == exact_by_fractions(x.float(), codebook.float())


def test_exact_nearest_resolves_what_float64_cannot():
    """Distances 1 + 2^-60 and 1 + 2^-62: float64 rounds both to 1, exact integers do not."""
    codebook = torch.tensor([[0.0, 2.0**-30], [0.0, 2.0**-31]])  # float32 values, exactly
    x = torch.tensor([[1.0, 0.0]])
    assert nearest_code_exact(x, codebook).tolist() == exact_nearest(x, codebook).tolist() == [1]
    assert exact_by_fractions(x, codebook) == [1]
    assert nearest_code(x, codebook).tolist() == [1]


def test_margins_flag_near_ties_and_nothing_far():
    codebook = torch.randn(64, 32)
    far, close = codebook[:20] + 1e-3 * torch.randn(20, 32), near_ties(codebook, 20)
    x = torch.cat([far, close])
    indices, margin, x_norm = nearest_code_blocked_with_margin(x, codebook)
    flagged = recheck_rows(32, indices, margin, x_norm, norm_upper_bound(codebook)).tolist()
    assert not any(r < 20 for r in flagged)  # on a code: the margin proves the token
    assert all(r in flagged for r in range(20, 40) if float(margin[r]) < 1e-4)


def _score_forms(x: torch.Tensor, codes: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every way vqdeploy's float32 searches form t_k = ||c_k||^2 - 2 x.c_k."""
    norms = squared_norms(codes)
    return {
        "addmm (products summed onto the norm)": torch.addmm(norms, x, codes.t(), beta=1.0, alpha=-2.0),
        "mm, then the norm (the CPU kernel)": norms - 2.0 * torch.mm(x, codes.t()),
        "numpy matmul, then the norm": norms - 2.0 * torch.from_numpy(x.numpy() @ codes.numpy().T),
    }


@pytest.mark.parametrize("regime", ["short codes", "long codes", "rows along codes", "mixed signs"])
def test_bound_3_covers_every_score_form(regime):
    g = torch.Generator().manual_seed(5)
    dim, k = 256, 128
    x = torch.randn(64, dim, generator=g)
    codes = torch.randn(k, dim, generator=g)
    if regime == "short codes":
        codes *= 0.003
    elif regime == "long codes":
        codes *= 300.0
    elif regime == "rows along codes":  # every product x_i c_i of one sign: no cancellation
        x = codes[:64].abs() * 7.0 + 1e-3
        codes = codes.abs()
    else:
        x = x * torch.logspace(-6, 6, dim)
    exact = (codes.double() ** 2).sum(1)[None] - 2.0 * x.double() @ codes.double().t()
    allowed = score_error_bound(dim, norm_upper_bound(x)[:, None], norm_upper_bound(codes)[None])
    for name, scores in _score_forms(x, codes).items():
        ratio = float(((scores.double() - exact).abs() / allowed).max())
        assert ratio <= 1.0, (name, ratio)


def test_short_codes_leave_few_rows_to_re_check():
    # A fresh codebook is much shorter than the rows it quantizes; the bound has no ||x||^2 term,
    # so the margin proves almost every row (bound (1), which has one, flagged about a quarter).
    g = torch.Generator().manual_seed(6)
    codes = 0.04 / 16 * torch.randn(1024, 256, generator=g)
    x = torch.randn(8192, 256, generator=g)
    indices, margin, x_norm = nearest_code_blocked_with_margin(x, codes)
    flagged = recheck_rows(256, indices, margin, x_norm, norm_upper_bound(codes))
    assert flagged.numel() < 0.01 * x.shape[0]
    assert nearest_code(x[flagged], codes).tolist() == exact_nearest(x[flagged], codes).tolist()


@pytest.mark.skipif(not cpu_kernels.available(), reason="the numba kernel did not compile")
def test_compiled_kernel_and_fallback_agree_on_near_ties():
    codebook = torch.randn(300, 37)
    x = torch.cat([near_ties(codebook, 2000), torch.randn(500, 37)])
    assert torch.equal(cpu_kernels.nearest_code_cpu(x, codebook), nearest_code_exact(x, codebook))


def test_op_without_numba_is_exact(tmp_path):
    """The op in a process where numba cannot be imported: the torch fallback, still exact."""
    script = tmp_path / "no_numba.py"
    script.write_text(
        "import sys\n"
        "sys.modules['numba'] = None\n"
        "import torch\n"
        "from vqdeploy.ops import cpu_kernels, nearest_code\n"
        "from vqdeploy.ops.contract import nearest_code_exact\n"
        "assert not cpu_kernels.available()\n"
        "torch.manual_seed(0)\n"
        "c = torch.randn(50, 9); c[7] = c[3]\n"
        "pairs = torch.randint(0, 50, (400, 2))\n"
        "x = torch.cat([(c[pairs[:, 0]] + c[pairs[:, 1]]) / 2, c[[3, 7]]])\n"
        "got = nearest_code(x, c)\n"
        "assert torch.equal(got, nearest_code_exact(x, c)) and got[-2:].tolist() == [3, 3]\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def _big_integer_argmin(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The exact argmin in Python integers on the 2^-149 scale (ties to the lowest index): slow, obvious."""
    scale = 2.0**149
    codes_int = [[int(v) for v in row] for row in (codes.double().numpy() * scale)]
    out = []
    for row in x.double().numpy() * scale:
        xi = [int(v) for v in row]
        distances = [sum((a - b) ** 2 for a, b in zip(xi, ci, strict=True)) for ci in codes_int]
        out.append(min(range(len(distances)), key=lambda k: (distances[k], k)))
    return torch.tensor(out)


@pytest.mark.parametrize("case", ["ties", "duplicates", "tiny", "equidistant"])
def test_exact_nearest_equals_big_integer_arithmetic_where_ties_abound(case):
    from vqdeploy.ops.contract import exact_nearest

    g = torch.Generator().manual_seed(["ties", "duplicates", "tiny", "equidistant"].index(case))
    codes = torch.randint(-3, 4, (40, 9), generator=g).float() / 4  # few values: many exact ties
    x = torch.randint(-3, 4, (60, 9), generator=g).float() / 8
    if case == "duplicates":
        codes[20:] = codes[:20].clone()  # identical codes: the lowest index must win
    if case == "tiny":  # products far below float32's range: exact only in float64 / integers
        codes, x = codes * 2.0**-120, x * 2.0**-120
    if case == "equidistant":  # every code at the same exact distance from x = 0
        codes = torch.cat([torch.eye(9), -torch.eye(9)]) * 0.75
        x = torch.zeros(5, 9)
    x[::3] += torch.randn(x[::3].shape, generator=g) * 1e-7 * float(x.abs().max() + 2.0**-140)
    assert torch.equal(exact_nearest(x, codes), _big_integer_argmin(x, codes))


def test_a_codebook_of_identical_codes_resolves_to_the_first():
    from vqdeploy.ops.contract import exact_nearest

    assert exact_nearest(torch.randn(50, 32), torch.zeros(300, 32)).tolist() == [0] * 50
