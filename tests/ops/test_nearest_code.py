"""The NearestCode contract on the CPU path: float64 agreement, ties, blocks, the custom op."""

from __future__ import annotations

import importlib

import pytest
import torch
from token_assertions import assert_tokens_certified

from vqdeploy.ops import (
    nearest_code,
    nearest_code_blocked,
)


@pytest.mark.parametrize("m, d, k", [(1, 1, 1), (7, 3, 5), (1000, 37, 300), (5000, 64, 2048)])
def test_agrees_with_float64_up_to_certified_ties(m, d, k, digits):
    x = torch.randn(m, d) if d != 64 else digits[:m].repeat(3, 1)[:m]
    codebook = torch.randn(k, d)
    got = nearest_code(x, codebook)
    assert got.dtype == torch.int64 and got.shape == (m,)
    assert_tokens_certified(x, codebook, got)


def test_ties_go_to_the_lowest_index():
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    x = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 0.0], [3.0, 0.0]])
    assert nearest_code(x, codebook).tolist() == [0, 0, 0, 0]


def test_blocks_change_nothing(monkeypatch):
    nearest_code_module = importlib.import_module("vqdeploy.ops.contract")
    x, codebook = torch.randn(3000, 16), torch.randn(500, 16)
    whole = nearest_code_blocked(x, codebook)
    monkeypatch.setattr(nearest_code_module, "SCORE_BLOCK_BYTES", 4 * 500 * 17)  # 17-row blocks
    assert nearest_code_module.rows_per_block(500) == 17
    assert torch.equal(nearest_code_blocked(x, codebook), whole)


def test_half_inputs_are_widened():
    x, codebook = torch.randn(200, 8), torch.randn(40, 8)
    assert torch.equal(nearest_code(x.half(), codebook), nearest_code(x.half().float(), codebook))


def test_custom_op_is_one_node_under_torch_export():
    class Search(torch.nn.Module):
        def forward(self, x, codebook):
            return nearest_code(x, codebook)

    program = torch.export.export(Search(), (torch.randn(6, 4), torch.randn(3, 4)))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets == ["vqdeploy.nearest_code.default"]
    fake = torch.ops.vqdeploy.nearest_code(torch.empty(5, 4, device="meta"), torch.empty(3, 4, device="meta"))
    assert fake.shape == (5,) and fake.dtype == torch.int64


def test_certify_names_its_arithmetic_and_keeps_the_old_keyword():
    from vqdeploy.errors import UnsupportedOptionError
    from vqdeploy.ops import certify

    x, codebook = torch.randn(50, 8), torch.randn(20, 8)
    tokens = nearest_code(x, codebook)
    new = certify(x, codebook, tokens, arithmetic="tf32")
    with pytest.warns(DeprecationWarning, match="arithmetic"):
        old = certify(x, codebook, tokens, precision="tf32")
    assert torch.equal(new.tau, old.tau) and not torch.equal(new.tau, certify(x, codebook, tokens).tau)
    with pytest.raises(UnsupportedOptionError, match="arithmetic"):
        certify(x, codebook, tokens, arithmetic="exact")  # the runtime's precision is not an arithmetic


@pytest.mark.parametrize("search", ["op", "cpu kernel", "blocked"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e300])
def test_a_row_with_nan_or_inf_in_float32_is_refused(search, bad):
    """Such rows have no nearest code; every search flags them and its exact re-solve refuses them,
    wherever they are (first, in the middle of a tile, last row), float64 values beyond float32 included."""
    from vqdeploy.errors import NonFiniteInputError
    from vqdeploy.ops import cpu_kernels
    from vqdeploy.ops.contract import nearest_code_exact

    run = {"op": nearest_code, "cpu kernel": cpu_kernels.nearest_code_cpu, "blocked": nearest_code_exact}[search]
    codebook = torch.randn(40, 12)
    for row in (0, 777, 1999):
        x = torch.randn(2000, 12, dtype=torch.float64)
        x[row, 5] = bad
        with pytest.raises(NonFiniteInputError, match="1 NaN/Inf value"):
            run(x, codebook)
    large = torch.randn(2000, 12, dtype=torch.float64) * 1e30  # finite in float32: searched, exactly
    assert torch.equal(run(large, codebook), nearest_code_exact(large.float(), codebook))
